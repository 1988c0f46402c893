"""Nightly billing of 1,000 tenants from the rollups, against the same usage counted straight
from the raw readings, in the same run.

A scratch database gets 1,000 tenants (America/Sao_Paulo; half starter, four in ten pro, one in
ten enterprise; billing cycle day 1) with 50 devices each, and one month of one cumulative
metric (``energy_kwh``) per device: 30 local days from 2026-10-01, 24 readings a device and
day, spread over the hour by device, stored in time order as the ingest daemon lands them
(``received_at = ts``); each device is silent one day in twenty, so active devices and
readings differ between tenants and days. ``ingest_usage`` (per tenant, device and UTC hour)
and ``telemetry_daily`` (per tenant, device, metric and UTC day) are derived from the raw rows
with ``GROUP BY``, as the ingest daemon and the rollups derive them (``ingest_usage``'s
triggers keep its tenant-hour and device-day summaries as they do for the daemon's batches,
migration 0018), and the usage of the
month's earlier days is recorded by ``billing.record_usage_many``, night by night, as the
earlier nights did. Then, best of two for each:

- subject, the nightly run from the rollups: ``billing.bill_night`` for every tenant (the bulk
  path of the ``billing_nightly`` asset): the usage of the last local day for all tenants
  (bytes per reading measured once), then each tenant's month-to-date draft (``bill_many``:
  computed and stored with its lines and event, exactly the rows ``billing.bill`` writes), on
  one connection, as one process doing the night's work. Dagster's per-run overhead, the
  reconciliation against raw readings and the PDF/XLSX exports are not included;
- baseline, the same usage straight from the raw readings: one set-based statement over
  ``telemetry`` only (no rollup, no ``ingest_usage``) giving, for every tenant, the readings
  received on the last local day, the devices active that day, the readings of the storage
  estimate (received over the tenant's retention window ending that day, docs/billing.md), and
  the month-to-date readings of the draft.

Why the baseline is fair: it is one parallel pass over the raw rows (the stored readings need
every retained row anyway, so the day and month counts ride along as ``FILTER`` clauses), with
every per-tenant bound (time zone, retention) computed once per tenant rather than per row,
active devices counted from a per-device partial aggregate instead of ``count(DISTINCT)``, the
rollup's ``work_mem`` and no JIT. It computes only the numbers, writes nothing, and stores no
invoice, while the subject does all of that. Its bounds follow the platform's rules exactly, so
the numbers must agree and are checked: readings, active devices and stored readings by the
UTC hour a reading was received (hours belong to the local day they start in), the stored
readings over the retention_days local days ending with the last day.

The default of 24 readings a device and day is the smallest plausible rate and the hardest
case for the subject (``ingest_usage`` then has one row per reading); energy meters commonly
report every 15 minutes (96 a day), where the raw table is four times larger and the rollups
are not: both rates are measured in docs/performance.md.

Sizes: ``IIOT_BENCH_BILLING_TENANTS`` (1000), ``IIOT_BENCH_BILLING_DEVICES_PER_TENANT`` (50),
``IIOT_BENCH_BILLING_DAYS`` (30) and ``IIOT_BENCH_BILLING_READINGS_PER_DAY`` (24 a device).
The full size is 34 million raw readings and as many ``ingest_usage`` rows (one reading an hour
fills every device-hour): loading should take 10 to 20 minutes and about 9 GB of disk (50 tenants
x 20 devices, 684,000 readings, load in 9 s into 186 MiB).
"""

import os
import time
from datetime import UTC, date, datetime, timedelta

import psycopg

from benchmarks.common import scratch_database
from iiot_orchestration import billing
from iiot_orchestration.rollups import session_settings
from iiot_orchestration.settings import load_settings
from iiot_orchestration.storage import storage_for

TENANTS = int(os.environ.get("IIOT_BENCH_BILLING_TENANTS", "1000"))
DEVICES_PER_TENANT = int(os.environ.get("IIOT_BENCH_BILLING_DEVICES_PER_TENANT", "50"))
DAYS = int(os.environ.get("IIOT_BENCH_BILLING_DAYS", "30"))
READINGS_PER_DAY = int(os.environ.get("IIOT_BENCH_BILLING_READINGS_PER_DAY", "24"))
TIMEZONE = "America/Sao_Paulo"
FIRST_DAY = date(2026, 10, 1)
LAST_DAY = FIRST_DAY + timedelta(days=DAYS - 1)
CREATED = datetime(2026, 9, 1, tzinfo=UTC)
TARGET = 10.0

