"""Device certificates of the caller's tenant: expiry and renewal state per device, and each
device's history (viewer). Public facts only: serials, fingerprints, dates, states; no PEM
(nothing private is stored, and a client identifies a certificate by serial and fingerprint)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path, Query
from pydantic import BaseModel, Field

from iiot_orchestration import pki
from iiot_orchestration.api.context import Session, Viewer
from iiot_orchestration.api.errors import keyed_router, not_found
from iiot_orchestration.api.pagination import Cursor, Limit, Page, decode, page
from iiot_orchestration.api.routes.alerts import MAX_INTEGER

router = keyed_router("certificates")

Expiry = Literal["ok", "renewal_due", "expired", "none"]
RenewalStatus = Literal["issued", "published", "succeeded", "failed", "timed_out"]
DeviceId = Annotated[int, Path(ge=1, le=MAX_INTEGER, description="A device of the tenant.")]

# the expiry sweep's classes (pki.sweep), for the device's active certificate
EXPIRY = (
    "CASE WHEN c.certificate_id IS NULL THEN 'none'"
    "     WHEN c.not_after <= now() THEN 'expired'"
    "     WHEN c.not_after <= now() + %(window)s THEN 'renewal_due' ELSE 'ok' END"
)
CERTIFICATE_COLUMNS = (
    "c.certificate_id, c.serial, c.subject_cn, c.fingerprint_sha256, c.not_before, c.not_after,"
    " floor(extract(epoch FROM c.not_after - now()) / 86400)::integer AS days_left"
)
RENEWAL_FIELDS = (
    "renewal_id",
    "status",
    "attempt",
    "issued_at",
    "published_at",
    "completed_at",
    "failure_reason",
    "next_attempt_after",
)
# aliased: the certificate's own status and issued_at sit in the same row
RENEWAL_COLUMNS = ", ".join(f"r.{f} AS renewal_{f}" for f in RENEWAL_FIELDS)


class Renewal(BaseModel):
    """An over-the-air renewal attempt (docs/certificates.md)."""

    renewal_id: str
    status: RenewalStatus = Field(description="issued and published: in flight.")
    attempt: int
    issued_at: datetime
    published_at: datetime | None
    completed_at: datetime | None
    failure_reason: str | None
    next_attempt_after: datetime | None = Field(description="No new attempt before then.")
    new_serial: str = Field(description="Serial of the certificate the attempt delivers, hex.")


class CurrentCertificate(BaseModel):
    certificate_id: int
    serial: str = Field(description="Hexadecimal, as `iiot devices revoke --serial` takes it.")
    subject_cn: str
    fingerprint_sha256: str
    not_before: datetime
    not_after: datetime
    days_left: int = Field(description="Whole days until not_after; negative once expired.")


class DeviceCertificates(BaseModel):
    device_id: int
    mac: str
    device_name: str
    device_status: str
    expiry: Expiry = Field(
        description="Of the active certificate: ok; renewal_due (within 730 days: renewed over "
        "the air); expired (the broker refuses it); none (no active certificate)."
    )
    certificate: CurrentCertificate | None = Field(description="The active certificate.")
    renewal: Renewal | None = Field(description="The device's latest renewal attempt.")


class Certificate(CurrentCertificate):
    status: Literal["pending", "active", "superseded", "revoked"]
    issued_at: datetime
    superseded_at: datetime | None
    revoked_at: datetime | None
    revocation_code: str | None
    renewal: Renewal | None = Field(description="The renewal attempt that issued it, if one did.")


def _hex(serial: Any) -> str | None:
    return None if serial is None else pki.serial_hex(int(serial))


@router.get(
    "/certificates",
    response_model=Page[DeviceCertificates],
    summary="Per device: the active certificate's expiry and the latest renewal attempt",
)
def list_certificates(
    s: Viewer,
    limit: Limit = 100,
    cursor: Cursor = None,
    expiry: Expiry | None = None,
    renewal_status: Annotated[
        RenewalStatus | None, Query(description="Of the device's latest renewal attempt.")
    ] = None,
    device_id: Annotated[int | None, Query(ge=1, le=MAX_INTEGER)] = None,
) -> dict:
    after = decode(cursor, int)
    rows = s.rows(
        "SELECT * FROM ("
        f" SELECT d.device_id, d.mac::text AS mac, d.name AS device_name,"
        f"        d.status AS device_status, {EXPIRY} AS expiry, {CERTIFICATE_COLUMNS},"
        f"        {RENEWAL_COLUMNS}, n.serial AS new_serial"
        "   FROM devices d"
        "   LEFT JOIN device_certificates c ON c.device_id = d.device_id AND c.status = 'active'"
        "   LEFT JOIN LATERAL (SELECT * FROM certificate_renewals l WHERE l.device_id = d.device_id"
        "                       ORDER BY l.issued_at DESC, l.attempt DESC LIMIT 1) r ON true"
        "   LEFT JOIN device_certificates n ON n.certificate_id = r.new_certificate_id"
        "  WHERE d.tenant_id = %(tenant)s"
        "    AND (%(after)s::integer IS NULL OR d.device_id > %(after)s::integer)"
        "    AND (%(device)s::integer IS NULL OR d.device_id = %(device)s::integer)) x"
        " WHERE (%(expiry)s::text IS NULL OR expiry = %(expiry)s::text)"
        "   AND (%(renewal)s::text IS NULL OR renewal_status = %(renewal)s::text)"
        " ORDER BY device_id LIMIT %(limit)s",
        {
            "tenant": s.tenant(),
            "window": pki.RENEWAL_WINDOW,
            "after": after,
            "device": device_id,
            "expiry": expiry,
            "renewal": renewal_status,
            "limit": limit + 1,
        },
    )
    items = page(rows, limit, "device_id")
    items["items"] = [_per_device(row) for row in items["items"]]
    return items


def _per_device(row: dict[str, Any]) -> dict[str, Any]:
    renewal = _split_renewal(row)
    current = None
    if row["certificate_id"] is not None:
        current = {k: row[k] for k in CurrentCertificate.model_fields}
        current["serial"] = _hex(current["serial"])
    return {
        **{k: row[k] for k in ("device_id", "mac", "device_name", "device_status", "expiry")},
        "certificate": current,
        "renewal": renewal,
    }


def _split_renewal(row: dict[str, Any]) -> dict[str, Any] | None:
    """The renewal attempt's columns of ``row``, taken out of it."""
    renewal = {f: row.pop(f"renewal_{f}") for f in RENEWAL_FIELDS}
    new_serial = row.pop("new_serial")
    if renewal["renewal_id"] is None:
        return None
    return {**renewal, "renewal_id": str(renewal["renewal_id"]), "new_serial": _hex(new_serial)}


