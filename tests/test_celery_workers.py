"""Dagster on several hosts: the runs' steps on Celery workers with RabbitMQ as the broker
(ops/dagster/celery/, iiot_orchestration/celery_executor.py), and the Kubernetes variant's Helm
values (ops/dagster/k8s/) checked without a cluster.

The end-to-end tests start two real workers (``dagster-celery worker start``), each with its own
working directory and DAGSTER_HOME, on a queue of the test's own, and run the nightly billing
and a rollup backfill as the docs run them, with the Dagster command line; storage is
PostgreSQL, invoice files go to a local S3 endpoint: nothing is shared on disk."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import process_config, validate_config

from assets.billing import NIGHT_BILLED, RECONCILED
from iiot_orchestration import billing, registry
from iiot_orchestration.celery_executor import (
    BROKER_VARIABLE,
    DEFAULT_BROKER,
    EXECUTOR_VARIABLE,
    QUEUE_VARIABLE,
    ExecutorSettingError,
    celery_config,
    job_executor,
)
from iiot_orchestration.celery_workers import (
    INSTANCE_CONFIG,
    WORKER_CONFIG,
    Worker,
    start_worker,
    step_workers,
)
from iiot_orchestration.services import port_open
from sensors.billing import BILLING_TAG, nightly_bulk_requests
from tests.conftest import REPO_ROOT, create_database, drop_database
from tests.test_billing_assets import acme  # noqa: F401
from tests.test_rollups import DAY, READINGS, expected_hours, hourly_rows, seeded  # noqa: F401
from tests.test_storage_roots import S3, s3  # noqa: F401

BROKER = os.environ.get("IIOT_TEST_CELERY_BROKER_URL", DEFAULT_BROKER)
BIN = Path(sys.executable).parent
K8S = REPO_ROOT / "ops" / "dagster" / "k8s"


def rabbitmq() -> None:
    if not port_open("127.0.0.1", 5672) and BROKER == DEFAULT_BROKER:
        pytest.skip("RabbitMQ is not reachable at 127.0.0.1:5672 (set IIOT_TEST_CELERY_BROKER_URL)")


# ---------------------------------------------------------------------------------------------
# Configuration


def test_the_celery_instance_is_the_repositorys_but_for_compute_logs():
    production = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    celery = yaml.safe_load(INSTANCE_CONFIG.read_text())
    compute_logs = celery.pop("compute_logs")
    assert celery == production
    # nothing captured into files on the host that ran a step
    assert compute_logs["class"] == "NoOpComputeLogManager"


def test_the_workers_configuration_agrees_with_the_executor(monkeypatch):
    from dagster_celery import celery_executor

    monkeypatch.setenv(BROKER_VARIABLE, "pyamqp://iiot:secret@rabbit.internal:5672/iiot")
    worker = yaml.safe_load(WORKER_CONFIG.read_text())["execution"]["config"]
    schema = celery_executor.config_schema.config_type
    assert validate_config(schema, worker).success
    resolved = process_config(schema, worker).value
    executor = celery_config(os.environ)
    assert resolved["broker"] == executor["broker"]
    assert resolved["backend"] == executor["backend"]
    # the queue is the worker's -q argument; every other setting is the same on both sides
    assert resolved["config_source"] == {
        k: v for k, v in executor["config_source"].items() if k != "task_default_queue"
    }
    assert process_config(schema, executor).success


def test_the_executor_is_dagsters_default_unless_celery_is_asked_for():
    assert job_executor({}) is None
    assert job_executor({EXECUTOR_VARIABLE: "default"}) is None
    celery = job_executor({EXECUTOR_VARIABLE: "Celery ", QUEUE_VARIABLE: "billing-night"})
    assert celery.name == "celery"
    config = celery_config({QUEUE_VARIABLE: "billing-night"})
    assert config["broker"] == DEFAULT_BROKER
    assert config["config_source"]["task_default_queue"] == "billing-night"
    assert config["config_source"]["task_acks_late"] is True


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({EXECUTOR_VARIABLE: "kubernetes"}, "must be one of default, celery"),
        ({EXECUTOR_VARIABLE: "celery;rm -rf /"}, "must be one of default, celery"),
        ({EXECUTOR_VARIABLE: "celery", BROKER_VARIABLE: "redis://x:6379/0"}, "AMQP URL"),
        ({EXECUTOR_VARIABLE: "celery", BROKER_VARIABLE: "file:///etc/passwd"}, "AMQP URL"),
        ({EXECUTOR_VARIABLE: "celery", QUEUE_VARIABLE: "a queue"}, "letters, digits"),
        ({EXECUTOR_VARIABLE: "celery", QUEUE_VARIABLE: "q'; import os #"}, "letters, digits"),
        ({EXECUTOR_VARIABLE: "celery", QUEUE_VARIABLE: "dagster\n"}, None),  # stripped: valid
    ],
)
def test_bad_executor_settings_are_refused_naming_the_variable(env, message):
    if message is None:
        assert job_executor(env).name == "celery"
        return
    with pytest.raises(ExecutorSettingError, match=message) as raised:
        job_executor(env)
    assert any(name in str(raised.value) for name in env)


def test_no_asset_hands_a_value_to_an_io_manager():
    """A step's output stored by the filesystem IO manager would have to be read by the next
    step from another host's disk. Every asset's output is of type Nothing, or is a
    MaterializeResult without a value (typed Any; Dagster then calls no IO manager): assets
    share their data through PostgreSQL only."""
    from iiot_orchestration.definitions import defs

    valued = []
    for assets_def in defs.resolve_asset_graph().assets_defs:
        if not assets_def.is_executable:
            continue
        fn = getattr(assets_def.op.compute_fn, "decorated_fn", None)
        returns = inspect.signature(fn, eval_str=True).return_annotation if fn else None
        for name, key in assets_def.keys_by_output_name.items():
            kind = assets_def.op.output_def_named(name).dagster_type
            if not (kind.is_nothing or (kind.is_any and returns is dg.MaterializeResult)):
                valued.append(f"{key.to_user_string()} ({kind.display_name}, returns {returns})")
    assert not valued, f"assets whose output goes through an IO manager: {valued}"


# ---------------------------------------------------------------------------------------------
# Two real workers


@dataclass
class Site:
    """The orchestrating host's environment and instance, and two workers on a queue."""

    env: dict[str, str]
    home: Path
    instance: dg.DagsterInstance
    workers: list[Worker]
    reports_root: str

    def dagster(self, *args: str) -> subprocess.Popen:
        """The Dagster command line on the orchestrating host (the run's orchestration; its
        steps go to the workers)."""
        return subprocess.Popen(
            [str(BIN / "dagster"), *args, "-m", "iiot_orchestration.definitions"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )


def wait_ready(workers: list[Worker], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(w.ready() for w in workers):
        exited = [w for w in workers if w.process.poll() is not None]
        if exited or time.monotonic() > deadline:
            logs = "\n".join(w.log.read_text()[-2000:] for w in workers)
            pytest.fail(f"Celery workers did not start ({len(exited)} exited):\n{logs}")
        time.sleep(0.5)


@pytest.fixture
def site(pg_server, database_url, tmp_path, s3, monkeypatch) -> Iterator[Site]:  # noqa: F811
    rabbitmq()
    name = f"iiot_t_{uuid.uuid4().hex[:12]}_dagster"
    dagster_url = create_database(pg_server, name)
    queue = f"iiot_test_{uuid.uuid4().hex[:12]}"  # no other test run takes these tasks
    reports_root = s3.root("celery-reports")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("IIOT_")},
        "IIOT_PARTITIONS_START": os.environ["IIOT_PARTITIONS_START"],
        "IIOT_DATABASE_URL": database_url,
        "IIOT_DAGSTER_DATABASE_URL": dagster_url,
        "IIOT_REPORTS_ROOT": reports_root,
        BROKER_VARIABLE: BROKER,
    }
    workers = [
        start_worker(f"{n}-{queue}", queue, tmp_path / n / "home", tmp_path / n / "work", env)
        for n in ("w1", "w2")
    ]
    home = tmp_path / "orchestrator" / "home"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text(INSTANCE_CONFIG.read_text())
    orchestrator = {
        **env,
        "DAGSTER_HOME": str(home),
        EXECUTOR_VARIABLE: "celery",
        QUEUE_VARIABLE: queue,
    }
    monkeypatch.setenv("IIOT_DAGSTER_DATABASE_URL", dagster_url)  # this process's instance
    try:
        wait_ready(workers)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            yield Site(orchestrator, home, instance, workers, reports_root)
    finally:
        for worker in workers:
            worker.stop()
        drop_database(pg_server, name)
    # stopped as a whole: the CLI and Celery, which shut down warm
    assert not any(w.running() for w in workers)
    assert all(b"Warm shutdown" in w.log.read_bytes() for w in workers)


