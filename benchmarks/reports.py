"""Consumption reports of one tenant-month with 1,000 devices: PDF and XLSX generation time, and
the workbook's rows per second against a bare openpyxl write-only loop of the same cells.

A scratch database gets one tenant (America/Sao_Paulo, pt_BR) with 1,000 devices (800 energy,
150 water, 50 gas meters) and their hourly rollups for September and October 2026, loaded
straight into ``telemetry_hourly`` (no MQTT, no raw readings); every seventh device misses one
hour in five, so completeness varies. The marts are built by ``dbt build`` through Dagster, as
in production. Then, in the same run (best of ``IIOT_BENCH_REPORT_REPEAT``, default 3):

- reading the report from the marts (``load_report``);
- the PDF (reportlab: cover and summary, charts, top consumers, the paginated device table);
- the XLSX (openpyxl, write-only, typed and formatted cells, a chart);
- bare: the same cell values appended with ``ws.append`` to a write-only workbook, with no types,
  formats, widths, filters or charts (the floor for any openpyxl export of these cells).

``IIOT_BENCH_REPORT_DEVICES`` sets the number of devices (default 1000).
"""

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory

import dagster as dg
import psycopg
from openpyxl import Workbook

from assets.marts import dbt_resource, marts
from benchmarks.common import scratch_database
from iiot_orchestration import registry
from iiot_orchestration.reports import load_report, parse_period
from iiot_orchestration.reports.pdf import render_pdf
from iiot_orchestration.reports.xlsx import Sheet, build_sheets, count_rows, render_xlsx
from iiot_orchestration.resources import PostgresResource

DEVICES = int(os.environ.get("IIOT_BENCH_REPORT_DEVICES", "1000"))
REPEAT = int(os.environ.get("IIOT_BENCH_REPORT_REPEAT", "3"))
PERIOD = "2026-10"
NOW = datetime(2026, 11, 2, 12, tzinfo=UTC)
TARGET = 0.7

# hourly rollup rows of the cumulative metric of each device, local Sep 1 to Oct 31
LOAD_HOURLY = """
INSERT INTO telemetry_hourly (tenant_id, device_id, metric, bucket, readings, value_sum,
                              value_min, value_max, value_avg, first_ts, first_value, last_ts,
                              last_value, consumption, counter_resets)
SELECT d.tenant_id, d.device_id, m.metric, h, 4, 4 * v, v, v + 3 * c, v + 1.5 * c, h, v,
       h + interval '45 minutes', v + 3 * c, 4 * c, 0
  FROM devices d
  JOIN metric_catalog m ON m.meter_kind = d.meter_kind AND m.cumulative,
       generate_series('2026-09-01 03:00+00'::timestamptz, '2026-11-01 02:00+00', '1 hour') h,
       LATERAL (SELECT 0.05 + (d.device_id % 97) / 40.0 AS c) rate,
       LATERAL (SELECT extract(epoch FROM h - '2026-09-01 03:00+00') / 900 * c AS v) reading
 WHERE d.device_id % 7 <> 0 OR extract(hour FROM h)::int % 5 <> 0
"""

# the days summed from the hours, as telemetry_daily does (the marts' reconciliation test reads it)
LOAD_DAILY = """
INSERT INTO telemetry_daily (tenant_id, device_id, metric, bucket, readings, value_sum,
                             value_min, value_max, value_avg, first_ts, first_value, last_ts,
                             last_value, consumption, counter_resets)
SELECT tenant_id, device_id, metric, date_trunc('day', bucket, 'UTC'), sum(readings),
       sum(value_sum), min(value_min), max(value_max), sum(value_sum) / sum(readings),
       min(first_ts), min(first_value), max(last_ts), max(last_value), sum(consumption), 0
  FROM telemetry_hourly
 GROUP BY 1, 2, 3, 4
"""


