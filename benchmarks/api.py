"""The tenant API against bare psycopg, in the same run: exports, and the latest reading.

A scratch database gets one tenant (enterprise plan) with 200 energy meters; 100 of them hold
``IIOT_BENCH_API_EXPORT_ROWS`` readings (default 1,000,000: one a minute in October 2026), and
every meter reported both its metrics each minute of the last two hours. `iiot api` runs in a
subprocess (uvicorn, its default pool of 8 connections per process, ``IIOT_BENCH_API_WORKERS``
processes: one per core by default), with a rate limit high enough not to interfere. Then:

- **export**: the 1,000,000 readings as CSV and as Parquet downloaded from
  `/api/v1/exports/telemetry` (httpx, streamed, discarded), against a bare
  `COPY (SELECT ...) TO STDOUT WITH (FORMAT csv, HEADER)` of the same rows on a psycopg
  connection of the table's owner, read and discarded; best of ``IIOT_BENCH_API_REPEAT`` (3);
- **latest**: `/api/v1/telemetry/latest` for 10 random meters (20 series) at 200 requests a
  second (``IIOT_BENCH_API_RATE``), from 8 client processes each on its own schedule (each a
  kept-alive ``http.client`` connection), for ``IIOT_BENCH_API_SECONDS`` (15), against the same
  statement (telemetry.LATEST, as app_rw with the tenant set) on 8 bare psycopg connections under
  the same load; then the same requests from httpx clients, for comparison. A latency is
  measured from the moment a request was due, so a server that falls behind is charged for it;
  "achieved" is the rate the answers came at (below the offered rate: the server could not keep
  up).
"""

import http.client
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import httpx
import psycopg

from benchmarks.common import scratch_database
from iiot_orchestration import registry
from iiot_orchestration.api import keys
from iiot_orchestration.api.routes import telemetry
from iiot_orchestration.services import free_port

EXPORT_ROWS = int(os.environ.get("IIOT_BENCH_API_EXPORT_ROWS", "1000000"))
REPEAT = int(os.environ.get("IIOT_BENCH_API_REPEAT", "3"))
SECONDS = float(os.environ.get("IIOT_BENCH_API_SECONDS", "15"))
DEVICES = 200
EXPORT_DEVICES = 100
RATE = int(os.environ.get("IIOT_BENCH_API_RATE", "200"))
# server processes of the API under test (IIOT_API_WORKERS): one per core of this machine
WORKERS = os.environ.get("IIOT_BENCH_API_WORKERS", str(os.cpu_count() or 1))
CLIENTS = 8
PER_REQUEST = 10
EXPORT_START = datetime(2026, 10, 1, tzinfo=UTC)
EXPORT_TARGET = 0.5
LATEST_TARGET = 3.0


def load(url: str) -> tuple[int, str, list[int]]:
    """The tenant, its viewer key and its meters' ids."""
    now = datetime.now(UTC)
    with psycopg.connect(url) as conn:
        tenant = registry.create_tenant(
            conn, slug="bench", name="Bench", plan="enterprise", timezone="UTC"
        )
        requests = [
            registry.DeviceRequest(
                mac=f"02:00:00:00:{n >> 8:02x}:{n & 255:02x}", meter_kind="energy"
            )
            for n in range(DEVICES)
        ]
        devices = [r.device_id for r in registry.provision_devices(conn, "bench", requests)]
        per_device = EXPORT_ROWS // EXPORT_DEVICES
        days = per_device // 1440 + 1
        conn.execute(
            "SELECT iiot_ensure_telemetry_partitions(%s::date, %s::date + %s)",
            (EXPORT_START, EXPORT_START, days),
        )
        conn.execute(
            "SELECT iiot_ensure_telemetry_partitions(%s::date - 1, %s::date + 1)", (now, now)
        )
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
            " SELECT %s, d, 'energy_kwh', %s + make_interval(mins => n), n * 0.01"
            "   FROM unnest(%s::int[]) d, generate_series(0, %s) n",
            (tenant.tenant_id, EXPORT_START, devices[:EXPORT_DEVICES], per_device - 1),
        )
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
            " SELECT %s, d, m, %s - make_interval(mins => n), n * 0.5"
            "   FROM unnest(%s::int[]) d, unnest(ARRAY['energy_kwh', 'power_w']) m,"
            "        generate_series(1, 120) n",
            (tenant.tenant_id, now, devices),
        )
        key = keys.create(conn, tenant="bench", role="viewer", name="bench", actor="bench").key
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")
    return tenant.tenant_id, key, devices


