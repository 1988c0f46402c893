"""Alertmanager's webhook into the platform's notifier: ``iiot alert-webhook`` (docs/alerts.md).

Alertmanager POSTs groups of Prometheus alerts (webhook payload version 4). Each firing alert
opens (or refreshes) an alert in ``alerts`` with source ``prometheus`` and goes through
``Notifier.notify``, so the generic webhook and Telegram get it in their usual format and the
delivery log deduplicates the repeats Alertmanager sends; a resolved one resolves it and sends
one "Resolved" message. When the database is what is down, alerts are still delivered
(``Notifier.deliver``), deduplicated in memory.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg

from iiot_orchestration import alerts
from iiot_orchestration.db import DatabaseUnavailable, connect

log = logging.getLogger(__name__)

PATH = "/alertmanager"
MAX_BODY_BYTES = 1 << 20  # Alertmanager's max_alerts (100 in ops/) keeps real groups far below
MAX_ALERTS = 1000
MAX_TEXT = 2000
SOURCE = "prometheus"
SEVERITY = {"critical": "CRITICAL", "warning": "WARNING", "info": "INFO"}
_FINGERPRINT = re.compile(r"^[0-9a-f]{1,32}$")


class PayloadError(alerts.AlertError):
    """A body that is not an Alertmanager webhook payload; answered 400."""


@dataclass(frozen=True)
class Received:
    status: str  # firing or resolved
    alert: alerts.Alert


@dataclass
class Outcome:
    firing: int = 0
    resolved: int = 0
    deliveries: list[alerts.Delivery] = field(default_factory=list)
    database: bool = True  # False: the database was unavailable, delivered without it

    @property
    def failed(self) -> bool:
        """Something failed and nothing was sent: Alertmanager should retry."""
        return any(d.status == "failed" for d in self.deliveries) and not any(
            d.status == "sent" for d in self.deliveries
        )

    def summary(self) -> dict[str, Any]:
        statuses: dict[str, int] = {}
        for d in self.deliveries:
            statuses[d.status] = statuses.get(d.status, 0) + 1
        return {
            "firing": self.firing,
            "resolved": self.resolved,
            "deliveries": statuses,
            "database": self.database,
        }


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise PayloadError(f"{what} must be a string")
    return value[:MAX_TEXT]


def _strings(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PayloadError(f"{what} must be an object")
    return {_text(k, f"a key of {what}"): _text(v, f"{what}.{k}") for k, v in value.items()}


def _absolute(url: str, base: str | None) -> str:
    if base and url and "://" not in url:
        return f"{base.rstrip('/')}/{url.lstrip('/')}"
    return url


def parse_payload(
    body: bytes, *, now: datetime | None = None, runbook_base: str | None = None
) -> list[Received]:
    """The alerts of one webhook body, one per alert key (a repeated alert counts once)."""
    now = now or datetime.now(UTC)
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"not JSON: {exc}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
        raise PayloadError("not an Alertmanager payload: no list of alerts")
    if len(payload["alerts"]) > MAX_ALERTS:
        raise PayloadError(f"{len(payload['alerts'])} alerts in one payload: at most {MAX_ALERTS}")
    found: dict[str, Received] = {}
    for n, item in enumerate(payload["alerts"]):
        if not isinstance(item, dict):
            raise PayloadError(f"alert {n} is not an object")
        status = item.get("status")
        if status not in ("firing", "resolved"):
            raise PayloadError(f"alert {n}: status must be firing or resolved")
        labels = _strings(item.get("labels"), f"alert {n}: labels")
        annotations = _strings(item.get("annotations"), f"alert {n}: annotations")
        name = labels.get("alertname", "")
        if not name:
            raise PayloadError(f"alert {n} has no alertname label")
        fingerprint = item.get("fingerprint")
        if not (isinstance(fingerprint, str) and _FINGERPRINT.match(fingerprint)):
            identity = json.dumps(sorted(labels.items())).encode()
            fingerprint = hashlib.sha256(identity).hexdigest()[:16]
        key = f"{SOURCE}:{name[:100]}:{fingerprint}"
        detail = {
            "alert": name,
            **{k: v for k, v in sorted(labels.items()) if k not in ("alertname", "severity")},
        }
        if annotations.get("description"):
            detail["description"] = annotations["description"]
        if annotations.get("runbook_url"):
            detail["runbook"] = _absolute(annotations["runbook_url"], runbook_base)
        if isinstance(item.get("startsAt"), str):
            detail["since"] = item["startsAt"][:40]
        alert = alerts.Alert(
            key=key,
            severity=SEVERITY.get(labels.get("severity", "").lower(), "WARNING"),
            title=annotations.get("summary") or name,
            source=SOURCE,
            detail=detail,
            at=now,
        )
        found[key] = Received(status, alert)
    return list(found.values())


def resolution(alert: alerts.Alert) -> alerts.Alert:
    """The one message that says an alert cleared (its own key, so dedup does not eat it)."""
    return alerts.Alert(
        key=f"{alert.key}:resolved",
        severity="INFO",
        title=f"Resolved: {alert.title}",
        source=alert.source,
        detail=alert.detail,
        at=alert.at,
    )


class AlertmanagerReceiver:
    """Turns received alerts into the notifier's deliveries; ``handle`` is the whole logic,
    ``serve`` puts it behind HTTP."""

    def __init__(
        self,
        notifier: alerts.Notifier,
        database_url: str | None,
        *,
        runbook_base: str | None = None,
        token: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.notifier = notifier
        self.database_url = database_url
        self.runbook_base = runbook_base
        self.token = token
        self.max_body_bytes = max_body_bytes
        self._lock = threading.Lock()
        self._sent: dict[str, datetime] = {}  # without the database: key -> last delivery
        self._open: set[str] = set()  # without the database: firing keys seen

    def handle(self, received: list[Received]) -> Outcome:
        outcome = Outcome(
            firing=sum(r.status == "firing" for r in received),
            resolved=sum(r.status == "resolved" for r in received),
        )
        if self.database_url is not None:
            try:
                with connect(
                    self.database_url, application_name="iiot-alert-webhook", connect_timeout=5
                ) as conn:
                    for r in received:
                        outcome.deliveries += self._with_database(conn, r)
                return outcome
            except (DatabaseUnavailable, psycopg.OperationalError) as exc:
                log.error(
                    "alert webhook: database unavailable, delivering without it",
                    extra={"error": str(exc)[:200]},
                )
                outcome.deliveries = []
        outcome.database = False
        with self._lock:
            for r in received:
                outcome.deliveries += self._in_memory(r)
        return outcome

    def _with_database(self, conn: psycopg.Connection, r: Received) -> list[alerts.Delivery]:
        if r.status == "firing":
            return alerts.report(conn, self.notifier, r.alert)
        if alerts.resolve_alert(conn, r.alert.key, r.alert.at):
            return self.notifier.notify(conn, resolution(r.alert))
        return []  # a resolution received again, or of an alert never received firing

    def _in_memory(self, r: Received) -> list[alerts.Delivery]:
        alert = r.alert
        if r.status == "resolved":
            if alert.key not in self._open:
                return []
            self._open.discard(alert.key)
            alert = resolution(alert)
        else:
            self._open.add(alert.key)
        last = self._sent.get(alert.key)
        if last is not None and alert.at - last < self.notifier.dedup:
            return [alerts.Delivery("log", "suppressed", 0)]
        deliveries = self.notifier.deliver(alert)
        if any(d.status == "sent" for d in deliveries):
            self._sent[alert.key] = alert.at
        horizon = alert.at - max(self.notifier.dedup, timedelta(days=1))
        self._sent = {k: t for k, t in self._sent.items() if t > horizon}
        return deliveries

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        expected = f"Bearer {self.token}".encode()
        return hmac.compare_digest((header or "").encode(), expected)

    def serve(self, host: str, port: int) -> ThreadingHTTPServer:
        """``POST /alertmanager`` and ``GET /health`` on a daemon thread."""
        server = ThreadingHTTPServer((host, port), _handler(self))
        threading.Thread(target=server.serve_forever, name="alert-webhook", daemon=True).start()
        return server


def _handler(receiver: AlertmanagerReceiver) -> Callable[..., BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/health":
                self._answer(200, {"status": "live"})
            else:
                self._answer(404, {"error": "not found"})

        def do_POST(self) -> None:
            if self.path != PATH:
                self._answer(404, {"error": f"not found: POST to {PATH}"})
                return
            if not receiver.authorized(self.headers.get("Authorization")):
                self._answer(401, {"error": "missing or wrong bearer token"})
                return
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self._answer(411, {"error": "a Content-Length is required"})
                return
            if int(length) > receiver.max_body_bytes:
                self.close_connection = True  # answered before the body, which is not read
                self._answer(413, {"error": f"body over {receiver.max_body_bytes} bytes"})
                return
            try:
                received = parse_payload(
                    self.rfile.read(int(length)), runbook_base=receiver.runbook_base
                )
            except PayloadError as exc:
                log.warning("alert webhook: refused a payload", extra={"error": str(exc)})
                self._answer(400, {"error": str(exc)})
                return
            outcome = receiver.handle(received)
            self._answer(502 if outcome.failed else 200, outcome.summary())

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_args: object) -> None:
            pass  # outcomes are logged by the notifier

    return Handler