LOAD_TENANTS = """
INSERT INTO tenants (slug, name, plan_id, timezone, created_at)
SELECT 't' || lpad(i::text, greatest(4, length((%(n)s - 1)::text)), '0'), 'Tenant ' || i,
       CASE WHEN i %% 10 < 5 THEN 'starter' WHEN i %% 10 < 9 THEN 'pro' ELSE 'enterprise' END,
       %(tz)s, %(created)s
  FROM generate_series(0, %(n)s - 1) i
 ORDER BY i
"""

LOAD_DEVICES = """
INSERT INTO devices (tenant_id, mac, name, meter_kind, created_at)
SELECT t.tenant_id,
       ('02:00:00:' || lpad(to_hex((g >> 16) & 255), 2, '0') || ':'
        || lpad(to_hex((g >> 8) & 255), 2, '0') || ':' || lpad(to_hex(g & 255), 2, '0'))::macaddr,
       'meter ' || j, 'energy', %(created)s
  FROM tenants t, generate_series(0, %(per)s - 1) j,
       LATERAL (SELECT (t.tenant_id - 1) * %(per)s + j AS g) n
 ORDER BY t.tenant_id, j
"""

# one local day of readings, in time order; each device silent one day in twenty
LOAD_DAY = """
INSERT INTO telemetry (tenant_id, device_id, metric, ts, value, received_at)
SELECT r.tenant_id, r.device_id, 'energy_kwh', r.ts, r.value, r.ts
  FROM (SELECT d.tenant_id, d.device_id,
               (%(day)s::date)::timestamp AT TIME ZONE t.timezone
               + make_interval(secs => k * %(step)s + d.device_id %% %(phase)s) AS ts,
               d.device_id * 1000.0 + (%(n)s * %(per_day)s + k) * 0.25 AS value
          FROM devices d JOIN tenants t USING (tenant_id), generate_series(0, %(per_day)s - 1) k
         WHERE (d.device_id + %(n)s) %% 20 <> 0) r
 ORDER BY r.ts, r.device_id
"""

# what the ingest daemon counts in the same transaction as the readings (received_at = ts here,
# so a UTC day of ts holds whole hours of received_at)
LOAD_USAGE = """
INSERT INTO ingest_usage (tenant_id, device_id, hour, messages, readings)
SELECT tenant_id, device_id, date_trunc('hour', received_at, 'UTC'), count(*), count(*)
  FROM telemetry WHERE ts >= %(start)s AND ts < %(end)s
 GROUP BY 1, 2, 3
"""

# the daily rollup of one UTC day; the values only increase, so first/last are min/max
LOAD_DAILY = """
INSERT INTO telemetry_daily (tenant_id, device_id, metric, bucket, readings, value_sum,
                             value_min, value_max, value_avg, first_ts, first_value, last_ts,
                             last_value, consumption, counter_resets)
SELECT tenant_id, device_id, metric, %(start)s, count(*), sum(value), min(value), max(value),
       avg(value), min(ts), min(value), max(ts), max(value), max(value) - min(value), 0
  FROM telemetry WHERE ts >= %(start)s AND ts < %(end)s
 GROUP BY 1, 2, 3
"""

# The baseline. Per tenant, once: the bounds of the last local day, of the month and of the
# retention window (the retention_days local days ending with the last day), each widened to
# the UTC hours that start in it (ingest_usage's rule), computed once per tenant: DISTINCT
# keeps the planner from inlining them into every row's filters (9 times slower at 684,000
# readings) and, unlike OFFSET 0 or a materialized CTE, still lets every parallel worker build
# the small hash table itself. Then one parallel pass over the raw rows, a per-device partial
# aggregate (active devices without count(DISTINCT), which was slower), summed per tenant.
RAW_USAGE = """
WITH per_device AS (
    SELECT r.tenant_id, r.device_id,
           count(*) FILTER (WHERE r.received_at >= w.received_from
                              AND r.received_at < w.received_to) AS readings,
           count(*) FILTER (WHERE r.received_at >= w.kept_from
                              AND r.received_at < w.received_to) AS stored,
           count(*) FILTER (WHERE r.received_at >= w.month_from
                              AND r.received_at < w.received_to) AS month_readings
      FROM telemetry r
      JOIN (SELECT DISTINCT tenant_id,
                   date_trunc('hour', day_start - interval '1 microsecond', 'UTC')
                       + interval '1 hour' AS received_from,
                   date_trunc('hour', day_end - interval '1 microsecond', 'UTC')
                       + interval '1 hour' AS received_to,
                   date_trunc('hour', month_start - interval '1 microsecond', 'UTC')
                       + interval '1 hour' AS month_from,
                   date_trunc('hour', kept_start - interval '1 microsecond', 'UTC')
                       + interval '1 hour' AS kept_from
              FROM (SELECT t.tenant_id,
                           (%(day)s::date)::timestamp AT TIME ZONE t.timezone AS day_start,
                           (%(day)s::date + 1)::timestamp AT TIME ZONE t.timezone AS day_end,
                           (%(month)s::date)::timestamp AT TIME ZONE t.timezone AS month_start,
                           (%(day)s::date + 1 - coalesce(t.retention_days, p.retention_days))
                               ::timestamp AT TIME ZONE t.timezone AS kept_start
                      FROM tenants t JOIN plans p USING (plan_id)) bounds) w
           USING (tenant_id)
     GROUP BY r.tenant_id, r.device_id
)
SELECT tenant_id, sum(readings)::bigint, count(*) FILTER (WHERE readings > 0)::integer,
       sum(stored)::bigint, sum(month_readings)::bigint
  FROM per_device
 GROUP BY tenant_id
"""


