"""Devices of the caller's tenant: list and get (viewer); create, update, decommission, CSV
import and claim (editor)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

import psycopg
from fastapi import Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from iiot_orchestration import registry
from iiot_orchestration.api import claims
from iiot_orchestration.api.context import Editor, Session, Viewer
from iiot_orchestration.api.errors import ApiError, envelope, keyed_router, not_found
from iiot_orchestration.api.pagination import Cursor, Limit, Page, decode, page
from iiot_orchestration.registry import DeviceRequest, ProvisionResult, RegistryError

router = keyed_router("devices")

MeterKind = Literal["energy", "water", "gas"]
Status = Literal["active", "inactive", "decommissioned"]
Outcome = Literal["provisioned", "would provision", "skipped", "rejected"]
CSV_TYPES = ("text/csv",)
_DEVICE = """
SELECT d.device_id, d.mac::text AS mac, d.name, d.meter_kind, d.status, d.last_seen,
       d.created_at,
       array(SELECT m.metric FROM device_metrics m
              WHERE m.device_id = d.device_id ORDER BY m.metric) AS metrics
  FROM devices d
 WHERE d.tenant_id = %(tenant)s
"""
_LINE = re.compile(r"\bon line (\d+)\b")


class Device(BaseModel):
    device_id: int
    mac: str = Field(description="aa:bb:cc:dd:ee:ff")
    name: str
    meter_kind: MeterKind
    status: Status
    metrics: list[str] = Field(description="What the device reports, e.g. energy_kwh")
    last_seen: datetime | None = Field(description="Time of its last reading")
    created_at: datetime


class NewDevice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mac: str = Field(
        max_length=40, description="aa:bb:cc:dd:ee:ff, aa-bb-cc-dd-ee-ff, aabb.ccdd.eeff, ..."
    )
    meter_kind: MeterKind
    name: str | None = Field(
        default=None, max_length=200, description="Up to 100 characters [default: kind-MAC]"
    )
    metrics: list[Annotated[str, Field(max_length=64)]] | None = Field(
        default=None, max_length=50, description="[default: the meter kind's default metrics]"
    )


class DeviceChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    status: Literal["active", "inactive"] | None = Field(
        default=None, description="Decommission with POST /devices/{device_id}/decommission"
    )


class ImportRow(BaseModel):
    line: int = Field(description="Line of the CSV the row starts on")
    mac: str
    outcome: Outcome = Field(description="'would provision' in a dry run")
    detail: str = Field(description="The metrics provisioned, or why the row was refused")
    device_id: int | None


class ImportCounts(BaseModel):
    provisioned: int = Field(description="Provisioned, or would be in a dry run")
    skipped: int = Field(description="Already provisioned with the same meter kind")
    rejected: int


class ImportReport(BaseModel):
    dry_run: bool
    counts: ImportCounts
    rows: list[ImportRow]


class ClaimRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(max_length=100, description="The claim code on the device's label")
    name: str | None = Field(default=None, max_length=200)


class ClaimedDevice(BaseModel):
    device_secret: str = Field(description="The device's secret: shown once, never again.")
    device: Device


def _device(s: Session, device_id: int, *, lock: bool = False) -> dict[str, Any]:
    """The device, or the one 404 for a device that does not exist or is another tenant's;
    ``lock`` holds it until the request's transaction ends (a change audits what it changed)."""
    row = s.row(
        _DEVICE + " AND d.device_id = %(device)s" + (" FOR UPDATE OF d" if lock else ""),
        {"tenant": s.tenant(), "device": device_id},
    )
    if row is None:
        raise not_found("device")
    return row


def _invalid(exc: RegistryError, field: str) -> ApiError:
    return ApiError(
        422, str(exc), code="validation_error", details=[{"field": field, "problem": str(exc)}]
    )


def _provision(
    s: Session, requests: list[DeviceRequest], *, audit_refusals: bool = True
) -> list[ProvisionResult]:
    """The registry's provisioning in the request's transaction (app_rw, the key's tenant)."""
    s.tenant()  # a platform key names the tenant
    assert s.tenant_slug is not None
    return registry.provision_devices(
        s.conn, s.tenant_slug, requests, actor=s.actor, audit_refusals=audit_refusals
    )


