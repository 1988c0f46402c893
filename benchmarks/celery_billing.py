"""The nightly billing of 1,000 tenants on one Celery worker and on two, in the same run.

The data is benchmarks/billing.py's (tenants of America/Sao_Paulo, meters with a month of
readings, the month's earlier days billed), loaded once; each case then bills the last local day
on a copy of that database (``CREATE DATABASE ... TEMPLATE``), so both start from the same rows.
The night's runs are nightly_billing_sensor's: ``nightly_bulk_requests`` at 02:10 local time the
next day, with ``IIOT_BENCH_CELERY_SHARDS`` (4) as IIOT_BILLING_NIGHTLY_SHARDS, so up to that
many bulk runs of ``billing_nightly_job`` (a tenant's run follows from its slug: the shares are
not exactly equal), all launched at once on the Celery executor (each run's orchestration a
`dagster job execute` process, as a run launcher starts one); the workers (``dagster-celery
worker start``, one step at a time each, their own DAGSTER_HOME and working directory, a queue
of this run's own) take the steps.
Target: two workers at least 1.3 x faster than one.

Where the time goes, per case: the sum of the steps' own times (STEP_START to STEP_SUCCESS), the
time steps waited in the queue (submitted to taken), and the CPU seconds of PostgreSQL's
processes, of the workers and of the runs' orchestration over the case: PostgreSQL shares the
machine's cores with the workers.

Sizes: ``IIOT_BENCH_CELERY_TENANTS`` (1000) tenants with ``IIOT_BENCH_CELERY_DEVICES`` (20)
meters and ``IIOT_BENCH_CELERY_DAYS`` (30) days of 24 readings; a quick check:
``IIOT_BENCH_CELERY_TENANTS=40 IIOT_BENCH_CELERY_DAYS=3 python -m benchmarks celery_billing``.
RabbitMQ: ``IIOT_CELERY_BROKER_URL`` (guest at 127.0.0.1:5672).
"""

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta
from datetime import time as dt_time
from pathlib import Path
from tempfile import TemporaryDirectory
from zoneinfo import ZoneInfo

import psycopg
import yaml
from psycopg import sql

# benchmarks/billing.py reads its sizes when imported
os.environ["IIOT_BENCH_BILLING_TENANTS"] = os.environ.get("IIOT_BENCH_CELERY_TENANTS", "1000")
os.environ["IIOT_BENCH_BILLING_DEVICES_PER_TENANT"] = os.environ.get(
    "IIOT_BENCH_CELERY_DEVICES", "20"
)
os.environ["IIOT_BENCH_BILLING_DAYS"] = os.environ.get("IIOT_BENCH_CELERY_DAYS", "30")

from benchmarks.billing import LAST_DAY, TENANTS, TIMEZONE, load
from benchmarks.common import SERVER_URL, scratch_database
from iiot_orchestration.celery_executor import (
    BROKER_VARIABLE,
    DEFAULT_BROKER,
    EXECUTOR_VARIABLE,
    QUEUE_VARIABLE,
)
from iiot_orchestration.settings import to_url

SHARDS = int(os.environ.get("IIOT_BENCH_CELERY_SHARDS", "4"))
TARGET = 1.3
JOB = "billing_nightly_job"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(match) -> float:
    """User and system CPU seconds of the live processes ``match(pid, pgid, name)`` accepts,
    with those of their children that exited (PostgreSQL's backends of closed connections are
    counted by the postmaster that reaped them)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        if match(int(entry.name), int(fields[2]), name):
            total += sum(int(f) for f in fields[11:15])
    return total / TICK


def clone(source_url: str | None, name: str) -> str:
    """A copy of ``source_url``'s database, or an empty one without it."""
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if source_url:
        source = psycopg.conninfo.conninfo_to_dict(source_url)["dbname"]
        statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(source))
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(statement)
    params = psycopg.conninfo.conninfo_to_dict(SERVER_URL)
    params["dbname"] = name
    return to_url(params)