def log(started: float, message: str) -> None:
    print(f"  [{time.perf_counter() - started:7.1f} s] {message}", flush=True)


def load(url: str) -> dict[str, int]:
    """Tenants, devices, raw readings, ingest_usage, telemetry_daily and the usage of the
    month's earlier days; returns the row counts."""
    started = time.perf_counter()
    step = 86_400 / READINGS_PER_DAY
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET work_mem = '256MB'")
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute(LOAD_TENANTS, {"n": TENANTS, "tz": TIMEZONE, "created": CREATED})
        # the plan history starts with the tenant, before the month
        conn.execute("UPDATE tenant_plan_history SET valid_from = %s", (CREATED,))
        conn.execute(LOAD_DEVICES, {"per": DEVICES_PER_TENANT, "created": CREATED})
        log(started, f"{TENANTS:,} tenants, {TENANTS * DEVICES_PER_TENANT:,} devices")
        first_utc, last_utc = FIRST_DAY - timedelta(days=1), LAST_DAY + timedelta(days=1)
        storage_for(conn).ensure_partitions(conn, first_utc, last_utc)
        for n in range(DAYS):
            day = FIRST_DAY + timedelta(days=n)
            conn.execute(
                LOAD_DAY,
                {
                    "day": day,
                    "n": n,
                    "step": step,
                    "phase": max(int(step), 1),
                    "per_day": READINGS_PER_DAY,
                },
            )
            if n % 5 == 4 or n == DAYS - 1:
                log(started, f"raw readings: {n + 1} of {DAYS} local days")
        utc_days = (last_utc - first_utc).days + 1
        for n in range(utc_days):
            start = datetime.combine(first_utc + timedelta(days=n), datetime.min.time(), UTC)
            bounds = {"start": start, "end": start + timedelta(days=1)}
            conn.execute(LOAD_USAGE, bounds)
            conn.execute(LOAD_DAILY, bounds)
            if n % 5 == 4 or n == utc_days - 1:
                log(started, f"ingest_usage and telemetry_daily: {n + 1} of {utc_days} UTC days")
        conn.execute("VACUUM ANALYZE")
        log(started, "vacuum analyze")
        everyone = billing.tenants(conn)
        for n in range(DAYS - 1):
            day = FIRST_DAY + timedelta(days=n)
            billing.record_usage_many(conn, [(who, day) for who in everyone])
            if n % 5 == 4 or n == DAYS - 2:
                log(started, f"usage of the earlier days: {n + 1} of {DAYS - 1}")
        conn.execute("VACUUM ANALYZE billing_daily_usage")
        counts = {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("telemetry", "ingest_usage", "telemetry_daily")
        }
        counts["bytes"] = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        log(started, f"loaded, database {counts['bytes'] / 1024**2:,.0f} MiB")
    return counts


def nightly(url: str, label: date) -> float:
    """Subject: the night's billing of every tenant, from the rollups."""
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        night = billing.bill_night(
            conn, billing.tenants(conn), LAST_DAY, today=LAST_DAY + timedelta(days=1)
        )
        elapsed = time.perf_counter() - started
    if night.billing.failures or len(night.billing.outcomes) != TENANTS:
        raise AssertionError(f"nightly run failed: {night.billing.failures[:3]}")
    if {o.invoice.period.label for o in night.billing.outcomes} != {label}:
        raise AssertionError("nightly run billed another period")
    return elapsed


