"""Exports over the tenant API: telemetry and consumption as CSV and Parquet, streamed from
PostgreSQL in constant memory, against a real `iiot api` (uvicorn); row and time limits; one
tenant's export never holds another's rows."""

from __future__ import annotations

import csv
import io
import threading
import time
from contextlib import ExitStack
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from iiot_orchestration.api import exports
from iiot_orchestration.api.context import make_pool
from tests.api_helpers import SEED_START, assert_envelope, running_api, seed_tenant

# the fixtures `seeded` and `server`: the telemetry tests' two tenants, in a database of this module
from tests.test_api_telemetry import db_rows, seeded_fixture, server_fixture  # noqa: F401

RANGE = {"start": "2026-11-01T00:00:00Z", "end": "2026-11-04T00:00:00Z"}
BOUNDS = (RANGE["start"], RANGE["end"])
RAW = "SELECT device_id, metric, ts, value FROM telemetry WHERE tenant_id = %s"
ROLLUP_COLUMNS = (
    "device_id, metric, bucket, readings, value_sum, value_min, value_max, value_avg,"
    " first_ts, first_value, last_ts, last_value, consumption, counter_resets"
)
CONSUMPTION_MART = """
CREATE TABLE marts.consumption_daily AS
SELECT h.tenant_id, h.device_id, m.unit, (h.bucket AT TIME ZONE t.timezone)::date AS local_day,
       t.timezone, sum(h.consumption) AS consumption, sum(h.readings) AS readings,
       count(*) AS hours_with_data, sum(h.counter_resets) AS counter_resets
  FROM telemetry_hourly h
  JOIN metric_catalog m ON m.metric = h.metric AND m.cumulative
  JOIN tenants t USING (tenant_id)
 GROUP BY 1, 2, 3, 4, 5;
CREATE VIEW tenant.consumption_daily WITH (security_barrier) AS
SELECT * FROM marts.consumption_daily WHERE tenant_id = (SELECT iiot_current_tenant());
GRANT SELECT ON tenant.consumption_daily TO tenant_reader, app_rw;
"""


def csv_rows(response) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(response.text)))


def parsed(value: str, kind: str):
    if value == "":
        return None
    convert = {
        "int": int,
        "float": float,
        "str": str,
        "ts": datetime.fromisoformat,
        "date": date.fromisoformat,
    }
    return convert[kind](value)


def typed(rows: list[dict[str, str]], kinds: tuple[str, ...]) -> list[tuple]:
    """CSV rows as tuples of Python values, ``kinds`` naming each column's type."""
    return [
        tuple(parsed(value, kind) for value, kind in zip(row.values(), kinds, strict=True))
        for row in rows
    ]


def test_a_csv_export_holds_the_tenants_readings(server, seeded):
    acme = seeded.acme
    with server.client(acme.keys["viewer"]) as client:
        response = client.get("/api/v1/exports/telemetry", params=RANGE)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"] == (
        'attachment; filename="acme-telemetry-20261101T000000Z-20261104T000000Z.csv"'
    )
    rows = csv_rows(response)
    assert list(rows[0]) == ["device_id", "metric", "ts", "value"]
    got = sorted(typed(rows, ("int", "str", "ts", "float")))
    expected = db_rows(
        seeded.url, RAW + " AND ts >= %s AND ts < %s ORDER BY 1, 2, 3", (acme.tenant_id, *BOUNDS)
    )
    assert len(expected) == 2 * 30 * 4
    assert got == expected