def _refused(request: Request, outcome: ProvisionResult) -> JSONResponse:
    """A device refused as an error response, so that the transaction still commits: a quota
    refusal's audit row and billing event stay."""
    if outcome.reason == registry.INVALID:
        raise _invalid(RegistryError(outcome.message), "body")
    if outcome.reason == registry.QUOTA:
        return envelope(request, 409, "quota_exceeded", outcome.message)
    # the tenant's own device or anyone else's: one answer
    return envelope(request, 409, "conflict", f"MAC {outcome.mac}: {registry.REGISTERED}")


@router.get("/devices", response_model=Page[Device], summary="The tenant's devices")
def list_devices(
    s: Viewer,
    limit: Limit = 100,
    cursor: Cursor = None,
    status: Annotated[Status | None, Query(description="Only devices in this status")] = None,
    meter_kind: Annotated[MeterKind | None, Query(description="Only meters of this kind")] = None,
    q: Annotated[
        str | None, Query(max_length=100, description="Part of the name or MAC, any case")
    ] = None,
) -> dict:
    after = decode(cursor, int)
    sql = _DEVICE + " AND (%(after)s::bigint IS NULL OR d.device_id > %(after)s::bigint)"
    params: dict[str, Any] = {"tenant": s.tenant(), "after": after, "limit": limit + 1}
    if status is not None:
        sql += " AND d.status = %(status)s"
        params["status"] = status
    if meter_kind is not None:
        sql += " AND d.meter_kind = %(kind)s"
        params["kind"] = meter_kind
    if q:
        sql += " AND (d.name ILIKE %(pattern)s OR d.mac::text ILIKE %(pattern)s"
        params["pattern"] = "%" + re.sub(r"([\\%_])", r"\\\1", q.strip()) + "%"
        digits = re.sub(r"[:.\-\s]", "", q).lower()
        if digits and re.fullmatch(r"[0-9a-f]+", digits):  # a MAC typed without separators
            sql += " OR replace(d.mac::text, ':', '') LIKE %(digits)s"
            params["digits"] = f"%{digits}%"
        sql += ")"
    rows = s.rows(sql + " ORDER BY d.device_id LIMIT %(limit)s", params)
    return page(rows, limit, "device_id")


@router.get("/devices/{device_id:int}", response_model=Device, summary="One device")
def get_device(s: Viewer, device_id: int) -> dict:
    return _device(s, device_id)


@router.post(
    "/devices",
    response_model=Device,
    status_code=201,
    summary="Provision one device",
    description="A MAC registered already, here or to anyone else, is a 409 `conflict`; a "
    "device the plan's quota refuses is a 409 `quota_exceeded`.",
)
def create_device(s: Editor, body: NewDevice, request: Request) -> Any:
    new = DeviceRequest(body.mac, body.meter_kind, body.name, tuple(body.metrics or ()))
    try:
        (outcome,) = _provision(s, [new])
    except RegistryError as exc:
        raise ApiError(409, str(exc), code="conflict") from None
    if outcome.status != "provisioned":
        return _refused(request, outcome)
    assert outcome.device_id is not None
    return _device(s, outcome.device_id)


@router.patch("/devices/{device_id:int}", response_model=Device, summary="Rename, (de)activate")
def update_device(s: Editor, device_id: int, body: DeviceChange) -> dict:
    if body.name is None and body.status is None:
        raise ApiError(422, "nothing to change: give name, status or both", code="validation_error")
    try:
        name = None if body.name is None else registry.clean_name(body.name, what="device name")
    except RegistryError as exc:
        raise _invalid(exc, "body.name") from None
    before = _device(s, device_id, lock=True)
    if body.status is not None and before["status"] == "decommissioned":
        raise ApiError(
            409, "the device is decommissioned: its status cannot change", code="conflict"
        )
    wanted = {"name": name, "status": body.status}
    changes = {
        field: {"from": before[field], "to": value}
        for field, value in wanted.items()
        if value is not None and value != before[field]
    }
    if changes:
        s.conn.execute(
            "UPDATE devices SET name = coalesce(%s, name), status = coalesce(%s, status)"
            " WHERE device_id = %s",
            (name, body.status, device_id),
        )
        s.audit("device.updated", "device", device_id, mac=before["mac"], changes=changes)
    return _device(s, device_id)


@router.post(
    "/devices/{device_id:int}/decommission",
    response_model=Device,
    summary="Decommission a device (final; repeating it changes nothing)",
)
def decommission_device(s: Editor, device_id: int) -> dict:
    before = _device(s, device_id, lock=True)
    if before["status"] != "decommissioned":
        s.conn.execute(
            "UPDATE devices SET status = 'decommissioned' WHERE device_id = %s", (device_id,)
        )
        s.audit(
            "device.decommissioned",
            "device",
            device_id,
            mac=before["mac"],
            previous=before["status"],
        )
    return _device(s, device_id)


