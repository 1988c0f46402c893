"""The gateway agent against a real Mosquitto with mutual TLS, CRL and ACL, and the platform's
renewal machinery around it: the full renewal, its failure paths with rollback and retry, the
disk buffer, and the agent's own checks of what it is sent."""

import json
import struct
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from assets.certificates import (
    CertificatesResource,
    certificate_expiry_sweep,
    certificate_renewal_batch,
)
from firmware import agent as agent_module
from firmware.agent import (
    BACKUP_FILE,
    IDENTITY_FILE,
    AgentConfig,
    AgentError,
    GatewayAgent,
    ModbusMeterReader,
    SimulatedMeterReader,
    load_identity,
)
from iiot_orchestration import ota, pki
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.services import free_port
from sensors.certificates import ota_ack_sensor
from tests.certificate_helpers import (
    PREFIX,
    Recorder,
    connect_platform,
    copy_ca,
    make_device,
    make_tenant,
    retained,
    start_tls_broker,
)
from tests.ingest_helpers import wait_for

MAC = "02:00:00:00:02:01"
OTHER = "02:00:00:00:02:02"
POLICY = ota.RenewalPolicy(backoff=timedelta(hours=24))
# paho leaves the socket of a refused TLS connection to the garbage collector, which warns
REFUSED_TLS = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <ssl.SSLSocket:pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture(scope="session")
def session_ca(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("agent_ca")
    pki.init_ca(directory)
    return directory


@pytest.fixture
def ca(session_ca, tmp_path) -> pki.CertificateAuthority:
    return copy_ca(session_ca, tmp_path / "pki")


class Platform:
    """The device, the broker and the Dagster pieces of one test."""

    def __init__(self, conn, database_url: str, ca: pki.CertificateAuthority, tmp_path: Path):
        self.conn, self.database_url, self.ca = conn, database_url, ca
        self.state = tmp_path / "gateway"
        make_tenant(conn)
        # due: not_after within 730 days
        self.issued = make_device(
            conn, ca, MAC, expires_in=timedelta(days=700), state_dir=self.state
        )
        self.tls = start_tls_broker(conn, ca, tmp_path)
        self.instance = dg.DagsterInstance.ephemeral()

    def resources(self) -> dict:
        platform = self.tls.platform
        return {
            "postgres": PostgresResource(database_url=self.database_url),
            "certificates": CertificatesResource(
                pki_dir=str(self.ca.directory),
                mqtt_url=platform.url,
                mqtt_protocol="5",
                mqtt_ca_file=str(platform.ca_file),
                mqtt_cert_file=str(platform.cert_file),
                mqtt_key_file=str(platform.key_file),
                topic_prefix=PREFIX,
                ack_idle_seconds=0.3,
            ),
        }

    def materialize(self, asset):
        result = dg.materialize([asset], resources=self.resources(), instance=self.instance)
        assert result.success
        (event,) = result.get_asset_materialization_events()
        return {k: v.value for k, v in event.materialization.metadata.items()}

    def sensor(self) -> str:
        context = dg.build_sensor_context(instance=self.instance, resources=self.resources())
        return ota_ack_sensor(context).skip_message

    def statuses(self) -> list[str]:
        return [
            s
            for (s,) in self.conn.execute(
                "SELECT status FROM device_certificates ORDER BY certificate_id"
            )
        ]

    def renewal(self, renewal_id: str) -> tuple:
        return self.conn.execute(
            "SELECT status, failure_reason, next_attempt_after FROM certificate_renewals"
            " WHERE renewal_id = %s",
            (renewal_id,),
        ).fetchone()

    def close(self) -> None:
        self.tls.broker.stop()
        self.instance.dispose()


@pytest.fixture
def platform(conn, database_url, ca, tmp_path):
    running = Platform(conn, database_url, ca, tmp_path)
    yield running
    running.close()


def serial(certificate) -> str:
    return pki.serial_hex(certificate.serial_number)


def start_renewal(platform: Platform) -> str:
    """The sweep finds the device due, the sensor has nothing to do yet, the batch publishes."""
    swept = platform.materialize(certificate_expiry_sweep)
    assert swept["renewal_due"] == 1
    assert platform.sensor() == "no renewal in flight"
    batch = platform.materialize(certificate_renewal_batch)
    assert batch["devices"] == [MAC]
    return batch["renewal_ids"][MAC]


def receive_update(gateway: GatewayAgent) -> None:
    """Wait for a cert_update, connected (again) as the agent's loop keeps it: Mosquitto 2.0.11
    now and then expires a connected client ("Expiring client ... due to timeout") after a
    refused TLS handshake; a reconnection gets the retained update again."""
    assert wait_for(
        lambda: (gateway.connected or gateway.connect()) and not gateway.updates.empty()
    )


def confirmed(gateway: GatewayAgent) -> bool:
    """Handle what came (the retained update again after a reconnection is answered again;
    the empty message of its clearing confirms the ack); whether no ack awaits confirmation."""
    gateway.handle_updates()
    return gateway.buffer.acks() == []


def telemetry_reaches_platform(platform: Platform, gateway: GatewayAgent, count: int) -> None:
    """``count`` new readings reach the platform, sent as the agent's loop sends them
    (reconnecting when needed, see receive_update)."""
    topic = f"{PREFIX}/devices/{MAC}/telemetry"
    recorder = Recorder(platform.tls, topic)
    try:
        for _ in range(count):
            gateway.collect()

        def delivered() -> bool:
            if gateway.connected or gateway.connect():
                gateway.flush()
            return len(gateway.buffer) == 0

        assert wait_for(delivered)
        assert wait_for(lambda: readings(recorder.on(topic)) >= count)
    finally:
        recorder.close()


def readings(payloads: list[bytes]) -> int:
    return sum(len(json.loads(p).get("readings", [None])) for p in payloads)


def test_full_renewal_over_the_air(platform):
    old_identity = (platform.state / IDENTITY_FILE).read_bytes()
    renewal_id = start_renewal(platform)
    gateway = platform.tls.agent(MAC, platform.state)
    try:
        receive_update(gateway)
        # the same answer for each copy (a reconnection delivers the retained update again)
        assert set(gateway.handle_updates()) == {(renewal_id, "success", None)}
        new = gateway.certificate()
        assert serial(new) != serial(platform.issued.certificate)
        assert (platform.state / BACKUP_FILE).read_bytes() == old_identity

        summary = platform.sensor()
        assert summary.startswith("1 acks landed, 1 renewed, 0 failed")
        assert wait_for(lambda: confirmed(gateway))  # the retained update cleared
        assert platform.statuses() == ["superseded", "active"]
        (active,) = platform.conn.execute(
            "SELECT serial FROM device_certificates WHERE status = 'active'"
        ).fetchone()
        assert int(active) == new.serial_number
        assert platform.renewal(renewal_id)[0] == "succeeded"
        assert retained(platform.tls, ota.update_topic(PREFIX, MAC)) is None

        # the same update delivered again is acknowledged again, not installed again
        assert gateway.install(_update_payload(platform, renewal_id, gateway)) == (
            renewal_id,
            "success",
            None,
        )
        assert serial(gateway.certificate()) == serial(new)

        # the old certificate revoked: the device keeps publishing with the new one
        pki.revoke(
            platform.conn,
            MAC,
            serial=platform.issued.certificate.serial_number,
            code="superseded",
            actor="test",
        )
        pki.refresh_crl(platform.conn, platform.ca)
        platform.tls.reload()
        gateway.disconnect()
        assert gateway.connect(), gateway.last_refusal
        telemetry_reaches_platform(platform, gateway, 3)
    finally:
        gateway.close()


def _update_payload(platform: Platform, renewal_id: str, gateway: GatewayAgent) -> bytes:
    """A cert_update for ``renewal_id`` as the platform would send it (for re-deliveries)."""
    key, certificate = load_identity((platform.state / IDENTITY_FILE).read_bytes())
    return ota.build_update(
        platform.ca,
        renewal_id=renewal_id,
        mac=MAC,
        certificate=certificate,
        private_key=key,
        recipient=certificate,
        now=datetime.now(UTC),
    )


def _corrupt(platform: Platform, renewal_id: str) -> None:
    document = json.loads(retained(platform.tls, ota.update_topic(PREFIX, MAC)))
    document["certificate"] = (
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    )
    _replace_retained(platform, ota.canonical(ota.sign(platform.ca.key, document)))


def _for_another_mac(platform: Platform, renewal_id: str) -> None:
    key = pki.generate_key()
    certificate = pki.issue_device_certificate(platform.ca, OTHER, key.public_key())
    payload = ota.build_update(
        platform.ca,
        renewal_id=renewal_id,
        mac=MAC,
        certificate=certificate,
        private_key=key,
        recipient=platform.issued.certificate,
        now=datetime.now(UTC),
    )
    _replace_retained(platform, payload)


def _refused_by_broker(platform: Platform, renewal_id: str) -> None:
    (pending,) = platform.conn.execute(
        "SELECT serial FROM device_certificates WHERE status = 'pending'"
    ).fetchone()
    pki.revoke(platform.conn, MAC, serial=int(pending), actor="test")
    pki.refresh_crl(platform.conn, platform.ca)
    platform.tls.restart()


def _replace_retained(platform: Platform, payload: bytes) -> None:
    client = connect_platform(platform.tls)
    client.publish(ota.update_topic(PREFIX, MAC), payload, qos=1, retain=True).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


@REFUSED_TLS
@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (_corrupt, "corrupt_certificate"),
        (_for_another_mac, "wrong_device: certificate for 02:00:00:00:02:02"),
        (_refused_by_broker, "broker_refused_new_certificate"),
    ],
)
def test_failed_renewals_roll_back_and_the_platform_retries(platform, spoil, reason):
    renewal_id = start_renewal(platform)
    spoil(platform, renewal_id)
    gateway = platform.tls.agent(MAC, platform.state)
    try:
        receive_update(gateway)
        (outcome,) = set(gateway.handle_updates())  # the same answer for each copy
        assert outcome[:2] == (renewal_id, "failure")
        assert outcome[2].startswith(reason)
        # never without a working certificate: the old one, still connected and publishing
        assert serial(gateway.certificate()) == serial(platform.issued.certificate)
        assert gateway.connected
        telemetry_reaches_platform(platform, gateway, 2)

        assert ", 1 failed" in platform.sensor()
        # clearing the retained update confirms the ack to the agent, which stops repeating it
        assert wait_for(lambda: confirmed(gateway))
        status, why, retry_after = platform.renewal(renewal_id)
        assert status == "failed"
        assert why.startswith(f"device: {reason}")
        assert platform.statuses() == ["active", "revoked"]
        assert retained(platform.tls, ota.update_topic(PREFIX, MAC)) is None

        # two days later (the history moved back instead of the clocks forward: the device
        # checks the certificate's validity against its own clock), past the backoff, the
        # daily batch tries again; this time it works
        assert retry_after - datetime.now(UTC) > timedelta(hours=23)
        platform.conn.execute(
            "UPDATE certificate_renewals SET batch_day = batch_day - 2,"
            " issued_at = issued_at - interval '2 days',"
            " published_at = published_at - interval '2 days',"
            " completed_at = completed_at - interval '2 days',"
            " next_attempt_after = next_attempt_after - interval '2 days'"
        )
        retry = platform.materialize(certificate_renewal_batch)
        assert retry["devices"] == [MAC]
        receive_update(gateway)
        assert set(gateway.handle_updates()) == {(retry["renewal_ids"][MAC], "success", None)}
        assert "1 renewed" in platform.sensor()
        assert platform.statuses() == ["superseded", "revoked", "active"]
        telemetry_reaches_platform(platform, gateway, 1)
    finally:
        gateway.close()


