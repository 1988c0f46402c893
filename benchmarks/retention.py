"""Retention of one tenant's day of raw telemetry, against a bare export and a bare DELETE.

One UTC day of readings (IIOT_BENCH_RETENTION_READINGS, 2 million by default: 500 devices x 4
metrics) of a tenant whose retention it fell out of, in a day that another tenant still retains
(so the rows go by key, in batches, not with the partition: the expensive path), then, in the
same run:

- bare export: the day's rows in canonical order streamed into one Parquet file with pyarrow
  (the floor for any archive: one pass out of the database, one write);
- bare delete: `DELETE ... WHERE tenant_id AND ts in the day` in a transaction rolled back (the
  floor for removing the rows, with no archive to check them against);
- the retention run: archive, read back and verify (sha256, row count, content digest), then
  delete by the archived keys in batches of IIOT_RETENTION_BATCH_ROWS, each batch committed
  with its archive record; compared with the two floors together;
- restore of the day from its archive (checksums first, then COPY and insert);
- the whole-day path: the same day once no tenant retains it (the archive read back and
  verified again, the partition or chunk dropped).
"""

import os
import tempfile
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pyarrow.parquet as pq

from benchmarks.common import scratch_database
from iiot_orchestration import archive, registry, retention
from iiot_orchestration.settings import load_settings
from iiot_orchestration.storage import storage_for

READINGS = int(os.environ.get("IIOT_BENCH_RETENTION_READINGS", "2000000"))
METRICS = ("energy_kwh", "power_w", "voltage_v", "current_a")
TODAY = datetime.now(UTC).date()
DAY = TODAY - timedelta(days=5)
RUN_DAY = TODAY - timedelta(days=1)


def load(url: str) -> tuple[int, int]:
    devices = max(1, READINGS // (len(METRICS) * 1000))
    per_series = READINGS // (devices * len(METRICS))
    with psycopg.connect(url, autocommit=True) as conn:
        storage_for(conn).ensure_partitions(conn, DAY, TODAY)
        short = registry.create_tenant(
            conn, slug="bench", name="Bench", plan="enterprise", timezone="UTC", retention_days=2
        )
        keeper = registry.create_tenant(
            conn, slug="keeper", name="Keeper", plan="enterprise", timezone="UTC"
        )
        conn.execute(
            "INSERT INTO devices (tenant_id, mac, name, meter_kind)"
            " SELECT %s, ('02:00:00:' || lpad(to_hex(i >> 16), 2, '0') || ':'"
            "        || lpad(to_hex((i >> 8) & 255), 2, '0') || ':'"
            "        || lpad(to_hex(i & 255), 2, '0'))::macaddr, 'meter ' || i, 'energy'"
            "   FROM generate_series(0, %s - 1) i",
            (short.tenant_id, devices),
        )
        start = datetime.combine(DAY, datetime.min.time(), UTC)
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
            " SELECT %s, d.device_id, m.metric, %s + make_interval(secs => i * %s),"
            "        d.device_id * 1000 + i * 0.25"
            "   FROM generate_series(0, %s - 1) i, devices d, unnest(%s::text[]) m(metric)"
            "  WHERE d.tenant_id = %s ORDER BY i, d.device_id, m.metric",
            (
                short.tenant_id,
                start,
                86_400 / per_series,
                per_series,
                list(METRICS),
                short.tenant_id,
            ),
        )
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
            " VALUES (%s, 999999, 'power_w', %s, 1)",
            (keeper.tenant_id, start),
        )
        conn.execute("VACUUM ANALYZE telemetry")
        rows = conn.execute(
            "SELECT count(*) FROM telemetry WHERE tenant_id = %s", (short.tenant_id,)
        ).fetchone()[0]
        return short.tenant_id, rows


def bare_export(url: str, tenant_id: int, directory: str) -> float:
    started = time.perf_counter()
    with psycopg.connect(url) as conn, conn.cursor(name="bare") as cur:
        cur.itersize = 50_000
        cur.execute(retention.SELECT_ROWS, (tenant_id, *retention.day_bounds(DAY)))
        with pq.ParquetWriter(f"{directory}/bare.parquet", archive.SCHEMA, compression="zstd") as w:
            while rows := cur.fetchmany(50_000):
                w.write_table(retention._to_table(rows))
    return time.perf_counter() - started


def bare_delete(url: str, tenant_id: int) -> float:
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        conn.execute(
            "DELETE FROM telemetry WHERE tenant_id = %s AND ts >= %s AND ts < %s",
            (tenant_id, *retention.day_bounds(DAY)),
        )
        elapsed = time.perf_counter() - started
        conn.rollback()
    return elapsed


def run(url: str, directory: str) -> tuple[float, retention.RetentionRun]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET ROLE platform_rw")
        started = time.perf_counter()
        result = retention.run_retention(
            conn,
            archive.open_store(directory),
            RUN_DAY,
            batch_rows=load_settings().retention_batch_rows,
        )
        return time.perf_counter() - started, result


def restore(url: str, directory: str) -> float:
    """Put the day back, its hold already over, so that the next run may drop it."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET ROLE platform_rw")
        started = time.perf_counter()
        retention.restore(
            conn, archive.open_store(directory), "bench", DAY, DAY, hold_days=0, today=DAY
        )
        return time.perf_counter() - started


def main() -> None:
    with scratch_database() as url, tempfile.TemporaryDirectory() as directory:
        print(f"loading {READINGS:,} readings...", flush=True)
        tenant_id, rows = load(url)
        bare_export(url, tenant_id, directory)  # warm the cache
        export = min(bare_export(url, tenant_id, directory) for _ in range(2))
        delete = min(bare_delete(url, tenant_id) for _ in range(2))
        seconds, result = run(url, f"{directory}/archive")
        assert result.removed_rows == rows, result.summary()
        back = restore(url, f"{directory}/archive")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("UPDATE tenants SET retention_days = 2 WHERE slug = 'keeper'")
        whole, dropped = run(url, f"{directory}/archive")
        assert DAY in dropped.partitions_dropped, dropped.summary()
        size = sum(r.bytes for r in _records(url))
    floor = export + delete
    print(f"{'case':<58}{'seconds':>9}{'ratio':>8}")
    print(f"{'bare export to Parquet, ' + f'{rows:,} readings':<58}{export:>9.2f}")
    print(f"{'bare DELETE of the same rows (rolled back)':<58}{delete:>9.2f}")
    print(f"{'bare export + bare DELETE (baseline)':<58}{floor:>9.2f}{1:>8.2f}")
    print(
        f"{'retention: archive, verify, delete by key in batches':<58}{seconds:>9.2f}"
        f"{seconds / floor:>8.2f}"
    )
    print(f"{'restore the day from its archive':<58}{back:>9.2f}{back / floor:>8.2f}")
    print(f"{'verify the archive again, drop the whole day':<58}{whole:>9.2f}{whole / floor:>8.2f}")
    print(f"archive: {size:,} bytes, {size / max(rows, 1):.1f} bytes per reading")


def _records(url: str) -> list[retention.ArchiveRecord]:
    with psycopg.connect(url, autocommit=True) as conn:
        return retention.records(conn)
