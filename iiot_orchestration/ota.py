"""Over-the-air certificate renewal: the daily batch, the ``cert_update`` message, and the
acknowledgements that complete or fail each attempt (docs/certificates.md).

One attempt, a row of ``certificate_renewals``, goes ``issued`` -> ``published`` -> ``succeeded``,
``failed`` or ``timed_out``. The new certificate is ``pending`` until the device acknowledges
it; only then does it become ``active`` and the old one ``superseded``. A failed or timed-out
attempt revokes the pending certificate and leaves the old one active, so the device always
has a certificate the broker accepts; a later batch retries after a backoff that doubles with
each failure. Everything here works on a plain connection and a :class:`Publisher`, without
Dagster.

The ``cert_update`` payload (JSON, retained, QoS 1) carries the certificate, the new private
key encrypted to the device's current certificate (RSA-OAEP-SHA256 wrapping an AES-256-GCM
key), the renewal id, and an RSA-PSS signature by the CA over everything else.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol

import paho.mqtt.client as mqtt
import psycopg
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from iiot_orchestration import pki
from iiot_orchestration.errors import IiotError
from iiot_orchestration.mqtt import MqttError, MqttOptions, connect_client
from iiot_orchestration.registry import RegistryError, audit, normalise_mac
from iiot_orchestration.settings import Settings

log = logging.getLogger(__name__)

PAYLOAD_VERSION = 1
KEY_ALGORITHM = "RSA-OAEP-SHA256+AES-256-GCM"
SIGNATURE_ALGORITHM = "RSA-PSS-SHA256"
MAX_ACK_BYTES = 4096
MAX_BACKOFF = timedelta(days=30)
PUBLISH_TIMEOUT_S = 15.0
ACK_STATUSES = ("success", "failure")
ACTOR = "ota"
OPEN = ("issued", "published")
FINISHED = ("succeeded", "failed", "timed_out")


class OtaError(IiotError):
    """A renewal step could not be done (broker unreachable, message refused, bad state)."""


@dataclass(frozen=True)
class RenewalPolicy:
    """How many devices a day, which ones, and how long to wait: IIOT_CERT_* settings."""

    batch_size: int = 10
    offline: timedelta = timedelta(days=7)
    ack_timeout: timedelta = timedelta(hours=48)
    backoff: timedelta = timedelta(hours=24)
    window: timedelta = pki.RENEWAL_WINDOW

    @classmethod
    def from_settings(cls, settings: Settings) -> RenewalPolicy:
        return cls(
            batch_size=settings.cert_renewal_batch_size,
            offline=timedelta(days=settings.cert_offline_days),
            ack_timeout=timedelta(hours=settings.cert_ack_timeout_hours),
            backoff=timedelta(hours=settings.cert_retry_backoff_hours),
        )

    def backoff_after(self, failures: int) -> timedelta:
        """The wait after the ``failures``-th failed attempt: backoff, doubled each time."""
        return min(self.backoff * 2 ** max(failures - 1, 0), MAX_BACKOFF)


def update_topic(prefix: str, mac: str) -> str:
    return f"{prefix}/devices/{mac}/cert_update"


def ack_topic(prefix: str, mac: str) -> str:
    return f"{prefix}/devices/{mac}/cert_ack"


# --- the cert_update message ----------------------------------------------------------------


def canonical(document: dict[str, Any]) -> bytes:
    """The bytes the signature covers: sorted keys, no spaces, ASCII."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def key_aad(renewal_id: str, mac: str) -> bytes:
    """Binds the encrypted key to one renewal of one device."""
    return f"{renewal_id}|{mac}".encode()


def encrypt_key(
    private_key: rsa.RSAPrivateKey, recipient: x509.Certificate, *, renewal_id: str, mac: str
) -> dict[str, str]:
    """The new private key, readable only with the private key of ``recipient`` (the device's
    current certificate): AES-256-GCM under a fresh key, that key wrapped with RSA-OAEP."""
    public_key = recipient.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise OtaError("the device's current certificate has no RSA key to encrypt to")
    content_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(12)
    ciphertext = AESGCM(content_key).encrypt(
        nonce, pki.private_key_pem(private_key), key_aad(renewal_id, mac)
    )
    return {
        "algorithm": KEY_ALGORITHM,
        "recipient_serial": pki.serial_hex(recipient.serial_number),
        "wrapped_key": _b64(public_key.encrypt(content_key, OAEP)),
        "nonce": _b64(nonce),
        "ciphertext": _b64(ciphertext),
    }


