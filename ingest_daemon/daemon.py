"""The ingest loop: MQTT messages in, batches committed, then acknowledged.

paho's network thread validates each message into the open batch and hands full batches to the
writer (the caller's thread) through a small bounded queue; when the writer falls behind, paho's
thread blocks, stops reading the socket and the broker holds the rest (backpressure, bounded
memory). The writer commits each batch, or the open one once it is old enough, in one
transaction and only then acknowledges its messages, so a crash at any point loses nothing the
broker accepted. Judging in paho's thread keeps the interpreter lock with one busy thread instead
of handing it over for every message, which halved the single-process throughput.

With ``writer_process`` (what ``iiot ingest`` runs) paho's thread only collects each message into
the open batch, and the judging and the commit happen in a second process of the slot
(``ingest_daemon.worker``); this process still acknowledges each batch after its commit.
"""

from __future__ import annotations

import errno
import logging
import queue
import socket
import ssl
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg

from iiot_orchestration.db import DatabaseUnavailable
from iiot_orchestration.mqtt import (
    BufferedClient,
    MqttError,
    MqttOptions,
    check_options,
    connect_client,
    protocol_name,
)
from iiot_orchestration.settings import Settings
from ingest_daemon.judge import Judge, Judged, Written
from ingest_daemon.metrics import IngestMetrics, serve
from ingest_daemon.registry_cache import RegistryCache
from ingest_daemon.sessions import SessionInfo, SessionRecorder
from ingest_daemon.validation import DEFAULT_LIMITS, Limits
from ingest_daemon.worker import (
    ProcessWriter,
    RawMessage,
    WorkerConfig,
    WorkerFailed,
    open_writer,
)
from ingest_daemon.writer import BatchWriter, retry_reason

log = logging.getLogger(__name__)


_PUBACK = struct.Struct("!BBH")
PIPELINE_DEPTH = 2  # batches sent to the writer process before the oldest one's answer
READ_PAUSE_S = 0.002
# paho's delay between reconnection attempts, fixed: after a broker restart the slot is back and
# subscribed about a second later (Mosquitto forgets shared subscriptions over a restart and
# answers publishes that match nothing else with "no matching subscribers" until then)
RECONNECT_DELAY_S = 1
# at start, the wait for the database and for the broker: 0.5 s doubling to 10 s between tries
START_RETRY_S = 0.5
START_RETRY_MAX_S = 10.0


_NO_ROUTE = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN})


def _unreachable(error: MqttError) -> bool:
    """Nothing answered at the broker's address (refused, unknown host, no route, timed out):
    worth waiting for, unlike a broker that answers and refuses us, or TLS that fails (a reset
    during the handshake included: a listener that wants a client certificate may do that)."""
    cause = error.__cause__
    if isinstance(cause, ssl.SSLError) or not isinstance(cause, OSError):
        return False
    gone = (ConnectionRefusedError, TimeoutError, socket.gaierror)
    return isinstance(cause, gone) or cause.errno in _NO_ROUTE


def acknowledge(client: mqtt.Client, mids: list[int]) -> None:
    """Acknowledge QoS 1 messages. One write of all the PUBACK packets (4 bytes each: success,
    no properties, valid in MQTT 5 and 3.1.1) instead of paho's ``ack()`` per message, which
    wakes paho's thread once per message and was the writer's largest cost."""
    queue_packet = getattr(client, "_packet_queue", None)
    if queue_packet is None:  # pragma: no cover - a paho without the internal queue
        for mid in mids:
            client.ack(mid, 1)
        return
    if mids:
        pack = _PUBACK.pack
        queue_packet(mqtt.PUBACK, b"".join([pack(mqtt.PUBACK, 2, mid) for mid in mids]), 0, 1)