def test_a_parquet_export_reads_back_equal(server, seeded):
    acme = seeded.acme
    params = {**RANGE, "format": "parquet", "device_id": acme.devices[1]}
    with server.client(acme.keys["viewer"]) as client:
        response = client.get("/api/v1/exports/telemetry", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/vnd.apache.parquet"
    assert response.headers["content-disposition"].endswith('.parquet"')
    frame = pd.read_parquet(io.BytesIO(response.content))
    assert list(frame.columns) == ["device_id", "metric", "ts", "value"]
    assert str(frame["ts"].dtype) == "datetime64[us, UTC]"
    frame = frame.sort_values(["device_id", "metric", "ts"])
    got = [
        (int(d), m, ts.to_pydatetime(), float(v)) for d, m, ts, v in frame.itertuples(index=False)
    ]
    expected = db_rows(
        seeded.url,
        RAW + " AND device_id = %s AND ts >= %s AND ts < %s ORDER BY 1, 2, 3",
        (acme.tenant_id, acme.devices[1], *BOUNDS),
    )
    assert got == expected


@pytest.mark.parametrize(("bucket", "table"), [("hour", "hourly"), ("day", "daily")])
def test_rollups_export_in_both_formats(server, seeded, bucket, table):
    acme = seeded.acme
    expected = db_rows(
        seeded.url,
        f"SELECT {ROLLUP_COLUMNS} FROM telemetry_{table} WHERE tenant_id = %s ORDER BY 1, 2, 3",
        (acme.tenant_id,),
    )
    assert expected
    columns = ROLLUP_COLUMNS.replace(" ", "").split(",")
    with server.client(acme.keys["viewer"]) as client:
        got_csv = client.get("/api/v1/exports/telemetry", params={**RANGE, "bucket": bucket})
        got_parquet = client.get(
            "/api/v1/exports/telemetry", params={**RANGE, "bucket": bucket, "format": "parquet"}
        )
    assert f"telemetry-{bucket}-" in got_csv.headers["content-disposition"]
    kinds = (
        "int",
        "str",
        "ts",
        "int",
        *["float"] * 4,
        "ts",
        "float",
        "ts",
        "float",
        "float",
        "int",
    )
    rows = csv_rows(got_csv)
    assert list(rows[0]) == columns
    from_csv = sorted(typed(rows, kinds))
    assert from_csv == expected
    table_read = pq.read_table(io.BytesIO(got_parquet.content))
    assert table_read.column_names == columns
    from_parquet = sorted(tuple(r.values()) for r in table_read.to_pylist())
    assert from_parquet == expected


def test_one_tenants_export_never_holds_anothers_rows(server, seeded):
    acme, globex = seeded.acme, seeded.globex
    with server.client(acme.keys["viewer"]) as client:
        for fmt in ("csv", "parquet"):
            response = client.get(
                "/api/v1/exports/telemetry",
                params={**RANGE, "format": fmt, "device_id": globex.devices[0]},
            )
            assert_envelope(response, 404, "not_found")
        mine = csv_rows(client.get("/api/v1/exports/telemetry", params=RANGE))
        hourly = client.get(
            "/api/v1/exports/telemetry", params={**RANGE, "bucket": "hour", "format": "parquet"}
        )
    assert {int(r["device_id"]) for r in mine} == set(acme.devices)
    hourly_devices = set(pq.read_table(io.BytesIO(hourly.content)).column("device_id").to_pylist())
    assert hourly_devices == set(acme.devices)
    with server.client(globex.keys["viewer"]) as client:
        theirs = csv_rows(client.get("/api/v1/exports/telemetry", params=RANGE))
    assert {int(r["device_id"]) for r in theirs} == set(globex.devices)
    assert len(theirs) == len(mine)


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("telemetry", {"start": "2026-11-03", "end": "2026-11-01"}, "query.end"),
        ("telemetry", {"start": "2025-01-01", "end": "2026-11-01"}, "query.end"),
        ("telemetry", {**RANGE, "format": "xlsx"}, "query.format"),
        ("telemetry", {**RANGE, "bucket": "auto"}, "query.bucket"),
        ("telemetry", {**RANGE, "device_id": "-1"}, "query.device_id"),
        ("telemetry", {**RANGE, "metric": "x' OR '1'='1"}, "query.metric"),
        ("telemetry", {"start": "2026-11-01", "end": "\x00"}, "query.end"),
        ("consumption", {"start": "2026-11-03", "end": "2026-11-03"}, "query.end"),
        ("consumption", {"start": "2026-11-01T05:00:00Z", "end": "2026-11-03"}, "query.start"),
        ("consumption", {"start": "2024-01-01", "end": "2026-11-03"}, "query.end"),
    ],
)
def test_bad_export_parameters_are_422(server, seeded, path, params, field):
    with server.client(seeded.acme.keys["viewer"]) as client:
        response = client.get(f"/api/v1/exports/{path}", params=params)
    error = assert_envelope(response, 422, "validation_error")
    assert error["details"][0]["field"].startswith(field)


def test_exports_need_a_key_and_a_viewer_suffices(server, seeded):
    with server.client() as client:
        assert_envelope(
            client.get("/api/v1/exports/telemetry", params=RANGE), 401, "unauthenticated"
        )
    for role in ("viewer", "editor", "admin"):
        with server.client(seeded.acme.keys[role]) as client:
            assert client.get("/api/v1/exports/telemetry", params=RANGE).status_code == 200


