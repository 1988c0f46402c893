"""Hourly and daily rollups of raw telemetry, and the late-data bookkeeping around them.

Each function rewrites whole buckets in one transaction, so a run can be repeated and gives the
same rows. The definitions (consumption, counter resets, gaps) are in migration 0008 and
docs/rollups.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg

from iiot_orchestration.db import query
from iiot_orchestration.storage import storage_for

log = logging.getLogger(__name__)

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
SERIALIZATION_RETRIES = 5


@dataclass(frozen=True)
class Window:
    """A half-open UTC interval [start, end)."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("rollup windows need time-zone-aware datetimes")
        if self.end <= self.start:
            raise ValueError(f"empty rollup window {self.start} .. {self.end}")

    def hours(self) -> list[datetime]:
        first = floor_hour(self.start)
        return [first + n * HOUR for n in range(int((self.end - first) / HOUR))]

    def days(self) -> Window:
        """The whole UTC days that contain this window."""
        start = self.start.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        end = self.end.astimezone(UTC)
        whole_end = end.replace(hour=0, minute=0, second=0, microsecond=0)
        return Window(start, whole_end if whole_end == end else whole_end + DAY)


def floor_hour(ts: datetime) -> datetime:
    return ts.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def contiguous(hours: Iterable[datetime]) -> list[Window]:
    """Runs of consecutive hours as windows: one statement per run instead of one per hour."""
    windows: list[Window] = []
    for hour in sorted(set(hours)):
        if windows and windows[-1].end == hour:
            windows[-1] = Window(windows[-1].start, hour + HOUR)
        else:
            windows.append(Window(hour, hour + HOUR))
    return windows


@dataclass(frozen=True)
class RollupResult:
    rows: int
    readings: int  # readings counted in the rewritten buckets
    source_readings: int  # readings in the source for the same windows, in the same snapshot
    windows: list[Window]


def _work_mem(conn: psycopg.Connection, work_mem: str | None) -> None:
    if work_mem:
        conn.execute("SELECT set_config('work_mem', %s, true)", (work_mem,))


def rollup_hours(
    conn: psycopg.Connection, windows: list[Window], *, work_mem: str | None = "256MB"
) -> RollupResult:
    """Rewrite the hourly buckets of ``windows`` (whole hours) in one repeatable-read
    transaction, and stamp the dirty marks of those hours as rolled up. A mark the daemon
    updates meanwhile makes the transaction fail to serialize; it is retried, so a mark is never
    stamped for data the rollup did not see."""
    for attempt in range(1, SERIALIZATION_RETRIES + 1):
        try:
            return _rollup_hours_once(conn, windows, work_mem)
        except psycopg.errors.SerializationFailure:
            if attempt == SERIALIZATION_RETRIES:
                raise
            log.info("hourly rollup met a concurrent late-data mark; retrying")
    raise AssertionError("unreachable")  # pragma: no cover


def refresh_aggregate(conn: psycopg.Connection, name: str, window: Window) -> None:
    """TimescaleDB mode: refresh a continuous aggregate for exactly ``window``. The procedure
    commits as it goes, so it runs outside any transaction."""
    conn.commit()
    conn.autocommit = True
    try:
        conn.execute(
            "CALL refresh_continuous_aggregate(%s, %s::timestamptz, %s::timestamptz)",
            (name, window.start, window.end),
        )
    finally:
        conn.autocommit = False


def _hourly_insert(mode: str) -> str:
    stats = query("rollup_hour_stats_cagg" if mode == "timescale" else "rollup_hour_stats_raw")
    return query("rollup_hours_insert").replace("__STATS__", stats)


def _rollup_hours_once(
    conn: psycopg.Connection, windows: list[Window], work_mem: str | None
) -> RollupResult:
    rows = readings = source = 0
    mode = storage_for(conn).mode
    conn.commit()  # end the read, so that the isolation level can change
    if mode == "timescale":
        for window in windows:
            refresh_aggregate(conn, "iiot_aggregates.telemetry_hourly_cagg", window)
    insert = _hourly_insert(mode)
    previous = conn.isolation_level
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    try:
        with conn.transaction():
            _work_mem(conn, work_mem)
            for window in windows:
                params = {"start": window.start, "end": window.end}
                conn.execute(query("rollup_hours_delete"), params)
                rows += conn.execute(insert, params).rowcount
                readings += conn.execute(
                    "SELECT coalesce(sum(readings), 0) FROM telemetry_hourly"
                    " WHERE bucket >= %(start)s AND bucket < %(end)s",
                    params,
                ).fetchone()[0]
                source += conn.execute(
                    "SELECT count(*) FROM telemetry WHERE ts >= %(start)s AND ts < %(end)s",
                    params,
                ).fetchone()[0]
                conn.execute(
                    "UPDATE dirty_windows SET rolled_up_at = now()"
                    " WHERE window_start >= %(start)s AND window_start < %(end)s",
                    params,
                )
    finally:
        conn.isolation_level = previous
    return RollupResult(rows, int(readings), source, windows)


def rollup_days(conn: psycopg.Connection, days: Window) -> RollupResult:
    """Rewrite the daily buckets of ``days`` from the hourly ones, then clear the dirty marks of
    those days that the hourly rollup covered and nothing re-marked since."""
    params = {"start": days.start, "end": days.end}
    timescale = storage_for(conn).mode == "timescale"
    if timescale:
        refresh_aggregate(conn, "iiot_aggregates.telemetry_daily_cagg", days)
    with conn.transaction():
        conn.execute(query("rollup_days_delete"), params)
        insert = query("rollup_days_insert_cagg" if timescale else "rollup_days_insert")
        rows = conn.execute(insert, params).rowcount
        readings, source = conn.execute(
            "SELECT (SELECT coalesce(sum(readings), 0) FROM telemetry_daily"
            "         WHERE bucket >= %(start)s AND bucket < %(end)s),"
            "       (SELECT coalesce(sum(readings), 0) FROM telemetry_hourly"
            "         WHERE bucket >= %(start)s AND bucket < %(end)s)",
            params,
        ).fetchone()
        conn.execute(
            "DELETE FROM dirty_windows WHERE window_start >= %(start)s AND window_start < %(end)s"
            " AND rolled_up_at IS NOT NULL AND last_marked_at <= rolled_up_at",
            params,
        )
    return RollupResult(rows, int(readings), int(source), [days])


def dirty_hours(conn: psycopg.Connection, settled_before: datetime) -> dict[datetime, list]:
    """Dirty hours whose newest mark is older than ``settled_before``, grouped by UTC day."""
    found: dict[datetime, list[datetime]] = {}
    for (hour,) in conn.execute(
        "SELECT DISTINCT window_start FROM dirty_windows"
        " WHERE last_marked_at < %s ORDER BY window_start",
        (settled_before,),
    ):
        day = hour.astimezone(UTC).replace(hour=0)
        found.setdefault(day, []).append(hour.astimezone(UTC))
    return found
