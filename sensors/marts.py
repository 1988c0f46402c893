"""When the marts rebuild: once a day, after the rollups have closed the UTC day."""

import dagster as dg

from assets.marts import marts

MARTS_CRON = "45 0 * * *"  # the 23:00 hour is rolled up at 00:05 (IIOT_ROLLUP_LAG_MINUTES)

marts_job = dg.define_asset_job(
    "marts_job",
    selection=dg.AssetSelection.assets(marts),
    description="dbt build of the consumption marts, with their dbt tests.",
)

marts_schedule = dg.ScheduleDefinition(
    name="marts_schedule",
    job=marts_job,
    cron_schedule=MARTS_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Rebuilds the marts from the rollups at 00:45 UTC, after the day's last hour.",
)
