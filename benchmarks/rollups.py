"""Rollups over one day of raw telemetry, against a bare GROUP BY over the same rows.

One UTC day of 5 million readings (1,000 devices x 4 metrics, one reading every 69 s, one
cumulative metric per device) in a scratch database, stored in time order as the ingest daemon
lands them (not grouped by device, which would flatter any per-series pass), then, in the same
run:

- bare: `GROUP BY` tenant, device, metric and hour with count, sum, min, max and avg (the floor
  for any hourly rollup: one pass over the rows, no first/last, no consumption);
- the day materialized through Dagster (`telemetry_hourly` then `telemetry_daily`);
- a late-data run that touches one dirty hour, against the full day: before each such run,
  late readings land in that hour for 50 devices (all four metrics, 200 readings, each a copy
  of a stored reading a few milliseconds later) through the ingest daemon's writer, which marks
  the hour and the 50 devices dirty, as a late batch from a few gateways does; the run is the
  one the late-data sensor requests (tagged with the hour and `iiot/late_day`), so it rewrites
  those devices' series of the hour, corrects the buckets after them and re-sums their days.

The storage mode is the server's (`IIOT_BENCH_SERVER_URL`, migrated with `auto`): TimescaleDB
mode on a server with the extension preloaded, PostgreSQL mode otherwise; the first line says
which. `IIOT_BENCH_ROLLUP_DEVICES` (default 1,000) shrinks the day for a quick run.
"""

import os
import time
from datetime import UTC, date, datetime, timedelta

import dagster as dg
import psycopg

from assets.rollups import HOURS_TAG, LATE_DAY_TAG, telemetry_daily, telemetry_hourly
from benchmarks.common import scratch_database
from iiot_orchestration import registry
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.rollups import session_settings
from iiot_orchestration.settings import load_settings
from iiot_orchestration.storage import storage_for
from ingest_daemon.validation import Reading
from ingest_daemon.writer import BatchWriter, Delivery

DEVICES = int(os.environ.get("IIOT_BENCH_ROLLUP_DEVICES", "1000"))
READINGS_PER_SERIES = int(os.environ.get("IIOT_BENCH_ROLLUP_READINGS", "1250"))
METRICS = ("energy_kwh", "power_w", "voltage_v", "current_a")
DAY = datetime(2026, 11, 20, tzinfo=UTC)

BARE = """
SELECT tenant_id, device_id, metric, date_trunc('hour', ts, 'UTC'), count(*), sum(value),
       min(value), max(value), avg(value)
  FROM telemetry WHERE ts >= %s AND ts < %s GROUP BY 1, 2, 3, 4
"""


def load(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        registry.create_tenant(conn, slug="bench", name="Bench", plan="enterprise", timezone="UTC")
        conn.execute(
            "INSERT INTO devices (tenant_id, mac, name, meter_kind)"
            " SELECT 1, ('02:00:00:' || lpad(to_hex(i >> 16), 2, '0') || ':'"
            "        || lpad(to_hex((i >> 8) & 255), 2, '0') || ':'"
            "        || lpad(to_hex(i & 255), 2, '0'))::macaddr, 'meter ' || i, 'energy'"
            "   FROM generate_series(0, %s - 1) i",
            (DEVICES,),
        )
        storage_for(conn).ensure_partitions(conn, date(2026, 11, 19), date(2026, 11, 20))
        step = 86_400 / READINGS_PER_SERIES
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
            " SELECT 1, d.device_id, m.metric, %s + make_interval(secs => i * %s),"
            "        CASE WHEN m.metric = 'energy_kwh' THEN d.device_id * 1000 + i * 0.25"
            "             ELSE 100 + 50 * sin(i + d.device_id) END"
            "   FROM generate_series(0, %s - 1) i, devices d, unnest(%s::text[]) m(metric)"
            "  ORDER BY i, d.device_id, m.metric",
            (DAY, step, READINGS_PER_SERIES, list(METRICS)),
        )
        conn.execute("VACUUM ANALYZE telemetry")
        return conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]


def bare(url: str) -> float:
    with (
        psycopg.connect(url) as conn,
        conn.transaction(),
    ):
        # the rollup's session settings (work_mem, no JIT), so that only the SQL differs
        session_settings(conn, load_settings().rollup_work_mem)
        started = time.perf_counter()
        conn.execute(BARE, (DAY, DAY + timedelta(days=1))).fetchall()
        return time.perf_counter() - started


def materialize(
    url: str, instance: dg.DagsterInstance, tags: dict[str, str] | None = None
) -> float:
    """One run of both assets for the day, on a long-lived instance as a deployment has (an
    ephemeral instance per run would add its own set-up, about 0.08 s, to every run)."""
    started = time.perf_counter()
    result = dg.materialize(
        [telemetry_hourly, telemetry_daily],
        partition_key=f"{DAY:%Y-%m-%d}",
        instance=instance,
        tags=tags or {},
        resources={"postgres": PostgresResource(database_url=url)},
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
    )
    assert result.success
    return time.perf_counter() - started


LATE_HOUR = 5
LATE_DEVICES = 50


def land_late_readings(url: str, round_: int) -> None:
    """Late readings in hour LATE_HOUR for LATE_DEVICES devices: each series' first reading of
    the hour again, ``round_ + 1`` milliseconds later (so that every round adds new ones),
    landed by the ingest daemon's writer, which marks their (tenant, hour) and devices dirty."""
    hour = DAY + timedelta(hours=LATE_HOUR)
    now = DAY + timedelta(days=1)
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT DISTINCT ON (device_id, metric) tenant_id, device_id, metric,"
            "       ts + make_interval(secs => %s), value"
            "   FROM telemetry WHERE ts >= %s AND ts < %s AND device_id <= %s"
            "  ORDER BY device_id, metric, ts",
            ((round_ + 1) / 1000, hour, hour + timedelta(hours=1), LATE_DEVICES),
        ).fetchall()
        conn.commit()
        BatchWriter(conn).write(
            [(Reading(*row), Delivery(now, n)) for n, row in enumerate(rows)], [], now=now
        )


def late_run(url: str, instance: dg.DagsterInstance, round_: int) -> float:
    """The run the late-data sensor requests for the dirty hour."""
    land_late_readings(url, round_)
    tags = {HOURS_TAG: f"{DAY:%Y-%m-%d}T{LATE_HOUR:02d}", LATE_DAY_TAG: f"{DAY:%Y-%m-%d}"}
    return materialize(url, instance, tags)


def main() -> None:
    with scratch_database() as url:
        with psycopg.connect(url) as conn:
            mode = storage_for(conn).mode
        readings = DEVICES * len(METRICS) * READINGS_PER_SERIES
        print(f"loading {readings:,} readings ({mode} mode)...", flush=True)
        rows = load(url)
        # warm the cache, then the best of two (three for the short late-data run) for each case
        bare(url)
        floor = min(bare(url) for _ in range(2))
        with dg.DagsterInstance.ephemeral() as instance:
            day = min(materialize(url, instance) for _ in range(2))
            hour = min(late_run(url, instance, n) for n in range(3))
    print(f"{'case':<52}{'seconds':>9}{'ratio':>8}")
    print(
        f"{'bare GROUP BY by hour, ' + f'{rows:,} readings (baseline)':<52}{floor:>9.2f}{1:>8.2f}"
    )
    print(f"{'materialize the day (hourly + daily, Dagster)':<52}{day:>9.3f}{day / floor:>8.3f}")
    print(f"{'late data: one dirty hour, vs the full day':<52}{hour:>9.3f}{hour / day:>8.3f}")
