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

import paho.mqtt.publish as publish
import paho.mqtt.subscribe as subscribe
import psycopg
import pytest

from iiot_orchestration import dev
from iiot_orchestration.api import keys
from iiot_orchestration.dev import (
    DEMO_DEVICES,
    DEMO_TENANT,
    DevStack,
    _wait_for_webserver,
    code_locations,
)
from iiot_orchestration.services import (
    ServiceError,
    ensure_database,
    free_port,
    port_open,
    start_mosquitto,
)
from iiot_orchestration.settings import dagster_url_for, load_settings
from tests.conftest import REPO_ROOT, drop_database

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
    port, api_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(
        IIOT_DATA_DIR=str(tmp_path / "var"),
        IIOT_DAGSTER_PORT=str(port),
        IIOT_API_PORT=str(api_port),
    )
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
        check_the_api(output, database_url, api_port)
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
    assert not port_open("127.0.0.1", api_port)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(database_url, connect_timeout=3)


def check_the_api(output: str, database_url: str, api_port: int) -> None:
    """The banner names the API and its docs; it answers a key of the demo tenant."""
    base = f"http://127.0.0.1:{api_port}"
    assert f"Tenant API: {base}/api/v1  (docs {base}/api/v1/docs" in output, output
    with urllib.request.urlopen(f"{base}/health/ready", timeout=30) as response:
        assert json.load(response) == {"status": "ready"}
    with urllib.request.urlopen(f"{base}/api/v1/docs", timeout=30) as response:
        assert b"swagger-ui" in response.read()
    with psycopg.connect(database_url) as conn:
        key = keys.create(conn, tenant=DEMO_TENANT, role="viewer", name="dev test", actor="test")
    request = urllib.request.Request(
        f"{base}/api/v1/me", headers={"Authorization": f"Bearer {key.key}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.load(response)["tenant"] == DEMO_TENANT


def start_dev(env: dict[str, str], *args: str) -> tuple[subprocess.Popen, queue.Queue, list[str]]:
    """`iiot dev` in a session of its own, like a terminal's foreground job."""
    process = subprocess.Popen(
        [sys.executable, "-m", "iiot_orchestration.cli", "dev", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()
    process.reader = threading.Thread(target=read_lines, args=(process.stdout, lines), daemon=True)
    process.reader.start()
    return process, lines, []


def ctrl_c(process: subprocess.Popen, lines: queue.Queue, seen: list[str]) -> int:
    """What Ctrl-C in a terminal does: SIGINT to the whole foreground process group."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    wait_for(lines, seen, "\0", 5)  # the rest of its output, up to the end of the pipe
    process.reader.join(10)
    if not process.reader.is_alive():  # closing the pipe under a reading thread would race
        process.stdout.close()
    return process.returncode


def readings_and_dead_letters(database_url: str) -> tuple[int, int]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT (SELECT count(*) FROM (SELECT DISTINCT device_id, ts FROM telemetry) r),"
            " (SELECT count(*) FROM dead_letters)"
        ).fetchone()


@pytest.mark.stack
def test_iiot_dev_loses_nothing_acknowledged_across_restarts(tmp_path, database_url):
    """Three Ctrl-C stops while the simulated fleet publishes: every message the broker
    acknowledged to the simulator landed, the broker keeps its port and persistence file."""
    data_dir = tmp_path / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(
        IIOT_DATA_DIR=str(data_dir),
        IIOT_DATABASE_URL=database_url,
        IIOT_API_PORT=str(free_port()),
    )
    urls = []
    for _ in range(3):
        before = readings_and_dead_letters(database_url)[0]
        process, lines, seen = start_dev(env, "--no-dagster")
        try:
            assert wait_for(lines, seen, "Ready. Press Ctrl-C to stop.", START_TIMEOUT_S), seen
            urls += re.findall(r"MQTT broker: (mqtt://\S+) \(mosquitto", "\n".join(seen))
            # this run's fleet is publishing and ingest is landing
            deadline = time.monotonic() + 120
            while readings_and_dead_letters(database_url)[0] < before + 5:
                assert time.monotonic() < deadline, seen
                time.sleep(0.2)
        finally:
            code = ctrl_c(process, lines, seen)
        assert code == 0, "\n".join(seen)
        assert (data_dir / "mosquitto" / "mosquitto.db").is_file(), "\n".join(seen)
    assert len(urls) == 3, urls
    assert len(set(urls)) == 1, urls
    simulator_log = (data_dir / "logs" / "simulator.log").read_text()
    done = re.findall(r"Done: ([\d,]+) messages published, ([\d,]+) acknowledged", simulator_log)
    assert len(done) == 3, simulator_log
    acknowledged = sum(int(acked.replace(",", "")) for _, acked in done)
    assert acknowledged > 0
    assert readings_and_dead_letters(database_url) == (acknowledged, 0)


@pytest.mark.stack
def test_iiot_dev_stops_on_a_broker_start_error(tmp_path, database_url):
    """The broker cannot write its persistence file (a directory stands in its place): `iiot
    dev` stops with the broker's own message instead of running without persistence."""
    data_dir = tmp_path / "var"
    (data_dir / "mosquitto" / "mosquitto.db").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(
        IIOT_DATA_DIR=str(data_dir),
        IIOT_DATABASE_URL=database_url,
        IIOT_API_PORT=str(free_port()),
    )
    process, lines, seen = start_dev(env, "--no-dagster")
    try:
        wait_for(lines, seen, "Stopped.", START_TIMEOUT_S)
        process.wait(60)  # it stops by itself; ctrl_c() only if it did not
    finally:
        code = ctrl_c(process, lines, seen)
    output = "\n".join(seen)
    assert code == 1, output
    assert "error: mosquitto" in output, output
    assert "Is a directory" in output, output
    assert "Ready." not in output


@pytest.mark.stack
def test_iiot_dev_stops_the_broker_a_killed_run_left(tmp_path, database_url):
    """A killed `iiot dev` leaves its broker running (it has a session of its own): the next
    start stops that one, so it saves its persistence file, and takes its port again."""
    data_dir = tmp_path / "var"
    leftover = start_mosquitto(data_dir / "mosquitto")  # its port, data directory, pid file
    (data_dir / "mosquitto" / "port").write_text(f"{leftover.port}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(
        IIOT_DATA_DIR=str(data_dir),
        IIOT_DATABASE_URL=database_url,
        IIOT_API_PORT=str(free_port()),
    )
    try:
        process, lines, seen = start_dev(env, "--no-dagster")
        try:
            assert wait_for(lines, seen, "Ready. Press Ctrl-C to stop.", START_TIMEOUT_S), seen
        finally:
            code = ctrl_c(process, lines, seen)
        output = "\n".join(seen)
        assert code == 0, output
        assert f"left running (pid {leftover.pid})" in output
        assert f"MQTT broker: {leftover.url} (mosquitto" in output
        assert not leftover.running
    finally:
        leftover.stop()


def iiot(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`iiot ...` from another shell: not in the checkout, without the stack's variables."""
    return subprocess.run(
        [sys.executable, "-m", "iiot_orchestration.cli", *args],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def runs_by_status(base: str) -> dict[str, list[str]]:
    runs = graphql(base, "{ runsOrError { ... on Runs { results { jobName status } } } }")
    found: dict[str, list[str]] = {}
    for run in runs["runsOrError"]["results"]:
        found.setdefault(run["status"], []).append(run["jobName"])
    return found


@pytest.fixture
def dagster_database(database_url, pg_server):
    """Dropped after the test: the Dagster database `iiot dev` creates next to ``database_url``."""
    name = psycopg.conninfo.conninfo_to_dict(dagster_url_for(database_url))["dbname"]
    yield name
    drop_database(pg_server, name)


def hold_dagster_table_creation(dagster_url: str, process: subprocess.Popen) -> int:
    """Make Dagster's first start race itself: an uncommitted `runs` table in Dagster's empty
    database holds every process that creates the storage (each one sees no table, creates
    them, and waits on this transaction) until two wait or one has waited 20 s; then roll back.
    Returns how many waited."""
    with psycopg.connect(dagster_url) as conn:
        conn.execute("CREATE TABLE runs (id int)")
        waiting_query = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        )
        first, waiting = None, 0
        deadline = time.monotonic() + START_TIMEOUT_S
        with psycopg.connect(dagster_url, autocommit=True) as watcher:
            while time.monotonic() < deadline and process.poll() is None:
                waiting = watcher.execute(waiting_query).fetchone()[0]
                first = first or (time.monotonic() if waiting else None)
                if waiting >= 2 or (first and time.monotonic() > first + 20):
                    break
                time.sleep(0.2)
        conn.rollback()
    return waiting


@pytest.mark.stack
def test_iiot_dev_creates_dagster_storage_once_and_shares_its_environment(
    tmp_path, database_url, dagster_database
):
    """On a new Dagster database the storage is created by one process before the webserver
    and the daemon start (made to race, they both created it: one retried, logging through the
    root logger, and wrote every later line twice); every Dagster log line is written once.

    `iiot dev` then writes its whole environment to <IIOT_DATA_DIR>/dev.env (mode 0600):
    sourced by a shell it gives DAGSTER_HOME and every IIOT_* variable of the stack, and `iiot
    dagster` runs the Dagster CLI with it, from any directory, at the first attempt."""
    data_dir = tmp_path / "var"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(
        IIOT_DATA_DIR=str(data_dir),
        IIOT_DATABASE_URL=database_url,
        IIOT_DAGSTER_PORT=str(port),
        IIOT_API_PORT=str(free_port()),
    )
    other_shell = {k: v for k, v in env.items() if k not in ("IIOT_DATABASE_URL",)}
    env_file = data_dir / "dev.env"
    dagster_url = dagster_url_for(database_url)
    ensure_database(dagster_url, dagster_database)
    process, lines, seen = start_dev(env)
    try:
        assert hold_dagster_table_creation(dagster_url, process) == 1
        assert wait_for(lines, seen, "Ready. Press Ctrl-C to stop.", START_TIMEOUT_S), seen
        output = "\n".join(seen)
        assert f"The stack's environment is in {env_file}" in output, output
        assert env_file.stat().st_mode & 0o777 == 0o600
        sourced = subprocess.run(
            ["bash", "-c", f". '{env_file}' && env"],
            env={"PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        for name in (
            "DAGSTER_HOME",
            "IIOT_DATA_DIR",
            "IIOT_DATABASE_URL",
            "IIOT_DAGSTER_DATABASE_URL",
            "IIOT_MQTT_URL",
            "IIOT_MAX_CONCURRENT_RUNS",
            "IIOT_API_HOST",
            "IIOT_API_PORT",
            "IIOT_API_RATE_PER_SECOND",
        ):
            assert any(line.startswith(f"{name}=") for line in sourced), (name, sourced)
        assert f"DAGSTER_HOME={data_dir / 'dagster_home'}" in sourced
        assert f"IIOT_DATABASE_URL={database_url}" in sourced
        assert f"IIOT_API_PORT={env['IIOT_API_PORT']}" in sourced

        materialized = iiot(
            other_shell,
            "dagster",
            "asset",
            "materialize",
            "-m",
            "iiot_orchestration.definitions",
            "--select",
            "telemetry_partitions",
        )
        assert materialized.returncode == 0, materialized.stdout + materialized.stderr
        base = f"http://127.0.0.1:{port}"
        runs = runs_by_status(base)
        assert runs.get("SUCCESS") == ["__ASSET_JOB"], runs
        assert "FAILURE" not in runs, runs

        # every argument reaches dagster, and its exit code comes back (2: a usage error)
        unknown = iiot(other_shell, "dagster", "run", "list", "--no-such-option")
        assert unknown.returncode == 2, unknown.stdout + unknown.stderr
        assert "Usage: dagster run list" in unknown.stderr
        assert "No such option '--no-such-option'" in unknown.stderr
    finally:
        code = ctrl_c(process, lines, seen)
    assert code == 0, "\n".join(seen)
    assert not env_file.exists()
    stopped = iiot(other_shell, "dagster", "run", "list")
    assert stopped.returncode == 1
    assert "no `iiot dev` stack is running" in stopped.stderr
    assert str(env_file) in stopped.stderr

    logs = data_dir / "logs"
    for name in ("dagster-storage", "dagster-webserver", "dagster-daemon"):
        text = (logs / f"{name}.log").read_text()
        assert "Retrying failed database creation" not in text, name
        # the format of a handler on the root logger, had anything installed one
        assert not re.search(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL):", text, re.M), text
    daemon_log = (logs / "dagster-daemon.log").read_text()
    assert daemon_log.count("Instance is configured with the following daemons") == 1


def test_iiot_dagster_refuses_an_env_file_whose_stack_is_gone(tmp_path):
    """A stack killed outright leaves its env file: `iiot dagster` says its process is gone
    instead of running Dagster against a stopped database."""
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    gone = subprocess.Popen(["true"])  # a pid no process has now
    gone.wait()
    (data_dir / "dev.env").write_text(
        f"# iiot dev pid {gone.pid}: the environment of the running `iiot dev` stack.\n"
        f"export DAGSTER_HOME='{data_dir / 'dagster_home'}'\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env["IIOT_DATA_DIR"] = str(data_dir)
    result = iiot(env, "dagster", "run", "list")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"(pid {gone.pid}) is no longer running" in result.stderr


# another Dagster webserver, as far as `iiot dev` can tell: its code location answers, loaded
FAKE_DAGSTER = """
import http.server, json, sys
LOCATIONS = {"data": {"workspaceOrError": {"locationEntries": [{"name": "other",
    "loadStatus": "LOADED", "locationOrLoadError": {"__typename": "RepositoryLocation"}}]}}}
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps(LOCATIONS).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
print("listening", flush=True)
server.serve_forever()
"""


@pytest.fixture
def other_dagster():
    """A process that answers on a port as a Dagster webserver would; yields (port, pid)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", FAKE_DAGSTER, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout.readline().strip() == "listening"
        assert code_locations(f"http://127.0.0.1:{port}")[0]["name"] == "other"
        yield port, server.pid
    finally:
        server.kill()
        server.wait()
        server.stdout.close()


def test_iiot_dev_stops_at_once_when_its_dagster_port_is_taken(tmp_path, other_dagster):
    """Another Dagster on IIOT_DAGSTER_PORT: `iiot dev` says which port, who holds it and which
    variable to change before it starts anything, and never says "Ready."."""
    port, pid = other_dagster
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(IIOT_DATA_DIR=str(tmp_path / "var"), IIOT_DAGSTER_PORT=str(port))
    process, lines, seen = start_dev(env)
    try:
        assert wait_for(lines, seen, "Stopped.", START_TIMEOUT_S), seen
        process.wait(60)
    finally:
        code = ctrl_c(process, lines, seen)
    output = "\n".join(seen)
    assert code == 1, output
    assert f"error: port {port} of the Dagster webserver is taken by pid {pid} (" in output
    assert "set IIOT_DAGSTER_PORT to a free port" in output
    assert "Ready." not in output
    assert "Database:" not in output  # nothing was started
    assert not (tmp_path / "var" / "pgdata").exists()


def test_iiot_dev_stops_at_once_when_its_api_port_is_taken(tmp_path, other_dagster):
    """Another server on IIOT_API_PORT (the fake Dagster will do): `iiot dev` names the port,
    its holder and IIOT_API_PORT before it starts anything."""
    port, pid = other_dagster
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(
        IIOT_DATA_DIR=str(tmp_path / "var"),
        IIOT_DAGSTER_PORT=str(free_port()),
        IIOT_API_PORT=str(port),
    )
    result = iiot(env, "dev")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"error: port {port} of the tenant API is taken by pid {pid} (" in result.stdout
    assert "set IIOT_API_PORT to a free port" in result.stdout
    assert "Database:" not in result.stdout
    assert not (tmp_path / "var" / "pgdata").exists()


def test_iiot_dev_names_the_api_host_it_cannot_listen_on(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(
        IIOT_DATA_DIR=str(tmp_path / "var"),
        IIOT_DAGSTER_PORT=str(free_port()),
        IIOT_API_HOST="192.0.2.1",
        IIOT_API_PORT="8123",
    )
    result = iiot(env, "dev", "--no-dagster")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cannot listen on 192.0.2.1:8123 (Cannot assign requested address)" in result.stdout
    assert "check IIOT_API_HOST and IIOT_API_PORT" in result.stdout


def test_iiot_dev_names_the_host_it_cannot_listen_on(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(IIOT_DATA_DIR=str(tmp_path / "var"), IIOT_DAGSTER_HOST="192.0.2.1")
    result = iiot(env, "dev")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cannot listen on 192.0.2.1:3000 (Cannot assign requested address)" in result.stdout
    assert "check IIOT_DAGSTER_HOST and IIOT_DAGSTER_PORT" in result.stdout


def test_ready_is_only_for_the_webserver_started_here(tmp_path, other_dagster):
    """The port was free when `iiot dev` checked it, and another Dagster took it before our
    webserver bound it: that one's answers are not taken for ours."""
    port, pid = other_dagster
    ours = subprocess.Popen(["sleep", "60"])  # alive, listening nowhere
    stack = DevStack("", "", "", tmp_path / "dagster_home")
    stack.processes["dagster-webserver"] = ours
    try:
        with pytest.raises(ServiceError) as raised:
            _wait_for_webserver(stack, "127.0.0.1", port, threading.Event())
    finally:
        ours.kill()
        ours.wait()
    message = str(raised.value)
    assert f"another process answers on 127.0.0.1:{port}" in message
    assert f"not the dagster-webserver started here (pid {ours.pid}) by pid {pid} (" in message
    assert "set IIOT_DAGSTER_PORT to a free port" in message


def test_the_api_is_ready_only_when_the_one_started_here_answers(
    tmp_path, other_dagster, monkeypatch
):
    """IIOT_API_PORT was free when `iiot dev` checked it, and another server took it before our
    API bound it: its answers are not taken for ours."""
    port, pid = other_dagster
    ours = subprocess.Popen(["sleep", "60"])  # alive, listening nowhere
    monkeypatch.setattr(dev, "_spawn", lambda *args: ours)
    settings = load_settings({"IIOT_API_PORT": str(port), "IIOT_DATA_DIR": str(tmp_path)})
    stack = DevStack("", "", "", tmp_path / "dagster_home")
    try:
        with pytest.raises(ServiceError) as raised:
            dev._start_api(settings, stack, print, threading.Event())
    finally:
        ours.kill()
        ours.wait()
    message = str(raised.value)
    assert f"another process answers on 127.0.0.1:{port}" in message
    assert f"not the tenant API started here (pid {ours.pid}) by pid {pid} (" in message
    assert "set IIOT_API_PORT to a free port" in message


def test_mosquitto_reports_a_bad_configuration_line(tmp_path):
    with pytest.raises(ServiceError, match='Unknown configuration variable "no_such_option"'):
        start_mosquitto(tmp_path / "mosquitto", extra_config="no_such_option true\n")


def test_mosquitto_keeps_its_data_across_a_restart_on_the_same_port(tmp_path):
    """Its persistence file is written (it runs as the invoking user, also under root), and a
    second start on the same data directory and port finds what the first one kept."""
    broker = start_mosquitto(tmp_path / "mosquitto")
    try:
        pid, port = broker.pid, broker.port
        assert pid is not None
        publish.single(
            "iiot/restart-test", b"kept", qos=1, retain=True, hostname=broker.host, port=port
        )
        broker.stop()
        assert broker.pid is None
        assert (tmp_path / "mosquitto" / "mosquitto.db").is_file()
        broker.restart()
        assert broker.port == port
        assert broker.pid not in (None, pid)
        message = subscribe.simple("iiot/restart-test", hostname=broker.host, port=port)
        assert message.payload == b"kept"
        assert message.retain
        broker.stop()
        again = start_mosquitto(tmp_path / "mosquitto", port=port)
        try:
            message = subscribe.simple("iiot/restart-test", hostname=again.host, port=port)
            assert message.payload == b"kept"
        finally:
            again.stop()
    finally:
        broker.stop()
