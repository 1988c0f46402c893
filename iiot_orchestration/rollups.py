"""Hourly and daily rollups of raw telemetry, and the late-data bookkeeping around them.

Each function rewrites whole buckets in one transaction, so a run can be repeated and gives the
same rows. The definitions (consumption, counter resets, gaps) are in migration 0008 and
docs/rollups.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql

from iiot_orchestration.db import query
from iiot_orchestration.storage import storage_for

log = logging.getLogger(__name__)

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
SERIALIZATION_RETRIES = 5

SideConnection = Callable[[], AbstractContextManager[psycopg.Connection]]
HOURLY_AGGREGATE = "iiot_aggregates.telemetry_hourly_cagg"
DAILY_AGGREGATE = "iiot_aggregates.telemetry_daily_cagg"


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
    # series-days marked stale by a late-data run (rollup_hours with mark_changes), or re-summed
    # by a daily run
    series: int = 0
    # a late-data run that rewrote only the dirty devices' series: how many devices (else None)
    devices: int | None = None
    # a late-data run: buckets after its windows whose consumption it corrected, and those in
    # later days it marked dirty instead
    follow_ups: tuple[int, int] = (0, 0)


def _window_params(
    window: Window, cumulative: list[str], devices: list[int] | None
) -> dict[str, object]:
    """The parameters of the per-window rollup statements (devices: None for every series)."""
    return {"start": window.start, "end": window.end, "cumulative": cumulative, "devices": devices}


class _PartialMismatch(Exception):
    """Rewriting only the dirty devices left a window's rollup count unequal to its raw count:
    the window was never wholly rolled up, or changed without marks; it is rewritten whole."""


def session_settings(conn: psycopg.Connection, work_mem: str | None) -> None:
    """For the current transaction: ``work_mem`` for the hash aggregates and sorts, and no JIT
    compilation, which costs about 0.1 s per statement, more than it saves on these (an hourly
    run took 0.52 s with it, 0.41 s without; a day's run the same either way)."""
    if work_mem:
        conn.execute("SELECT set_config('work_mem', %s, true)", (work_mem,))
    conn.execute("SET LOCAL jit = off")


def rollup_hours(
    conn: psycopg.Connection,
    windows: list[Window],
    *,
    work_mem: str | None = "256MB",
    side: SideConnection | None = None,
    mark_changes: bool = False,
    dirty_devices_only: bool = False,
) -> RollupResult:
    """Rewrite the hourly buckets of ``windows`` (whole hours) in one repeatable-read
    transaction, and stamp the dirty marks of those hours as rolled up. A mark the daemon
    updates meanwhile makes the transaction fail to serialize; it is retried, so a mark is never
    stamped for data the rollup did not see.

    With ``side`` (a factory of a second connection to the same database) the consumption pass
    and the raw count run there, at the same time as the statistics, in the same snapshot
    (exported by the main transaction), so the two passes over the raw rows use two cores.

    With ``mark_changes`` (a late-data run, whose daily step re-sums only what changed) the
    series whose rows in the windows differ from what they held are marked in
    ``rollup_stale_days``, in the same transaction.

    With ``dirty_devices_only`` (the late-data sensor's runs) only the series of the devices
    marked in ``dirty_window_devices`` for the windows are rewritten, from their raw readings in
    either mode (TimescaleDB mode leaves the hourly aggregate's invalidated hours to the next run
    that reads it: it has no per-device refresh). Each window's rollup count must then still
    equal its raw count; if not (the window was never rolled up whole, or changed without
    marks), the windows are rewritten whole."""
    for attempt in range(1, SERIALIZATION_RETRIES + 1):
        try:
            return _rollup_hours_once(
                conn, windows, work_mem, side, mark_changes, dirty_devices_only
            )
        except _PartialMismatch as exc:
            log.warning("rewriting the whole windows: %s", exc)
            dirty_devices_only = False
        except psycopg.errors.SerializationFailure:
            if attempt == SERIALIZATION_RETRIES:
                raise
            log.info("hourly rollup met a concurrent late-data mark; retrying")
    return _rollup_hours_once(conn, windows, work_mem, side, mark_changes, False)


def refresh_aggregate(conn: psycopg.Connection, name: str, window: Window) -> None:
    """TimescaleDB mode: refresh a continuous aggregate for exactly ``window``. The procedure
    commits as it goes, so it runs outside any transaction; the connection's autocommit mode is
    given back as it was."""
    was_autocommit = conn.autocommit
    if not was_autocommit:
        conn.commit()
        conn.autocommit = True
    try:
        conn.execute(
            "CALL refresh_continuous_aggregate(%s, %s::timestamptz, %s::timestamptz)",
            (name, window.start, window.end),
        )
    finally:
        conn.autocommit = was_autocommit


def _stats_query(aggregate: bool, devices: list[int] | None) -> str:
    if aggregate:
        return query("rollup_hour_stats_cagg")
    return query("rollup_hour_stats_raw" if devices is None else "rollup_hour_stats_devices")


@dataclass(frozen=True)
class _SidePass:
    """The raw reading count of one window and the rows of its cumulative series: whole
    statistics with consumption (from the raw readings) or consumption alone (when the
    statistics come from the continuous aggregate: TimescaleDB mode, whole hours)."""

    consumption: list[tuple]
    source_readings: int


def _side_query(aggregate: bool) -> str:
    return query("rollup_consumption" if aggregate else "rollup_cumulative_stats")


def _side_pass(
    conn: psycopg.Connection,
    window: Window,
    cumulative: list[str],
    aggregate: bool,
    devices: list[int] | None,
) -> _SidePass:
    params = _window_params(window, cumulative, devices)
    rows = conn.execute(_side_query(aggregate), params).fetchall()
    source = conn.execute(
        "SELECT count(*) FROM telemetry WHERE ts >= %(start)s AND ts < %(end)s", params
    ).fetchone()[0]
    return _SidePass(rows, source)


@contextmanager
def _side_passes(
    conn: psycopg.Connection,
    windows: list[Window],
    cumulative: list[str],
    side: SideConnection | None,
    work_mem: str | None,
    aggregate: bool,
    devices: list[int] | None,
) -> Iterator[Callable[[], list[_SidePass]]]:
    """The side passes of every window, on a second connection in a thread when ``side`` is
    given (the result waits for it), else on ``conn`` when the result is asked for."""
    if side is None:
        yield lambda: [
            _side_pass(conn, window, cumulative, aggregate, devices) for window in windows
        ]
        return
    snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]

    def run() -> list[_SidePass]:
        with side() as other:
            other.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            with other.transaction():
                other.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
                session_settings(other, work_mem)
                return [
                    _side_pass(other, window, cumulative, aggregate, devices) for window in windows
                ]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollup-side") as pool:
        future = pool.submit(run)
        try:
            yield future.result
        finally:
            future.cancel()


