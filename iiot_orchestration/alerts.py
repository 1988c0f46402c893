"""Alerts: one notifier for every sensor and check, and threshold rules on telemetry.

- ``Notifier`` delivers an alert to a generic JSON webhook (``IIOT_ALERT_WEBHOOK_URL``) and/or a
  Telegram-compatible bot API (``IIOT_TELEGRAM_BOT_TOKEN`` + ``IIOT_TELEGRAM_CHAT_ID``), with
  retries and backoff, and never sends the same alert key twice within the dedup window
  (``IIOT_ALERT_DEDUP_MINUTES``). Without configuration alerts go to the log.
- ``raise_alert`` / ``resolve_alert`` keep at most one open alert per key in ``alerts``.
- ``evaluate_rules`` turns the rules in ``alert_rules`` into open and resolved alerts over the
  latest rollups (docs/alerts.md).
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg.types.json import Jsonb

from iiot_orchestration.errors import IiotError

log = logging.getLogger(__name__)

SEVERITIES = ("INFO", "WARNING", "CRITICAL")
RULE_KINDS = ("above", "below", "rate_of_change", "no_data")
DISPLAY_TIMEZONE = "America/Sao_Paulo"
ICONS = {"INFO": "ℹ️", "WARNING": "⚠️", "CRITICAL": "🚨"}  # noqa: RUF001


class AlertError(IiotError):
    """A bad rule or alert request."""


@dataclass(frozen=True)
class Alert:
    key: str  # identity for dedup and open/resolve, e.g. "rule:12:device:7"
    severity: str
    title: str
    source: str
    tenant_id: int | None = None
    device_id: int | None = None
    rule_id: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise AlertError(f"unknown severity {self.severity!r}: one of {', '.join(SEVERITIES)}")

    def payload(self) -> dict[str, Any]:
        """The generic webhook body (docs/alerts.md)."""
        return {
            "key": self.key,
            "severity": self.severity,
            "title": self.title,
            "source": self.source,
            "tenant_id": self.tenant_id,
            "device_id": self.device_id,
            "rule_id": self.rule_id,
            "detail": self.detail,
            "at": self.at.astimezone(UTC).isoformat(),
            "at_local": self.local_time(),
        }

    def local_time(self) -> str:
        local = self.at.astimezone(ZoneInfo(DISPLAY_TIMEZONE))
        return local.strftime(f"%Y-%m-%d %H:%M:%S ({DISPLAY_TIMEZONE})")

    def telegram_text(self) -> str:
        """The Telegram message: severity, title, details, time in America/Sao_Paulo."""
        lines = [f"{ICONS[self.severity]} [{self.severity}] {self.title}"]
        lines += [f"{k}: {v}" for k, v in sorted(self.detail.items())]
        lines.append(self.local_time())
        return "\n".join(lines)[:4000]


@dataclass(frozen=True)
class Delivery:
    channel: str
    status: str  # sent, failed, suppressed
    attempts: int
    error: str | None = None


Post = Callable[[str, bytes, float], int]


def _post(url: str, body: bytes, timeout: float) -> int:
    request = urllib.request.Request(  # noqa: S310 - the URL is the operator's configuration
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return response.status


class Notifier:
    """Deliver alerts with retries and deduplication; a database connection records
    deliveries (``alert_deliveries``), which is what makes dedup survive restarts."""

    def __init__(
        self,
        *,
        webhook_url: str | None = None,
        telegram_token: str | None = None,
        telegram_chat_id: str | None = None,
        telegram_api_url: str = "https://api.telegram.org",
        dedup_minutes: int = 30,
        attempts: int = 3,
        backoff_s: float = 0.5,
        timeout_s: float = 10.0,
        post: Post = _post,
    ) -> None:
        self.webhook_url = webhook_url
        self.telegram = (telegram_token, telegram_chat_id) if telegram_token else None
        self.telegram_api_url = telegram_api_url.rstrip("/")
        self.dedup = timedelta(minutes=dedup_minutes)
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.post = post

    @classmethod
    def from_settings(cls, settings: Any) -> Notifier:
        return cls(
            webhook_url=settings.alert_webhook_url,
            telegram_token=settings.telegram_bot_token,
            telegram_chat_id=settings.telegram_chat_id,
            telegram_api_url=settings.telegram_api_url,
            dedup_minutes=settings.alert_dedup_minutes,
        )

    def _recently_sent(self, conn: psycopg.Connection, alert: Alert) -> bool:
        return bool(
            conn.execute(
                "SELECT 1 FROM alert_deliveries WHERE alert_key = %s AND status = 'sent'"
                " AND sent_at > %s LIMIT 1",
                (alert.key, alert.at - self.dedup),
            ).fetchone()
        )

    def _send(self, url: str, body: dict[str, Any]) -> tuple[int, str | None]:
        data = json.dumps(body, default=str).encode()
        error = None
        for attempt in range(1, self.attempts + 1):
            try:
                status = self.post(url, data, self.timeout_s)
                if 200 <= status < 300:
                    return attempt, None
                error = f"HTTP {status}"
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                error = str(getattr(exc, "reason", exc))[:300]
            if attempt < self.attempts:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        return self.attempts, error

    def deliver(self, alert: Alert) -> list[Delivery]:
        """Send to every configured channel (the log when none is), with retries but without
        deduplication or a record: ``notify`` adds both, this alone serves when the database is
        what is down."""
        deliveries = []
        if self.webhook_url:
            attempts, error = self._send(self.webhook_url, alert.payload())
            deliveries.append(Delivery("webhook", "failed" if error else "sent", attempts, error))
        if self.telegram:
            token, chat = self.telegram
            url = f"{self.telegram_api_url}/bot{token}/sendMessage"
            body = {"chat_id": chat, "text": alert.telegram_text()}
            attempts, error = self._send(url, body)
            deliveries.append(Delivery("telegram", "failed" if error else "sent", attempts, error))
        if not deliveries:
            log.warning("alert [%s] %s %s", alert.severity, alert.title, alert.detail)
            deliveries.append(Delivery("log", "sent", 1))
        return deliveries

    def notify(self, conn: psycopg.Connection, alert: Alert) -> list[Delivery]:
        if self._recently_sent(conn, alert):
            deliveries = [Delivery("log", "suppressed", 0)]
        else:
            deliveries = self.deliver(alert)
        for d in deliveries:
            conn.execute(
                "INSERT INTO alert_deliveries (alert_key, channel, status, attempts, error,"
                " sent_at) VALUES (%s, %s, %s, %s, %s, %s)",
                (alert.key, d.channel, d.status, d.attempts, d.error, alert.at),
            )
            if d.status == "failed":
                log.error("alert delivery to %s failed: %s", d.channel, d.error)
        return deliveries


def raise_alert(conn: psycopg.Connection, alert: Alert) -> bool:
    """Open the alert, or refresh the open one with the same key; True when newly opened."""
    row = conn.execute(
        "INSERT INTO alerts (tenant_id, rule_id, device_id, source, alert_key, severity, title,"
        " detail, opened_at, last_seen_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (alert_key) WHERE state = 'open' DO UPDATE"
        " SET last_seen_at = excluded.last_seen_at, detail = excluded.detail,"
        "     severity = excluded.severity"
        " RETURNING (xmax = 0)",
        (
            alert.tenant_id,
            alert.rule_id,
            alert.device_id,
            alert.source,
            alert.key,
            alert.severity,
            alert.title,
            Jsonb(alert.detail),
            alert.at,
            alert.at,
        ),
    ).fetchone()
    return bool(row[0])


def resolve_alert(conn: psycopg.Connection, key: str, at: datetime | None = None) -> bool:
    row = conn.execute(
        "UPDATE alerts SET state = 'resolved', resolved_at = %s"
        " WHERE alert_key = %s AND state = 'open' RETURNING alert_id",
        (at or datetime.now(UTC), key),
    ).fetchone()
    return row is not None


def report(conn: psycopg.Connection, notifier: Notifier, alert: Alert) -> list[Delivery]:
    """Open (or refresh) an alert and notify when it is new or the dedup window has passed."""
    raise_alert(conn, alert)
    return notifier.notify(conn, alert)


# ---------------------------------------------------------------------------------------------
# Threshold rules


@dataclass(frozen=True)
class Rule:
    rule_id: int
    tenant_id: int
    device_id: int | None
    metric: str | None
    name: str
    kind: str
    threshold: float | None
    window_minutes: int
    severity: str


CLI_FIELDS = {"threshold": "--threshold", "metric": "--metric", "window": "--window"}


class RuleError(AlertError):
    """A bad rule; ``field`` names the part at fault (None for the rule as a whole)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def check_rule(
    *,
    name: str,
    kind: str,
    severity: str,
    metric: str | None,
    threshold: float | None,
    window_minutes: int,
    fields: dict[str, str] = CLI_FIELDS,
) -> str:
    """The rule's name, cleaned as every display name is, when its fields and their combination
    are valid; else RuleError. ``fields`` spells threshold, metric and window as the caller's
    users know them (CLI options, API fields)."""
    import math

    from iiot_orchestration.registry import RegistryError, clean_name

    if kind not in RULE_KINDS:
        raise RuleError(f"unknown rule kind {kind[:30]!r}: one of {', '.join(RULE_KINDS)}", "kind")
    if severity not in SEVERITIES:
        raise RuleError(
            f"unknown severity {severity[:30]!r}: one of {', '.join(SEVERITIES)}", "severity"
        )
    if not name.strip() or len(name.strip()) > 200:
        raise RuleError("a rule needs a name of 1 to 200 characters", "name")
    try:
        name = clean_name(name, what="the rule's name", limit=200)
    except RegistryError as exc:
        raise RuleError(str(exc), "name") from None
    if kind == "no_data":
        if threshold is not None:
            raise RuleError(
                f"a no_data rule has no threshold: it uses {fields['window']} minutes", "threshold"
            )
    else:
        if threshold is None or not math.isfinite(threshold):
            raise RuleError(f"a {kind} rule needs a finite {fields['threshold']}", "threshold")
        if metric is None:
            raise RuleError(f"a {kind} rule needs a {fields['metric']}", "metric")
    if not 1 <= window_minutes <= 10080:
        raise RuleError("the window must be 1 to 10080 minutes", "window_minutes")
    return name


