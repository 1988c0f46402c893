"""The tenant and device registry: creation, listing, MAC normalisation and CSV provisioning."""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from iiot_orchestration.db import query, set_actor
from iiot_orchestration.errors import IiotError

METER_KINDS = ("energy", "water", "gas")
LOCALES = ("pt_BR", "en")
MAX_CSV_BYTES = 5 * 1024 * 1024
MAX_CSV_ROWS = 50_000
MAX_FIELD_CHARS = 200
CSV_COLUMNS = ("mac", "meter_kind", "name", "metrics")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
_MAC_FORMS = (
    re.compile(r"^[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}$"),
    re.compile(r"^[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4}$"),
    re.compile(r"^[0-9a-f]{12}$"),
)
_FORMULA_START = ("=", "+", "-", "@")
INVALID, DUPLICATE, QUOTA = "invalid", "duplicate", "quota"
# a tenant session's answer for a MAC registered anywhere: it never learns whose it is
REGISTERED = "duplicate MAC: already registered"


class RegistryError(IiotError):
    """A tenant or device request was refused; the message says why."""


def normalise_mac(raw: str) -> str:
    """``aa:bb:cc:dd:ee:ff`` from the usual MAC spellings; RegistryError for anything else."""
    text = raw.strip().lower()
    shown = raw if len(raw) <= 40 else raw[:37] + "..."
    if len(text) > 17 or not any(form.match(text) for form in _MAC_FORMS):
        raise RegistryError(
            f"bad MAC {shown!r}: expected 12 hex digits such as aa:bb:cc:dd:ee:ff, "
            "aa-bb-cc-dd-ee-ff, aabb.ccdd.eeff or aabbccddeeff"
        )
    digits = re.sub(r"[:.-]", "", text)
    if int(digits[:2], 16) & 1:
        raise RegistryError(f"bad MAC {shown!r}: a multicast address cannot identify a device")
    if digits == "0" * 12:
        raise RegistryError(f"bad MAC {shown!r}: the all-zero address cannot identify a device")
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def clean_name(raw: str, *, what: str = "name", limit: int = 100) -> str:
    """A display name safe to show in terminals, PDFs and spreadsheets."""
    name = unicodedata.normalize("NFC", raw.strip())
    if not name:
        raise RegistryError(f"{what} is empty")
    if len(name) > limit:
        raise RegistryError(f"{what} is longer than {limit} characters")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        raise RegistryError(f"{what} contains control characters")
    if name.startswith(_FORMULA_START):
        raise RegistryError(
            f"{what} {name!r} starts with {name[0]!r}, which spreadsheets run as a formula"
        )
    return name


@dataclass(frozen=True)
class Tenant:
    tenant_id: int
    slug: str
    name: str
    plan_id: str
    timezone: str
    locale: str
    retention_days: int
    billing_cycle_day: int
    status: str
    created_at: datetime
    device_count: int
    included_devices: int


def audit(
    conn: psycopg.Connection,
    *,
    actor: str,
    action: str,
    entity: str,
    entity_id: Any = None,
    tenant_id: int | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        query("insert_audit"),
        {
            "actor": actor,
            "tenant_id": tenant_id,
            "action": action,
            "entity": entity,
            "entity_id": None if entity_id is None else str(entity_id),
            "detail": Jsonb(detail or {}),
        },
    )


def create_tenant(
    conn: psycopg.Connection,
    *,
    slug: str,
    name: str,
    plan: str,
    timezone: str,
    locale: str = "pt_BR",
    retention_days: int | None = None,
    billing_cycle_day: int = 1,
    actor: str = "cli",
) -> Tenant:
    """Register a tenant; its first plan-history row is written by the database."""
    if not _SLUG.match(slug):
        raise RegistryError(
            f"bad tenant slug {slug[:70]!r}: use 2-63 lowercase letters, digits and '-', "
            "starting with a letter or digit"
        )
    name = clean_name(name, what="tenant name", limit=200)
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise RegistryError(
            f"unknown time zone {timezone[:60]!r}: use an IANA name such as America/Sao_Paulo"
        ) from None
    if locale not in LOCALES:
        raise RegistryError(f"unknown locale {locale!r}: expected one of {', '.join(LOCALES)}")
    if retention_days is not None and not 1 <= retention_days <= 36_500:
        raise RegistryError("retention days must be between 1 and 36500")
    if not 1 <= billing_cycle_day <= 28:
        raise RegistryError("billing cycle day must be between 1 and 28")
    plans = [r[0] for r in conn.execute("SELECT plan_id FROM plans ORDER BY plan_id")]
    if plan not in plans:
        raise RegistryError(f"unknown plan {plan[:40]!r}: expected one of {', '.join(plans)}")
    with conn.transaction():
        set_actor(conn, actor)
        try:
            with conn.transaction():
                tenant_id = conn.execute(
                    "INSERT INTO tenants (slug, name, plan_id, timezone, locale, retention_days,"
                    " billing_cycle_day) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING tenant_id",
                    (slug, name, plan, timezone, locale, retention_days, billing_cycle_day),
                ).fetchone()[0]
        except psycopg.errors.UniqueViolation:
            raise RegistryError(f"tenant {slug!r} already exists") from None
        audit(
            conn,
            actor=actor,
            action="tenant.created",
            entity="tenant",
            entity_id=slug,
            tenant_id=tenant_id,
            detail={"plan": plan, "timezone": timezone},
        )
    return get_tenant(conn, slug)


