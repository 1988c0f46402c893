"""Connecting to the MQTT broker, for the ingest daemon and the fleet simulator alike.

``mqtts://`` turns TLS on (the broker's certificate checked against ``IIOT_MQTT_CA_FILE`` or the
system's CAs, a client certificate presented when configured). ``IIOT_MQTT_PROTOCOL=auto`` tries
MQTT 5 first and MQTT 3.1.1 when the broker refuses it: a CONNACK "unsupported protocol version",
the connection closed without a CONNACK, or no CONNACK at all within ``PROBE_TIMEOUT_S`` (amqtt
answers a CONNECT without properties with "unsupported protocol version", but misreads one with
properties, such as the daemon's session expiry, and waits for bytes that never come).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iiot_orchestration.errors import IiotError
from iiot_orchestration.settings import MQTT_PROTOCOLS, Settings, mask_password

log = logging.getLogger(__name__)

PLAIN_PORT = 1883
TLS_PORT = 8883
PROBE_TIMEOUT_S = 5.0  # auto: how long MQTT 5 may go unanswered before trying MQTT 3.1.1
CONNACK_TIMEOUT_S = 15.0
_PROTOCOL_NAMES = {mqtt.MQTTv5: "5", mqtt.MQTTv311: "3.1.1"}
_UNSUPPORTED_PROTOCOL = (1, 132)  # 3.1.1's "unacceptable protocol version", and MQTT 5's


READ_SIZE = 65536  # bytes asked of the socket at a time by BufferedClient
READ_REFILLS = 8  # socket reads per network-loop pass before paho checks writes and timers
SMALL_READ = 16384  # a pass that read less than this waits read_pause_s before the next one


class _NoProperties(Properties):
    """The properties of every received PUBLISH that carries none: one read-only instance."""

    def __init__(self) -> None:
        super().__init__(PacketTypes.PUBLISH)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.replace(" ", "") not in ("packetType", "types", "names", "properties"):
            raise AttributeError("the properties of a received message are read-only")
        super().__setattr__(name, value)


_NO_PROPERTIES = _NoProperties()


class BufferedClient(mqtt.Client):
    """A paho client that reads the socket 64 KiB at a time and decodes plain PUBLISH packets
    itself.

    paho reads each incoming packet with at least three ``recv`` calls (its first byte, its
    length, the rest) and goes back to ``select`` after every packet, so a stream of small
    PUBLISH packets costs about four system calls each. This client serves those reads from one
    buffer and keeps reading packets while the buffer holds any; it gives the loop back to paho
    (writes, keepalive, timers) only when the buffer is empty, after at most ``READ_REFILLS``
    socket reads, so nothing stays in the buffer while paho waits in ``select``. With
    ``read_pause_s`` set, a pass that found less than ``SMALL_READ`` bytes waits that long
    before the next ``select``: a steady trickle is then read a few dozen messages at a time
    instead of one per wake-up. The ingest daemon's receiving process drains a backlog about
    three times faster than with stock paho (docs/performance.md).
    """

    read_pause_s = 0.0
    _read_buffer = b""
    _read_position = 0
    _refills_left = 0
    _bytes_read = 0

    def reconnect(self) -> MQTTErrorCode:
        self._read_buffer, self._read_position = b"", 0  # never carry bytes to a new socket
        return super().reconnect()

    def _sock_recv(self, bufsize: int) -> bytes:
        position, buffer = self._read_position, self._read_buffer
        if position < len(buffer):
            self._read_position = position + bufsize
            return buffer[position : position + bufsize]
        if self._refills_left <= 0:
            raise BlockingIOError  # this pass ends; select() wakes paho for the rest
        self._refills_left -= 1
        data = super()._sock_recv(READ_SIZE)
        self._bytes_read += len(data)
        if len(data) > bufsize:
            self._read_buffer, self._read_position = data, bufsize
            return data[:bufsize]
        self._read_buffer, self._read_position = b"", 0
        return data

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """Read packets until the buffer is empty and the socket has nothing more (or the pass
        has read the socket ``READ_REFILLS`` times); paho's own reads one packet a pass."""
        self._refills_left, self._bytes_read = READ_REFILLS, 0
        while True:
            if self._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                if self.read_pause_s and self._bytes_read < SMALL_READ:
                    time.sleep(self.read_pause_s)
                return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_publish(self) -> MQTTErrorCode:
        """A QoS 0 or 1 PUBLISH without properties, decoded here without the per-packet struct
        formats and the empty Properties paho builds for it (half of paho's time per message
        on MQTT 5); anything else, or with paho's logging on, is paho's to decode."""
        packet, header = self._in_packet["packet"], self._in_packet["command"]
        qos = (header & 0x06) >> 1
        v5 = self._protocol == mqtt.MQTTv5
        size = len(packet)
        if qos == 2 or size < 2 or self._on_log is not None or self._logger is not None:
            return super()._handle_publish()
        topic_end = 2 + (packet[0] << 8 | packet[1])
        payload_at = topic_end + (2 if qos else 0) + v5
        if topic_end == 2 or payload_at > size or (v5 and packet[payload_at - 1] != 0):
            return super()._handle_publish()
        message = mqtt.MQTTMessage(
            packet[topic_end] << 8 | packet[topic_end + 1] if qos else 0,
            bytes(packet[2:topic_end]),
        )
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.properties = _NO_PROPERTIES if v5 else None
        message.payload = bytes(packet[payload_at:])
        message.timestamp = mqtt.time_func()
        self._handle_on_message(message)
        if qos == 1 and not self._manual_ack:
            return self._send_puback(message.mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


class MqttError(IiotError):
    """The broker settings are wrong, or the broker could not be reached or refused us."""


@dataclass(frozen=True)
class MqttOptions:
    """How to reach the broker: ``IIOT_MQTT_URL``, ``IIOT_MQTT_PROTOCOL`` and the TLS files."""

    url: str
    protocol: str = "auto"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> MqttOptions:
        if not settings.mqtt_url:
            raise MqttError(
                "IIOT_MQTT_URL is not set: expected mqtt://host:port or mqtts://host:port"
            )
        return cls(
            settings.mqtt_url,
            settings.mqtt_protocol,
            settings.mqtt_ca_file,
            settings.mqtt_cert_file,
            settings.mqtt_key_file,
        )

    @property
    def shown_url(self) -> str:
        return mask_password(self.url)


@dataclass(frozen=True)
class Endpoint:
    """Checked :class:`MqttOptions`: where to connect, and the TLS context settings."""

    host: str
    port: int
    tls: bool
    protocols: tuple[int, ...]
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


def check_options(options: MqttOptions) -> Endpoint:
    """The endpoint, or an MqttError naming the variable that is wrong; connects to nothing."""
    parts = urlsplit(options.url)
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = -1
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or port == -1:
        raise MqttError(
            f"IIOT_MQTT_URL={mask_password(options.url)[:80]!r} is invalid: "
            "expected mqtt://host:port or mqtts://host:port"
        )
    if options.protocol not in MQTT_PROTOCOLS:
        raise MqttError(
            f"IIOT_MQTT_PROTOCOL={options.protocol[:20]!r} is invalid: expected "
            f"{', '.join(MQTT_PROTOCOLS[:-1])} or {MQTT_PROTOCOLS[-1]}"
        )
    tls = parts.scheme == "mqtts"
    files = {
        "IIOT_MQTT_CA_FILE": options.ca_file,
        "IIOT_MQTT_CERT_FILE": options.cert_file,
        "IIOT_MQTT_KEY_FILE": options.key_file,
    }
    given = [name for name, path in files.items() if path is not None]
    if given and not tls:
        raise MqttError(
            f"{' and '.join(given)} set, but IIOT_MQTT_URL={mask_password(options.url)[:80]!r} "
            "is not TLS: use mqtts://host:port (or unset them)"
        )
    if (options.cert_file is None) != (options.key_file is None):
        have, need = (
            ("IIOT_MQTT_CERT_FILE", "IIOT_MQTT_KEY_FILE")
            if options.key_file is None
            else ("IIOT_MQTT_KEY_FILE", "IIOT_MQTT_CERT_FILE")
        )
        raise MqttError(
            f"{have} is set but {need} is not: a client certificate needs both the certificate "
            "and its private key"
        )
    for name in given:
        _check_readable(name, files[name])
    if tls:
        _check_tls_files(options)
    protocols = {
        "auto": (mqtt.MQTTv5, mqtt.MQTTv311),
        "5": (mqtt.MQTTv5,),
        "3.1.1": (mqtt.MQTTv311,),
    }[options.protocol]
    return Endpoint(
        host=parts.hostname,
        port=port or (TLS_PORT if tls else PLAIN_PORT),
        tls=tls,
        protocols=protocols,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ca_file=str(options.ca_file) if options.ca_file else None,
        cert_file=str(options.cert_file) if options.cert_file else None,
        key_file=str(options.key_file) if options.key_file else None,
    )


def _check_readable(name: str, path: Path) -> None:
    try:
        with path.open("rb") as file:
            file.read(1)
    except OSError as exc:
        detail = exc.strerror or exc
        raise MqttError(f"{name}={str(path)[:200]!r} cannot be read: {detail}") from None


def _no_passphrase() -> bytes:
    # paho would ask for an encrypted key's passphrase on the terminal; a daemon has none
    return b""


def _check_tls_files(options: MqttOptions) -> None:
    """Load the files the way paho will, so that a wrong file is reported by its variable."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if options.ca_file is not None:
        try:
            context.load_verify_locations(str(options.ca_file))
        except ssl.SSLError as exc:
            raise MqttError(
                f"IIOT_MQTT_CA_FILE={str(options.ca_file)[:200]!r} holds no usable PEM CA "
                f"certificate: {exc}"
            ) from None
    if options.cert_file is not None:
        try:
            context.load_cert_chain(str(options.cert_file), str(options.key_file), _no_passphrase)
        except ssl.SSLError as exc:
            raise MqttError(
                f"IIOT_MQTT_CERT_FILE={str(options.cert_file)[:200]!r} and IIOT_MQTT_KEY_FILE="
                f"{str(options.key_file)[:200]!r} are not a PEM certificate and its unencrypted "
                f"private key: {exc}"
            ) from None


def protocol_name(protocol: int) -> str:
    """``5`` or ``3.1.1``, as IIOT_MQTT_PROTOCOL spells them."""
    return _PROTOCOL_NAMES[protocol]


class _Handshake:
    """The broker's answer to a client's first CONNECT: a CONNACK or the connection closing.

    It stands in for the client's own on_connect and on_disconnect, which see nothing until the
    first CONNACK succeeds, and everything after it; a refused or abandoned attempt stays silent.
    """

    def __init__(self, client: mqtt.Client) -> None:
        self._lock = threading.Lock()
        self._state = "waiting"  # then "connected", "refused", "closed" or "abandoned"
        self.answered = threading.Event()
        self.reason: mqtt.ReasonCode | None = None
        self.socket_error: str | None = None
        self._on_connect = client.on_connect
        self._on_disconnect = client.on_disconnect
        client.on_connect = self.on_connect
        client.on_disconnect = self.on_disconnect
        client.on_log = self.on_log  # removed once answered: paho formats every line for it

    def _settle(self, state: str, reason: mqtt.ReasonCode | None) -> bool:
        """Record the first answer; False when the attempt was already settled."""
        with self._lock:
            if self._state != "waiting":
                return False
            self._state, self.reason = state, reason
        self.answered.set()
        return True

    def abandon(self) -> bool:
        """Give up waiting; False when the answer came meanwhile."""
        with self._lock:
            if self._state != "waiting":
                return False
            self._state = "abandoned"
            return True

    @property
    def state(self) -> str:
        return self._state

    def on_log(self, _client: mqtt.Client, _userdata: Any, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR and self.socket_error is None:
            self.socket_error = text

    def on_connect(self, client: mqtt.Client, userdata: Any, *args: Any) -> None:
        reason: mqtt.ReasonCode = args[1]
        if self._settle("refused" if reason.is_failure else "connected", reason):
            if reason.is_failure:
                return
        elif self._state != "connected":
            return
        if self._on_connect is not None:
            self._on_connect(client, userdata, *args)

    def on_disconnect(self, client: mqtt.Client, userdata: Any, *args: Any) -> None:
        if self._settle("closed", None) or self._state != "connected":
            return
        if self._on_disconnect is not None:
            self._on_disconnect(client, userdata, *args)


def _close(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


def _attempt(
    endpoint: Endpoint,
    client_id: str,
    protocol: int,
    *,
    setup: Callable[[mqtt.Client], None] | None,
    session_expiry_s: int | None,
    manual_ack: bool,
    keepalive: int,
    timeout_s: float,
) -> tuple[mqtt.Client | None, _Handshake]:
    """One CONNECT: the running client when the broker accepted it, else None and why not."""
    persistent = session_expiry_s is not None
    extra: dict[str, Any] = {"clean_session": not persistent} if protocol == mqtt.MQTTv311 else {}
    client = BufferedClient(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        manual_ack=manual_ack,
        **extra,
    )
    if endpoint.username is not None:
        client.username_pw_set(endpoint.username, endpoint.password)
    if endpoint.tls:
        client.tls_set(
            ca_certs=endpoint.ca_file,
            certfile=endpoint.cert_file,
            keyfile=endpoint.key_file,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    if setup is not None:
        setup(client)
    handshake = _Handshake(client)
    connect: dict[str, Any] = {}
    if protocol == mqtt.MQTTv5 and persistent:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = session_expiry_s
        connect = {"clean_start": False, "properties": properties}
    try:
        client.connect(endpoint.host, endpoint.port, keepalive=keepalive, **connect)
    except ssl.SSLCertVerificationError as exc:
        hint = "IIOT_MQTT_CA_FILE" if endpoint.ca_file else "the system's CAs (IIOT_MQTT_CA_FILE)"
        raise MqttError(
            f"cannot connect to MQTT broker {endpoint.host}:{endpoint.port}: its certificate "
            f"does not verify against {hint}: {exc.verify_message or exc}"
        ) from exc
    except OSError as exc:
        hint = _certificate_hint(endpoint) if isinstance(exc, ssl.SSLError) else ""
        raise MqttError(
            f"cannot connect to MQTT broker {endpoint.host}:{endpoint.port}: {exc}{hint}"
        ) from exc
    client.loop_start()
    if not handshake.answered.wait(timeout_s) and handshake.abandon():
        _close(client)
        return None, handshake
    client.on_log = None
    if handshake.state != "connected":
        _close(client)
        return None, handshake
    return client, handshake


def _refusal(endpoint: Endpoint, versions: str, handshake: _Handshake, timeout_s: float) -> str:
    """Why the last CONNECT failed; ``versions`` names the protocols tried so far."""
    where = f"MQTT broker {endpoint.host}:{endpoint.port}"
    if handshake.state == "refused":
        return f"{where} refused the connection ({versions}): {handshake.reason}"
    if handshake.state == "abandoned":
        return f"{where} did not answer CONNECT ({versions}) within {timeout_s:g} s"
    detail = f": {handshake.socket_error}" if handshake.socket_error else ""
    return (
        f"{where} closed the connection before answering CONNECT ({versions}){detail}"
        f"{_certificate_hint(endpoint)}"
    )


def _certificate_hint(endpoint: Endpoint) -> str:
    if not endpoint.tls or endpoint.cert_file is not None:
        return ""
    return (
        " (a TLS listener that requires a client certificate closes connections without one: "
        "set IIOT_MQTT_CERT_FILE and IIOT_MQTT_KEY_FILE)"
    )


def _protocol_refused(handshake: _Handshake) -> bool:
    """The answer of a broker that does not speak the protocol (see the module's docstring)."""
    if handshake.state == "refused":
        return handshake.reason is not None and handshake.reason.value in _UNSUPPORTED_PROTOCOL
    return handshake.state in ("closed", "abandoned")


def connect_client(
    options: MqttOptions,
    client_id: str,
    *,
    setup: Callable[[BufferedClient], None] | None = None,
    session_expiry_s: int | None = None,
    manual_ack: bool = False,
    keepalive: int = 60,
) -> tuple[BufferedClient, int]:
    """A client connected to the broker, its network thread running, and the protocol it speaks
    (``mqtt.MQTTv5`` or ``mqtt.MQTTv311``).

    ``setup`` sets the client's callbacks; they see the connection once the broker accepted it.
    ``session_expiry_s`` asks for a persistent session: clean start off and that session expiry
    on MQTT 5, clean session off on MQTT 3.1.1 (the broker's own expiry applies). Raises
    MqttError, naming the setting when one is wrong, before connecting to anything."""
    endpoint = check_options(options)
    tried: list[str] = []
    for protocol in endpoint.protocols:
        fallback = protocol != endpoint.protocols[-1]
        timeout_s = PROBE_TIMEOUT_S if fallback else CONNACK_TIMEOUT_S
        client, handshake = _attempt(
            endpoint,
            client_id,
            protocol,
            setup=setup,
            session_expiry_s=session_expiry_s,
            manual_ack=manual_ack,
            keepalive=keepalive,
            timeout_s=timeout_s,
        )
        if client is not None:
            log.info(
                "connected to %s with MQTT %s",
                options.shown_url,
                protocol_name(protocol),
                extra={"broker": options.shown_url, "protocol": protocol_name(protocol)},
            )
            return client, protocol
        tried.append(f"MQTT {protocol_name(protocol)}")
        refusal = _refusal(endpoint, ", then ".join(tried), handshake, timeout_s)
        if not (fallback and _protocol_refused(handshake)):
            if protocol == mqtt.MQTTv5 and _protocol_refused(handshake):
                refusal += " (IIOT_MQTT_PROTOCOL=5; auto falls back to MQTT 3.1.1)"
            raise MqttError(refusal)
        log.info(
            "%s; trying MQTT 3.1.1",
            refusal,
            extra={"broker": options.shown_url, "protocol": protocol_name(protocol)},
        )
    raise AssertionError("unreachable: the last protocol's refusal is raised above")
