"""`iiot dev`: the whole stack on embedded defaults, stopped cleanly by Ctrl-C."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from iiot_orchestration import migrate, registry
from iiot_orchestration.db import connect
from iiot_orchestration.errors import IiotError
from iiot_orchestration.services import (
    Broker,
    ServiceError,
    bind_error,
    ensure_database,
    free_port,
    listens_on,
    port_free,
    port_listeners,
    port_open,
    start_broker,
    start_embedded_postgres,
)
from iiot_orchestration.settings import Settings, dagster_url_for, describe, mask_password
from iiot_orchestration.signals import stop_on_signals

DEMO_TENANT = "demo"
DEMO_DEVICES = (
    registry.DeviceRequest("02:00:00:00:00:01", "energy", "Main switchboard"),
    registry.DeviceRequest("02:00:00:00:00:02", "energy", "Cold room"),
    registry.DeviceRequest("02:00:00:00:00:03", "water", "Main water inlet"),
    registry.DeviceRequest("02:00:00:00:00:04", "water", "Cooling tower"),
    registry.DeviceRequest("02:00:00:00:00:05", "gas", "Boiler"),
)
STARTUP_TIMEOUT_S = 180
ENV_FILE_NAME = "dev.env"
MQTT_HOST, MQTT_PORT = "127.0.0.1", 1883
INGEST_READY_TIMEOUT_S = 60
API_READY_TIMEOUT_S = 60
DEMO_RATE = 0.2  # messages per second per demo device
_LOCATIONS_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries {
    name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } }
} } } }
"""


def find_project_root(start: Path | None = None) -> Path:
    """The checkout that holds workspace.yaml and dagster.yaml."""
    candidates = [
        start or Path.cwd(),
        *(start or Path.cwd()).parents,
        Path(__file__).resolve().parents[1],
    ]
    for directory in candidates:
        if (directory / "workspace.yaml").is_file() and (directory / "dagster.yaml").is_file():
            return directory
    raise ServiceError(
        "cannot find workspace.yaml and dagster.yaml: run `iiot dev` from the project checkout"
    )


@dataclass
class DevStack:
    database_url: str
    dagster_database_url: str
    mqtt_url: str
    dagster_home: Path
    broker_kind: str | None = None  # the broker started here; None for IIOT_MQTT_URL's
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    broker: Broker | None = None