def finish(processes: list[subprocess.Popen]) -> None:
    """Wait for every command, then require that each succeeded; none is left running."""
    try:
        outputs = [process.communicate(timeout=600)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]


def assert_nothing_on_local_disk(site: Site, tmp_path: Path) -> None:
    """The homes hold their dagster.yaml (and a worker's Celery settings module, written by
    ``dagster-celery worker start``), the working directories their log: no step output, no
    captured log, no invoice file."""
    written = sorted(
        str(p.relative_to(tmp_path))
        for p in tmp_path.rglob("*")
        if p.is_file()
        and p.name not in ("dagster.yaml", "worker.log", "dagster_celery_config.py")
        and p.suffix != ".yaml"
        and "__pycache__" not in p.parts
    )
    assert written == []


def both_workers_ran(site: Site, run_ids: list[str]) -> dict[str, str]:
    ran = {}
    for run_id in run_ids:
        ran.update({f"{run_id[:8]}:{k}": v for k, v in step_workers(site.instance, run_id).items()})
    names = {w.name for w in site.workers}
    assert {worker.split("@")[0] for worker in ran.values()} == names, ran
    return ran


@pytest.fixture
def beta(conn, acme):  # noqa: F811
    """acme's twin in Buenos Aires (UTC-3 as Sao Paulo): the same plan history, meter readings
    and ingest counts."""
    registry.create_tenant(
        conn, slug="beta", name="Beta", plan="enterprise", timezone="America/Argentina/Buenos_Aires"
    )
    [device] = registry.provision_devices(
        conn, "beta", [registry.DeviceRequest("02:00:00:00:0b:01", "energy")]
    )
    twin = {"beta": billing.tenant(conn, "beta").tenant_id, "device": device.device_id}
    twin["acme"] = acme.tenant_id
    for statement in (
        "UPDATE tenants b SET created_at = a.created_at FROM tenants a"
        " WHERE a.tenant_id = %(acme)s AND b.tenant_id = %(beta)s",
        "UPDATE tenant_plan_history b SET valid_from = a.valid_from FROM tenant_plan_history a"
        " WHERE a.tenant_id = %(acme)s AND b.tenant_id = %(beta)s",
        "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value, received_at)"
        " SELECT %(beta)s, %(device)s, metric, ts, value, received_at FROM telemetry"
        "  WHERE tenant_id = %(acme)s",
        "INSERT INTO ingest_usage (tenant_id, device_id, hour, messages, readings)"
        " SELECT %(beta)s, %(device)s, hour, messages, readings FROM ingest_usage"
        "  WHERE tenant_id = %(acme)s",
    ):
        conn.execute(statement, twin)
    return billing.tenant(conn, "beta")


