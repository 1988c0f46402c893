"""``iiot backup pitr``: point-in-time recovery with pgBackRest: configure WAL archiving, take
base backups, restore the cluster to an instant, run the drill
(docs/operations.md#point-in-time-recovery, docs/runbooks/restore.md)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import psycopg
from psycopg.conninfo import conninfo_to_dict

from iiot_orchestration import alerts, backups, pitr
from iiot_orchestration.cli_common import HelpGroup, _json, _settings, _table, friendly_errors
from iiot_orchestration.db import connect
from iiot_orchestration.errors import IiotError
from iiot_orchestration.services import port_free
from iiot_orchestration.settings import Settings


def _target() -> tuple[Settings, str, pitr.PitrConfig]:
    settings = _settings()
    config = pitr.require_config(settings)
    return settings, settings.backup_database_url or settings.require_database_url(), config


def _size(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def _backup_row(b: pitr.RepoBackup) -> dict[str, Any]:
    return {
        "label": b.label,
        "type": b.type,
        "started_at": b.started_at,
        "finished_at": b.finished_at,
        "seconds": round((b.finished_at - b.started_at).total_seconds()),
        "bytes": b.size,
        "repo_bytes": b.repo_size,
        "wal_start": b.wal_start,
        "wal_stop": b.wal_stop,
        "prior": b.prior,
    }


def _drill_row(drill: pitr.PitrDrill) -> dict[str, Any]:
    r = drill.result

    def seconds(value: Any) -> float | None:
        return None if value is None else round(value.total_seconds(), 3)

    return {
        "drill_id": r.drill_id,
        "status": "passed" if r.passed else "failed",
        "backup": r.backup_id,
        "restored_to": r.backup_taken_at,
        "target_lsn": drill.target_lsn,
        "scratch": r.scratch_database,
        "attempts": drill.attempts,
        "rto_seconds": seconds(r.rto),
        "rto_target_seconds": int(r.targets.rto.total_seconds()),
        "rpo_seconds": seconds(r.rpo),
        "rpo_target_seconds": int(r.targets.rpo.total_seconds()),
        "recovery_point_problem": drill.point.problem if drill.point else None,
        "tables_checked": r.tables_checked,
        "mismatches": r.mismatches,
        "error": r.error,
    }


@click.group("pitr", cls=HelpGroup)
def pitr_group() -> None:
    """Point-in-time recovery with pgBackRest: WAL archiving, base backups, restores to an
    instant, drills (docs/operations.md)."""


@pitr_group.command("setup")
@click.option(
    "--apply",
    is_flag=True,
    help="Set archive_mode, archive_command and archive_timeout with ALTER SYSTEM (needs a "
    "superuser login); without it they are printed for postgresql.conf.",
)
@click.option(
    "--pg-user",
    default=None,
    help="Database role pgBackRest connects as over the server's socket (peer authentication "
    "as the OS user). [default: IIOT_PITR_OS_USER]",
)
@friendly_errors
def pitr_setup(apply: bool, pg_user: str | None) -> None:
    """Configure pgBackRest for the database's cluster and WAL archiving into the repository.

    Run it again after a restart it asks for: it then creates the stanza and checks that WAL
    reaches the repository. Safe to repeat.
    """
    _, url, config = _target()
    result = pitr.setup(url, config, apply=apply, pg_user=pg_user)
    click.echo(
        f"{'Wrote' if result.config_written else 'Unchanged:'} {result.config} "
        f"(stanza {config.stanza}, repository {config.repo})"
    )
    if result.applied:
        click.echo(f"Set with ALTER SYSTEM: {', '.join(result.applied)}")
    for note in result.notes:
        click.secho(f"note: {note}", fg="yellow", err=True)
    if result.to_set and result.restart_needed:
        click.echo(
            f"Restart PostgreSQL for {', '.join(result.to_set)} to take effect (e.g. "
            "`systemctl restart postgresql`), then run `iiot backup pitr setup` again."
        )
    elif result.to_set:
        click.echo("Set in postgresql.conf (then restart PostgreSQL and run this again):")
        for name, value in result.to_set.items():
            click.echo(f"  {name} = '{value}'")
    if result.stanza_ready:
        click.echo(
            f"Stanza {config.stanza} is ready: WAL reaches the repository. Take the first base "
            "backup: iiot backup pitr backup --type full"
        )


@pitr_group.command("backup")
@click.option(
    "--type",
    "kind",
    type=click.Choice(["auto", *pitr.BACKUP_TYPES]),
    default="auto",
    show_default=True,
    help="auto: full when the newest full backup is a week old or missing, else incremental.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@friendly_errors
def pitr_backup(kind: str, as_json: bool) -> None:
    """Take a pgBackRest base backup of the cluster now (as the nightly asset does)."""
    settings, url, config = _target()
    run = pitr.take_backup(url, config, kind, notifier=alerts.Notifier.from_settings(settings))
    row = _backup_row(run.backup)
    if as_json:
        click.echo(_json([row]))
        return
    b = run.backup
    click.echo(
        f"{b.type.capitalize()} backup {b.label} of stanza {config.stanza}: {_size(b.size)} "
        f"({_size(b.repo_size)} in the repository) in {run.seconds:.1f} s, "
        f"WAL {b.wal_start} to {b.wal_stop}"
    )


def status_lines(found: pitr.PitrStatus, now: datetime) -> list[str]:
    point = found.point
    lines = [
        f"Point-in-time recovery (stanza {found.stanza}): RPO target "
        f"{backups.duration_text(found.targets.rpo)}, RTO target "
        f"{backups.duration_text(found.targets.rto)}"
    ]
    newest = found.newest_backup
    lines.append(
        "Newest base backup: "
        + (
            f"{newest.label} ({newest.type}, finished {newest.finished_at:%Y-%m-%d %H:%M} UTC)"
            if newest
            else "none"
        )
    )
    if point is not None:
        instant = (
            f"{point.instant:%Y-%m-%d %H:%M:%S} UTC" if point.instant is not None else "unknown"
        )
        lines.append(
            f"Recovery point: {instant} (RPO {backups.duration_text(point.rpo)}), newest "
            f"archived WAL {point.newest_wal or 'none'}"
            + (f": {point.problem}" if point.problem else "")
        )
    last = found.last_drill
    if last is None:
        lines.append("Last PITR drill: none")
    else:
        rpo = "-" if last.rpo_seconds is None else f"{last.rpo_seconds:.0f} s"
        rto = "-" if last.rto_seconds is None else f"{last.rto_seconds:.1f} s"
        lines.append(
            f"Last PITR drill: #{last.drill_id} {last.status} at "
            f"{last.started_at:%Y-%m-%d %H:%M} UTC, backup {last.backup_id or '-'}, RPO {rpo}, "
            f"RTO {rto}" + (f": {last.error}" if last.error else "")
        )
    lines += [f"  {'ok  ' if ok else 'FAIL'} {name}" for name, ok in found.checks(now).items()]
    return lines


def status_json(found: pitr.PitrStatus, now: datetime) -> dict[str, Any]:
    point = found.point
    return {
        "stanza": found.stanza,
        "rpo_target_seconds": int(found.targets.rpo.total_seconds()),
        "rto_target_seconds": int(found.targets.rto.total_seconds()),
        "newest_backup": _backup_row(found.newest_backup) if found.newest_backup else None,
        "recovery_point": None if point is None or point.instant is None else point.instant,
        "rpo_seconds": None if point is None or point.rpo is None else point.rpo.total_seconds(),
        "newest_archived_wal": point.newest_wal if point else None,
        "archive_problem": point.problem if point else None,
        "last_drill": None if found.last_drill is None else found.last_drill.__dict__,
        "checks": found.checks(now),
        "problems": found.problems,
    }


def pitr_status_of(
    conn: psycopg.Connection, settings: Settings, database: str
) -> pitr.PitrStatus | None:
    """PITR's part of `iiot backup status`; None when PITR is not configured."""
    config = pitr.PitrConfig.from_settings(settings)
    if config is None:
        return None
    return pitr.status(
        conn,
        config,
        database,
        rpo_hours=settings.backup_rpo_hours,
        rto_minutes=settings.backup_rto_minutes,
    )