def test_consumption_comes_from_the_marts_once_built(server, seeded):
    acme = seeded.acme
    params = {"start": "2026-11-01", "end": "2026-11-05"}
    with server.client(acme.keys["viewer"]) as client:
        error = assert_envelope(
            client.get("/api/v1/exports/consumption", params=params), 409, "marts_not_built"
        )
        assert "marts_job" in error["message"]
        with psycopg.connect(seeded.url) as conn:
            conn.execute(CONSUMPTION_MART)
        as_csv = client.get("/api/v1/exports/consumption", params=params)
        as_parquet = client.get(
            "/api/v1/exports/consumption", params={**params, "format": "parquet"}
        )
        theirs = client.get(
            "/api/v1/exports/consumption", params={**params, "device_id": seeded.globex.devices}
        )
    assert_envelope(theirs, 404, "not_found")
    assert as_csv.headers["content-disposition"] == (
        'attachment; filename="acme-consumption-20261101-20261105.csv"'
    )
    expected = db_rows(
        seeded.url,
        "SELECT device_id, unit, local_day, consumption, readings, hours_with_data,"
        "       counter_resets FROM marts.consumption_daily WHERE tenant_id = %s"
        " ORDER BY local_day, device_id, unit",
        (acme.tenant_id,),
    )
    # São Paulo is UTC-3: the readings from 2026-11-02 00:00 UTC start on local 2026-11-01
    assert [row[2] for row in expected] == [date(2026, 11, d) for d in (1, 1, 2, 2, 3, 3)]
    assert typed(csv_rows(as_csv), ("int", "str", "date", "float", "int", "int", "int")) == expected
    from_parquet = [
        tuple(r.values()) for r in pq.read_table(io.BytesIO(as_parquet.content)).to_pylist()
    ]
    assert from_parquet == expected


def test_exports_over_the_row_or_time_limit_are_refused(seeded, tmp_path):
    acme = seeded.acme
    allowed = 2 * 24 * 4  # acme's readings of 2026-11-02, exactly
    limited = running_api(
        seeded.url,
        tmp_path,
        IIOT_API_EXPORT_MAX_ROWS=str(allowed),
        IIOT_API_EXPORT_TIMEOUT_SECONDS="3",
    )
    with limited as server, server.client(acme.keys["viewer"]) as client:
        for fmt in ("csv", "parquet"):
            response = client.get("/api/v1/exports/telemetry", params={**RANGE, "format": fmt})
            error = assert_envelope(response, 413, "too_large")
            assert "IIOT_API_EXPORT_MAX_ROWS" in error["message"]
            assert error["details"] == {"max_rows": allowed}
        one_day = client.get(
            "/api/v1/exports/telemetry", params={"start": "2026-11-02", "end": "2026-11-03"}
        )
        hourly = client.get("/api/v1/exports/telemetry", params={**RANGE, "bucket": "hour"})
        # the readings locked away (the partitions or chunks too, in either storage mode):
        # counting them waits, until the time limit
        with psycopg.connect(seeded.url) as locker:
            locker.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")
            stuck = client.get(
                "/api/v1/exports/telemetry", params={"start": "2026-11-03", "end": "2026-11-04"}
            )
    assert one_day.status_code == 200
    assert len(csv_rows(one_day)) == allowed
    assert hourly.status_code == 200
    error = assert_envelope(stuck, 504, "timeout")
    assert "IIOT_API_EXPORT_TIMEOUT_SECONDS (3 s)" in error["message"]


def test_an_export_that_overruns_its_time_is_cut(seeded):
    """A deadline between chunks, and statement_timeout within one (the COPY is one statement):
    either way the export raises, so the response is cut, never completed."""
    pool = make_pool(seeded.url, size=2)
    pool.open(wait=True)
    try:

        def slow(conn):
            yield b"device_id\n"
            time.sleep(0.3)
            yield b"1\n"

        def sleeping(conn):
            conn.execute("SELECT pg_sleep(2)")
            yield b"never"

        def tenant_of(conn):
            yield conn.execute("SELECT current_setting('iiot.tenant_id')").fetchone()[0].encode()

        for chunks in (slow, sleeping):
            with pytest.raises(exports.ExportAborted, match=r"longer than 0\.2 s"):
                list(exports.stream(pool, seeded.acme.tenant_id, 0.2, chunks))
        assert list(exports.stream(pool, 7, 5, tenant_of)) == [b"7"]
    finally:
        pool.close()


