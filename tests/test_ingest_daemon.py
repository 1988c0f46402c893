"""The ingest loop against a real Mosquitto (started with the project's configuration) and
PostgreSQL."""

import contextlib
import logging
import threading
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import paho.mqtt.client as mqtt
import pytest

from iiot_orchestration.services import free_port
from ingest_daemon.daemon import IngestConfig, IngestDaemon
from ingest_daemon.metrics import RETRY_REASONS
from tests.ingest_helpers import MAC, count, database_refusing_ingest, provision, wait_for


@pytest.fixture
def publisher(ingest_broker):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(ingest_broker.host, ingest_broker.port)
    client.loop_start()
    yield client
    client.loop_stop()
    client.disconnect()


@pytest.fixture(params=[False, True], ids=["one-process", "writer-process"])
def writer_process(request):
    """The slot judges and commits in paho's process, or in its writer process."""
    return request.param


def reading(minutes_ago: int, value: float) -> bytes:
    ts = (datetime.now(UTC) - timedelta(minutes=minutes_ago)).isoformat()
    return orjson.dumps({"ts": ts, "metrics": {"energy_kwh": value}})


def publish_all(client, messages):
    for topic, payload in messages:
        client.publish(topic, payload, qos=1).wait_for_publish(10)


class Running:
    def __init__(self, database_url, broker, group=None, metrics_port=None, **config):
        """A daemon in a thread, in a fresh group unless ``group`` is given."""
        group = group or f"g{uuid.uuid4().hex[:6]}"
        self.stop = threading.Event()
        self.daemon = IngestDaemon(
            IngestConfig(
                database_url=database_url,
                mqtt_url=broker.url,
                group=group,
                batch_age_s=0.05,
                metrics_port=metrics_port,
                **config,
            )
        )
        self.thread = threading.Thread(target=self.daemon.run, args=(self.stop,))
        self.thread.start()
        assert self.daemon.connected.wait(15)  # set on the SUBACK

    def finish(self):
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        return self.daemon.counters


def test_stream_lands_valid_readings_and_dead_letters_the_rest(
    conn, database_url, ingest_broker, publisher, writer_process
):
    provision(conn)
    topic = f"iiot/devices/{MAC}/telemetry"
    good = [(topic, reading(i, 1000 + i)) for i in range(1, 41)]
    bad = [
        (topic, b"\x00\xff garbage"),
        (topic, b'{"ts": "2026-11-22T10:00:00Z", "metrics": {"energy_kwh": NaN}}'),
        ("iiot/devices/02:00:00:00:00:99/telemetry", reading(1, 1)),
        (topic, b"[" * 3000),
        (topic, orjson.dumps({"ts": "now", "metrics": {"energy_kwh": 1}})),
        (
            topic,
            orjson.dumps(
                {
                    "ts": datetime.now(UTC).isoformat(),
                    "metrics": {"robert'); DROP TABLE students;--": 1},
                }
            ),
        ),
    ]
    running = Running(database_url, ingest_broker, writer_process=writer_process)
    try:
        publish_all(publisher, good[:20] + bad + good[20:] + good[:5])  # 5 re-deliveries
        assert wait_for(lambda: count(conn, "telemetry") == 40 and count(conn, "dead_letters") == 6)
    finally:
        counters = running.finish()
    assert counters.received == 40 + 6 + 5
    assert (counters.landed, counters.duplicates, counters.dead_letters) == (40, 5, 6)
    reasons = sorted(r[0] for r in conn.execute("SELECT reason FROM dead_letters"))
    assert reasons == [
        "bad_timestamp",
        "malformed_json",
        "malformed_json",
        "malformed_json",
        "unknown_device",
        "unknown_metric",
    ]
    assert conn.execute("SELECT last_seen IS NOT NULL FROM devices").fetchone()[0]


def test_messages_sent_while_stopped_arrive_after_restart(
    conn, database_url, ingest_broker, publisher
):
    provision(conn)
    group = f"g{uuid.uuid4().hex[:6]}"
    Running(database_url, ingest_broker, group).finish()  # the persistent session now exists
    publish_all(publisher, [(f"iiot/devices/{MAC}/telemetry", reading(i, i)) for i in range(1, 11)])
    running = Running(database_url, ingest_broker, group)
    try:
        assert wait_for(lambda: count(conn, "telemetry") == 10)
    finally:
        running.finish()


@pytest.mark.parametrize(("plan", "landed", "limited"), [("starter", 6, 4), ("enterprise", 10, 0)])
def test_message_rate_quota(
    conn, database_url, ingest_broker, publisher, plan, landed, limited, writer_process
):
    provision(conn, plan)
    conn.execute("UPDATE plans SET messages_per_minute_per_device = 6")
    running = Running(database_url, ingest_broker, writer_process=writer_process)
    try:
        publish_all(
            publisher, [(f"iiot/devices/{MAC}/telemetry", reading(i, i)) for i in range(1, 11)]
        )
        assert wait_for(lambda: count(conn, "telemetry") + count(conn, "dead_letters") == 10)
    finally:
        counters = running.finish()
    assert count(conn, "telemetry") == landed
    assert count(conn, "dead_letters", "reason = 'rate_limited'") == limited
    overage = 4 if plan == "enterprise" else 0
    assert counters.overage == overage
    # persisted for billing in the batch's transaction: accepted messages, readings, overage
    usage = conn.execute(
        "SELECT sum(messages), sum(readings), sum(overage_messages) FROM ingest_usage"
    ).fetchone()
    assert usage == (landed, landed, overage)


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_metrics_and_health_endpoints(conn, database_url, ingest_broker, publisher, writer_process):
    provision(conn)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    running = Running(database_url, ingest_broker, metrics_port=port, writer_process=writer_process)
    try:
        assert get(f"{base}/health/live") == (200, "live\n")
        assert get(f"{base}/health/ready") == (200, "ready\n")
        topic = f"iiot/devices/{MAC}/telemetry"
        publish_all(publisher, [(topic, reading(i, i)) for i in range(1, 6)] + [(topic, b"{")])
        assert wait_for(lambda: count(conn, "telemetry") == 5 and count(conn, "dead_letters") == 1)
        assert wait_for(
            lambda: "iiot_ingest_readings_landed_total 5.0" in get(f"{base}/metrics")[1]
        )
        status, text = get(f"{base}/metrics")
        assert status == 200
        assert "iiot_ingest_messages_received_total 6.0" in text
        assert 'iiot_ingest_dead_letters_total{reason="malformed_json"} 1.0' in text
        assert "iiot_ingest_broker_connected 1.0" in text
        assert "iiot_ingest_lag_seconds_count" in text
        assert get(f"{base}/nope")[0] == 404
    finally:
        running.finish()


