"""When dead letters expire: daily, shortly after UTC midnight."""

import dagster as dg

from assets.dead_letters import dead_letter_retention

DEAD_LETTER_RETENTION_CRON = "45 0 * * *"

dead_letter_retention_job = dg.define_asset_job(
    "dead_letter_retention_job",
    selection=[dead_letter_retention],
    description="Delete the dead letters older than IIOT_DEAD_LETTER_RETENTION_DAYS.",
)

dead_letter_retention_schedule = dg.ScheduleDefinition(
    name="dead_letter_retention_schedule",
    job=dead_letter_retention_job,
    cron_schedule=DEAD_LETTER_RETENTION_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Deletes expired dead letters at 00:45 UTC.",
)