def sign(ca_key: rsa.RSAPrivateKey, document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with a ``signature`` over its canonical form (without any old signature)."""
    body = {k: v for k, v in document.items() if k != "signature"}
    value = ca_key.sign(canonical(body), PSS, hashes.SHA256())
    return body | {"signature": {"algorithm": SIGNATURE_ALGORITHM, "value": _b64(value)}}


def build_update(
    ca: pki.CertificateAuthority,
    *,
    renewal_id: str,
    mac: str,
    certificate: x509.Certificate,
    private_key: rsa.RSAPrivateKey,
    recipient: x509.Certificate,
    now: datetime,
) -> bytes:
    """The signed ``cert_update`` payload for one renewal."""
    document = {
        "version": PAYLOAD_VERSION,
        "type": "cert_update",
        "renewal_id": renewal_id,
        "mac": mac,
        "serial": pki.serial_hex(certificate.serial_number),
        "not_after": certificate.not_valid_after_utc.isoformat(),
        "issued_at": now.astimezone(UTC).isoformat(),
        "certificate": pki.certificate_pem(certificate),
        "key": encrypt_key(private_key, recipient, renewal_id=renewal_id, mac=mac),
    }
    return canonical(sign(ca.key, document))


# --- publishing -----------------------------------------------------------------------------


class Publisher(Protocol):
    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        """Publish at QoS 1 and return once the broker accepted it; OtaError otherwise."""


class MqttPublisher:
    """A QoS 1 publisher that connects on first use and checks each PUBACK's reason code."""

    def __init__(self, options: MqttOptions, client_id: str | None = None) -> None:
        self.options = options
        self.client_id = client_id or f"iiot-ota-{uuid.uuid4().hex[:12]}"
        self._client: mqtt.Client | None = None
        self._lock = threading.Lock()
        self._settled: dict[int, mqtt.ReasonCode | None] = {}

    def _on_publish(
        self, _client: mqtt.Client, _userdata: Any, mid: int, reason: Any, _properties: Any
    ) -> None:
        with self._lock:
            self._settled[mid] = reason

    def _connect(self) -> mqtt.Client:
        if self._client is None:

            def setup(client: mqtt.Client) -> None:
                client.on_publish = self._on_publish

            try:
                self._client, _ = connect_client(self.options, self.client_id, setup=setup)
            except MqttError as exc:
                raise OtaError(str(exc)) from exc
        return self._client

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        client = self._connect()
        info = client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise OtaError(f"could not publish to {topic}: {mqtt.error_string(info.rc)}")
        try:
            info.wait_for_publish(PUBLISH_TIMEOUT_S)
        except (RuntimeError, ValueError) as exc:
            raise OtaError(f"publishing to {topic} failed: {exc}") from exc
        if not info.is_published():
            raise OtaError(f"the broker did not acknowledge {topic} within {PUBLISH_TIMEOUT_S:g} s")
        with self._lock:
            reason = self._settled.pop(info.mid, None)
        if reason is not None and getattr(reason, "is_failure", False):
            raise OtaError(f"the broker refused the message to {topic}: {reason}")

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None


@contextmanager
def mqtt_publisher(options: MqttOptions) -> Iterator[MqttPublisher]:
    publisher = MqttPublisher(options)
    try:
        yield publisher
    finally:
        publisher.close()


# --- the daily batch --------------------------------------------------------------------------


@dataclass(frozen=True)
class DueDevice:
    device_id: int
    tenant_id: int
    mac: str
    certificate_id: int
    not_after: datetime
    certificate_pem: str
    attempt: int


_DUE = """
SELECT d.device_id, d.tenant_id, d.mac::text, c.certificate_id, c.not_after, c.certificate_pem,
       1 + (SELECT count(*) FROM certificate_renewals p
             WHERE p.old_certificate_id = c.certificate_id)
  FROM device_certificates c
  JOIN devices d USING (device_id)
 WHERE c.status = 'active' AND d.status = 'active'
   AND c.not_after <= %(now)s + %(window)s
   AND d.last_seen >= %(now)s - %(offline)s
   AND NOT EXISTS (
       SELECT 1 FROM certificate_renewals r
        WHERE r.device_id = d.device_id
          AND (r.status IN ('issued', 'published') OR r.batch_day = %(day)s
               OR r.next_attempt_after > %(now)s))
 ORDER BY c.not_after, d.device_id
 LIMIT %(limit)s
"""


def select_due(
    conn: psycopg.Connection, policy: RenewalPolicy, *, now: datetime, limit: int
) -> list[DueDevice]:
    """Active devices whose active certificate expires within the renewal window, soonest
    first, that reported within ``policy.offline``, have no attempt in flight, none today and
    none still backing off."""
    rows = conn.execute(
        _DUE,
        {
            "now": now,
            "window": policy.window,
            "offline": policy.offline,
            "day": now.astimezone(UTC).date(),
            "limit": max(limit, 0),
        },
    ).fetchall()
    return [DueDevice(*row) for row in rows]


@dataclass
class BatchResult:
    day: date
    limit: int
    earlier_today: int
    published: list[str] = field(default_factory=list)  # MACs
    failed: dict[str, str] = field(default_factory=dict)  # MAC -> reason
    renewal_ids: dict[str, str] = field(default_factory=dict)  # MAC -> renewal id

    @property
    def issued(self) -> int:
        return len(self.renewal_ids)


@dataclass(frozen=True)
class _Prepared:
    renewal_id: str
    device: DueDevice
    payload: bytes


def run_batch(
    conn: psycopg.Connection,
    ca: pki.CertificateAuthority,
    publisher: Publisher,
    policy: RenewalPolicy,
    *,
    prefix: str,
    now: datetime | None = None,
) -> BatchResult:
    """Issue and publish today's renewals: at most ``policy.batch_size`` a UTC day, counting
    the attempts already made today, so running the batch again the same day issues nothing
    for devices it already did. Every attempt is recorded before its message goes out."""
    now = now or datetime.now(UTC)
    day = now.astimezone(UTC).date()
    prepared: list[_Prepared] = []
    with conn.transaction():
        # two batches at once would both see room for N today
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('iiot_certificate_renewal_batch'))")
        (earlier,) = conn.execute(
            "SELECT count(*) FROM certificate_renewals WHERE batch_day = %s", (day,)
        ).fetchone()
        limit = max(policy.batch_size - earlier, 0)
        for due in select_due(conn, policy, now=now, limit=limit):
            prepared.append(_issue(conn, ca, due, day=day, now=now))
    conn.commit()  # the attempts exist before any message does (no-op on autocommit)
    result = BatchResult(day, policy.batch_size, earlier)
    for item in prepared:
        mac = item.device.mac
        result.renewal_ids[mac] = item.renewal_id
        try:
            publisher.publish(update_topic(prefix, mac), item.payload, retain=True)
        except OtaError as exc:
            reason = f"publish_failed: {exc}"[:300]
            with conn.transaction():
                renewal = _lock_renewal(conn, item.renewal_id)
                fail(conn, renewal, reason, policy=policy, now=now)
            result.failed[mac] = reason
            log.warning("renewal %s of %s not published: %s", item.renewal_id, mac, exc)
        else:
            conn.execute(
                "UPDATE certificate_renewals SET status = 'published', published_at = %s"
                " WHERE renewal_id = %s AND status = 'issued'",
                (now, item.renewal_id),
            )
            result.published.append(mac)
        conn.commit()
    return result


