"""Device provisioning for a tenant API request (app_rw, under row security).

The rules are the registry's (``registry.provision_devices``: validation, metrics from the
catalog, same MAC and kind skipped, plan quotas with their audit rows and billing events), with
two differences a tenant session needs: the tenant's row is locked through
``iiot_api_lock_tenant()`` (app_rw may not ``SELECT ... FOR UPDATE`` on tenants), and a MAC
already registered elsewhere gets the same answer whoever holds it, so that a tenant cannot
learn which MACs other tenants own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

from iiot_orchestration import registry
from iiot_orchestration.db import query
from iiot_orchestration.registry import DeviceRequest, ProvisionResult, RegistryError

DUPLICATE = "duplicate MAC: already registered"
INVALID, QUOTA = "invalid", "quota"

_OWNER = """
SELECT t.status, p.plan_id, p.included_devices, p.hard_block, t.storage_blocked_at,
       (SELECT count(*) FROM devices d
         WHERE d.tenant_id = t.tenant_id AND d.status <> 'decommissioned') AS device_count
  FROM tenants t
  JOIN plans p USING (plan_id)
 WHERE t.tenant_id = %s
"""


@dataclass(frozen=True)
class Outcome(ProvisionResult):
    """A registry result, why a rejected one was refused (invalid, duplicate or quota) and, for
    a quota refusal, its audit row (action, detail)."""

    reason: str | None = None
    audit: tuple[str, dict[str, Any]] | None = None


def provision(
    conn: psycopg.Connection,
    tenant_id: int,
    requests: Sequence[DeviceRequest],
    *,
    actor: str,
    audit_refusals: bool = True,
) -> list[Outcome]:
    """One outcome per request, in the caller's transaction (roll it back for a dry run).

    Each quota refusal is audited (the audit row becomes a quota_blocked billing event) unless
    ``audit_refusals`` is false: then the caller records them with ``audit_refusals`` once it has
    rolled back what it must."""
    if not conn.execute("SELECT iiot_api_lock_tenant()").fetchone()[0]:
        raise RegistryError("the session has no tenant")
    # the count runs after the lock, in a statement of its own: it sees every device committed
    # by the provisioning that held the lock before
    with conn.cursor(row_factory=dict_row) as cur:
        owner = cur.execute(_OWNER, (tenant_id,)).fetchone()
    if owner is None or owner["status"] != "active":
        raise RegistryError("the tenant cannot get new devices")
    catalog = registry._catalog(conn)
    outcomes: list[Outcome] = []
    valid: list[tuple[DeviceRequest, list[str]]] = []
    for raw in requests:
        try:
            request = registry.validate_request(raw)
            valid.append((request, registry._metrics_for(request, catalog)))
        except RegistryError as exc:
            outcomes.append(Outcome(raw.line, raw.mac[:40], "rejected", str(exc), None, INVALID))
    # other tenants' devices are invisible here: their MACs surface as a conflict on insert
    known = {
        mac: (device_id, kind)
        for mac, device_id, kind, _tenant in conn.execute(
            query("registered_macs"), {"macs": [r.mac for r, _ in valid]}
        )
    }
    count = owner["device_count"]
    for request, metrics in valid:
        line, mac = request.line, request.mac
        if mac in known:
            device_id, kind = known[mac]
            if kind == request.meter_kind:
                outcomes.append(Outcome(line, mac, "skipped", "already provisioned", device_id))
            else:
                outcomes.append(Outcome(line, mac, "rejected", DUPLICATE, None, "duplicate"))
            continue
        refusal = _quota_refusal(owner, count)
        if refusal:
            message, audit = refusal
            outcomes.append(Outcome(line, mac, "rejected", message, None, QUOTA, audit))
            continue
        device_id = registry._insert_device(conn, tenant_id, request, metrics, actor)
        if device_id is None:
            outcomes.append(Outcome(line, mac, "rejected", DUPLICATE, None, "duplicate"))
            continue
        known[mac] = (device_id, request.meter_kind)
        count += 1
        outcomes.append(Outcome(line, mac, "provisioned", ", ".join(metrics), device_id))
    if audit_refusals:
        record_refusals(conn, outcomes, tenant_id=tenant_id, actor=actor)
    return outcomes


def record_refusals(
    conn: psycopg.Connection, outcomes: Sequence[Outcome], *, tenant_id: int, actor: str
) -> None:
    for outcome in outcomes:
        if outcome.audit is not None:
            action, detail = outcome.audit
            registry.audit(
                conn,
                actor=actor,
                action=action,
                entity="device",
                entity_id=outcome.mac,
                tenant_id=tenant_id,
                detail=detail,
            )


def _quota_refusal(owner: dict[str, Any], count: int) -> tuple[str, tuple[str, dict]] | None:
    """Why the plan refuses one more device, and the audit row that records it."""
    if not owner["hard_block"]:
        return None
    plan = owner["plan_id"]
    if owner["storage_blocked_at"] is not None:
        return (
            f"storage quota exceeded: plan {plan} blocks new devices since "
            f"{owner['storage_blocked_at']:%Y-%m-%d %H:%M %Z} until storage is under the quota "
            "again (docs/billing.md)",
            ("quota.storage_blocked", {"plan": plan}),
        )
    if count >= owner["included_devices"]:
        return (
            f"device quota reached: plan {plan} includes {owner['included_devices']} devices "
            f"and the tenant has {count}",
            ("quota.device_blocked", {"plan": plan, "devices": count}),
        )
    return None