@pitr_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@friendly_errors
def pitr_status(as_json: bool) -> None:
    """Base backups, the WAL archive, the recovery point and the last PITR drill, with the
    checks. Exits 1 when one of the checks fails."""
    settings, url, _ = _target()
    now = datetime.now(UTC)
    database = backups.database_of(url)
    with connect(url, autocommit=True, application_name="iiot-pitr") as conn:
        found = pitr_status_of(conn, settings, database)
    assert found is not None  # _target() required the configuration
    if as_json:
        rows = [_backup_row(b) for b in reversed(found.repo.backups)] if found.repo else []
        click.echo(_json([{**status_json(found, now), "backups": rows}]))
    else:
        for line in status_lines(found, now):
            click.echo(line)
        if found.repo and found.repo.backups:
            click.echo(
                _table(
                    ["backup", "type", "finished", "size", "in repository", "wal stop"],
                    [
                        [
                            b.label,
                            b.type,
                            b.finished_at,
                            _size(b.size),
                            _size(b.repo_size),
                            b.wal_stop,
                        ]
                        for b in reversed(found.repo.backups)
                    ],
                )
            )
        for problem in found.problems:
            click.secho(f"warning: {problem}", fg="yellow", err=True)
    if not all(found.checks(now).values()):
        raise SystemExit(1)


def _instant(value: str) -> pitr.RestoreTarget:
    if value == "latest":
        return pitr.RestoreTarget("latest")
    try:
        at = datetime.fromisoformat(value.strip())
    except ValueError:
        raise click.BadParameter(
            f"{value[:60]!r} is not a time: give e.g. '2026-12-06 14:03:00+00:00' or latest"
        ) from None
    if at.tzinfo is None:
        raise click.BadParameter("give the time zone too, e.g. +00:00, Z or -03:00")
    if at > datetime.now(UTC):
        raise click.BadParameter(f"{at.isoformat()} is in the future")
    return pitr.RestoreTarget.at(at)