def code_locations(base_url: str, timeout: float = 5) -> list[dict[str, Any]]:
    """The Dagster webserver's code locations with their load status and errors."""
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"not a webserver URL: {base_url!r}")
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked above
        f"{base_url}/graphql",
        data=json.dumps({"query": _LOCATIONS_QUERY}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        body = json.load(response)
    return body["data"]["workspaceOrError"]["locationEntries"]


def seed_demo(database_url: str, echo: Callable[[str], None]) -> None:
    """A demo tenant with a few devices; running it again changes nothing."""
    with connect(database_url) as conn:
        if not registry.list_tenants(conn, DEMO_TENANT):
            registry.create_tenant(
                conn,
                slug=DEMO_TENANT,
                name="Demo Indústria",
                plan="pro",
                timezone="America/Sao_Paulo",
                actor="iiot-dev",
            )
        results = registry.provision_devices(conn, DEMO_TENANT, DEMO_DEVICES, actor="iiot-dev")
    added = sum(r.status == "provisioned" for r in results)
    echo(f"Demo tenant '{DEMO_TENANT}': {len(DEMO_DEVICES)} devices ({added} new).")


def _wait_for_webserver(
    stack: DevStack, host: str, port: int, stop: threading.Event
) -> list[dict[str, Any]]:
    """The code locations, once the webserver started here answers on ``host:port``: a server
    answering there that is not this child (another Dagster started meanwhile) stops `iiot dev`
    instead of being taken for it."""
    webserver = stack.processes["dagster-webserver"]
    log_dir = stack.dagster_home.parent / "logs"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline and not stop.is_set():
        for name, process in stack.processes.items():
            if process.poll() is not None:
                taken = DAGSTER_WEBSERVER.taken(host, port) if process is webserver else None
                raise ServiceError(
                    f"{name} exited with code {process.returncode} during start-up"
                    + (f": {taken}" if taken else f"; see {log_dir / (name + '.log')}")
                )
        # answered first, then ours: a child that binds in between is not taken for another
        if not port_open(host, port):
            stop.wait(1)
            continue
        if not listens_on(webserver.pid, port):
            raise ServiceError(
                f"another process answers on {host}:{port}, not the dagster-webserver started "
                f"here (pid {webserver.pid}){_holders(port)}: stop it, or set IIOT_DAGSTER_PORT "
                "to a free port"
            )
        try:
            locations = code_locations(f"http://{host}:{port}")
        except (OSError, urllib.error.URLError, KeyError, ValueError):
            stop.wait(1)
            continue
        if locations and all(loc["loadStatus"] == "LOADED" for loc in locations):
            errors = [
                f"{loc['name']}: {loc['locationOrLoadError'].get('message', '').strip()}"
                for loc in locations
                if (loc["locationOrLoadError"] or {}).get("__typename") == "PythonError"
            ]
            if errors:
                raise ServiceError("Dagster could not load its code:\n" + "\n".join(errors))
            return locations
        stop.wait(1)
    if stop.is_set():
        return []
    raise ServiceError(f"the Dagster webserver did not load its code within {STARTUP_TIMEOUT_S} s")


@dataclass(frozen=True)
class _Listener:
    """A server of the stack on a fixed port, and the variables that choose it."""

    what: str
    variable: str  # IIOT_DAGSTER, IIOT_API: <variable>_HOST and <variable>_PORT

    def taken(self, host: str, port: int) -> str | None:
        """Why it cannot listen on ``host:port``, naming the variable to change; None when it
        can."""
        error = bind_error(host, port)
        if error is None:
            return None
        if error.errno == errno.EADDRINUSE:
            return (
                f"port {port} of {self.what} is taken{_holders(port)}: stop what listens "
                f"there, or set {self.variable}_PORT to a free port"
            )
        return (
            f"{self.what} cannot listen on {host}:{port} ({error.strerror}): "
            f"check {self.variable}_HOST and {self.variable}_PORT"
        )


DAGSTER_WEBSERVER = _Listener("the Dagster webserver", "IIOT_DAGSTER")
TENANT_API = _Listener("the tenant API", "IIOT_API")


def _check_ports(settings: Settings, *, dagster: bool) -> None:
    """Before anything starts: the webserver's and the API's ports are the fixed ports of the
    stack (the broker moves to a free port when 1883 is taken, the ingest metrics take any free
    one)."""
    listeners = [(TENANT_API, settings.api_host, settings.api_port)]
    if dagster:
        listeners.insert(0, (DAGSTER_WEBSERVER, settings.dagster_host, settings.dagster_port))
    for listener, host, port in listeners:
        taken = listener.taken(host, port)
        if taken:
            raise ServiceError(taken)


def _holders(port: int) -> str:
    listeners = port_listeners(port)
    return "".join(f" by pid {pid} ({command})" for pid, command in listeners.items())


# set in the environment of the stack's processes when `iiot dev` starts the broker itself:
# TLS files meant for another broker do not apply to ours (plain MQTT on localhost)
_BROKER_TLS_VARIABLES = ("IIOT_MQTT_CA_FILE", "IIOT_MQTT_CERT_FILE", "IIOT_MQTT_KEY_FILE")


def _dagster_env(settings: Settings, stack: DevStack) -> dict[str, str]:
    """The environment of every process of the stack: this one's, with the stack's own
    services, an absolute data directory and Dagster's home."""
    env = dict(os.environ)
    env.update(
        DAGSTER_HOME=str(stack.dagster_home),
        IIOT_DATA_DIR=str(stack.dagster_home.parent),
        IIOT_DATABASE_URL=stack.database_url,
        IIOT_DAGSTER_DATABASE_URL=stack.dagster_database_url,
        IIOT_MQTT_URL=stack.mqtt_url,
        IIOT_MAX_CONCURRENT_RUNS=str(settings.max_concurrent_runs),
    )
    # the API's settings, effective values: another shell sees where the API listens
    env.update(
        {name: value for name, value, _ in describe(settings) if name.startswith("IIOT_API_")}
    )
    for name in _unset_variables(stack):
        env.pop(name, None)
    if stack.broker_kind == "amqtt":
        # it speaks only 3.1.1 (no need to try 5 first), and takes $share/... as a plain
        # filter that matches nothing: one ingest process on the plain filter
        env.update(IIOT_MQTT_PROTOCOL="3.1.1", IIOT_MQTT_SHARED_SUBSCRIPTION="off")
    return env


def _unset_variables(stack: DevStack) -> tuple[str, ...]:
    return _BROKER_TLS_VARIABLES if stack.broker_kind is not None else ()


def env_file_path(data_dir: Path) -> Path:
    return data_dir / ENV_FILE_NAME


def _write_env_file(settings: Settings, stack: DevStack, *, dagster: bool) -> Path:
    """The stack's IIOT_* variables and DAGSTER_HOME as a shell script (mode 0600: it holds the
    database URLs and whatever secrets this shell had), for another shell and `iiot dagster`."""
    path = env_file_path(stack.dagster_home.parent)
    env = _dagster_env(settings, stack)
    names = sorted(n for n in env if n.startswith("IIOT_"))
    if dagster:
        names.insert(0, "DAGSTER_HOME")
    lines = [
        f"# iiot dev pid {os.getpid()}: the environment of the running `iiot dev` stack.",
        f"# In another shell: . {shlex.quote(str(path))}   (or run `iiot dagster ...`)",
        *(f"export {name}={shlex.quote(env[name])}" for name in names),
        *(f"unset {name}" for name in _unset_variables(stack)),
    ]
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # an older file keeps its mode through O_CREAT
    with os.fdopen(descriptor, "w") as env_file:
        env_file.write("\n".join(lines) + "\n")
    return path


def _remove_env_file(path: Path) -> None:
    """Only the file this process wrote: another `iiot dev` may have replaced it."""
    with contextlib.suppress(OSError):
        if _env_file_pid(path.read_text()) == os.getpid():
            path.unlink()


def _env_file_pid(text: str) -> int | None:
    found = re.match(r"# iiot dev pid (\d+):", text)
    return int(found.group(1)) if found else None


def stack_environment(data_dir: Path, environ: dict[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default: this process's) with the IIOT_* variables and DAGSTER_HOME replaced
    by those of the `iiot dev` stack running on ``data_dir``, read from its env file."""
    path = env_file_path(data_dir.resolve())
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ServiceError(
            f"no `iiot dev` stack is running on {data_dir} ({path} does not exist): start "
            "`iiot dev`, or set IIOT_DATA_DIR to the data directory of the one running"
        ) from None
    pid = _env_file_pid(text)
    if pid is None or not _is_dev_process(pid):
        raise ServiceError(
            f"the `iiot dev` that wrote {path} (pid {pid}) is no longer running: start `iiot dev`"
        )
    stack_env: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"] and len(words) == 2 and "=" in words[1]:
            name, value = words[1].split("=", 1)
            stack_env[name] = value
    if "DAGSTER_HOME" not in stack_env:
        raise ServiceError(
            f"the `iiot dev` running as pid {pid} runs without Dagster (--no-dagster)"
        )
    base = os.environ if environ is None else environ
    env = {k: v for k, v in base.items() if not k.startswith("IIOT_") and k != "DAGSTER_HOME"}
    return env | stack_env


def _is_dev_process(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return _alive(pid) and b"dev" in command


def _spawn(
    name: str, args: list[str], env: dict[str, str], cwd: Path, log_dir: Path
) -> subprocess.Popen[bytes]:
    log_file = (log_dir / f"{name}.log").open("ab")
    # a session of its own: Ctrl-C reaches only `iiot dev`, which then stops the children in order
    return subprocess.Popen(
        args, env=env, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
    )


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the child's whole session (its own process group): the Dagster webserver and
    daemon start code servers of their own, which must not outlive them."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _stop_processes(
    processes: dict[str, subprocess.Popen[bytes]], echo: Callable[[str], None]
) -> None:
    """Everything that publishes first (the simulated fleet, and Dagster, which publishes
    certificate updates), then the ingest daemon once they have stopped, so that it lands and
    acknowledges what they sent; the broker and the database are stopped after this."""
    publishers = [name for name in processes if name != "ingest"]
    for stage in (publishers, [name for name in processes if name == "ingest"]):
        for name in stage:
            if processes[name].poll() is None:
                _signal_group(processes[name], signal.SIGTERM)
        for name in stage:
            process = processes[name]
            try:
                process.wait(40)  # the simulator waits up to 30 s for its acknowledgements
            except subprocess.TimeoutExpired:
                echo(f"{name} did not stop within 40 s; killing it")
                process.kill()
                process.wait()
            _signal_group(process, signal.SIGKILL)  # whatever of its group is left


def run_dev_stack(
    settings: Settings, *, dagster: bool = True, echo: Callable[[str], None] = print
) -> int:
    """Start everything, wait for Ctrl-C or SIGTERM, stop everything. Returns the exit code."""
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    exit_code = 0
    # the handlers stay until everything has stopped, so a second Ctrl-C cannot cut it short
    with stop_on_signals() as stop, ExitStack() as cleanup:
        try:
            _check_ports(settings, dagster=dagster)
            stack = _start(settings, data_dir, cleanup, echo)
            # unwound first: the processes stop before the broker and the database
            cleanup.callback(_stop_processes, stack.processes, echo)
            _start_ingest(settings, stack, echo, stop)
            if not stop.is_set():
                _start_api(settings, stack, echo, stop)
            if dagster and not stop.is_set():
                _start_dagster(settings, stack, cleanup, echo, stop)
            if not stop.is_set():
                env_file = _write_env_file(settings, stack, dagster=dagster)
                cleanup.callback(_remove_env_file, env_file)
                echo(f"The stack's environment is in {env_file}: in another shell")
                echo(f"  . {shlex.quote(str(env_file))}")
                if dagster:
                    echo("or run the Dagster CLI with it: iiot dagster <command> [options]")
                for line in _api_banner(settings):
                    echo(line)
                echo("Ready. Press Ctrl-C to stop.")
            while not stop.is_set():
                failed = [n for n, p in stack.processes.items() if p.poll() is not None]
                if stack.broker is not None and not stack.broker.running:
                    failed.append(f"the MQTT broker ({stack.broker.kind})")
                if failed:
                    echo(f"{', '.join(failed)} stopped unexpectedly; see {data_dir / 'logs'}")
                    exit_code = 1
                    break
                stop.wait(1)
        except IiotError as exc:
            echo(f"error: {exc}")
            exit_code = 1
        finally:
            echo("Stopping...")
    echo("Stopped.")
    return exit_code


def _start(
    settings: Settings, data_dir: Path, cleanup: ExitStack, echo: Callable[[str], None]
) -> DevStack:
    if settings.database_url:
        database_url = settings.database_url
        echo(f"Database: {mask_password(database_url)} (IIOT_DATABASE_URL)")
    else:
        echo("Starting embedded PostgreSQL...")
        server = start_embedded_postgres(data_dir / "pgdata")
        cleanup.callback(server.stop)
        database_url = server.url("iiot")
        echo(f"Database: {database_url} (embedded)")
    dagster_url = settings.dagster_database_url or dagster_url_for(database_url)
    for url in (database_url, dagster_url):
        ensure_database(url, conninfo_to_dict(url)["dbname"])
    migrate.migrate(database_url, settings.storage, echo=echo)
    seed_demo(database_url, echo)

    broker = None
    if settings.mqtt_url:
        mqtt_url = settings.mqtt_url
        echo(f"MQTT broker: {mqtt_url} (IIOT_MQTT_URL)")
    else:
        broker_dir = data_dir / "mosquitto"
        broker_dir.mkdir(parents=True, exist_ok=True)
        _stop_leftover_broker(broker_dir, echo)
        broker = start_broker(broker_dir, MQTT_HOST, _broker_port(broker_dir, echo))
        cleanup.callback(broker.stop)
        (broker_dir / "port").write_text(f"{broker.port}\n")
        mqtt_url = broker.url
        where = "in this process" if broker.kind == "amqtt" else f"data and log in {broker_dir}"
        echo(f"MQTT broker: {mqtt_url} ({broker.kind}; {where})")
    return DevStack(
        database_url,
        dagster_url,
        mqtt_url,
        data_dir / "dagster_home",
        broker.kind if broker else None,
        broker=broker,
    )


def _stop_leftover_broker(broker_dir: Path, echo: Callable[[str], None]) -> None:
    """The broker runs in a session of its own, so an `iiot dev` killed outright (SIGKILL, a
    closed terminal) leaves it running on our port and data directory: stop it (SIGTERM, on
    which it saves its persistence file), once its command line shows it is ours."""
    try:
        pid = int((broker_dir / "mosquitto.pid").read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if str(broker_dir / "mosquitto.conf").encode() not in command:
        return
    echo(f"Stopping the broker a previous `iiot dev` left running (pid {pid})...")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while _alive(pid):
        if time.monotonic() > deadline:
            raise ServiceError(f"the broker left running (pid {pid}) did not stop within 15 s")
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; its parent has not collected it yet


def _broker_port(broker_dir: Path, echo: Callable[[str], None]) -> int | None:
    """The port of the previous start when it is free, so that the URLs printed then still
    hold; else the usual MQTT port when it is free, so that devices need no configuration;
    else None (any free port)."""
    with contextlib.suppress(OSError, ValueError):
        port = int((broker_dir / "port").read_text())
        if port_free(MQTT_HOST, port):
            return port
        echo(f"MQTT port {port} of the previous start is taken: the broker moves")
    return MQTT_PORT if port_free(MQTT_HOST, MQTT_PORT) else None


def _start_ingest(
    settings: Settings, stack: DevStack, echo: Callable[[str], None], stop: threading.Event
) -> None:
    """The ingest daemon and a small simulated fleet of the demo tenant, so the demo has data.
    The fleet starts once ingest has subscribed: a broker drops what it accepts for a topic
    nobody has subscribed to yet."""
    log_dir = stack.dagster_home.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = _dagster_env(settings, stack)
    iiot = [sys.executable, "-m", "iiot_orchestration.cli"]
    metrics_port = free_port(settings.dagster_host)
    stack.processes["ingest"] = _spawn(
        "ingest", [*iiot, "ingest", "--metrics-port", str(metrics_port)], env, Path.cwd(), log_dir
    )
    _wait_for_ingest(stack.processes["ingest"], metrics_port, log_dir, stop)
    if stop.is_set():
        return
    stack.processes["simulator"] = _spawn(
        "simulator",
        [*iiot, "simulate", "--tenant", DEMO_TENANT, "--rate", str(DEMO_RATE)],
        env,
        Path.cwd(),
        log_dir,
    )
    echo(
        f"Ingest daemon and a {len(DEMO_DEVICES)}-device simulated fleet started "
        f"(metrics on http://{settings.dagster_host}:{metrics_port}/metrics)"
    )
    if stack.broker_kind == "amqtt":
        echo(
            "amqtt speaks MQTT 3.1.1 without shared subscriptions: ingest runs as one process on "
            "the plain topic filter (install mosquitto for MQTT 5 and shared subscriptions)"
        )


def _wait_for_ingest(
    ingest: subprocess.Popen[bytes], metrics_port: int, log_dir: Path, stop: threading.Event
) -> None:
    """Until its /health/ready answers 200: subscribed, and able to commit."""
    url = f"http://127.0.0.1:{metrics_port}/health/ready"
    deadline = time.monotonic() + INGEST_READY_TIMEOUT_S
    while not stop.is_set():
        if ingest.poll() is not None:
            raise ServiceError(
                f"ingest exited with code {ingest.returncode} during start-up; "
                f"see {log_dir / 'ingest.log'}"
            )
        # a 503 (not ready yet) is an HTTPError, an OSError like a refused connection
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        if time.monotonic() > deadline:
            raise ServiceError(
                f"ingest was not ready within {INGEST_READY_TIMEOUT_S} s; "
                f"see {log_dir / 'ingest.log'}"
            )
        stop.wait(0.2)


def _local(host: str) -> str:
    """Where to reach a server listening on ``host``: a wildcard address is reached locally."""
    wildcards = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - not a bind
    return wildcards.get(host, host)


def _api_address(settings: Settings) -> str:
    host = _local(settings.api_host)
    return f"{f'[{host}]' if ':' in host else host}:{settings.api_port}"


def api_url(settings: Settings) -> str:
    """The API's base URL as a client on this machine reaches it."""
    return f"http://{_api_address(settings)}"


def _start_api(
    settings: Settings, stack: DevStack, echo: Callable[[str], None], stop: threading.Event
) -> None:
    """`iiot api` on IIOT_API_HOST:IIOT_API_PORT, once its /health/ready answers 200 (the
    database answers and has the API's migration) from this child, not another server."""
    log_dir = stack.dagster_home.parent / "logs"
    iiot = [sys.executable, "-m", "iiot_orchestration.cli"]
    api = stack.processes["api"] = _spawn(
        "api", [*iiot, "api"], _dagster_env(settings, stack), Path.cwd(), log_dir
    )
    ready = f"http://{_api_address(settings)}/health/ready"
    deadline = time.monotonic() + API_READY_TIMEOUT_S
    while not stop.is_set():
        if api.poll() is not None:
            taken = TENANT_API.taken(settings.api_host, settings.api_port)
            raise ServiceError(
                f"the tenant API exited with code {api.returncode} during start-up"
                + (f": {taken}" if taken else f"; see {log_dir / 'api.log'}")
            )
        # answered first, then ours: a child that binds in between is not taken for another
        if port_open(_local(settings.api_host), settings.api_port, timeout=0.2):
            if not listens_on(api.pid, settings.api_port):
                raise ServiceError(
                    f"another process answers on {settings.api_host}:{settings.api_port}, not "
                    f"the tenant API started here (pid {api.pid}){_holders(settings.api_port)}: "
                    "stop it, or set IIOT_API_PORT to a free port"
                )
            with contextlib.suppress(OSError), urllib.request.urlopen(ready, timeout=2) as answer:
                if answer.status == 200:
                    echo(f"Tenant API started (log {log_dir / 'api.log'})")
                    return
        if time.monotonic() > deadline:
            raise ServiceError(
                f"the tenant API was not ready within {API_READY_TIMEOUT_S} s; "
                f"see {log_dir / 'api.log'}"
            )
        stop.wait(0.2)


def _api_banner(settings: Settings) -> list[str]:
    base = api_url(settings)
    return [
        f"Tenant API: {base}/api/v1  (docs {base}/api/v1/docs, metrics {base}/metrics)",
        f"  a key: iiot api-keys create --tenant {DEMO_TENANT} --role viewer --name dev",
    ]


def _prepare_dagster_storage(
    bin_dir: Path, env: dict[str, str], root: Path, log_dir: Path, stop: threading.Event
) -> None:
    """Create (or upgrade) Dagster's storage in one process before the webserver and the daemon
    start. Left to them, both create the tables at once on a new database; the loser logs
    "Retrying failed database creation" through the root logger, which installs a handler there
    (``logging.basicConfig``), and from then on that process writes every log line twice."""
    log_path = log_dir / "dagster-storage.log"
    migrate_args = [str(bin_dir / "dagster"), "instance", "migrate"]
    process = _spawn("dagster-storage", migrate_args, env, root, log_dir)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while process.poll() is None:
        if stop.is_set() or time.monotonic() > deadline:
            _signal_group(process, signal.SIGTERM)
            process.wait()
            if stop.is_set():
                return
            raise ServiceError(
                f"Dagster's storage was not ready within {STARTUP_TIMEOUT_S} s; see {log_path}"
            )
        stop.wait(0.2)
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise ServiceError(
            f"`dagster instance migrate` exited with code {process.returncode}; see {log_path}:\n"
            + "\n".join(tail)
        )


def _start_dagster(
    settings: Settings,
    stack: DevStack,
    cleanup: ExitStack,
    echo: Callable[[str], None],
    stop: threading.Event,
) -> None:
    root = find_project_root()
    stack.dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / "dagster.yaml", stack.dagster_home / "dagster.yaml")
    log_dir = stack.dagster_home.parent / "logs"
    log_dir.mkdir(exist_ok=True)
    env = _dagster_env(settings, stack)
    bin_dir = Path(sys.executable).parent
    host, port = settings.dagster_host, settings.dagster_port
    workspace = str(root / "workspace.yaml")
    _prepare_dagster_storage(bin_dir, env, root, log_dir, stop)
    if stop.is_set():
        return
    echo("Starting the Dagster webserver and daemon...")
    stack.processes["dagster-webserver"] = _spawn(
        "dagster-webserver",
        [str(bin_dir / "dagster-webserver"), "-h", host, "-p", str(port), "-w", workspace],
        env,
        root,
        log_dir,
    )
    stack.processes["dagster-daemon"] = _spawn(
        "dagster-daemon",
        [str(bin_dir / "dagster-daemon"), "run", "-w", workspace],
        env,
        root,
        log_dir,
    )
    base_url = f"http://{host}:{port}"
    locations = _wait_for_webserver(stack, host, port, stop)
    for location in locations:
        echo(f"Code location {location['name']}: {location['loadStatus'].lower()}")
    if locations:
        echo(f"Dagster UI: {base_url}  (logs in {log_dir})")