def check_metric(conn: psycopg.Connection, metric: str, meter_kind: str | None = None) -> None:
    """The metric is in the catalog and, for a rule on one device, fits its ``meter_kind``."""
    found = conn.execute("SELECT meter_kind FROM metric_catalog WHERE metric = %s", (metric,))
    row = found.fetchone()
    if row is None:
        raise RuleError(f"unknown metric {metric[:40]!r}: see the metric catalog", "metric")
    if meter_kind is not None and row[0] not in (None, meter_kind):
        raise RuleError(
            f"metric {metric} is for {row[0]} meters, not {meter_kind} meters like the device",
            "metric",
        )


def add_rule(
    conn: psycopg.Connection,
    *,
    tenant: str,
    name: str,
    kind: str,
    severity: str,
    metric: str | None = None,
    device_mac: str | None = None,
    threshold: float | None = None,
    window_minutes: int = 60,
    actor: str = "cli",
) -> int:
    """Validate and store a rule; clear errors for every bad combination."""
    from iiot_orchestration.registry import RegistryError, normalise_mac

    name = check_rule(
        name=name,
        kind=kind,
        severity=severity,
        metric=metric,
        threshold=threshold,
        window_minutes=window_minutes,
    )
    row = conn.execute("SELECT tenant_id FROM tenants WHERE slug = %s", (tenant,)).fetchone()
    if row is None:
        raise AlertError(f"unknown tenant {tenant[:70]!r}")
    tenant_id = row[0]
    device_id = meter_kind = None
    if device_mac is not None:
        try:
            mac = normalise_mac(device_mac)
        except RegistryError as exc:
            raise AlertError(str(exc)) from None
        found = conn.execute(
            "SELECT device_id, meter_kind FROM devices WHERE mac = %s AND tenant_id = %s",
            (mac, tenant_id),
        ).fetchone()
        if found is None:
            raise AlertError(f"no device {mac} in tenant {tenant}")
        device_id, meter_kind = found
    if metric is not None:
        check_metric(conn, metric, meter_kind)
    return conn.execute(
        "INSERT INTO alert_rules (tenant_id, device_id, metric, name, kind, threshold,"
        " window_minutes, severity, created_by) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " RETURNING rule_id",
        (tenant_id, device_id, metric, name, kind, threshold, window_minutes, severity, actor),
    ).fetchone()[0]