@pitr_group.command("restore")
@click.option(
    "--to",
    "to",
    required=True,
    help="Instant to restore to, with its time zone (e.g. '2026-12-06 14:03:00+00:00'), or "
    "`latest` (the end of the archive).",
)
@click.option(
    "--into",
    "into",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Data directory of the NEW cluster: must not exist or be empty.",
)
@click.option("--port", type=click.IntRange(1024, 65535), required=True, help="Its port.")
@click.option(
    "--listen",
    default="127.0.0.1",
    show_default=True,
    help="listen_addresses of the new cluster ('' for its socket only); TCP logins need their "
    "passwords.",
)
@click.option(
    "--socket-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Its Unix socket directory. [default: the data directory]",
)
@friendly_errors
def pitr_restore(to: str, into: Path, port: int, listen: str, socket_dir: Path | None) -> None:
    """Restore the cluster as it was at an instant into a new data directory, and start it.

    The live cluster is never touched: the copy runs beside it on --port, with WAL archiving
    off. Check it, then switch over as docs/runbooks/restore.md says. Stop it with the pg_ctl
    command printed at the end.
    """
    _, url, config = _target()
    try:
        target = _instant(to)
    except click.BadParameter as exc:
        raise pitr.PitrError(f"--to: {exc.message}") from None
    if not port_free("127.0.0.1", port):
        raise pitr.PitrError(f"port {port} is in use: choose another --port")
    info = pitr.repo_info(config)
    if not info.ok:
        raise pitr.PitrError(f"pgBackRest stanza {config.stanza}: {info.message}")
    at = datetime.fromisoformat(target.value) if target.kind == "time" else None
    backup = info.newest_before(at=at) if at else info.newest
    if backup is None:
        raise pitr.PitrError("the repository has no backup: run `iiot backup pitr backup` first")
    params = conninfo_to_dict(url)
    user = str(params.get("user") or config.os_user)
    database = str(params.get("dbname") or "postgres")
    preload = None
    try:  # the source's preloaded libraries (TimescaleDB), when it is up
        with connect(url, autocommit=True, application_name="iiot-pitr") as conn:
            preload = pitr.server_facts(conn).preload
    except (IiotError, psycopg.Error):
        click.secho(
            "note: the source database is unreachable; shared_preload_libraries not copied",
            fg="yellow",
            err=True,
        )
    into = into.absolute()
    restored = pitr.restore(
        config,
        into,
        target=target,
        backup=backup,
        port=port,
        socket_dir=(socket_dir or into).absolute(),
        user=user,
        bindir=pitr.server_bindir(config, info.pg_version or "15"),
        listen=listen,
        preload=preload,
    )
    cluster = restored.cluster
    schema = "-"
    try:
        with psycopg.connect(cluster.url(database, user), autocommit=True) as copy:
            schema = backups.schema_state(copy).label
    except (IiotError, psycopg.Error) as exc:
        schema = f"unknown ({(str(exc).strip().splitlines() or ['?'])[0]})"
    last = f"{restored.last_commit:%Y-%m-%d %H:%M:%S.%f} UTC" if restored.last_commit else "none"
    click.echo(
        f"Restored stanza {config.stanza} to {target.describe()} from backup {backup.label} "
        f"into {cluster.data} in {restored.restore_s + restored.recovery_s:.1f} s "
        f"(files {restored.restore_s:.1f} s, recovery {restored.recovery_s:.1f} s)."
    )
    if restored.stopped:
        click.echo(f"  {restored.stopped}")
    click.echo(f"  last transaction replayed: {last}; database {database}: schema {schema}")
    click.echo(f"Running on port {port}: {cluster.url(database, user)}")
    stop = " ".join(
        [
            *pitr.as_user(config.os_user),
            str(cluster.bindir / "pg_ctl"),
            "-D",
            str(cluster.data),
            "stop",
        ]
    )
    click.echo(f"Stop it with: {stop}")


@pitr_group.command("drill")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@friendly_errors
def pitr_drill(as_json: bool) -> None:
    """Restore the cluster to this instant into a scratch cluster, verify the database there
    against the source's snapshot of that instant, record RTO and RPO, remove it.

    Exits 1 when the drill fails (the failure is recorded and alerted too).
    """
    settings, url, config = _target()
    drill = pitr.run_drill(
        url,
        config,
        rpo_hours=settings.backup_rpo_hours,
        rto_minutes=settings.backup_rto_minutes,
        notifier=alerts.Notifier.from_settings(settings),
    )
    r = drill.result
    if as_json:
        click.echo(_json([_drill_row(drill)]))
    elif r.passed:
        click.echo(drill.summary())
        missed = [n for n, met in (("RTO", r.rto_met), ("RPO", r.rpo_met)) if not met]
        if missed:
            reason = f" ({drill.point.problem})" if drill.point and drill.point.problem else ""
            click.secho(
                f"warning: the drill passed but missed its {' and '.join(missed)} target{reason}",
                fg="yellow",
                err=True,
            )
    if not r.passed:
        if not as_json:
            click.secho(f"error: {drill.summary()}", fg="red", err=True)
        raise SystemExit(1)
