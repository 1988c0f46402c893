"""`iiot ingest` supervised: a slot killed mid-stream is restarted, the slots of a parent killed
with SIGKILL go with it, a slot's configuration error stops them all, and a daemon started
before the database or the broker waits for them. Nothing is lost or doubled."""

import os
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from iiot_orchestration.services import free_port, start_mosquitto
from ingest_daemon.daemon import IngestConfig, IngestDaemon
from tests.ingest_helpers import (
    count,
    database_refusing_ingest,
    provision,
    start_ingest_process,
    wait_for,
)
from tests.test_ingest_process import (
    STREAM,
    assert_exactly_the_stream,
    create_session,
    publish_in_background,
    stream,
)


def ingest(database_url, mqtt_url, log_path: Path, *args: str) -> subprocess.Popen:
    """`iiot ingest ...`, its output in ``log_path`` (a pipe nobody reads could fill up)."""
    with log_path.open("a") as output:
        return start_ingest_process(
            database_url, mqtt_url, log_path.parent / "var", *args, output=output
        )


def stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.wait(90)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; reaping it is its new parent's business


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    found = children(pid)
    for child in list(found):
        found += descendants(child)
    return found


def slot_pid(parent: int, slot: int) -> int | None:
    """The running process of ``slot`` under ``parent``."""
    for pid in children(parent):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"--slot" in args and args[args.index(b"--slot") + 1] == str(slot).encode():
            return pid
    return None


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:  # 503 while not ready
        exc.close()  # its socket, else a ResourceWarning whenever it is collected
        return exc.code, ""
    except OSError:
        return 0, ""


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports."""
    while True:
        base = free_port()
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base


@pytest.fixture
def enterprise(conn):
    provision(conn, "enterprise")
    conn.execute("UPDATE plans SET messages_per_minute_per_device = 1000000")


def sessions(database_url, broker, slots) -> str:
    """A fresh group whose slots' sessions exist, so that the broker keeps their share."""
    group = f"g{uuid.uuid4().hex[:6]}"
    for slot in range(slots):
        create_session(database_url, broker, group, slot)
    return group


