"""Telemetry of the caller's tenant: the latest reading of each series, and a range of readings
or of the hourly and daily rollups (viewer).

The API's role (app_rw) reads raw readings only through the security_barrier view
``tenant.telemetry``; PostgreSQL applies a condition of the caller's query inside such a view
(where the primary key and the day partitions serve it) only when its operators are leakproof,
and it never hands the view's index order to the query around it. So the time bounds here are
always plain comparisons of ``ts`` with a parameter or a column, and ``ORDER BY ts ... LIMIT``
sorts only the readings that such bounds keep.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import Query
from pydantic import BaseModel, Field

from iiot_orchestration.api.context import AsyncSession, AsyncViewer, Session, Viewer
from iiot_orchestration.api.errors import ApiError, keyed_router, not_found
from iiot_orchestration.api.pagination import Cursor, Limit, decode, encode

router = keyed_router("telemetry")

Bucket = Literal["raw", "hour", "day"]
MAX_DEVICES = 100
MAX_METRICS = 20
MAX_POINTS = 10_000
MAX_SPAN = {"raw": timedelta(days=31), "hour": timedelta(days=366), "day": timedelta(days=366)}
# bucket=auto: raw readings up to AUTO_RAW, the hourly rollup up to AUTO_HOUR, the daily beyond
AUTO_RAW = timedelta(days=2)
AUTO_HOUR = timedelta(days=62)
# the latest reading is looked for in windows back from now: 2 hours, then each window twice as
# long as the one before, then everything older than LATEST_HORIZON
LATEST_FIRST_WINDOW = timedelta(hours=2)
LATEST_HORIZON = timedelta(days=20 * 366)

DeviceId = Annotated[int, Field(ge=1, le=2**31 - 1)]
MetricName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,49}$")]
DeviceIds = Annotated[
    list[DeviceId] | None,
    Query(
        max_length=MAX_DEVICES,
        description=f"Only these devices (repeat the parameter, up to {MAX_DEVICES}); "
        "another tenant's device is not found (404).",
    ),
]
Metrics = Annotated[
    list[MetricName] | None,
    Query(
        max_length=MAX_METRICS,
        description="Only these metrics (repeat the parameter), e.g. `energy_kwh`.",
    ),
]
Start = Annotated[
    datetime,
    Query(description="Start of the range, inclusive (ISO 8601; without an offset, UTC)."),
]
End = Annotated[
    datetime,
    Query(description="End of the range, exclusive (ISO 8601; without an offset, UTC)."),
]

ROLLUPS = {"hour": "tenant.telemetry_hourly", "day": "tenant.telemetry_daily"}


class LatestReading(BaseModel):
    device_id: int
    metric: str
    unit: str
    ts: datetime
    value: float


class LatestPage(BaseModel):
    items: list[LatestReading]
    next_cursor: str | None = Field(
        default=None,
        description="A page covers `limit` series; one without readings has no item, so a page "
        "may hold fewer items. Follow next_cursor until it is null.",
    )


class Point(BaseModel):
    device_id: int
    metric: str
    ts: datetime = Field(description="The reading's time, or the start of its UTC hour or day.")
    value: float = Field(description="The reading, or the average of the bucket's readings.")
    readings: int | None = Field(default=None, description="Readings in the bucket.")
    value_min: float | None = None
    value_max: float | None = None
    last_value: float | None = Field(default=None, description="The bucket's latest reading.")
    consumption: float | None = Field(
        default=None,
        description="Cumulative metrics: what the meter counted in the bucket (docs/rollups.md).",
    )


class TelemetryPage(BaseModel):
    bucket: Bucket = Field(description="The bucket used (what `auto` chose).")
    start: datetime
    end: datetime
    units: dict[str, str] = Field(description="The unit of each metric in `items`.")
    items: list[Point]
    next_cursor: str | None = None


def field_error(field: str, problem: str) -> ApiError:
    """A 422 naming one query parameter, shaped as FastAPI's own validation errors."""
    return ApiError(
        422,
        f"invalid request: query.{field}: {problem}",
        code="validation_error",
        details=[{"field": f"query.{field}", "problem": problem, "type": "value_error"}],
    )


