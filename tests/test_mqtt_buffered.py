"""The MQTT client every connection of the project uses (``BufferedClient``): buffered socket
reads and its own decoding of plain PUBLISH packets must deliver exactly what paho would.

Against the test's own Mosquitto, and a scripted broker on a local socket for what a real one
never sends (a malformed packet in the middle of a read).
"""

import socket
import threading
import uuid
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks.ingest import publish_packet
from iiot_orchestration.mqtt import (
    READ_REFILLS,
    READ_SIZE,
    BufferedClient,
    MqttOptions,
    connect_client,
)
from iiot_orchestration.services import Broker
from tests.ingest_helpers import wait_for

PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}


class Receiver:
    """A connected BufferedClient subscribed to ``filter``, collecting what arrives."""

    def __init__(self, url: str, protocol: str, topic_filter: str, *, pause: float = 0.0):
        self.messages: list[mqtt.MQTTMessage] = []
        self.subscribed = threading.Event()
        self.disconnects = 0

        def setup(client: mqtt.Client) -> None:
            client.read_pause_s = pause
            client.on_message = lambda _c, _u, message: self.messages.append(message)
            client.on_connect = lambda c, *_: c.subscribe(topic_filter, qos=2)
            client.on_subscribe = lambda *_: self.subscribed.set()
            client.on_disconnect = self._on_disconnect

        self.client, _ = connect_client(
            MqttOptions(url, protocol), f"buffered-{uuid.uuid4().hex[:8]}", setup=setup
        )
        assert isinstance(self.client, BufferedClient)

    def _on_disconnect(self, *_args: object) -> None:
        self.disconnects += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _publisher(broker: Broker) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_queued_messages_set(0)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def _stream() -> list[tuple[str, bytes, int]]:
    """Small and large payloads (one larger than a whole pass of socket reads), empty ones,
    binary ones and every QoS, on several topics."""
    messages = [(f"buffered/t/{i % 7}", f'{{"n": {i}}}'.encode(), i % 2) for i in range(400)]
    messages += [
        ("buffered/big/1", bytes(range(256)) * 300, 1),  # 76,800 bytes: two socket reads
        ("buffered/big/2", b"x" * (READ_SIZE * READ_REFILLS + 1000), 1),  # past one pass
        ("buffered/empty", b"", 1),
        ("buffered/binary", b"\x00\xff\x30\x32" * 10, 0),
        ("buffered/exactly-once", b"qos two goes through paho's own decoding", 2),
    ]
    return messages


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_mixed_stream_arrives_exactly_as_published(ingest_broker: Broker, protocol: str):
    receiver = Receiver(ingest_broker.url, protocol, "buffered/#")
    publisher = _publisher(ingest_broker)
    try:
        assert receiver.subscribed.wait(10)
        sent = _stream()
        infos = [publisher.publish(topic, payload, qos=qos) for topic, payload, qos in sent]
        for info in infos:
            info.wait_for_publish(30)
        assert wait_for(lambda: len(receiver.messages) >= len(sent), timeout=30)
        got = [(m.topic, m.payload, m.qos) for m in receiver.messages]
        assert sorted(got) == sorted(sent)
        # and in the order published, per topic and QoS (the only order MQTT keeps)
        for key in {(t, q) for t, _, q in sent}:
            assert [p for t, p, q in got if (t, q) == key] == [
                p for t, p, q in sent if (t, q) == key
            ]
        plain = next(m for m in receiver.messages if m.topic == "buffered/t/1")
        assert plain.retain is False
        assert plain.dup is False
        assert plain.mid > 0
        if protocol == "5":
            assert plain.properties.isEmpty()
            with pytest.raises(AttributeError, match="read-only"):
                plain.properties.UserProperty = ("a", "b")
        else:
            assert plain.properties is None
        assert receiver.disconnects == 0
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        receiver.close()


def test_properties_and_retained_flags_reach_the_callback(ingest_broker: Broker):
    """A PUBLISH with properties is paho's to decode; the retained flag is decoded here."""
    publisher = _publisher(ingest_broker)
    properties = Properties(PacketTypes.PUBLISH)
    properties.UserProperty = ("source", "gateway-7")
    properties.ContentType = "application/json"
    try:
        publisher.publish("buffered/retained", b"kept", qos=1, retain=True).wait_for_publish(10)
        receiver = Receiver(ingest_broker.url, "5", "buffered/#")
        assert receiver.subscribed.wait(10)
        publisher.publish("buffered/props", b"{}", qos=1, properties=properties)
        assert wait_for(lambda: len(receiver.messages) >= 2, timeout=10)
        by_topic = {m.topic: m for m in receiver.messages}
        assert by_topic["buffered/retained"].retain is True
        assert by_topic["buffered/retained"].payload == b"kept"
        with_properties = by_topic["buffered/props"].properties
        assert with_properties.UserProperty == [("source", "gateway-7")]
        assert with_properties.ContentType == "application/json"
        receiver.close()
    finally:
        publisher.publish("buffered/retained", b"", qos=1, retain=True).wait_for_publish(10)
        publisher.disconnect()
        publisher.loop_stop()


def test_a_trickle_with_a_read_pause_loses_nothing(ingest_broker: Broker):
    receiver = Receiver(ingest_broker.url, "5", "buffered/#", pause=0.002)
    publisher = _publisher(ingest_broker)
    try:
        assert receiver.subscribed.wait(10)
        for i in range(50):
            publisher.publish("buffered/trickle", str(i).encode(), qos=1).wait_for_publish(10)
        assert wait_for(lambda: len(receiver.messages) >= 50, timeout=10)
        assert [int(m.payload) for m in receiver.messages] == list(range(50))
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        receiver.close()


CONNACK_V5 = b"\x20\x03\x00\x00\x00"
# a PUBLISH whose topic length (500) runs past the end of the packet
MALFORMED = b"\x32\x05\x01\xf4abc"


class ScriptedBroker:
    """Answers each connection's CONNECT with a CONNACK, then sends that connection's script."""

    def __init__(self, scripts: list[bytes]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.scripts = scripts
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for script in self.scripts:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(connection)
            connection.recv(4096)  # the CONNECT
            connection.sendall(CONNACK_V5 + script)

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            connection.close()


@pytest.fixture
def scripted() -> Iterator[ScriptedBroker]:
    first = publish_packet(b"d/a", b"A", 1) + MALFORMED + publish_packet(b"d/b", b"B", 2)
    broker = ScriptedBroker([first, publish_packet(b"d/c", b"C", 3)])
    yield broker
    broker.close()


def test_a_malformed_packet_drops_the_connection_and_its_buffered_rest(scripted):
    """What was read after a malformed packet belongs to the dropped connection: it must not be
    delivered, nor be read as the start of the next connection's stream."""
    messages: list[mqtt.MQTTMessage] = []

    def setup(client: mqtt.Client) -> None:
        client.on_message = lambda _c, _u, message: messages.append(message)
        client.reconnect_delay_set(min_delay=1, max_delay=1)

    client, _ = connect_client(
        MqttOptions(f"mqtt://127.0.0.1:{scripted.port}", "5"), "s-1", setup=setup
    )
    try:
        assert wait_for(lambda: len(messages) >= 2, timeout=15)
        assert [(m.topic, m.payload) for m in messages] == [("d/a", b"A"), ("d/c", b"C")]
    finally:
        client.disconnect()
        client.loop_stop()
