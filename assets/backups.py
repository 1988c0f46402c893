"""The daily database backup and the weekly restore drill, with the checks ops watch: the newest
backup is younger than the RPO target, the last drill passed within 8 days, its RTO met the
target. Before the first scheduled backup and drill of a new install had time to run, a missing
one is a warning that says when it is due (docs/backups.md).

With point-in-time recovery configured (IIOT_PITR_STANZA), the same for pgBackRest: a base backup
every night, a PITR drill every week, and checks of the recovery point (the newest restorable
instant against IIOT_PITR_RPO_MINUTES) and of the last PITR drill
(docs/operations.md#point-in-time-recovery). Without it those assets do nothing and their checks
pass saying so."""

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg

from iiot_orchestration import alerts, backups, pitr
from iiot_orchestration.db import connect
from iiot_orchestration.retries import retry_transient
from iiot_orchestration.settings import Settings, load_settings

ARCHIVE_READABLE = "backup_archive_readable"
BACKUP_WITHIN_RPO = "backup_within_rpo"
DRILL_RECENT_AND_PASSED = "drill_recent_and_passed"
DRILL_RTO_WITHIN_TARGET = "drill_rto_within_target"
PITR_WITHIN_RPO = "pitr_within_rpo"
PITR_DRILL_RECENT_AND_PASSED = "pitr_drill_recent_and_passed"
PITR_DRILL_WITHIN_TARGETS = "pitr_drill_within_targets"

# the schedules (sensors/backups.py): a backup every night, a restore drill every Sunday
BACKUP_HOUR_UTC = 3  # midnight in Sao Paulo; the dump is one snapshot whatever else runs
DRILL_HOUR_UTC, DRILL_WEEKDAY = 5, 6  # Sundays (Monday is 0), two hours after that night's backup
BACKUP_CRON = f"0 {BACKUP_HOUR_UTC} * * *"
DRILL_CRON = f"0 {DRILL_HOUR_UTC} * * {(DRILL_WEEKDAY + 1) % 7}"  # cron counts from Sunday
# pgBackRest: a base backup every night after the dump (full when the newest full is a week
# old, incremental otherwise), and the PITR drill every Sunday after the logical one
PITR_BACKUP_HOUR_UTC = 4
PITR_DRILL_HOUR_UTC = 6
PITR_BACKUP_CRON = f"0 {PITR_BACKUP_HOUR_UTC} * * *"
PITR_DRILL_CRON = f"0 {PITR_DRILL_HOUR_UTC} * * {(DRILL_WEEKDAY + 1) % 7}"
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


def _daily_after(moment: datetime, hour: int) -> datetime:
    """The first ``hour``:00 UTC after ``moment``."""
    due = moment.astimezone(UTC).replace(hour=hour, minute=0, second=0, microsecond=0)
    return due if due > moment else due + timedelta(days=1)


def _weekly_after(moment: datetime, hour: int) -> datetime:
    """The first DRILL_WEEKDAY ``hour``:00 UTC after ``moment`` (a UTC time)."""
    due = moment.replace(hour=hour) + timedelta(days=(DRILL_WEEKDAY - moment.weekday()) % 7)
    return due if due > moment else due + timedelta(days=7)


def first_backup_due(installed: datetime) -> datetime:
    """The first scheduled backup after the installation (its first migration)."""
    return _daily_after(installed, BACKUP_HOUR_UTC)


def first_drill_due(installed: datetime) -> datetime:
    """The first scheduled restore drill after the first backup (before it, nothing to restore)."""
    return _weekly_after(first_backup_due(installed), DRILL_HOUR_UTC)


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
    return _recent_and_passed(last, found.drill_recent_and_passed)


