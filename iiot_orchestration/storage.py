"""The two storage modes behind one interface: TimescaleDB hypertable or native daily partitions.

The mode is chosen once, at the first migration, and recorded in ``iiot_storage``; every later
run reads it from there, so code and database can never disagree about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import psycopg

from iiot_orchestration.errors import IiotError

TIMESCALE_MISSING = "timescaledb extension not available"


class StorageError(IiotError):
    """The requested storage mode cannot be used with this database."""


@dataclass(frozen=True)
class TimescaleSupport:
    usable: bool
    reason: str = ""
    version: str | None = None


def timescale_support(conn: psycopg.Connection) -> TimescaleSupport:
    """Whether this server can run the timescale storage mode, and why not."""
    installed = conn.execute(
        "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
    ).fetchone()
    if installed:
        return TimescaleSupport(True, version=installed[0])
    available = conn.execute(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
    ).fetchone()
    if not available:
        return TimescaleSupport(False, f"{TIMESCALE_MISSING} on this server")
    preload = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()[0]
    if "timescaledb" not in {lib.strip() for lib in preload.split(",")}:
        return TimescaleSupport(
            False,
            f"{TIMESCALE_MISSING}: it is installed but not in shared_preload_libraries",
            available[0],
        )
    return TimescaleSupport(True, version=available[0])


def recorded_mode(conn: psycopg.Connection) -> str | None:
    if conn.execute("SELECT to_regclass('iiot_storage')").fetchone()[0] is None:
        return None
    row = conn.execute("SELECT mode FROM iiot_storage").fetchone()
    return row[0] if row else None


def preview_mode(conn: psycopg.Connection, requested: str) -> str:
    """The mode a first migration would choose, without choosing it."""
    if requested == "postgres":
        return "postgres"
    support = timescale_support(conn)
    if requested == "timescale" and not support.usable:
        raise StorageError(
            f"IIOT_STORAGE=timescale, but the {support.reason}; install TimescaleDB on the "
            "server or set IIOT_STORAGE=postgres (or auto)"
        )
    return "timescale" if support.usable else "postgres"


def establish_mode(conn: psycopg.Connection, requested: str) -> str:
    """Return the database's storage mode, choosing and recording it on the first run."""
    recorded = recorded_mode(conn)
    if recorded is not None:
        if requested not in ("auto", recorded):
            raise StorageError(
                f"IIOT_STORAGE={requested}, but this database was set up in {recorded} mode; "
                f"set IIOT_STORAGE={recorded} or auto (the mode cannot change in place)"
            )
        mode = recorded
    else:
        mode = preview_mode(conn, requested)
    if mode == "timescale":
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            # continuous aggregates keep their materialized rows in this schema: the role that
            # creates them (migration_admin) and the one that owns and refreshes them
            # (platform_rw) need CREATE there; the extension's owner grants it
            conn.execute(
                "GRANT CREATE ON SCHEMA _timescaledb_internal TO migration_admin, platform_rw"
            )
        except psycopg.Error as exc:
            raise StorageError(f"cannot set up the timescaledb extension: {exc}") from exc
    if recorded is None:
        conn.execute("INSERT INTO iiot_storage (mode) VALUES (%s) ON CONFLICT DO NOTHING", (mode,))
    return mode


class Storage:
    """Operations whose implementation differs between the storage modes."""

    mode: str = ""

    def ensure_partitions(self, conn: psycopg.Connection, first: date, last: date) -> int:
        """Make sure telemetry can land for every UTC day from ``first`` to ``last``."""
        row = conn.execute(
            "SELECT iiot_ensure_telemetry_partitions(%s, %s)", (first, last)
        ).fetchone()
        return int(row[0])

    def partition_days(self, conn: psycopg.Connection) -> list[date]:
        """UTC days that currently have a partition or chunk."""
        rows = conn.execute(
            "SELECT DISTINCT day FROM telemetry_partitions WHERE day IS NOT NULL ORDER BY day"
        ).fetchall()
        return [r[0] for r in rows]


class PostgresStorage(Storage):
    mode = "postgres"


class TimescaleStorage(Storage):
    mode = "timescale"

    def chunk_interval(self, conn: psycopg.Connection) -> str:
        row = conn.execute(
            "SELECT time_interval::text FROM timescaledb_information.dimensions"
            " WHERE hypertable_name = 'telemetry' AND column_name = 'ts'"
        ).fetchone()
        return row[0]


def storage_for(conn: psycopg.Connection) -> Storage:
    mode = recorded_mode(conn)
    if mode is None:
        raise StorageError("the database is not migrated yet: run `iiot db migrate`")
    return TimescaleStorage() if mode == "timescale" else PostgresStorage()
