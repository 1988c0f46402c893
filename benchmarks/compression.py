"""Compression of raw telemetry (TimescaleDB mode): bytes per reading of a realistic day before
and after compression, and a tenant's queries through tenant.telemetry on both.

One UTC day of IIOT_BENCH_COMPRESSION_DEVICES (500) energy meters in
IIOT_BENCH_COMPRESSION_TENANTS (10) tenants, each publishing one message a minute at its own
second with energy_kwh (the cumulative register: it rises with the power drawn, 0.01 kWh
resolution), power_w (a daily load curve with noise, 0.1 W) and voltage_v (around 220 V, 0.1 V):
2.16 million readings, landed in time order as the daemon lands them, each message received
0.15 to 0.75 s after its time. Then, in the same run:

- the day's chunk, heap + indexes + TOAST (`chunks_detailed_size`), per reading, uncompressed
  (baseline) and after `iiot_compress_telemetry_chunks` (the asset's function, which calls
  `compress_chunk`; `chunk_compression_stats` gives the same before and after);
- a tenant login (tenant_reader, bound to one tenant) querying through the security_barrier view
  tenant.telemetry: one device's day, and the tenant's day summed per metric, best of
  IIOT_BENCH_COMPRESSION_REPEATS (5), on the uncompressed chunk (baseline) and the compressed one,
  with the same answers.

Skipped, saying why, when the server cannot run the timescale storage mode.
"""

import math
import os
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql

from benchmarks.common import SERVER_URL, scratch_database
from iiot_orchestration import registry
from iiot_orchestration.settings import to_url
from iiot_orchestration.storage import storage_for, timescale_support

DEVICES = int(os.environ.get("IIOT_BENCH_COMPRESSION_DEVICES", "500"))
TENANTS = int(os.environ.get("IIOT_BENCH_COMPRESSION_TENANTS", "10"))
REPEATS = int(os.environ.get("IIOT_BENCH_COMPRESSION_REPEATS", "5"))
METRICS = ("energy_kwh", "power_w", "voltage_v")
DAY = datetime.combine(datetime.now(UTC).date() - timedelta(days=10), datetime.min.time(), UTC)
NEXT_DAY = DAY + timedelta(days=1)

# Per device: mean power P between 500 and 5,000 W on a load curve 1 - 0.4 cos(2 pi i / 1440)
# (low at night), so the register's closed form E(i) = E0 + P (i - 0.4 * 1440 / 2 pi
# sin(2 pi i / 1440)) / 60,000 kWh only rises; voltage follows a slow swing of +-4 V.
LOAD = """
WITH meters AS (
    SELECT tenant_id, device_id, 500 + (device_id * 7919) %% 4500 AS mean_w,
           1000 + (device_id * 104729) %% 90000 AS register_kwh, device_id %% 60 AS second
      FROM devices
), messages AS MATERIALIZED (
    SELECT m.*, i, %(day)s + i * interval '1 minute' + m.second * interval '1 second' AS ts,
           random() AS power_noise, random() AS voltage_noise, random() AS delay
      FROM generate_series(0, 1439) i, meters m
)
INSERT INTO telemetry (tenant_id, device_id, metric, ts, value, received_at)
SELECT tenant_id, device_id, metric, ts,
       CASE metric
         WHEN 'energy_kwh' THEN round((register_kwh + mean_w
              * (i - 0.4 * 1440 / (2 * pi()) * sin(2 * pi() * i / 1440)) / 60000)::numeric, 2)
         WHEN 'power_w' THEN round((mean_w * (1 - 0.4 * cos(2 * pi() * i / 1440))
              * (0.9 + 0.2 * power_noise))::numeric, 1)
         ELSE round((220 + 4 * sin(2 * pi() * (i + device_id) / 1440)
              + 2 * (voltage_noise - 0.5))::numeric, 1)
       END::double precision,
       ts + (0.15 + 0.6 * delay) * interval '1 second'
  FROM messages, unnest(%(metrics)s::text[]) AS metric
 ORDER BY ts, device_id, metric
"""

