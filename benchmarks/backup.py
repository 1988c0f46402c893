"""A restore drill's RTO against a bare `pg_restore` of the same dump, in the same run.

A scratch database with 2 million readings (500 devices of 4 metrics over a day; the rollups
of that day; a registry of 50 tenants) is backed up once. Then, best of two each:

- bare: `CREATE DATABASE` and `pg_restore --jobs=2` of the dump, nothing else (the floor of any
  restore);
- the drill (`run_drill`, two pg_restore jobs): sha256 of the dump, the same restore, then the
  verification (row counts of every table, fingerprints of the registry, billing, audit and
  rollup tables, the smoke queries), as RTO.

Target: the drill's verification adds no more than 30 % (ratio <= 1.30).
"""

import os
import subprocess
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg import sql

from benchmarks.common import SERVER_URL, scratch_database
from iiot_orchestration import backups, registry
from iiot_orchestration.storage import storage_for

READINGS = int(os.environ.get("IIOT_BENCH_BACKUP_READINGS", "2000000"))
DEVICES = 500
METRICS = ("energy_kwh", "power_w", "voltage_v", "current_a")
DAY = datetime(2026, 11, 20, tzinfo=UTC)
TARGETS = {"rpo_hours": (("pro", 26),), "rto_minutes": (("pro", 240),)}


def load(url: str, readings: int = READINGS) -> int:
    per_series = max(1, readings // (DEVICES * len(METRICS)))
    with psycopg.connect(url, autocommit=True) as conn:
        for n in range(50):
            registry.create_tenant(
                conn, slug=f"bench-{n}", name=f"Bench {n}", plan="pro", timezone="UTC"
            )
        conn.execute(
            "INSERT INTO devices (tenant_id, mac, name, meter_kind)"
            " SELECT 1 + i %% 50, ('02:00:00:' || lpad(to_hex(i >> 16), 2, '0') || ':'"
            "        || lpad(to_hex((i >> 8) & 255), 2, '0') || ':'"
            "        || lpad(to_hex(i & 255), 2, '0'))::macaddr, 'meter ' || i, 'energy'"
            "   FROM generate_series(0, %s - 1) i",
            (DEVICES,),
        )
        storage_for(conn).ensure_partitions(conn, DAY.date(), DAY.date())
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
            " SELECT d.tenant_id, d.device_id, m.metric,"
            "        %s + make_interval(secs => i * 86400.0 / %s), d.device_id * 1000 + i * 0.25"
            "   FROM generate_series(0, %s - 1) i, devices d, unnest(%s::text[]) m(metric)"
            "  ORDER BY i, d.device_id, m.metric",
            (DAY, per_series, per_series, list(METRICS)),
        )
        for table, width in (("telemetry_hourly", "hour"), ("telemetry_daily", "day")):
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (tenant_id, device_id, metric, bucket, readings, value_sum,"
                    " value_min, value_max, value_avg, first_ts, first_value, last_ts, last_value)"
                    " SELECT tenant_id, device_id, metric, date_trunc({}, ts, 'UTC'), count(*),"
                    "        sum(value), min(value), max(value), avg(value), min(ts), min(value),"
                    "        max(ts), max(value)"
                    "   FROM telemetry GROUP BY 1, 2, 3, 4"
                ).format(sql.Identifier(table), sql.Literal(width))
            )
        conn.execute("VACUUM ANALYZE")
        return conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]


def bare_restore(backup: backups.Backup, client: backups.Client) -> float:
    name = f"iiot_bench_restore_{uuid.uuid4().hex[:8]}"
    conninfo, env = backups.libpq_target(SERVER_URL, name)
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        started = time.perf_counter()
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
        try:
            subprocess.run(
                [
                    str(client.pg_restore),
                    "--exit-on-error",
                    "--jobs=2",
                    "--dbname",
                    conninfo,
                    str(backup.dump_path),
                ],
                check=True,
                env=env,
                capture_output=True,
            )
            return time.perf_counter() - started
        finally:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def main() -> None:
    with scratch_database() as url, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"loading {READINGS:,} readings...", flush=True)
        rows = load(url)
        with psycopg.connect(url) as conn:
            major, server = backups.server_major(conn)
        client = backups.choose_client(backups.discover_clients(), major, needed_for=server)
        started = time.perf_counter()
        backup = backups.run_backup(url, root, keep_daily=7, keep_weekly=0, client=client).backup
        dumped = time.perf_counter() - started
        bare = min(bare_restore(backup, client) for _ in range(2))
        drills = [backups.run_drill(url, root, client=client, **TARGETS) for _ in range(2)]
        assert all(d.passed for d in drills), [d.error for d in drills]
        best = min(drills, key=lambda d: d.rto)
    rto = best.rto.total_seconds()
    print(
        f"{rows:,} readings, dump {backup.manifest.bytes / 2**20:,.1f} MiB in {dumped:.2f} s "
        f"(pg_dump with the manifest's counts and fingerprints), client {client.label}"
    )
    print(f"{'case':<52}{'seconds':>9}{'ratio':>8}")
    print(f"{'bare CREATE DATABASE + pg_restore -j2 (baseline)':<52}{bare:>9.2f}{1:>8.2f}")
    print(f"{'drill RTO: sha256 + restore + verification':<52}{rto:>9.2f}{rto / bare:>8.2f}")
    for label, seconds in (
        ("  of which sha256 of the dump", best.checksum_s),
        ("  of which restore", best.restore_s),
        ("  of which verification", best.verify_s),
    ):
        print(f"{label:<52}{seconds:>9.2f}{seconds / bare:>8.2f}")
    print(f"target: ratio <= 1.30 -> {'met' if rto / bare <= 1.30 else 'NOT met'}")