@REFUSED_TLS
def test_readings_wait_on_disk_while_the_broker_is_away(conn, ca, tmp_path):
    make_tenant(conn)
    make_device(conn, ca, MAC, state_dir=tmp_path / "gateway")
    port = free_port()
    config = {"batch_max": 2}
    gateway = GatewayAgent(
        AgentConfig(MAC, "127.0.0.1", port, tmp_path / "gateway", PREFIX, **config),
        SimulatedMeterReader(MAC),
    )
    start = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
    try:
        assert not gateway.connect()
        assert gateway.last_refusal.startswith("unreachable")
        for minute in range(5):
            gateway.collect(start + timedelta(minutes=minute))
        assert gateway.flush() == 0
    finally:
        gateway.close()
    # a restart of the agent finds them on disk
    tls = start_tls_broker(conn, ca, tmp_path, port=port)
    topic = f"{PREFIX}/devices/{MAC}/telemetry"
    recorder = Recorder(tls, topic)
    gateway = tls.agent(MAC, tmp_path / "gateway", **config)
    try:
        assert len(gateway.buffer) == 5
        assert gateway.connect(), gateway.last_refusal
        assert gateway.flush() == 5
        assert wait_for(lambda: len(recorder.on(topic)) == 3)
        times = []
        for payload in recorder.on(topic):
            document = json.loads(payload)
            times += [r["ts"] for r in document.get("readings", [document])]
        assert times == [f"2026-11-20T12:0{m}:00.000Z" for m in range(5)]
        assert len(gateway.buffer) == 0
    finally:
        gateway.close()
        recorder.close()
        tls.broker.stop()