@contextlib.contextmanager
def outage_during_a_stream(database_url, pg_server, publisher, ready_url):
    """The database refuses the daemon's connections while 20 readings are published; yields
    once the daemon has met the outage (not ready), and lets connections in again on exit."""
    with database_refusing_ingest(pg_server, database_url):
        publish_all(
            publisher, [(f"iiot/devices/{MAC}/telemetry", reading(i, i)) for i in range(1, 21)]
        )
        assert wait_for(lambda: get(ready_url)[0] == 503)  # it met the outage and retries
        yield


# one reading a batch: the writer process has two batches in flight when the database goes
BATCH_ROWS = pytest.mark.parametrize("batch_rows", [5_000, 1], ids=["batches", "pipelined"])


@BATCH_ROWS
def test_database_outage_loses_nothing(
    conn, database_url, ingest_broker, publisher, pg_server, writer_process, batch_rows, caplog
):
    caplog.set_level(logging.INFO, logger="ingest_daemon.daemon")
    provision(conn)
    port = free_port()
    ready = f"http://127.0.0.1:{port}/health/ready"
    running = Running(
        database_url,
        ingest_broker,
        metrics_port=port,
        writer_process=writer_process,
        batch_rows=batch_rows,
    )
    try:
        with outage_during_a_stream(database_url, pg_server, publisher, ready):
            pass
        assert wait_for(lambda: count(conn, "telemetry") == 20)
        assert get(ready)[0] == 200
        # a line and a count when the database went, a line when it came back
        assert running.daemon.metrics.database_losses._value.get() == 1
        assert "lost the database" in caplog.text
        assert "database back after" in caplog.text
        # the batch that met the outage, counted once however often it was tried; a batch
        # refused untried behind it (pipelined) is not a retried write
        assert retried_batches(running.daemon) == {"connection": 1, "serialization": 0, "other": 0}
    finally:
        running.finish()


def retried_batches(daemon):
    counter = daemon.metrics.batches_retried
    return {reason: counter.labels(reason)._value.get() for reason in RETRY_REASONS}


def test_a_dropped_connection_is_a_retried_batch(
    conn, database_url, ingest_broker, publisher, writer_process
):
    """The writer's connection is terminated between two batches (no outage): the next batch
    fails, is written again at once and counts in iiot_ingest_batches_retried_total, the
    numerator of IngestRetryRate (the denominator: iiot_ingest_batch_messages_count)."""
    provision(conn)
    port = free_port()
    metrics = f"http://127.0.0.1:{port}/metrics"
    running = Running(database_url, ingest_broker, metrics_port=port, writer_process=writer_process)
    topic = f"iiot/devices/{MAC}/telemetry"
    try:
        publish_all(publisher, [(topic, reading(2, 1))])
        assert wait_for(lambda: count(conn, "telemetry") == 1)
        assert 'iiot_ingest_batches_retried_total{reason="connection"} 0.0' in get(metrics)[1]
        terminated = conn.execute(
            "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'iiot-ingest-0'"
        ).fetchone()[0]
        assert terminated == 1  # the slot's writer connection, in either process
        publish_all(publisher, [(topic, reading(1, 2))])
        assert wait_for(lambda: count(conn, "telemetry") == 2)
        assert wait_for(lambda: "iiot_ingest_batch_messages_count 2.0" in get(metrics)[1])
        text = get(metrics)[1]
        assert 'iiot_ingest_batches_retried_total{reason="connection"} 1.0' in text
        assert 'iiot_ingest_batches_retried_total{reason="serialization"} 0.0' in text
        assert 'iiot_ingest_batches_retried_total{reason="other"} 0.0' in text
    finally:
        counters = running.finish()
    assert (counters.batches, counters.batches_retried) == (2, 1)


@BATCH_ROWS
def test_stop_during_a_database_outage_gives_up_after_the_timeout(
    conn, database_url, ingest_broker, publisher, pg_server, writer_process, batch_rows
):
    """A stop does not wait forever for the database: after the stop timeout the daemon exits,
    leaving its messages unacknowledged, and the broker delivers them to the next session."""
    provision(conn)
    group = f"g{uuid.uuid4().hex[:6]}"
    port = free_port()
    running = Running(
        database_url,
        ingest_broker,
        group,
        port,
        stop_timeout_s=1.0,
        writer_process=writer_process,
        batch_rows=batch_rows,
    )
    ready = f"http://127.0.0.1:{port}/health/ready"
    with outage_during_a_stream(database_url, pg_server, publisher, ready):
        counters = running.finish()  # joins within 30 s or fails
    assert counters.unacknowledged == 20
    assert counters.landed == 0
    running = Running(database_url, ingest_broker, group)
    try:
        assert wait_for(lambda: count(conn, "telemetry") == 20)
    finally:
        running.finish()