def list_tenants(conn: psycopg.Connection, slug: str | None = None) -> list[Tenant]:
    with conn.cursor(row_factory=dict_row) as cur:
        return [Tenant(**row) for row in cur.execute(query("tenant_summaries"), {"tenant": slug})]


def get_tenant(conn: psycopg.Connection, slug: str) -> Tenant:
    found = list_tenants(conn, slug)
    if not found:
        raise RegistryError(f"unknown tenant {slug[:70]!r}: `iiot tenants list` shows the tenants")
    return found[0]


@dataclass(frozen=True)
class DeviceRequest:
    """One device to provision; ``line`` is its line in a CSV file (0 for the command line)."""

    mac: str
    meter_kind: str
    name: str | None = None
    metrics: tuple[str, ...] = ()
    line: int = 0


@dataclass(frozen=True)
class ProvisionResult:
    line: int
    mac: str
    status: str  # provisioned, skipped or rejected
    message: str
    device_id: int | None = None
    reason: str | None = None  # why provision_devices rejected it: INVALID, DUPLICATE or QUOTA
    audit: tuple[str, dict[str, Any]] | None = None  # a quota refusal's audit row: action, detail


@dataclass
class CsvParse:
    requests: list[DeviceRequest] = field(default_factory=list)
    rejected: list[ProvisionResult] = field(default_factory=list)


def _split_metrics(raw: str) -> tuple[str, ...]:
    return tuple(m for m in re.split(r"[|\s]+", raw.strip()) if m)