@REFUSED_TLS
def test_a_refused_identity_falls_back_to_the_backup(conn, ca, tmp_path):
    make_tenant(conn)
    state = tmp_path / "gateway"
    good = make_device(conn, ca, MAC, state_dir=state)
    stranger = pki.init_ca(tmp_path / "stranger")[0]
    key = pki.generate_key()
    foreign = pki.issue_device_certificate(stranger, MAC, key.public_key())
    (state / BACKUP_FILE).write_bytes((state / IDENTITY_FILE).read_bytes())
    (state / IDENTITY_FILE).write_bytes(
        pki.private_key_pem(key) + pki.certificate_pem(foreign).encode()
    )
    tls = start_tls_broker(conn, ca, tmp_path)
    gateway = tls.agent(MAC, state)
    try:
        assert gateway.connect(), gateway.last_refusal
        assert serial(gateway.certificate()) == serial(good.certificate)
    finally:
        gateway.close()
        tls.broker.stop()


# --- what the agent refuses to install (no broker needed) -------------------------------------


@pytest.fixture
def offline_agent(conn, ca, tmp_path):
    make_tenant(conn)
    issued = make_device(conn, ca, MAC, state_dir=tmp_path / "gateway")
    gateway = GatewayAgent(
        AgentConfig(MAC, "127.0.0.1", 1, tmp_path / "gateway", PREFIX), SimulatedMeterReader(MAC)
    )
    yield gateway, issued
    gateway.close()