def _rollup_hours_once(
    conn: psycopg.Connection,
    windows: list[Window],
    work_mem: str | None,
    side: SideConnection | None,
    mark_changes: bool = False,
    dirty_devices_only: bool = False,
) -> RollupResult:
    rows = readings = source = marked = 0
    follow_ups = (0, 0)
    timescale = storage_for(conn).mode == "timescale"
    conn.commit()  # end the read, so that the isolation level can change
    # TimescaleDB mode: whole hours come from the hourly aggregate, refreshed for them first; a
    # run of the dirty devices reads their raw readings and leaves the aggregate's invalidated
    # hours to the next run that reads them (refreshing one costs every device's readings)
    refreshed = timescale and not dirty_devices_only
    if refreshed:
        for window in windows:
            refresh_aggregate(conn, HOURLY_AGGREGATE, window)
    previous = conn.isolation_level
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    try:
        with conn.transaction():
            session_settings(conn, work_mem)
            cumulative = [
                metric
                for (metric,) in conn.execute("SELECT metric FROM metric_catalog WHERE cumulative")
            ]
            devices = _dirty_devices(conn, windows) or None if dirty_devices_only else None
            if timescale and devices is None and not refreshed:
                raise _PartialMismatch("no dirty devices are marked in the windows")
            aggregate = timescale and devices is None
            with _side_passes(
                conn, windows, cumulative, side, work_mem, aggregate, devices
            ) as side_results:
                conn.execute(
                    "CREATE TEMP TABLE rollup_stats ON COMMIT DROP AS "
                    + _stats_query(aggregate, devices)
                    + " WITH NO DATA",
                    _window_params(windows[0], cumulative, devices),
                )
                for window in windows:
                    conn.execute(
                        "INSERT INTO rollup_stats " + _stats_query(aggregate, devices),
                        _window_params(window, cumulative, devices),
                    )
                passes = side_results()
            _load_side_rows(conn, [row for p in passes for row in p.consumption], aggregate)
            span = {"start": windows[0].start, "end": windows[-1].end, "devices": devices}
            if mark_changes:
                conn.execute(query("rollup_hours_snapshot"), span)
            for window in windows:
                params = {"start": window.start, "end": window.end, "devices": devices}
                conn.execute(query("rollup_hours_delete"), params)
            insert = "rollup_hours_insert" if aggregate else "rollup_hours_insert_raw"
            rows = conn.execute(query(insert)).rowcount
            if mark_changes:
                marked = conn.execute(query("rollup_hours_mark"), span).rowcount
                follow_ups = _follow_up(conn, windows, cumulative, devices)
            for window, side_pass in zip(windows, passes, strict=True):
                params = {"start": window.start, "end": window.end}
                rolled_up = conn.execute(
                    "SELECT coalesce(sum(readings), 0) FROM telemetry_hourly"
                    " WHERE bucket >= %(start)s AND bucket < %(end)s",
                    params,
                ).fetchone()[0]
                if devices is not None and rolled_up != side_pass.source_readings:
                    raise _PartialMismatch(
                        f"{window.start:%Y-%m-%d %H:%M}..{window.end:%H:%M} counts {rolled_up} "
                        f"rolled-up readings for {side_pass.source_readings} raw ones after "
                        f"rewriting {len(devices)} dirty devices"
                    )
                readings += rolled_up
                source += side_pass.source_readings
                conn.execute(
                    "UPDATE dirty_windows SET rolled_up_at = now()"
                    " WHERE window_start >= %(start)s AND window_start < %(end)s",
                    params,
                )
                conn.execute(
                    "DELETE FROM dirty_window_devices"
                    " WHERE window_start >= %(start)s AND window_start < %(end)s",
                    params,
                )
    finally:
        conn.isolation_level = previous
    return RollupResult(
        rows,
        int(readings),
        source,
        windows,
        marked,
        len(devices) if devices else None,
        follow_ups,
    )