def load(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        registry.create_tenant(
            conn,
            slug="bench",
            name="Bench Indústria Ltda",
            plan="enterprise",
            timezone="America/Sao_Paulo",
            locale="pt_BR",
        )
        conn.execute(
            "INSERT INTO devices (tenant_id, mac, name, meter_kind, created_at)"
            " SELECT 1, ('02:00:00:' || lpad(to_hex(i >> 16), 2, '0') || ':'"
            "        || lpad(to_hex((i >> 8) & 255), 2, '0') || ':'"
            "        || lpad(to_hex(i & 255), 2, '0'))::macaddr,"
            "        'Medidor ' || lpad(i::text, 4, '0'),"
            "        CASE WHEN i %% 20 < 16 THEN 'energy' WHEN i %% 20 < 19 THEN 'water'"
            "             ELSE 'gas' END, '2026-08-01'"
            "   FROM generate_series(0, %s - 1) i",
            (DEVICES,),
        )
        conn.execute(LOAD_HOURLY)
        conn.execute(LOAD_DAILY)
        conn.execute("VACUUM ANALYZE telemetry_hourly")
        return conn.execute("SELECT count(*) FROM telemetry_hourly").fetchone()[0]


def build_marts(url: str) -> float:
    started = time.perf_counter()
    result = dg.materialize(
        [marts],
        resources={"dbt": dbt_resource(), "postgres": PostgresResource(database_url=url)},
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
    )
    assert result.success
    return time.perf_counter() - started


def bare(sheets: list[Sheet], path: Path) -> float:
    """The same cell values with ws.append into a write-only workbook, nothing else."""
    started = time.perf_counter()
    wb = Workbook(write_only=True)
    for sheet in sheets:
        ws = wb.create_sheet(sheet.title[:31])
        for values in sheet.preamble:
            ws.append(list(values))
        for index, block in enumerate(sheet.blocks):
            if index:
                ws.append([])
            if block.title:
                ws.append([block.title])
            ws.append([column.header for column in block.columns])
            for values in block.rows:
                ws.append(list(values))
    wb.save(path)
    return time.perf_counter() - started


def timed(func, *args):
    started = time.perf_counter()
    result = func(*args)
    return time.perf_counter() - started, result


def main() -> None:
    with scratch_database() as url, TemporaryDirectory() as scratch:
        folder = Path(scratch)
        print(f"loading the hourly rollups of {DEVICES:,} devices...", flush=True)
        hourly = load(url)
        marts_seconds = build_marts(url)
        with psycopg.connect(url, autocommit=True) as conn:
            period = parse_period(PERIOD)
            reads = [timed(lambda: load_report(conn, "bench", period, now=NOW)) for _ in range(2)]
        read_seconds, report = min(reads, key=lambda pair: pair[0])
        sheets = build_sheets(report)
        rows = count_rows(sheets)
        pdf_runs = [timed(render_pdf, report, folder / "r.pdf") for _ in range(REPEAT)]
        xlsx_runs = [timed(render_xlsx, report, folder / "r.xlsx") for _ in range(REPEAT)]
        bare_runs = [bare(sheets, folder / "bare.xlsx") for _ in range(REPEAT)]
    pdf_seconds, pdf = min(pdf_runs, key=lambda pair: pair[0])
    xlsx_seconds, xlsx = min(xlsx_runs, key=lambda pair: pair[0])
    bare_seconds = min(bare_runs)
    ours, floor = rows / xlsx_seconds, rows / bare_seconds
    print(f"{hourly:,} hourly rollup rows; marts built in {marts_seconds:.1f} s (dbt, once)")
    print(f"{'case':<58}{'seconds':>9}{'rows/s':>10}{'ratio':>8}")
    print(f"{'read the report from the marts':<58}{read_seconds:>9.2f}")
    print(f"{f'PDF, {pdf.pages} pages ({pdf.size / 1024:,.0f} KiB)':<58}{pdf_seconds:>9.2f}")
    print(
        f"{f'bare openpyxl write-only loop, {rows:,} rows (baseline)':<58}"
        f"{bare_seconds:>9.2f}{floor:>10,.0f}{1:>8.2f}"
    )
    print(
        f"{f'XLSX, typed and formatted ({xlsx.size / 1024:,.0f} KiB)':<58}"
        f"{xlsx_seconds:>9.2f}{ours:>10,.0f}{ours / floor:>8.2f}"
    )
    verdict = "met" if ours / floor >= TARGET else "NOT met"
    print(f"XLSX rows per second vs bare: {ours / floor:.2f} x (target >= {TARGET} x: {verdict})")


if __name__ == "__main__":
    main()