def test_a_slot_killed_mid_stream_is_restarted(
    conn, database_url, ingest_broker, tmp_path, enterprise
):
    broker = ingest_broker
    group = sessions(database_url, broker, 2)
    metrics = free_port()
    log = tmp_path / "ingest.log"
    parent = ingest(
        database_url,
        broker.url,
        log,
        *("--processes", "2", "--group", group, "--metrics-port", "0"),
        *("--supervisor-metrics-port", str(metrics)),
    )
    resume = threading.Event()
    publisher = publish_in_background(broker, stream(STREAM), pause_at=STREAM // 2, resume=resume)
    try:
        assert wait_for(lambda: count(conn, "telemetry") >= STREAM // 4, timeout=120)
        killed = slot_pid(parent.pid, 1)
        os.kill(killed, signal.SIGKILL)
        resume.set()
        assert wait_for(lambda: slot_pid(parent.pid, 1) not in (None, killed), timeout=60)
        publisher.join(120)
        assert wait_for(lambda: count(conn, "telemetry") >= STREAM, timeout=120)
        assert wait_for(lambda: http_get(f"http://127.0.0.1:{metrics}/health/ready")[0] == 200)
        text = http_get(f"http://127.0.0.1:{metrics}/metrics")[1]
        assert 'iiot_ingest_slot_restarts_total{slot="1"} 1.0' in text
        assert 'iiot_ingest_slot_restarts_total{slot="0"} 0.0' in text
        assert_exactly_the_stream(conn, STREAM)
    finally:
        resume.set()
        code = stop(parent)
        publisher.join(120)
    output = log.read_text()
    assert code == 0, output
    assert output.count("Stopped:") == 2  # both slots drained
    assert "slot 1 was killed by SIGKILL after" in output
    assert "restarting it in 1 s" in output
    assert_exactly_the_stream(conn, STREAM)


def test_the_slots_of_a_killed_parent_go_with_it(
    conn, database_url, ingest_broker, tmp_path, enterprise
):
    """No orphan keeps the client ids or the metrics ports: a new parent takes over at once."""
    broker = ingest_broker
    group = sessions(database_url, broker, 2)
    base = free_ports(2)
    args = ("--processes", "2", "--group", group, "--metrics-port", str(base))
    parent = ingest(database_url, broker.url, tmp_path / "first.log", *args)
    resume = threading.Event()
    publisher = publish_in_background(broker, stream(STREAM), pause_at=STREAM // 2, resume=resume)
    second = None
    try:
        assert wait_for(lambda: count(conn, "telemetry") >= STREAM // 4, timeout=120)
        slots_and_writers = descendants(parent.pid)
        assert len(slots_and_writers) >= 4  # two slots and their writer processes
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        resume.set()
        assert wait_for(lambda: not any(map(alive, slots_and_writers)), timeout=60)
        assert count(conn, "telemetry") < STREAM
        second = ingest(database_url, broker.url, tmp_path / "second.log", *args)
        publisher.join(120)
        assert wait_for(lambda: count(conn, "telemetry") >= STREAM, timeout=120)
        for port in (base, base + 1):
            assert wait_for(lambda p=port: http_get(f"http://127.0.0.1:{p}/health/ready")[0] == 200)
        assert_exactly_the_stream(conn, STREAM)
    finally:
        resume.set()
        if parent.poll() is None:
            parent.kill()
        code = stop(second) if second is not None else None
        publisher.join(120)
    output = (tmp_path / "second.log").read_text()
    assert code == 0, output
    assert "restarting" not in output  # no slot of the new parent failed on a port or an id
    first = (tmp_path / "first.log").read_text()
    assert first.count("gone: stopping") == 2
    assert first.count("Stopped:") == 2  # drained: what they had committed, acknowledged


def test_a_slot_with_a_configuration_error_stops_the_parent(database_url, tmp_path):
    """The broker refuses the client (no user name): both slots would fail forever."""
    broker = start_mosquitto(tmp_path / "mosquitto", extra_config="allow_anonymous false\n")
    log = tmp_path / "ingest.log"
    try:
        parent = ingest(database_url, broker.url, log, "--processes", "2", "--metrics-port", "0")
        code = parent.wait(60)
    finally:
        broker.stop()
    output = log.read_text()
    assert code == 2, output
    assert "refused the connection (MQTT 5): Not authorized" in output
    assert "exited with a configuration error (exit 2): stopping every slot" in output
    assert "restarting" not in output


def test_a_daemon_started_before_the_database_waits_for_it(
    conn, database_url, pg_server, ingest_broker, tmp_path, enterprise
):
    broker = ingest_broker
    group = sessions(database_url, broker, 1)
    port = free_port()
    ready = f"http://127.0.0.1:{port}/health/ready"
    log = tmp_path / "ingest.log"
    with database_refusing_ingest(pg_server, database_url):
        process = ingest(
            database_url, broker.url, log, "--group", group, "--metrics-port", str(port)
        )
        try:
            assert wait_for(lambda: "retrying in 1 s" in log.read_text(), timeout=60)
            assert wait_for(lambda: http_get(ready)[0] == 503)
            publish_in_background(broker, stream(STREAM)).join(120)
            # the outage goes on (a wait, not a check): 20 s in all, retried with backoff
            assert not wait_for(lambda: process.poll() is not None, timeout=15)
            assert wait_for(lambda: http_get(ready)[0] == 503)
            assert count(conn, "telemetry") == 0
        except BaseException:
            stop(process)
            raise
    try:
        assert wait_for(lambda: count(conn, "telemetry") >= STREAM, timeout=120)
        assert wait_for(lambda: http_get(ready)[0] == 200)
        assert_exactly_the_stream(conn, STREAM)
    finally:
        code = stop(process)
    output = log.read_text()
    assert code == 0, output
    assert "database unavailable at start" in output
    assert "connected to the database" in output


def test_a_daemon_started_before_the_broker_waits_for_it(conn, database_url, tmp_path, enterprise):
    port = free_port()
    log = tmp_path / "ingest.log"
    process = ingest(database_url, f"mqtt://127.0.0.1:{port}", log, "--metrics-port", "0")
    broker = None
    try:
        assert wait_for(lambda: "retrying in 1 s" in log.read_text(), timeout=60)
        assert "Connection refused" in log.read_text()
        broker = start_mosquitto(tmp_path / "mosquitto", port=port)
        assert wait_for(lambda: "subscribed" in log.read_text(), timeout=60)
        publish_in_background(broker, stream(2_000)).join(120)
        assert wait_for(lambda: count(conn, "telemetry") >= 2_000, timeout=60)
        assert_exactly_the_stream(conn, 2_000)
    finally:
        code = stop(process)
        if broker is not None:
            broker.stop()
    assert code == 0, log.read_text()


@pytest.mark.parametrize("writer_process", [False, True], ids=["one-process", "writer-process"])
def test_a_stop_while_waiting_for_the_database_is_clean(
    conn, database_url, pg_server, ingest_broker, writer_process, caplog
):
    stop_event = threading.Event()
    daemon = IngestDaemon(
        IngestConfig(
            database_url=database_url,
            mqtt_url=ingest_broker.url,
            group=f"g{uuid.uuid4().hex[:6]}",
            writer_process=writer_process,
        )
    )
    with database_refusing_ingest(pg_server, database_url):
        thread = threading.Thread(target=daemon.run, args=(stop_event,))
        thread.start()
        assert wait_for(lambda: "database unavailable at start" in caplog.text)
        assert not daemon.ready()
        stop_event.set()
        thread.join(30)
    assert not thread.is_alive()
    assert daemon.counters.received == 0
    assert not daemon.connected.is_set()  # it never went to the broker
