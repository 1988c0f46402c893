"""Shared by the certificate tests: a CA per test (copied from one made per session, RSA 3072
key generation being slow), provisioned devices with certificates, and Mosquitto with the TLS
listener and ACL that `iiot pki broker-config` writes."""

import os
import shutil
import signal
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from firmware.agent import CA_FILE, IDENTITY_FILE, AgentConfig, GatewayAgent, SimulatedMeterReader
from iiot_orchestration import pki, registry
from iiot_orchestration.mqtt import MqttOptions
from iiot_orchestration.services import Broker, free_port, start_mosquitto, wait_for_port
from tests.ingest_helpers import wait_for

PREFIX = "iiot"
NOW = datetime.now(UTC)


def copy_ca(source: Path, target: Path) -> pki.CertificateAuthority:
    target.mkdir(parents=True, exist_ok=True)
    for name in (pki.CA_KEY_FILE, pki.CA_CERT_FILE):
        shutil.copy2(source / name, target / name)
    os.chmod(target / pki.CA_KEY_FILE, 0o600)
    return pki.load_ca(target)


def make_tenant(conn, slug: str = "acme") -> None:
    registry.create_tenant(conn, slug=slug, name=slug.title(), plan="enterprise", timezone="UTC")


def make_device(
    conn,
    ca: pki.CertificateAuthority,
    mac: str,
    *,
    tenant: str = "acme",
    expires_in: timedelta | None = None,
    last_seen: datetime | None = NOW,
    state_dir: Path | None = None,
) -> pki.Issued:
    """A provisioned device with an active certificate (expiring in ``expires_in``, 10 years by
    default), seen at ``last_seen``; with ``state_dir``, the agent's files are written there."""
    registry.provision_devices(conn, tenant, [registry.DeviceRequest(mac, "energy")])
    conn.execute("UPDATE devices SET last_seen = %s WHERE mac = %s", (last_seen, mac))
    not_after = datetime.now(UTC) + expires_in if expires_in is not None else None
    issued = pki.issue_for_device(conn, ca, mac, actor="test", not_after=not_after)
    if state_dir is not None:
        write_state(state_dir, ca, issued)
    return issued


def write_state(state_dir: Path, ca: pki.CertificateAuthority, issued: pki.Issued) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    pki.write_file(state_dir / CA_FILE, ca.cert_path.read_bytes())
    pki.write_file(
        state_dir / IDENTITY_FILE,
        pki.private_key_pem(issued.key) + pki.certificate_pem(issued.certificate).encode(),
        private=True,
    )


@dataclass
class TlsBroker:
    """Mosquitto with the project's plain listener plus the mutual-TLS listener, CRL and ACL
    written by pki.write_broker_config."""

    broker: Broker
    port: int
    files: pki.BrokerFiles
    ca: pki.CertificateAuthority
    broker_dir: Path
    _extra: str = ""

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    @property
    def platform(self) -> MqttOptions:
        return MqttOptions(
            self.url,
            "5",
            self.ca.cert_path,
            self.files.platform_cert,
            self.files.platform_key,
        )

    def reloads(self) -> int:
        log = self.broker_dir / "mosquitto.log"
        return log.read_text(errors="replace").count("Reloading config.")

    def reload(self) -> None:
        """SIGHUP, then wait until Mosquitto has reloaded the CRL and ACL: it logs the reload
        and handles it before the next connection, so one connection after the line proves
        it is done."""
        before = self.reloads()
        self.broker._process.send_signal(signal.SIGHUP)  # the Broker has no reload() of its own
        assert wait_for(lambda: self.reloads() > before)
        client = connect_platform(self)
        client.disconnect()
        client.loop_stop()

    def restart(self) -> None:
        """Stop and start Mosquitto with the same configuration and ports; sessions and retained
        messages survive (persistence). The CRL is read at start."""
        plain_port = self.broker.port
        self.broker.stop()
        self.broker = start_mosquitto(self.broker_dir, port=plain_port, extra_config=self._extra)
        wait_for_port("127.0.0.1", self.port, 15, "mosquitto's TLS listener")

    def agent(self, mac: str, state_dir: Path, **config) -> GatewayAgent:
        return GatewayAgent(
            AgentConfig(
                mac=mac,
                host="127.0.0.1",
                port=self.port,
                state_dir=state_dir,
                prefix=PREFIX,
                connect_timeout_s=10,
                **config,
            ),
            SimulatedMeterReader(mac),
        )


def start_tls_broker(
    conn,
    ca: pki.CertificateAuthority,
    directory: Path,
    *,
    prefix: str = PREFIX,
    port: int | None = None,
) -> TlsBroker:
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not on PATH (needed for the TLS listener with CRL and ACL)")
    pki.refresh_crl(conn, ca)
    port = port or free_port()
    files = pki.write_broker_config(
        ca, directory / "broker", prefix=prefix, hosts=["127.0.0.1"], port=port, bind="127.0.0.1"
    )
    extra = files.config.read_text()  # start_mosquitto runs it as us: it reads pytest's tmp
    broker = start_mosquitto(directory / "mosquitto", extra_config=extra)
    try:
        wait_for_port("127.0.0.1", port, 15, "mosquitto's TLS listener")
    except BaseException:
        broker.stop()
        raise
    return TlsBroker(broker, port, files, ca, directory / "mosquitto", extra)


def connect_platform(tls: TlsBroker, on_message=None) -> mqtt.Client:
    """A connected MQTT 5 client with the platform's certificate."""
    connected = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.tls_set(
        ca_certs=str(tls.ca.cert_path),
        certfile=str(tls.files.platform_cert),
        keyfile=str(tls.files.platform_key),
    )
    client.on_connect = lambda *args: connected.set()
    if on_message is not None:
        client.on_message = on_message
    client.connect("127.0.0.1", tls.port)
    client.loop_start()
    assert connected.wait(15), "the platform client could not connect"
    return client


class Recorder:
    """Subscribes with the platform's certificate and keeps what arrives, per topic."""

    def __init__(self, tls: TlsBroker, *filters: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.client = connect_platform(tls, self._on_message)
        self.client.on_subscribe = self._on_subscribe
        self._subscribed = threading.Event()
        for topic_filter in filters:
            self.subscribe(topic_filter)

    def _on_subscribe(self, *_args) -> None:
        self._subscribed.set()

    def subscribe(self, topic_filter: str) -> None:
        """Subscribe and wait for the SUBACK."""
        self._subscribed.clear()
        self.client.subscribe(topic_filter, qos=1)
        assert self._subscribed.wait(15)

    def _on_message(self, _client, _userdata, message) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))

    def on(self, topic: str) -> list[bytes]:
        with self._lock:
            return [payload for t, payload, _ in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained(tls: TlsBroker, topic: str) -> bytes | None:
    """The retained message on ``topic`` now, or None: a fresh subscriber gets retained messages
    right after its SUBACK, in the order of its subscriptions, so one on a sentinel topic
    subscribed after ``topic`` proves that nothing more is coming for ``topic``."""
    sentinel = f"{PREFIX}/devices/sentinel-{uuid.uuid4().hex[:8]}/none"  # the platform's ACL
    client = connect_platform(tls)
    client.publish(sentinel, b"here", qos=1, retain=True).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()
    recorder = Recorder(tls, topic)
    try:
        recorder.subscribe(sentinel)  # after the SUBACK of topic, whose retained came first
        assert wait_for(lambda: recorder.on(sentinel))
        found = [payload for t, payload, is_retained in recorder.messages if t == topic]
        return found[0] if found else None
    finally:
        recorder.close()