@contextmanager
def api_server(url: str) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(
        IIOT_DATABASE_URL=url,
        IIOT_API_RATE_PER_SECOND="100000",
        IIOT_API_RATE_BURST="100000",
        IIOT_API_WORKERS=WORKERS,
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "iiot_orchestration.cli", "api", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("iiot api did not start")
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def bare_copy(url: str, tenant_id: int, end: datetime) -> int:
    rows = 0
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        conn.execute("SET TimeZone = 'UTC'")
        statement = (
            "COPY (SELECT device_id, metric, ts, value FROM telemetry WHERE tenant_id = %s"
            " AND ts >= %s AND ts < %s) TO STDOUT WITH (FORMAT csv, HEADER)"
        )
        with cur.copy(statement, (tenant_id, EXPORT_START, end)) as copy:
            for _row in copy:  # one row per message
                rows += 1
    return rows - 1


def api_export(client: httpx.Client, end: datetime, fmt: str) -> int:
    params = {"start": EXPORT_START.isoformat(), "end": end.isoformat(), "format": fmt}
    size = lines = 0
    with client.stream("GET", "/api/v1/exports/telemetry", params=params) as response:
        response.raise_for_status()
        for chunk in response.iter_raw():
            size += len(chunk)
            lines += chunk.count(b"\n")
    return lines - 1 if fmt == "csv" else size


def best_of(func: Callable[[], int]) -> tuple[float, int]:
    runs = []
    for _ in range(REPEAT):
        started = time.perf_counter()
        result = func()
        runs.append((time.perf_counter() - started, result))
    return min(runs)


class BareClient:
    """The same statement as the API's, on a psycopg connection of app_rw scoped to the tenant."""

    def __init__(self, url: str, tenant_id: int) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute("SET ROLE app_rw")
        self.conn.execute("SELECT set_config('iiot.tenant_id', %s, false)", (str(tenant_id),))

    def latest(self, devices: list[int]) -> None:
        params = telemetry.latest_params(devices, None, [0, ""], 1000)
        assert len(self.conn.execute(telemetry.LATEST, params).fetchall()) == 2 * PER_REQUEST

    def close(self) -> None:
        self.conn.close()


class ApiClient:
    """A kept-alive HTTP/1.1 connection of the standard library: about 0.25 ms of the client's
    CPU a request against httpx's 0.7 ms, which on two shared cores would be charged to the API
    (the baseline's client is libpq, in C)."""

    def __init__(self, base: str, key: str) -> None:
        address = urllib.parse.urlsplit(base)
        self.http = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
        self.headers = {"Authorization": f"Bearer {key}"}

    def latest(self, devices: list[int]) -> None:
        query = urllib.parse.urlencode([("device_id", d) for d in devices])
        self.http.request("GET", f"/api/v1/telemetry/latest?{query}", headers=self.headers)
        response = self.http.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body[:200])
        assert len(json.loads(body)["items"]) == 2 * PER_REQUEST

    def close(self) -> None:
        self.http.close()


class HttpxClient:
    """httpx, for comparison: its own CPU a request is charged to the API on these two cores."""

    def __init__(self, base: str, key: str) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        self.http = httpx.Client(base_url=base, headers=headers, timeout=30)

    def latest(self, devices: list[int]) -> None:
        response = self.http.get("/api/v1/telemetry/latest", params={"device_id": devices})
        response.raise_for_status()
        assert len(response.json()["items"]) == 2 * PER_REQUEST

    def close(self) -> None:
        self.http.close()


CLIENT_KINDS = {"bare": BareClient, "api": ApiClient, "api-httpx": HttpxClient}


def client_process(
    n: int, kind: str, target: tuple, devices: list[int], ready, start, answers
) -> None:
    """One client: RATE / CLIENTS requests a second from ``start`` (wall clock, set once every
    client is ready), each for PER_REQUEST random ``devices``; its (due, latency) pairs go to
    ``answers``."""
    client = CLIENT_KINDS[kind](*target)
    rng = random.Random(n)
    interval = CLIENTS / RATE
    ready.wait()  # every client connected
    ready.wait()  # and the start set
    due = start.value + n * interval / CLIENTS
    mine = []
    try:
        while due < start.value + SECONDS:
            pause = due - time.time()
            if pause > 0:
                time.sleep(pause)
            client.latest(rng.sample(devices, PER_REQUEST))
            mine.append((due, time.time() - due))
            due += interval
    finally:
        client.close()
        answers.put(mine)


