"""``iiot backup``: take, list, verify and restore backups, and run restore drills on demand
(docs/backups.md, docs/runbooks/restore.md)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import psycopg

from iiot_orchestration import alerts, backups
from iiot_orchestration.cli_common import HelpGroup, _json, _settings, _table, friendly_errors
from iiot_orchestration.cli_pitr import pitr_group, pitr_status_of, status_json, status_lines
from iiot_orchestration.db import connect
from iiot_orchestration.errors import IiotError
from iiot_orchestration.settings import Settings

BACKUP_ID_HELP = "A backup id from `iiot backup list`, or `latest`."


def _target() -> tuple[Settings, str, Path, str]:
    settings = _settings()
    url = settings.backup_database_url or settings.require_database_url()
    return settings, url, settings.backup_root, backups.database_of(url)


def _size(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1024
    return str(size)  # pragma: no cover - the loop always returns


def _backup_row(backup: backups.Backup, drills: dict[str, str]) -> dict[str, Any]:
    m = backup.manifest
    return {
        "backup_id": m.backup_id,
        "taken_at": m.started_at,
        "seconds": round((m.finished_at - m.started_at).total_seconds(), 1),
        "bytes": m.bytes,
        "schema": m.schema_label,
        "storage_mode": m.storage_mode,
        "sha256": m.sha256,
        "last_drill": drills.get(m.backup_id),
        "path": str(backup.path),
    }


def _drill_row(result: backups.DrillResult) -> dict[str, Any]:
    return {
        "drill_id": result.drill_id,
        "status": "passed" if result.passed else "failed",
        "backup_id": result.backup_id,
        "scratch_database": result.scratch_database,
        "rto_seconds": None if result.rto is None else round(result.rto.total_seconds(), 3),
        "rto_target_seconds": int(result.targets.rto.total_seconds()),
        "rpo_seconds": None if result.rpo is None else round(result.rpo.total_seconds(), 3),
        "rpo_target_seconds": int(result.targets.rpo.total_seconds()),
        "tables_checked": result.tables_checked,
        "mismatches": result.mismatches,
        "error": result.error,
    }


@click.group("backup", cls=HelpGroup)
def backup_group() -> None:
    """Database backups, restore drills and point-in-time recovery with pgBackRest
    (docs/backups.md)."""


backup_group.add_command(pitr_group)


@backup_group.command("run")
@click.option("--no-rotate", is_flag=True, help="Keep every older backup this time.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@friendly_errors
def backup_run(no_rotate: bool, as_json: bool) -> None:
    """Back up the database now (as the nightly asset does), then rotate old backups."""
    settings, url, root, _ = _target()
    run = backups.run_backup(
        url,
        root,
        keep_daily=settings.backup_keep_daily,
        keep_weekly=settings.backup_keep_weekly,
        notifier=alerts.Notifier.from_settings(settings),
        rotate_after=not no_rotate,
    )
    row = _backup_row(run.backup, {})
    row.pop("last_drill")
    if as_json:
        click.echo(_json([{**row, "deleted": run.rotation.deleted}]))
        return
    click.echo(
        f"Backup {row['backup_id']} of {run.backup.manifest.database}: {_size(row['bytes'])} in "
        f"{row['seconds']} s, schema {row['schema']}, sha256 {row['sha256'][:16]}...\n"
        f"  {row['path']}"
    )
    if run.rotation.deleted:
        click.echo(f"Rotation deleted {', '.join(run.rotation.deleted)}.")


@backup_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def backup_list(as_json: bool) -> None:
    """List the backups of the database under IIOT_BACKUP_ROOT, newest first."""
    _, url, root, database = _target()
    found, problems = backups.list_backups(root, database)
    try:
        with connect(url, autocommit=True, application_name="iiot-backup") as conn:
            outcome = {
                d.backup_id: d.status for d in reversed(backups.drills(conn, database, limit=1000))
            }
    except (IiotError, psycopg.Error) as exc:
        # the files are the backups: listing them must work while the database is down
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        click.secho(f"note: drill outcomes unknown ({reason})", fg="yellow", err=True)
        outcome = {}
    rows = [_backup_row(b, outcome) for b in reversed(found)]
    if as_json:
        click.echo(_json(rows))
    elif rows:
        click.echo(
            _table(
                ["backup", "taken at", "size", "schema", "mode", "sha256", "last drill"],
                [
                    [
                        r["backup_id"],
                        r["taken_at"],
                        _size(r["bytes"]),
                        r["schema"],
                        r["storage_mode"],
                        r["sha256"][:12],
                        r["last_drill"],
                    ]
                    for r in rows
                ],
            )
        )
        click.echo(
            f"{len(rows)} backups of {database} under {backups.database_dir(root, database)}"
        )
    else:
        click.echo(f"No backups of {database} under {backups.database_dir(root, database)}.")
    for problem in problems:
        click.secho(f"warning: {problem}", fg="yellow", err=True)


@backup_group.command("verify")
@click.argument("backup_id", default="latest")
@friendly_errors
def backup_verify(backup_id: str) -> None:
    """Check that BACKUP_ID's dump matches its sha256 and that pg_restore can read it."""
    _, _, root, database = _target()
    backup = backups.find_backup(root, database, backup_id)
    backups.verify_checksum(backup)
    entries = backups.archive_entries(backup)
    click.echo(
        f"Backup {backup.backup_id} is intact: sha256 matches, {entries} archive entries, "
        f"schema {backup.manifest.schema_label}."
    )


