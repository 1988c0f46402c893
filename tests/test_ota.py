"""Over-the-air renewal on the platform side: the cert_update message, the daily batch, the
acknowledgements and what they complete, timeouts, backoff and the ack consumer. The broker is
a real Mosquitto (plain listener; the TLS and ACL side is in test_pki and test_gateway_agent)."""

import base64
import json
import shutil
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import paho.mqtt.client as mqtt
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from assets.certificates import CertificatesResource, certificate_renewal_batch
from iiot_orchestration import ota, ota_acks, pki
from iiot_orchestration.mqtt import MqttOptions
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.services import free_port, start_mosquitto
from iiot_orchestration.settings import load_settings
from sensors.certificates import ota_ack_sensor
from tests.certificate_helpers import PREFIX, copy_ca, make_device, make_tenant
from tests.ingest_helpers import wait_for

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
POLICY = ota.RenewalPolicy(
    batch_size=3,
    offline=timedelta(days=7),
    ack_timeout=timedelta(hours=48),
    backoff=timedelta(hours=24),
)

# a well-formed renewal id that no renewal has (fixed: xdist workers collect the same ids)
UNKNOWN_RENEWAL = "2ecfa27c-0093-4c00-8917-cc86c41135f2"


@pytest.fixture(scope="session")
def session_ca(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ota_ca")
    pki.init_ca(directory)
    return directory


@pytest.fixture
def ca(session_ca, tmp_path) -> pki.CertificateAuthority:
    return copy_ca(session_ca, tmp_path / "pki")


@pytest.fixture
def broker(tmp_path):
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not on PATH")
    running = start_mosquitto(tmp_path / "mosquitto")
    yield running
    running.stop()


@pytest.fixture
def publisher(broker):
    with ota.mqtt_publisher(MqttOptions(broker.url, "5")) as connected:
        yield connected


def mac(n: int) -> str:
    return f"02:00:00:00:01:{n:02x}"


def due_fleet(conn, ca, expiries: dict[int, int], last_seen=NOW) -> dict[int, pki.Issued]:
    """Devices mac(n) whose certificate expires in ``expiries[n]`` days (from the real now, as
    certificates are issued now), seen at ``last_seen``."""
    make_tenant(conn)
    return {
        n: make_device(conn, ca, mac(n), expires_in=timedelta(days=days), last_seen=last_seen)
        for n, days in expiries.items()
    }


def statuses(conn, device_mac: str) -> list[str]:
    return [
        s
        for (s,) in conn.execute(
            "SELECT c.status FROM device_certificates c JOIN devices d USING (device_id)"
            " WHERE d.mac = %s ORDER BY c.certificate_id",
            (device_mac,),
        )
    ]


class Subscriber:
    """A plain-listener subscriber that keeps every message, retained flag included."""

    def __init__(self, broker, topic_filter: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda _c, _u, m: self.messages.append(
            (m.topic, bytes(m.payload), bool(m.retain))
        )
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(topic_filter, qos=1)
        assert subscribed.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained(broker, topic: str) -> bytes | None:
    """The retained message on ``topic`` (a sentinel subscribed after it proves the end)."""
    sentinel = f"sentinel/{uuid.uuid4().hex}"
    publish(broker, sentinel, b"x", retain=True)
    first = Subscriber(broker, topic)
    try:
        second_done = threading.Event()
        first.client.on_subscribe = lambda *_a: second_done.set()
        first.client.subscribe(sentinel, qos=1)
        assert second_done.wait(10)
        assert wait_for(lambda: any(t == sentinel for t, _, _ in first.messages))
        found = [p for t, p, r in first.messages if t == topic and r]
        return found[0] if found else None
    finally:
        first.close()


def publish(broker, topic: str, payload: bytes, *, retain: bool = False) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def ack(conn, device_mac: str, renewal_id: str, status: str, **extra) -> int:
    payload = json.dumps({"renewal_id": renewal_id, "status": status, **extra}).encode()
    return ota.land_ack(conn, ota.ack_topic(PREFIX, device_mac), payload, PREFIX)


# --- the message ----------------------------------------------------------------------------


def test_update_is_signed_by_the_ca_and_its_key_readable_only_by_the_device(conn, ca):
    make_tenant(conn)
    device = make_device(conn, ca, mac(1))
    stranger = make_device(conn, ca, mac(2))
    new_key = pki.generate_key()
    new = pki.issue_device_certificate(ca, mac(1), new_key.public_key())
    renewal_id = str(uuid.uuid4())
    payload = ota.build_update(
        ca,
        renewal_id=renewal_id,
        mac=mac(1),
        certificate=new,
        private_key=new_key,
        recipient=device.certificate,
        now=NOW,
    )
    document = json.loads(payload)
    assert document["renewal_id"] == renewal_id
    assert document["serial"] == pki.serial_hex(new.serial_number)
    assert document["key"]["recipient_serial"] == pki.serial_hex(device.certificate.serial_number)
    signature = document.pop("signature")
    assert signature["algorithm"] == ota.SIGNATURE_ALGORITHM
    ca.key.public_key().verify(
        base64.b64decode(signature["value"]), ota.canonical(document), ota.PSS, hashes.SHA256()
    )
    tampered = document | {"mac": mac(2)}
    with pytest.raises(InvalidSignature):
        ca.key.public_key().verify(
            base64.b64decode(signature["value"]), ota.canonical(tampered), ota.PSS, hashes.SHA256()
        )
    box = document["key"]
    content_key = device.key.decrypt(base64.b64decode(box["wrapped_key"]), ota.OAEP)
    pem = AESGCM(content_key).decrypt(
        base64.b64decode(box["nonce"]),
        base64.b64decode(box["ciphertext"]),
        ota.key_aad(renewal_id, mac(1)),
    )
    recovered = serialization.load_pem_private_key(pem, password=None)
    assert recovered.public_key().public_numbers() == new.public_key().public_numbers()
    with pytest.raises(ValueError, match="Decryption failed"):
        stranger.key.decrypt(base64.b64decode(box["wrapped_key"]), ota.OAEP)


def test_backoff_doubles_up_to_thirty_days():
    policy = ota.RenewalPolicy(backoff=timedelta(hours=24))
    assert [policy.backoff_after(n).days for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert policy.backoff_after(20) == ota.MAX_BACKOFF
    settings = load_settings(
        {"IIOT_CERT_RENEWAL_BATCH_SIZE": "25", "IIOT_CERT_ACK_TIMEOUT_HOURS": "6"}
    )
    assert ota.RenewalPolicy.from_settings(settings).batch_size == 25
    assert ota.RenewalPolicy.from_settings(settings).ack_timeout == timedelta(hours=6)
    assert ota.RenewalPolicy.from_settings(load_settings({})).batch_size == 10


# --- the batch ------------------------------------------------------------------------------


def test_batch_takes_at_most_n_a_day_soonest_first_and_never_reissues_that_day(
    conn, ca, broker, publisher
):
    now = datetime.now(UTC)
    due_fleet(conn, ca, {1: 600, 2: 100, 3: 300, 4: 200, 5: 700, 6: 1000}, last_seen=now)
    make_device(conn, ca, mac(7), expires_in=timedelta(days=50), last_seen=now - timedelta(days=8))
    make_device(conn, ca, mac(8), expires_in=timedelta(days=40), last_seen=None)
    watcher = Subscriber(broker, f"{PREFIX}/devices/+/cert_update")
    try:
        first = ota.run_batch(conn, ca, publisher, POLICY, prefix=PREFIX, now=now)
        assert first.published == [mac(2), mac(4), mac(3)]  # soonest expiry first
        assert first.failed == {}
        again = ota.run_batch(conn, ca, publisher, POLICY, prefix=PREFIX, now=now)
        assert (again.issued, again.earlier_today) == (0, 3)
        pending = conn.execute(
            "SELECT count(*) FROM device_certificates WHERE status = 'pending'"
        ).fetchone()[0]
        assert pending == 3
        assert wait_for(lambda: len(watcher.messages) == 3)
        # the next day: the three in flight are skipped, the offline and never-seen ones too,
        # and 6 is not due (1000 days)
        tomorrow = ota.run_batch(
            conn, ca, publisher, POLICY, prefix=PREFIX, now=now + timedelta(days=1)
        )
        assert tomorrow.published == [mac(1), mac(5)]
    finally:
        watcher.close()
    topics = {t for t, _, _ in watcher.messages}
    assert topics == {ota.update_topic(PREFIX, mac(n)) for n in (1, 2, 3, 4, 5)}
    message = retained(broker, ota.update_topic(PREFIX, mac(2)))
    assert json.loads(message)["renewal_id"] == first.renewal_ids[mac(2)]
    rows = conn.execute(
        "SELECT batch_day, count(*) FROM certificate_renewals GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert [n for _, n in rows] == [3, 2]
    assert statuses(conn, mac(2)) == ["active", "pending"]


def test_unpublishable_updates_fail_and_the_device_keeps_its_certificate(conn, ca):
    now = datetime.now(UTC)
    due_fleet(conn, ca, {1: 100}, last_seen=now)
    nowhere = MqttOptions(f"mqtt://127.0.0.1:{free_port()}", "5")
    with ota.mqtt_publisher(nowhere) as publisher:
        result = ota.run_batch(conn, ca, publisher, POLICY, prefix=PREFIX, now=now)
    assert list(result.failed) == [mac(1)]
    assert result.failed[mac(1)].startswith("publish_failed: cannot connect to MQTT broker")
    assert statuses(conn, mac(1)) == ["active", "revoked"]
    status, retry = conn.execute(
        "SELECT status, next_attempt_after FROM certificate_renewals"
    ).fetchone()
    assert (status, retry) == ("failed", now + timedelta(hours=24))


# --- acknowledgements -----------------------------------------------------------------------


def test_success_activates_failure_revokes_and_the_retry_backs_off(conn, ca, broker, publisher):
    now = datetime.now(UTC)
    due_fleet(conn, ca, {1: 100, 2: 200}, last_seen=now)
    batch = ota.run_batch(conn, ca, publisher, POLICY, prefix=PREFIX, now=now)
    new_serial = conn.execute(
        "SELECT n.serial FROM certificate_renewals r"
        " JOIN device_certificates n ON n.certificate_id = r.new_certificate_id"
        " WHERE r.renewal_id = %s",
        (batch.renewal_ids[mac(1)],),
    ).fetchone()[0]
    ack(conn, mac(1), batch.renewal_ids[mac(1)], "success", serial=pki.serial_hex(int(new_serial)))
    ack(conn, mac(2), batch.renewal_ids[mac(2)], "failure", reason="corrupt_certificate")
    done = ota.complete_renewals(conn, publisher, POLICY, prefix=PREFIX, now=now)
    assert (done.completed, done.failed, done.cleared, done.revoked) == (1, 1, 2, 1)
    assert statuses(conn, mac(1)) == ["superseded", "active"]
    assert statuses(conn, mac(2)) == ["active", "revoked"]
    assert retained(broker, ota.update_topic(PREFIX, mac(1))) is None
    assert retained(broker, ota.update_topic(PREFIX, mac(2))) is None
    reason, retry = conn.execute(
        "SELECT failure_reason, next_attempt_after FROM certificate_renewals WHERE renewal_id = %s",
        (batch.renewal_ids[mac(2)],),
    ).fetchone()
    assert reason == "device: corrupt_certificate"
    assert retry == now + timedelta(hours=24)
    actions = {a for (a,) in conn.execute("SELECT action FROM audit_log")}
    assert {"certificate.renewed", "certificate.renewal_failed"} <= actions
    # not again today, nor before the backoff ends; then a second attempt, which backs off 2x
    assert ota.run_batch(conn, ca, publisher, POLICY, prefix=PREFIX, now=now).issued == 0
    early = now + timedelta(hours=23)
    assert ota.run_batch(conn, ca, publisher, POLICY, prefix=PREFIX, now=early).issued == 0
    later = now + timedelta(hours=25)
    retry_batch = ota.run_batch(conn, ca, publisher, POLICY, prefix=PREFIX, now=later)
    assert retry_batch.published == [mac(2)]
    renewal_id = retry_batch.renewal_ids[mac(2)]
    assert conn.execute(
        "SELECT attempt FROM certificate_renewals WHERE renewal_id = %s", (renewal_id,)
    ).fetchone() == (2,)
    ack(conn, mac(2), renewal_id, "failure", reason="broker_refused_new_certificate")
    ota.complete_renewals(conn, publisher, POLICY, prefix=PREFIX, now=later)
    assert conn.execute(
        "SELECT next_attempt_after FROM certificate_renewals WHERE renewal_id = %s", (renewal_id,)
    ).fetchone() == (later + timedelta(hours=48),)
    assert statuses(conn, mac(2)) == ["active", "revoked", "revoked"]


def test_silent_devices_time_out_and_keep_their_certificate(conn, ca, broker, publisher):
    now = datetime.now(UTC)
    due_fleet(conn, ca, {1: 100}, last_seen=now)
    batch = ota.run_batch(conn, ca, publisher, POLICY, prefix=PREFIX, now=now)
    before = ota.complete_renewals(
        conn, publisher, POLICY, prefix=PREFIX, now=now + POLICY.ack_timeout
    )
    assert before.timed_out == 0
    after = ota.complete_renewals(
        conn, publisher, POLICY, prefix=PREFIX, now=now + POLICY.ack_timeout + timedelta(seconds=1)
    )
    assert (after.timed_out, after.cleared, after.revoked) == (1, 1, 1)
    assert statuses(conn, mac(1)) == ["active", "revoked"]
    status, reason = conn.execute(
        "SELECT status, failure_reason FROM certificate_renewals WHERE renewal_id = %s",
        (batch.renewal_ids[mac(1)],),
    ).fetchone()
    assert (status, reason) == ("timed_out", "no acknowledgement within 48 hours")
    # a success that comes after the platform gave up changes nothing
    ack(conn, mac(1), batch.renewal_ids[mac(1)], "success")
    late = ota.process_acks(conn, POLICY)
    assert late.outcomes == {"late": 1}
    assert statuses(conn, mac(1)) == ["active", "revoked"]


def test_acks_that_do_not_fit_are_kept_and_change_nothing(conn, ca, broker, publisher):
    now = datetime.now(UTC)
    due_fleet(conn, ca, {1: 100, 2: 200}, last_seen=now)
    batch = ota.run_batch(conn, ca, publisher, POLICY, prefix=PREFIX, now=now)
    one, two = batch.renewal_ids[mac(1)], batch.renewal_ids[mac(2)]
    ack(conn, mac(2), one, "success")  # mac(2) acks mac(1)'s renewal
    ack(conn, mac(1), str(uuid.uuid4()), "success")
    ack(conn, mac(1), one, "success", serial="abcdef")  # not the certificate it was sent
    ack(conn, mac(2), two, "success")
    ack(conn, mac(2), two, "success")  # delivered twice
    done = ota.process_acks(conn, POLICY, now=now)
    assert done.outcomes == {
        "wrong_device": 1,
        "unknown_renewal": 1,
        "failed": 1,
        "completed": 1,
        "duplicate": 1,
    }
    assert statuses(conn, mac(1)) == ["active", "revoked"]
    assert statuses(conn, mac(2)) == ["superseded", "active"]
    assert conn.execute("SELECT count(*) FROM certificate_acks").fetchone()[0] == 5


@pytest.mark.parametrize(
    ("topic", "payload", "error"),
    [
        (f"{PREFIX}/devices/{mac(1)}/cert_ack", b"not json", "not JSON"),
        (f"{PREFIX}/devices/{mac(1)}/cert_ack", b"[1, 2]", "not a JSON object"),
        (f"{PREFIX}/devices/{mac(1)}/cert_ack", b'{"status": "success"}', "renewal_id is missing"),
        (
            f"{PREFIX}/devices/{mac(1)}/cert_ack",
            b'{"renewal_id": "1; DROP TABLE devices", "status": "success"}',
            "not a UUID",
        ),
        (
            f"{PREFIX}/devices/{mac(1)}/cert_ack",
            json.dumps({"renewal_id": UNKNOWN_RENEWAL, "status": "maybe"}).encode(),
            "status must be success or failure",
        ),
        (
            f"{PREFIX}/devices/{mac(1)}/cert_ack",
            json.dumps({"renewal_id": UNKNOWN_RENEWAL, "status": "failure"}).encode(),
            "a failure needs a reason",
        ),
        (
            f"{PREFIX}/devices/{mac(1)}/cert_ack",
            json.dumps(
                {"renewal_id": UNKNOWN_RENEWAL, "status": "failure", "reason": "x" * 301}
            ).encode(),
            "at most 300 characters",
        ),
        (
            f"{PREFIX}/devices/{mac(1)}/cert_ack",
            json.dumps(
                {"renewal_id": UNKNOWN_RENEWAL, "status": "success", "serial": "zz"}
            ).encode(),
            "serial must be hex",
        ),
        (f"{PREFIX}/devices/{mac(1)}/cert_ack", b"{" * 5000, "larger than 4096 bytes"),
        (f"{PREFIX}/devices/not-a-mac/cert_ack", b"{}", "is not iiot/devices/<mac>/cert_ack"),
        (f"other/devices/{mac(1)}/cert_ack", b"{}", "is not iiot/devices/<mac>/cert_ack"),
    ],
)
def test_malformed_acks_are_recorded_with_the_reason(conn, topic, payload, error):
    ack_id = ota.land_ack(conn, topic, payload, PREFIX)
    outcome, detail, stored, size = conn.execute(
        "SELECT outcome, detail, payload, payload_size FROM certificate_acks WHERE ack_id = %s",
        (ack_id,),
    ).fetchone()
    assert outcome == "malformed"
    assert error in detail
    assert bytes(stored) == payload[: ota.MAX_ACK_BYTES]
    assert size == len(payload)
    assert ota.process_acks(conn, POLICY).outcomes == {}  # nothing left to process


# --- the consumer, the sensor and the asset -----------------------------------------------------


def test_consumer_lands_acks_published_while_it_was_away(conn, database_url, broker):
    options = MqttOptions(broker.url, "5")
    client_id = f"acks-{uuid.uuid4().hex[:6]}"
    assert (
        ota_acks.collect_acks(database_url, options, PREFIX, client_id=client_id, idle_s=0.2) == 0
    )
    renewal_id = str(uuid.uuid4())
    for payload in (
        json.dumps({"renewal_id": renewal_id, "status": "success"}).encode(),
        b"garbage",
        json.dumps({"renewal_id": renewal_id, "status": "failure", "reason": "x"}).encode(),
    ):
        publish(broker, ota.ack_topic(PREFIX, mac(1)), payload)
    landed = ota_acks.collect_acks(database_url, options, PREFIX, client_id=client_id, idle_s=0.5)
    assert landed == 3
    rows = conn.execute("SELECT status, outcome FROM certificate_acks ORDER BY ack_id").fetchall()
    assert rows == [("success", None), (None, "malformed"), ("failure", None)]
    # acknowledged to the broker after landing: none comes again
    assert (
        ota_acks.collect_acks(database_url, options, PREFIX, client_id=client_id, idle_s=0.2) == 0
    )


def resources(database_url: str, ca: pki.CertificateAuthority, broker) -> dict:
    return {
        "postgres": PostgresResource(database_url=database_url),
        "certificates": CertificatesResource(
            pki_dir=str(ca.directory),
            mqtt_url=broker.url,
            mqtt_protocol="5",
            topic_prefix=PREFIX,
            batch_size=2,
            ack_idle_seconds=0.3,
        ),
    }


def test_batch_asset_and_ack_sensor_renew_a_device(conn, database_url, ca, broker):
    due_fleet(conn, ca, {1: 100, 2: 150, 3: 200}, last_seen=datetime.now(UTC))
    result = dg.materialize(
        [certificate_renewal_batch], resources=resources(database_url, ca, broker)
    )
    assert result.success
    (event,) = result.get_asset_materialization_events()
    assert event.materialization.metadata["published"].value == 2
    assert {e.check_name: e.passed for e in result.get_asset_check_evaluations()} == {
        "renewals_within_daily_limit": True,
        "at_most_one_renewal_per_device_a_day": True,
    }
    again = dg.materialize(
        [certificate_renewal_batch], resources=resources(database_url, ca, broker)
    )
    assert (
        again.get_asset_materialization_events()[0].materialization.metadata["published"].value == 0
    )
    (renewal_id,) = conn.execute(
        "SELECT renewal_id::text FROM certificate_renewals r JOIN devices d USING (device_id)"
        " WHERE d.mac = %s",
        (mac(1),),
    ).fetchone()
    # the batch created the ack consumer's session, so an ack sent before any tick waits there
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(
            instance=instance, resources=resources(database_url, ca, broker)
        )
        publish(
            broker,
            ota.ack_topic(PREFIX, mac(1)),
            json.dumps({"renewal_id": renewal_id, "status": "success"}).encode(),
        )
        second = ota_ack_sensor(context)
    assert second.skip_message.startswith("1 acks landed, 1 renewed, 0 failed")
    assert statuses(conn, mac(1)) == ["superseded", "active"]
    assert retained(broker, ota.update_topic(PREFIX, mac(1))) is None
    assert retained(broker, ota.update_topic(PREFIX, mac(2))) is not None


def test_batch_asset_without_a_broker_fails_clearly(conn, database_url, ca, monkeypatch):
    monkeypatch.delenv("IIOT_MQTT_URL", raising=False)
    result = dg.materialize(
        [certificate_renewal_batch],
        resources={
            "postgres": PostgresResource(database_url=database_url),
            "certificates": CertificatesResource(pki_dir=str(ca.directory)),
        },
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "IIOT_MQTT_URL is not set" in failure.step_failure_data.error.message


def test_batch_asset_with_an_unreachable_broker_issues_nothing(conn, database_url, ca):
    due_fleet(conn, ca, {1: 100}, last_seen=datetime.now(UTC))
    unreachable = {
        "postgres": PostgresResource(database_url=database_url),
        "certificates": CertificatesResource(
            pki_dir=str(ca.directory), mqtt_url=f"mqtt://127.0.0.1:{free_port()}", mqtt_protocol="5"
        ),
    }
    result = dg.materialize(
        [certificate_renewal_batch], resources=unreachable, raise_on_error=False
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "the broker is not usable, nothing issued: cannot connect" in (
        failure.step_failure_data.error.message
    )
    assert statuses(conn, mac(1)) == ["active"]
    assert conn.execute("SELECT count(*) FROM certificate_renewals").fetchone() == (0,)
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources=unreachable)
        assert ota_ack_sensor(context).skip_message == "no renewal in flight"
