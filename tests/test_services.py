"""The local services behind `iiot dev` and the test fallbacks, exercised for real."""

import gc
import queue
import shutil
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import psycopg
import pytest

from iiot_orchestration.services import (
    MOSQUITTO_CONF,
    ServiceError,
    ensure_database,
    start_amqtt,
    start_embedded_postgres,
    start_mosquitto,
    wait_for_port,
)


def round_trip(url: str, protocol=mqtt.MQTTv311) -> bytes:
    parts = urlsplit(url)
    received: queue.Queue[bytes] = queue.Queue()
    topic = f"iiot-test/{uuid.uuid4().hex}"
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    client.on_message = lambda _c, _u, message: received.put(message.payload)
    client.connect(parts.hostname, parts.port)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)[0]
        for _ in range(50):
            client.publish(topic, b"reading", qos=1).wait_for_publish(5)
            try:
                return received.get(timeout=0.2)
            except queue.Empty:
                continue
        raise AssertionError("no message came back")
    finally:
        client.loop_stop()
        client.disconnect()


def test_session_broker_delivers(mqtt_url):
    assert round_trip(mqtt_url) == b"reading"


@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto binary not on PATH")
def test_mosquitto_on_a_free_port(tmp_path):
    broker = start_mosquitto(tmp_path)
    try:
        assert broker.kind == "mosquitto"
        assert round_trip(broker.url, mqtt.MQTTv5) == b"reading"
        assert "max_queued_messages 0" in (tmp_path / "mosquitto.conf").read_text()
    finally:
        broker.stop()


def test_amqtt_fallback_broker():
    broker = start_amqtt()
    try:
        assert broker.kind == "amqtt"
        assert round_trip(broker.url) == b"reading"
    finally:
        broker.stop()
        gc.collect()  # a socket left open would be reported now, as an error


def test_embedded_postgres_serves_and_stops(tmp_path):
    server = start_embedded_postgres(tmp_path / "pgdata")
    url = server.url()
    try:
        ensure_database(server.url(), "iiot")
        ensure_database(server.url(), "iiot")
        with psycopg.connect(server.url("iiot")) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        server.stop()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)


def test_wait_for_port_gives_up_with_a_clear_error():
    with pytest.raises(ServiceError, match="did not accept connections"):
        wait_for_port("127.0.0.1", 1, 0.3, "nothing")


def test_test_broker_and_production_config_agree_on_not_dropping_messages():
    production = (Path(__file__).resolve().parents[1] / "ops/mosquitto/mosquitto.conf").read_text()
    for setting in ("max_queued_messages 0", "max_inflight_messages 0", "persistence true"):
        assert setting in production
        assert setting in MOSQUITTO_CONF