@dataclass(frozen=True)
class IngestConfig:
    database_url: str
    mqtt_url: str
    prefix: str = "iiot"
    group: str = "iiot-ingest"
    slot: int = 0
    batch_rows: int = 5_000
    batch_age_s: float = 0.2
    queue_messages: int = 20_000
    session_expiry_s: int = 7 * 24 * 3600
    limits: Limits = DEFAULT_LIMITS
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    stop_timeout_s: float = 30.0  # how long a stop waits for an unavailable database
    mqtt_protocol: str = "auto"
    mqtt_ca_file: Path | None = None
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    shared_subscription: bool = True
    # judge and commit in a writer process beside the receiving one (ingest_daemon.worker), so
    # that paho's thread has the interpreter to itself; `iiot ingest` turns it on
    writer_process: bool = False
    # slots of the group in all (for the session record's check of stale slots)
    slots: int = 1
    # drain: subscribe to nothing (and remove both subscriptions from the session), land what
    # the session holds, and stop once nothing has arrived for this many seconds
    drain_idle_s: float | None = None
    record_session: bool = True  # keep the slot's row in ingest_sessions up to date

    @classmethod
    def from_settings(cls, settings: Settings, **fields: Any) -> IngestConfig:
        """The database, broker, topic and validation settings of ``settings``, with
        ``fields`` for the rest (what `iiot ingest` and `iiot ingest-sessions drain` share)."""
        return cls(
            database_url=settings.require_database_url(),
            mqtt_url=settings.mqtt_url or "",
            prefix=settings.topic_prefix,
            mqtt_protocol=settings.mqtt_protocol,
            mqtt_ca_file=settings.mqtt_ca_file,
            mqtt_cert_file=settings.mqtt_cert_file,
            mqtt_key_file=settings.mqtt_key_file,
            limits=Limits(
                unknown_device_per_minute=settings.unknown_device_dead_letters_per_minute
            ),
            **fields,
        )

    @property
    def client_id(self) -> str:
        return f"{self.group}-{self.slot}"

    @property
    def subscription(self) -> str:
        return self.subscriptions[0 if self.shared_subscription else 1]

    @property
    def subscriptions(self) -> tuple[str, str]:
        """The shared and the plain form of the telemetry subscription."""
        topics = f"{self.prefix}/devices/+/telemetry"
        return f"$share/{self.group}/{topics}", topics

    @property
    def other_subscription(self) -> str:
        """The form this slot does not use, removed from its session at every connection."""
        return self.subscriptions[1 if self.shared_subscription else 0]

    @property
    def mqtt_options(self) -> MqttOptions:
        return MqttOptions(
            self.mqtt_url,
            self.mqtt_protocol,
            self.mqtt_ca_file,
            self.mqtt_cert_file,
            self.mqtt_key_file,
        )


@dataclass
class Batch:
    """Messages received, judged here (``judged``) or raw for the writer process (``raw``)."""

    started: float = 0.0
    mids: list[int] = field(default_factory=list)
    judged: Judged = field(default_factory=Judged)
    raw: list[RawMessage] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.mids)


class ShutdownAbandoned(Exception):
    """The database stayed unavailable for the whole stop timeout; ``args[0]`` counts the
    messages of the batches that failed."""


@dataclass(frozen=True)
class InFlight:
    """A batch sent to the writer process, its answer not received yet."""

    batch: Batch
    batch_id: int
    started: float


@dataclass
class Counters:
    received: int = 0
    landed: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    overage: int = 0
    batches: int = 0
    batches_retried: int = 0  # batches whose write failed and was tried again
    unacknowledged: int = 0  # left for the broker to deliver again (a stop during an outage)
    unknown_device_throttled: int = 0  # messages of unknown devices counted, not stored