@backup_group.command("drill")
@click.option("--backup", "backup_id", default="latest", show_default=True, help=BACKUP_ID_HELP)
@click.option(
    "--jobs", type=click.IntRange(1, 32), default=2, show_default=True, help="pg_restore jobs."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@friendly_errors
def backup_drill(backup_id: str, jobs: int, as_json: bool) -> None:
    """Restore a backup into a scratch database, verify it, record RTO and RPO, drop it.

    Exits 1 when the drill fails (the failure is recorded and alerted too).
    """
    settings, url, root, database = _target()
    # a mistyped id is a usage error, not a failed drill to record and alert on
    chosen = (
        backups.find_backup(root, database, backup_id).backup_id if backup_id != "latest" else None
    )
    result = backups.run_drill(
        url,
        root,
        backup_id=chosen,
        jobs=jobs,
        rpo_hours=settings.backup_rpo_hours,
        rto_minutes=settings.backup_rto_minutes,
        notifier=alerts.Notifier.from_settings(settings),
    )
    if as_json:
        click.echo(_json([_drill_row(result)]))
    elif result.passed:
        click.echo(result.summary())
        if not result.rto_met or not result.rpo_met:
            click.secho(
                "warning: the drill passed but missed its "
                + " and ".join(
                    n for n, met in (("RTO", result.rto_met), ("RPO", result.rpo_met)) if not met
                )
                + " target",
                fg="yellow",
                err=True,
            )
    if not result.passed:
        if not as_json:
            click.secho(f"error: {result.summary()}", fg="red", err=True)
        raise SystemExit(1)


@backup_group.command("restore")
@click.argument("backup_id")
@click.option("--into", "target", required=True, help="Name of the NEW database to restore into.")
@click.option(
    "--jobs", type=click.IntRange(1, 32), default=2, show_default=True, help="pg_restore jobs."
)
@friendly_errors
def backup_restore(backup_id: str, target: str, jobs: int) -> None:
    """Restore BACKUP_ID (or `latest`) into a new database and verify it; never overwrites.

    The new database is on the server of IIOT_BACKUP_DATABASE_URL; it is dropped again when the
    restore or its verification fails. See docs/runbooks/restore.md for switching over.
    """
    _, url, root, _ = _target()
    backup, verification = backups.restore_backup(url, root, backup_id, target, jobs=jobs)
    total = verification.checksum_s + verification.restore_s + verification.verify_s
    click.echo(
        f"Restored backup {backup.backup_id} (taken {backup.manifest.started_at:%Y-%m-%d %H:%M} "
        f"UTC, schema {backup.manifest.schema_label}) into {target}: "
        f"{verification.tables_checked} tables verified against the manifest in {total:.1f} s."
    )


@backup_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@friendly_errors
def backup_status(as_json: bool) -> None:
    """The checks ops watch: newest backup vs the RPO target, last drill and its RTO; with
    point-in-time recovery configured, the recovery point and the last PITR drill too.

    Exits 1 when any of them fails.
    """
    settings, url, root, database = _target()
    now = datetime.now(UTC)
    with connect(url, autocommit=True, application_name="iiot-backup") as conn:
        found = backups.status(
            conn,
            root,
            database,
            rpo_hours=settings.backup_rpo_hours,
            rto_minutes=settings.backup_rto_minutes,
            now=now,
        )
        point_in_time = pitr_status_of(conn, settings, database)
    last = found.last_drill
    checks = {
        "backup_within_rpo": found.backup_within_rpo,
        "drill_recent_and_passed": found.drill_recent_and_passed(now),
        "drill_rto_within_target": found.rto_within_target,
    }
    pitr_checks = point_in_time.checks(now) if point_in_time else {}
    if as_json:
        click.echo(
            _json(
                [
                    {
                        "database": database,
                        "plans": list(found.targets.plans),
                        "rpo_target_seconds": int(found.targets.rpo.total_seconds()),
                        "rto_target_seconds": int(found.targets.rto.total_seconds()),
                        "newest_backup": found.newest.backup_id if found.newest else None,
                        "newest_backup_age_seconds": None
                        if found.newest_age is None
                        else round(found.newest_age.total_seconds()),
                        "last_drill": None if last is None else last.__dict__,
                        "checks": checks,
                        "problems": found.problems,
                        "pitr": status_json(point_in_time, now) if point_in_time else None,
                    }
                ]
            )
        )
    else:
        age = backups.duration_text(found.newest_age)
        click.echo(
            f"Targets for {database} (plans {', '.join(found.targets.plans) or 'none'}): "
            f"RPO {backups.duration_text(found.targets.rpo)}, "
            f"RTO {backups.duration_text(found.targets.rto)}"
        )
        newest = found.newest.backup_id if found.newest else "none"
        click.echo(f"Newest backup: {newest} (age {age})")
        if last is None:
            click.echo("Last drill: none")
        else:
            click.echo(
                f"Last drill: #{last.drill_id} {last.status} at {last.started_at:%Y-%m-%d %H:%M} "
                f"UTC, backup {last.backup_id or '-'}, RTO "
                f"{'-' if last.rto_seconds is None else f'{last.rto_seconds:.1f} s'}"
                + (f": {last.error}" if last.error else "")
            )
        for name, ok in checks.items():
            click.echo(f"  {'ok  ' if ok else 'FAIL'} {name}")
        if point_in_time:
            for line in status_lines(point_in_time, now):
                click.echo(line)
        else:
            click.echo("Point-in-time recovery: not configured (IIOT_PITR_STANZA unset)")
        for problem in found.problems + (point_in_time.problems if point_in_time else []):
            click.secho(f"warning: {problem}", fg="yellow", err=True)
    if not all(checks.values()) or not all(pitr_checks.values()):
        raise SystemExit(1)


@backup_group.command("drills")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def backup_drills(limit: int, as_json: bool) -> None:
    """The recorded restore drills of the database, logical and PITR, newest first."""
    _, url, _, database = _target()
    with connect(url, autocommit=True, application_name="iiot-backup") as conn:
        found = backups.drills(conn, database, limit=limit, kind=None)
    if as_json:
        click.echo(_json([d.__dict__ for d in found]))
        return
    click.echo(
        _table(
            [
                "drill",
                "kind",
                "started",
                "status",
                "backup",
                "rto s",
                "rto target s",
                "rpo h",
                "error",
            ],
            [
                [
                    d.drill_id,
                    d.kind,
                    d.started_at,
                    d.status,
                    d.backup_id,
                    None if d.rto_seconds is None else f"{d.rto_seconds:.1f}",
                    d.rto_target_seconds,
                    None if d.rpo_seconds is None else f"{d.rpo_seconds / 3600:.1f}",
                    (d.error or "")[:60] or None,
                ]
                for d in found
            ],
        )
    )