def utc(value: datetime, field: str) -> datetime:
    """``value`` in UTC; without an offset it is taken as UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise field_error(field, "out of range") from None


def time_range(start: datetime, end: datetime, max_span: timedelta) -> tuple[datetime, datetime]:
    """The range [start, end) in UTC: end after start, at most ``max_span`` long."""
    start, end = utc(start, "start"), utc(end, "end")
    if end <= start:
        raise field_error("end", "must be after start")
    if end - start > max_span:
        raise field_error("end", f"the range may span at most {max_span.days} days")
    return start, end


def choose_bucket(requested: str, start: datetime, end: datetime) -> Bucket:
    if requested != "auto":
        return requested  # type: ignore[return-value]
    span = end - start
    return "raw" if span <= AUTO_RAW else "hour" if span <= AUTO_HOUR else "day"


def check_selection(s: Session, devices: list[int] | None, metrics: list[str] | None) -> None:
    """404 for a device that is not the tenant's (unknown or another tenant's: the same answer),
    422 for a metric not in the catalogue."""
    if devices:
        found = {
            r["device_id"]
            for r in s.rows(
                "SELECT device_id FROM devices WHERE device_id = ANY(%s)", (sorted(set(devices)),)
            )
        }
        missing = sorted(set(devices) - found)
        if missing:
            raise not_found(f"device {missing[0]}")
    if metrics:
        known = {
            r["metric"]
            for r in s.rows("SELECT metric FROM metric_catalog WHERE metric = ANY(%s)", (metrics,))
        }
        unknown = [m for m in metrics if m not in known]
        if unknown:
            raise field_error("metric", f"unknown metric {unknown[0]!r}")


# A dashboard's poll is one statement: the ids and metrics that are not the tenant's (unknown
# and another tenant's give the same 404), whether another page follows, and each series'
# newest reading of the last LATEST_FIRST_WINDOW. Its bounds are parameters, so PostgreSQL reads
# only the partitions they cover, by primary key (device, metric, time).
LATEST = """
WITH unknown AS (
    SELECT (SELECT min(d) FROM unnest(%(devices)s::integer[]) d
             WHERE d <> ALL (ARRAY(SELECT device_id FROM devices
                                    WHERE device_id = ANY(%(devices)s)))) AS device_id,
           (SELECT min(m) FROM unnest(%(metrics)s::text[]) m
             WHERE NOT EXISTS (SELECT 1 FROM metric_catalog c WHERE c.metric = m)) AS metric
), series AS (
    SELECT device_id, metric FROM device_metrics
     WHERE (%(devices)s::integer[] IS NULL OR device_id = ANY(%(devices)s))
       AND (%(metrics)s::text[] IS NULL OR metric = ANY(%(metrics)s))
       AND (device_id, metric) > (%(after_device)s, %(after_metric)s)
       AND NOT EXISTS (SELECT 1 FROM unknown WHERE device_id IS NOT NULL OR metric IS NOT NULL)
     ORDER BY device_id, metric
     LIMIT %(limit)s + 1
), page AS (
    SELECT device_id, metric FROM series ORDER BY device_id, metric LIMIT %(limit)s
), last AS (
    SELECT device_id, metric FROM page ORDER BY device_id DESC, metric DESC LIMIT 1
), newest AS (
    SELECT s.device_id, s.metric, m.unit, r.ts, r.value
      FROM page s
      JOIN metric_catalog m USING (metric)
      LEFT JOIN LATERAL (
          SELECT t.ts, t.value FROM tenant.telemetry t
           WHERE t.device_id = s.device_id AND t.metric = s.metric AND t.ts >= %(since)s
           ORDER BY t.ts DESC LIMIT 1) r ON true
)
SELECT u.device_id AS unknown_device, u.metric AS unknown_metric,
       (SELECT count(*) FROM series) > %(limit)s AS more,
       l.device_id AS last_device, l.metric AS last_metric,
       n.device_id, n.metric, n.unit, n.ts, n.value
  FROM unknown u
  LEFT JOIN last l ON true
  LEFT JOIN newest n ON true
 ORDER BY n.device_id, n.metric