async def _csv_body(request: Request) -> bytes:
    """The raw body of a text/csv request (UTF-8); 415 for any other media type."""
    media, _, parameters = request.headers.get("content-type", "").partition(";")
    charset = re.search(r"charset\s*=\s*\"?([\w-]+)", parameters, flags=re.IGNORECASE)
    if media.strip().lower() not in CSV_TYPES or (
        charset and charset.group(1).lower() not in ("utf-8", "utf8", "us-ascii")
    ):
        raise ApiError(
            415,
            "send the devices as Content-Type: text/csv (UTF-8), columns "
            "mac,meter_kind[,name,metrics]",
            code="unsupported_media_type",
        )
    return await request.body()


@router.post(
    "/devices/import",
    response_model=ImportReport,
    summary="Provision devices from a CSV file, with a report per row",
    description="The body is the CSV itself (`Content-Type: text/csv`), columns "
    "`mac,meter_kind[,name,metrics]` as for `iiot devices provision --csv`. Rows already "
    "provisioned are skipped, so a file can be sent again; `dry_run` validates and reports "
    "without registering anything. A file that cannot be read as CSV is a 422 naming the line.",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"text/csv": {"schema": {"type": "string"}}},
        }
    },
)
def import_devices(
    s: Editor,
    data: Annotated[bytes, Depends(_csv_body)],
    dry_run: Annotated[bool, Query(description="Validate and report only")] = False,
) -> dict:
    try:
        parsed = registry.parse_device_csv(data)
    except RegistryError as exc:
        line = _LINE.search(str(exc))
        details = [{"field": "body", "problem": str(exc)}]
        if line:
            details[0]["line"] = int(line.group(1))
        raise ApiError(422, str(exc), code="validation_error", details=details) from None
    outcomes: list[ProvisionResult] = list(parsed.rejected)
    if parsed.requests:
        try:
            with s.conn.transaction() as savepoint:
                outcomes += _provision(s, parsed.requests)
                if dry_run:
                    raise psycopg.Rollback(savepoint)
        except RegistryError as exc:
            raise ApiError(409, str(exc), code="conflict") from None
    shown = {"provisioned": "would provision"} if dry_run else {}
    rows = [
        {
            "line": r.line,
            "mac": r.mac,
            "outcome": shown.get(r.status, r.status),
            "detail": r.message,
            "device_id": None if dry_run and r.status == "provisioned" else r.device_id,
        }
        for r in sorted(outcomes, key=lambda r: r.line)
    ]
    counts = {
        k: sum(r.status == k for r in outcomes) for k in ("provisioned", "skipped", "rejected")
    }
    if not dry_run:
        s.audit("device.imported", "device", None, bytes=len(data), **counts)
    return {"dry_run": dry_run, "counts": counts, "rows": rows}


@router.post(
    "/devices/claim",
    response_model=ClaimedDevice,
    status_code=201,
    summary="Claim a device by the code on its label; its secret is shown once",
    description="An unknown, expired or already claimed code is one and the same 404. A "
    "device the plan's quota refuses is a 409 `quota_exceeded`, and the code stays unclaimed.",
)
def claim_device(s: Editor, body: ClaimRequest, request: Request) -> Any:
    try:
        name = None if body.name is None else registry.clean_name(body.name, what="device name")
    except RegistryError as exc:
        raise _invalid(exc, "body.name") from None
    tenant = s.tenant()
    with s.conn.transaction() as savepoint:
        claim = claims.take(s.conn, body.code)
        if claim is None:
            raise ApiError(
                404, "claim code not found, expired or claimed already", code="not_found"
            )
        new = DeviceRequest(claim.mac, claim.meter_kind, name, claim.metrics)
        (outcome,) = _provision(s, [new], audit_refusals=False)
        if outcome.device_id is None or outcome.status != "provisioned":
            raise psycopg.Rollback(savepoint)  # the code stays unclaimed
        secret = claims.complete(s.conn, claim, outcome.device_id)
        s.audit(
            "device.claimed", "device", outcome.device_id, claim_id=claim.claim_id, mac=claim.mac
        )
        return {"device_secret": secret, "device": _device(s, outcome.device_id)}
    registry.record_refusals(s.conn, [outcome], tenant_id=tenant, actor=s.actor)
    return _refused(request, outcome)
