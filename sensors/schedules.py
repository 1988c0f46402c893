"""Schedules of the periodic upkeep jobs."""

import dagster as dg

from assets.telemetry import telemetry_partitions

telemetry_partitions_job = dg.define_asset_job(
    "telemetry_partitions_job",
    selection=[telemetry_partitions],
    description="Create the telemetry partitions of the coming days (PostgreSQL mode).",
)

telemetry_partitions_schedule = dg.ScheduleDefinition(
    name="telemetry_partitions_schedule",
    job=telemetry_partitions_job,
    cron_schedule="15 0 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Creates tomorrow's and later telemetry partitions shortly after UTC midnight.",
)
