"""When backups and drills run: a backup every night, a restore drill every week, and the backup
checks every hour, so a missed backup shows long before the next drill. The same for
point-in-time recovery (pgBackRest): a base backup every night, a PITR drill every week."""

import dagster as dg

from assets.backups import (
    BACKUP_CRON,
    DRILL_CRON,
    PITR_BACKUP_CRON,
    PITR_DRILL_CRON,
    backup_within_rpo,
    database_backup,
    drill_recent_and_passed,
    drill_rto_within_target,
    pitr_backup,
    pitr_drill,
    pitr_drill_recent_and_passed,
    pitr_drill_within_targets,
    pitr_within_rpo,
    restore_drill,
)

CHECKS_CRON = "40 * * * *"

database_backup_job = dg.define_asset_job(
    "database_backup_job",
    selection=dg.AssetSelection.assets(database_backup),
    description="Back up the database (pg_dump with a manifest), rotate old backups, check them.",
)

restore_drill_job = dg.define_asset_job(
    "restore_drill_job",
    selection=dg.AssetSelection.assets(restore_drill),
    description="Restore the newest backup into a scratch database, verify it, record RTO/RPO.",
)

backup_checks_job = dg.define_asset_job(
    "backup_checks_job",
    selection=dg.AssetSelection.checks(
        backup_within_rpo,
        drill_recent_and_passed,
        drill_rto_within_target,
        pitr_within_rpo,
        pitr_drill_recent_and_passed,
        pitr_drill_within_targets,
    ),
    description="Checks the newest backup's age and the last drill's outcome and RTO, and with "
    "point-in-time recovery the recovery point and the last PITR drill.",
)

pitr_backup_job = dg.define_asset_job(
    "pitr_backup_job",
    selection=dg.AssetSelection.assets(pitr_backup),
    description="pgBackRest base backup of the cluster (full weekly, incremental otherwise).",
)

pitr_drill_job = dg.define_asset_job(
    "pitr_drill_job",
    selection=dg.AssetSelection.assets(pitr_drill),
    description="Restore the cluster to an instant into a scratch cluster, verify, record RTO/RPO.",
)

database_backup_schedule = dg.ScheduleDefinition(
    name="database_backup_schedule",
    job=database_backup_job,
    cron_schedule=BACKUP_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Backs up the database every night at 03:00 UTC.",
)

restore_drill_schedule = dg.ScheduleDefinition(
    name="restore_drill_schedule",
    job=restore_drill_job,
    cron_schedule=DRILL_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Restore drill of the newest backup every Sunday at 05:00 UTC.",
)

backup_checks_schedule = dg.ScheduleDefinition(
    name="backup_checks_schedule",
    job=backup_checks_job,
    cron_schedule=CHECKS_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Hourly: the newest backup is within the RPO target, the last drill passed "
    "within 8 days and met the RTO target; the PITR recovery point and the last PITR drill.",
)

pitr_backup_schedule = dg.ScheduleDefinition(
    name="pitr_backup_schedule",
    job=pitr_backup_job,
    cron_schedule=PITR_BACKUP_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="pgBackRest base backup every night at 04:00 UTC (does nothing without "
    "IIOT_PITR_STANZA).",
)

pitr_drill_schedule = dg.ScheduleDefinition(
    name="pitr_drill_schedule",
    job=pitr_drill_job,
    cron_schedule=PITR_DRILL_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Point-in-time recovery drill every Sunday at 06:00 UTC (does nothing without "
    "IIOT_PITR_STANZA).",
)
