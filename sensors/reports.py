"""When monthly reports are made: once a month has closed in the tenant's time zone and the marts
have been rebuilt after it; and a daily check that none is missing."""

from datetime import UTC, datetime, timedelta

import dagster as dg

from assets.reports import REPORT_ASSET, closed_months_reported, consumption_report
from iiot_orchestration.partitions import TENANTS, tenant_key
from iiot_orchestration.reports.coverage import closed_months
from iiot_orchestration.reports.data import queries
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.settings import load_settings

MARTS_ASSET = dg.AssetKey("consumption_monthly")
MAX_REQUESTS_PER_TICK = 100  # a first deployment over many tenants catches up over a few ticks
COVERAGE_CRON = "0 7 * * *"  # a day after the marts build that follows any tenant's month end

consumption_reports_job = dg.define_asset_job(
    "consumption_reports_job",
    selection=dg.AssetSelection.assets(consumption_report)
    - dg.AssetSelection.checks(closed_months_reported),
    description="One tenant's monthly consumption report (PDF and XLSX) with its totals check.",
)

report_coverage_job = dg.define_asset_job(
    "report_coverage_job",
    selection=dg.AssetSelection.checks(closed_months_reported),
    description="Checks that every active tenant has a report for every closed month.",
)

report_coverage_schedule = dg.ScheduleDefinition(
    name="report_coverage_schedule",
    job=report_coverage_job,
    cron_schedule=COVERAGE_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily at 07:00 UTC: every active tenant has its closed months' reports.",
)


def marts_built_at(instance: dg.DagsterInstance) -> datetime | None:
    """When the newest build of the marts started (its run's start; the event's time when the
    materialization was reported without a run)."""
    event = instance.get_latest_materialization_event(MARTS_ASSET)
    if event is None:
        return None
    record = instance.get_run_record_by_id(event.run_id) if event.run_id else None
    started = record.start_time if record is not None and record.start_time else event.timestamp
    return datetime.fromtimestamp(started, UTC)


def report_requests(
    tenants: list[tuple[str, str, datetime]],
    partitions: set[str],
    materialized: set[str],
    built_at: datetime,
    lag: timedelta,
) -> list[dg.RunRequest]:
    """A run for each closed month of each active tenant that the marts cover (their build
    started after the month's last hour was rolled up) and that has no report yet."""
    requests = []
    for slug, timezone, created_at in tenants:
        if slug not in partitions:
            continue  # tenant_partitions_sensor adds it on its next tick
        for month in closed_months(created_at, timezone, built_at - lag):
            key = tenant_key(month.first_day.isoformat(), slug)
            if str(key) in materialized:
                continue
            requests.append(dg.RunRequest(run_key=f"{REPORT_ASSET}:{key}", partition_key=key))
    return requests[:MAX_REQUESTS_PER_TICK]


@dg.sensor(
    job=consumption_reports_job,
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Requests each active tenant's report for a month once the month has closed "
    "in the tenant's time zone and the marts have been rebuilt after it.",
)
def closed_month_reports_sensor(
    context: dg.SensorEvaluationContext, postgres: PostgresResource
) -> dg.SensorResult | dg.SkipReason:
    built_at = marts_built_at(context.instance)
    if built_at is None:
        return dg.SkipReason("the marts have not been built yet")
    with postgres.get_connection() as conn:
        tenants = [tuple(row) for row in conn.execute(queries()["active_tenants"])]
    partitions = set(context.instance.get_dynamic_partitions(TENANTS))
    materialized = {
        str(key) for key in context.instance.get_materialized_partitions(dg.AssetKey(REPORT_ASSET))
    }
    lag = timedelta(minutes=load_settings().rollup_lag_minutes)
    requests = report_requests(tenants, partitions, materialized, built_at, lag)
    return dg.SensorResult(run_requests=requests)