def _issue(
    conn: psycopg.Connection,
    ca: pki.CertificateAuthority,
    due: DueDevice,
    *,
    day: date,
    now: datetime,
) -> _Prepared:
    device = pki.Device(due.device_id, due.tenant_id, due.mac, "active")
    key = pki.generate_key()
    certificate = pki.issue_device_certificate(ca, due.mac, key.public_key(), now=now)
    certificate_id = pki.record_certificate(
        conn, device, certificate, status="pending", issued_at=now
    )
    renewal_id = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO certificate_renewals (renewal_id, tenant_id, device_id, old_certificate_id,"
        " new_certificate_id, batch_day, attempt, status, issued_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, 'issued', %s)",
        (
            renewal_id,
            due.tenant_id,
            due.device_id,
            due.certificate_id,
            certificate_id,
            day,
            due.attempt,
            now,
        ),
    )
    current = x509.load_pem_x509_certificate(due.certificate_pem.encode())
    payload = build_update(
        ca,
        renewal_id=renewal_id,
        mac=due.mac,
        certificate=certificate,
        private_key=key,
        recipient=current,
        now=now,
    )
    audit(
        conn,
        actor=ACTOR,
        action="certificate.renewal_issued",
        entity="certificate_renewal",
        entity_id=renewal_id,
        tenant_id=due.tenant_id,
        detail={
            "mac": due.mac,
            "serial": pki.serial_hex(certificate.serial_number),
            "attempt": due.attempt,
            "old_not_after": due.not_after.isoformat(),
        },
    )
    return _Prepared(renewal_id, due, payload)


