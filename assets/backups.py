"""The daily database backup and the weekly restore drill, with the checks ops watch: the newest
backup is younger than the RPO target, the last drill passed within 8 days, its RTO met the
target. Before the first scheduled backup and drill of a new install had time to run, a missing
one is a warning that says when it is due (docs/backups.md)."""

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg

from iiot_orchestration import alerts, backups
from iiot_orchestration.db import connect
from iiot_orchestration.retries import retry_transient
from iiot_orchestration.settings import Settings, load_settings

ARCHIVE_READABLE = "backup_archive_readable"
BACKUP_WITHIN_RPO = "backup_within_rpo"
DRILL_RECENT_AND_PASSED = "drill_recent_and_passed"
DRILL_RTO_WITHIN_TARGET = "drill_rto_within_target"

# the schedules (sensors/backups.py): a backup every night, a restore drill every Sunday
BACKUP_HOUR_UTC = 3  # midnight in Sao Paulo; the dump is one snapshot whatever else runs
DRILL_HOUR_UTC, DRILL_WEEKDAY = 5, 6  # Sundays (Monday is 0), two hours after that night's backup
BACKUP_CRON = f"0 {BACKUP_HOUR_UTC} * * *"
DRILL_CRON = f"0 {DRILL_HOUR_UTC} * * {(DRILL_WEEKDAY + 1) % 7}"  # cron counts from Sunday
# time the first scheduled run has to finish before its absence is a failure, not a warning
FIRST_RUN_GRACE = timedelta(hours=1)

BACKUP_ASSET: dict[str, Any] = {
    "group_name": "backups",
    "kinds": {"postgres"},
    "owners": ["team:platform"],
    "code_version": "1",
}


class BackupResource(dg.ConfigurableResource):
    """The login that takes backups and runs drills, and where backups go. Unset fields come
    from IIOT_BACKUP_DATABASE_URL (else IIOT_DATABASE_URL) and IIOT_BACKUP_ROOT."""

    database_url: str | None = None
    root: str | None = None

    def settings(self) -> Settings:
        return load_settings()

    def target(self, settings: Settings) -> tuple[str, Path]:
        url = self.database_url or settings.backup_database_url or settings.require_database_url()
        return url, Path(self.root) if self.root else settings.backup_root


def _hours(value: timedelta | None) -> float | None:
    return None if value is None else round(value.total_seconds() / 3600, 2)


@dg.asset(
    **BACKUP_ASSET,
    freshness_policy=dg.FreshnessPolicy.time_window(
        fail_window=timedelta(hours=26), warn_window=timedelta(hours=25)
    ),
    check_specs=[
        dg.AssetCheckSpec(
            ARCHIVE_READABLE,
            asset="database_backup",
            description="pg_restore reads the new dump's table of contents.",
        )
    ],
)
@retry_transient
def database_backup(
    context: dg.AssetExecutionContext, backup: BackupResource
) -> dg.MaterializeResult:
    """Last night's copy of the whole database (pg_dump, custom format) with a manifest of row
    counts and content fingerprints to restore and verify it by; older copies rotated out,
    keeping IIOT_BACKUP_KEEP_DAILY days and IIOT_BACKUP_KEEP_WEEKLY weeks."""
    settings = backup.settings()
    url, root = backup.target(settings)
    try:
        run = backups.run_backup(
            url,
            root,
            keep_daily=settings.backup_keep_daily,
            keep_weekly=settings.backup_keep_weekly,
            notifier=alerts.Notifier.from_settings(settings),
        )
    except backups.BackupError as exc:
        raise dg.Failure(description=str(exc)) from exc
    m = run.backup.manifest
    try:
        entries, readable, reason = backups.archive_entries(run.backup), True, ""
    except backups.BackupError as exc:
        entries, readable, reason = 0, False, str(exc)
    context.log.info(
        f"backup {m.backup_id}: {m.bytes:,} bytes, {len(m.tables)} tables; rotation deleted "
        f"{len(run.rotation.deleted)}"
    )
    return dg.MaterializeResult(
        metadata={
            "backup_id": m.backup_id,
            "path": str(run.backup.path),
            "bytes": m.bytes,
            "sha256": m.sha256,
            "schema": m.schema_label,
            "storage_mode": m.storage_mode,
            "seconds": round((m.finished_at - m.started_at).total_seconds(), 1),
            "tables": len(m.tables),
            "fingerprinted": sum(1 for t in m.tables.values() if t.fingerprint),
            "kept": dg.MetadataValue.json(run.rotation.kept),
            "deleted": dg.MetadataValue.json(run.rotation.deleted),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=ARCHIVE_READABLE,
                passed=readable,
                metadata={"entries": entries, "error": reason or "none"},
            )
        ],
    )