def _recent_and_passed(
    last: backups.DrillRecord, passed: Callable[[datetime], bool]
) -> dg.AssetCheckResult:
    now = datetime.now(UTC)
    return dg.AssetCheckResult(
        passed=passed(now),
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


# ---------------------------------------------------------------------------------------------
# Point-in-time recovery (pgBackRest)

NOT_CONFIGURED = "point-in-time recovery is not configured (IIOT_PITR_STANZA unset)"


@dg.asset(
    **BACKUP_ASSET,
    freshness_policy=dg.FreshnessPolicy.time_window(
        fail_window=timedelta(hours=26), warn_window=timedelta(hours=25)
    ),
)
@retry_transient
def pitr_backup(context: dg.AssetExecutionContext, backup: BackupResource) -> dg.MaterializeResult:
    """Last night's pgBackRest base backup of the database's cluster, to which the archived WAL
    is replayed in a point-in-time restore: full when the newest full backup is a week old,
    incremental otherwise; backups beyond IIOT_PITR_RETENTION_FULL full ones expire. Does
    nothing without IIOT_PITR_STANZA."""
    settings = backup.settings()
    config = pitr.PitrConfig.from_settings(settings)
    if config is None:
        context.log.info(NOT_CONFIGURED)
        return dg.MaterializeResult(metadata={"configured": False})
    url, _ = backup.target(settings)
    try:
        run = pitr.take_backup(url, config, notifier=alerts.Notifier.from_settings(settings))
    except backups.BackupError as exc:
        raise dg.Failure(description=str(exc)) from exc
    b = run.backup
    context.log.info(f"{b.type} backup {b.label}: {b.size:,} bytes in {run.seconds:.1f} s")
    return dg.MaterializeResult(
        metadata={
            "configured": True,
            "label": b.label,
            "type": b.type,
            "bytes": b.size,
            "repo_bytes": b.repo_size,
            "seconds": round(run.seconds, 1),
            "wal_start": b.wal_start or "none",
            "wal_stop": b.wal_stop or "none",
        }
    )


@dg.asset(
    **BACKUP_ASSET,
    deps=[pitr_backup],
    freshness_policy=dg.FreshnessPolicy.time_window(
        fail_window=timedelta(days=8), warn_window=timedelta(days=7)
    ),
)
@retry_transient
def pitr_drill(context: dg.AssetExecutionContext, backup: BackupResource) -> dg.MaterializeResult:
    """Proof that the cluster restores to an instant: the database described in one snapshot
    (row counts, fingerprints, rollup and invoice queries), the cluster restored by pgBackRest
    to exactly that snapshot's WAL position in a scratch cluster and compared, RTO and RPO (the
    newest restorable instant when the drill started) recorded in backup_drills, the scratch
    cluster removed. Does nothing without IIOT_PITR_STANZA."""
    settings = backup.settings()
    config = pitr.PitrConfig.from_settings(settings)
    if config is None:
        context.log.info(NOT_CONFIGURED)
        return dg.MaterializeResult(metadata={"configured": False})
    url, _ = backup.target(settings)
    drill = pitr.run_drill(
        url,
        config,
        rpo_hours=settings.backup_rpo_hours,
        rto_minutes=settings.backup_rto_minutes,
        notifier=alerts.Notifier.from_settings(settings),
    )
    r = drill.result
    metadata = {
        "configured": True,
        "drill_id": r.drill_id,
        "backup": r.backup_id or "none",
        "restored_to": str(r.backup_taken_at) if r.backup_taken_at else "none",
        "rto_seconds": None if r.rto is None else round(r.rto.total_seconds(), 1),
        "rto_target_seconds": int(r.targets.rto.total_seconds()),
        "rpo_seconds": None if r.rpo is None else round(r.rpo.total_seconds(), 1),
        "rpo_target_seconds": int(r.targets.rpo.total_seconds()),
        "tables_checked": r.tables_checked,
    }
    if not drill.passed:
        raise dg.Failure(description=drill.summary(), metadata=metadata)
    context.log.info(drill.summary())
    return dg.MaterializeResult(metadata=metadata)


def first_pitr_backup_due(configured: datetime) -> datetime:
    """The first scheduled pgBackRest backup after `iiot backup pitr setup`."""
    return _daily_after(configured, PITR_BACKUP_HOUR_UTC)


def first_pitr_drill_due(configured: datetime) -> datetime:
    """The first scheduled PITR drill after the first pgBackRest backup."""
    return _weekly_after(first_pitr_backup_due(configured), PITR_DRILL_HOUR_UTC)


def _pitr_status(
    backup: BackupResource,
) -> tuple[pitr.PitrStatus | None, pitr.PitrConfig | None]:
    settings = backup.settings()
    config = pitr.PitrConfig.from_settings(settings)
    if config is None:
        return None, None
    url, _ = backup.target(settings)
    with connect(url, autocommit=True, application_name="iiot-pitr") as conn:
        found = pitr.status(
            conn,
            config,
            backups.database_of(url),
            rpo_hours=settings.backup_rpo_hours,
            rto_minutes=settings.backup_rto_minutes,
        )
    return found, config


def _not_configured() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=True, description=NOT_CONFIGURED, metadata={"configured": False}
    )


