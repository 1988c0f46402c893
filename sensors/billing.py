"""Nightly billing at 02:00 in each tenant's time zone, one tenant-period at a time.

A cron schedule has one time zone and one job, so the nightly schedule is a sensor: every five
minutes it requests the runs of the tenants whose local time is in the 02:00 hour; run keys make
each tenant's night run once. Many tenants due in one time zone are billed by one bulk run."""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg

from assets.billing import billing_daily_usage, billing_invoice, billing_nightly
from iiot_orchestration.billing import period_containing
from iiot_orchestration.partitions import tenant_key
from iiot_orchestration.resources import PostgresResource

BILLING_HOUR = 2  # local time of the nightly run
BILLING_TAG = "iiot/billing"  # one run per tenant-period at a time (dagster.yaml)
# From this many tenants due in one time zone in the same hour, one bulk run bills them all
# (billing_nightly) instead of two runs per tenant: Dagster's per-run overhead is seconds, the
# bulk run's cost per tenant milliseconds (docs/performance.md). The advisory lock per tenant in
# the billing functions keeps a tenant-period billed by one run at a time, bulk or not.
BULK_FROM = 50

billing_usage_job = dg.define_asset_job(
    "billing_usage_job",
    selection=[billing_daily_usage],
    description="A tenant's usage for one local day.",
)
billing_nightly_job = dg.define_asset_job(
    "billing_nightly_job",
    selection=[billing_nightly],
    description="The usage and invoices of many tenants of one time zone for one local day.",
)
billing_invoice_job = dg.define_asset_job(
    "billing_invoice_job",
    selection=[billing_invoice],
    description="A tenant's invoice for one billing period (draft, or final once closed).",
)


def nightly_requests(now: datetime, tenants: list[tuple[str, str, int]]) -> list[dg.RunRequest]:
    """For each tenant (slug, time zone, cycle day) for which ``now`` is in the 02:00 hour:
    yesterday's usage, then the invoice of the period holding yesterday (a draft, or the final
    invoice on the night after the period closes)."""
    requests = []
    for slug, timezone, cycle_day in tenants:
        local = now.astimezone(ZoneInfo(timezone))
        if local.hour != BILLING_HOUR:
            continue
        yesterday = local.date() - timedelta(days=1)
        period = period_containing(yesterday, cycle_day)
        tags = {BILLING_TAG: f"{slug}:{period.label:%Y-%m}"}
        requests.append(
            dg.RunRequest(
                run_key=f"usage:{slug}:{yesterday}",
                job_name=billing_usage_job.name,
                partition_key=tenant_key(f"{yesterday}", slug, "day"),
                tags=tags,
            )
        )
        requests.append(
            dg.RunRequest(
                run_key=f"invoice:{slug}:{yesterday}",
                job_name=billing_invoice_job.name,
                partition_key=tenant_key(f"{period.label}", slug),
                tags=tags,
            )
        )
    return requests


def nightly_bulk_requests(
    now: datetime, tenants: list[tuple[str, str, int]], bulk_from: int = BULK_FROM
) -> list[dg.RunRequest]:
    """``nightly_requests``, except that the tenants of a time zone with at least ``bulk_from``
    tenants due are billed by one ``billing_nightly`` run for yesterday (their slugs in its
    config), tagged ``iiot/billing=nightly:<zone>:<day>``."""
    due: dict[str, list[tuple[str, str, int]]] = {}
    for tenant in tenants:
        if now.astimezone(ZoneInfo(tenant[1])).hour == BILLING_HOUR:
            due.setdefault(tenant[1], []).append(tenant)
    requests = []
    for timezone, group in sorted(due.items()):
        if len(group) < bulk_from:
            requests += nightly_requests(now, group)
            continue
        yesterday = now.astimezone(ZoneInfo(timezone)).date() - timedelta(days=1)
        requests.append(
            dg.RunRequest(
                run_key=f"nightly:{timezone}:{yesterday}",
                job_name=billing_nightly_job.name,
                partition_key=f"{yesterday}",
                run_config={
                    "ops": {
                        "billing_nightly": {
                            "config": {"tenants": sorted(slug for slug, _, _ in group)}
                        }
                    }
                },
                tags={BILLING_TAG: f"nightly:{timezone}:{yesterday}"},
            )
        )
    return requests


@dg.sensor(
    jobs=[billing_usage_job, billing_invoice_job, billing_nightly_job],
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="The nightly billing schedule, per tenant time zone: during the 02:00 hour of "
    "each active tenant's local time, yesterday's usage and then the period's invoice, once "
    "per tenant and day (run keys), tagged iiot/billing=<tenant>:<period> (one at a time); a "
    f"time zone with {BULK_FROM} or more tenants due gets one bulk billing_nightly run.",
)
def nightly_billing_sensor(
    context: dg.SensorEvaluationContext, postgres: PostgresResource
) -> list[dg.RunRequest]:
    now = datetime.now(UTC)
    with postgres.get_connection() as conn:
        # a tenant created today (its local day) has no yesterday to bill
        tenants = conn.execute(
            "SELECT slug, timezone, billing_cycle_day FROM tenants WHERE status = 'active'"
            "   AND (created_at AT TIME ZONE timezone)::date < (now() AT TIME ZONE timezone)::date"
        ).fetchall()
    return nightly_bulk_requests(now, tenants)