def write_config(path: Path, run_config: dict) -> Path:
    path.write_text(yaml.safe_dump(run_config))
    return path


def test_the_nightly_billing_runs_on_two_workers(site, conn, acme, beta, tmp_path, s3):  # noqa: F811
    """Two time zones at 02:00 (Sao Paulo and Buenos Aires, both UTC-3): the sensor's two bulk
    runs, launched together, each step taken by another worker; usage and invoices right in the
    database, the invoice files in the bucket."""
    tenants = {"acme": acme, "beta": beta}
    at_2am = datetime(2026, 10, 11, 5, 10, tzinfo=UTC)
    due = [(slug, who.timezone, 1) for slug, who in tenants.items()]
    requests = nightly_bulk_requests(at_2am, due, bulk_from=1)
    assert len(requests) == 2
    finish(
        [
            site.dagster(
                "job",
                "execute",
                "-j",
                r.job_name,
                "--tags",
                json.dumps({**r.tags, "dagster/partition": r.partition_key}),
                "-c",
                str(write_config(tmp_path / f"run{n}.yaml", r.run_config)),
            )
            for n, r in enumerate(requests)
        ]
    )
    runs = [
        site.instance.get_runs(dg.RunsFilter(tags={BILLING_TAG: r.tags[BILLING_TAG]}))
        for r in requests
    ]
    assert [len(found) for found in runs] == [1, 1]
    assert all(found[0].status == dg.DagsterRunStatus.SUCCESS for found in runs)
    run_ids = [found[0].run_id for found in runs]
    both_workers_ran(site, run_ids)
    checks = {
        (run_id[:8], e.dagster_event.event_specific_data.check_name): (
            e.dagster_event.event_specific_data.passed
        )
        for run_id in run_ids
        for e in site.instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    }
    assert sorted(checks.values()) == [True] * 4
    assert {name for _, name in checks} == {NIGHT_BILLED, RECONCILED}
    for slug, who in tenants.items():
        usage = conn.execute(
            "SELECT messages, readings, active_devices FROM billing_daily_usage"
            " WHERE tenant_id = %s AND day = '2026-10-10'",
            (who.tenant_id,),
        ).fetchone()
        assert usage == (3, 3, 1), slug
        stored = billing.stored_invoice(conn, who.tenant_id, date(2026, 10, 1))
        # October has closed (the period of 2026-10-10): final, not a draft
        assert (stored.status, stored.total) == ("final", Decimal("4900.00")), slug
    assert s3.keys(site.reports_root) == [
        f"{slug}/2026-10/invoice.{ext}" for slug in sorted(tenants) for ext in ("pdf", "xlsx")
    ]
    assert_nothing_on_local_disk(site, tmp_path)