def rules(conn: psycopg.Connection, tenant_id: int | None = None) -> list[Rule]:
    rows = conn.execute(
        "SELECT rule_id, tenant_id, device_id, metric, name, kind, threshold, window_minutes,"
        " severity FROM alert_rules WHERE enabled AND (%s::int IS NULL OR tenant_id = %s)"
        " ORDER BY rule_id",
        (tenant_id, tenant_id),
    ).fetchall()
    return [Rule(*row) for row in rows]


_LATEST = """
SELECT DISTINCT ON (h.device_id) h.device_id, d.mac::text, h.bucket, h.last_ts, h.last_value,
       (SELECT p.last_value FROM telemetry_hourly p
         WHERE p.tenant_id = h.tenant_id AND p.device_id = h.device_id AND p.metric = h.metric
           AND p.bucket <= h.bucket - make_interval(mins => %(window)s)
         ORDER BY p.bucket DESC LIMIT 1) AS earlier_value,
       (SELECT p.last_ts FROM telemetry_hourly p
         WHERE p.tenant_id = h.tenant_id AND p.device_id = h.device_id AND p.metric = h.metric
           AND p.bucket <= h.bucket - make_interval(mins => %(window)s)
         ORDER BY p.bucket DESC LIMIT 1) AS earlier_ts
  FROM telemetry_hourly h JOIN devices d USING (device_id)
 WHERE h.tenant_id = %(tenant)s AND h.metric = %(metric)s
   AND (%(device)s::int IS NULL OR h.device_id = %(device)s)
   AND h.bucket >= %(now)s - interval '2 days' AND d.status = 'active'
 ORDER BY h.device_id, h.bucket DESC
"""