def _follow_up(
    conn: psycopg.Connection,
    windows: list[Window],
    cumulative: list[str],
    devices: list[int] | None,
) -> tuple[int, int]:
    """Correct the consumption of the bucket after each window whose first increase late data
    changed: in the run's days directly (and marked for the daily step), in later days by
    marking them dirty for the late-data sensor. Returns (corrected, marked later)."""
    fixed = later = 0
    for window in windows:
        conn.execute("DROP TABLE IF EXISTS rollup_follow")
        conn.execute(query("rollup_hours_follow_up"), _window_params(window, cumulative, devices))
        counts = conn.execute(
            query("rollup_hours_follow_up_apply"), {"days_end": window.days().end}
        ).fetchone()
        fixed, later = fixed + counts[0], later + counts[1]
    return fixed, later


def _dirty_devices(conn: psycopg.Connection, windows: list[Window]) -> list[int]:
    """The devices marked dirty in any of the windows."""
    return sorted(
        {
            device_id
            for window in windows
            for (device_id,) in conn.execute(
                "SELECT DISTINCT device_id FROM dirty_window_devices"
                " WHERE window_start >= %s AND window_start < %s",
                (window.start, window.end),
            )
        }
    )


def _load_side_rows(conn: psycopg.Connection, rows: list[tuple], aggregate: bool) -> None:
    """The side pass's rows into a temporary table: ``rollup_consumption`` (statistics from the
    aggregate) or ``rollup_cumulative`` (from the raw readings: the cumulative series' whole
    statistics)."""
    if aggregate:
        table, columns = "rollup_consumption", _CONSUMPTION_COLUMNS
    else:
        table, columns = "rollup_cumulative", _STATS_COLUMNS + _CONSUMPTION_COLUMNS[3:]
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} ({}) ON COMMIT DROP").format(
            sql.Identifier(table),
            sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind))
                for name, kind, _ in columns
            ),
        )
    )
    copy_sql = sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(sql.Identifier(table))
    with conn.cursor().copy(copy_sql) as copy:
        copy.set_types([oid for _, _, oid in columns])
        for row in rows:
            copy.write_row(row)


