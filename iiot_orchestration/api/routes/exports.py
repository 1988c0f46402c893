"""Exports of the caller's tenant as CSV or Parquet files (viewer): telemetry (raw readings or
the hourly or daily rollups) and daily consumption (the marts), streamed in constant memory.

The rows are counted first, in the request's session: an export larger than
IIOT_API_EXPORT_MAX_ROWS is refused with 413 before anything is sent. Then the file streams
from a pooled connection of its own (iiot_orchestration/api/exports.py), in storage order.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal

import psycopg
import pyarrow as pa
from fastapi import Query, Request
from fastapi.responses import StreamingResponse

from iiot_orchestration.api import exports
from iiot_orchestration.api.context import Session, Viewer
from iiot_orchestration.api.errors import ApiError, ErrorEnvelope, keyed_router
from iiot_orchestration.api.routes.telemetry import (
    MAX_SPAN,
    DeviceIds,
    End,
    Metrics,
    Start,
    check_selection,
    field_error,
    time_range,
)

router = keyed_router("exports")

Format = Annotated[Literal["csv", "parquet"], Query(description="`csv` or `parquet`.")]
MEDIA_TYPES = {"csv": exports.CSV_MEDIA_TYPE, "parquet": exports.PARQUET_MEDIA_TYPE}
TIMESTAMP = pa.timestamp("us", tz="UTC")

RAW_COLUMNS = (
    ("device_id", pa.int32()),
    ("metric", pa.string()),
    ("ts", TIMESTAMP),
    ("value", pa.float64()),
)
ROLLUP_COLUMNS = (
    ("device_id", pa.int32()),
    ("metric", pa.string()),
    ("bucket", TIMESTAMP),
    ("readings", pa.int64()),
    ("value_sum", pa.float64()),
    ("value_min", pa.float64()),
    ("value_max", pa.float64()),
    ("value_avg", pa.float64()),
    ("first_ts", TIMESTAMP),
    ("first_value", pa.float64()),
    ("last_ts", TIMESTAMP),
    ("last_value", pa.float64()),
    ("consumption", pa.float64()),
    ("counter_resets", pa.int32()),
)
CONSUMPTION_COLUMNS = (
    ("device_id", pa.int32()),
    ("unit", pa.string()),
    ("local_day", pa.date32()),
    ("consumption", pa.float64()),
    ("readings", pa.int64()),
    ("hours_with_data", pa.int64()),
    ("counter_resets", pa.int64()),
)
# each column is cast to the SQL type of its Arrow type, whatever its source's (a mart's sums are
# numeric), so that CSV and Parquet exports hold the same values
SQL_TYPES = {
    pa.int32(): "integer",
    pa.int64(): "bigint",
    pa.float64(): "double precision",
    pa.string(): "text",
    TIMESTAMP: "timestamptz",
    pa.date32(): "date",
}
SOURCES = {
    "raw": ("tenant.telemetry", "ts", RAW_COLUMNS),
    "hour": ("tenant.telemetry_hourly", "bucket", ROLLUP_COLUMNS),
    "day": ("tenant.telemetry_daily", "bucket", ROLLUP_COLUMNS),
}
SELECTION = """
 WHERE {time} >= %(start)s AND {time} < %(end)s
   AND (%(devices)s::integer[] IS NULL OR device_id = ANY(%(devices)s))
   AND (%(metrics)s::text[] IS NULL OR metric = ANY(%(metrics)s))"""
CONSUMPTION_MART = "tenant.consumption_daily"
CONSUMPTION_SELECTION = """
 WHERE local_day >= %(start)s AND local_day < %(end)s
   AND (%(devices)s::integer[] IS NULL OR device_id = ANY(%(devices)s))"""

FILE_RESPONSES = {
    200: {
        "description": "The file, streamed (chunked); a transfer cut short means the export "
        "failed or timed out (IIOT_API_EXPORT_TIMEOUT_SECONDS) and the file is incomplete.",
        "content": {
            exports.CSV_MEDIA_TYPE: {"schema": {"type": "string"}},
            exports.PARQUET_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    },
    409: {"model": ErrorEnvelope, "description": "The consumption marts are not built yet"},
    503: {
        "model": ErrorEnvelope,
        "description": "As many exports as allowed at once are streaming: retry after "
        "Retry-After seconds",
    },
    504: {
        "model": ErrorEnvelope,
        "description": "Counting the rows took longer than IIOT_API_EXPORT_TIMEOUT_SECONDS",
    },
}


def _select_list(columns: tuple[tuple[str, pa.DataType], ...]) -> str:
    return ", ".join(f"{name}::{SQL_TYPES[kind]} AS {name}" for name, kind in columns)


def _count(s: Session, request: Request, relation: str, selection: str, params: dict) -> None:
    """Refuse with 413 an export of more rows than allowed (and 504 a count that overruns)."""
    settings = request.app.state.settings
    s.conn.execute(
        "SELECT set_config('statement_timeout', %s, true)",
        (f"{settings.api_export_timeout_seconds * 1000}ms",),
    )
    limit = settings.api_export_max_rows
    try:
        row = s.row(
            f"SELECT count(*) AS n FROM (SELECT 1 FROM {relation}{selection}"
            " LIMIT %(over_limit)s) rows",
            {**params, "over_limit": limit + 1},
        )
    except psycopg.errors.QueryCanceled:
        raise ApiError(
            504,
            "counting the export's rows took longer than IIOT_API_EXPORT_TIMEOUT_SECONDS "
            f"({settings.api_export_timeout_seconds} s): narrow the range or the devices",
            code="timeout",
        ) from None
    assert row is not None
    if row["n"] > limit:
        raise ApiError(
            413,
            f"the export holds more than {limit:,} rows (IIOT_API_EXPORT_MAX_ROWS): narrow the "
            "range or the devices, or export a coarser bucket",
            code="too_large",
            details={"max_rows": limit},
        )


def _file_response(
    s: Session, request: Request, query: exports.ExportQuery, fmt: str, name: str
) -> StreamingResponse:
    slots = exports.ExportSlots.of(request.app.state)
    release = slots.take()
    if release is None:
        raise ApiError(
            503,
            f"{slots.size} exports are streaming already, the most at once: retry shortly",
            code="busy",
            headers={"Retry-After": "10"},
        )
    chunks = exports.csv_chunks if fmt == "csv" else exports.parquet_chunks
    settings = request.app.state.settings
    body = exports.stream(
        request.app.state.pool,
        s.tenant(),
        settings.api_export_timeout_seconds,
        lambda conn: chunks(conn, query),
        request_id=s.request_id,
        pool_timeout=settings.api_pool_timeout_seconds,
    )
    return StreamingResponse(
        exports.streamed(body, release),
        media_type=MEDIA_TYPES[fmt],
        headers={
            "Content-Disposition": f'attachment; filename="{name}.{fmt}"',
            "Cache-Control": "no-store",
        },
    )


def _stamp(value: datetime | date) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y%m%dT%H%M%SZ")
    return value.strftime("%Y%m%d")


def _file_name(s: Session, what: str, start: datetime | date, end: datetime | date) -> str:
    # the slug is [a-z0-9-] (registry), so it is safe in the header
    return f"{s.tenant_slug or 'tenant'}-{what}-{_stamp(start)}-{_stamp(end)}"


@router.get(
    "/exports/telemetry",
    summary="Telemetry of a range as a CSV or Parquet file",
    response_class=StreamingResponse,
    responses=FILE_RESPONSES,
)
def export_telemetry(
    s: Viewer,
    request: Request,
    start: Start,
    end: End,
    format: Format = "csv",
    device_id: DeviceIds = None,
    metric: Metrics = None,
    bucket: Annotated[
        Literal["raw", "hour", "day"],
        Query(description="`raw` readings, or the `hour` or `day` rollups (docs/rollups.md)."),
    ] = "raw",
) -> StreamingResponse:
    """Raw readings (`device_id, metric, ts, value`) or rollup rows (`device_id, metric, bucket,
    readings, value_sum, value_min, value_max, value_avg, first_ts, first_value, last_ts,
    last_value, consumption, counter_resets`) of [start, end), at most 366 days and
    IIOT_API_EXPORT_MAX_ROWS rows, in storage order (sort them after loading). Times are UTC."""
    s.tenant()  # a platform key names its tenant
    start, end = time_range(start, end, MAX_SPAN["day"])
    check_selection(s, device_id, metric)
    relation, time_column, columns = SOURCES[bucket]
    selection = SELECTION.format(time=time_column)
    params = {"start": start, "end": end, "devices": device_id, "metrics": metric}
    _count(s, request, relation, selection, params)
    query = exports.ExportQuery(
        f"SELECT {_select_list(columns)} FROM {relation}{selection}", params, columns
    )
    what = "telemetry" if bucket == "raw" else f"telemetry-{bucket}"
    return _file_response(s, request, query, format, _file_name(s, what, start, end))


@router.get(
    "/exports/consumption",
    summary="Daily consumption per device as a CSV or Parquet file (the marts)",
    response_class=StreamingResponse,
    responses=FILE_RESPONSES,
)
def export_consumption(
    s: Viewer,
    request: Request,
    start: Annotated[date, Query(description="First local day, inclusive (YYYY-MM-DD).")],
    end: Annotated[date, Query(description="Last local day, exclusive (YYYY-MM-DD).")],
    format: Format = "csv",
    device_id: DeviceIds = None,
) -> StreamingResponse:
    """Consumption of the cumulative meters per device, unit and local day (the tenant's time
    zone) from the marts (docs/marts.md): `device_id, unit, local_day, consumption, readings,
    hours_with_data, counter_resets`, ordered by day, device and unit."""
    s.tenant()
    if end <= start:
        raise field_error("end", "must be after start")
    if end - start > MAX_SPAN["day"]:
        raise field_error("end", f"the range may span at most {MAX_SPAN['day'].days} days")
    check_selection(s, device_id, None)
    built = s.row("SELECT to_regclass(%s) IS NOT NULL AS built", (CONSUMPTION_MART,))
    if not built or not built["built"]:
        raise ApiError(
            409,
            "the consumption marts are not built yet: they are built nightly after the rollups "
            "(marts_job, docs/marts.md); meanwhile export telemetry with bucket=day",
            code="marts_not_built",
        )
    params = {"start": start, "end": end, "devices": device_id}
    _count(s, request, CONSUMPTION_MART, CONSUMPTION_SELECTION, params)
    query = exports.ExportQuery(
        f"SELECT {_select_list(CONSUMPTION_COLUMNS)} FROM {CONSUMPTION_MART}{CONSUMPTION_SELECTION}"
        " ORDER BY local_day, device_id, unit",
        params,
        CONSUMPTION_COLUMNS,
    )
    return _file_response(s, request, query, format, _file_name(s, "consumption", start, end))