def _device_exists(s: Session, device_id: int) -> None:
    if not s.row(
        "SELECT 1 AS found FROM devices WHERE tenant_id = %s AND device_id = %s",
        (s.tenant(), device_id),
    ):
        raise not_found("device")


@router.get(
    "/devices/{device_id}/certificates",
    response_model=Page[Certificate],
    summary="Every certificate a device of the tenant has had, newest first",
)
def device_certificates(
    s: Viewer, device_id: DeviceId, limit: Limit = 100, cursor: Cursor = None
) -> dict:
    _device_exists(s, device_id)
    before = decode(cursor, int)
    rows = s.rows(
        f"SELECT {CERTIFICATE_COLUMNS}, c.status, c.issued_at, c.superseded_at, c.revoked_at,"
        f"       c.revocation_code, {RENEWAL_COLUMNS}, n.serial AS new_serial"
        "  FROM device_certificates c"
        "  LEFT JOIN certificate_renewals r ON r.new_certificate_id = c.certificate_id"
        "  LEFT JOIN device_certificates n ON n.certificate_id = r.new_certificate_id"
        " WHERE c.tenant_id = %(tenant)s AND c.device_id = %(device)s"
        "   AND (%(before)s::bigint IS NULL OR c.certificate_id < %(before)s::bigint)"
        " ORDER BY c.certificate_id DESC LIMIT %(limit)s",
        {"tenant": s.tenant(), "device": device_id, "before": before, "limit": limit + 1},
    )
    items = page(rows, limit, "certificate_id")
    for row in items["items"]:
        row["renewal"] = _split_renewal(row)
        row["serial"] = _hex(row["serial"])
    return items
