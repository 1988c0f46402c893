"""When rollups run: a few minutes past every hour for the hour that closed, and for late data."""

from datetime import UTC, datetime, timedelta

import dagster as dg

from assets.rollups import (
    HOURS_TAG,
    LATE_DAY_TAG,
    PARTITIONS_START,
    hours_tag,
    telemetry_daily,
    telemetry_hourly,
)
from iiot_orchestration import rollups
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.settings import load_settings

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]

telemetry_rollups_job = dg.define_asset_job(
    "telemetry_rollups_job",
    selection=[telemetry_hourly, telemetry_daily],
    description="Hourly then daily rollups for one UTC day, or the hours tagged iiot/hours.",
)


def closed_hour_request(now: datetime) -> dg.RunRequest:
    """The run for the hour that closed before ``now``: its day's partition, that hour only."""
    hour = rollups.floor_hour(now) - rollups.HOUR
    return dg.RunRequest(
        run_key=f"hour-{hour:%Y-%m-%dT%H}",
        partition_key=f"{hour:%Y-%m-%d}",
        tags={HOURS_TAG: hours_tag([hour])},
    )


@dg.schedule(
    job=telemetry_rollups_job,
    cron_schedule=f"{load_settings().rollup_lag_minutes} * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Rolls up the hour that just closed, IIOT_ROLLUP_LAG_MINUTES past the hour.",
)
def telemetry_rollup_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    return closed_hour_request(context.scheduled_execution_time or datetime.now(UTC))


def late_requests(
    instance: dg.DagsterInstance, dirty: dict[datetime, list[datetime]], now: datetime
) -> tuple[list[dg.RunRequest], list[str]]:
    """One run per UTC day with dirty hours, tagged with exactly those hours, unless a late-data
    run for that day is still queued or running (then the day waits for the next tick)."""
    requests, waiting = [], []
    for day, hours in sorted(dirty.items()):
        key = f"{day:%Y-%m-%d}"
        if key < PARTITIONS_START:
            continue  # before the first partition: nothing to roll up into
        busy = instance.get_run_records(
            dg.RunsFilter(tags={LATE_DAY_TAG: key}, statuses=IN_FLIGHT), limit=1
        )
        if busy:
            waiting.append(key)
            continue
        tag = hours_tag(hours)
        requests.append(
            dg.RunRequest(
                run_key=f"late-{key}-{tag}-{now:%Y%m%dT%H%M%S}",
                partition_key=key,
                tags={HOURS_TAG: tag, LATE_DAY_TAG: key},
            )
        )
    return requests, waiting


@dg.sensor(
    job=telemetry_rollups_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Re-rolls exactly the hours that received late data (dirty windows marked by the "
    "ingest daemon), once their marks have settled; one run per day at a time.",
)
def late_telemetry_sensor(
    context: dg.SensorEvaluationContext, postgres: PostgresResource
) -> dg.SensorResult:
    now = datetime.now(UTC)
    settle = timedelta(minutes=load_settings().rollup_lag_minutes)
    with postgres.get_connection() as conn:
        dirty = rollups.dirty_hours(conn, now - settle)
    requests, waiting = late_requests(context.instance, dirty, now)
    if waiting:
        context.log.info(f"late-data runs still in flight for {', '.join(waiting)}")
    return dg.SensorResult(run_requests=requests)