def _valid(ca, issued, renewal_id: str, **changes) -> dict:
    key = pki.generate_key()
    certificate = pki.issue_device_certificate(ca, MAC, key.public_key())
    document = json.loads(
        ota.build_update(
            ca,
            renewal_id=renewal_id,
            mac=MAC,
            certificate=certificate,
            private_key=key,
            recipient=issued.certificate,
            now=datetime.now(UTC),
        )
    )
    return document | changes


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda ca, issued, rid: b"{not json", "malformed_update: not JSON"),
        (lambda ca, issued, rid: b"x" * 70_000, "malformed_update: larger than"),
        (
            lambda ca, issued, rid: json.dumps({"renewal_id": rid}).encode(),
            "malformed_update: not a signed JSON object",
        ),
        (  # altered after signing
            lambda ca, issued, rid: ota.canonical(_valid(ca, issued, rid, mac=OTHER)),
            "bad_signature",
        ),
        (  # signed by someone else's CA
            lambda ca, issued, rid: ota.canonical(
                ota.sign(pki.generate_key(), _valid(ca, issued, rid))
            ),
            "bad_signature",
        ),
        (
            lambda ca, issued, rid: ota.canonical(
                ota.sign(ca.key, _valid(ca, issued, rid, mac=OTHER))
            ),
            "wrong_device: update for 02:00:00:00:02:02",
        ),
        (
            lambda ca, issued, rid: ota.canonical(
                ota.sign(ca.key, _valid(ca, issued, rid, version=2))
            ),
            "unsupported_version",
        ),
        (  # the key box of another renewal: the AES-GCM tag binds it to its renewal id
            lambda ca, issued, rid: ota.canonical(
                ota.sign(
                    ca.key,
                    _valid(ca, issued, rid, key=_valid(ca, issued, str(uuid.uuid4()))["key"]),
                )
            ),
            "key_decrypt_failed",
        ),
        (  # certificate and key from two different renewals
            lambda ca, issued, rid: ota.canonical(
                ota.sign(
                    ca.key,
                    _valid(
                        ca,
                        issued,
                        rid,
                        certificate=_valid(ca, issued, rid)["certificate"],
                    ),
                )
            ),
            "key_mismatch",
        ),
    ],
)
def test_the_agent_refuses_bad_updates_and_says_why(offline_agent, ca, make, reason):
    gateway, issued = offline_agent
    renewal_id = str(uuid.uuid4())
    before = (gateway.config.state_dir / IDENTITY_FILE).read_bytes()
    rid, status, why = gateway.install(make(ca, issued, renewal_id))
    assert status == "failure"
    assert why.startswith(reason)
    assert (gateway.config.state_dir / IDENTITY_FILE).read_bytes() == before
    assert not (gateway.config.state_dir / BACKUP_FILE).exists()
    ((_, topic, payload),) = gateway.buffer.acks()
    assert topic == ota.ack_topic(PREFIX, MAC)
    sent = json.loads(payload)
    assert (sent["status"], sent["reason"]) == ("failure", why)
    # the platform reads the agent's ack, well formed when it could tell the renewal id
    parsed = ota.parse_ack(topic, payload, PREFIX)
    assert (parsed.error is None) == (rid is not None)


