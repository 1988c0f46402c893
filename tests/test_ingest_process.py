"""`iiot ingest` as a process: killed or stopped mid-stream, restarted, nothing lost or doubled."""

import signal
import subprocess
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import paho.mqtt.client as mqtt
import pytest

from ingest_daemon.daemon import IngestConfig, IngestDaemon
from tests.ingest_helpers import MAC, count, provision, start_ingest_process, wait_for

STREAM = 20_000


def stream(total: int) -> list[bytes]:
    start = datetime.now(UTC) - timedelta(minutes=30)
    return [
        orjson.dumps(
            {
                "ts": (start + timedelta(milliseconds=i)).isoformat(),
                "metrics": {"energy_kwh": float(i)},
            }
        )
        for i in range(total)
    ]


def publish_in_background(
    broker, payloads, *, pause_at: int | None = None, resume: threading.Event | None = None
) -> threading.Thread:
    """Publish the payloads; with ``pause_at``, publish that many, wait for ``resume``, then
    the rest (a stream that goes on after the daemon is stopped, however fast it drained)."""

    def run():
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.max_queued_messages_set(0)
        client.connect(broker.host, broker.port)
        client.loop_start()
        split = len(payloads) if pause_at is None else pause_at
        infos = [
            client.publish(f"iiot/devices/{MAC}/telemetry", p, qos=1) for p in payloads[:split]
        ]
        if resume is not None:
            resume.wait(120)
        infos += [
            client.publish(f"iiot/devices/{MAC}/telemetry", p, qos=1) for p in payloads[split:]
        ]
        for info in infos:
            info.wait_for_publish(60)
        client.loop_stop()
        client.disconnect()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def create_session(database_url, broker, group, slot=0):
    """Start and stop a slot once, so that the broker keeps its session while it is down."""
    stop = threading.Event()
    daemon = IngestDaemon(
        IngestConfig(database_url=database_url, mqtt_url=broker.url, group=group, slot=slot)
    )
    thread = threading.Thread(target=daemon.run, args=(stop,))
    thread.start()
    assert daemon.connected.wait(15)
    stop.set()
    thread.join(30)


def start_ingest(database_url, broker, group, tmp_path, slot=0, slots=1) -> subprocess.Popen:
    return start_ingest_process(
        database_url,
        broker.url,
        tmp_path / "var",
        *("--group", group, "--metrics-port", "0", "--slot", str(slot), "--slots", str(slots)),
    )


def assert_exactly_the_stream(conn, total):
    rows = conn.execute(
        "SELECT count(*), count(DISTINCT value), min(value), max(value) FROM telemetry"
    ).fetchone()
    assert rows == (total, total, 0.0, float(total - 1))
    assert count(conn, "dead_letters") == 0


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_stop_mid_stream_then_restart_loses_and_doubles_nothing(
    conn, database_url, ingest_broker, tmp_path, how
):
    broker = ingest_broker
    provision(conn, "enterprise")
    conn.execute("UPDATE plans SET messages_per_minute_per_device = 1000000")
    group = f"g{uuid.uuid4().hex[:6]}"
    create_session(database_url, broker, group)
    process = start_ingest(database_url, broker, group, tmp_path)
    # the second half is published once the signal is sent: the daemon drains a backlog faster
    # than it can be published, so a stream published whole may be in before the signal lands
    resume = threading.Event()
    publisher = publish_in_background(broker, stream(STREAM), pause_at=STREAM // 2, resume=resume)
    try:
        assert wait_for(lambda: count(conn, "telemetry") >= STREAM // 4, timeout=120)
        process.send_signal(how)
        resume.set()
        output = process.communicate(timeout=60)[0]
        if how == signal.SIGTERM:
            assert process.returncode == 0, output
            assert "Stopped:" in output
        else:
            assert process.returncode == -signal.SIGKILL
        landed_before_restart = count(conn, "telemetry")
        assert landed_before_restart < STREAM
        publisher.join(120)
        process = start_ingest(database_url, broker, group, tmp_path)
        assert wait_for(lambda: count(conn, "telemetry") >= STREAM, timeout=180)
        time.sleep(0.5)  # anything re-delivered after the last count would show up as extra
        assert_exactly_the_stream(conn, STREAM)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=60)
        resume.set()
        publisher.join(120)
    assert process.returncode == 0


def test_two_slots_one_killed_mid_stream_and_restarted(conn, database_url, ingest_broker, tmp_path):
    broker = ingest_broker
    provision(conn, "enterprise")
    conn.execute("UPDATE plans SET messages_per_minute_per_device = 1000000")
    group = f"g{uuid.uuid4().hex[:6]}"
    for slot in (0, 1):
        create_session(database_url, broker, group, slot)
    slots = [start_ingest(database_url, broker, group, tmp_path, slot, 2) for slot in (0, 1)]
    publisher = publish_in_background(broker, stream(STREAM))
    try:
        assert wait_for(lambda: count(conn, "telemetry") >= STREAM // 4, timeout=120)
        slots[1].send_signal(signal.SIGKILL)
        slots[1].communicate(timeout=60)
        publisher.join(120)
        # slot 1's session kept receiving its share while it was down; it gets it back now
        slots[1] = start_ingest(database_url, broker, group, tmp_path, 1, 2)
        assert wait_for(lambda: count(conn, "telemetry") >= STREAM, timeout=180)
        time.sleep(0.5)  # anything re-delivered after the last count would show up as extra
        assert_exactly_the_stream(conn, STREAM)
    finally:
        for process in slots:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.communicate(timeout=60)
        publisher.join(120)
    assert [process.returncode for process in slots] == [0, 0]
