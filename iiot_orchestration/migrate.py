"""Numbered SQL migrations: applied in order under an advisory lock, recorded with checksums.

A migration is ``NNNN_name.sql``; one that differs between storage modes comes as two variants,
``NNNN_name.postgres.sql`` and ``NNNN_name.timescale.sql``, and the database's storage mode picks
which one applies.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path

import psycopg

from iiot_orchestration import storage
from iiot_orchestration.db import connect
from iiot_orchestration.errors import IiotError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
MIGRATION_LOCK_KEY = 0x110_7_0001
_FILE = re.compile(
    r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+?)(?:\.(?P<variant>postgres|timescale))?\.sql$"
)


class MigrationError(IiotError):
    """The migrations on disk and in the database disagree, or one failed to apply."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path
    variant: str | None

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"

    @property
    def filename(self) -> str:
        return self.path.name

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


@dataclass(frozen=True)
class AppliedMigration:
    version: int
    name: str
    variant: str | None
    checksum: str
    applied_at: datetime
    duration_ms: int


@dataclass(frozen=True)
class MigrationStatus:
    storage_mode: str | None
    applied: list[AppliedMigration]
    pending: list[Migration]

    @property
    def current_version(self) -> int:
        return max((m.version for m in self.applied), default=0)


def discover(directory: Path = MIGRATIONS_DIR) -> dict[int, dict[str | None, Migration]]:
    """Migrations on disk by version, then by variant (None for a mode-independent file)."""
    found: dict[int, dict[str | None, Migration]] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        match = _FILE.match(path.name)
        if not match:
            raise MigrationError(
                f"{path.name}: migration files are named NNNN_name.sql or "
                "NNNN_name.postgres.sql / NNNN_name.timescale.sql"
            )
        version = int(match["version"])
        migration = Migration(version, match["name"], path, match["variant"])
        variants = found.setdefault(version, {})
        other = next(iter(variants.values()), None)
        if other is not None and (
            other.name != migration.name or None in variants or migration.variant is None
        ):
            raise MigrationError(
                f"two migrations are numbered {version:04d}: {other.filename} and {path.name}"
            )
        variants[migration.variant] = migration
    expected = list(range(1, len(found) + 1))
    if sorted(found) != expected:
        missing = sorted(set(range(1, max(found, default=0) + 1)) - set(found))
        raise MigrationError(
            f"migration numbers must run 0001, 0002, ... without gaps; missing {missing}"
        )
    for version, variants in found.items():
        if None not in variants and set(variants) != {"postgres", "timescale"}:
            raise MigrationError(
                f"migration {version:04d} needs both a .postgres.sql and a .timescale.sql variant"
            )
    return found