CHUNK_SIZE = """
SELECT sum(table_bytes), sum(index_bytes), sum(toast_bytes), sum(total_bytes)
  FROM chunks_detailed_size('telemetry')
"""

ONE_DEVICE_DAY = """
SELECT metric, ts, value FROM tenant.telemetry
 WHERE device_id = %s AND ts >= %s AND ts < %s ORDER BY metric, ts
"""

TENANT_DAY_SUM = """
SELECT metric, count(*), sum(value) FROM tenant.telemetry
 WHERE ts >= %s AND ts < %s GROUP BY metric ORDER BY metric
"""


def load(url: str) -> tuple[int, float]:
    """The day's readings; their number and the seconds the load took."""
    with psycopg.connect(url, autocommit=True) as conn:
        for n in range(TENANTS):
            registry.create_tenant(
                conn, slug=f"site-{n:02d}", name=f"Site {n}", plan="enterprise", timezone="UTC"
            )
        conn.execute(
            "INSERT INTO devices (tenant_id, mac, name, meter_kind)"
            " SELECT t.tenant_id, ('02:00:00:' || lpad(to_hex(i >> 16), 2, '0') || ':'"
            "        || lpad(to_hex((i >> 8) & 255), 2, '0') || ':'"
            "        || lpad(to_hex(i & 255), 2, '0'))::macaddr, 'meter ' || i, 'energy'"
            "   FROM generate_series(0, %s - 1) i"
            "   JOIN (SELECT tenant_id, row_number() OVER (ORDER BY tenant_id) - 1 AS n"
            "           FROM tenants) t ON t.n = i %% %s",
            (DEVICES, TENANTS),
        )
        conn.execute("SELECT setseed(0.19)")
        started = time.perf_counter()
        conn.execute(LOAD, {"day": DAY, "metrics": list(METRICS)})
        seconds = time.perf_counter() - started
        conn.execute("VACUUM ANALYZE telemetry")
        return conn.execute("SELECT count(*) FROM telemetry").fetchone()[0], seconds


def chunk_size(url: str) -> tuple[int, int, int, int]:
    """Heap, indexes, TOAST and total bytes of the telemetry chunks."""
    with psycopg.connect(url) as conn:
        return tuple(int(v or 0) for v in conn.execute(CHUNK_SIZE).fetchone())


def compress(url: str) -> tuple[float, int, int]:
    """Compress the day the asset's way; seconds, and the chunk's total bytes before and after
    according to chunk_compression_stats."""
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        chunks = conn.execute(
            "SELECT iiot_compress_telemetry_chunks(%s, 10)", (NEXT_DAY,)
        ).fetchall()
        seconds = time.perf_counter() - started
        assert len(chunks) == 1, chunks
        conn.execute("VACUUM ANALYZE telemetry")
        before, after = conn.execute(
            "SELECT sum(before_compression_total_bytes), sum(after_compression_total_bytes)"
            "  FROM chunk_compression_stats('telemetry')"
        ).fetchone()
        return seconds, int(before), int(after)


def tenant_login(url: str) -> tuple[str, int, int]:
    """A login of the first tenant (tenant_reader, recorded in tenant_logins), its URL, the
    tenant and one of its devices."""
    login = f"bench_tenant_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE tenant_reader").format(sql.Identifier(login))
        )
        tenant_id, device_id = conn.execute(
            "SELECT tenant_id, min(device_id) FROM devices GROUP BY tenant_id"
            " ORDER BY tenant_id LIMIT 1"
        ).fetchone()
        conn.execute(
            "INSERT INTO tenant_logins (login, tenant_id) VALUES (%s, %s)", (login, tenant_id)
        )
    params = psycopg.conninfo.conninfo_to_dict(url)
    params["user"] = login
    return to_url(params), login, device_id


def drop_login(login: str) -> None:
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(login)))


