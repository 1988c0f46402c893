"""Quota notices as alerts: each ``quota_notice`` billing event (80 % and 100 % of a plan's
included devices, messages and storage, docs/billing.md) goes out once through the notifier of
every other alert (iiot_orchestration/alerts.py); a delivery that failed is tried again on the
next run."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

import psycopg

from iiot_orchestration import alerts
from iiot_orchestration.billing import GIB

_PENDING = """
SELECT e.tenant_id, t.slug, e.period, e.detail, k.alert_key
  FROM billing_events e
  JOIN tenants t ON t.tenant_id = e.tenant_id
 CROSS JOIN LATERAL (SELECT concat_ws(':', 'billing', 'quota', t.slug, to_char(e.period, 'YYYY-MM'),
                                      e.detail ->> 'quota', e.detail ->> 'threshold')
                              AS alert_key) k
 WHERE e.kind = 'quota_notice' AND e.tenant_id = ANY(%s)
   AND NOT EXISTS (SELECT FROM alert_deliveries d
                    WHERE d.alert_key = k.alert_key AND d.status = 'sent')
 ORDER BY e.event_id
"""


def _amount(quota: str, value: int) -> str:
    if quota == "storage":
        return f"{Decimal(value) / Decimal(GIB):,.2f} GiB"
    return f"{value:,} {quota}"


def quota_alert(tenant_id: int, slug: str, key: str, period, detail: dict) -> alerts.Alert:
    """The alert of one quota notice: a warning at 80 %, critical at 100 %."""
    quota = detail["quota"]
    return alerts.Alert(
        key=key,
        severity="CRITICAL" if detail["threshold"] >= 100 else "WARNING",
        title=(
            f"{slug}: {quota} at {detail['percent']}% of the {detail['plan']} plan's "
            f"{_amount(quota, detail['included'])} ({_amount(quota, detail['used'])}, period "
            f"{period:%Y-%m})"
        ),
        source="billing",
        tenant_id=tenant_id,
        detail=detail,
    )


def send_quota_notices(
    conn: psycopg.Connection, notifier: alerts.Notifier, tenant_ids: Iterable[int]
) -> list[alerts.Alert]:
    """Open an alert and notify for every quota notice of these tenants not delivered yet."""
    sent = []
    for tenant_id, slug, period, detail, key in conn.execute(
        _PENDING, (sorted(set(tenant_ids)),)
    ).fetchall():
        alert = quota_alert(tenant_id, slug, key, period, detail)
        alerts.report(conn, notifier, alert)
        sent.append(alert)
    return sent
