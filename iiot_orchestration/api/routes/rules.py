"""Threshold rules of the caller's tenant: read (viewer), create, change and delete (admin).

Validation is the CLI's (``alerts.check_rule``, ``alerts.check_metric``), plus: the device is
one of the tenant's, and no other rule of the tenant already watches the same condition.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from iiot_orchestration import alerts
from iiot_orchestration.api.context import Admin, Session, Viewer
from iiot_orchestration.api.errors import ApiError, keyed_router, not_found
from iiot_orchestration.api.pagination import Cursor, Limit, Page, decode, page
from iiot_orchestration.api.routes.alerts import MAX_BIGINT, MAX_INTEGER, Severity

router = keyed_router("rules")

RuleId = Annotated[int, Path(ge=1, le=MAX_BIGINT, description="A threshold rule of the tenant.")]
Kind = Literal["above", "below", "rate_of_change", "no_data"]
METRIC_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
API_FIELDS = {"threshold": "threshold", "metric": "metric", "window": "window_minutes"}
# the columns a rule's condition depends on, by kind: two rules equal in these are duplicates
CONDITION = {
    "above": ("metric", "threshold"),
    "below": ("metric", "threshold"),
    "rate_of_change": ("metric", "threshold", "window_minutes"),
    "no_data": ("window_minutes",),
}
EDITABLE = ("name", "kind", "metric", "device_id", "threshold", "window_minutes", "severity")

RULE_COLUMNS = (
    "r.rule_id, r.name, r.kind, r.metric, r.device_id, d.mac::text AS device_mac, r.threshold,"
    " r.window_minutes, r.severity, r.enabled, r.created_by, r.created_at"
)
RULE_FROM = "alert_rules r LEFT JOIN devices d ON d.device_id = r.device_id"

Name = Annotated[str, Field(min_length=1, max_length=200, description="What the alert says.")]
Metric = Annotated[
    str,
    Field(pattern=METRIC_PATTERN, description="A metric of the catalog (all kinds but no_data)."),
]
DeviceId = Annotated[
    int, Field(ge=1, le=MAX_INTEGER, description="Only this device of the tenant; null: every one.")
]
Threshold = Annotated[
    float,
    Field(
        allow_inf_nan=False,
        description="Value (above, below) or change per hour (rate_of_change); null for no_data.",
    ),
]
Window = Annotated[
    int,
    Field(
        ge=1, le=10080, description="Minutes: silence for no_data, look-back for rate_of_change."
    ),
]


class Rule(BaseModel):
    rule_id: int
    name: str
    kind: Kind
    metric: str | None
    device_id: int | None
    device_mac: str | None
    threshold: float | None
    window_minutes: int
    severity: Severity
    enabled: bool
    created_by: str = Field(description="`api-key:<key_id>`, or who added it with the CLI.")
    created_at: datetime


class NewRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    kind: Kind
    metric: Metric | None = None
    device_id: DeviceId | None = None
    threshold: Threshold | None = None
    window_minutes: Window = 60
    severity: Severity = "WARNING"
    enabled: bool = True


class RuleChange(BaseModel):
    """Only the fields sent change; metric, device_id and threshold may be set to null."""

    model_config = ConfigDict(extra="forbid")

    # omitted fields stay None; an explicit null for these is refused by their type
    name: Name = None  # type: ignore[assignment]
    kind: Kind = None  # type: ignore[assignment]
    metric: Metric | None = None
    device_id: DeviceId | None = None
    threshold: Threshold | None = None
    window_minutes: Window = None  # type: ignore[assignment]
    severity: Severity = None  # type: ignore[assignment]
    enabled: bool = None  # type: ignore[assignment]


def _invalid(message: str, field: str | None) -> ApiError:
    details = [{"field": f"body.{field or 'rule'}", "problem": message, "type": "value_error"}]
    return ApiError(422, message, code="validation_error", details=details)


def _rule_row(s: Session, rule_id: int) -> dict[str, Any]:
    row = s.row(
        f"SELECT {RULE_COLUMNS} FROM {RULE_FROM} WHERE r.tenant_id = %s AND r.rule_id = %s",
        (s.tenant(), rule_id),
    )
    if row is None:
        raise not_found("rule")
    return row


def _checked(s: Session, rule: dict[str, Any], rule_id: int | None = None) -> dict[str, Any]:
    """``rule`` (the editable fields) validated, its name cleaned; 422 or 409 otherwise."""
    try:
        rule["name"] = alerts.check_rule(
            name=rule["name"],
            kind=rule["kind"],
            severity=rule["severity"],
            metric=rule["metric"],
            threshold=rule["threshold"],
            window_minutes=rule["window_minutes"],
            fields=API_FIELDS,
        )
        meter_kind = None
        if rule["device_id"] is not None:
            # another tenant's device is invisible here: the same answer as no device at all
            device = s.row(
                "SELECT meter_kind, status FROM devices WHERE tenant_id = %s AND device_id = %s",
                (s.tenant(), rule["device_id"]),
            )
            if device is None:
                raise alerts.RuleError(f"unknown device {rule['device_id']}", "device_id")
            if device["status"] == "decommissioned":
                raise alerts.RuleError(
                    f"device {rule['device_id']} is decommissioned: a rule on it never holds",
                    "device_id",
                )
            meter_kind = device["meter_kind"]
        if rule["metric"] is not None:
            alerts.check_metric(s.conn, rule["metric"], meter_kind)
    except alerts.RuleError as exc:
        raise _invalid(str(exc), exc.field) from None
    _refuse_duplicate(s, rule, rule_id)
    return rule


def _refuse_duplicate(s: Session, rule: dict[str, Any], rule_id: int | None) -> None:
    # rule writes of a tenant take turns, so that two identical requests cannot both pass
    s.conn.execute("SELECT pg_advisory_xact_lock(hashtext('iiot.alert_rules'), %s)", (s.tenant(),))
    same = " AND ".join(f"{c} IS NOT DISTINCT FROM %({c})s" for c in CONDITION[rule["kind"]])
    found = s.row(
        "SELECT rule_id FROM alert_rules WHERE tenant_id = %(tenant)s AND kind = %(kind)s"
        "   AND severity = %(severity)s AND device_id IS NOT DISTINCT FROM %(device_id)s"
        f"  AND {same} AND rule_id <> %(rule_id)s ORDER BY rule_id LIMIT 1",
        {**rule, "tenant": s.tenant(), "rule_id": rule_id or 0},
    )
    if found is not None:
        raise ApiError(
            409,
            f"rule {found['rule_id']} already watches this condition with this severity:"
            " change or enable that one",
            code="conflict",
            details={"rule_id": found["rule_id"]},
        )


@router.get("/rules", response_model=Page[Rule], summary="The tenant's threshold rules")
def list_rules(
    s: Viewer,
    limit: Limit = 100,
    cursor: Cursor = None,
    enabled: bool | None = None,
    kind: Kind | None = None,
    severity: Severity | None = None,
    metric: Annotated[str | None, Query(pattern=METRIC_PATTERN)] = None,
    device_id: Annotated[
        int | None, Query(ge=1, le=MAX_INTEGER, description="Rules on this device only.")
    ] = None,
) -> dict:
    after = decode(cursor, int)
    rows = s.rows(
        f"SELECT {RULE_COLUMNS} FROM {RULE_FROM} WHERE r.tenant_id = %(tenant)s"
        "   AND (%(after)s::bigint IS NULL OR r.rule_id > %(after)s::bigint)"
        "   AND (%(enabled)s::boolean IS NULL OR r.enabled = %(enabled)s::boolean)"
        "   AND (%(kind)s::text IS NULL OR r.kind = %(kind)s::text)"
        "   AND (%(severity)s::text IS NULL OR r.severity = %(severity)s::text)"
        "   AND (%(metric)s::text IS NULL OR r.metric = %(metric)s::text)"
        "   AND (%(device)s::integer IS NULL OR r.device_id = %(device)s::integer)"
        " ORDER BY r.rule_id LIMIT %(limit)s",
        {
            "tenant": s.tenant(),
            "after": after,
            "enabled": enabled,
            "kind": kind,
            "severity": severity,
            "metric": metric,
            "device": device_id,
            "limit": limit + 1,
        },
    )
    return page(rows, limit, "rule_id")


@router.get("/rules/{rule_id}", response_model=Rule, summary="One threshold rule")
def get_rule(s: Viewer, rule_id: RuleId) -> dict:
    return _rule_row(s, rule_id)


@router.post(
    "/rules",
    response_model=Rule,
    status_code=201,
    summary="A new threshold rule; the next evaluation (every five minutes) applies it",
    description="409 when another rule of the tenant already has the same device (or every "
    "device), kind, severity and the fields its kind uses (metric and threshold; the window "
    "too for rate_of_change; the window alone for no_data); its rule_id is in the details.",
)
def create_rule(s: Admin, body: NewRule) -> dict:
    rule = _checked(s, body.model_dump())
    created = s.row(
        "INSERT INTO alert_rules (tenant_id, device_id, metric, name, kind, threshold,"
        " window_minutes, severity, enabled, created_by)"
        " VALUES (%(tenant)s, %(device_id)s, %(metric)s, %(name)s, %(kind)s, %(threshold)s,"
        "         %(window_minutes)s, %(severity)s, %(enabled)s, %(actor)s) RETURNING rule_id",
        {**rule, "tenant": s.tenant(), "actor": s.actor},
    )
    assert created is not None
    s.audit("alert_rule.created", "alert_rule", created["rule_id"], **rule)
    return _rule_row(s, created["rule_id"])


@router.patch(
    "/rules/{rule_id}",
    response_model=Rule,
    summary="Change a rule (only the fields sent); enabled: false keeps it without evaluating it",
    description="The changed rule is validated whole, as a new one; a rule becoming a no_data "
    "rule needs `threshold: null`. Open alerts of a rule whose condition no longer holds "
    "resolve at the next evaluation.",
)
def change_rule(s: Admin, rule_id: RuleId, body: RuleChange) -> dict:
    old = _rule_row(s, rule_id)
    sent = body.model_dump(exclude_unset=True)
    new = {k: sent.get(k, old[k]) for k in (*EDITABLE, "enabled")}
    if set(sent) & set(EDITABLE):
        new.update(_checked(s, {k: new[k] for k in EDITABLE}, rule_id))
    changed = {k: [old[k], new[k]] for k in new if new[k] != old[k]}
    if not changed:
        return old
    s.conn.execute(
        "UPDATE alert_rules SET name = %(name)s, kind = %(kind)s, metric = %(metric)s,"
        " device_id = %(device_id)s, threshold = %(threshold)s,"
        " window_minutes = %(window_minutes)s, severity = %(severity)s, enabled = %(enabled)s"
        " WHERE tenant_id = %(tenant)s AND rule_id = %(rule_id)s",
        {**new, "tenant": s.tenant(), "rule_id": rule_id},
    )
    s.audit("alert_rule.changed", "alert_rule", rule_id, changed=changed)
    return _rule_row(s, rule_id)


@router.delete(
    "/rules/{rule_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a rule; its alerts stay, as history, and its open ones resolve",
)
def delete_rule(s: Admin, rule_id: RuleId) -> Response:
    old = _rule_row(s, rule_id)
    s.conn.execute(
        "DELETE FROM alert_rules WHERE tenant_id = %s AND rule_id = %s", (s.tenant(), rule_id)
    )
    rule = {k: old[k] for k in (*EDITABLE, "enabled")}
    s.audit("alert_rule.deleted", "alert_rule", rule_id, **rule)
    return Response(status_code=204)
