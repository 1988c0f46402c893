"""Nightly billing at 02:00 in each tenant's time zone, one tenant-period at a time.

A cron schedule has one time zone and one job, so the nightly schedule is a sensor: every five
minutes it requests the runs of the tenants whose local time is in the 02:00 hour; run keys make
each tenant's night run once."""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg

from assets.billing import billing_daily_usage, billing_invoice
from iiot_orchestration.billing import period_containing
from iiot_orchestration.partitions import tenant_key
from iiot_orchestration.resources import PostgresResource

BILLING_HOUR = 2  # local time of the nightly run
BILLING_TAG = "iiot/billing"  # one run per tenant-period at a time (dagster.yaml)

billing_usage_job = dg.define_asset_job(
    "billing_usage_job",
    selection=[billing_daily_usage],
    description="A tenant's usage for one local day.",
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


@dg.sensor(
    jobs=[billing_usage_job, billing_invoice_job],
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="The nightly billing schedule, per tenant time zone: during the 02:00 hour of "
    "each active tenant's local time, yesterday's usage and then the period's invoice, once "
    "per tenant and day (run keys), tagged iiot/billing=<tenant>:<period> (one at a time).",
)
def nightly_billing_sensor(
    context: dg.SensorEvaluationContext, postgres: PostgresResource
) -> list[dg.RunRequest]:
    now = datetime.now(UTC)
    with postgres.get_connection() as conn:
        tenants = conn.execute(
            "SELECT slug, timezone, billing_cycle_day FROM tenants WHERE status = 'active'"
        ).fetchall()
    return nightly_requests(now, tenants)