# --- completing attempts ----------------------------------------------------------------------

IN_FLIGHT = (
    "SELECT EXISTS (SELECT 1 FROM certificate_renewals WHERE status IN ('issued', 'published')"
    "               OR retained_cleared_at IS NULL)"
)


@dataclass(frozen=True)
class Renewal:
    renewal_id: str
    tenant_id: int
    device_id: int
    mac: str
    old_certificate_id: int
    new_certificate_id: int
    new_serial: int
    new_status: str
    status: str
    attempt: int


def _lock_renewal(conn: psycopg.Connection, renewal_id: str) -> Renewal | None:
    row = conn.execute(
        "SELECT r.renewal_id::text, r.tenant_id, r.device_id, d.mac::text, r.old_certificate_id,"
        "       r.new_certificate_id, n.serial, n.status, r.status, r.attempt"
        "  FROM certificate_renewals r"
        "  JOIN devices d ON d.device_id = r.device_id"
        "  JOIN device_certificates n ON n.certificate_id = r.new_certificate_id"
        " WHERE r.renewal_id = %s FOR UPDATE OF r, n",
        (renewal_id,),
    ).fetchone()
    if row is None:
        return None
    values = list(row)
    values[6] = int(values[6])
    return Renewal(*values)


def fail(
    conn: psycopg.Connection,
    renewal: Renewal | None,
    reason: str,
    *,
    policy: RenewalPolicy,
    now: datetime,
    status: str = "failed",
) -> bool:
    """End an attempt unsuccessfully: revoke its pending certificate (the old one stays
    active) and set when the device may be tried again. True if it revoked a certificate."""
    if renewal is None or renewal.status not in OPEN:
        return False
    (failures,) = conn.execute(
        "SELECT 1 + count(*) FROM certificate_renewals WHERE old_certificate_id = %s"
        " AND status IN ('failed', 'timed_out')",
        (renewal.old_certificate_id,),
    ).fetchone()
    retry = now + policy.backoff_after(failures)
    conn.execute(
        "UPDATE certificate_renewals SET status = %s, completed_at = %s, failure_reason = %s,"
        " next_attempt_after = %s WHERE renewal_id = %s",
        (status, now, reason[:300], retry, renewal.renewal_id),
    )
    revoked = conn.execute(
        "UPDATE device_certificates SET status = 'revoked', revoked_at = %s,"
        " revocation_code = 'cessationOfOperation', revocation_reason = %s"
        " WHERE certificate_id = %s AND status = 'pending'",
        (
            now,
            f"cessationOfOperation: renewal {status}: {reason}"[:500],
            renewal.new_certificate_id,
        ),
    ).rowcount
    audit(
        conn,
        actor=ACTOR,
        action=f"certificate.renewal_{status}",
        entity="certificate_renewal",
        entity_id=renewal.renewal_id,
        tenant_id=renewal.tenant_id,
        detail={"mac": renewal.mac, "reason": reason[:300], "retry_after": retry.isoformat()},
    )
    return bool(revoked)