@dg.asset_check(
    asset=pitr_backup,
    name=PITR_WITHIN_RPO,
    description="The newest restorable instant (every WAL byte written is archived, or the "
    "newest archived segment's time) is within IIOT_PITR_RPO_MINUTES of now, and archiving is "
    "neither failing nor behind.",
)
def pitr_within_rpo(backup: BackupResource) -> dg.AssetCheckResult:
    found, config = _pitr_status(backup)
    if found is None or config is None:
        return _not_configured()
    point = found.point
    metadata = {
        "recovery_point": str(point.instant) if point and point.instant else "unknown",
        "rpo_seconds": None if point is None or point.rpo is None else point.rpo.total_seconds(),
        "rpo_target_seconds": int(found.targets.rpo.total_seconds()),
        "newest_archived_wal": (point.newest_wal if point else None) or "none",
        "newest_backup": found.newest_backup.label if found.newest_backup else "none",
    }
    problems = [*found.problems, *([point.problem] if point and point.problem else [])]
    if found.newest_backup is None and not found.archive_within_rpo:
        configured = pitr.configured_at(config)
        return _none_yet(
            "pgBackRest backup", configured and first_pitr_backup_due(configured), metadata
        )
    return dg.AssetCheckResult(
        passed=found.archive_within_rpo,
        description="; ".join(problems) or None,
        metadata=metadata,
    )


@dg.asset_check(
    asset=pitr_drill,
    name=PITR_DRILL_RECENT_AND_PASSED,
    description=f"The last point-in-time recovery drill passed and started less than "
    f"{backups.DRILL_MAX_AGE.days} days ago.",
)
def pitr_drill_recent_and_passed(backup: BackupResource) -> dg.AssetCheckResult:
    found, config = _pitr_status(backup)
    if found is None or config is None:
        return _not_configured()
    last = found.last_drill
    if last is None:
        configured = pitr.configured_at(config)
        return _none_yet("PITR drill", configured and first_pitr_drill_due(configured), {})
    return _recent_and_passed(last, found.drill_recent_and_passed)


@dg.asset_check(
    asset=pitr_drill,
    name=PITR_DRILL_WITHIN_TARGETS,
    description="The last PITR drill's measured RPO (its start against the newest restorable "
    "instant) is within IIOT_PITR_RPO_MINUTES and its RTO (restore, WAL replay, verification) "
    "within the RTO target (the strictest of IIOT_BACKUP_RTO_MINUTES among the plans of active "
    "tenants).",
)
def pitr_drill_within_targets(backup: BackupResource) -> dg.AssetCheckResult:
    found, config = _pitr_status(backup)
    if found is None or config is None:
        return _not_configured()
    last = found.last_drill
    targets = {
        "rpo_target_seconds": int(found.targets.rpo.total_seconds()),
        "rto_target_seconds": int(found.targets.rto.total_seconds()),
    }
    if last is None:
        configured = pitr.configured_at(config)
        return _none_yet("PITR drill", configured and first_pitr_drill_due(configured), targets)
    return dg.AssetCheckResult(
        passed=found.drill_within_targets,
        metadata={
            "last_drill": last.drill_id,
            "rpo_seconds": last.rpo_seconds,
            "rto_seconds": last.rto_seconds,
            **targets,
        },
    )