"""

# The series with no reading since then: window by window further back, each twice as long as
# the one before, until a window holds a reading. The bounds of a window are columns of the
# previous step, so PostgreSQL still pushes them into the view and reads only the partitions
# they cover; but it prepares a scan of every partition for the statement, which costs more
# than the search when there are hundreds of days, so this runs only when needed.
LATEST_OLDER = """
WITH RECURSIVE probe AS (
    SELECT device_id, metric, NULL::timestamptz AS ts, NULL::double precision AS value,
           %(since)s::timestamptz AS lo,
           %(since)s::timestamptz - (%(now)s::timestamptz - %(since)s::timestamptz) AS next_lo
      FROM unnest(%(devices)s::integer[], %(metrics)s::text[]) s (device_id, metric)
    UNION ALL
    SELECT p.device_id, p.metric, r.ts, r.value, p.next_lo,
           CASE WHEN p.next_lo > %(now)s - %(horizon)s
                THEN p.next_lo - (%(now)s - p.next_lo) ELSE '-infinity' END
      FROM probe p
      LEFT JOIN LATERAL (
          SELECT t.ts, t.value FROM tenant.telemetry t
           WHERE t.device_id = p.device_id AND t.metric = p.metric
             AND t.ts >= p.next_lo AND t.ts < p.lo
           ORDER BY t.ts DESC LIMIT 1) r ON true
     WHERE p.ts IS NULL AND p.lo > '-infinity'
)
SELECT device_id, metric, ts, value FROM probe WHERE ts IS NOT NULL
"""
LATEST_ITEM = ("device_id", "metric", "unit", "ts", "value")


def latest_params(
    devices: list[int] | None, metrics: list[str] | None, after: list, limit: int
) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "devices": devices,
        "metrics": metrics,
        "after_device": after[0],
        "after_metric": after[1],
        "limit": limit,
        "since": now - LATEST_FIRST_WINDOW,
    }


async def older_readings(s: AsyncSession, series: list[dict[str, Any]], since: datetime) -> None:
    """Fill in ``ts`` and ``value`` of ``series`` (none found since ``since``) from before."""
    found = await s.rows(
        LATEST_OLDER,
        {
            "devices": [r["device_id"] for r in series],
            "metrics": [r["metric"] for r in series],
            "since": since,
            "now": datetime.now(UTC),
            "horizon": LATEST_HORIZON,
        },
    )
    older = {(r["device_id"], r["metric"]): r for r in found}
    for row in series:
        reading = older.get((row["device_id"], row["metric"]))
        if reading:
            row["ts"], row["value"] = reading["ts"], reading["value"]


@router.get(
    "/telemetry/latest",
    response_model=LatestPage,
    summary="The latest reading of each device and metric",
)
async def latest(
    s: AsyncViewer,
    device_id: DeviceIds = None,
    metric: Metrics = None,
    limit: Limit = 1000,
    cursor: Cursor = None,
) -> dict[str, Any]:
    """The newest reading of each series (device and metric) of the tenant, in device and metric
    order; series that never reported are left out."""
    s.tenant()  # a platform key names its tenant
    after = decode(cursor, int, str) or [0, ""]
    params = latest_params(device_id, metric, after, limit)
    rows = await s.rows(LATEST, params)
    head = rows[0]
    if head["unknown_device"] is not None:
        raise not_found(f"device {head['unknown_device']}")
    if head["unknown_metric"] is not None:
        raise field_error("metric", f"unknown metric {head['unknown_metric']!r}")
    series = [{k: row[k] for k in LATEST_ITEM} for row in rows if row["device_id"] is not None]
    quiet = [row for row in series if row["ts"] is None]
    if quiet:
        await older_readings(s, quiet, params["since"])
    next_cursor = encode([head["last_device"], head["last_metric"]]) if head["more"] else None
    return {"items": [row for row in series if row["ts"] is not None], "next_cursor": next_cursor}


RAW_RANGE = """
SELECT s.device_id, s.metric, r.ts, r.value
  FROM (SELECT device_id, metric,
               CASE WHEN device_id = %(after_device)s AND metric = %(after_metric)s
                    THEN %(after_ts)s ELSE '-infinity' END AS after_ts
          FROM device_metrics
         WHERE (%(devices)s::integer[] IS NULL OR device_id = ANY(%(devices)s))
           AND (%(metrics)s::text[] IS NULL OR metric = ANY(%(metrics)s))
           AND (device_id, metric) >= (%(after_device)s, %(after_metric)s)
         ORDER BY device_id, metric
        OFFSET 0) s
 CROSS JOIN LATERAL (
       SELECT t.ts, t.value FROM tenant.telemetry t
        WHERE t.device_id = s.device_id AND t.metric = s.metric
          AND t.ts >= %(start)s AND t.ts < %(end)s AND t.ts > s.after_ts
        ORDER BY t.ts
        LIMIT %(limit)s) r
 ORDER BY s.device_id, s.metric, r.ts
 LIMIT %(limit)s
