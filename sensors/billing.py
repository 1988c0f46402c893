"""Nightly billing at 02:00 in each tenant's time zone, one tenant-period at a time.

A cron schedule has one time zone and one job, so the nightly schedule is a sensor: every five
minutes it requests the runs of the tenants whose local time is in the 02:00 hour; run keys make
each tenant's night run once. Many tenants due in one time zone are billed by one bulk run, or
by IIOT_BILLING_NIGHTLY_SHARDS of them, which several Celery workers can take at once."""

import zlib
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg

from assets.billing import billing_daily_usage, billing_invoice, billing_nightly
from iiot_orchestration.billing import period_containing
from iiot_orchestration.partitions import tenant_key
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.settings import load_settings

BILLING_HOUR = 2  # local time of the nightly run
BILLING_TAG = "iiot/billing"  # one run per tenant-period at a time (dagster.yaml)
# From this many tenants due in one time zone in the same hour, one bulk run bills them all
# (billing_nightly) instead of two runs per tenant: Dagster's per-run overhead is seconds, the
# bulk run's cost per tenant milliseconds (docs/performance.md). The advisory lock per tenant in
# the billing functions keeps a tenant-period billed by one run at a time, bulk or not.
BULK_FROM = 50
MAX_SHARDS = 64  # IIOT_BILLING_NIGHTLY_SHARDS' range

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


def night_shard(slug: str, shards: int) -> int:
    """The bulk run (0 to ``shards`` - 1) that bills a tenant: from its slug alone (CRC-32), so a
    tenant keeps its run as others are added or removed."""
    return zlib.crc32(slug.encode()) % shards


def nightly_bulk_requests(
    now: datetime,
    tenants: list[tuple[str, str, int]],
    bulk_from: int = BULK_FROM,
    shards: int = 1,
) -> list[dg.RunRequest]:
    """``nightly_requests``, except that the tenants of a time zone with at least ``bulk_from``
    tenants due are billed by ``billing_nightly`` runs for yesterday (their slugs in the run's
    config): one, run key and tag ``iiot/billing`` ``nightly:<zone>:<day>``, or with ``shards``
    k > 1 up to k, the tenants split by ``night_shard``, run key and tag
    ``nightly:<zone>:<day>:<i>/<k>`` (i from 1); a shard without tenants gets no run."""
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be a whole number from 1 to {MAX_SHARDS}, not {shards!r}")
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
        split: list[list[str]] = [[] for _ in range(shards)]
        for slug, _, _ in group:
            split[night_shard(slug, shards)].append(slug)
        for n, slugs in enumerate(split):
            if not slugs:
                continue
            key = f"nightly:{timezone}:{yesterday}" + (f":{n + 1}/{shards}" if shards > 1 else "")
            requests.append(
                dg.RunRequest(
                    run_key=key,
                    job_name=billing_nightly_job.name,
                    partition_key=f"{yesterday}",
                    run_config={"ops": {"billing_nightly": {"config": {"tenants": sorted(slugs)}}}},
                    tags={BILLING_TAG: key},
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
    f"time zone with {BULK_FROM} or more tenants due gets bulk billing_nightly runs instead, "
    "up to IIOT_BILLING_NIGHTLY_SHARDS of them (default 1), tagged "
    "iiot/billing=nightly:<zone>:<day>[:<i>/<k>].",
)
def nightly_billing_sensor(
    context: dg.SensorEvaluationContext, postgres: PostgresResource
) -> list[dg.RunRequest]:
    shards = load_settings().billing_nightly_shards
    now = datetime.now(UTC)
    with postgres.get_connection() as conn:
        # a tenant created today (its local day) has no yesterday to bill
        tenants = conn.execute(
            "SELECT slug, timezone, billing_cycle_day FROM tenants WHERE status = 'active'"
            "   AND (created_at AT TIME ZONE timezone)::date < (now() AT TIME ZONE timezone)::date"
        ).fetchall()
    return nightly_bulk_requests(now, tenants, shards=shards)