def under_load(kind: str, target: tuple, devices: list[int]) -> tuple[list[float], float]:
    """Latencies (s) of RATE requests a second from CLIENTS processes (so that the clients do
    not share an interpreter lock), each on its own schedule, measured from when each request
    was due, and the rate achieved (requests a second until the last answer)."""
    context = multiprocessing.get_context("spawn")
    ready, start, answers = context.Barrier(CLIENTS + 1), context.Value("d", 0.0), context.Queue()
    processes = [
        context.Process(
            target=client_process, args=(n, kind, target, devices, ready, start, answers)
        )
        for n in range(CLIENTS)
    ]
    for process in processes:
        process.start()
    ready.wait()
    start.value = time.time() + 0.2
    ready.wait()
    pairs = [pair for _ in processes for pair in answers.get()]
    for process in processes:
        process.join()
    last = max(due + latency for due, latency in pairs)
    return [latency for _, latency in pairs], len(pairs) / (last - start.value)


def percentiles(latencies: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return cuts[49] * 1000, cuts[98] * 1000


def main() -> None:
    with scratch_database() as url:
        print(f"loading {EXPORT_ROWS:,} readings...", flush=True)
        tenant_id, key, devices = load(url)
        end = EXPORT_START + timedelta(days=EXPORT_ROWS // EXPORT_DEVICES // 1440 + 1)
        with (
            api_server(url) as base,
            httpx.Client(
                base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=600
            ) as client,
        ):
            api_export(client, EXPORT_START + timedelta(hours=1), "parquet")  # warm up
            bare_s, bare_rows = best_of(lambda: bare_copy(url, tenant_id, end))
            csv_s, csv_rows = best_of(lambda: api_export(client, end, "csv"))
            parquet_s, parquet_bytes = best_of(lambda: api_export(client, end, "parquet"))
            assert bare_rows == csv_rows == EXPORT_ROWS, (bare_rows, csv_rows)
            bare_latencies = under_load("bare", (url, tenant_id), devices)
            under_load("api", (base, key), devices)  # warm up the server's pool and plans
            api_latencies = under_load("api", (base, key), devices)
            httpx_latencies = under_load("api-httpx", (base, key), devices)

    print(f"export of {EXPORT_ROWS:,} readings (best of {REPEAT})")
    print(f"{'case':<46}{'seconds':>9}{'rows/s':>12}{'ratio':>8}")
    for label, seconds in (
        ("bare COPY TO STDOUT, CSV (baseline)", bare_s),
        ("GET /exports/telemetry?format=csv", csv_s),
        (f"GET /exports/telemetry?format=parquet ({parquet_bytes / 2**20:.1f} MiB)", parquet_s),
    ):
        rate = EXPORT_ROWS / seconds
        print(f"{label:<46}{seconds:>9.2f}{rate:>12,.0f}{bare_s / seconds:>8.2f}")
    csv_ratio = bare_s / csv_s
    verdict = "met" if csv_ratio >= EXPORT_TARGET else "NOT met"
    print(f"target: CSV rows/s >= {EXPORT_TARGET} x bare -> {verdict}")

    print(
        f"latest reading of {PER_REQUEST} meters ({2 * PER_REQUEST} series), {RATE} requests/s "
        f"from {CLIENTS} clients for {SECONDS:g} s"
    )
    print(f"{'case':<40}{'achieved/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'ratio p99':>10}")
    bare_p99 = percentiles(bare_latencies[0])[1]
    for label, (latencies, achieved) in (
        ("bare psycopg, the same query (baseline)", bare_latencies),
        ("GET /telemetry/latest", api_latencies),
        ("the same, clients on httpx", httpx_latencies),
    ):
        p50, p99 = percentiles(latencies)
        print(f"{label:<40}{achieved:>11.0f}{p50:>9.1f}{p99:>9.1f}{p99 / bare_p99:>10.2f}")
    api_p99 = percentiles(api_latencies[0])[1]
    verdict = "met" if api_p99 <= LATEST_TARGET * bare_p99 else "NOT met"
    print(f"target: p99 <= {LATEST_TARGET} x bare p99 -> {verdict}")