def drop(name: str) -> None:
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def night_requests(url: str) -> list:
    """The sensor's requests for the night of LAST_DAY, every tenant in a bulk run (bulk_from 1:
    a quick check's 40 tenants are below BULK_FROM)."""
    from sensors.billing import BILLING_HOUR, nightly_bulk_requests

    with psycopg.connect(url) as conn:
        tenants = conn.execute("SELECT slug, timezone, billing_cycle_day FROM tenants").fetchall()
    night = datetime.combine(LAST_DAY + timedelta(days=1), dt_time(BILLING_HOUR, 10))
    now = night.replace(tzinfo=ZoneInfo(TIMEZONE))
    return nightly_bulk_requests(now, tenants, bulk_from=1, shards=SHARDS)


def job_argv(request, config: Path) -> list[str]:
    """``dagster job execute`` of a run request: the run's orchestration in a process of its own,
    as a run launcher starts one."""
    config.write_text(yaml.safe_dump(request.run_config))
    tags = {**request.tags, "dagster/partition": request.partition_key}
    return [
        str(Path(sys.executable).with_name("dagster")), "job", "execute",
        "-m", "iiot_orchestration.definitions", "-j", request.job_name,
        "--tags", json.dumps(tags), "-c", str(config),
    ]  # fmt: skip


def timings(instance, run_ids: list[str]) -> tuple[float, float]:
    """The steps' own seconds and their seconds in the queue, summed over the runs."""
    import dagster as dg

    step = queued = 0.0
    for run_id in run_ids:
        marks: dict[str, float] = {}
        for record in instance.all_logs(run_id):
            event = record.dagster_event
            if event is None:
                continue
            if event.event_type == dg.DagsterEventType.ENGINE_EVENT:
                if record.message.startswith("Submitting celery task"):
                    marks["submitted"] = record.timestamp
                elif "in celery worker" in record.message:
                    marks["taken"] = record.timestamp
            elif event.event_type in (dg.DagsterEventType.STEP_START,):
                marks["start"] = record.timestamp
            elif event.event_type == dg.DagsterEventType.STEP_SUCCESS:
                marks["end"] = record.timestamp
        step += marks["end"] - marks["start"]
        queued += marks["taken"] - marks["submitted"]
    return step, queued