def test_a_rollup_backfill_runs_on_two_workers(site, conn, seeded, tmp_path):  # noqa: F811
    """docs/operations.md's backfill (`dagster asset materialize --partition-range`) of two
    days: one run, whose steps both workers took, the rollups as the definitions give them."""
    finish(
        [
            site.dagster(
                "asset",
                "materialize",
                "--select",
                "telemetry_hourly,telemetry_daily",
                "--partition-range",
                "2026-11-19...2026-11-20",
            )
        ]
    )
    [run] = site.instance.get_runs()
    assert run.status == dg.DagsterRunStatus.SUCCESS
    ran = both_workers_ran(site, [run.run_id])
    # the two rollups and their independent checks (quality's expectations, freshness)
    assert {"telemetry_hourly", "telemetry_daily"} <= {key.split(":")[1] for key in ran}
    _, device_id = seeded["acme"]
    assert hourly_rows(conn, device_id) == expected_hours(
        READINGS, DAY - timedelta(days=1), DAY + timedelta(days=1)
    )
    days = conn.execute(
        "SELECT bucket, sum(readings) FROM telemetry_daily GROUP BY 1 ORDER BY 1"
    ).fetchall()
    # acme's reading of the 19th at 23:48, its seven of the 20th and the other tenant's one
    assert days == [(DAY - timedelta(days=1), 1), (DAY, 8)]
    assert_nothing_on_local_disk(site, tmp_path)


# ---------------------------------------------------------------------------------------------
# The Kubernetes variant, without a cluster


def helm_values() -> dict:
    return yaml.safe_load((K8S / "values.yaml").read_text())