def raw(url: str, label: date) -> tuple[float, dict[int, tuple[int, int, int, int]]]:
    """Baseline: the same usage from the raw readings only."""
    with psycopg.connect(url) as conn, conn.transaction():
        session_settings(conn, load_settings().rollup_work_mem)
        started = time.perf_counter()
        rows = conn.execute(RAW_USAGE, {"day": LAST_DAY, "month": label}).fetchall()
        elapsed = time.perf_counter() - started
    return elapsed, {row[0]: tuple(row[1:]) for row in rows}


def check(url: str, label: date, computed: dict[int, tuple[int, int, int, int]]) -> None:
    """The rollup path's stored usage equals the raw path's numbers, tenant by tenant."""
    with psycopg.connect(url) as conn:
        stored = {
            row[0]: tuple(row[1:])
            for row in conn.execute(
                "SELECT t.tenant_id, u.readings, u.active_devices, u.stored_readings,"
                "       (SELECT sum(m.readings) FROM billing_daily_usage m"
                "         WHERE m.tenant_id = t.tenant_id AND m.day >= %s AND m.day <= %s)"
                "  FROM tenants t LEFT JOIN billing_daily_usage u"
                "    ON u.tenant_id = t.tenant_id AND u.day = %s",
                (label, LAST_DAY, LAST_DAY),
            )
        }
        drafts = conn.execute(
            "SELECT count(*) FROM invoices WHERE period = %s AND days_billed = %s",
            (label, (LAST_DAY - label).days + 1),
        ).fetchone()[0]
    names = ("readings", "active devices", "stored readings", "month-to-date readings")
    wrong = [
        f"tenant {tenant_id} {name}: rollups {s}, raw {r}"
        for tenant_id in sorted(stored.keys() | computed.keys())
        for name, s, r in zip(
            names,
            stored.get(tenant_id, (None,) * 4),
            computed.get(tenant_id, (None,) * 4),
            strict=True,
        )
        if s != r
    ]
    if wrong or len(stored) != TENANTS or drafts != TENANTS:
        raise AssertionError(
            f"rollup and raw usage differ ({len(wrong)} numbers, {len(stored)} tenants, "
            f"{drafts} invoices): " + "; ".join(wrong[:10])
        )


def main() -> None:
    label = billing.period_containing(LAST_DAY, 1).label
    devices = TENANTS * DEVICES_PER_TENANT
    with scratch_database() as url:
        print(
            f"loading {TENANTS:,} tenants x {DEVICES_PER_TENANT} devices, {DAYS} local days "
            f"from {FIRST_DAY}, {READINGS_PER_DAY} readings a device and day "
            f"(~{devices * DAYS * READINGS_PER_DAY * 19 // 20:,} raw readings)...",
            flush=True,
        )
        started = time.perf_counter()
        counts = load(url)
        loading = time.perf_counter() - started
        # warm the cache, then the best of two for each
        raw(url, label)
        baseline, computed = min((raw(url, label) for _ in range(2)), key=lambda x: x[0])
        subject = min(nightly(url, label) for _ in range(2))
        check(url, label, computed)
    print(f"numbers agree: readings, active devices and stored readings of {LAST_DAY} and the")
    print(f"month-to-date readings of {label:%Y-%m}, for all {TENANTS:,} tenants")
    ratio = baseline / subject
    print(f"{'case':<62}{'seconds':>9}{'baseline/case':>15}")
    print(f"{'raw readings, one set-based statement (baseline)':<62}{baseline:>9.2f}{1:>15.2f}")
    print(
        f"{'rollups: bill_night, every tenant in bulk (subject)':<62}{subject:>9.2f}{ratio:>15.2f}"
    )
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(f"subject per tenant: {subject / TENANTS * 1000:.1f} ms")
    print(f"ratio baseline / subject: {ratio:.2f} x (target >= {TARGET:.0f} x: {verdict})")
    print(
        f"rows: telemetry {counts['telemetry']:,}, ingest_usage {counts['ingest_usage']:,}, "
        f"telemetry_daily {counts['telemetry_daily']:,}; {READINGS_PER_DAY} readings a device "
        f"and day; database {counts['bytes'] / 1024**2:,.0f} MiB, loaded in {loading:.0f} s"
    )
    print(
        "notes: one process, one connection, all tenants in one bulk run (bill_night); "
        "Dagster's per-run\n  overhead, the invoice asset's raw reconciliation and PDF/XLSX "
        "exports are excluded"
    )
