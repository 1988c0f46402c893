"""Gateway agent (Raspberry Pi style): reads its meters, publishes the readings over MQTT with
mutual TLS, keeps them on disk while the broker is unreachable, and installs renewed
certificates sent over the air (docs/certificates.md).

State lives in one directory, as ``iiot devices issue-cert --out DIR`` writes it:

- ``ca.pem``: the CA that signs the broker's certificate, the device's and the renewals;
- ``identity.pem``: the device's private key and certificate in one file, so that replacing the
  pair is a single atomic rename; ``identity.backup.pem``: the pair before the last renewal;
- ``buffer.sqlite3``: readings the broker has not acknowledged yet, and the renewal acks the
  platform has not confirmed yet (by clearing the retained update), which are sent again;
- ``state.json``: the renewals installed so far.

Readings always go through the buffer and leave it in order, oldest first, only once the broker
acknowledged them (QoS 1), so nothing is lost while the broker is down.

A ``cert_update`` (retained on ``<prefix>/devices/<mac>/cert_update``) is verified before it is
used: the CA's signature over the message, the MAC, the new key decrypted with the current one,
the certificate issued by the CA for this MAC, valid now, matching the key. The agent then backs
up the current pair, switches to the new one and reconnects; if the broker refuses it, the agent
restores the old pair and reconnects with it. Either way it publishes the outcome on
``<prefix>/devices/<mac>/cert_ack``. At every connection the agent falls back to the backup pair
when the broker refuses the current one, so a device is never left without a working identity.

It needs only paho-mqtt and cryptography (the simulated meter reuses ``firmware.simulator``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import queue
import signal
import sqlite3
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID

from firmware.delivery import publish_outcome

log = logging.getLogger(__name__)

PAYLOAD_VERSION = 1
KEY_ALGORITHM = "RSA-OAEP-SHA256+AES-256-GCM"
SIGNATURE_ALGORITHM = "RSA-PSS-SHA256"
MAX_UPDATE_BYTES = 64 * 1024
CA_FILE = "ca.pem"
IDENTITY_FILE = "identity.pem"
BACKUP_FILE = "identity.backup.pem"
STATE_FILE = "state.json"
BUFFER_FILE = "buffer.sqlite3"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


class AgentError(Exception):
    """The agent cannot start: missing or unreadable state, bad configuration."""


class UpdateRejected(Exception):
    """A cert_update the agent will not install; ``code`` goes into the failure ack."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code


# --- meters ---------------------------------------------------------------------------------


class MeterReader(Protocol):
    def read(self, at: datetime) -> dict[str, float]:
        """The meter's values at ``at`` (metric -> value)."""


class SimulatedMeterReader:
    """The fleet simulator's meter model (cumulative registers only grow)."""

    def __init__(
        self, mac: str, meter_kind: str = "energy", metrics: Sequence[str] = (), seed: int = 0
    ) -> None:
        from firmware.simulator import DeviceSpec, SimulatedMeter

        defaults = {"energy": ("energy_kwh", "power_w"), "water": ("water_m3",), "gas": ("gas_m3",)}
        if meter_kind not in defaults:
            raise AgentError(f"unknown meter kind {meter_kind!r}: energy, water or gas")
        spec = DeviceSpec(mac, meter_kind, tuple(metrics) or defaults[meter_kind])
        self._meter = SimulatedMeter(spec, seed)

    def read(self, at: datetime) -> dict[str, float]:
        return self._meter.reading(at)


class ModbusMeterReader:
    """A meter read over Modbus: each metric is a 32-bit float in two holding registers (high
    word first) times a scale. ``transport(address, count)`` reads the registers; a
    minimalmodbus or pymodbus client plugs in there."""

    def __init__(
        self,
        transport: Callable[[int, int], Sequence[int]],
        registers: Mapping[str, tuple[int, float]],
    ) -> None:
        if not registers:
            raise AgentError("a Modbus meter needs at least one register")
        self._transport = transport
        self._registers = dict(registers)

    def read(self, at: datetime) -> dict[str, float]:
        values = {}
        for metric, (address, scale) in self._registers.items():
            words = list(self._transport(address, 2))
            if len(words) != 2 or not all(0 <= w <= 0xFFFF for w in words):
                raise AgentError(f"register {address} ({metric}): expected two 16-bit words")
            (value,) = struct.unpack(">f", struct.pack(">HH", *words))
            values[metric] = round(value * scale, 6)
        return values