def test_an_update_with_an_untrusted_or_expired_certificate_is_refused(offline_agent, ca, tmp_path):
    gateway, issued = offline_agent
    stranger = pki.init_ca(tmp_path / "stranger")[0]
    key = pki.generate_key()
    foreign = pki.issue_device_certificate(stranger, MAC, key.public_key())

    def signed(certificate, private_key) -> bytes:
        renewal_id = str(uuid.uuid4())
        return ota.canonical(
            ota.sign(
                ca.key,
                json.loads(
                    ota.build_update(
                        ca,
                        renewal_id=renewal_id,
                        mac=MAC,
                        certificate=certificate,
                        private_key=private_key,
                        recipient=issued.certificate,
                        now=datetime.now(UTC),
                    )
                ),
            )
        )

    untrusted = signed(foreign, key)
    assert gateway.install(untrusted)[2].startswith("untrusted_issuer")
    assert gateway.install(untrusted)[2].startswith("untrusted_issuer")  # the same answer again
    past = datetime.now(UTC) - timedelta(days=20)
    expired = pki.issue_device_certificate(
        ca, MAC, key.public_key(), now=past, not_after=past + timedelta(days=1)
    )
    assert gateway.install(signed(expired, key))[2].startswith("certificate_not_valid_now")


# --- configuration, meters and the command line --------------------------------------------------


