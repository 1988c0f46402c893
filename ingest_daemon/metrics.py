"""Prometheus metrics and health endpoints of one ingest process."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# why a batch write failed and was tried again (ingest_daemon.writer.retry_reason)
RETRY_REASONS = ("connection", "serialization", "other")


class IngestMetrics:
    """One registry per daemon, so that several daemons in one process (tests) stay apart."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "iiot_ingest_messages_received", "MQTT messages received", registry=r
        )
        self.landed = Counter("iiot_ingest_readings_landed", "Readings committed", registry=r)
        self.duplicates = Counter(
            "iiot_ingest_readings_duplicate", "Re-delivered readings skipped", registry=r
        )
        self.dead_letters = Counter(
            "iiot_ingest_dead_letters", "Dead letters by reason", ["reason"], registry=r
        )
        self.overage = Counter(
            "iiot_ingest_overage_messages", "Messages over an enterprise plan's rate", registry=r
        )
        self.unknown_device_throttled = Counter(
            "iiot_ingest_unknown_device_throttled",
            "Messages of unknown devices counted, not stored (over the throttle)",
            registry=r,
        )
        self.batch_size = Histogram(
            "iiot_ingest_batch_messages",
            "Messages in a committed batch",
            buckets=(1, 10, 50, 100, 500, 1000, 5000, 20000),
            registry=r,
        )
        self.batches_retried = Counter(
            "iiot_ingest_batches_retried",
            "Batches written again after a failed write, by the class of the first failure",
            ["reason"],
            registry=r,
        )
        for reason in RETRY_REASONS:  # every series from the start: increase() sees the first
            self.batches_retried.labels(reason)
        self.flush_seconds = Histogram(
            "iiot_ingest_flush_seconds", "Time to commit a batch", registry=r
        )
        self.lag_seconds = Histogram(
            "iiot_ingest_lag_seconds",
            "Reading timestamp to commit, newest reading of a batch",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
            registry=r,
        )
        self.queue_depth = Gauge(
            "iiot_ingest_queue_messages", "Messages waiting to be batched", registry=r
        )
        self.broker_connected = Gauge(
            "iiot_ingest_broker_connected", "1 when subscribed", registry=r
        )
        self.database_connected = Gauge(
            "iiot_ingest_database_connected", "0 while batches cannot be committed", registry=r
        )
        self.broker_losses = Counter(
            "iiot_ingest_broker_connection_lost", "Connections to the broker lost", registry=r
        )
        self.database_losses = Counter(
            "iiot_ingest_database_connection_lost",
            "Times the database stopped taking batches",
            registry=r,
        )


def serve(
    metrics: IngestMetrics, port: int, ready: Callable[[], bool], host: str = "127.0.0.1"
) -> ThreadingHTTPServer:
    """``/metrics``, ``/health/live`` and ``/health/ready`` on a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._answer(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif self.path == "/health/live":
                self._answer(200, b"live\n")
            elif self.path == "/health/ready":
                ok = ready()
                self._answer(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._answer(404, b"not found\n")

        def _answer(self, status: int, body: bytes, kind: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass  # scrapes every few seconds would flood the log

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="ingest-metrics", daemon=True).start()
    return server