def succeed(conn: psycopg.Connection, renewal: Renewal, *, now: datetime) -> None:
    """The device runs on the new certificate: it becomes active, the old one superseded."""
    conn.execute(
        "UPDATE device_certificates SET status = 'superseded', superseded_at = %s"
        " WHERE certificate_id = %s AND status = 'active'",
        (now, renewal.old_certificate_id),
    )
    conn.execute(
        "UPDATE device_certificates SET status = 'active' WHERE certificate_id = %s",
        (renewal.new_certificate_id,),
    )
    conn.execute(
        "UPDATE certificate_renewals SET status = 'succeeded', completed_at = %s"
        " WHERE renewal_id = %s",
        (now, renewal.renewal_id),
    )
    audit(
        conn,
        actor=ACTOR,
        action="certificate.renewed",
        entity="certificate_renewal",
        entity_id=renewal.renewal_id,
        tenant_id=renewal.tenant_id,
        detail={"mac": renewal.mac, "serial": pki.serial_hex(renewal.new_serial)},
    )


@dataclass(frozen=True)
class Ack:
    mac: str | None
    renewal_id: str | None
    status: str | None
    reason: str | None
    serial: int | None
    error: str | None  # why the message is malformed; None when it is well formed


def parse_ack(topic: str, payload: bytes, prefix: str) -> Ack:
    """An acknowledgement from ``<prefix>/devices/{mac}/cert_ack``:
    ``{"renewal_id": UUID, "status": "success"|"failure", "reason": "...", "serial": "hex"}``."""
    mac: str | None = None
    head, _, rest = topic.partition(f"{prefix}/devices/")
    raw_mac, _, tail = rest.partition("/")
    if head == "" and tail == "cert_ack":
        try:
            mac = normalise_mac(raw_mac)
        except RegistryError:
            mac = None

    def malformed(error: str, **known: Any) -> Ack:
        return Ack(mac, known.get("renewal_id"), known.get("status"), None, None, error)

    if mac is None:
        return malformed(f"topic {topic[:120]!r} is not {prefix}/devices/<mac>/cert_ack")
    if len(payload) > MAX_ACK_BYTES:
        return malformed(f"larger than {MAX_ACK_BYTES} bytes ({len(payload)})")
    try:
        document = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        return malformed(f"not JSON: {exc}"[:200])
    if not isinstance(document, dict):
        return malformed("not a JSON object")
    raw_id = document.get("renewal_id")
    try:
        renewal_id = str(uuid.UUID(raw_id)) if isinstance(raw_id, str) else None
    except ValueError:
        renewal_id = None
    if renewal_id is None:
        return malformed("renewal_id is missing or not a UUID")
    status = document.get("status")
    if status not in ACK_STATUSES:
        return malformed("status must be success or failure", renewal_id=renewal_id)
    reason = document.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 300):
        return malformed("reason must be text of at most 300 characters", renewal_id=renewal_id)
    if reason is not None:
        reason = "".join(ch if ch.isprintable() else "?" for ch in reason)
    raw_serial = document.get("serial")
    serial = None
    if raw_serial is not None:
        try:
            serial = pki.parse_serial(raw_serial) if isinstance(raw_serial, str) else None
        except pki.PkiError:
            serial = None
        if serial is None:
            return malformed("serial must be hex", renewal_id=renewal_id)
    if status == "failure" and not reason:
        return malformed("a failure needs a reason", renewal_id=renewal_id)
    return Ack(mac, renewal_id, status, reason, serial, None)


def land_ack(
    conn: psycopg.Connection,
    topic: str,
    payload: bytes,
    prefix: str,
    *,
    received_at: datetime | None = None,
) -> int:
    """Record an acknowledgement as received (a malformed one too, marked so); its id."""
    ack = parse_ack(topic, payload, prefix)
    tenant_id = None
    if ack.mac is not None:
        row = conn.execute("SELECT tenant_id FROM devices WHERE mac = %s", (ack.mac,)).fetchone()
        tenant_id = row[0] if row else None
    now = received_at or datetime.now(UTC)
    (ack_id,) = conn.execute(
        "INSERT INTO certificate_acks (received_at, topic, mac, tenant_id, renewal_id, status,"
        " reason, serial, payload, payload_size, processed_at, outcome, detail)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING ack_id",
        (
            now,
            topic[:500],
            ack.mac,
            tenant_id,
            ack.renewal_id,
            ack.status,
            ack.reason,
            ack.serial,
            payload[:MAX_ACK_BYTES],
            len(payload),
            now if ack.error else None,
            "malformed" if ack.error else None,
            ack.error,
        ),
    ).fetchone()
    if ack.error:
        log.warning("malformed certificate ack on %s: %s", topic[:120], ack.error)
    return ack_id


