"""`iiot dev` end to end: embedded PostgreSQL, a broker, migrations, demo data, the Dagster UI,
and a clean stop on Ctrl-C."""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import psycopg
import pytest

from iiot_orchestration.dev import DEMO_DEVICES, DEMO_TENANT, code_locations
from iiot_orchestration.services import free_port, port_open
from tests.conftest import REPO_ROOT

START_TIMEOUT_S = 300


def graphql(base: str, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"{base}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["data"]


def run_through_daemon(base: str, job: str, timeout: float = 180) -> str:
    """Launch a job as the UI does (queued, then started by the daemon); its final status."""
    launched = graphql(
        base,
        "mutation($p: ExecutionParams!) { launchPipelineExecution(executionParams: $p) {"
        " __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }",
        {
            "p": {
                "selector": {
                    "repositoryLocationName": "iiot",
                    "repositoryName": "__repository__",
                    "jobName": job,
                },
                "runConfigData": {},
            }
        },
    )["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + timeout
    status = "QUEUED"
    while time.monotonic() < deadline and status not in ("SUCCESS", "FAILURE", "CANCELED"):
        time.sleep(1)
        query = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"
        status = graphql(base, query, {"id": run_id})["runOrError"]["status"]
    return status


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def wait_for(lines: queue.Queue, seen: list[str], marker: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            return False
        seen.append(line)
        if marker in line:
            return True
    return False


@pytest.mark.stack
def test_iiot_dev_runs_the_stack_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(IIOT_DATA_DIR=str(tmp_path / "var"), IIOT_DAGSTER_PORT=str(port))
    process = subprocess.Popen(
        [sys.executable, "-m", "iiot_orchestration.cli", "dev"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=read_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        ready = wait_for(lines, seen, "Ready. Press Ctrl-C to stop.", START_TIMEOUT_S)
        output = "\n".join(seen)
        assert ready, output
        assert "(embedded)" in output
        assert "Code location iiot: loaded" in output
        database_url = re.search(r"Database: (\S+) \(embedded\)", output).group(1)

        base = f"http://127.0.0.1:{port}"
        for page in ("server_info", "", "asset-groups"):
            with urllib.request.urlopen(f"{base}/{page}", timeout=30) as response:
                assert response.status == 200, page
        [location] = code_locations(base)
        assert location["locationOrLoadError"]["__typename"] == "RepositoryLocation"
        nodes = graphql(base, "{ assetNodes { assetKey { path } } }")["assetNodes"]
        assert ["telemetry_partitions"] in [n["assetKey"]["path"] for n in nodes]
        assert run_through_daemon(base, "telemetry_partitions_job") == "SUCCESS"

        with psycopg.connect(database_url) as conn:
            devices = conn.execute(
                "SELECT count(*) FROM devices JOIN tenants USING (tenant_id) WHERE slug = %s",
                (DEMO_TENANT,),
            ).fetchone()[0]
        assert devices == len(DEMO_DEVICES)
        # on mosquitto and on amqtt alike (MQTT 3.1.1, plain topic filter)
        assert "simulated fleet started" in output
        with psycopg.connect(database_url, autocommit=True) as conn:
            landed = lambda: conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]  # noqa: E731
            deadline = time.monotonic() + 120
            while landed() == 0 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert landed() > 0
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    wait_for(lines, seen, "Stopped.", 10)
    reader.join(10)
    process.stdout.close()
    assert process.returncode == 0, "\n".join(seen)
    assert "Stopped." in seen
    assert not port_open("127.0.0.1", port)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(database_url, connect_timeout=3)