def test_agent_refuses_missing_or_foreign_credentials(conn, ca, tmp_path):
    with pytest.raises(AgentError, match=r"ca\.pem is missing"):
        GatewayAgent(AgentConfig(MAC, "127.0.0.1", 1, tmp_path / "empty"))
    make_tenant(conn)
    make_device(conn, ca, MAC, state_dir=tmp_path / "gateway")
    with pytest.raises(AgentError, match="is for 02:00:00:00:02:01, not 02:00:00:00:02:02"):
        GatewayAgent(AgentConfig(OTHER, "127.0.0.1", 1, tmp_path / "gateway"))
    (tmp_path / "gateway" / IDENTITY_FILE).write_bytes(b"garbage")
    with pytest.raises(AgentError, match="unreadable credentials"):
        GatewayAgent(AgentConfig(MAC, "127.0.0.1", 1, tmp_path / "gateway"))
    with pytest.raises(AgentError, match="unknown meter kind"):
        SimulatedMeterReader(MAC, "steam")


def test_modbus_reader_decodes_float_registers():
    registers = {100: struct.unpack(">HH", struct.pack(">f", 1234.5)), 102: (0x4120, 0x0000)}
    reader = ModbusMeterReader(
        lambda address, count: registers[address],
        {"energy_kwh": (100, 1.0), "power_w": (102, 1000)},
    )
    assert reader.read(datetime.now(UTC)) == {"energy_kwh": 1234.5, "power_w": 10000.0}
    broken = ModbusMeterReader(lambda address, count: [70000], {"power_w": (1, 1.0)})
    with pytest.raises(AgentError, match="expected two 16-bit words"):
        broken.read(datetime.now(UTC))
    with pytest.raises(AgentError, match="at least one register"):
        ModbusMeterReader(lambda a, c: [0, 0], {})


def test_simulated_readings_only_grow_and_the_buffer_keeps_its_limit(tmp_path):
    reader = SimulatedMeterReader(MAC)
    start = datetime(2026, 11, 20, tzinfo=UTC)
    values = [reader.read(start + timedelta(minutes=m))["energy_kwh"] for m in range(5)]
    assert values == sorted(values)
    buffer = agent_module.ReadingBuffer(tmp_path / "b.sqlite3", max_readings=3)
    for m in range(5):
        buffer.append(start + timedelta(minutes=m), {"energy_kwh": m})
    assert (len(buffer), buffer.dropped) == (3, 2)
    assert [metrics["energy_kwh"] for _, _, metrics in buffer.oldest(10)] == [2, 3, 4]
    buffer.close()


def test_agent_command_publishes_and_stops(conn, ca, tmp_path, capsys):
    make_tenant(conn)
    make_device(conn, ca, MAC, state_dir=tmp_path / "gateway")
    tls = start_tls_broker(conn, ca, tmp_path)
    topic = f"{PREFIX}/devices/{MAC}/telemetry"
    recorder = Recorder(tls, topic)
    try:
        code = agent_module.main(
            [
                "--mac",
                MAC,
                "--state-dir",
                str(tmp_path / "gateway"),
                "--host",
                "127.0.0.1",
                "--port",
                str(tls.port),
                "--interval",
                "0.05",
                "--count",
                "2",
            ]
        )
        assert code == 0
        assert "sent 2 readings, 0 left in the buffer" in capsys.readouterr().out
        assert wait_for(lambda: recorder.on(topic))
    finally:
        recorder.close()
        tls.broker.stop()
    assert (
        agent_module.main(
            ["--mac", MAC, "--state-dir", str(tmp_path / "none"), "--host", "127.0.0.1"]
        )
        == 1
    )