"""

ROLLUP_RANGE = """
SELECT device_id, metric, bucket AS ts, value_avg AS value, readings, value_min, value_max,
       last_value, consumption
  FROM {relation}
 WHERE bucket >= %(start)s AND bucket < %(end)s
   AND (%(devices)s::integer[] IS NULL OR device_id = ANY(%(devices)s))
   AND (%(metrics)s::text[] IS NULL OR metric = ANY(%(metrics)s))
   AND (device_id, metric, bucket) > (%(after_device)s, %(after_metric)s, %(after_ts)s)
 ORDER BY device_id, metric, bucket
 LIMIT %(limit)s
"""


def _cursor_key(cursor: str | None) -> tuple[int, str, datetime]:
    after = decode(cursor, int, str, str)
    if after is None:
        return 0, "", datetime.min.replace(tzinfo=UTC)
    try:
        ts = datetime.fromisoformat(after[2])
    except ValueError:
        ts = None
    if ts is None or ts.tzinfo is None:
        raise ApiError(
            400,
            "invalid cursor: pass next_cursor of the previous page unchanged",
            code="bad_cursor",
        )
    return after[0], after[1], ts


@router.get(
    "/telemetry",
    response_model=TelemetryPage,
    summary="Readings of a time range: raw, or the hourly or daily rollups",
)
def telemetry_range(
    s: Viewer,
    start: Start,
    end: End,
    device_id: DeviceIds = None,
    metric: Metrics = None,
    bucket: Annotated[
        Literal["auto", "raw", "hour", "day"],
        Query(
            description="`raw` readings (ranges up to 31 days), the `hour` or `day` rollups (up "
            "to 366 days), or `auto`: raw up to 2 days, hourly up to 62 days, daily beyond."
        ),
    ] = "auto",
    limit: Annotated[
        int, Query(ge=1, le=MAX_POINTS, description=f"Points per page (1 to {MAX_POINTS}).")
    ] = 1000,
    cursor: Cursor = None,
) -> dict[str, Any]:
    """Points of the range [start, end) in device, metric and time order, `limit` a page.
    Rollup points are the UTC hours or days that start in the range."""
    s.tenant()
    start, end = time_range(start, end, MAX_SPAN["hour"])
    chosen = choose_bucket(bucket, start, end)
    if end - start > MAX_SPAN[chosen]:
        raise field_error(
            "end",
            f"bucket={chosen} allows ranges of at most {MAX_SPAN[chosen].days} days: use "
            "bucket=hour or day, or an export (/api/v1/exports/telemetry)",
        )
    after_device, after_metric, after_ts = _cursor_key(cursor)
    check_selection(s, device_id, metric)
    params = {
        "start": start,
        "end": end,
        "devices": device_id,
        "metrics": metric,
        "after_device": after_device,
        "after_metric": after_metric,
        "after_ts": after_ts,
        "limit": limit + 1,
    }
    sql = RAW_RANGE if chosen == "raw" else ROLLUP_RANGE.format(relation=ROLLUPS[chosen])
    rows = s.rows(sql, params)
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = encode([last["device_id"], last["metric"], last["ts"].isoformat()])
    shown = sorted({r["metric"] for r in rows})
    units = {
        r["metric"]: r["unit"]
        for r in s.rows("SELECT metric, unit FROM metric_catalog WHERE metric = ANY(%s)", (shown,))
    }
    return {
        "bucket": chosen,
        "start": start,
        "end": end,
        "units": units,
        "items": rows,
        "next_cursor": next_cursor,
    }
