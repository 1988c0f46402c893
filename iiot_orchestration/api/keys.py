"""API keys: ``iiot_<prefix>_<secret>``, 256 random bits, stored as the SHA-256 of the whole key.

Used by `iiot api-keys` (as the platform) and by the API's own key endpoints (as a tenant admin,
under row-level security). Every create, rotate and revoke leaves an audit row.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
from psycopg.rows import dict_row

from iiot_orchestration.errors import IiotError
from iiot_orchestration.registry import audit, clean_name

ROLES = ("viewer", "editor", "admin")
PLATFORM = "platform"
KEY_PATTERN = re.compile(r"^iiot_([a-z0-9]{8})_([A-Za-z0-9_-]{43})$")
_PREFIX_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
KEY_COLUMNS = (
    "key_id, prefix, role, name, created_by, created_at, expires_at, last_used_at, revoked_at,"
    " replaced_by"
)


class ApiKeyError(IiotError):
    """A key request that cannot be met; the message says why."""


@dataclass(frozen=True)
class NewKey:
    key_id: int
    key: str  # shown once
    prefix: str
    role: str
    name: str
    tenant: str | None
    expires_at: datetime | None


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def generate() -> tuple[str, str]:
    """(prefix, whole key)."""
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(8))
    return prefix, f"iiot_{prefix}_{secrets.token_urlsafe(32)}"


def well_formed(key: str) -> bool:
    return bool(KEY_PATTERN.match(key))


def _tenant_id(conn: psycopg.Connection, tenant: str | None) -> int | None:
    if tenant is None:
        return None
    row = conn.execute("SELECT tenant_id FROM tenants WHERE slug = %s", (tenant,)).fetchone()
    if row is None:
        raise ApiKeyError(f"unknown tenant {tenant[:70]!r}: `iiot tenants list` shows the tenants")
    return row[0]


def create(
    conn: psycopg.Connection,
    *,
    tenant: str | None,
    role: str,
    name: str,
    actor: str,
    expires_at: datetime | None = None,
    tenant_id: int | None = None,
) -> NewKey:
    """A new key; ``tenant`` None and role ``platform`` make a platform key. The caller commits."""
    if role not in (*ROLES, PLATFORM):
        raise ApiKeyError(f"unknown role {role!r}: expected viewer, editor, admin or platform")
    if (role == PLATFORM) != (tenant is None and tenant_id is None):
        raise ApiKeyError(
            "a platform key belongs to no tenant; a viewer, editor or admin key to exactly one"
        )
    name = clean_name(name, what="key name")
    if tenant_id is None:
        tenant_id = _tenant_id(conn, tenant)
    prefix, key = generate()
    row = conn.execute(
        "INSERT INTO api_keys (tenant_id, prefix, key_sha256, role, name, created_by, expires_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING key_id",
        (tenant_id, prefix, digest(key), role, name, actor, expires_at),
    ).fetchone()
    assert row is not None
    audit(
        conn,
        actor=actor,
        action="api_key.created",
        entity="api_key",
        entity_id=str(row[0]),
        tenant_id=tenant_id,
        detail={"prefix": prefix, "role": role, "name": name},
    )
    return NewKey(row[0], key, prefix, role, name, tenant, expires_at)


def find(conn: psycopg.Connection, ref: str, tenant_id: int | None = None) -> dict:
    """A key by id or prefix (``iiot_abcd1234`` or ``abcd1234``); row security limits a tenant."""
    ref = ref.strip()
    if ref.startswith("iiot_"):
        ref = ref.split("_")[1]
    clause, value = ("key_id = %s", int(ref)) if ref.isdigit() else ("prefix = %s", ref)
    sql = f"SELECT {KEY_COLUMNS}, tenant_id FROM api_keys WHERE {clause}"
    params: list = [value]
    if tenant_id is not None:
        sql += " AND tenant_id = %s"
        params.append(tenant_id)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(sql, params).fetchone()
    if row is None:
        raise ApiKeyError(f"no API key {ref[:40]!r}: `iiot api-keys list` shows the keys")
    return row


def revoke(conn: psycopg.Connection, ref: str, *, actor: str, tenant_id: int | None = None) -> dict:
    row = find(conn, ref, tenant_id)
    if row["revoked_at"] is None:
        conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = %s", (row["key_id"],))
        audit(
            conn,
            actor=actor,
            action="api_key.revoked",
            entity="api_key",
            entity_id=str(row["key_id"]),
            tenant_id=row["tenant_id"],
            detail={"prefix": row["prefix"]},
        )
    return find(conn, str(row["key_id"]), tenant_id)


def rotate(
    conn: psycopg.Connection,
    ref: str,
    *,
    actor: str,
    grace: timedelta,
    tenant_id: int | None = None,
) -> tuple[NewKey, dict]:
    """A new key with the old one's tenant, role, name and expiry; the old key keeps working
    for ``grace`` (or its own expiry, if sooner)."""
    old = find(conn, ref, tenant_id)
    if old["revoked_at"] is not None:
        raise ApiKeyError(f"API key {old['prefix']} is revoked: create a new one instead")
    new = create(
        conn,
        tenant=None,
        tenant_id=old["tenant_id"],
        role=old["role"],
        name=old["name"],
        actor=actor,
        expires_at=old["expires_at"],
    )
    conn.execute(
        "UPDATE api_keys SET replaced_by = %s,"
        " expires_at = CASE WHEN expires_at IS NULL OR expires_at > now() + %s"
        "                   THEN greatest(now() + %s, created_at + interval '1 second')"
        "                   ELSE expires_at END"
        " WHERE key_id = %s",
        (new.key_id, grace, grace, old["key_id"]),
    )
    if grace <= timedelta(0):
        conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = %s", (old["key_id"],))
    audit(
        conn,
        actor=actor,
        action="api_key.rotated",
        entity="api_key",
        entity_id=str(old["key_id"]),
        tenant_id=old["tenant_id"],
        detail={
            "prefix": old["prefix"],
            "new_key_id": new.key_id,
            "new_prefix": new.prefix,
            "grace_hours": grace.total_seconds() / 3600,
        },
    )
    return new, find(conn, str(old["key_id"]), tenant_id)


def list_keys(conn: psycopg.Connection, tenant: str | None = None) -> list[dict]:
    sql = (
        f"SELECT k.{KEY_COLUMNS.replace(', ', ', k.')}, t.slug AS tenant FROM api_keys k"
        " LEFT JOIN tenants t USING (tenant_id)"
    )
    params: list = []
    if tenant is not None:
        sql += " WHERE t.slug = %s"
        params.append(tenant)
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql + " ORDER BY k.key_id", params).fetchall()
