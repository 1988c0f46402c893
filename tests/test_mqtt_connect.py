"""Connecting to real brokers: mutual TLS on Mosquitto, and MQTT 3.1.1 on amqtt and Mosquitto.

The certificates are made per session with `cryptography`: a CA, a server certificate for
127.0.0.1 (IP subject alternative name) and a client certificate.
"""

import ipaddress
import logging
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from firmware.simulator import DeviceSpec, run_simulation
from iiot_orchestration.cli import main
from iiot_orchestration.mqtt import MqttError, MqttOptions, connect_client
from iiot_orchestration.services import (
    Broker,
    free_port,
    start_amqtt,
    start_mosquitto,
    wait_for_port,
)
from iiot_orchestration.settings import SettingsError, load_settings
from ingest_daemon.daemon import IngestConfig, IngestDaemon
from tests.ingest_helpers import MAC, count, provision, wait_for

TOPIC = f"iiot/devices/{MAC}/telemetry"
UNUSED_DATABASE = "postgresql://nobody@127.0.0.1:1/nothing"  # a check that got to it would fail


@dataclass(frozen=True)
class Pki:
    ca: Path
    client_cert: Path
    client_key: Path
    server_cert: Path
    server_key: Path
    client_key_encrypted: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _certificate(subject, issuer, public_key, signing_key, extensions) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(
        _name("iiot test CA"),
        _name("iiot test CA"),
        ca_key.public_key(),
        ca_key,
        [
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            ),
            (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False),
        ],
    )
    ca_path, _ = _write(directory, "ca", ca, ca_key)

    def leaf(stem: str, common_name: str, usage, more=()) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        extensions = [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([usage]), False),
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
            *more,
        ]
        cert = _certificate(_name(common_name), ca.subject, key.public_key(), ca_key, extensions)
        return _write(directory, stem, cert, key)

    server_san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server = leaf("server", "127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH, [(server_san, False)])
    client = leaf("client", "iiot-ingest", ExtendedKeyUsageOID.CLIENT_AUTH)
    encrypted = directory / "client-encrypted.key"
    key = serialization.load_pem_private_key(client[1].read_bytes(), password=None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return Pki(ca_path, *client, *server, encrypted)


@dataclass(frozen=True)
class TlsBroker:
    plain: Broker  # the project's listener, for test publishers and subscribers
    url: str  # mqtts:// of the listener that requires a client certificate


@pytest.fixture
def tls_broker(tmp_path: Path, pki: Pki) -> Iterator[TlsBroker]:
    """Mosquitto with the project's configuration plus a mutual-TLS listener."""
    port = free_port()
    listener = (  # start_mosquitto runs it as us: it reads pytest's private tmp
        f"listener {port} 127.0.0.1\n"
        f"cafile {pki.ca}\n"
        f"certfile {pki.server_cert}\n"
        f"keyfile {pki.server_key}\n"
        "require_certificate true\n"
    )
    broker = start_mosquitto(tmp_path / "mosquitto", extra_config=listener)
    try:
        wait_for_port("127.0.0.1", port, 15, "mosquitto's TLS listener")
        yield TlsBroker(broker, f"mqtts://127.0.0.1:{port}")
    finally:
        broker.stop()


@pytest.fixture
def amqtt_broker() -> Iterator[Broker]:
    """amqtt keeps the sessions of clients that give a user name (see start_amqtt)."""
    broker = start_amqtt(allow_anonymous=False)
    yield broker
    broker.stop()


def reading(minutes_ago: int, value: float) -> bytes:
    ts = (datetime.now(UTC) - timedelta(minutes=minutes_ago)).isoformat()
    return orjson.dumps({"ts": ts, "metrics": {"energy_kwh": value}})


def publish(broker: Broker, payloads: list[bytes], protocol: int = mqtt.MQTTv5) -> None:
    """Publish at QoS 1 and wait for the broker to acknowledge each message."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
    client.username_pw_set("publisher")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for payload in payloads:
            client.publish(TOPIC, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


class Running:
    """The daemon in a thread, subscribed (or failed: ``error``)."""

    def __init__(self, database_url: str, mqtt_url: str, group: str, **config) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.daemon = IngestDaemon(
            IngestConfig(
                database_url=database_url,
                mqtt_url=mqtt_url,
                group=group,
                batch_age_s=0.05,
                **config,
            )
        )
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert wait_for(lambda: self.daemon.connected.is_set() or not self.thread.is_alive())
        assert self.daemon.connected.is_set(), self.error

    def _run(self) -> None:
        try:
            self.daemon.run(self.stop)
        except BaseException as exc:  # reported by the test's thread
            self.error = exc

    def finish(self):
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        assert self.error is None, self.error
        return self.daemon.counters


def tls_files(pki: Pki) -> dict[str, Path]:
    return {
        "mqtt_ca_file": pki.ca,
        "mqtt_cert_file": pki.client_cert,
        "mqtt_key_file": pki.client_key,
    }


def test_daemon_lands_readings_over_mutual_tls(conn, database_url, tls_broker, pki):
    provision(conn)
    running = Running(database_url, tls_broker.url, f"g{uuid.uuid4().hex[:6]}", **tls_files(pki))
    try:
        assert running.daemon.protocol == "5"
        publish(tls_broker.plain, [reading(i, i) for i in range(1, 6)])
        assert wait_for(lambda: count(conn, "telemetry") == 5)
    finally:
        counters = running.finish()
    assert (counters.landed, counters.duplicates) == (5, 0)


def test_daemon_without_a_client_certificate_is_refused_clearly(database_url, tls_broker, pki):
    config = IngestConfig(database_url, tls_broker.url, group="g", mqtt_ca_file=pki.ca)
    with pytest.raises(MqttError) as refused:
        IngestDaemon(config).run(threading.Event())
    message = str(refused.value)
    assert tls_broker.url.removeprefix("mqtts://") in message
    assert "set IIOT_MQTT_CERT_FILE and IIOT_MQTT_KEY_FILE" in message
    assert "closed the connection" in message or "cannot connect" in message
    # and a `iiot ingest` user sees it as one line, without a traceback
    result = CliRunner().invoke(
        main,
        ["ingest", "--metrics-port", "0"],
        env={
            "IIOT_DATABASE_URL": database_url,
            "IIOT_MQTT_URL": tls_broker.url,
            "IIOT_MQTT_CA_FILE": str(pki.ca),
        },
    )
    assert result.exit_code == 1
    assert "set IIOT_MQTT_CERT_FILE and IIOT_MQTT_KEY_FILE" in result.output
    assert "Traceback" not in result.output


# paho leaves the socket of a failed TLS handshake unclosed (Client._ssl_wrap_socket raises from
# do_handshake() without closing it); it is freed with the exception, with a ResourceWarning
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning"
)
def test_a_broker_certificate_from_another_ca_is_refused(database_url, tls_broker, pki):
    # the client certificate is not a CA: the broker's certificate does not chain to it
    config = IngestConfig(
        database_url,
        tls_broker.url,
        mqtt_ca_file=pki.client_cert,
        mqtt_cert_file=pki.client_cert,
        mqtt_key_file=pki.client_key,
    )
    with pytest.raises(MqttError, match="does not verify against IIOT_MQTT_CA_FILE"):
        IngestDaemon(config).run(threading.Event())


@pytest.mark.parametrize(
    ("url", "files", "error"),
    [
        (
            "mqtts",
            {"cert": "client_cert"},
            "IIOT_MQTT_CERT_FILE is set but IIOT_MQTT_KEY_FILE is not",
        ),
        (
            "mqtts",
            {"key": "client_key"},
            "IIOT_MQTT_KEY_FILE is set but IIOT_MQTT_CERT_FILE is not",
        ),
        (
            "mqtts",
            {"ca": "missing", "cert": "client_cert", "key": "client_key"},
            "IIOT_MQTT_CA_FILE='.*missing.pem' cannot be read: No such file or directory",
        ),
        (
            "mqtts",
            {"cert": "missing", "key": "client_key"},
            "IIOT_MQTT_CERT_FILE='.*missing.pem' cannot be read: No such file or directory",
        ),
        ("mqtts", {"ca": "client_key"}, "IIOT_MQTT_CA_FILE='.*' holds no usable PEM CA"),
        (
            "mqtts",
            {"cert": "client_cert", "key": "server_key"},
            "IIOT_MQTT_CERT_FILE='.*' and IIOT_MQTT_KEY_FILE='.*' are not a PEM certificate",
        ),
        (  # paho would ask for its passphrase on the terminal
            "mqtts",
            {"cert": "client_cert", "key": "client_key_encrypted"},
            "IIOT_MQTT_KEY_FILE='.*' are not a PEM certificate and its unencrypted private key",
        ),
        ("mqtt", {"ca": "ca"}, "IIOT_MQTT_CA_FILE set, but IIOT_MQTT_URL=.* is not TLS"),
        ("mqtt://127.0.0.1:99999", {}, "IIOT_MQTT_URL='.*:99999' is invalid: expected mqtt://"),
    ],
)
def test_tls_settings_errors_name_the_variable_before_connecting(tmp_path, pki, url, files, error):
    paths = {
        name: tmp_path / "missing.pem" if field == "missing" else getattr(pki, field)
        for name, field in files.items()
    }
    # nothing listens there, and the database is not reachable: the check must come first
    config = IngestConfig(
        UNUSED_DATABASE,
        url if "://" in url else f"{url}://127.0.0.1:{free_port()}",
        mqtt_ca_file=paths.get("ca"),
        mqtt_cert_file=paths.get("cert"),
        mqtt_key_file=paths.get("key"),
    )
    with pytest.raises(MqttError, match=error):
        IngestDaemon(config)


def test_ingest_command_reports_a_certificate_without_key(tmp_path, pki):
    result = CliRunner().invoke(
        main,
        ["ingest"],
        env={
            "IIOT_DATABASE_URL": UNUSED_DATABASE,
            "IIOT_MQTT_URL": f"mqtts://127.0.0.1:{free_port()}",
            "IIOT_MQTT_CERT_FILE": str(pki.client_cert),
        },
    )
    assert result.exit_code == 1
    assert "IIOT_MQTT_CERT_FILE is set but IIOT_MQTT_KEY_FILE is not" in result.output


def test_simulator_publishes_over_mutual_tls(tls_broker, pki):
    received: list[str] = []
    subscriber = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    subscriber.on_message = lambda _c, _u, message: received.append(message.topic)
    subscriber.connect(tls_broker.plain.host, tls_broker.plain.port)
    subscriber.subscribe("simtls/devices/+/telemetry", qos=1)
    subscriber.loop_start()
    try:
        fleet = [DeviceSpec(f"02:00:5e:00:01:{i:02x}", "energy", ("energy_kwh",)) for i in (1, 2)]
        options = MqttOptions(
            tls_broker.url,
            ca_file=pki.ca,
            cert_file=pki.client_cert,
            key_file=pki.client_key,
        )
        stats = run_simulation(fleet, options, prefix="simtls", count=3, rate=50)
        assert stats.published == stats.acknowledged == 6
        assert wait_for(lambda: len(received) == 6)
    finally:
        subscriber.disconnect()
        subscriber.loop_stop()


def restart_lands_queued_messages_without_redelivery(
    conn, database_url: str, broker: Broker, publisher_protocol: int, **config
) -> list[str]:
    """Run, land 10 readings, stop; publish 5 while stopped; run again with the same client id.
    The 5 arrive (persistent session); none of the 10 comes back (they were acknowledged).
    Returns the protocols the two runs spoke."""
    group = f"g{uuid.uuid4().hex[:6]}"
    mqtt_url = f"mqtt://ingest@{broker.host}:{broker.port}"
    running = Running(database_url, mqtt_url, group, **config)
    protocols = [running.daemon.protocol]
    try:
        publish(broker, [reading(i, i) for i in range(1, 11)], publisher_protocol)
        assert wait_for(lambda: count(conn, "telemetry") == 10)
    finally:
        first = running.finish()
    assert (first.received, first.landed, first.duplicates) == (10, 10, 0)
    publish(broker, [reading(i, i) for i in range(11, 16)], publisher_protocol)
    running = Running(database_url, mqtt_url, group, **config)
    protocols.append(running.daemon.protocol)
    try:
        assert wait_for(lambda: count(conn, "telemetry") == 15)
    finally:
        second = running.finish()
    assert (second.received, second.landed, second.duplicates) == (5, 5, 0)
    return protocols


def test_daemon_falls_back_to_mqtt_311_on_amqtt(conn, database_url, amqtt_broker, caplog):
    """amqtt speaks only MQTT 3.1.1 and does not answer the daemon's MQTT 5 CONNECT; it takes
    $share/... as a filter that matches no topic, so the daemon runs on the plain filter there.
    amqtt 0.12 never delivers an unacknowledged message again (it forgets it after 5 s or at
    the disconnect), so here "no duplicates" holds whatever the daemon does; the test of
    acknowledgement on MQTT 3.1.1 is the next one, on Mosquitto."""
    caplog.set_level(logging.INFO, logger="iiot_orchestration.mqtt")
    provision(conn)
    protocols = restart_lands_queued_messages_without_redelivery(
        conn, database_url, amqtt_broker, mqtt.MQTTv311, shared_subscription=False
    )
    assert protocols == ["3.1.1", "3.1.1"]
    assert "did not answer CONNECT (MQTT 5) within 5 s" in caplog.text
    assert "trying MQTT 3.1.1" in caplog.text
    assert (
        f"connected to mqtt://ingest@{amqtt_broker.host}:{amqtt_broker.port} with MQTT 3.1.1"
        in caplog.text
    )


def test_daemon_on_mqtt_311_when_forced(conn, database_url, ingest_broker, caplog):
    """Mosquitto speaks both; forced to 3.1.1 the daemon keeps its shared subscription and
    persistent session, and warns that 3.1.1 cannot confirm shared subscriptions. Mosquitto
    delivers unacknowledged messages again on reconnection (without the daemon's PUBACKs the
    second run receives all 15, 10 of them duplicates), so this proves they are acknowledged."""
    provision(conn)
    protocols = restart_lands_queued_messages_without_redelivery(
        conn, database_url, ingest_broker, mqtt.MQTTv5, mqtt_protocol="3.1.1"
    )
    assert protocols == ["3.1.1", "3.1.1"]
    assert "cannot tell whether the broker supports shared subscriptions" in caplog.text


def test_mqtt_5_forced_on_a_broker_without_it_is_a_clear_error(amqtt_broker):
    with pytest.raises(MqttError) as refused:
        connect_client(MqttOptions(amqtt_broker.url, protocol="5"), "iiot-test")
    assert "refused the connection (MQTT 5): Unsupported protocol version" in str(refused.value)
    assert "IIOT_MQTT_PROTOCOL=5" in str(refused.value)


def test_bad_protocol_setting_is_a_clear_error():
    with pytest.raises(
        SettingsError, match=r"IIOT_MQTT_PROTOCOL='4' is invalid: expected auto, 5 or 3\.1\.1$"
    ):
        load_settings({"IIOT_MQTT_PROTOCOL": "4"})
    assert load_settings({"IIOT_MQTT_PROTOCOL": "3.1.1"}).mqtt_protocol == "3.1.1"
    config = IngestConfig(UNUSED_DATABASE, "mqtt://127.0.0.1:1", mqtt_protocol="4")
    with pytest.raises(MqttError, match=r"IIOT_MQTT_PROTOCOL='4' is invalid: expected auto, 5"):
        IngestDaemon(config)
