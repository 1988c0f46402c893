"""API keys of the caller's tenant (admin), the key itself (any role), tenants (platform)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, Field, field_validator

from iiot_orchestration.api import keys
from iiot_orchestration.api.context import Admin, AnyKey, Platform
from iiot_orchestration.api.errors import ApiError, keyed_router, not_found
from iiot_orchestration.api.pagination import Cursor, Limit, Page, decode, page
from iiot_orchestration.errors import IiotError

router = keyed_router("keys")


class Me(BaseModel):
    key_id: int
    role: str
    name: str
    tenant: str | None


class ApiKey(BaseModel):
    key_id: int
    prefix: str
    role: str
    name: str
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    replaced_by: int | None


class NewApiKey(BaseModel):
    key: str = Field(description="The whole key: shown once, never again.")
    api_key: ApiKey


class KeyRequest(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    role: Literal["viewer", "editor", "admin"]
    expires_at: datetime | None = Field(
        default=None, description="In the future; without a zone, UTC. Omit for no expiry."
    )

    @field_validator("expires_at")
    @classmethod
    def _in_the_future(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        if value <= datetime.now(UTC):
            raise ValueError("the expiry must be in the future")
        return value


class Tenant(BaseModel):
    tenant_id: int
    slug: str
    name: str
    plan_id: str
    status: str
    timezone: str
    created_at: datetime


def _key_row(s, key_id: int) -> dict:
    row = s.row(f"SELECT {keys.KEY_COLUMNS} FROM api_keys WHERE key_id = %s", (key_id,))
    if row is None:
        raise not_found("API key")
    return row


@router.get("/me", response_model=Me, summary="The key of this request")
def me(s: AnyKey) -> Me:
    return Me(key_id=s.key_id, role=s.role, name=s.key_name, tenant=s.tenant_slug)


@router.get("/api-keys", response_model=Page[ApiKey], summary="The tenant's API keys")
def list_keys(s: Admin, limit: Limit = 100, cursor: Cursor = None) -> dict:
    after = decode(cursor, int)
    rows = s.rows(
        f"SELECT {keys.KEY_COLUMNS} FROM api_keys"
        " WHERE tenant_id = %s AND (%s::bigint IS NULL OR key_id > %s::bigint)"
        " ORDER BY key_id LIMIT %s",
        (s.tenant(), after, after, limit + 1),
    )
    return page(rows, limit, "key_id")


@router.post(
    "/api-keys",
    response_model=NewApiKey,
    status_code=201,
    summary="A new key of the tenant, shown once",
)
def create_key(s: Admin, body: KeyRequest) -> dict:
    try:
        new = keys.create(
            s.conn,
            tenant=None,
            tenant_id=s.tenant(),
            role=body.role,
            name=body.name,
            actor=s.actor,
            expires_at=body.expires_at,
        )
    except IiotError as exc:
        raise ApiError(422, str(exc), code="validation_error") from None
    return {"key": new.key, "api_key": _key_row(s, new.key_id)}


@router.post("/api-keys/{key_id}/revoke", response_model=ApiKey, summary="Revoke a key at once")
def revoke_key(s: Admin, key_id: int) -> dict:
    _key_row(s, key_id)
    keys.revoke(s.conn, str(key_id), actor=s.actor, tenant_id=s.tenant())
    return _key_row(s, key_id)


@router.post(
    "/api-keys/{key_id}/rotate",
    response_model=NewApiKey,
    status_code=201,
    summary="A new key; the old one keeps working for IIOT_API_KEY_GRACE_HOURS",
)
def rotate_key(s: Admin, key_id: int, request: Request) -> dict:
    _key_row(s, key_id)
    grace = timedelta(hours=request.app.state.settings.api_key_grace_hours)
    try:
        new, _old = keys.rotate(
            s.conn, str(key_id), actor=s.actor, grace=grace, tenant_id=s.tenant()
        )
    except IiotError as exc:
        raise ApiError(409, str(exc), code="conflict") from None
    return {"key": new.key, "api_key": _key_row(s, new.key_id)}


@router.get("/tenants", response_model=Page[Tenant], summary="Every tenant (platform keys)")
def tenants(s: Platform, limit: Limit = 100, cursor: Cursor = None) -> dict:
    after = decode(cursor, int) or 0
    rows = s.rows(
        "SELECT * FROM iiot_api_tenants(%s) WHERE tenant_id > %s ORDER BY tenant_id LIMIT %s",
        (s.digest, after, limit + 1),
    )
    return page(rows, limit, "tenant_id")