def queries(url: str, device_id: int) -> list[tuple[float, list[tuple]]]:
    """Best seconds of each query as the tenant login, and its rows."""
    found = []
    with psycopg.connect(url) as conn:
        for statement, params in (
            (ONE_DEVICE_DAY, (device_id, DAY, NEXT_DAY)),
            (TENANT_DAY_SUM, (DAY, NEXT_DAY)),
        ):
            best, rows = math.inf, []
            for _ in range(REPEATS):
                started = time.perf_counter()
                rows = conn.execute(statement, params).fetchall()
                best = min(best, time.perf_counter() - started)
                conn.rollback()
            found.append((best, rows))
    return found


def same_rows(a: list[tuple], b: list[tuple]) -> bool:
    """Equal, but for the last digits of float sums taken in another order."""
    return len(a) == len(b) and all(
        len(x) == len(y)
        and all(
            math.isclose(u, v, rel_tol=1e-12) if isinstance(u, float) else u == v
            for u, v in zip(x, y, strict=True)
        )
        for x, y in zip(a, b, strict=True)
    )


def main() -> None:
    with psycopg.connect(SERVER_URL) as conn:
        support = timescale_support(conn)
    if not support.usable:
        print(
            f"skipped: chunk compression needs the timescale storage mode, and the "
            f"{support.reason} (IIOT_BENCH_SERVER_URL names the server)"
        )
        return
    login = ""
    try:
        with scratch_database() as url:
            with psycopg.connect(url) as conn:
                if storage_for(conn).mode != "timescale":
                    print("skipped: the scratch database chose PostgreSQL mode (IIOT_STORAGE?)")
                    return
            print(f"loading {DEVICES * len(METRICS) * 1440:,} readings...", flush=True)
            readings, load_seconds = load(url)
            tenant_url, login, device_id = tenant_login(url)
            before = chunk_size(url)
            plain = queries(tenant_url, device_id)
            seconds, stats_before, stats_after = compress(url)
            after = chunk_size(url)
            packed = queries(tenant_url, device_id)
    finally:
        if login:
            drop_login(login)
    for (_, rows), (_, again) in zip(plain, packed, strict=True):
        assert same_rows(rows, again), "compressed and uncompressed answers differ"
    # the view gave the login its own tenant's readings, all of them
    assert sum(r[1] for r in plain[1][1]) == -(-DEVICES // TENANTS) * len(METRICS) * 1440
    print(
        f"a day of {readings:,} readings ({DEVICES} meters in {TENANTS} tenants, "
        f"{len(METRICS)} metrics a minute), loaded in {load_seconds:.1f} s; "
        f"TimescaleDB {support.version}"
    )
    print(f"{'chunk of the day':<52}{'bytes':>14}{'bytes/reading':>15}{'ratio':>8}")
    print(
        f"{'uncompressed: heap + indexes + TOAST (baseline)':<52}{before[3]:>14,}"
        f"{before[3] / readings:>15.1f}{1:>8.3f}"
    )
    print(f"{'  of which heap':<52}{before[0]:>14,}{before[0] / readings:>15.1f}")
    print(f"{'  of which indexes':<52}{before[1]:>14,}{before[1] / readings:>15.1f}")
    print(
        f"{'compressed in ' + f'{seconds:.1f} s':<52}{after[3]:>14,}"
        f"{after[3] / readings:>15.1f}{after[3] / before[3]:>8.3f}"
    )
    for name, index in (("heap", 0), ("indexes", 1), ("TOAST", 2)):
        print(f"{'  of which ' + name:<52}{after[index]:>14,}{after[index] / readings:>15.1f}")
    print(
        f"{before[3] / after[3]:.1f} x smaller (target >= 10 x); chunk_compression_stats: "
        f"{stats_before:,} -> {stats_after:,} bytes, {stats_before / stats_after:.1f} x"
    )
    print(
        f"{'query as a tenant login through tenant.telemetry':<52}{'plain ms':>10}"
        f"{'compressed ms':>15}{'ratio':>8}"
    )
    names = (
        f"one device's day ({len(plain[0][1]):,} readings)",
        f"the tenant's day summed per metric ({sum(r[1] for r in plain[1][1]):,} readings)",
    )
    for name, (old, _), (new, _) in zip(names, plain, packed, strict=True):
        print(f"{name:<52}{old * 1000:>10.1f}{new * 1000:>15.1f}{new / old:>8.3f}")
