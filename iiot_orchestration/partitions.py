"""Partitions shared by the partitioned assets (rollups, retention, billing, reports).

Tenants are a dynamic partition dimension keyed by slug: `tenant_partitions_sensor` adds a
partition when a tenant is created and removes it when the tenant is deleted, so new tenants
appear in the Dagster UI without a code change.

Days and months start on the installation's first day (`first_day`), read once as the code
location loads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, date, datetime

import dagster as dg
import psycopg

from iiot_orchestration.db import DatabaseUnavailable, connect
from iiot_orchestration.settings import load_settings, mask_password

log = logging.getLogger(__name__)

# the code location waits this long at most for the database before it starts from today
CONNECT_TIMEOUT_SECONDS = 3
STATEMENT_TIMEOUT = "5s"


def installed_day(conn: psycopg.Connection) -> date | None:
    """The UTC day of the first migration, or of the oldest reading if that is older (history
    loaded into a new install); None when the database is not migrated yet."""
    if conn.execute("SELECT to_regclass('iiot_schema_migrations')").fetchone()[0] is None:
        return None
    migrated = conn.execute(
        "SELECT (min(applied_at) AT TIME ZONE 'UTC')::date FROM iiot_schema_migrations"
    ).fetchone()[0]
    if migrated is None:
        return None
    # partitions (PostgreSQL mode) or chunks (TimescaleDB) older than the installation, oldest
    # first: the first one that holds a reading gives the day, each probe stops at one row
    days = [
        day
        for (day,) in conn.execute(
            "SELECT DISTINCT day FROM telemetry_partitions WHERE day < %s ORDER BY day",
            (migrated,),
        )
    ]
    for day, until in zip(days, [*days[1:], migrated], strict=False):
        found = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM telemetry WHERE ts >= %s AND ts < %s)",
            (day, until),
        ).fetchone()[0]
        if found:
            return day
    return migrated


def first_day(environ: Mapping[str, str] | None = None) -> date:
    """IIOT_PARTITIONS_START, else the installation's first day (`installed_day`), else today
    with a warning: the code location must load while the database is down."""
    settings = load_settings(environ)
    if settings.partitions_start is not None:
        log.info(
            f"partitions start on {settings.partitions_start} (IIOT_PARTITIONS_START)",
            extra={"partitions_start": str(settings.partitions_start)},
        )
        return settings.partitions_start
    today = datetime.now(UTC).date()
    if settings.database_url is None:
        return _fallback(today, "IIOT_DATABASE_URL is not set")
    try:
        with connect(
            settings.database_url,
            autocommit=True,
            application_name="iiot-partitions",
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
        ) as conn:
            conn.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")
            day = installed_day(conn)
    except DatabaseUnavailable as exc:
        return _fallback(today, f"the database is unreachable ({exc})")
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = mask_password(settings.database_url)
        return _fallback(today, f"the database at {where} could not be read ({reason})")
    if day is None:
        return _fallback(today, "the database is not migrated yet")
    log.info(
        f"partitions start on {day}, the installation's first day",
        extra={"partitions_start": str(day)},
    )
    return day


def _fallback(today: date, reason: str) -> date:
    log.warning(
        f"partitions start today ({today}): {reason}; the installation's first day is read "
        "when the code location next loads, or set IIOT_PARTITIONS_START=YYYY-MM-DD",
        extra={"partitions_start": str(today)},
    )
    return today


TENANTS = "tenants"
TENANT_PARTITIONS = dg.DynamicPartitionsDefinition(name=TENANTS)
FIRST_DAY = first_day()
PARTITIONS_START = FIRST_DAY.isoformat()
# Months and days are labels: each per-tenant asset reads a key in the tenant's own time zone
# (and, for invoices, billing cycle), so the key "2026-10-01" is October 2026 for everyone.
DAYS = dg.DailyPartitionsDefinition(start_date=PARTITIONS_START, end_offset=1)
# from the first of the month, so that the installation's own month can be billed and reported
MONTHS = dg.MonthlyPartitionsDefinition(
    start_date=FIRST_DAY.replace(day=1).isoformat(), end_offset=1
)
TENANT_DAYS = dg.MultiPartitionsDefinition({"day": DAYS, "tenant": TENANT_PARTITIONS})
TENANT_MONTHS = dg.MultiPartitionsDefinition({"month": MONTHS, "tenant": TENANT_PARTITIONS})


def tenant_key(month_or_day: str, slug: str, dimension: str = "month") -> dg.MultiPartitionKey:
    """The partition key of one tenant and one month ("2026-10-01") or day."""
    return dg.MultiPartitionKey({dimension: month_or_day, "tenant": slug})