_CONSUMPTION_COLUMNS = (
    ("device_id", "integer", "int4"),
    ("metric", "text", "text"),
    ("bucket", "timestamptz", "timestamptz"),
    ("consumption", "double precision", "float8"),
    ("counter_resets", "integer", "int4"),
)
_STATS_COLUMNS = (
    ("tenant_id", "integer", "int4"),
    ("device_id", "integer", "int4"),
    ("metric", "text", "text"),
    ("bucket", "timestamptz", "timestamptz"),
    ("readings", "bigint", "int8"),
    ("value_sum", "double precision", "float8"),
    ("value_min", "double precision", "float8"),
    ("value_max", "double precision", "float8"),
    ("first_ts", "timestamptz", "timestamptz"),
    ("first_value", "double precision", "float8"),
    ("last_ts", "timestamptz", "timestamptz"),
    ("last_value", "double precision", "float8"),
)


# Above this many stale series-days, re-summing the whole days (one hash aggregate) costs less
# than fetching each series' hours by primary key.
MARKED_RESUM_LIMIT = 800


def rollup_days(
    conn: psycopg.Connection, days: Window, *, only_marked: bool = False
) -> RollupResult:
    """Rewrite the daily buckets of ``days`` from the hourly ones, then clear the dirty marks of
    those days that the hourly rollup covered and nothing re-marked since.

    With ``only_marked`` (the daily step of a late-data run) only the series-days marked stale
    by ``rollup_hours(mark_changes=True)`` are re-summed, and their marks removed; otherwise
    every series of the days is, and the days' marks are cleared. In TimescaleDB mode whole days
    come from the daily aggregate, built on the hourly one: both are refreshed for the days first
    (TimescaleDB recomputes only their invalidated hours and days, such as those a late-data run
    of the dirty devices left); a few marked series-days are re-summed from their hourly rows, as
    in PostgreSQL mode, without a refresh."""
    params = {"start": days.start, "end": days.end}
    timescale = storage_for(conn).mode == "timescale"
    refreshed = timescale and not (only_marked and _stale_series(conn, days) <= MARKED_RESUM_LIMIT)
    if refreshed:
        refresh_aggregate(conn, HOURLY_AGGREGATE, days)
        refresh_aggregate(conn, DAILY_AGGREGATE, days)
    with conn.transaction():
        session_settings(conn, None)
        series = 0
        if only_marked:
            conn.execute(
                "CREATE TEMP TABLE rollup_days_todo (day timestamptz, tenant_id integer,"
                " device_id integer, metric text) ON COMMIT DROP"
            )
            series = conn.execute(query("rollup_days_take_marks"), params).rowcount
        if only_marked and (series <= MARKED_RESUM_LIMIT or (timescale and not refreshed)):
            conn.execute(query("rollup_days_todo_hours"))
            conn.execute("ANALYZE rollup_days_todo_hours")  # the planner sees a few rows, not 1,000
            conn.execute(query("rollup_days_delete_marked"))
            rows = conn.execute(query("rollup_days_insert_marked")).rowcount
        else:
            conn.execute(
                "DELETE FROM rollup_stale_days WHERE day >= %(start)s AND day < %(end)s", params
            )
            conn.execute(query("rollup_days_delete"), params)
            insert = query("rollup_days_insert_cagg" if timescale else "rollup_days_insert")
            rows = series = conn.execute(insert, params).rowcount
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
    return RollupResult(rows, int(readings), int(source), [days], series)


def _stale_series(conn: psycopg.Connection, days: Window) -> int:
    """How many series-days of ``days`` are marked stale (a late-data run's daily step)."""
    found = conn.execute(
        "SELECT count(*) FROM rollup_stale_days WHERE day >= %s AND day < %s",
        (days.start, days.end),
    ).fetchone()[0]
    conn.commit()
    return found


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
