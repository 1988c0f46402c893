"""The gateway agent through a 30 s broker stop: its readings wait on disk, and what the
restarted broker answers "no matching subscribers" (the ingest slot's shared subscription is not
back yet) stays in its buffer and goes again once the slot has subscribed."""

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

from ingest_daemon.daemon import IngestConfig, IngestDaemon
from tests.certificate_helpers import PREFIX, make_device, make_tenant, start_tls_broker
from tests.ingest_helpers import count, wait_for
from tests.test_gateway_agent import MAC, ca, session_ca  # noqa: F401 - fixtures

STOP_S = 30.0
READINGS = 10_000  # of two metrics each (energy_kwh, power_w): 20,000 telemetry rows


def start_ingest(
    database_url, tls, group
) -> tuple[IngestDaemon, threading.Event, threading.Thread]:
    stop = threading.Event()
    daemon = IngestDaemon(
        IngestConfig(
            database_url=database_url,
            # as the platform, over mutual TLS: the broker's ACL lets only it read telemetry
            mqtt_url=tls.platform.url,
            mqtt_protocol=tls.platform.protocol,
            mqtt_ca_file=tls.platform.ca_file,
            mqtt_cert_file=tls.platform.cert_file,
            mqtt_key_file=tls.platform.key_file,
            prefix=PREFIX,
            group=group,
            batch_age_s=0.05,
            shared_subscription=True,
        )
    )
    thread = threading.Thread(target=daemon.run, args=(stop,))
    thread.start()
    assert daemon.connected.wait(30)
    return daemon, stop, thread


def test_agent_readings_survive_a_broker_stop(conn, database_url, ca, tmp_path):  # noqa: F811
    tls = start_tls_broker(conn, ca, tmp_path)
    make_tenant(conn)
    conn.execute("UPDATE plans SET messages_per_minute_per_device = 1000000")
    make_device(conn, ca, MAC, state_dir=tmp_path / "gateway")
    group = f"g{uuid.uuid4().hex[:6]}"
    gateway = tls.agent(MAC, tmp_path / "gateway", batch_max=250)
    start = datetime.now(UTC) - timedelta(hours=4)  # one reading a second, all in the past
    metrics = 0
    stop, thread = threading.Event(), None
    try:
        _daemon, stop, thread = start_ingest(database_url, tls, group)
        assert gateway.connect(), gateway.last_refusal
        for n in range(READINGS // 2):
            gateway.collect(start + timedelta(seconds=n))
        assert gateway.flush() == READINGS // 2
        metrics = count(conn, "device_metrics")
        assert wait_for(lambda: count(conn, "telemetry") == READINGS // 2 * metrics, timeout=60)
        # the slot stops (its session and shared subscription stay), then the broker does
        stop.set()
        thread.join(60)
        tls.broker.stop()
        for n in range(READINGS // 2, READINGS):
            gateway.collect(start + timedelta(seconds=n))
        assert gateway.flush() == 0  # the broker is away: the readings wait on disk
        time.sleep(STOP_S)
        tls.restart()
        gateway.disconnect()
        assert gateway.connect(), gateway.last_refusal
        # restarted, Mosquitto forgot the shared subscription: "no matching subscribers"
        assert gateway.flush() == 0
        assert len(gateway.buffer) == READINGS // 2
        _daemon, stop, thread = start_ingest(database_url, tls, group)
        assert gateway.flush() == READINGS // 2
        assert len(gateway.buffer) == 0
        expected = READINGS * metrics
        assert wait_for(lambda: count(conn, "telemetry") >= expected, timeout=60)
        time.sleep(0.5)  # anything delivered twice after the last count would show up as extra
        rows = conn.execute(
            "SELECT count(*), count(DISTINCT (device_id, metric, ts)) FROM telemetry"
        ).fetchone()
        assert rows == (expected, expected)
        assert expected >= 20_000
        assert count(conn, "dead_letters") == 0
    finally:
        stop.set()
        if thread is not None:
            thread.join(60)
        gateway.close()
        tls.broker.stop()