@dataclass
class Completion:
    completed: int = 0
    failed: int = 0
    timed_out: int = 0
    ignored: int = 0
    cleared: int = 0
    revoked: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        return (
            f"{self.completed} renewed, {self.failed} failed, {self.timed_out} timed out, "
            f"{self.ignored} acks ignored, {self.cleared} retained updates cleared"
        )


def _decide(conn: psycopg.Connection, ack: tuple, policy: RenewalPolicy, now: datetime):
    """The outcome of one well-formed ack, applied; (outcome, detail, revoked)."""
    _ack_id, mac, renewal_id, status, reason, serial = ack
    renewal = _lock_renewal(conn, renewal_id)
    if renewal is None:
        return "unknown_renewal", "no such renewal", False
    if renewal.mac != mac:
        return "wrong_device", f"renewal {renewal_id} belongs to {renewal.mac}", False
    if renewal.status not in OPEN:
        same = (renewal.status == "succeeded") == (status == "success")
        if same:
            return "duplicate", f"renewal already {renewal.status}", False
        return "late", f"renewal already {renewal.status}; the device said {status}", False
    if status == "failure":
        revoked = fail(conn, renewal, f"device: {reason}", policy=policy, now=now)
        return "failed", reason, revoked
    if serial is not None and serial != renewal.new_serial:
        why = (
            f"device installed serial {pki.serial_hex(serial)}, "
            f"expected {pki.serial_hex(renewal.new_serial)}"
        )
        return "failed", why, fail(conn, renewal, why, policy=policy, now=now)
    if renewal.new_status != "pending":
        why = f"the new certificate was {renewal.new_status} meanwhile"
        return "failed", why, fail(conn, renewal, why, policy=policy, now=now)
    succeed(conn, renewal, now=now)
    return "completed", None, False


def process_acks(
    conn: psycopg.Connection,
    policy: RenewalPolicy,
    *,
    now: datetime | None = None,
    completion: Completion | None = None,
    limit: int = 1000,
) -> Completion:
    """Apply the landed, unprocessed acknowledgements in arrival order."""
    completion = completion or Completion()
    now = now or datetime.now(UTC)
    while True:
        with conn.transaction():
            ack = conn.execute(
                "SELECT ack_id, mac::text, renewal_id::text, status, reason, serial"
                "  FROM certificate_acks WHERE processed_at IS NULL"
                " ORDER BY ack_id LIMIT 1 FOR UPDATE SKIP LOCKED"
            ).fetchone()
            if ack is None:
                break
            ack = (*ack[:5], None if ack[5] is None else int(ack[5]))
            outcome, detail, revoked = _decide(conn, ack, policy, now)
            conn.execute(
                "UPDATE certificate_acks SET processed_at = %s, outcome = %s, detail = %s"
                " WHERE ack_id = %s",
                (now, outcome, detail, ack[0]),
            )
        conn.commit()
        completion.outcomes[outcome] = completion.outcomes.get(outcome, 0) + 1
        completion.revoked += int(revoked)
        if outcome == "completed":
            completion.completed += 1
        elif outcome == "failed":
            completion.failed += 1
        else:
            completion.ignored += 1
        limit -= 1
        if limit <= 0:
            break
    return completion