class IngestDaemon:
    def __init__(self, config: IngestConfig, registry: RegistryCache | None = None) -> None:
        """Raises MqttError, naming the setting, when the broker settings are wrong: before the
        registry is read or anything connects. Without ``registry`` (and a writer process) it is
        read by ``run``, which waits for the database."""
        check_options(config.mqtt_options)
        self.config = config
        # with a writer process, the registry and the judging live there
        self.registry = None if config.writer_process else registry
        self.judge = (
            None
            if self.registry is None
            else Judge(self.registry.get, config.prefix, config.limits)
        )
        # paho's thread judges each message into the open batch; full batches wait here for the
        # writer (the caller's thread). When this is full, paho's thread blocks: backpressure.
        self._lock = threading.Lock()
        self._open = Batch()
        self._sealed: queue.Queue[Batch] = queue.Queue(
            max(1, config.queue_messages // config.batch_rows)
        )
        self.counters = Counters()
        self.accepting = threading.Event()
        self._stop: threading.Event | None = None
        self._stopping_since: float | None = None
        self.connected = threading.Event()
        self.protocol: str | None = None  # "5" or "3.1.1", once connected
        self._client: mqtt.Client | None = None
        self._writer: BatchWriter | ProcessWriter | None = None
        self._process: ProcessWriter | None = None
        self._batch_ids = 0
        # where and as whom batches are written, by this process or by the writer process
        self._worker_config = WorkerConfig(
            config.database_url, config.prefix, config.limits, config.slot
        )
        self.metrics = IngestMetrics()
        self.http: ThreadingHTTPServer | None = None
        self._broker_lost_at: float | None = None  # monotonic time the connection was lost
        self._database_lost_at: float | None = None
        self._closing = False  # our own disconnect: not a lost connection
        self.drained = False  # drain mode: stopped because nothing more arrived
        self._session: SessionRecorder | None = None

    def ready(self) -> bool:
        """Subscribed to the broker and able to commit to the database."""
        return self.connected.is_set() and self._writer is not None

    def _on_message(
        self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage
    ) -> None:
        if not self.accepting.is_set():
            return  # not acknowledged: the broker delivers it again to the next session
        with self._lock:
            batch = self._open
            if not batch:
                batch.started = time.monotonic()
            if self.judge is None:  # the writer process judges
                self.counters.received += 1
                batch.mids.append(message.mid)
                batch.raw.append((message.topic, message.payload, time.time()))
            else:
                self._judge(message, batch)
            rows = self.config.batch_rows
            if len(batch.judged.readings) < rows and len(batch) < rows:
                return
            self._open = Batch()
            # blocks while the writer is behind: paho stops reading and the broker holds the rest
            self._sealed.put(batch)

    def _on_connect(
        self, client: mqtt.Client, _u: object, _f: object, reason: object, _p: object = None
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.error("broker refused the connection", extra={"reason": str(reason)})
            return
        if self.config.drain_idle_s is not None:
            # what the session holds arrives anyway; nothing new is routed to it after this
            client.unsubscribe(list(self.config.subscriptions))
            return
        client.subscribe(self.config.subscription, qos=1)
        # a session subscribed in the other form before (the slot count or
        # IIOT_MQTT_SHARED_SUBSCRIPTION changed) would receive every message twice; removed after
        # the new one is in place, so no message falls between the two (one that matches both
        # meanwhile lands once: identical readings are duplicates)
        client.unsubscribe(self.config.other_subscription)

    def _on_unsubscribe(
        self, _c: mqtt.Client, _u: object, _mid: int, _reasons: object, _p: object = None
    ) -> None:
        if self.config.drain_idle_s is not None and not self.connected.is_set():
            self._back_online("unsubscribed to drain")

    def _on_subscribe(
        self, _c: mqtt.Client, _u: object, _mid: int, reasons: list[mqtt.ReasonCode], _p: object
    ) -> None:
        refused = [str(reason) for reason in reasons if reason.is_failure]
        if refused:
            log.error(
                "broker refused the subscription %s: %s%s",
                self.config.subscription,
                ", ".join(refused),
                "; set IIOT_MQTT_SHARED_SUBSCRIPTION=off if it has no shared subscriptions "
                "(one ingest process only)"
                if self.config.shared_subscription
                else "",
                extra={"subscription": self.config.subscription},
            )
            return
        self._back_online("subscribed")

    def _back_online(self, what: str) -> None:
        self.connected.set()
        self.metrics.broker_connected.set(1)
        if self._broker_lost_at is None:
            log.info(what, extra={"subscription": self.config.subscription})
        else:
            log.info(
                "broker connection back after %.1f s; %s",
                time.monotonic() - self._broker_lost_at,
                what,
                extra={"subscription": self.config.subscription},
            )
            self._broker_lost_at = None
        if self._session is not None:
            self._session.note("connected")

    def _on_disconnect(
        self, _c: object, _u: object, _f: object = None, reason: object = None, _p: object = None
    ) -> None:
        self.connected.clear()
        self.metrics.broker_connected.set(0)
        if self._closing or self._broker_lost_at is not None:
            return
        self._broker_lost_at = time.monotonic()
        self.metrics.broker_losses.inc()
        log.warning(
            "lost the broker connection (%s); reconnecting every %d s",
            reason,
            RECONNECT_DELAY_S,
            extra={"broker": self.config.mqtt_options.shown_url},
        )
        if self._session is not None:
            self._session.note("disconnected")

    def _prepare(self, client: BufferedClient) -> None:
        client.on_message = self._on_message
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.reconnect_delay_set(min_delay=RECONNECT_DELAY_S, max_delay=RECONNECT_DELAY_S)
        # a steady trickle is read in groups: far fewer wake-ups, 2 ms more latency at most
        client.read_pause_s = READ_PAUSE_S

    def _wait_for_database(self) -> bool:
        """Read the registry (in this process) and open the writer, waiting with backoff while
        the database is unavailable; False when stopped meanwhile."""
        delay = START_RETRY_S
        while True:
            try:
                self._start_database()
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                self.metrics.database_connected.set(0)
                error = str(exc).strip()[:200]
                log.warning(
                    "database unavailable at start (%s); retrying in %g s",
                    error,
                    delay,
                    extra={"error": error, "retry_in_s": delay},
                )
            else:
                log.info("connected to the database", extra={"slot": self.config.slot})
                if self.registry is not None:
                    self.registry.start()
                return True
            if self._stop.wait(delay):
                return False
            delay = min(delay * 2, START_RETRY_MAX_S)

    def _start_database(self) -> None:
        """The registry read (unless the writer process reads it) and the writer opened; raises
        while the database is unavailable."""
        if not self.config.writer_process and self.registry is None:
            self.registry = RegistryCache(self.config.database_url)
            # set before the broker connects: paho's thread judges with it from the first message
            self.judge = Judge(self.registry.get, self.config.prefix, self.config.limits)
        self._open_writer(raise_errors=True)

    def _connect(self) -> mqtt.Client | None:
        """Connected with a persistent session (MQTT 5, or 3.1.1 when the broker refuses 5);
        paho's thread subscribes on every connection. Waits with backoff while nothing answers
        at the broker's address (None when stopped meanwhile); a broker that refuses us, or TLS
        that fails, raises MqttError at once."""
        delay = START_RETRY_S
        while True:
            try:
                client, protocol = connect_client(
                    self.config.mqtt_options,
                    self.config.client_id,
                    setup=self._prepare,
                    session_expiry_s=self.config.session_expiry_s,
                    manual_ack=True,
                )
                break
            except MqttError as exc:
                if not _unreachable(exc):
                    raise
                log.warning(
                    "%s; retrying in %g s",
                    exc,
                    delay,
                    extra={"broker": self.config.mqtt_options.shown_url, "retry_in_s": delay},
                )
            if self._stop is not None and self._stop.wait(delay):
                return None
            delay = min(delay * 2, START_RETRY_MAX_S)
        self.protocol = protocol_name(protocol)
        if protocol == mqtt.MQTTv311 and self.config.shared_subscription:
            # MQTT 3.1.1 has no way to say so: amqtt grants $share/... and delivers nothing to it
            log.warning(
                "MQTT 3.1.1 cannot tell whether the broker supports shared subscriptions; if "
                "nothing arrives on %s, the broker treats it as a plain filter (amqtt does): set "
                "IIOT_MQTT_SHARED_SUBSCRIPTION=off and run one ingest process",
                self.config.subscription,
                extra={"subscription": self.config.subscription},
            )
        return client

    def run(self, stop: threading.Event) -> Counters:
        """Ingest until ``stop`` is set; then drain, flush, acknowledge and disconnect. If the
        database stays unavailable for ``stop_timeout_s`` after the stop, give up and leave the
        rest unacknowledged (``counters.unacknowledged``): the broker delivers it again."""
        self._stop = stop
        if self.config.record_session:
            self._session = SessionRecorder(self.config.database_url, self._session_info())
            self._session.start()
        if self.config.drain_idle_s is not None:
            threading.Thread(
                target=self._stop_when_idle, args=(stop,), name="drain-idle", daemon=True
            ).start()
        if self.config.metrics_port is not None:
            self.http = serve(
                self.metrics, self.config.metrics_port, self.ready, self.config.metrics_host
            )
        if self.config.writer_process:
            self._process = ProcessWriter(self._worker_config)
        self.accepting.set()
        client = None
        try:
            # the broker only once the database answers: until then the session holds the rest
            if self._wait_for_database():
                self._client = client = self._connect()
            if client is not None:
                self._consume()
        except ShutdownAbandoned as exc:
            self.counters.unacknowledged = self._abandon(client, exc.args[0])
            log.error(
                "stopping without the database: messages left unacknowledged for redelivery",
                extra={"messages": self.counters.unacknowledged},
            )
        finally:
            self._closing = True
            if client is not None:
                client.loop_stop()
                client.disconnect()
            if self._session is not None:
                self._session.close("stopped")
            if self.registry is not None:
                self.registry.stop()
            self._close_writer()
            if self._process is not None:
                self._process.close()
            if self.http is not None:
                self.http.shutdown()
                self.http.server_close()
        log.info("ingest stopped", extra={"landed": self.counters.landed})
        return self.counters

    def _session_info(self) -> SessionInfo:
        config = self.config
        return SessionInfo(
            config.client_id,
            config.group,
            config.slot,
            "(draining)" if config.drain_idle_s is not None else config.subscription,
            config.session_expiry_s,
            config.slots,
            check_stale=config.drain_idle_s is None and config.slot == 0,
        )

    def _stop_when_idle(self, stop: threading.Event) -> None:
        """Drain mode: stop once unsubscribed and nothing has arrived for ``drain_idle_s``."""
        seen, since = -1, time.monotonic()
        while not stop.wait(0.1):
            received = self.counters.received
            if received != seen or not self.connected.is_set():
                seen, since = received, time.monotonic()
            elif time.monotonic() - since >= self.config.drain_idle_s:
                log.info("nothing arrived for %g s: drained", self.config.drain_idle_s)
                self.drained = True
                stop.set()

    def _consume(self) -> None:
        """Commit sealed batches, and the open one once it is old enough or we are stopping.

        With a writer process, the next batch is sent before the answer for the current one is
        awaited (at most ``PIPELINE_DEPTH`` in flight), so it is judged while the database lands
        the current one; answers, and so acknowledgements, come in the order sent."""
        age_limit = self.config.batch_age_s
        in_flight: deque[InFlight] = deque()
        while True:
            stopping = self._note_stop()
            # the open batch is due at started + age; with none open, look again soon (paho's
            # thread does not wake us when it opens one), so a reading waits at most ~1.25 x age
            wait = age_limit / 4
            if self._open:
                wait = min(wait, age_limit - (time.monotonic() - self._open.started))
            if stopping or in_flight:
                wait = 0.0  # with a batch in flight, its answer is what we wait for
            try:
                batch: Batch | None = self._sealed.get(timeout=max(wait, 0))
            except queue.Empty:
                batch = self._take_open(age_limit, stopping)
            self.metrics.queue_depth.set(self._sealed.qsize() * self.config.batch_rows)
            if batch and self._process is not None and self._writer is not None:
                self._batch_ids += 1
                self._process.submit(batch.raw, self._batch_ids)
                in_flight.append(InFlight(batch, self._batch_ids, time.perf_counter()))
            elif batch:
                self._flush(batch)  # one process, or the writer not open yet: retried here
            if in_flight and (len(in_flight) >= PIPELINE_DEPTH or not batch):
                self._complete(in_flight)
            elif not batch and stopping and self._idle():
                break

    def _complete(self, in_flight: deque[InFlight]) -> None:
        """Wait for the answer for the oldest batch in flight, and acknowledge it."""
        entry = in_flight.popleft()
        try:
            written = self._process.receive()
        except DatabaseUnavailable as exc:
            failed = [entry, *in_flight]
            in_flight.clear()
            self._count_retry(exc)  # the first is written again by _commit_again
            self._commit_again(failed)
            return
        self._acknowledge(entry.batch, written, entry.started)

    def _commit_again(self, failed: list[InFlight]) -> None:
        """The database did not take the first batch, and the writer process refused the later
        ones without trying them: collect their answers, then commit each again in order,
        retried until the database takes it (their verdicts are kept: nothing is judged
        twice)."""
        if not all(self._refused() for _ in failed[1:]):
            raise WorkerFailed("the writer process committed a batch after a failed one")
        for done, entry in enumerate(failed):
            try:
                self._flush(entry.batch, entry.batch_id, entry.started, retried=done == 0)
            except ShutdownAbandoned as exc:
                rest = sum(len(later.batch) for later in failed[done + 1 :])
                raise ShutdownAbandoned(exc.args[0] + rest) from exc

    def _refused(self) -> bool:
        try:
            self._process.receive()
        except DatabaseUnavailable:
            return True
        return False

    def _idle(self) -> bool:
        """Nothing open, sealed or being judged (paho's thread is not inside the lock)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            return not self._open and self._sealed.empty()
        finally:
            self._lock.release()

    def _take_open(self, age_limit: float, stopping: bool) -> Batch | None:
        """The open batch, when it is due; never waits for paho's thread (it may be blocked
        handing us a sealed batch while it holds the lock)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            batch = self._open
            if batch and (stopping or time.monotonic() - batch.started >= age_limit):
                self._open = Batch()
                return batch
            return None
        finally:
            self._lock.release()

    def _judge(self, message: mqtt.MQTTMessage, batch: Batch) -> None:
        self.counters.received += 1
        self.metrics.received.inc()
        if self.judge.judge(batch.judged, message.topic, message.payload, datetime.now(UTC)):
            self.counters.overage += 1
            self.metrics.overage.inc()
        batch.mids.append(message.mid)

    def _flush(
        self,
        batch: Batch,
        batch_id: int | None = None,
        started: float | None = None,
        *,
        retried: bool = False,
    ) -> None:
        """Commit the batch, retrying until the database takes it, then acknowledge it. A batch
        sent to the writer process before keeps its id, so it is not judged again; ``retried``:
        its failed write is counted already (``_count_retry``)."""
        delay = 0.5
        started = time.perf_counter() if started is None else started
        if batch_id is None:
            self._batch_ids += 1
            batch_id = self._batch_ids
        while True:
            try:
                writer = self._writer or self._open_writer(raise_errors=True)
                if isinstance(writer, ProcessWriter):
                    written = writer.write(batch.raw, batch_id)
                else:
                    judged = batch.judged
                    result = writer.write(
                        judged.readings, judged.dead_letters, now=datetime.now(UTC)
                    )
                    written = judged.written(result)
                break
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                # keep the batch, acknowledge nothing, and let the queue fill: backpressure
                self.metrics.database_connected.set(0)
                if self._database_lost_at is None:
                    self._database_lost_at = time.monotonic()
                    self.metrics.database_losses.inc()
                    log.warning(
                        "lost the database: batches wait, unacknowledged, until it is back",
                        extra={"error": str(exc)[:200]},
                    )
                log.warning(
                    "database unavailable; retrying the batch",
                    extra={"error": str(exc)[:200], "retry_in_s": delay},
                )
                self._close_writer()
                if self._stop_timed_out():
                    raise ShutdownAbandoned(len(batch)) from exc
                if not retried:
                    retried = True
                    self._count_retry(exc)
                self._wait_to_retry(delay)
                delay = min(delay * 2, 10.0)
        if self._database_lost_at is not None:
            log.info(
                "database back after %.1f s",
                time.monotonic() - self._database_lost_at,
                extra={"batch_messages": len(batch)},
            )
            self._database_lost_at = None
        self._acknowledge(batch, written, started)

    def _count_retry(self, error: BaseException) -> None:
        """A batch whose write failed is tried again: counted once a batch (however long the
        outage), by the class of its first failure, for IngestRetryRate."""
        self.counters.batches_retried += 1
        self.metrics.batches_retried.labels(retry_reason(error)).inc()

    def _acknowledge(self, batch: Batch, written: Written, started: float) -> None:
        acknowledge(self._client, batch.mids)
        self._observe(batch, written, time.perf_counter() - started)

    def _note_stop(self) -> bool:
        """Stop accepting once asked to (paho's thread then leaves new messages unacknowledged);
        True while stopping."""
        if self._stop is not None and self._stop.is_set() and self._stopping_since is None:
            self.accepting.clear()
            self._stopping_since = time.monotonic()
        return self._stopping_since is not None

    def _stop_timed_out(self) -> bool:
        return (
            self._note_stop()
            and time.monotonic() - self._stopping_since >= self.config.stop_timeout_s
        )

    def _wait_to_retry(self, delay: float) -> None:
        """Sleep before retrying the batch, cut short when a stop's timeout runs out."""
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0 and not self._stop_timed_out():
            time.sleep(min(left, 0.1))

    def _abandon(self, client: mqtt.Client, pending: int) -> int:
        """Stop paho's thread and count what stays unacknowledged: ``pending`` (the failed
        batches), the sealed ones and the open one. paho's thread may be blocked handing over a
        batch, so the queue is kept empty until it has stopped."""
        stopper = threading.Thread(target=client.loop_stop, name="paho-stop")
        stopper.start()
        while stopper.is_alive():
            while not self._sealed.empty():
                pending += len(self._sealed.get_nowait())
            stopper.join(0.05)
        while not self._sealed.empty():
            pending += len(self._sealed.get_nowait())
        return pending + len(self._open)

    def _close_writer(self) -> None:
        if isinstance(self._writer, BatchWriter):
            self._writer.conn.close()
        self._writer = None

    def _open_writer(self, *, raise_errors: bool = False) -> BatchWriter | ProcessWriter | None:
        try:
            if self._process is not None:
                self._process.open()
                self._writer = self._process
            else:
                self._writer = open_writer(self._worker_config)
        except (psycopg.OperationalError, DatabaseUnavailable):
            if raise_errors:
                raise
            return None  # not ready yet; the first batch retries
        self.metrics.database_connected.set(1)
        return self._writer

    def _observe(self, batch: Batch, written: Written, seconds: float) -> None:
        """Count a committed batch, for the caller (counters) and for Prometheus (metrics)."""
        counters, metrics, result = self.counters, self.metrics, written.result
        counters.batches += 1
        counters.landed += result.landed
        counters.duplicates += result.duplicates
        counters.dead_letters += result.dead_letters
        if self.judge is None:  # judged in the writer process: counted per batch
            metrics.received.inc(len(batch))
            counters.overage += written.overage
            metrics.overage.inc(written.overage)
        metrics.flush_seconds.observe(seconds)
        metrics.batch_size.observe(len(batch))
        metrics.landed.inc(result.landed)
        metrics.duplicates.inc(result.duplicates)
        for reason, count in written.dead_letter_reasons.items():
            metrics.dead_letters.labels(reason).inc(count)
        counters.unknown_device_throttled += written.unknown_device_throttled
        metrics.unknown_device_throttled.inc(written.unknown_device_throttled)
        if written.newest is not None:
            lag = (datetime.now(UTC) - written.newest).total_seconds()
            metrics.lag_seconds.observe(max(lag, 0.0))
