"""The single Dagster entry point: domain modules plus the cross-cutting resources."""

import dagster as dg

from assets import (
    alerts,
    backups,
    billing,
    certificates,
    dead_letters,
    marts,
    quality,
    raw_telemetry,
    reports,
    retention,
    rollups,
    telemetry,
)
from assets.backups import BackupResource
from assets.certificates import CertificatesResource
from assets.retention import ArchiveResource
from iiot_orchestration.celery_executor import job_executor
from iiot_orchestration.resources import PostgresResource
from sensors import alerts as alert_sensors
from sensors import backups as backup_schedules
from sensors import billing as billing_schedules
from sensors import certificates as certificate_schedules
from sensors import dead_letters as dead_letter_schedules
from sensors import marts as mart_schedules
from sensors import raw_telemetry as raw_telemetry_sensors
from sensors import reports as report_sensors
from sensors import retention as retention_schedules
from sensors import rollups as rollup_sensors
from sensors import schedules
from sensors import tenants as tenant_sensors

defs = dg.Definitions(
    assets=[
        raw_telemetry.raw_telemetry,  # an AssetSpec: load_assets_from_modules skips specs
        *dg.load_assets_from_modules(
            [
                telemetry,
                rollups,
                marts,
                billing,
                alerts,
                reports,
                backups,
                certificates,
                retention,
                dead_letters,
            ]
        ),
    ],
    asset_checks=dg.load_asset_checks_from_modules(
        [
            telemetry,
            rollups,
            quality,
            billing,
            reports,
            backups,
            certificates,
            retention,
            dead_letters,
        ]
    ),
    jobs=[
        schedules.telemetry_partitions_job,
        rollup_sensors.telemetry_rollups_job,
        mart_schedules.marts_job,
        billing_schedules.billing_usage_job,
        billing_schedules.billing_invoice_job,
        alert_sensors.threshold_alerts_job,
        report_sensors.consumption_reports_job,
        report_sensors.report_coverage_job,
        backup_schedules.database_backup_job,
        backup_schedules.restore_drill_job,
        backup_schedules.backup_checks_job,
        backup_schedules.pitr_backup_job,
        backup_schedules.pitr_drill_job,
        certificate_schedules.certificate_sweep_job,
        certificate_schedules.certificate_renewal_job,
        retention_schedules.telemetry_archive_job,
        retention_schedules.telemetry_compression_job,
        retention_schedules.archive_checks_job,
        dead_letter_schedules.dead_letter_retention_job,
    ],
    schedules=[
        schedules.telemetry_partitions_schedule,
        rollup_sensors.telemetry_rollup_schedule,
        mart_schedules.marts_schedule,
        alert_sensors.threshold_alerts_schedule,
        report_sensors.report_coverage_schedule,
        backup_schedules.database_backup_schedule,
        backup_schedules.restore_drill_schedule,
        backup_schedules.backup_checks_schedule,
        backup_schedules.pitr_backup_schedule,
        backup_schedules.pitr_drill_schedule,
        certificate_schedules.certificate_sweep_schedule,
        certificate_schedules.certificate_renewal_schedule,
        retention_schedules.telemetry_archive_schedule,
        retention_schedules.telemetry_compression_schedule,
        retention_schedules.archive_checks_schedule,
        dead_letter_schedules.dead_letter_retention_schedule,
    ],
    sensors=[
        raw_telemetry_sensors.raw_telemetry_sensor,
        rollup_sensors.late_telemetry_sensor,
        tenant_sensors.tenant_partitions_sensor,
        billing_schedules.nightly_billing_sensor,
        alert_sensors.run_failure_alert_sensor,
        alert_sensors.dead_letter_backlog_sensor,
        alert_sensors.ingest_freshness_sensor,
        alert_sensors.certificate_expiry_sensor,
        alert_sensors.restore_drill_sensor,
        report_sensors.closed_month_reports_sensor,
        certificate_schedules.ota_ack_sensor,
    ],
    resources={
        "postgres": PostgresResource(database_url=dg.EnvVar("IIOT_DATABASE_URL")),
        "dbt": marts.dbt_resource(),
        "backup": BackupResource(),
        "certificates": CertificatesResource(),
        "archive": ArchiveResource(),
    },
    # Dagster's default, or Celery workers with IIOT_DAGSTER_EXECUTOR=celery
    executor=job_executor(),
)