_SILENT = """
SELECT d.device_id, d.mac::text, d.last_seen FROM devices d
 WHERE d.tenant_id = %(tenant)s AND d.status = 'active'
   AND (%(device)s::int IS NULL OR d.device_id = %(device)s)
"""


@dataclass(frozen=True)
class Evaluation:
    opened: list[Alert]
    still_open: int
    resolved: int


def _rule_alerts(conn: psycopg.Connection, rule: Rule, now: datetime) -> dict[str, Alert]:
    """The alerts a rule's condition holds for now, by key."""
    found: dict[str, Alert] = {}
    params = {
        "tenant": rule.tenant_id,
        "metric": rule.metric,
        "device": rule.device_id,
        "window": rule.window_minutes,
        "now": now,
    }

    def alert(device_id: int, mac: str, detail: dict[str, Any]) -> None:
        key = f"rule:{rule.rule_id}:device:{device_id}"
        found[key] = Alert(
            key=key,
            severity=rule.severity,
            title=f"{rule.name}: {mac}",
            source="threshold_rule",
            tenant_id=rule.tenant_id,
            device_id=device_id,
            rule_id=rule.rule_id,
            detail={"rule": rule.kind, "metric": rule.metric, **detail},
            at=now,
        )

    if rule.kind == "no_data":
        limit = now - timedelta(minutes=rule.window_minutes)
        for device_id, mac, last_seen in conn.execute(_SILENT, params):
            if last_seen is None or last_seen < limit:
                alert(
                    device_id,
                    mac,
                    {
                        "last_seen": last_seen and last_seen.isoformat(),
                        "window_minutes": rule.window_minutes,
                    },
                )
        return found
    for device_id, mac, _bucket, last_ts, value, earlier, earlier_ts in conn.execute(
        _LATEST, params
    ):
        crossed = value > rule.threshold if rule.kind == "above" else value < rule.threshold
        if rule.kind in ("above", "below") and crossed:
            alert(
                device_id,
                mac,
                {"value": value, "threshold": rule.threshold, "at": last_ts.isoformat()},
            )
        elif rule.kind == "rate_of_change" and earlier is not None and last_ts > earlier_ts:
            hours = (last_ts - earlier_ts).total_seconds() / 3600
            rate = (value - earlier) / hours
            if abs(rate) > rule.threshold:
                alert(
                    device_id,
                    mac,
                    {
                        "rate_per_hour": round(rate, 6),
                        "threshold": rule.threshold,
                        "from": earlier,
                        "to": value,
                    },
                )
    return found


def evaluate_rules(
    conn: psycopg.Connection,
    notifier: Notifier | None = None,
    now: datetime | None = None,
) -> Evaluation:
    """Open an alert for every (rule, device) whose condition holds, resolve the open ones whose
    condition no longer holds (or whose rule was disabled or deleted), notify new ones."""
    now = now or datetime.now(UTC)
    holding: dict[str, Alert] = {}
    for rule in rules(conn):
        holding.update(_rule_alerts(conn, rule, now))
    opened = []
    for alert in holding.values():
        if raise_alert(conn, alert):
            opened.append(alert)
            if notifier is not None:
                notifier.notify(conn, alert)
    resolved = 0
    for (key,) in conn.execute(
        "SELECT alert_key FROM alerts WHERE state = 'open' AND source = 'threshold_rule'"
    ).fetchall():
        if key not in holding:
            resolved += resolve_alert(conn, key, now)
    return Evaluation(opened, len(holding) - len(opened), resolved)


def list_alerts(conn: psycopg.Connection, tenant: str, state: str = "open") -> list[dict[str, Any]]:
    if state not in ("open", "resolved", "all"):
        raise AlertError(f"unknown state {state!r}: open, resolved or all")
    rows = conn.execute(
        "SELECT a.alert_id, a.severity, a.state, a.title, a.source, a.opened_at, a.resolved_at,"
        "       a.detail FROM alerts a JOIN tenants t USING (tenant_id)"
        " WHERE t.slug = %s AND (%s = 'all' OR a.state = %s) ORDER BY a.opened_at DESC",
        (tenant, state, state),
    ).fetchall()
    keys = ("id", "severity", "state", "title", "source", "opened_at", "resolved_at", "detail")
    return [dict(zip(keys, row, strict=True)) for row in rows]
