"""Device claim codes and device secrets.

A claim code is printed at manufacturing for one MAC and meter kind (`iiot devices claim-codes
create`, as platform_rw), before any tenant owns the device; the tenant that presents it through
``POST /api/v1/devices/claim`` gets the device and a one-time device secret. Both are random
(125 and 256 bits) and only their SHA-256 is stored: they are not passwords, so a fast hash is
right and the lookup by hash is exact.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from iiot_orchestration import registry
from iiot_orchestration.registry import DeviceRequest, RegistryError

# Crockford's base32: no I, L, O or U, so a code read off a label is typed back right
CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_GROUPS, CODE_GROUP_LENGTH = 5, 5
_CODE_LENGTH = CODE_GROUPS * CODE_GROUP_LENGTH
_READ_AS = str.maketrans({"O": "0", "I": "1", "L": "1"})
SECRET_PREFIX = "iiotdev_"  # noqa: S105 (a prefix, not a secret)
CLAIM_COLUMNS = (
    "c.claim_id, c.mac::text AS mac, c.meter_kind, c.metrics, c.created_by, c.created_at,"
    " c.expires_at, c.claimed_at, t.slug AS tenant, c.device_id"
)


class ClaimError(RegistryError):
    """A claim code that cannot be created; the message says why."""


@dataclass(frozen=True)
class NewClaimCode:
    claim_id: int
    code: str  # shown once
    mac: str
    meter_kind: str
    metrics: list[str]
    expires_at: datetime | None


@dataclass(frozen=True)
class Claim:
    """A claim code taken by the transaction's tenant: what to provision."""

    claim_id: int
    mac: str
    meter_kind: str
    metrics: tuple[str, ...]


def generate_code() -> str:
    """``XXXXX-XXXXX-XXXXX-XXXXX-XXXXX``: 25 base32 characters, 125 random bits."""
    chars = "".join(secrets.choice(CODE_ALPHABET) for _ in range(_CODE_LENGTH))
    return "-".join(
        chars[i : i + CODE_GROUP_LENGTH] for i in range(0, _CODE_LENGTH, CODE_GROUP_LENGTH)
    )


def normalise_code(code: str) -> str | None:
    """The code's canonical characters (case, dashes and spaces and O/I/L for 0/1 forgiven), or
    None when it cannot be a claim code."""
    text = "".join(code.split()).replace("-", "").upper().translate(_READ_AS)
    if len(text) != _CODE_LENGTH or not set(text) <= set(CODE_ALPHABET):
        return None
    return text


def code_digest(code: str) -> bytes | None:
    canonical = normalise_code(code)
    return None if canonical is None else hashlib.sha256(canonical.encode()).digest()


def create_code(
    conn: psycopg.Connection,
    *,
    mac: str,
    meter_kind: str,
    metrics: tuple[str, ...] = (),
    expires_at: datetime | None = None,
    actor: str = "cli",
) -> NewClaimCode:
    """A new claim code for a device no tenant owns yet (platform_rw); the caller commits."""
    request = registry.validate_request(DeviceRequest(mac, meter_kind, None, metrics))
    if request.metrics:  # checked now, not when a tenant claims the device
        registry._metrics_for(request, registry._catalog(conn))
    registered = conn.execute(
        "SELECT t.slug FROM devices d JOIN tenants t USING (tenant_id) WHERE d.mac = %s",
        (request.mac,),
    ).fetchone()
    if registered:
        raise ClaimError(f"MAC {request.mac} is already registered to tenant {registered[0]!r}")
    existing = conn.execute(
        "SELECT claim_id FROM device_claim_codes WHERE mac = %s", (request.mac,)
    ).fetchone()
    if existing:
        raise ClaimError(
            f"MAC {request.mac} already has claim code {existing[0]}: "
            "`iiot devices claim-codes list` shows it"
        )
    code = generate_code()
    row = conn.execute(
        "INSERT INTO device_claim_codes (code_sha256, mac, meter_kind, metrics, created_by,"
        " expires_at) VALUES (%s, %s, %s, %s, %s, %s) RETURNING claim_id",
        (
            code_digest(code),
            request.mac,
            request.meter_kind,
            list(request.metrics),
            actor,
            expires_at,
        ),
    ).fetchone()
    assert row is not None
    registry.audit(
        conn,
        actor=actor,
        action="claim_code.created",
        entity="device_claim_code",
        entity_id=row[0],
        detail={"mac": request.mac, "meter_kind": request.meter_kind},
    )
    return NewClaimCode(
        row[0], code, request.mac, request.meter_kind, list(request.metrics), expires_at
    )


def list_codes(conn: psycopg.Connection, *, unclaimed: bool = False) -> list[dict[str, Any]]:
    """Every claim code (never the code): its device, expiry and, once claimed, the tenant."""
    sql = (
        f"SELECT {CLAIM_COLUMNS},"
        "       CASE WHEN c.claimed_at IS NOT NULL THEN 'claimed'"
        "            WHEN c.expires_at <= now() THEN 'expired' ELSE 'open' END AS state"
        "  FROM device_claim_codes c LEFT JOIN tenants t USING (tenant_id)"
    )
    if unclaimed:
        sql += " WHERE c.claimed_at IS NULL"
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql + " ORDER BY c.claim_id").fetchall()


def take(conn: psycopg.Connection, code: str) -> Claim | None:
    """The claim of ``code`` for the transaction's tenant, or None when the code is malformed,
    unknown, expired or claimed already (one answer for all). Marks it claimed: the caller
    provisions the device in the same transaction and calls ``complete``, or rolls back."""
    digest = code_digest(code)
    if digest is None:
        return None
    row = conn.execute(
        "SELECT claim_id, mac::text, meter_kind, metrics FROM iiot_api_claim_take(%s)", (digest,)
    ).fetchone()
    return None if row is None else Claim(row[0], row[1], row[2], tuple(row[3]))


def complete(conn: psycopg.Connection, claim: Claim, device_id: int) -> str:
    """Record the claimed device and return its new secret, shown once (only its SHA-256 is
    stored, in device_secrets)."""
    conn.execute("SELECT iiot_api_claim_complete(%s, %s)", (claim.claim_id, device_id))
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO device_secrets (device_id, tenant_id, secret_sha256)"
        " SELECT device_id, tenant_id, %s FROM devices WHERE device_id = %s",
        (hashlib.sha256(secret.encode()).digest(), device_id),
    )
    return secret
