"""Point-in-time recovery with pgBackRest (docs/operations.md#point-in-time-recovery).

The logical backups (backups.py) restore one database as it was at last night's snapshot. This
module archives the cluster's WAL and takes pgBackRest base backups, so that the cluster can be
restored to any instant the archive covers:

- ``setup``: writes the stanza's pgbackrest.conf, sets (ALTER SYSTEM, when the login may) or
  prints archive_mode, archive_command and archive_timeout, creates the stanza and checks that
  WAL reaches the repository.
- ``take_backup``: ``pgbackrest backup`` (full, differential or incremental); pgBackRest expires
  what IIOT_PITR_RETENTION_FULL does not keep.
- ``recovery_point``: the newest restorable instant, from pg_stat_archiver and the repository.
- ``restore``: ``pgbackrest restore`` to an instant into a new data directory, started as a
  cluster of its own on another port; the live cluster is never touched.
- ``run_drill``: the weekly proof. It takes the logical drill's description of the database
  (row counts, fingerprints, smoke queries: ``backups.describe_database``) in one snapshot
  together with the WAL position of that snapshot, archives that WAL, restores the cluster to
  exactly that position into a scratch cluster and compares. RPO (the newest restorable instant
  when the drill started, against that start) and RTO (restore, recovery and verification) go
  to backup_drills beside the logical drills; a failure is alerted; the scratch cluster is
  always removed.

pgBackRest and the clusters it restores run as IIOT_PITR_OS_USER when iiot runs as root
(PostgreSQL refuses to run as root), else as the current user.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pwd
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from iiot_orchestration import alerts, backups
from iiot_orchestration.backups import (
    BackupError,
    DatabaseState,
    DrillRecord,
    DrillResult,
    Targets,
)
from iiot_orchestration.db import open_connection
from iiot_orchestration.errors import IiotError
from iiot_orchestration.services import free_port
from iiot_orchestration.settings import Settings, to_url

log = logging.getLogger(__name__)

LOCK_KEY = 0x110_7_0013  # one PITR backup or drill of a database at a time
BACKUP_TYPES = ("full", "diff", "incr")
FULL_EVERY = timedelta(days=7)  # `auto` takes a full backup when the newest full is this old
WAL_NAME = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})(?![0-9A-F])")
# an insert position this far into a segment means nothing was written since the switch
PAGE_HEADER = 40
ARCHIVE_WAIT = timedelta(minutes=5)
START_TIMEOUT = timedelta(hours=2)
DRILL_ATTEMPTS = 3  # a snapshot taken as a commit is half done is taken again
SOCKET_DIR_MAX = 90  # a Unix socket path has at most 107 bytes, `/.s.PGSQL.65535` included
RACE_SCAN_MAX = 1_000_000
CONFIG_HEADER = (
    "# Written by `iiot backup pitr setup` (docs/operations.md#point-in-time-recovery); the next\n"
    "# setup rewrites it: change the IIOT_PITR_* variables instead of this file.\n"
)


class PitrError(BackupError):
    """A PITR setup, backup, restore or drill could not be done; the message says why."""


def _now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class PitrConfig:
    stanza: str
    config: Path  # pgbackrest.conf; log/, lock/ and spool/ go next to it
    repo: Path
    os_user: str
    scratch_dir: Path
    rpo: timedelta
    archive_timeout: int
    retention_full: int
    process_max: int
    bindir: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> PitrConfig | None:
        """None when IIOT_PITR_STANZA is unset: PITR is not configured."""
        if not settings.pitr_stanza:
            return None
        return cls(
            stanza=settings.pitr_stanza,
            config=settings.pitr_config.absolute(),
            repo=settings.pitr_repo.absolute(),
            os_user=settings.pitr_os_user,
            scratch_dir=settings.pitr_scratch_dir.absolute(),
            rpo=timedelta(minutes=settings.pitr_rpo_minutes),
            archive_timeout=settings.pitr_archive_timeout_seconds,
            retention_full=settings.pitr_retention_full,
            process_max=settings.pitr_process_max,
            bindir=settings.pitr_pg_bindir,
        )

    @property
    def work_dir(self) -> Path:
        return self.config.parent


def require_config(settings: Settings) -> PitrConfig:
    config = PitrConfig.from_settings(settings)
    if config is None:
        raise PitrError(
            "IIOT_PITR_STANZA is not set: point-in-time recovery is not configured "
            "(docs/operations.md#point-in-time-recovery)"
        )
    return config


def pgbackrest_binary() -> str:
    found = shutil.which("pgbackrest")
    if found is None:
        raise PitrError("pgbackrest is not installed: install the pgbackrest package")
    return found


def server_bindir(config: PitrConfig, major: int | str) -> Path:
    """The PostgreSQL server binaries of ``major`` (IIOT_PITR_PG_BINDIR, else Debian's)."""
    bindir = config.bindir or Path(f"/usr/lib/postgresql/{major}/bin")
    for name in ("postgres", "pg_ctl"):
        if not os.access(bindir / name, os.X_OK):
            raise PitrError(
                f"no {name} in {bindir}: install postgresql-{major} (the server package) or set "
                "IIOT_PITR_PG_BINDIR"
            )
    return bindir


# ---------------------------------------------------------------------------------------------
# Running as the cluster's operating-system user


def as_user(os_user: str) -> list[str]:
    """The prefix that runs a command as ``os_user`` when iiot runs as root."""
    if os.geteuid() != 0 or os_user == "root":
        return []
    return ["runuser", "-u", os_user, "--"]


def owner_ids(os_user: str) -> tuple[int, int] | None:
    """(uid, gid) to give new files when running as root; None otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(os_user)
    except KeyError:
        raise PitrError(f"IIOT_PITR_OS_USER {os_user} does not exist on this machine") from None
    return entry.pw_uid, entry.pw_gid


def make_dir(path: Path, os_user: str, mode: int = 0o750, *, adopt: bool = False) -> None:
    """Create ``path`` for ``os_user``; an existing directory is left as it is unless
    ``adopt`` (then it gets the mode and owner too)."""
    if path.is_dir() and not adopt:
        return
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    ids = owner_ids(os_user)
    if ids:
        os.chown(path, *ids)


def write_owned(path: Path, text: str, os_user: str, mode: int = 0o640) -> None:
    """Replace ``path`` with ``text`` at once, owned by ``os_user``."""
    work = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    work.write_text(text, encoding="utf-8")
    work.chmod(mode)
    ids = owner_ids(os_user)
    if ids:
        os.chown(work, *ids)
    work.replace(path)


def run_as(
    os_user: str, argv: Sequence[str], *, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [*as_user(os_user), *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd="/",  # the OS user may not enter ours
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PitrError(f"{Path(argv[0]).name} {argv[1] if len(argv) > 1 else ''}: {exc}") from exc


def _error_of(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in (result.stderr + "\n" + result.stdout).splitlines()]
    errors = [line for line in lines if "ERROR:" in line or "FATAL:" in line or "error:" in line]
    meaningful = errors or [line for line in lines if line]
    return (meaningful[0] if meaningful else f"exit {result.returncode}")[:500]


def pgbackrest(
    config: PitrConfig, command: str, *options: str, timeout: float | None = None
) -> str:
    """Run ``pgbackrest COMMAND`` on the stanza; its output, or a PitrError with its error."""
    argv = [
        pgbackrest_binary(),
        f"--config={config.config}",
        f"--stanza={config.stanza}",
        *options,
        command,
    ]
    result = run_as(config.os_user, argv, timeout=timeout)
    if result.returncode != 0:
        raise PitrError(f"pgbackrest {command} failed: {_error_of(result)}")
    return result.stdout


# ---------------------------------------------------------------------------------------------
# The source cluster


@dataclass(frozen=True)
class ServerFacts:
    data_directory: str | None  # None: the login may not read it
    port: int
    socket_dir: str | None
    major: int
    version: str
    superuser: bool
    preload: str
    settings: dict[str, str]  # archive_mode, archive_command, archive_timeout, wal_level
    pending_restart: frozenset[str]


_FACTS = (
    "data_directory",
    "port",
    "unix_socket_directories",
    "server_version_num",
    "server_version",
    "shared_preload_libraries",
    "archive_mode",
    "archive_command",
    "archive_timeout",
    "wal_level",
)


def server_facts(conn: psycopg.Connection) -> ServerFacts:
    rows = conn.execute(
        "SELECT name, setting, pending_restart FROM pg_settings WHERE name = ANY(%s)",
        (list(_FACTS),),
    ).fetchall()
    found = {name: setting for name, setting, _ in rows}
    pending = frozenset(name for name, _, waiting in rows if waiting)
    superuser = conn.execute(
        "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    sockets = [s.strip() for s in found.get("unix_socket_directories", "").split(",") if s.strip()]
    return ServerFacts(
        data_directory=found.get("data_directory"),
        port=int(found["port"]),
        socket_dir=sockets[0] if sockets else None,
        major=int(found["server_version_num"]) // 10000,
        version=found["server_version"].split()[0],
        superuser=bool(superuser and superuser[0]),
        preload=found.get("shared_preload_libraries", ""),
        settings={k: found.get(k, "") for k in _FACTS[6:]},
        pending_restart=pending,
    )


def archive_command(config: PitrConfig) -> str:
    return (
        f"{pgbackrest_binary()} --config={shlex.quote(str(config.config))} "
        f"--stanza={config.stanza} archive-push %p"
    )


def wanted_settings(config: PitrConfig, facts: ServerFacts) -> dict[str, str]:
    wanted = {
        "archive_mode": "on",
        "archive_command": archive_command(config),
        "archive_timeout": str(config.archive_timeout),
    }
    if facts.settings.get("wal_level") == "minimal":
        wanted["wal_level"] = "replica"
    return wanted


def _in_effect(facts: ServerFacts, name: str, value: str) -> bool:
    current = facts.settings.get(name, "")
    if name == "archive_mode":
        return current in ("on", "always")
    if name == "wal_level":
        return current in ("replica", "logical")
    return current == value


def config_text(config: PitrConfig, facts: ServerFacts, pg_user: str) -> str:
    if not facts.data_directory:
        raise PitrError(
            "this login may not read data_directory: run setup with a superuser, or GRANT "
            "pg_read_all_settings to the backup login"
        )
    socket = f"pg1-socket-path={facts.socket_dir}\n" if facts.socket_dir else ""
    work = config.work_dir
    return (
        CONFIG_HEADER
        + "[global]\n"
        + f"repo1-path={config.repo}\n"
        + f"repo1-retention-full={config.retention_full}\n"
        + f"process-max={config.process_max}\n"
        + "compress-type=lz4\n"
        + "start-fast=y\n"
        + f"log-path={work / 'log'}\n"
        + f"lock-path={work / 'lock'}\n"
        + f"spool-path={work / 'spool'}\n"
        + "log-level-console=warn\n"
        + "log-level-file=info\n"
        + f"\n[{config.stanza}]\n"
        + f"pg1-path={facts.data_directory}\n"
        + f"pg1-port={facts.port}\n"
        + socket
        + f"pg1-user={pg_user}\n"
    )


def _inside(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


@dataclass(frozen=True)
class SetupResult:
    config: Path
    config_written: bool
    wanted: dict[str, str]
    applied: list[str]  # set with ALTER SYSTEM by this setup
    to_set: dict[str, str]  # not in effect yet
    restart_needed: bool  # applied, and waiting for a restart of the server
    stanza_ready: bool  # stanza created and `pgbackrest check` passed
    notes: list[str] = field(default_factory=list)


def setup(
    database_url: str,
    config: PitrConfig,
    *,
    apply: bool = False,
    pg_user: str | None = None,
    reload_wait: float = 10.0,
) -> SetupResult:
    """Write pgbackrest.conf for the cluster of ``database_url``, bring the archive settings in
    (``apply``: ALTER SYSTEM as a superuser) and, once archiving is on, create the stanza and
    check it. Safe to run again: it changes only what differs."""
    pgbackrest_binary()
    with open_connection(database_url, application_name="iiot-pitr", autocommit=True) as conn:
        facts = server_facts(conn)
        text = config_text(config, facts, pg_user or config.os_user)
        data = Path(str(facts.data_directory))
        for what, path in (("IIOT_PITR_REPO", config.repo), ("IIOT_PITR_CONFIG", config.config)):
            if _inside(path, data):
                raise PitrError(f"{what} {path} lies inside the data directory {data}")
        make_dir(config.work_dir, config.os_user)
        for path in (config.repo, *(config.work_dir / d for d in ("log", "lock", "spool"))):
            make_dir(path, config.os_user)
        old = config.config.read_text(encoding="utf-8") if config.config.exists() else None
        written = old != text
        if written:
            write_owned(config.config, text, config.os_user)
        for path, test in ((config.config, "-r"), (config.repo, "-w")):
            if run_as(config.os_user, ["test", test, str(path)]).returncode != 0:
                raise PitrError(
                    f"the OS user {config.os_user} cannot {'read' if test == '-r' else 'write'} "
                    f"{path}: make its parent directories reachable for it"
                )
        wanted = wanted_settings(config, facts)
        missing = {k: v for k, v in wanted.items() if not _in_effect(facts, k, v)}
        notes: list[str] = []
        applied: list[str] = []
        if missing and apply and not facts.superuser:
            notes.append("--apply needs a superuser login; set the settings below yourself")
        elif missing and apply:
            for name, value in missing.items():
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(name), sql.Literal(value)
                    )
                )
                applied.append(name)
            conn.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + reload_wait
            while True:  # the reload is asynchronous: wait until the settings show it
                facts = server_facts(conn)
                reloadable = {k for k in missing if k not in ("archive_mode", "wal_level")}
                if all(_in_effect(facts, k, wanted[k]) for k in reloadable):
                    break
                if time.monotonic() > deadline:
                    notes.append("the server has not reloaded its configuration yet")
                    break
                time.sleep(0.1)
        to_set = {k: v for k, v in wanted.items() if not _in_effect(facts, k, v)}
        restart = any(k in applied or k in facts.pending_restart for k in to_set)
    ready = False
    if not to_set:
        pgbackrest(config, "stanza-create")
        pgbackrest(config, "check", timeout=ARCHIVE_WAIT.total_seconds() + 60)
        ready = True
    return SetupResult(config.config, written, wanted, applied, to_set, restart, ready, notes)


# ---------------------------------------------------------------------------------------------
# The repository


@dataclass(frozen=True)
class RepoBackup:
    label: str
    type: str
    started_at: datetime
    finished_at: datetime
    size: int
    repo_size: int
    lsn_start: int | None
    lsn_stop: int | None
    wal_start: str | None
    wal_stop: str | None
    prior: str | None


@dataclass(frozen=True)
class RepoInfo:
    code: int
    message: str
    backups: list[RepoBackup]  # oldest first
    archive_min: str | None
    archive_max: str | None
    pg_version: str | None

    @property
    def ok(self) -> bool:
        return self.code == 0

    @property
    def newest(self) -> RepoBackup | None:
        return self.backups[-1] if self.backups else None

    def newest_full(self) -> RepoBackup | None:
        fulls = [b for b in self.backups if b.type == "full"]
        return fulls[-1] if fulls else None

    def newest_before(self, *, lsn: int | None = None, at: datetime | None = None) -> RepoBackup:
        """The newest backup that was consistent before the LSN or instant to restore to."""
        fit = [
            b
            for b in self.backups
            if (lsn is None or (b.lsn_stop is not None and b.lsn_stop <= lsn))
            and (at is None or b.finished_at <= at)
        ]
        if not fit:
            oldest = (
                f"the oldest finished at {self.backups[0].finished_at:%Y-%m-%d %H:%M:%S} UTC"
                if self.backups
                else "there is none: run `iiot backup pitr backup` first"
            )
            what = (
                f"{at:%Y-%m-%d %H:%M:%S%z}" if at else f"the drill's WAL position {lsn_text(lsn)}"
            )
            raise PitrError(f"no pgBackRest backup finished before {what}: {oldest}")
        return fit[-1]


def parse_lsn(text: str) -> int:
    high, _, low = text.partition("/")
    try:
        return (int(high, 16) << 32) + int(low, 16)
    except ValueError:
        raise PitrError(f"{text[:40]!r} is not a WAL position") from None


def lsn_text(lsn: int | None) -> str:
    return "-" if lsn is None else f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def segment_number(name: str | None, segment_size: int) -> int | None:
    """A WAL file's segment number (timelines aside); None for history files and the like."""
    match = WAL_NAME.match(name or "")
    if not match:
        return None
    return int(match[2], 16) * (0x1_0000_0000 // segment_size) + int(match[3], 16)


def _epoch(value: object) -> datetime:
    if not isinstance(value, int | float):
        raise PitrError("pgbackrest info: a backup without its timestamps")
    return datetime.fromtimestamp(value, UTC)


def parse_info(text: str, stanza: str) -> RepoInfo:
    try:
        data = json.loads(text)
    except ValueError:
        raise PitrError(f"pgbackrest info gave no JSON: {text.strip()[:200]!r}") from None
    entry = next((s for s in data if isinstance(s, dict) and s.get("name") == stanza), None)
    if entry is None:
        return RepoInfo(1, f"stanza {stanza} is not in the repository", [], None, None, None)
    status = entry.get("status") or {}
    found = []
    for b in entry.get("backup") or []:
        lsn = b.get("lsn") or {}
        wal = b.get("archive") or {}
        info = b.get("info") or {}
        found.append(
            RepoBackup(
                label=str(b.get("label")),
                type=str(b.get("type")),
                started_at=_epoch((b.get("timestamp") or {}).get("start")),
                finished_at=_epoch((b.get("timestamp") or {}).get("stop")),
                size=int(info.get("size") or 0),
                repo_size=int((info.get("repository") or {}).get("delta") or 0),
                lsn_start=parse_lsn(lsn["start"]) if lsn.get("start") else None,
                lsn_stop=parse_lsn(lsn["stop"]) if lsn.get("stop") else None,
                wal_start=wal.get("start"),
                wal_stop=wal.get("stop"),
                prior=b.get("prior"),
            )
        )
    found.sort(key=lambda b: (b.finished_at, b.label))
    archives = entry.get("archive") or []
    databases = entry.get("db") or []
    return RepoInfo(
        code=int(status.get("code", 1)),
        message=str(status.get("message", "unknown")),
        backups=found,
        archive_min=archives[-1].get("min") if archives else None,
        archive_max=archives[-1].get("max") if archives else None,
        pg_version=str(databases[-1].get("version")) if databases else None,
    )


def repo_info(config: PitrConfig) -> RepoInfo:
    return parse_info(pgbackrest(config, "info", "--output=json"), config.stanza)


def choose_backup_type(info: RepoInfo, now: datetime) -> str:
    """``full`` when no full backup is younger than a week, else ``incr``."""
    full = info.newest_full()
    return "full" if full is None or now - full.finished_at >= FULL_EVERY else "incr"


@dataclass(frozen=True)
class PitrBackupRun:
    backup: RepoBackup
    requested: str
    seconds: float


def backup_alert_key(database: str) -> str:
    return f"pitr_backup:{database}"


def drill_alert_key(database: str) -> str:
    return f"pitr_drill:{database}"


def take_backup(
    database_url: str,
    config: PitrConfig,
    kind: str = "auto",
    *,
    notifier: alerts.Notifier | None = None,
    clock: Callable[[], datetime] = _now,
) -> PitrBackupRun:
    """``pgbackrest backup --type=KIND`` (``auto``: see choose_backup_type); a failure is alerted
    and raised."""
    if kind not in (*BACKUP_TYPES, "auto"):
        raise PitrError(f"backup type {kind[:20]!r}: full, diff, incr or auto")
    database = backups.database_of(database_url)
    with backups.exclusive(database_url, LOCK_KEY) as conn:
        started = time.perf_counter()
        try:
            if kind == "auto":
                kind = choose_backup_type(repo_info(config), clock())
            pgbackrest(config, "backup", f"--type={kind}")
            newest = repo_info(config).newest
            if newest is None:
                raise PitrError("pgbackrest backup succeeded but the repository lists no backup")
        except IiotError as exc:
            backups._alert(
                conn,
                notifier,
                key=backup_alert_key(database),
                source="pitr_backup",
                title=f"pgBackRest backup of {database}'s cluster failed",
                detail={"error": str(exc), "stanza": config.stanza, "repo": str(config.repo)},
            )
            raise
        backups._resolve(conn, backup_alert_key(database))
    return PitrBackupRun(newest, kind, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# The recovery point


@dataclass(frozen=True)
class ArchiveState:
    archive_mode: str
    last_archived_wal: str | None
    last_archived_time: datetime | None
    last_failed_wal: str | None
    last_failed_time: datetime | None
    insert_lsn: int
    segment_size: int
    now: datetime


def archive_state(conn: psycopg.Connection) -> ArchiveState:
    row = conn.execute(
        "SELECT current_setting('archive_mode'), last_archived_wal, last_archived_time,"
        " last_failed_wal, last_failed_time, pg_current_wal_insert_lsn()::text,"
        " (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'),"
        " clock_timestamp()"
        " FROM pg_stat_archiver"
    ).fetchone()
    return ArchiveState(
        archive_mode=row[0],
        last_archived_wal=row[1],
        last_archived_time=row[2],
        last_failed_wal=row[3],
        last_failed_time=row[4],
        insert_lsn=parse_lsn(row[5]),
        segment_size=int(row[6]),
        now=row[7],
    )


@dataclass(frozen=True)
class RecoveryPoint:
    measured_at: datetime
    instant: datetime | None  # the newest restorable instant; None: not known
    newest_wal: str | None
    waiting_segments: int  # closed WAL segments not archived yet
    problem: str | None  # why the archive is not current

    @property
    def rpo(self) -> timedelta | None:
        if self.instant is None:
            return None
        return max(self.measured_at - self.instant, timedelta(0))


def recovery_point(state: ArchiveState, repo: RepoInfo | None = None) -> RecoveryPoint:
    """The newest instant a restore reaches: now when every WAL byte written is in the archive,
    else the time the newest segment was archived (with archive_timeout, a writing database
    closes one at least that often). Unknown, with the reason, when archiving is off, behind or
    failing, or when the repository lacks what the server archived. The newest segment is the
    server's last archived one or the repository's newest, whichever is later: after a backup
    pg_stat_archiver may name its history file (``...0002.00000028.backup``), archived after
    the segment that followed it."""
    size = state.segment_size
    last = segment_number(state.last_archived_wal, size)
    point = RecoveryPoint(state.now, None, state.last_archived_wal, 0, None)
    if state.archive_mode == "off":
        return dataclasses.replace(
            point, problem="archive_mode is off: no WAL is archived (`iiot backup pitr setup`)"
        )
    if last is None:
        return dataclasses.replace(point, problem="no WAL segment has been archived yet")
    if repo is not None:
        in_repo = segment_number(repo.archive_max, size)
        if in_repo is None or in_repo < last:
            return dataclasses.replace(
                point,
                problem=f"the server archived {state.last_archived_wal} but the repository's "
                f"newest WAL is {repo.archive_max or 'none'}: archive_command does not push to "
                "this repository (`iiot backup pitr setup`)",
            )
        if in_repo > last:
            last = in_repo
            point = dataclasses.replace(point, newest_wal=repo.archive_max)
    current, offset = divmod(state.insert_lsn, size)
    waiting = max(current - last - 1, 0)
    if waiting:
        failing = state.last_failed_time is not None and (
            state.last_archived_time is None or state.last_failed_time > state.last_archived_time
        )
        reason = (
            f"; archiving {state.last_failed_wal} failed at "
            f"{state.last_failed_time:%Y-%m-%d %H:%M:%S} UTC (archive_command, see the "
            "PostgreSQL log)"
            if failing and state.last_failed_time
            else ""
        )
        return dataclasses.replace(
            point,
            waiting_segments=waiting,
            problem=f"{waiting} closed WAL segments wait to be archived{reason}",
        )
    if current == last + 1 and offset <= PAGE_HEADER:
        return dataclasses.replace(point, instant=state.now)  # nothing written since
    return dataclasses.replace(point, instant=state.last_archived_time)


# ---------------------------------------------------------------------------------------------
# Clusters restored (and, for tests and benchmarks, created) on this machine


@dataclass(frozen=True)
class LocalCluster:
    """A PostgreSQL cluster on this machine, run by ``os_user`` through pg_ctl."""

    data: Path
    port: int
    socket_dir: Path
    bindir: Path
    os_user: str
    log_file: Path

    def _pg_ctl(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        return run_as(
            self.os_user,
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), *args],
            timeout=timeout,
        )

    def start(self, *, timeout: float = START_TIMEOUT.total_seconds()) -> None:
        """Start the postmaster. Without hot standby pg_ctl returns once recovery has begun:
        ``wait_ready`` waits for its end."""
        result = self._pg_ctl(
            "start", "-w", "-t", str(int(timeout)), "-l", str(self.log_file), "-s"
        )
        if result.returncode != 0:
            self.stop("immediate")
            reason = self.log_problem() or _error_of(result)
            raise PitrError(f"the cluster in {self.data} did not start: {reason}")

    def alive(self) -> bool:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        return True

    def wait_ready(
        self, user: str, *, timeout: float = START_TIMEOUT.total_seconds()
    ) -> datetime | None:
        """Wait until recovery is over and the cluster is promoted (accepting connections, not
        in recovery); the time of the last transaction replayed. A PitrError with the server's
        reason when it stops instead, or after ``timeout``."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            try:
                with psycopg.connect(
                    self.url("template1", user), autocommit=True, connect_timeout=10
                ) as conn:
                    recovering, replayed = conn.execute(
                        "SELECT pg_is_in_recovery(), pg_last_xact_replay_timestamp()"
                    ).fetchone()
                if not recovering:
                    return replayed
            except psycopg.OperationalError as exc:
                last = exc
            if not self.alive():
                reason = self.log_problem() or (str(last).strip() if last else "no reason logged")
                raise PitrError(f"the cluster in {self.data} stopped during recovery: {reason}")
            if time.monotonic() > deadline:
                raise PitrError(
                    f"the cluster in {self.data} was still recovering after "
                    f"{backups.duration_text(timedelta(seconds=timeout))}"
                )
            time.sleep(0.05)

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._pg_ctl("stop", "-m", mode, "-w", "-s", timeout=300)

    def url(self, dbname: str, user: str) -> str:
        return to_url(
            {"user": user, "host": str(self.socket_dir), "port": self.port, "dbname": dbname}
        )

    def log_lines(self) -> list[str]:
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return []

    def log_problem(self) -> str | None:
        """The first FATAL or PANIC line of the server log (not a refused connection)."""
        for line in self.log_lines():
            if ("FATAL:" in line or "PANIC:" in line) and not _REFUSED.search(line):
                return line.split("FATAL:", 1)[-1].split("PANIC:", 1)[-1].strip()[:500]
        return None


# what a cluster answers connections while it starts or recovers: not its failure
_REFUSED = re.compile(
    r"not (yet )?accepting connections|is starting up|is shutting down|does not exist"
)


def init_cluster(
    data: Path, *, bindir: Path, os_user: str, port: int, socket_dir: Path
) -> LocalCluster:
    """A new, empty cluster (trust authentication over its socket and 127.0.0.1): what the
    tests and benchmarks archive, back up and restore."""
    make_dir(data, os_user, 0o700, adopt=True)
    result = run_as(
        os_user,
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ],
    )
    if result.returncode != 0:
        raise PitrError(f"initdb failed: {_error_of(result)}")
    with (data / "postgresql.conf").open("a", encoding="utf-8") as conf:
        conf.write(
            f"port = {port}\nlisten_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{socket_dir}'\nfsync = off\n"
        )
    return LocalCluster(data, port, socket_dir, bindir, os_user, data.parent / f"{data.name}.log")


@dataclass(frozen=True)
class RestoreTarget:
    kind: str  # time, lsn or latest (the end of the archive)
    value: str | None = None
    exclusive: bool = False

    @classmethod
    def at(cls, instant: datetime) -> RestoreTarget:
        if instant.tzinfo is None:
            raise PitrError("the instant to restore to needs a time zone (e.g. +00:00 or Z)")
        return cls("time", instant.astimezone(UTC).isoformat(sep=" "))

    @classmethod
    def before_lsn(cls, lsn: str) -> RestoreTarget:
        return cls("lsn", lsn, exclusive=True)

    def options(self) -> list[str]:
        if self.kind == "latest":
            return ["--type=default"]
        options = [f"--type={self.kind}", f"--target={self.value}", "--target-action=promote"]
        return [*options, "--target-exclusive"] if self.exclusive else options

    def describe(self) -> str:
        if self.kind == "latest":
            return "the end of the archive"
        return f"{'before ' if self.exclusive else ''}{self.kind} {self.value}"


@dataclass(frozen=True)
class Restored:
    cluster: LocalCluster
    backup: RepoBackup
    target: RestoreTarget
    restore_s: float  # pgbackrest restore: the backup's files
    recovery_s: float  # start, WAL replay to the target, promotion
    stopped: str | None  # the server's "recovery stopping ..." line
    last_commit: datetime | None  # the last transaction replayed


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _quote_conf(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def restore(
    config: PitrConfig,
    data: Path,
    *,
    target: RestoreTarget,
    backup: RepoBackup,
    port: int,
    socket_dir: Path,
    user: str,
    bindir: Path,
    listen: str = "",
    preload: str | None = None,
    autovacuum: bool = True,
    timeout: float = START_TIMEOUT.total_seconds(),
) -> Restored:
    """Restore ``backup`` plus WAL to ``target`` into the new directory ``data`` and start it on
    ``port``: archive_mode off (it never pushes into the repository), its own pg_hba.conf (trust
    over its private socket; passwords, when ``listen``, over TCP), the settings in
    postgresql.auto.conf so that it restarts the same. On failure the directory is emptied."""
    data = data.absolute()
    if data.exists() and not _empty_dir(data):
        raise PitrError(f"{data} exists and is not empty: a restore never overwrites")
    if len(str(socket_dir)) > SOCKET_DIR_MAX:
        raise PitrError(f"socket directory {socket_dir} is too long for a Unix socket")
    if (socket_dir / f".s.PGSQL.{port}").exists():
        raise PitrError(f"a server already listens on port {port} in {socket_dir}")
    created = not data.exists()
    make_dir(data, config.os_user, 0o700, adopt=True)
    cluster = LocalCluster(
        data, port, socket_dir, bindir, config.os_user, data.parent / f"{data.name}.log"
    )
    try:
        started = time.perf_counter()
        pgbackrest(
            config,
            "restore",
            f"--pg1-path={data}",
            f"--set={backup.label}",
            *target.options(),
            "--archive-mode=off",
            f"--tablespace-map-all={data.parent / (data.name + '-tablespaces')}",
        )
        restored_s = time.perf_counter() - started
        _configure(cluster, listen=listen, preload=preload, autovacuum=autovacuum)
        started = time.perf_counter()
        cluster.start(timeout=timeout)
        last_commit = cluster.wait_ready(user, timeout=timeout)
        recovery_s = time.perf_counter() - started
    except BaseException:
        with suppress(IiotError, OSError):
            cluster.stop("immediate")
        shutil.rmtree(data, ignore_errors=True)
        if not created:
            make_dir(data, config.os_user, 0o700, adopt=True)
        raise
    stopped = next((line for line in cluster.log_lines() if "recovery stopping" in line), None)
    return Restored(
        cluster,
        backup,
        target,
        restored_s,
        recovery_s,
        stopped.split("LOG:", 1)[-1].strip() if stopped else None,
        last_commit,
    )


def _configure(
    cluster: LocalCluster, *, listen: str, preload: str | None, autovacuum: bool
) -> None:
    """Our postgresql.conf and pg_hba.conf (the source's kept as *.restored: they may name the
    source's paths and ports), and the settings that must win appended to
    postgresql.auto.conf, which pgBackRest wrote and which the server reads last."""
    data, user = cluster.data, cluster.os_user
    for name in ("postgresql.conf", "pg_hba.conf"):
        if (data / name).exists():
            (data / name).replace(data / f"{name}.restored")
    write_owned(
        data / "postgresql.conf",
        "# Written by iiot for a cluster pgBackRest restored (pitr.py); the source's own\n"
        "# postgresql.conf and pg_hba.conf, if it had them here, are beside as *.restored.\n"
        + (f"shared_preload_libraries = {_quote_conf(preload)}\n" if preload else ""),
        user,
        0o600,
    )
    hba = ["local all all trust"]
    if listen:
        hba += ["host all all 127.0.0.1/32 md5", "host all all ::1/128 md5"]
    write_owned(data / "pg_hba.conf", "\n".join(hba) + "\n", user, 0o600)
    if not (data / "pg_ident.conf").exists():
        write_owned(data / "pg_ident.conf", "", user, 0o600)
    settings = {
        "port": str(cluster.port),
        "listen_addresses": listen,
        "unix_socket_directories": str(cluster.socket_dir),
        "archive_mode": "off",
        "hot_standby": "off",  # no connections before the target is reached and promoted
        "autovacuum": "on" if autovacuum else "off",
    }
    with (data / "postgresql.auto.conf").open("a", encoding="utf-8") as auto:
        auto.write("\n# A restored copy of its own (iiot, pitr.py):\n")
        auto.writelines(f"{k} = {_quote_conf(v)}\n" for k, v in settings.items())


def private_socket_dir(os_user: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="iiot-pitr-"))
    make_dir(path, os_user, 0o700, adopt=True)
    return path


# ---------------------------------------------------------------------------------------------
# Drills


@dataclass(frozen=True)
class Reference:
    """The database as one snapshot saw it, and the WAL insert position right after."""

    lsn: str
    instant: datetime
    xmax: int
    xip: tuple[int, ...]
    state: DatabaseState


def capture_reference(database_url: str) -> Reference:
    with open_connection(database_url, application_name="iiot-pitr", autocommit=True) as conn:
        backups.session_settings(conn)
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            # the first statement takes the snapshot; the position is read after it
            lsn, snapshot, instant = conn.execute(
                "SELECT pg_current_wal_insert_lsn()::text, pg_current_snapshot()::text,"
                " clock_timestamp()"
            ).fetchone()
            state = backups.describe_database(conn)
    _, xmax, xip = snapshot.split(":")
    return Reference(lsn, instant, int(xmax), tuple(int(x) for x in xip.split(",") if x), state)


def archive_through(conn: psycopg.Connection, name: str, timeout: timedelta) -> str:
    """Mark the instant with a restore point, close its WAL segment and wait until the archive
    has it; the restore point's position. A restore to any position before it then needs
    nothing that is not archived."""
    try:
        point = conn.execute("SELECT pg_create_restore_point(%s)::text", (name,)).fetchone()[0]
        closed = conn.execute("SELECT pg_switch_wal()::text").fetchone()[0]
    except psycopg.errors.InsufficientPrivilege:
        user = conn.info.user
        raise PitrError(
            f"{user} may not mark and switch WAL: GRANT EXECUTE ON FUNCTION "
            f"pg_create_restore_point(text), pg_switch_wal() TO {user}"
        ) from None
    state = archive_state(conn)
    needed = max(parse_lsn(point), parse_lsn(closed) - 1) // state.segment_size
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        done = segment_number(state.last_archived_wal, state.segment_size)
        if done is not None and done >= needed:
            return point
        if time.monotonic() > deadline:
            raise PitrError(
                f"the WAL segment of the drill's instant was not archived within "
                f"{backups.duration_text(timeout)}: newest archived {state.last_archived_wal}, "
                f"last failure {state.last_failed_wal or 'none'}"
            )
        time.sleep(0.1)
        state = archive_state(conn)


def raced_transactions(conn: psycopg.Connection, reference: Reference) -> list[int]:
    """Transactions the reference's snapshot saw running or not yet started but that the
    restored cluster has committed: their commit record was written just before the position
    was read. None: the restored cluster is exactly the snapshot."""
    next_xid = int(
        conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()[0]
    )
    rows = conn.execute(
        "SELECT x FROM (SELECT unnest(%s::bigint[])"
        "               UNION SELECT generate_series(%s::bigint, %s::bigint - 1)) s(x)"
        " WHERE pg_xact_status(x::text::xid8) = 'committed' ORDER BY x",
        (list(reference.xip), reference.xmax, min(next_xid, reference.xmax + RACE_SCAN_MAX)),
    ).fetchall()
    return [r[0] for r in rows]


@dataclass(frozen=True)
class PitrDrill:
    result: DrillResult  # as backup_drills records it
    point: RecoveryPoint | None
    target_lsn: str | None
    attempts: int
    recovery_s: float | None = None

    @property
    def passed(self) -> bool:
        return self.result.passed

    def summary(self) -> str:
        r = self.result
        if not r.passed:
            return f"point-in-time recovery drill of {r.database} FAILED: {r.error}"
        at = f"{r.backup_taken_at:%Y-%m-%d %H:%M:%S} UTC" if r.backup_taken_at else "-"
        return (
            f"point-in-time recovery drill of {r.database} passed: restored to {at} (WAL "
            f"{self.target_lsn}) from backup {r.backup_id}, {r.tables_checked} tables verified, "
            f"RTO {backups.duration_text(r.rto)} (target {backups.duration_text(r.targets.rto)}),"
            f" RPO {backups.duration_text(r.rpo)} (target {backups.duration_text(r.targets.rpo)})"
        )


@dataclass(frozen=True)
class _Attempt:
    reference: Reference
    restored: Restored
    verify_s: float
    tables: int
    mismatches: list[str]


def _drill_once(
    database_url: str,
    conn: psycopg.Connection,
    config: PitrConfig,
    scratch: str,
    facts: ServerFacts,
    timeout: float,
) -> _Attempt | list[int]:
    """One capture, restore and verification; the raced transactions instead when the
    comparison could not be exact."""
    reference = capture_reference(database_url)
    archive_through(conn, scratch, ARCHIVE_WAIT)
    backup = repo_info(config).newest_before(lsn=parse_lsn(reference.lsn))
    root = config.scratch_dir / scratch
    make_dir(config.scratch_dir, config.os_user, 0o755)
    make_dir(root, config.os_user, 0o700, adopt=True)
    socket_dir = private_socket_dir(config.os_user)
    user = str(conninfo_to_dict(database_url).get("user") or config.os_user)
    restored: Restored | None = None
    try:
        restored = restore(
            config,
            root / "data",
            target=RestoreTarget.before_lsn(reference.lsn),
            backup=backup,
            port=free_port("127.0.0.1"),
            socket_dir=socket_dir,
            user=user,
            bindir=server_bindir(config, facts.major),
            preload=facts.preload,
            autovacuum=False,  # no transactions of its own: the race check counts commits
            timeout=timeout,
        )
        started = time.perf_counter()
        url = restored.cluster.url(backups.database_of(database_url), user)
        with psycopg.connect(url, autocommit=True, connect_timeout=30) as copy:
            raced = raced_transactions(copy, reference)
        if raced:
            return raced
        # nothing else uses the copy: its tables are verified over several connections
        found = backups.describe_database_parallel(url, config.process_max)
        mismatches = backups.differences(
            reference.state, found, "in the source at the drill's instant"
        )
        return _Attempt(
            reference, restored, time.perf_counter() - started, len(found.tables), mismatches
        )
    finally:
        if restored is not None:
            with suppress(IiotError, OSError):
                restored.cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(socket_dir, ignore_errors=True)


def run_drill(
    database_url: str,
    config: PitrConfig,
    *,
    rpo_hours: Sequence[tuple[str, int]],
    rto_minutes: Sequence[tuple[str, int]],
    notifier: alerts.Notifier | None = None,
    clock: Callable[[], datetime] = _now,
    timeout: float = START_TIMEOUT.total_seconds(),
) -> PitrDrill:
    """Restore the cluster to the drill's own instant into a scratch cluster, verify the
    database there against the snapshot of that instant, record RPO and RTO, alert on failure,
    and always remove the scratch cluster. ``rpo_hours`` only completes the plan targets: a
    PITR drill's RPO target is IIOT_PITR_RPO_MINUTES."""
    database = backups.database_of(database_url)
    with backups.exclusive(database_url, LOCK_KEY) as conn:
        targets = dataclasses.replace(
            backups.targets_for(conn, rpo_hours, rto_minutes), rpo=config.rpo
        )
        started_at = clock()
        scratch = f"{backups.PITR_SCRATCH_PREFIX}{started_at:%Y%m%d%H%M%S}_{secrets.token_hex(4)}"
        point: RecoveryPoint | None = None
        attempt: _Attempt | None = None
        attempts = 0
        error: str | None = None
        try:
            facts = server_facts(conn)
            point = recovery_point(archive_state(conn), repo_info(config))
            while attempt is None:
                attempts += 1
                outcome = _drill_once(database_url, conn, config, scratch, facts, timeout)
                if isinstance(outcome, _Attempt):
                    attempt = outcome
                elif attempts >= DRILL_ATTEMPTS:
                    raise PitrError(
                        f"transactions {', '.join(map(str, outcome[:5]))} committed while the "
                        f"reference snapshot was taken, in each of {attempts} attempts: the "
                        "comparison cannot be exact; run the drill again"
                    )
                else:
                    log.info("drill reference raced transactions %s; taking it again", outcome)
            if attempt.mismatches:
                error = (
                    f"the cluster restored to {attempt.reference.lsn} differs from the source "
                    f"in {len(attempt.mismatches)} ways: " + "; ".join(attempt.mismatches[:5])
                )
        except (IiotError, psycopg.Error, OSError) as exc:
            error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        finished_at = clock()
        restored = attempt.restored if attempt else None
        restore_s = restored.restore_s + restored.recovery_s if restored else None
        result = DrillResult(
            database=database,
            backup_id=restored.backup.label if restored else None,
            scratch_database=scratch,
            started_at=started_at,
            finished_at=finished_at,
            targets=targets,
            backup_taken_at=attempt.reference.instant if attempt else None,
            rpo=point.rpo if point else None,
            rto=timedelta(seconds=restore_s + attempt.verify_s)
            if attempt and restore_s is not None
            else None,
            restore_s=restore_s,
            verify_s=attempt.verify_s if attempt else None,
            tables_checked=attempt.tables if attempt else 0,
            mismatches=attempt.mismatches if attempt else [],
            error=error,
        )
        result = dataclasses.replace(result, drill_id=backups.record_drill(conn, result))
        if result.passed:
            backups._resolve(conn, drill_alert_key(database))
        else:
            backups._alert(
                conn,
                notifier,
                key=drill_alert_key(database),
                source="pitr_drill",
                title=f"Point-in-time recovery drill of database {database} failed",
                detail={"error": error, "drill_id": result.drill_id, "stanza": config.stanza},
            )
    drill = PitrDrill(
        result,
        point,
        attempt.reference.lsn if attempt else None,
        attempts,
        restored.recovery_s if restored else None,
    )
    log.info(drill.summary())
    return drill


# ---------------------------------------------------------------------------------------------
# Status: what the checks and `iiot backup status` look at


@dataclass(frozen=True)
class PitrStatus:
    stanza: str
    targets: Targets
    repo: RepoInfo | None
    point: RecoveryPoint | None
    last_drill: DrillRecord | None
    problems: list[str]

    @property
    def newest_backup(self) -> RepoBackup | None:
        return self.repo.newest if self.repo else None

    @property
    def archive_within_rpo(self) -> bool:
        p = self.point
        return (
            not self.problems
            and p is not None
            and p.problem is None
            and p.rpo is not None
            and p.rpo <= self.targets.rpo
        )

    def drill_recent_and_passed(self, now: datetime) -> bool:
        d = self.last_drill
        return (
            d is not None and d.status == "passed" and now - d.started_at <= backups.DRILL_MAX_AGE
        )

    @property
    def drill_within_targets(self) -> bool:
        d = self.last_drill
        return (
            d is not None
            and d.status == "passed"
            and d.rpo_seconds is not None
            and d.rpo_seconds <= self.targets.rpo.total_seconds()
            and d.rto_seconds is not None
            and d.rto_seconds <= self.targets.rto.total_seconds()
        )

    def checks(self, now: datetime) -> dict[str, bool]:
        return {
            "pitr_within_rpo": self.archive_within_rpo,
            "pitr_drill_recent_and_passed": self.drill_recent_and_passed(now),
            "pitr_drill_within_targets": self.drill_within_targets,
        }


def status(
    conn: psycopg.Connection,
    config: PitrConfig,
    database: str,
    *,
    rpo_hours: Sequence[tuple[str, int]],
    rto_minutes: Sequence[tuple[str, int]],
) -> PitrStatus:
    problems = []
    repo: RepoInfo | None = None
    try:
        repo = repo_info(config)
        if not repo.ok:
            problems.append(f"pgBackRest stanza {config.stanza}: {repo.message}")
    except IiotError as exc:
        problems.append(str(exc))
    point: RecoveryPoint | None = None
    try:
        point = recovery_point(archive_state(conn), repo)
    except psycopg.Error as exc:  # e.g. a standby: no WAL position of its own
        problems.append(f"archive state: {(str(exc).strip().splitlines() or ['?'])[0]}")
    recent = backups.drills(conn, database, limit=1, kind="pitr")
    targets = dataclasses.replace(backups.targets_for(conn, rpo_hours, rto_minutes), rpo=config.rpo)
    return PitrStatus(config.stanza, targets, repo, point, recent[0] if recent else None, problems)


def configured_at(config: PitrConfig) -> datetime | None:
    """When setup wrote the configuration (its file's time): PITR's installation."""
    try:
        return datetime.fromtimestamp(config.config.stat().st_mtime, UTC)
    except OSError:
        return None
