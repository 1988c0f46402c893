"""The consumer of certificate acknowledgements: ``<prefix>/devices/+/cert_ack`` into
``certificate_acks``.

``ota_ack_sensor`` runs it on every tick. It keeps a persistent MQTT session (a fixed client id,
clean start off), so acknowledgements published between two ticks wait at the broker; each is
acknowledged to the broker only after its row is committed, so none is lost, and one delivered
twice is recorded twice and counted once (its second processing is a ``duplicate``). The ingest
daemon stays out of it: it subscribes to telemetry only.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from iiot_orchestration import ota
from iiot_orchestration.db import connect
from iiot_orchestration.mqtt import MqttError, MqttOptions, connect_client

log = logging.getLogger(__name__)

CLIENT_ID = "iiot-ota-acks"
SESSION_EXPIRY_S = 14 * 86_400  # acks wait this long for the sensor at most
SUBSCRIBE_TIMEOUT_S = 15.0


def subscription(prefix: str) -> str:
    return f"{prefix}/devices/+/cert_ack"


def collect_acks(
    database_url: str,
    options: MqttOptions,
    prefix: str,
    *,
    client_id: str = CLIENT_ID,
    idle_s: float = 1.0,
    max_s: float = 20.0,
    role: str | None = "platform_rw",
) -> int:
    """Land the acknowledgements waiting at the broker, until none came for ``idle_s`` seconds
    (or ``max_s`` passed); the number landed."""
    messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subscribed = threading.Event()
    refused: list[str] = []

    def on_connect(client: mqtt.Client, _userdata: Any, *_args: Any) -> None:
        client.subscribe(subscription(prefix), qos=1)

    def on_subscribe(
        _client: mqtt.Client, _userdata: Any, _mid: int, codes: list, _properties: Any
    ) -> None:
        failures = [str(code) for code in codes if getattr(code, "is_failure", False)]
        if failures:
            refused.extend(failures)
        subscribed.set()

    def setup(client: mqtt.Client) -> None:
        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = lambda _c, _u, message: messages.put(message)

    landed = 0
    with connect(database_url, autocommit=True, role=role, application_name=client_id) as conn:
        client, _ = connect_client(
            options, client_id, setup=setup, session_expiry_s=SESSION_EXPIRY_S, manual_ack=True
        )
        try:
            if not subscribed.wait(SUBSCRIBE_TIMEOUT_S):
                raise MqttError(f"the broker did not confirm the subscription to {prefix} acks")
            if refused:
                raise MqttError(
                    f"the broker refused the subscription to {subscription(prefix)}: "
                    f"{', '.join(refused)} (the ACL must let the platform read it)"
                )
            deadline = time.monotonic() + max_s
            while time.monotonic() < deadline:
                try:
                    message = messages.get(timeout=idle_s)
                except queue.Empty:
                    break
                ota.land_ack(conn, message.topic, message.payload, prefix)
                client.ack(message.mid, message.qos)  # after the row is committed
                landed += 1
        finally:
            client.disconnect()
            client.loop_stop()
    if landed:
        log.info("landed %d certificate acks", landed, extra={"acks": landed})
    return landed