def plan_for(mode: str, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The files that apply, in order, for a database in storage ``mode``."""
    return [
        variants.get(None) or variants[mode] for _, variants in sorted(discover(directory).items())
    ]


def _bootstrap(conn: psycopg.Connection) -> None:
    sql = resources.files("iiot_orchestration").joinpath("sql/bootstrap.sql").read_text()
    with conn.transaction():
        conn.execute(sql)


def _applied(conn: psycopg.Connection) -> list[AppliedMigration]:
    rows = conn.execute(
        "SELECT version, name, variant, checksum, applied_at, duration_ms"
        " FROM iiot_schema_migrations ORDER BY version"
    ).fetchall()
    return [AppliedMigration(*row) for row in rows]


def _verify(applied: list[AppliedMigration], files: list[Migration]) -> None:
    by_version = {m.version: m for m in files}
    for row in applied:
        migration = by_version.get(row.version)
        if migration is None:
            raise MigrationError(
                f"the database has migration {row.version:04d}_{row.name}, which this version "
                "of iiot does not know: the database is newer than the code; upgrade iiot"
            )
        if migration.checksum != row.checksum:
            raise MigrationError(
                f"{migration.filename} was changed after it was applied (checksum "
                f"{row.checksum[:12]} in the database, {migration.checksum[:12]} on disk); "
                "applied migrations are immutable: restore the file and add a new migration"
            )


def service_logins(conn: psycopg.Connection) -> list[str]:
    """Logins that are members of app_rw: they choose their tenant per transaction, which is
    right for a multi-tenant service and wrong for a person (docs/security.md)."""
    rows = conn.execute(
        "SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member"
        " WHERE m.roleid = 'app_rw'::regrole AND r.rolcanlogin ORDER BY 1"
    ).fetchall()
    return [r[0] for r in rows]


def _warn_about_service_logins(conn: psycopg.Connection, echo: Callable[[str], None]) -> None:
    logins = service_logins(conn)
    if logins:
        echo(
            f"Warning: {len(logins)} login(s) can act as any tenant through app_rw: "
            f"{', '.join(logins[:10])}{' ...' if len(logins) > 10 else ''}. That is meant for "
            "a multi-tenant service only; give people and BI tools tenant logins "
            "(`iiot tenants logins create --tenant SLUG`) and `REVOKE app_rw FROM <login>` "
            "(docs/security.md)."
        )


def _can_become(conn: psycopg.Connection, role: str) -> bool:
    row = conn.execute("SELECT pg_has_role(session_user, %s, 'MEMBER')", (role,)).fetchone()
    return bool(row and row[0])


def status(
    database_url: str, requested_mode: str = "auto", *, directory: Path = MIGRATIONS_DIR
) -> MigrationStatus:
    """Applied and pending migrations, without changing anything."""
    with connect(database_url, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('iiot_schema_migrations')").fetchone()[0]
        applied = _applied(conn) if exists else []
        mode = storage.recorded_mode(conn)
        files = plan_for(mode or storage.preview_mode(conn, requested_mode), directory)
    if applied:
        _verify(applied, files)
    done = {m.version for m in applied}
    return MigrationStatus(mode, applied, [m for m in files if m.version not in done])


def migrate(
    database_url: str,
    requested_mode: str = "auto",
    *,
    echo: Callable[[str], None] = print,
    directory: Path = MIGRATIONS_DIR,
) -> list[Migration]:
    """Apply every pending migration; returns those applied (empty when up to date)."""
    with connect(database_url, autocommit=True, application_name="iiot-migrate") as conn:
        locked = conn.execute("SELECT pg_try_advisory_lock(%s)", (MIGRATION_LOCK_KEY,)).fetchone()
        if not locked[0]:
            echo("Another migration is running on this database; waiting for it to finish...")
            conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            _bootstrap(conn)
            mode = storage.establish_mode(conn, requested_mode)
            files = plan_for(mode, directory)
            applied = _applied(conn)
            _verify(applied, files)
            done = {m.version for m in applied}
            pending = [m for m in files if m.version not in done]
            if not pending:
                _warn_about_service_logins(conn, echo)
                echo(
                    f"Nothing to migrate: the database is at {files[-1].label} "
                    f"({len(files)} migrations applied, storage mode {mode})."
                )
                return []
            as_admin = _can_become(conn, "migration_admin")
            if not as_admin:
                log.warning(
                    "session user is not a member of migration_admin; objects will be owned "
                    "by the session user",
                    extra={"database": conn.info.dbname},
                )
            for migration in pending:
                _apply(conn, migration, as_admin=as_admin)
                echo(f"Applied {migration.filename}")
            _warn_about_service_logins(conn, echo)
            echo(f"Database is at {pending[-1].label} (storage mode {mode}).")
            return pending
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


def _apply(conn: psycopg.Connection, migration: Migration, *, as_admin: bool) -> None:
    started = time.perf_counter()
    try:
        with conn.transaction():
            if as_admin:
                conn.execute("SET LOCAL ROLE migration_admin")
            conn.execute(migration.sql())
            conn.execute("RESET ROLE")
            conn.execute(
                "INSERT INTO iiot_schema_migrations"
                " (version, name, variant, checksum, duration_ms) VALUES (%s, %s, %s, %s, %s)",
                (
                    migration.version,
                    migration.name,
                    migration.variant,
                    migration.checksum,
                    round((time.perf_counter() - started) * 1000),
                ),
            )
    except psycopg.Error as exc:
        raise MigrationError(f"{migration.filename} failed and was rolled back: {exc}") from exc