@dg.asset(
    **BACKUP_ASSET,
    deps=[database_backup],
    freshness_policy=dg.FreshnessPolicy.time_window(
        fail_window=timedelta(days=8), warn_window=timedelta(days=7)
    ),
)
@retry_transient
def restore_drill(
    context: dg.AssetExecutionContext, backup: BackupResource
) -> dg.MaterializeResult:
    """Proof that the newest backup restores: it is restored into a scratch database, verified
    against its manifest (sha256, row counts, fingerprints, rollup and invoice queries), timed
    (RTO) and aged (RPO), recorded in backup_drills, and the scratch database dropped."""
    settings = backup.settings()
    url, root = backup.target(settings)
    result = backups.run_drill(
        url,
        root,
        rpo_hours=settings.backup_rpo_hours,
        rto_minutes=settings.backup_rto_minutes,
        notifier=alerts.Notifier.from_settings(settings),
    )
    metadata = {
        "drill_id": result.drill_id,
        "backup_id": result.backup_id or "none",
        "rto_seconds": None if result.rto is None else round(result.rto.total_seconds(), 1),
        "rto_target_seconds": int(result.targets.rto.total_seconds()),
        "rpo_hours": _hours(result.rpo),
        "rpo_target_hours": _hours(result.targets.rpo),
        "tables_checked": result.tables_checked,
    }
    if not result.passed:
        raise dg.Failure(description=result.summary(), metadata=metadata)
    context.log.info(result.summary())
    return dg.MaterializeResult(metadata=metadata)


def first_backup_due(installed: datetime) -> datetime:
    """The first scheduled backup after the installation (its first migration)."""
    due = installed.astimezone(UTC).replace(hour=BACKUP_HOUR_UTC, minute=0, second=0, microsecond=0)
    return due if due > installed else due + timedelta(days=1)


def first_drill_due(installed: datetime) -> datetime:
    """The first scheduled restore drill after the first backup (before it, nothing to restore)."""
    backup = first_backup_due(installed)
    due = backup.replace(hour=DRILL_HOUR_UTC) + timedelta(
        days=(DRILL_WEEKDAY - backup.weekday()) % 7
    )
    return due if due > backup else due + timedelta(days=7)


def _status(backup: BackupResource) -> tuple[backups.Status, datetime | None]:
    """What is on disk and in backup_drills, and when the database was first migrated."""
    settings = backup.settings()
    url, root = backup.target(settings)
    with connect(url, autocommit=True, application_name="iiot-backup") as conn:
        found = backups.status(
            conn,
            root,
            backups.database_of(url),
            rpo_hours=settings.backup_rpo_hours,
            rto_minutes=settings.backup_rto_minutes,
        )
        installed = conn.execute("SELECT min(applied_at) FROM iiot_schema_migrations").fetchone()
    return found, installed[0]


def _none_yet(what: str, due: datetime | None, metadata: dict[str, Any]) -> dg.AssetCheckResult:
    """No backup or drill at all: a warning naming when the first is due until it had time to
    run (a new install is not broken), a failure after."""
    waiting = due is not None and datetime.now(UTC) < due + FIRST_RUN_GRACE
    when = f"{due:%Y-%m-%d %H:%M} UTC" if due else "unknown"
    return dg.AssetCheckResult(
        passed=False,
        severity=dg.AssetCheckSeverity.WARN if waiting else dg.AssetCheckSeverity.ERROR,
        description=f"no {what} yet, the first is due at {when}"
        if waiting
        else f"no {what}: the first was due at {when}",
        metadata={**metadata, "first_due": when},
    )


@dg.asset_check(
    asset=database_backup,
    name=BACKUP_WITHIN_RPO,
    description="The newest backup on disk is younger than the RPO target (the strictest of "
    "IIOT_BACKUP_RPO_HOURS among the plans of active tenants).",
)
def backup_within_rpo(backup: BackupResource) -> dg.AssetCheckResult:
    found, installed = _status(backup)
    metadata = {
        "newest_backup": found.newest.backup_id if found.newest else "none",
        "age_hours": _hours(found.newest_age),
        "rpo_target_hours": _hours(found.targets.rpo),
        "plans": ",".join(found.targets.plans) or "none",
        "unreadable_backups": dg.MetadataValue.md(
            "\n".join(f"- {p}" for p in found.problems) or "none"
        ),
    }
    if found.newest is None:
        return _none_yet("backup", installed and first_backup_due(installed), metadata)
    return dg.AssetCheckResult(passed=found.backup_within_rpo, metadata=metadata)


@dg.asset_check(
    asset=restore_drill,
    name=DRILL_RECENT_AND_PASSED,
    description=f"The last restore drill passed and started less than "
    f"{backups.DRILL_MAX_AGE.days} days ago.",
)
def drill_recent_and_passed(backup: BackupResource) -> dg.AssetCheckResult:
    found, installed = _status(backup)
    last = found.last_drill
    if last is None:
        return _none_yet("restore drill", installed and first_drill_due(installed), {})
    now = datetime.now(UTC)
    return dg.AssetCheckResult(
        passed=found.drill_recent_and_passed(now),
        metadata={
            "last_drill": last.drill_id,
            "status": last.status,
            "age_hours": _hours(now - last.started_at),
            "error": last.error or "none",
        },
    )


@dg.asset_check(
    asset=restore_drill,
    name=DRILL_RTO_WITHIN_TARGET,
    description="The last drill's measured RTO (checksum, restore and verification) is under "
    "the RTO target (the strictest of IIOT_BACKUP_RTO_MINUTES among the plans of active "
    "tenants).",
)
def drill_rto_within_target(backup: BackupResource) -> dg.AssetCheckResult:
    found, installed = _status(backup)
    last = found.last_drill
    target = {"rto_target_seconds": int(found.targets.rto.total_seconds())}
    if last is None:
        return _none_yet("restore drill", installed and first_drill_due(installed), target)
    return dg.AssetCheckResult(
        passed=found.rto_within_target,
        metadata={"last_drill": last.drill_id, "rto_seconds": last.rto_seconds, **target},
    )
