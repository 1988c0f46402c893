"""The ingest loop: MQTT messages in, batches committed, then acknowledged.

paho's network thread puts each message in a bounded queue; when the queue is full that thread
blocks, stops reading the socket and the broker holds the rest (backpressure, bounded memory).
The main loop validates, batches by size or age, commits a batch in one transaction and only
then acknowledges its messages, so a crash at any point loses nothing the broker accepted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from iiot_orchestration.db import DatabaseUnavailable, open_connection
from ingest_daemon.metrics import IngestMetrics, serve
from ingest_daemon.registry_cache import RegistryCache
from ingest_daemon.validation import DEFAULT_LIMITS, Device, Limits, Reading, Rejection, validate
from ingest_daemon.writer import BatchResult, BatchWriter, DeadLetter

log = logging.getLogger(__name__)


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

    @property
    def client_id(self) -> str:
        return f"{self.group}-{self.slot}"

    @property
    def subscription(self) -> str:
        return f"$share/{self.group}/{self.prefix}/devices/+/telemetry"


class TokenBuckets:
    """Messages per minute per device, refilled continuously."""

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[float, float]] = {}

    def take(self, device: Device, now: float) -> bool:
        capacity = float(device.messages_per_minute)
        tokens, last = self._buckets.get(device.device_id, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * capacity / 60.0)
        allowed = tokens >= 1.0
        self._buckets[device.device_id] = (tokens - 1.0 if allowed else tokens, now)
        return allowed


@dataclass
class Batch:
    started: float = 0.0
    mids: list[int] = field(default_factory=list)
    readings: list[tuple[Reading, datetime]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.mids)


@dataclass
class Counters:
    received: int = 0
    landed: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    overage: int = 0
    batches: int = 0


class IngestDaemon:
    def __init__(self, config: IngestConfig, registry: RegistryCache | None = None) -> None:
        self.config = config
        self.registry = registry or RegistryCache(config.database_url)
        self.inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue(config.queue_messages)
        self.counters = Counters()
        self.buckets = TokenBuckets()
        self.accepting = threading.Event()
        self.connected = threading.Event()
        self._client: mqtt.Client | None = None
        self._writer: BatchWriter | None = None
        self.metrics = IngestMetrics()
        self.http: ThreadingHTTPServer | None = None

    def ready(self) -> bool:
        """Subscribed to the broker and able to commit to the database."""
        return self.connected.is_set() and self._writer is not None

    def _on_message(
        self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage
    ) -> None:
        if not self.accepting.is_set():
            return  # not acknowledged: the broker delivers it again to the next session
        self.inbox.put(message)  # blocks when full: backpressure on the broker

    def _on_connect(
        self, client: mqtt.Client, _u: object, _f: object, reason: object, _p: object = None
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.error("broker refused the connection", extra={"reason": str(reason)})
            return
        client.subscribe(self.config.subscription, qos=1)

    def _on_subscribe(self, *_args: object) -> None:
        self.connected.set()
        self.metrics.broker_connected.set(1)
        log.info("subscribed", extra={"subscription": self.config.subscription})

    def _on_disconnect(self, *_args: object) -> None:
        self.connected.clear()
        self.metrics.broker_connected.set(0)

    def _connect(self) -> mqtt.Client:
        parts = urlsplit(self.config.mqtt_url)
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        client.on_message = self._on_message
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.config.session_expiry_s
        client.connect(
            parts.hostname or "127.0.0.1",
            parts.port or 1883,
            clean_start=False,
            properties=properties,
        )
        client.loop_start()
        return client

    def run(self, stop: threading.Event) -> Counters:
        """Ingest until ``stop`` is set; then drain, flush, acknowledge and disconnect."""
        if self.config.metrics_port is not None:
            self.http = serve(
                self.metrics, self.config.metrics_port, self.ready, self.config.metrics_host
            )
        self.registry.start()
        self._open_writer()
        self.accepting.set()
        self._client = client = self._connect()
        try:
            self._consume(stop)
        finally:
            client.loop_stop()
            client.disconnect()
            self.registry.stop()
            if self._writer is not None:
                self._writer.conn.close()
            if self.http is not None:
                self.http.shutdown()
                self.http.server_close()
        log.info("ingest stopped", extra={"landed": self.counters.landed})
        return self.counters

    def _consume(self, stop: threading.Event) -> None:
        batch = Batch()
        while True:
            if stop.is_set() and self.accepting.is_set():
                self.accepting.clear()
            wait = self.config.batch_age_s - (time.monotonic() - batch.started) if batch else 0.5
            self.metrics.queue_depth.set(self.inbox.qsize())
            try:
                message = self.inbox.get(timeout=max(wait, 0.0))
            except queue.Empty:
                message = None
            if message is not None:
                if not batch:
                    batch.started = time.monotonic()
                self._judge(message, batch)
            draining = not self.accepting.is_set() and self.inbox.empty()
            age = time.monotonic() - batch.started
            if batch and (
                len(batch.readings) >= self.config.batch_rows
                or age >= self.config.batch_age_s
                or draining
            ):
                self._flush(batch)
                batch = Batch()
            if draining and not batch:
                break

    def _judge(self, message: mqtt.MQTTMessage, batch: Batch) -> None:
        self.counters.received += 1
        self.metrics.received.inc()
        received_at = datetime.now(UTC)
        verdict = validate(
            message.topic,
            message.payload,
            self.registry.get,
            prefix=self.config.prefix,
            now=received_at,
            limits=self.config.limits,
        )
        device = verdict.device
        rejections = verdict.rejections
        readings = verdict.readings
        if readings and device is not None and not self.buckets.take(device, time.monotonic()):
            if device.hard_block:
                rejections = [
                    *rejections,
                    Rejection(
                        "rate_limited",
                        f"over the plan's {device.messages_per_minute} messages per minute",
                        message.payload,
                    ),
                ]
                readings = []
            else:
                self.counters.overage += 1
                self.metrics.overage.inc()
        batch.mids.append(message.mid)
        batch.readings.extend((reading, received_at) for reading in readings)
        batch.dead_letters.extend(
            DeadLetter(
                received_at,
                message.topic,
                verdict.mac,
                device.tenant_id if device else None,
                device.device_id if device else None,
                rejection,
            )
            for rejection in rejections
        )

    def _flush(self, batch: Batch) -> None:
        """Commit the batch, retrying until the database takes it, then acknowledge it."""
        delay = 0.5
        started = time.perf_counter()
        while True:
            try:
                writer = self._writer or self._open_writer(raise_errors=True)
                result = writer.write(batch.readings, batch.dead_letters, now=datetime.now(UTC))
                break
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                # keep the batch, acknowledge nothing, and let the queue fill: backpressure
                self.metrics.database_connected.set(0)
                log.warning(
                    "database unavailable; retrying the batch",
                    extra={"error": str(exc)[:200], "retry_in_s": delay},
                )
                if self._writer is not None:
                    self._writer.conn.close()
                    self._writer = None
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        for mid in batch.mids:
            self._client.ack(mid, 1)
        self._observe(batch, result, time.perf_counter() - started)

    def _open_writer(self, *, raise_errors: bool = False) -> BatchWriter | None:
        try:
            self._writer = BatchWriter(
                open_connection(
                    self.config.database_url,
                    role="platform_rw",
                    application_name=f"iiot-ingest-{self.config.slot}",
                )
            )
        except (psycopg.OperationalError, DatabaseUnavailable):
            if raise_errors:
                raise
            return None  # not ready yet; the first batch retries
        self.metrics.database_connected.set(1)
        return self._writer

    def _observe(self, batch: Batch, result: BatchResult, seconds: float) -> None:
        """Count a committed batch, for the caller (counters) and for Prometheus (metrics)."""
        counters, metrics = self.counters, self.metrics
        counters.batches += 1
        counters.landed += result.landed
        counters.duplicates += result.duplicates
        counters.dead_letters += result.dead_letters
        metrics.flush_seconds.observe(seconds)
        metrics.batch_size.observe(len(batch))
        metrics.landed.inc(result.landed)
        metrics.duplicates.inc(result.duplicates)
        for letter in batch.dead_letters:
            metrics.dead_letters.labels(letter.rejection.reason).inc()
        if batch.readings:
            newest = max(reading.ts for reading, _ in batch.readings)
            metrics.lag_seconds.observe(max((datetime.now(UTC) - newest).total_seconds(), 0.0))
