"""Alerts of the caller's tenant: list and read (viewer), acknowledge (editor)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path, Query
from pydantic import BaseModel, Field

from iiot_orchestration.api.context import Editor, Session, Viewer
from iiot_orchestration.api.errors import keyed_router, not_found
from iiot_orchestration.api.pagination import Cursor, Limit, Page, decode, page

router = keyed_router("alerts")

MAX_BIGINT = 2**63 - 1
MAX_INTEGER = 2**31 - 1
AlertId = Annotated[int, Path(ge=1, le=MAX_BIGINT, description="An alert of the tenant.")]
Severity = Literal["INFO", "WARNING", "CRITICAL"]

ALERT_COLUMNS = (
    "a.alert_id, a.rule_id, a.device_id, d.mac::text AS device_mac, a.source, a.severity,"
    " a.state, a.title, a.detail, a.opened_at, a.last_seen_at, a.resolved_at,"
    " a.acknowledged_at, a.acknowledged_by"
)
# row security confines both tables to the tenant; the tenant_id clauses say it again and make
# a platform key name its tenant (Session.tenant)
ALERT_FROM = "alerts a LEFT JOIN devices d ON d.device_id = a.device_id"


class Alert(BaseModel):
    alert_id: int
    rule_id: int | None = Field(description="The threshold rule that opened it, if one did.")
    device_id: int | None
    device_mac: str | None
    source: str = Field(description="What opened it: threshold_rule, or a platform sensor.")
    severity: Severity
    state: Literal["open", "resolved"]
    title: str
    detail: dict[str, Any] = Field(description="What the condition saw (value, threshold, ...).")
    opened_at: datetime
    last_seen_at: datetime = Field(description="The last evaluation that found it holding.")
    resolved_at: datetime | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None = Field(description="`api-key:<key_id>` of the acknowledgement.")


def alert_row(s: Session, alert_id: int) -> dict[str, Any]:
    row = s.row(
        f"SELECT {ALERT_COLUMNS} FROM {ALERT_FROM} WHERE a.tenant_id = %s AND a.alert_id = %s",
        (s.tenant(), alert_id),
    )
    if row is None:
        raise not_found("alert")
    return row


@router.get("/alerts", response_model=Page[Alert], summary="The tenant's alerts, newest first")
def list_alerts(
    s: Viewer,
    limit: Limit = 100,
    cursor: Cursor = None,
    state: Literal["open", "resolved"] | None = None,
    severity: Severity | None = None,
    acknowledged: Annotated[
        bool | None, Query(description="true: acknowledged only; false: not yet.")
    ] = None,
    device_id: Annotated[int | None, Query(ge=1, le=MAX_INTEGER)] = None,
    rule_id: Annotated[int | None, Query(ge=1, le=MAX_BIGINT)] = None,
) -> dict:
    before = decode(cursor, int)
    rows = s.rows(
        f"SELECT {ALERT_COLUMNS} FROM {ALERT_FROM} WHERE a.tenant_id = %(tenant)s"
        "   AND (%(before)s::bigint IS NULL OR a.alert_id < %(before)s::bigint)"
        "   AND (%(state)s::text IS NULL OR a.state = %(state)s::text)"
        "   AND (%(severity)s::text IS NULL OR a.severity = %(severity)s::text)"
        "   AND (%(acknowledged)s::boolean IS NULL"
        "        OR (a.acknowledged_at IS NOT NULL) = %(acknowledged)s::boolean)"
        "   AND (%(device)s::integer IS NULL OR a.device_id = %(device)s::integer)"
        "   AND (%(rule)s::bigint IS NULL OR a.rule_id = %(rule)s::bigint)"
        " ORDER BY a.alert_id DESC LIMIT %(limit)s",
        {
            "tenant": s.tenant(),
            "before": before,
            "state": state,
            "severity": severity,
            "acknowledged": acknowledged,
            "device": device_id,
            "rule": rule_id,
            "limit": limit + 1,
        },
    )
    return page(rows, limit, "alert_id")


@router.get("/alerts/{alert_id}", response_model=Alert, summary="One alert")
def get_alert(s: Viewer, alert_id: AlertId) -> dict:
    return alert_row(s, alert_id)


@router.post(
    "/alerts/{alert_id}/acknowledge",
    response_model=Alert,
    summary="Acknowledge an alert (idempotent: again changes nothing)",
    description="Records the key and the time once; acknowledging again, or a resolved alert, "
    "answers the alert as it is. The alert stays open until its condition stops holding.",
)
def acknowledge_alert(s: Editor, alert_id: AlertId) -> dict:
    done = s.row(
        "UPDATE alerts SET acknowledged_at = now(), acknowledged_by = %s"
        " WHERE tenant_id = %s AND alert_id = %s AND acknowledged_at IS NULL"
        " RETURNING alert_id, state",
        (s.actor, s.tenant(), alert_id),
    )
    if done is not None:
        s.audit("alert.acknowledged", "alert", alert_id, state=done["state"])
    return alert_row(s, alert_id)