def case(loaded_url: str, workers: int, env: dict[str, str], tmp: Path) -> dict:
    import dagster as dg

    from iiot_orchestration.celery_workers import INSTANCE_CONFIG, start_worker

    name = f"iiot_bench_celery_{uuid.uuid4().hex[:8]}"
    url = clone(loaded_url, name)
    queue = f"iiot_bench_{uuid.uuid4().hex[:10]}"
    # the run's configuration resolves the database resource here, its steps on the workers
    os.environ.update({QUEUE_VARIABLE: queue, "IIOT_DATABASE_URL": url})
    worker_env = {**env, "IIOT_DATABASE_URL": url, "IIOT_REPORTS_ROOT": str(tmp / "reports")}
    started = [
        start_worker(
            f"bench{n}-{queue}", queue, tmp / queue / f"home{n}", tmp / queue / f"w{n}", worker_env
        )
        for n in range(workers)
    ]
    sessions = {w.process.pid for w in started}
    try:
        deadline = time.monotonic() + 180
        while not all(w.ready() for w in started):
            if time.monotonic() > deadline or any(w.process.poll() is not None for w in started):
                raise RuntimeError("workers did not start:\n" + started[0].log.read_text()[-3000:])
            time.sleep(0.5)
        requests = night_requests(url)

        home = tmp / queue / "orchestrator"
        home.mkdir(parents=True)
        (home / "dagster.yaml").write_text(INSTANCE_CONFIG.read_text())
        with dg.DagsterInstance.from_config(str(home)) as instance:
            db_cpu = cpu_seconds(lambda pid, pgid, n: n == "postgres")
            worker_cpu = cpu_seconds(lambda pid, pgid, n: pgid in sessions)
            own_cpu = sum(os.times()[2:4])
            # the instance's storage is shared by the cases: this case's runs are the new ones
            earlier = {r.run_id for r in instance.get_runs(dg.RunsFilter(job_name=JOB))}
            began = time.perf_counter()
            launched = [
                subprocess.Popen(job_argv(r, home.parent / f"run{n}.yaml"), env=dict(os.environ),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for n, r in enumerate(requests)
            ]  # fmt: skip
            if any(p.wait() for p in launched):
                raise AssertionError("a run's orchestration failed")
            wall = time.perf_counter() - began
            result = {
                "wall": wall,
                "db_cpu": cpu_seconds(lambda pid, pgid, n: n == "postgres") - db_cpu,
                "worker_cpu": cpu_seconds(lambda pid, pgid, n: pgid in sessions) - worker_cpu,
                "own_cpu": sum(os.times()[2:4]) - own_cpu,
            }
            runs = [
                r for r in instance.get_runs(dg.RunsFilter(job_name=JOB)) if r.run_id not in earlier
            ]
            if len(runs) != len(requests):
                raise AssertionError(f"{len(runs)} new runs for {len(requests)} requests")
            run_ids = [run.run_id for run in runs]
            failed = [r.run_id for r in runs if not r.is_success]
            if failed:
                raise AssertionError(f"{len(failed)} runs failed, e.g. {failed[0]}")
            result["steps"], result["queued"] = timings(instance, run_ids)
            configs = [r.run_config["ops"]["billing_nightly"]["config"] for r in requests]
            result["shares"] = [len(config["tenants"]) for config in configs]
        with psycopg.connect(url) as conn:
            billed = conn.execute(
                "SELECT count(*) FROM billing_daily_usage WHERE day = %s", (LAST_DAY,)
            ).fetchone()[0]
        if billed != TENANTS:
            raise AssertionError(f"{billed} of {TENANTS} tenants billed for {LAST_DAY}")
        return result
    finally:
        for worker in started:
            worker.stop()
        drop(name)


def main() -> None:
    with scratch_database() as loaded, TemporaryDirectory(prefix="iiot-bench-celery-") as tmp:
        print(f"loading {TENANTS:,} tenants (benchmarks/billing.py's data)...", flush=True)
        load(loaded)
        dagster_name = f"iiot_bench_celery_dagster_{uuid.uuid4().hex[:8]}"
        dagster_url = clone(None, dagster_name)  # Dagster's storage
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("IIOT_")},
            "IIOT_DAGSTER_DATABASE_URL": dagster_url,
            "IIOT_PARTITIONS_START": "2026-01-01",
            BROKER_VARIABLE: os.environ.get(BROKER_VARIABLE, DEFAULT_BROKER),
        }
        # before the code location is imported here: its jobs then use the Celery executor
        os.environ.update(
            {k: v for k, v in env.items() if k.startswith("IIOT_")}, **{EXECUTOR_VARIABLE: "celery"}
        )
        try:
            results = {}
            for n in (1, 2):
                print(f"billing the night on {n} worker(s)...", flush=True)
                results[n] = case(loaded, n, env, Path(tmp))
                print(f"  {results[n]['wall']:.1f} s", flush=True)
        finally:
            drop(dagster_name)
    shares = results[1]["shares"]
    print(
        f"{TENANTS:,} tenants in {len(shares)} bulk runs of billing_nightly_job, {LAST_DAY}"
        f" (IIOT_BENCH_CELERY_SHARDS={SHARDS}; tenants a run: {', '.join(map(str, shares))})"
    )
    print(
        f"{'workers':<9}{'wall s':>9}{'steps s':>10}{'queued s':>10}{'db cpu s':>10}"
        f"{'workers cpu s':>15}{'orchestr. cpu s':>17}"
    )
    for n, r in results.items():
        print(
            f"{n:<9}{r['wall']:>9.2f}{r['steps']:>10.2f}{r['queued']:>10.2f}{r['db_cpu']:>10.2f}"
            f"{r['worker_cpu']:>15.2f}{r['own_cpu']:>17.2f}"
        )
    ratio = results[1]["wall"] / results[2]["wall"]
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(f"one worker / two workers: {ratio:.2f} x (target >= {TARGET} x: {verdict})")
    print(
        f"cores: {os.cpu_count()}, shared by PostgreSQL, the workers and the runs' orchestration"
        " (a `dagster job execute` process a run)"
    )