# --- the disk buffer ------------------------------------------------------------------------


class ReadingBuffer:
    """Readings and outgoing acks in SQLite, in the order they were taken."""

    def __init__(self, path: Path, max_readings: int = 1_000_000) -> None:
        self.max_readings = max_readings
        self.dropped = 0
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS readings (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " ts TEXT NOT NULL, metrics TEXT NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS acks (renewal_id TEXT PRIMARY KEY, topic TEXT NOT NULL,"
            " payload BLOB NOT NULL, sent INTEGER NOT NULL DEFAULT 0)"
        )

    def append(self, at: datetime, metrics: Mapping[str, float]) -> None:
        ts = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        self._db.execute(
            "INSERT INTO readings (ts, metrics) VALUES (?, ?)", (ts, json.dumps(dict(metrics)))
        )
        excess = len(self) - self.max_readings
        if excess > 0:  # a full disk would lose everything; the oldest go first, counted
            self._db.execute(
                "DELETE FROM readings WHERE seq IN (SELECT seq FROM readings ORDER BY seq LIMIT ?)",
                (excess,),
            )
            self.dropped += excess
            log.warning("buffer full: dropped the %d oldest readings", excess)

    def oldest(self, limit: int) -> list[tuple[int, str, dict[str, float]]]:
        rows = self._db.execute(
            "SELECT seq, ts, metrics FROM readings ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()
        return [(seq, ts, json.loads(metrics)) for seq, ts, metrics in rows]

    def remove_through(self, seq: int) -> None:
        self._db.execute("DELETE FROM readings WHERE seq <= ?", (seq,))

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM readings").fetchone()[0]

    # An ack stays until the platform confirms it by clearing the retained cert_update (or by
    # sending the next one): until then it is sent again from time to time, because a broker
    # may lose it on its way to the platform (Mosquitto drops the offline session of the ack
    # consumer when it reloads its CRL).

    def put_ack(self, renewal_id: str, topic: str, payload: bytes) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO acks (renewal_id, topic, payload, sent) VALUES (?, ?, ?, 0)",
            (renewal_id, topic, payload),
        )

    def acks(self, *, unsent: bool = False) -> list[tuple[str, str, bytes]]:
        return self._db.execute(
            "SELECT renewal_id, topic, payload FROM acks WHERE sent = 0 OR NOT ? ORDER BY rowid",
            (unsent,),
        ).fetchall()

    def mark_sent(self, renewal_id: str) -> None:
        self._db.execute("UPDATE acks SET sent = 1 WHERE renewal_id = ?", (renewal_id,))

    def send_acks_again(self) -> int:
        return self._db.execute("UPDATE acks SET sent = 0").rowcount

    def confirm_acks(self, keep: str | None = None) -> None:
        self._db.execute("DELETE FROM acks WHERE renewal_id IS NOT ?", (keep,))

    def close(self) -> None:
        self._db.close()


# --- identity files -------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(handle, mode)
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_identity(data: bytes) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key(data, password=None)
    certificate = x509.load_pem_x509_certificate(data)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("the identity key is not RSA")
    return key, certificate


def identity_pem(key: rsa.RSAPrivateKey, certificate: x509.Certificate) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ) + certificate.public_bytes(serialization.Encoding.PEM)


def _serial(certificate: x509.Certificate) -> str:
    return f"{certificate.serial_number:x}"


def _common_name(certificate: x509.Certificate) -> str | None:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class AgentConfig:
    mac: str
    host: str
    port: int
    state_dir: Path
    prefix: str = "iiot"
    interval_s: float = 10.0
    batch_max: int = 100
    connect_timeout_s: float = 10.0
    publish_timeout_s: float = 10.0
    ack_repeat_s: float = 300.0
    max_buffered: int = 1_000_000

    @property
    def telemetry_topic(self) -> str:
        return f"{self.prefix}/devices/{self.mac}/telemetry"

    @property
    def update_topic(self) -> str:
        return f"{self.prefix}/devices/{self.mac}/cert_update"

    @property
    def ack_topic(self) -> str:
        return f"{self.prefix}/devices/{self.mac}/cert_ack"