def parse_device_csv(data: bytes) -> CsvParse:
    """Validate a device CSV; every bad row becomes a rejected result naming its line."""
    if len(data) > MAX_CSV_BYTES:
        raise RegistryError(
            f"CSV file is {len(data):,} bytes; the limit is {MAX_CSV_BYTES:,} "
            "(split it into smaller files)"
        )
    if b"\x00" in data:
        raise RegistryError("CSV file contains NUL bytes: it is not a text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RegistryError(f"CSV file is not UTF-8 (byte {exc.start} is invalid)") from None
    first_line = text.split("\n", 1)[0]
    delimiter = ";" if first_line.count(";") > first_line.count(",") else ","
    rows, lines = _read_csv(text, delimiter)
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise RegistryError(
            "CSV file is empty: expected a header line `mac,meter_kind,name,metrics`"
        )
    header = [cell.strip().lower() for cell in rows[0]]
    unknown = [h for h in header if h not in CSV_COLUMNS]
    missing = [c for c in ("mac", "meter_kind") if c not in header]
    if unknown or missing or len(set(header)) != len(header):
        raise RegistryError(
            f"CSV header {','.join(h[:30] for h in header)!r} is invalid: columns are "
            f"{', '.join(CSV_COLUMNS)} (mac and meter_kind required)"
        )
    if len(rows) - 1 > MAX_CSV_ROWS:
        raise RegistryError(f"CSV file has {len(rows) - 1:,} rows; the limit is {MAX_CSV_ROWS:,}")
    result = CsvParse()
    seen: dict[str, int] = {}
    required = max(header.index("mac"), header.index("meter_kind")) + 1
    for line, row in zip(lines[1:], rows[1:], strict=True):
        if not any(cell.strip() for cell in row):
            continue
        raw_mac = row[header.index("mac")].strip() if len(row) > header.index("mac") else ""
        if required <= len(row) < len(header):  # optional trailing fields left out: defaults
            row = row + [""] * (len(header) - len(row))
        if len(row) != len(header):
            result.rejected.append(
                ProvisionResult(
                    line,
                    raw_mac[:40],
                    "rejected",
                    f"expected {len(header)} fields, found {len(row)}",
                )
            )
            continue
        values = dict(zip(header, (cell.strip() for cell in row), strict=True))
        try:
            if any(len(v) > MAX_FIELD_CHARS for v in values.values()):
                raise RegistryError(f"a field is longer than {MAX_FIELD_CHARS} characters")
            request = validate_request(
                DeviceRequest(
                    mac=values["mac"],
                    meter_kind=values["meter_kind"],
                    name=values.get("name") or None,
                    metrics=_split_metrics(values.get("metrics", "")),
                    line=line,
                )
            )
        except RegistryError as exc:
            result.rejected.append(ProvisionResult(line, raw_mac[:40], "rejected", str(exc)))
            continue
        if request.mac in seen:
            result.rejected.append(
                ProvisionResult(
                    line,
                    request.mac,
                    "rejected",
                    f"duplicate MAC: first seen on line {seen[request.mac]}",
                )
            )
            continue
        seen[request.mac] = line
        result.requests.append(request)
    return result


def _read_csv(text: str, delimiter: str) -> tuple[list[list[str]], list[int]]:
    """The rows and the line each starts on (a quoted field may span lines)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[list[str]] = []
    lines: list[int] = []
    start = 1
    try:
        for row in reader:
            rows.append(row)
            lines.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        if str(exc) == "unexpected end of data":  # the rest of the file went into one field
            raise RegistryError(
                f"CSV file is malformed on line {start}: a quote in this row is never closed"
            ) from None
        raise RegistryError(f"CSV file is malformed on line {reader.line_num}: {exc}") from None
    return rows, lines


def validate_request(request: DeviceRequest) -> DeviceRequest:
    """The request with its MAC normalised and its fields checked (metrics against the
    catalog are checked at provisioning time)."""
    mac = normalise_mac(request.mac)
    kind = request.meter_kind.strip().lower()
    if kind not in METER_KINDS:
        raise RegistryError(
            f"unknown meter kind {request.meter_kind[:30]!r}: "
            f"expected one of {', '.join(METER_KINDS)}"
        )
    name = clean_name(request.name, what="device name") if request.name else None
    metrics = tuple(dict.fromkeys(m.strip().lower() for m in request.metrics))
    return DeviceRequest(mac, kind, name, metrics, request.line)


def _catalog(conn: psycopg.Connection) -> dict[str, tuple[str | None, bool]]:
    rows = conn.execute("SELECT metric, meter_kind, is_default FROM metric_catalog")
    return {metric: (kind, is_default) for metric, kind, is_default in rows}


def _metrics_for(request: DeviceRequest, catalog: dict[str, tuple[str | None, bool]]) -> list[str]:
    if not request.metrics:
        return sorted(
            m for m, (kind, default) in catalog.items() if default and kind == request.meter_kind
        )
    for metric in request.metrics:
        if metric not in catalog:
            raise RegistryError(
                f"unknown metric {metric[:40]!r}: "
                f"registered metrics are {', '.join(sorted(catalog))}"
            )
        kind = catalog[metric][0]
        if kind not in (None, request.meter_kind):
            raise RegistryError(
                f"metric {metric!r} belongs to {kind} meters, not {request.meter_kind}"
            )
    return list(request.metrics)


def provision_devices(
    conn: psycopg.Connection,
    tenant: str,
    requests: Sequence[DeviceRequest],
    *,
    actor: str = "cli",
    audit_refusals: bool = True,
) -> list[ProvisionResult]:
    """Register devices for a tenant in one transaction, one result per request.

    A MAC already registered to the same tenant with the same meter kind is skipped, so a CSV
    can be re-run safely. Starter and pro tenants are refused devices beyond the plan's quota,
    and any new device while they are over their storage quota (billing.enforce_storage_quota).
    Each quota refusal is audited (the audit row becomes a quota_blocked billing event) unless
    ``audit_refusals`` is false: then the caller records them with ``record_refusals`` once it
    has rolled back what it must.

    Runs as the platform (the CLI) or as a tenant session (the tenant API: app_rw scoped to
    ``tenant`` by iiot.tenant_id, under row security). A tenant session gets one answer for a MAC
    registered anywhere, never whether another tenant has it.
    """
    results: list[ProvisionResult] = []
    with conn.transaction():
        set_actor(conn, actor)
        platform = _lock_tenant(conn, tenant)
        # after the lock, in a statement of its own (READ COMMITTED): the count sees every
        # device of the provisioning that held the lock before
        with conn.cursor(row_factory=dict_row) as cur:
            owner = cur.execute(query("tenant_for_provisioning"), {"tenant": tenant}).fetchone()
        if owner is None:
            raise RegistryError(
                f"unknown tenant {tenant[:70]!r}: `iiot tenants list` shows the tenants"
            )
        if owner["status"] != "active":
            raise RegistryError(
                f"tenant {tenant!r} is {owner['status']}: it cannot get new devices"
            )
        catalog = _catalog(conn)
        count = owner["device_count"]
        valid: list[tuple[DeviceRequest, list[str]]] = []
        for raw in requests:
            try:
                request = validate_request(raw)
                valid.append((request, _metrics_for(request, catalog)))
            except RegistryError as exc:
                results.append(
                    ProvisionResult(raw.line, raw.mac[:40], "rejected", str(exc), reason=INVALID)
                )
        # a tenant session sees its own devices only: other MACs conflict on insert
        registered = {
            mac: rest
            for mac, *rest in conn.execute(
                query("registered_macs"), {"macs": [r.mac for r, _ in valid]}
            )
        }
        for request, metrics in valid:
            line, mac = request.line, request.mac
            existing = registered.get(mac)
            if existing is not None:
                device_id, kind, tenant_id = existing
                if tenant_id == owner["tenant_id"] and kind == request.meter_kind:
                    results.append(
                        ProvisionResult(line, mac, "skipped", "already provisioned", device_id)
                    )
                    continue
                if not platform:
                    message = REGISTERED
                elif tenant_id == owner["tenant_id"]:
                    message = f"duplicate MAC: already registered here as a {kind} meter"
                else:
                    message = "duplicate MAC: already registered to another tenant"
                results.append(ProvisionResult(line, mac, "rejected", message, reason=DUPLICATE))
                continue
            refusal = _quota_refusal(owner, count)
            if refusal is not None:
                message, audit_row = refusal
                results.append(
                    ProvisionResult(line, mac, "rejected", message, reason=QUOTA, audit=audit_row)
                )
                continue
            device_id = _insert_device(conn, owner["tenant_id"], request, metrics, actor)
            registered[mac] = [device_id, request.meter_kind, owner["tenant_id"]]
            if device_id is None:
                message = (
                    "duplicate MAC: registered by someone else a moment ago"
                    if platform
                    else REGISTERED
                )
                results.append(ProvisionResult(line, mac, "rejected", message, reason=DUPLICATE))
                continue
            count += 1
            results.append(ProvisionResult(line, mac, "provisioned", ", ".join(metrics), device_id))
        if audit_refusals:
            record_refusals(conn, results, tenant_id=owner["tenant_id"], actor=actor)
    return results


def _lock_tenant(conn: psycopg.Connection, tenant: str) -> bool:
    """Lock the tenant's row until the transaction ends, so that two provisionings of one
    tenant count its devices one after the other; True when the session is the platform.

    The platform (platform_rw and its members: migration_admin, superusers) locks the row
    FOR UPDATE. A tenant session (app_rw), which may not (no UPDATE on tenants since 0022), locks
    its own tenant's row through iiot_api_lock_tenant() (0029)."""
    if conn.execute("SELECT pg_has_role(current_user, 'platform_rw', 'USAGE')").fetchone()[0]:
        conn.execute(query("lock_tenant_for_provisioning"), {"tenant": tenant})
        return True
    if not conn.execute("SELECT iiot_api_lock_tenant()").fetchone()[0]:
        raise RegistryError("the session has no tenant: set iiot.tenant_id (db.set_tenant)")
    return False


def _quota_refusal(
    owner: dict[str, Any], count: int
) -> tuple[str, tuple[str, dict[str, Any]]] | None:
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


def record_refusals(
    conn: psycopg.Connection, results: Sequence[ProvisionResult], *, tenant_id: int, actor: str
) -> None:
    """The audit rows of the quota refusals among ``results``."""
    for result in results:
        if result.audit is not None:
            action, detail = result.audit
            audit(
                conn,
                actor=actor,
                action=action,
                entity="device",
                entity_id=result.mac,
                tenant_id=tenant_id,
                detail=detail,
            )


def _insert_device(
    conn: psycopg.Connection,
    tenant_id: int,
    request: DeviceRequest,
    metrics: list[str],
    actor: str,
) -> int | None:
    """The new device's id, or None when the MAC was taken by a concurrent registration."""
    row = conn.execute(
        query("provision_device"),
        {
            "tenant_id": tenant_id,
            "mac": request.mac,
            "name": request.name or f"{request.meter_kind}-{request.mac.replace(':', '')[-6:]}",
            "meter_kind": request.meter_kind,
            "metrics": metrics,
            "actor": actor,
        },
    ).fetchone()
    return None if row is None else row[0]


def list_devices(conn: psycopg.Connection, tenant: str | None = None) -> list[dict[str, Any]]:
    if tenant is not None:
        get_tenant(conn, tenant)
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query("device_summaries"), {"tenant": tenant}).fetchall()
