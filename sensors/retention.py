"""When retention runs: the archive of the day that ended every night at 01:30 UTC, chunk
compression after it (TimescaleDB mode), and the archive checks every Sunday, which read every
archive back and look for expired readings anywhere."""

import dagster as dg

from assets.retention import (
    archive_checksums_verify,
    no_expired_readings,
    telemetry_archive,
    telemetry_compression,
)

COMPRESSION_CRON = "30 2 * * *"
CHECKS_CRON = "0 4 * * 0"  # Sundays, before the weekly restore drill

telemetry_archive_job = dg.define_asset_job(
    "telemetry_archive_job",
    selection=dg.AssetSelection.assets(telemetry_archive),
    description="Archive, verify and remove the raw readings that fell out of each tenant's "
    "retention by the end of the partition's day.",
)

telemetry_compression_job = dg.define_asset_job(
    "telemetry_compression_job",
    selection=dg.AssetSelection.assets(telemetry_compression),
    description="Compress telemetry chunks older than IIOT_COMPRESS_AFTER_DAYS (TimescaleDB).",
)

archive_checks_job = dg.define_asset_job(
    "archive_checks_job",
    selection=dg.AssetSelection.checks(archive_checksums_verify, no_expired_readings),
    description="Read every archive back against its manifest and record; look for readings "
    "older than their tenant's retention.",
)

telemetry_archive_schedule = dg.build_schedule_from_partitioned_job(
    telemetry_archive_job,
    name="telemetry_archive_schedule",
    hour_of_day=1,
    minute_of_hour=30,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Archives and removes what fell out of retention on the day that ended, at "
    "01:30 UTC.",
)

telemetry_compression_schedule = dg.ScheduleDefinition(
    name="telemetry_compression_schedule",
    job=telemetry_compression_job,
    cron_schedule=COMPRESSION_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Compresses old telemetry chunks at 02:30 UTC, after the nightly archive.",
)

archive_checks_schedule = dg.ScheduleDefinition(
    name="archive_checks_schedule",
    job=archive_checks_job,
    cron_schedule=CHECKS_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Sundays at 04:00 UTC: every archive's checksum, and no expired readings left.",
)