def test_the_k8s_run_launcher_the_chart_renders_is_valid(monkeypatch):
    """The run launcher of the chart's dagster.yaml (its template's mapping of the values)
    passes dagster-k8s's own schema, and so does the run queue."""
    from dagster import QueuedRunCoordinator
    from dagster_k8s import K8sRunLauncher

    values = helm_values()
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    rendered = {
        "load_incluster_config": launcher["loadInclusterConfig"],
        "job_namespace": launcher.get("jobNamespace", "iiot"),  # else the release's
        "image_pull_policy": launcher["imagePullPolicy"],
        "service_account_name": "dagster",
        "dagster_home": {"env": "DAGSTER_HOME"},
        "instance_config_map": {"env": "DAGSTER_K8S_INSTANCE_CONFIG_MAP"},
        "postgres_password_secret": {"env": "DAGSTER_K8S_PG_PASSWORD_SECRET"},
        "env_config_maps": [{"env": "DAGSTER_K8S_PIPELINE_RUN_ENV_CONFIGMAP"}],
        "env_secrets": [s["name"] for s in launcher["envSecrets"]],
        "env_vars": launcher["envVars"],
        "resources": launcher["resources"],
        "fail_pod_on_run_failure": launcher["failPodOnRunFailure"],
    }
    for name, value in (
        ("DAGSTER_HOME", values["global"]["dagsterHome"]),
        ("DAGSTER_K8S_INSTANCE_CONFIG_MAP", "dagster-instance"),
        ("DAGSTER_K8S_PG_PASSWORD_SECRET", values["global"]["postgresqlSecretName"]),
        ("DAGSTER_K8S_PIPELINE_RUN_ENV_CONFIGMAP", "dagster-pipeline-env"),
    ):
        monkeypatch.setenv(name, value)
    checked = process_config(K8sRunLauncher.config_type(), rendered)
    assert checked.success, checked.errors
    assert checked.value["env_secrets"] == ["iiot-env"]
    bad = process_config(K8sRunLauncher.config_type(), {**rendered, "image_pull_policy": 3})
    assert not bad.success  # the schema does refuse

    queue = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    limits = [
        {"key": t["key"], "value": {"applyLimitPerUniqueValue": True}, "limit": t["limit"]}
        for t in queue["tagConcurrencyLimits"]
    ]
    coordinator = {
        "max_concurrent_runs": queue["maxConcurrentRuns"],
        "tag_concurrency_limits": limits,
    }
    assert process_config(QueuedRunCoordinator.config_type(), coordinator).success
    # the same run queue as dagster.yaml's
    production = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    assert limits == production["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert values["computeLogManager"]["type"] == "NoOpComputeLogManager"
    assert values["postgresql"]["enabled"] is False  # the platform's server, not the chart's


def test_the_user_deployment_names_what_the_project_has():
    """The code server's command parses, its module is the project's Definitions, the image
    drops the `iiot` entry point and derives from the project's image, and every variable the
    values set is a setting or the executor's."""
    from dagster._cli import cli as dagster_cli

    from iiot_orchestration.settings import VARIABLES

    values = helm_values()
    [deployment] = values["dagster-user-deployments"]["deployments"]
    every_interface = "0.0.0.0"  # noqa: S104 (the chart's own arguments)
    args = ["-h", every_interface, "-p", str(deployment["port"]), *deployment["codeServerArgs"]]
    start = dagster_cli.commands["code-server"].commands["start"]
    parsed = start.make_context("start", list(args)).params
    assert parsed["module_name"] == "iiot_orchestration.definitions"
    __import__(parsed["module_name"])

    image = (K8S / "Containerfile").read_text()
    project = (REPO_ROOT / "ops" / "container" / "Containerfile").read_text()
    base = re.search(r"^FROM (\S+)", image, re.MULTILINE).group(1)
    assert f"-t {base} ." in project  # the tag the project's image is built with
    assert re.search(r"^ENTRYPOINT \[\]$", image, re.MULTILINE)
    repository = deployment["image"]["repository"]
    assert f"-t {repository}:{deployment['image']['tag']} ." in image

    known = {v.name for v in VARIABLES} | {EXECUTOR_VARIABLE, BROKER_VARIABLE, QUEUE_VARIABLE}
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    named = {e["name"] for e in deployment["env"]} | {v.split("=")[0] for v in launcher["envVars"]}
    assert named <= known, named - known
    executor = {e["name"]: e["value"] for e in deployment["env"]}[EXECUTOR_VARIABLE]
    assert job_executor({EXECUTOR_VARIABLE: executor}) is None  # steps in the run's pod
