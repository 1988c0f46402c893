"""A 30 s broker stop in the middle of QoS 1 streams: nothing the publishers sent is lost.

Mosquitto restores a persistent session's plain subscriptions over a restart but not its shared
ones; until the slots subscribe again it answers publishes that match nothing else with PUBACK
"no matching subscribers" (0x10) and drops them. The lanes below run side by side through one
broker stop, each with its own database, topic prefix and ingest group:

- plain subscription (IIOT_MQTT_SHARED_SUBSCRIPTION=auto with one slot), a third-party publisher
  that ignores reason codes: the restored subscription queues everything;
- shared subscription, one slot and two slots, the fleet simulator: every publish after the
  restart is answered 0x10 while the slots cannot subscribe (they are SIGSTOPped until the
  publishers have seen it), and the simulator sends those again until they are delivered.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
import pytest

from firmware.simulator import SimulationStats, load_fleet, run_simulation
from iiot_orchestration import registry
from iiot_orchestration.services import start_mosquitto
from tests.conftest import create_database, drop_database
from tests.ingest_helpers import count, start_ingest_process, wait_for
from tests.test_ingest_process import stream

STOP_S = 30.0
READINGS = 20_000
MAC = "aa:bb:cc:00:00:01"
FLEET = 20  # simulated devices per simulator lane
BATCH = 10  # readings per simulated message


@dataclass
class Lane:
    name: str
    mode: str  # IIOT_MQTT_SHARED_SUBSCRIPTION
    processes: int
    database_url: str = ""
    prefix: str = ""
    ingest: subprocess.Popen | None = None
    expected: int = 0
    publisher: threading.Thread | None = None
    progress: list[SimulationStats] = field(default_factory=list)
    refused_0x10: int = 0

    def start_ingest(self, broker_url: str, tmp_path) -> None:
        self.ingest = start_ingest_process(
            self.database_url,
            broker_url,
            tmp_path / self.name,
            *("--group", f"g-{self.prefix}", "--processes", str(self.processes)),
            *("--metrics-port", "0"),
            new_session=True,  # SIGSTOP and SIGCONT reach the slots and writers too
            IIOT_TOPIC_PREFIX=self.prefix,
            IIOT_MQTT_SHARED_SUBSCRIPTION=self.mode,
        )

    def signal_group(self, sig: int) -> None:
        os.killpg(self.ingest.pid, sig)

    def rows(self, conn_factory) -> tuple[int, int]:
        with conn_factory(self.database_url) as conn:
            return conn.execute(
                "SELECT count(*), count(DISTINCT (device_id, metric, ts)) FROM telemetry"
            ).fetchone()


def _connect(url):
    import psycopg

    return psycopg.connect(url, autocommit=True)


def _provision(url: str, macs: list[str]) -> None:
    with _connect(url) as conn:
        registry.create_tenant(conn, slug="acme", name="Acme", plan="enterprise", timezone="UTC")
        conn.execute("UPDATE plans SET messages_per_minute_per_device = 1000000")
        registry.provision_devices(
            conn, "acme", [registry.DeviceRequest(mac, "energy") for mac in macs]
        )


def _third_party_publisher(lane: Lane, broker, payloads: list[bytes]) -> threading.Thread:
    """paho with its defaults but a short reconnect delay: it ignores PUBACK reason codes and
    counts the 0x10 answers."""

    settled = threading.Semaphore(0)

    def on_publish(_c, _u, _mid, reason, _p):
        if reason.value == 0x10:
            lane.refused_0x10 += 1
        settled.release()

    def run():
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(1, 2)
        client.on_publish = on_publish
        client.connect(broker.host, broker.port)
        client.loop_start()
        for i, payload in enumerate(payloads):
            # published while the broker is away, a message waits in paho's queue (rc NO_CONN)
            client.publish(f"{lane.prefix}/devices/{MAC}/telemetry", payload, qos=1)
            if i % 200 == 199:
                time.sleep(0.1)  # about 2,000 messages a second: the stream spans the stop
        for _ in payloads:
            assert settled.acquire(timeout=180)
        client.loop_stop()
        client.disconnect()

    thread = threading.Thread(target=run, name=f"publisher-{lane.name}")
    thread.start()
    return thread


def _simulator(lane: Lane, broker) -> threading.Thread:
    fleet = load_fleet(lane.database_url)
    assert len(fleet) == FLEET
    messages = READINGS // BATCH // FLEET
    lane.expected = messages * FLEET * BATCH * len(fleet[0].metrics)

    def run():
        run_simulation(
            fleet,
            broker.url,
            prefix=lane.prefix,
            rate=4.0,  # 80 messages a second in all: the stream spans the stop
            count=messages,
            batch_size=BATCH,
            drain_timeout=180,
            progress=lane.progress.append,
        )

    thread = threading.Thread(target=run, name=f"simulator-{lane.name}")
    thread.start()
    return thread


@pytest.fixture
def lanes(pg_server, template_database):
    made = [Lane("plain-1", "auto", 1), Lane("shared-1", "on", 1), Lane("shared-2", "on", 2)]
    for lane in made:
        lane.prefix = f"r{uuid.uuid4().hex[:6]}"
        lane.database_url = create_database(pg_server, f"iiot_t_{lane.prefix}", template_database)
    yield made
    for lane in made:
        if lane.ingest is not None and lane.ingest.poll() is None:
            lane.signal_group(signal.SIGCONT)
            lane.ingest.kill()
            lane.ingest.wait(30)
        drop_database(pg_server, f"iiot_t_{lane.prefix}")


def test_a_30_s_broker_stop_loses_nothing(lanes, tmp_path):
    data = tmp_path / "mosquitto"
    broker = start_mosquitto(data)
    plain, *simulated = lanes
    _provision(plain.database_url, [MAC])
    for lane in simulated:
        _provision(lane.database_url, [f"02:00:00:00:01:{n:02x}" for n in range(FLEET)])
    try:
        for lane in lanes:
            lane.start_ingest(broker.url, tmp_path)
        for lane in lanes:
            with _connect(lane.database_url) as conn:
                assert wait_for(
                    lambda conn=conn, lane=lane: (
                        count(conn, "ingest_sessions", "state = 'connected'") == lane.processes
                    ),
                    timeout=60,
                ), lane.name
        plain.expected = READINGS
        plain.publisher = _third_party_publisher(plain, broker, stream(READINGS))
        for lane in simulated:
            lane.publisher = _simulator(lane, broker)
        for lane in lanes:
            with _connect(lane.database_url) as conn:
                assert wait_for(lambda conn=conn: count(conn, "telemetry") > 0, timeout=60)

        # the broker stops mid-stream; the slots are frozen until the publishers have met the
        # restarted broker, so the shared lanes' messages find no subscriber at first
        broker.stop()
        for lane in lanes:
            lane.signal_group(signal.SIGSTOP)
        time.sleep(STOP_S)
        broker = start_mosquitto(data, port=broker.port)
        for lane in simulated:
            assert wait_for(
                lambda lane=lane: lane.progress and lane.progress[-1].resent > 0, timeout=60
            ), f"{lane.name}: the simulator never had to send a message again"
        for lane in lanes:
            lane.signal_group(signal.SIGCONT)

        for lane in lanes:
            lane.publisher.join(240)
            assert not lane.publisher.is_alive(), lane.name
        for lane in lanes:
            assert wait_for(lambda lane=lane: lane.rows(_connect)[0] >= lane.expected, 120), (
                lane.name,
                lane.rows(_connect),
                lane.expected,
            )
        time.sleep(0.5)  # anything delivered twice after the last count would show up as extra
        for lane in lanes:
            assert lane.rows(_connect) == (lane.expected, lane.expected), lane.name
            with _connect(lane.database_url) as conn:
                assert count(conn, "dead_letters") == 0, lane.name
        # the plain subscription survived the restart: the broker never answered 0x10
        assert plain.refused_0x10 == 0
        for lane in simulated:
            final = lane.progress[-1]
            assert final.acknowledged == final.published, lane.name
            assert final.rejected == 0, lane.name
    finally:
        for lane in lanes:
            if lane.ingest is not None and lane.ingest.poll() is None:
                lane.signal_group(signal.SIGCONT)
                lane.ingest.send_signal(signal.SIGTERM)
        outputs = {
            lane.name: lane.ingest.communicate(timeout=90)[0] for lane in lanes if lane.ingest
        }
        broker.stop()
    for lane in lanes:
        assert lane.ingest.returncode == 0, outputs[lane.name]
        assert "broker connection back after" in outputs[lane.name], outputs[lane.name]