class _Session:
    """One MQTT connection with one identity file; ``None`` from open() when it was refused."""

    def __init__(self, agent: GatewayAgent, identity: Path) -> None:
        self.agent = agent
        self.connected = threading.Event()
        self.ended = threading.Event()
        self.refusal: str | None = None
        self._lock = threading.Lock()
        self._settled: dict[int, Any] = {}
        config = agent.config
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=config.mac,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,  # the agent reconnects itself, choosing the identity
        )
        self.client.tls_set(
            ca_certs=str(config.state_dir / CA_FILE),
            certfile=str(identity),
            keyfile=None,  # identity.pem holds the key too
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.refusal = f"CONNACK {reason}"
            self.ended.set()
            return
        client.subscribe(self.agent.config.update_topic, qos=1)
        self.connected.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if self.connected.is_set():
            log.warning("disconnected from the broker: %s", reason)
        if not self.connected.is_set() and self.refusal is None:
            self.refusal = f"closed before CONNACK ({reason})"
        self.connected.clear()
        self.ended.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.agent.config.update_topic:
            # empty: the platform cleared the retained update, its receipt for our ack
            self.agent.updates.put(bytes(message.payload))

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._lock:
            self._settled[mid] = reason

    def open(self) -> tuple[bool, bool]:
        """(connected, refused): refused when TLS or the broker said no to this identity; a
        broker that cannot be reached is not a refusal."""
        config = self.agent.config
        try:
            self.client.connect(config.host, config.port, keepalive=30)
        except ssl.SSLError as exc:
            self.refusal = f"TLS: {exc}"
            self._close_socket()
            return False, True
        except OSError as exc:
            self.refusal = f"unreachable: {exc}"
            return False, False
        self.client.loop_start()
        deadline = time.monotonic() + config.connect_timeout_s
        while time.monotonic() < deadline and not (self.connected.is_set() or self.ended.is_set()):
            self.ended.wait(0.05)
        if self.connected.is_set():
            return True, False
        self.close()
        return False, True

    def _close_socket(self) -> None:
        # paho keeps the socket of a failed TLS handshake open; close it rather than leak it
        sock = getattr(self.client, "_sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
            self.client._sock = None

    def publish(self, topic: str, payload: bytes, timeout: float) -> bool:
        """QoS 1, waiting for the broker's PUBACK; False if it did not come or refused it."""
        if not self.connected.is_set():
            return False
        info = self.client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            log.warning("could not publish on %s: %s", topic, mqtt.error_string(info.rc))
            return False
        deadline = time.monotonic() + timeout
        while not info.is_published() and time.monotonic() < deadline:
            if self.ended.is_set():
                log.warning("connection lost before the broker acknowledged %s", topic)
                return False
            time.sleep(0.01)
        if not info.is_published():
            log.warning("the broker did not acknowledge %s within %g s", topic, timeout)
            return False
        with self._lock:
            reason = self._settled.pop(info.mid, None)
        outcome = publish_outcome(reason)
        if outcome == "retry":
            # no subscriber yet (Mosquitto just restarted) or a transient failure: the reading
            # stays in the store-and-forward buffer and goes again with the next flush
            log.warning("the broker did not deliver a message on %s: %s", topic, reason)
            return False
        if outcome == "refused":
            log.error("the broker refused a message on %s: %s", topic, reason)
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()


class GatewayAgent:
    def __init__(self, config: AgentConfig, reader: MeterReader | None = None) -> None:
        self.config = config
        self.reader = reader
        state = config.state_dir
        for name in (CA_FILE, IDENTITY_FILE):
            if not (state / name).is_file():
                raise AgentError(
                    f"{state / name} is missing: provision with iiot devices issue-cert"
                )
        try:
            self.ca = x509.load_pem_x509_certificate((state / CA_FILE).read_bytes())
            _key, certificate = load_identity((state / IDENTITY_FILE).read_bytes())
        except ValueError as exc:
            raise AgentError(f"unreadable credentials in {state}: {exc}") from None
        if _common_name(certificate) != config.mac:
            raise AgentError(
                f"{state / IDENTITY_FILE} is for {_common_name(certificate)}, not {config.mac}"
            )
        self.buffer = ReadingBuffer(state / BUFFER_FILE, config.max_buffered)
        self.updates: queue.Queue[bytes] = queue.Queue()
        self.session: _Session | None = None
        self.last_refusal: str | None = None

    # -- identity --

    @property
    def identity_path(self) -> Path:
        return self.config.state_dir / IDENTITY_FILE

    @property
    def backup_path(self) -> Path:
        return self.config.state_dir / BACKUP_FILE

    def certificate(self) -> x509.Certificate:
        return load_identity(self.identity_path.read_bytes())[1]

    def _state(self) -> dict[str, Any]:
        path = self.config.state_dir / STATE_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {"installed": {}, "refused": {}}

    def _remember(self, outcome: str, renewal_id: str, value: str) -> None:
        state = self._state()
        state.setdefault(outcome, {})[renewal_id] = value
        write_atomic(self.config.state_dir / STATE_FILE, json.dumps(state).encode(), 0o644)

    # -- connection --

    @property
    def connected(self) -> bool:
        return self.session is not None and self.session.connected.is_set()

    def _open(self, identity: Path) -> tuple[_Session | None, bool]:
        session = _Session(self, identity)
        connected, refused = session.open()
        if not connected:
            self.last_refusal = session.refusal
            log.warning("connection with %s failed: %s", identity.name, session.refusal)
            return None, refused
        return session, False

    def connect(self) -> bool:
        """Connect with the current identity; when the broker refuses it, with the backup one,
        which then becomes current."""
        if self.connected:
            return True
        self.disconnect()
        session, refused = self._open(self.identity_path)
        if (
            session is None
            and refused
            and self.backup_path.is_file()
            and self.backup_path.read_bytes() != self.identity_path.read_bytes()
        ):
            session, _ = self._open(self.backup_path)
            if session is not None:
                log.warning("the broker refused the current identity; back on the backup")
                session.close()
                write_atomic(self.identity_path, self.backup_path.read_bytes())
                session, _ = self._open(self.identity_path)
        self.session = session
        return session is not None

    def disconnect(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    # -- readings --

    def collect(self, at: datetime | None = None) -> None:
        if self.reader is None:
            raise AgentError("no meter reader configured")
        at = at or datetime.now(UTC)
        self.buffer.append(at, self.reader.read(at))

    def flush(self) -> int:
        """Send the acks not sent yet, then buffered readings oldest first; the readings sent."""
        for renewal_id, topic, payload in self.buffer.acks(unsent=True):
            if self.session is None or not self.session.publish(
                topic, payload, self.config.publish_timeout_s
            ):
                return 0
            self.buffer.mark_sent(renewal_id)
        sent = 0
        while self.session is not None:
            rows = self.buffer.oldest(self.config.batch_max)
            if not rows:
                break
            readings = [{"ts": ts, "metrics": metrics} for _seq, ts, metrics in rows]
            document = readings[0] if len(readings) == 1 else {"readings": readings}
            payload = json.dumps(document, separators=(",", ":")).encode()
            if not self.session.publish(
                self.config.telemetry_topic, payload, self.config.publish_timeout_s
            ):
                break
            self.buffer.remove_through(rows[-1][0])
            sent += len(rows)
        return sent

    # -- certificate updates --

    def _ack(self, renewal_id: str | None, status: str, reason: str | None, serial: str) -> None:
        document = {"renewal_id": renewal_id, "status": status, "serial": serial}
        if reason:
            document["reason"] = reason[:300]
        document["at"] = datetime.now(UTC).isoformat()
        self.buffer.put_ack(renewal_id or "", self.config.ack_topic, json.dumps(document).encode())

    def send_acks_again(self) -> None:
        """Repeat the acks the platform has not confirmed yet (the loop does it every
        ``ack_repeat_s``)."""
        if self.buffer.send_acks_again():
            self.flush()

    def handle_updates(self) -> list[tuple[str | None, str, str | None]]:
        """Install the cert_updates received; (renewal id, status, reason) of each ack."""
        outcomes = []
        while True:
            try:
                payload = self.updates.get_nowait()
            except queue.Empty:
                break
            if not payload:
                self.buffer.confirm_acks()
                continue
            outcomes.append(self.install(payload))
        if outcomes and self.connected:
            self.flush()
        return outcomes

    def _verify(self, payload: bytes) -> dict[str, Any]:
        if len(payload) > MAX_UPDATE_BYTES:
            raise UpdateRejected("malformed_update", f"larger than {MAX_UPDATE_BYTES} bytes")
        try:
            document = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            raise UpdateRejected("malformed_update", "not JSON") from None
        if not isinstance(document, dict) or not isinstance(document.get("signature"), dict):
            raise UpdateRejected("malformed_update", "not a signed JSON object")
        signature = document.pop("signature")
        if signature.get("algorithm") != SIGNATURE_ALGORITHM:
            raise UpdateRejected("bad_signature", f"unsupported {signature.get('algorithm')!r}")
        try:
            self.ca.public_key().verify(
                base64.b64decode(signature.get("value", ""), validate=True),
                _canonical(document),
                _PSS,
                hashes.SHA256(),
            )
        except (InvalidSignature, ValueError, TypeError):
            raise UpdateRejected("bad_signature", "not signed by the CA") from None
        if document.get("version") != PAYLOAD_VERSION or document.get("type") != "cert_update":
            raise UpdateRejected("unsupported_version", str(document.get("version"))[:20])
        if document.get("mac") != self.config.mac:
            raise UpdateRejected("wrong_device", f"update for {str(document.get('mac'))[:20]}")
        return document

    def _decrypt_key(
        self, document: Mapping[str, Any], current: rsa.RSAPrivateKey
    ) -> rsa.RSAPrivateKey:
        box = document.get("key")
        if not isinstance(box, dict) or box.get("algorithm") != KEY_ALGORITHM:
            raise UpdateRejected("key_decrypt_failed", "unsupported key delivery")
        try:
            content_key = current.decrypt(base64.b64decode(box["wrapped_key"]), _OAEP)
            aad = f"{document['renewal_id']}|{self.config.mac}".encode()
            key_pem = AESGCM(content_key).decrypt(
                base64.b64decode(box["nonce"]), base64.b64decode(box["ciphertext"]), aad
            )
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (KeyError, ValueError, TypeError, InvalidTag):
            raise UpdateRejected(
                "key_decrypt_failed",
                f"not encrypted to the current certificate {box.get('recipient_serial')}",
            ) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise UpdateRejected("key_decrypt_failed", "not an RSA key")
        return key

    def _check_certificate(
        self, document: Mapping[str, Any], key: rsa.RSAPrivateKey
    ) -> x509.Certificate:
        try:
            certificate = x509.load_pem_x509_certificate(str(document["certificate"]).encode())
        except (KeyError, ValueError):
            raise UpdateRejected("corrupt_certificate", "not a PEM certificate") from None
        try:
            certificate.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature):
            raise UpdateRejected("untrusted_issuer", "not issued by the CA") from None
        if _common_name(certificate) != self.config.mac:
            raise UpdateRejected(
                "wrong_device", f"certificate for {str(_common_name(certificate))[:20]}"
            )
        now = datetime.now(UTC)
        if not certificate.not_valid_before_utc <= now < certificate.not_valid_after_utc:
            raise UpdateRejected("certificate_not_valid_now", "outside its validity period")
        if certificate.public_key().public_numbers() != key.public_key().public_numbers():
            raise UpdateRejected("key_mismatch", "the key is not the certificate's")
        if _serial(certificate) != document.get("serial"):
            raise UpdateRejected("corrupt_certificate", "serial differs from the message's")
        return certificate

    def install(self, payload: bytes) -> tuple[str | None, str, str | None]:
        """Verify, back up, switch, test by reconnecting, roll back on refusal; queue the ack.
        An update delivered again (at every reconnection while it is retained) gets the same
        answer again, without a second attempt."""
        current_key, current = load_identity(self.identity_path.read_bytes())
        renewal_id: str | None = None
        with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError):
            found = json.loads(payload).get("renewal_id")
            renewal_id = found if isinstance(found, str) and len(found) <= 64 else None
        verified = False
        try:
            document = self._verify(payload)
            verified = True
            state = self._state()
            if renewal_id in state.get("refused", {}):
                raise UpdateRejected(*state["refused"][renewal_id].split(": ", 1))
            if renewal_id in state.get("installed", {}):
                if state["installed"][renewal_id] == _serial(current):
                    self._ack(renewal_id, "success", None, _serial(current))
                    return renewal_id, "success", None
                raise UpdateRejected("rolled_back", "installed earlier, then the broker refused it")
            self.buffer.confirm_acks(keep=renewal_id)  # a new update: the platform moved on
            key = self._decrypt_key(document, current_key)
            certificate = self._check_certificate(document, key)
        except UpdateRejected as rejected:
            log.warning("cert_update %s refused: %s", renewal_id, rejected)
            if verified:
                self._remember("refused", str(renewal_id), str(rejected))
            self._ack(renewal_id, "failure", str(rejected), _serial(current))
            return renewal_id, "failure", str(rejected)
        old = self.identity_path.read_bytes()
        write_atomic(self.backup_path, old)
        write_atomic(self.identity_path, identity_pem(key, certificate))
        self.disconnect()
        session, refused = self._open(self.identity_path)
        if session is None:
            # untested when the broker could not be reached: rolled back all the same
            code = "broker_refused_new_certificate" if refused else "broker_unreachable"
            reason = f"{code}: {self.last_refusal}"[:300]
            log.warning("the new certificate %s does not work; rolling back", _serial(certificate))
            write_atomic(self.identity_path, old)
            self._remember("refused", str(renewal_id), reason)
            self.session, _ = self._open(self.identity_path)
            self._ack(renewal_id, "failure", reason, _serial(current))
            return renewal_id, "failure", reason
        self.session = session
        self._remember("installed", str(renewal_id), _serial(certificate))
        self._ack(renewal_id, "success", None, _serial(certificate))
        log.info("installed certificate %s (renewal %s)", _serial(certificate), renewal_id)
        return renewal_id, "success", None

    # -- the loop --

    def run(self, stop: threading.Event, *, count: int | None = None) -> int:
        """Read every ``interval_s`` and keep sending, until ``stop`` or ``count`` readings were
        sent; the readings sent."""
        sent, next_read, retry_at, delay = 0, time.monotonic(), 0.0, 1.0
        repeat_at = time.monotonic() + self.config.ack_repeat_s
        while not stop.is_set() and (count is None or sent < count):
            now = time.monotonic()
            if now >= repeat_at and self.connected:
                self.send_acks_again()
                repeat_at = now + self.config.ack_repeat_s
            if now >= next_read and (count is None or len(self.buffer) + sent < count):
                self.collect()
                next_read = now + self.config.interval_s
            if not self.connected and now >= retry_at:
                if self.connect():
                    delay = 1.0
                else:
                    retry_at, delay = now + delay, min(delay * 2, 60.0)
            if self.connected:
                self.handle_updates()
                sent += self.flush()
            stop.wait(0.05)
        self.disconnect()
        return sent

    def close(self) -> None:
        self.disconnect()
        self.buffer.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m firmware.agent", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--mac", required=True, help="The device's MAC, as in its certificate.")
    parser.add_argument("--state-dir", required=True, type=Path, help="ca.pem, identity.pem, ...")
    parser.add_argument("--host", required=True, help="The broker's host name or address.")
    parser.add_argument("--port", type=int, default=8883)
    parser.add_argument("--prefix", default="iiot", help="Topic prefix (IIOT_TOPIC_PREFIX).")
    parser.add_argument("--kind", default="energy", help="Simulated meter kind.")
    parser.add_argument("--interval", type=float, default=10.0, help="Seconds between readings.")
    parser.add_argument("--count", type=int, default=None, help="Stop after sending this many.")
    args = parser.parse_args(argv)
    from iiot_orchestration.logs import configure_from_environment

    try:
        configure_from_environment(process_name="gateway-agent")
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    config = AgentConfig(
        mac=args.mac.lower(),
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        prefix=args.prefix,
        interval_s=args.interval,
    )
    try:
        agent = GatewayAgent(config, SimulatedMeterReader(config.mac, args.kind))
    except AgentError as exc:
        print(f"error: {exc}")
        return 1
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda _s, _f: stop.set()) for sig in STOP_SIGNALS}
    try:
        sent = agent.run(stop, count=args.count)
        left = len(agent.buffer)
    finally:
        agent.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"sent {sent} readings, {left} left in the buffer for the next run")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