@pytest.mark.parametrize("rows", [0, 1, exports.FETCH_ROWS, exports.ROW_GROUP_ROWS + 1])
def test_parquet_row_groups_hold_every_row(seeded, rows):
    pool = make_pool(seeded.url, size=1)
    pool.open(wait=True)
    query = exports.ExportQuery(
        "SELECT n::integer AS n FROM generate_series(1, %(rows)s) n",
        {"rows": rows},
        (("n", pa.int32()),),
    )
    try:
        data = b"".join(
            exports.stream(pool, 1, 60, lambda conn: exports.parquet_chunks(conn, query))
        )
    finally:
        pool.close()
    read = pq.ParquetFile(io.BytesIO(data))
    assert read.read().column("n").to_pylist() == list(range(1, rows + 1))
    groups = -(-rows // exports.ROW_GROUP_ROWS)
    assert read.metadata.num_row_groups == groups


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class PeakRss:
    """The highest resident set size of a process, sampled every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, rss_kib(pid), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_kib(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def held_while_others_wait(client, params: dict, device: int) -> None:
    """Half the pool's connections may stream exports at once (4 of 8): a fifth export is told to
    retry, other requests still find connections; when the clients go away mid-file, their
    exports' COPYs are cancelled and the slots free again."""
    export = "/api/v1/exports/telemetry"
    with ExitStack() as stack:
        held = [stack.enter_context(client.stream("GET", export, params=params)) for _ in range(4)]
        assert [response.status_code for response in held] == [200] * 4
        busy = client.get(export, params=params)
        error = assert_envelope(busy, 503, "busy")
        assert "4 exports" in error["message"]
        assert busy.headers["retry-after"] == "10"
        assert client.get("/api/v1/me").status_code == 200
    deadline = time.monotonic() + 60
    while client.get(export, params={**params, "device_id": device}).status_code == 503:
        assert time.monotonic() < deadline, "the exports' slots were not freed"
        time.sleep(0.2)


def test_a_million_readings_stream_in_constant_memory(database_url, tmp_path):
    with psycopg.connect(database_url) as conn:
        bulk = seed_tenant(conn, "bulk", devices=100, hours=1)
        start = datetime(2026, 10, 1, tzinfo=UTC)
        conn.execute(
            "SELECT iiot_ensure_telemetry_partitions(%s::date, %s::date + 8)", (start, start)
        )
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
            " SELECT %s, d, 'energy_kwh', %s + make_interval(mins => n), n * 0.01"
            "   FROM unnest(%s::int[]) d, generate_series(0, 9999) n",
            (bulk.tenant_id, start, bulk.devices),
        )
        conn.commit()
    params = {"start": start.isoformat(), "end": (start + timedelta(days=7)).isoformat()}
    with (
        running_api(database_url, tmp_path) as server,
        server.client(bulk.keys["viewer"]) as client,
    ):
        for fmt in ("csv", "parquet"):  # warm up: first use of pyarrow, the pool, the plans
            small = client.get(
                "/api/v1/exports/telemetry",
                params={"start": SEED_START.isoformat(), "end": "2026-11-03", "format": fmt},
            )
            assert small.status_code == 200
        before = rss_kib(server.process.pid)
        lines = 0
        as_csv = client.stream("GET", "/api/v1/exports/telemetry", params=params)
        with PeakRss(server.process.pid) as csv_peak, as_csv as response:
            assert response.status_code == 200
            for chunk in response.iter_raw():
                lines += chunk.count(b"\n")
        parquet = tmp_path / "export.parquet"
        as_parquet = client.stream(
            "GET", "/api/v1/exports/telemetry", params={**params, "format": "parquet"}
        )
        with PeakRss(server.process.pid) as parquet_peak, as_parquet as response:
            assert response.status_code == 200
            with parquet.open("wb") as out:
                for chunk in response.iter_raw():
                    out.write(chunk)
        held_while_others_wait(client, params, bulk.devices[0])
    assert lines == 1 + 1_000_000
    assert pq.ParquetFile(parquet).metadata.num_rows == 1_000_000
    for peak in (csv_peak.peak, parquet_peak.peak):
        grown_mib = (peak - before) / 1024
        assert grown_mib < 100, f"the server grew by {grown_mib:.0f} MiB"