def expire_attempts(
    conn: psycopg.Connection,
    policy: RenewalPolicy,
    *,
    now: datetime | None = None,
    completion: Completion | None = None,
) -> Completion:
    """Fail the attempts that went unacknowledged for longer than ``policy.ack_timeout``."""
    completion = completion or Completion()
    now = now or datetime.now(UTC)
    hours = policy.ack_timeout.total_seconds() / 3600
    with conn.transaction():
        stale = conn.execute(
            "SELECT renewal_id::text FROM certificate_renewals"
            " WHERE status IN ('issued', 'published')"
            "   AND coalesce(published_at, issued_at) < %s ORDER BY issued_at",
            (now - policy.ack_timeout,),
        ).fetchall()
        for (renewal_id,) in stale:
            revoked = fail(
                conn,
                _lock_renewal(conn, renewal_id),
                f"no acknowledgement within {hours:g} hours",
                policy=policy,
                now=now,
                status="timed_out",
            )
            completion.timed_out += 1
            completion.revoked += int(revoked)
    conn.commit()
    return completion


def clear_retained(
    conn: psycopg.Connection,
    publisher: Publisher,
    *,
    prefix: str,
    now: datetime | None = None,
    completion: Completion | None = None,
) -> Completion:
    """Remove the retained ``cert_update`` of finished attempts (an empty retained message),
    so that no device installs it later. A device with a newer attempt keeps that one's."""
    completion = completion or Completion()
    now = now or datetime.now(UTC)
    rows = conn.execute(
        "SELECT r.renewal_id::text, d.mac::text, EXISTS ("
        "   SELECT 1 FROM certificate_renewals n"
        "    WHERE n.device_id = r.device_id AND n.issued_at > r.issued_at)"
        "  FROM certificate_renewals r JOIN devices d ON d.device_id = r.device_id"
        " WHERE r.status IN ('succeeded', 'failed', 'timed_out')"
        "   AND r.retained_cleared_at IS NULL ORDER BY r.issued_at"
    ).fetchall()
    conn.commit()
    for renewal_id, mac, newer in rows:
        if not newer:
            try:
                publisher.publish(update_topic(prefix, mac), b"", retain=True)
            except OtaError as exc:
                log.warning("retained updates not cleared yet (next time): %s", exc)
                break
        conn.execute(
            "UPDATE certificate_renewals SET retained_cleared_at = %s WHERE renewal_id = %s",
            (now, renewal_id),
        )
        conn.commit()
        completion.cleared += int(not newer)
    return completion


def complete_renewals(
    conn: psycopg.Connection,
    publisher: Publisher | None,
    policy: RenewalPolicy,
    *,
    prefix: str,
    now: datetime | None = None,
) -> Completion:
    """What ``ota_ack_sensor`` does after landing acks: apply them, time out the silent
    attempts, and clear the retained updates of finished ones (when a publisher is given)."""
    now = now or datetime.now(UTC)
    completion = process_acks(conn, policy, now=now)
    expire_attempts(conn, policy, now=now, completion=completion)
    if publisher is not None:
        clear_retained(conn, publisher, prefix=prefix, now=now, completion=completion)
    return completion


def renewals(
    conn: psycopg.Connection, *, mac: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """Recent attempts, newest first, for the CLI and the runbook."""
    rows = conn.execute(
        "SELECT r.renewal_id::text, d.mac::text, r.batch_day, r.attempt, r.status, r.issued_at,"
        "       r.published_at, r.completed_at, r.failure_reason, r.next_attempt_after,"
        "       n.serial AS new_serial, o.serial AS old_serial"
        "  FROM certificate_renewals r"
        "  JOIN devices d ON d.device_id = r.device_id"
        "  JOIN device_certificates n ON n.certificate_id = r.new_certificate_id"
        "  JOIN device_certificates o ON o.certificate_id = r.old_certificate_id"
        " WHERE %(mac)s::macaddr IS NULL OR d.mac = %(mac)s::macaddr"
        " ORDER BY r.issued_at DESC, r.renewal_id LIMIT %(limit)s",
        {"mac": normalise_mac(mac) if mac else None, "limit": limit},
    ).fetchall()
    names = (
        "renewal_id",
        "mac",
        "batch_day",
        "attempt",
        "status",
        "issued_at",
        "published_at",
        "completed_at",
        "failure_reason",
        "next_attempt_after",
        "new_serial",
        "old_serial",
    )
    found = []
    for row in rows:
        item = dict(zip(names, row, strict=True))
        item["new_serial"] = pki.serial_hex(int(item["new_serial"]))
        item["old_serial"] = pki.serial_hex(int(item["old_serial"]))
        found.append(item)
    return found
