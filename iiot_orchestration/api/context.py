"""Per-request database sessions: authenticate the key, scope the transaction to its tenant.

Every route takes a ``Session`` through ``viewer``, ``editor``, ``admin`` or ``platform``. The
session's connection is a pooled one in role ``app_rw``; ``iiot_api_authenticate()`` finds the
key by its SHA-256 and sets ``iiot.tenant_id`` for the transaction, so PostgreSQL's row-level
security confines every statement of the request to the key's tenant. The transaction commits
when the route returns (before the response is sent) and rolls back when it raises.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import psycopg
from fastapi import Depends, Header, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from iiot_orchestration.api import keys
from iiot_orchestration.api.errors import ApiError
from iiot_orchestration.registry import audit as write_audit

RANKS = {"viewer": 1, "editor": 2, "admin": 3, "platform": 4}
TENANT_HEADER = "X-IIOT-Tenant"

_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer iiot_<prefix>_<secret>`")
_key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    scheme_name="ApiKeyHeader",
    description="The same key in a header of its own, for clients that cannot send Bearer.",
)
_ACTING_FOR = Header(
    alias=TENANT_HEADER,
    description="Platform keys only: the slug of the tenant the request acts for (a tenant "
    "key's tenant comes from the key, and this header is ignored).",
)


def make_pool(database_url: str, *, size: int = 8) -> ConnectionPool:
    """Connections in role app_rw (``SET ROLE`` once per connection)."""

    def configure(conn: psycopg.Connection) -> None:
        conn.execute("SET ROLE app_rw")
        conn.commit()

    return ConnectionPool(
        database_url,
        min_size=1,
        max_size=size,
        configure=configure,
        kwargs={"application_name": "iiot-api"},
        open=False,
        name="iiot-api",
    )


class TokenBuckets:
    """One token bucket per API key: ``rate`` a second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: dict[int, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key_id: int) -> float:
        """0 when the request may go on, else the seconds until a token is there."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[key_id] = (tokens - 1, now)
                return 0.0
            self._buckets[key_id] = (tokens, now)
            return (1 - tokens) / self.rate


@dataclass
class Session:
    """One authenticated request: its transaction, its key and (unless platform-wide) tenant."""

    conn: psycopg.Connection
    key_id: int
    role: str
    key_name: str
    tenant_id: int | None
    tenant_slug: str | None
    request_id: str
    digest: bytes

    @property
    def actor(self) -> str:
        return f"api-key:{self.key_id}"

    def tenant(self) -> int:
        """The tenant of the request; a platform key must name one with X-IIOT-Tenant."""
        if self.tenant_id is None:
            raise _tenant_required()
        return self.tenant_id

    def audit(self, action: str, entity: str, entity_id: Any = None, **detail: Any) -> None:
        """An audit row of the request's tenant, naming the key and the request."""
        write_audit(
            self.conn,
            actor=self.actor,
            action=action,
            entity=entity,
            entity_id=entity_id,
            tenant_id=self.tenant(),
            detail={"request_id": self.request_id, **detail},
        )

    def rows(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(sql, params).fetchall()

    def row(self, sql: str, params: Any = None) -> dict[str, Any] | None:
        with self.conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(sql, params).fetchone()


def _a(role: str) -> str:
    return f"{'an' if role[0] in 'aeiou' else 'a'} {role}"


def _tenant_required() -> ApiError:
    return ApiError(
        400,
        f"a platform key acts for one tenant per request: name it with {TENANT_HEADER}",
        code="tenant_required",
    )


POOL_WAIT_SECONDS = 10.0


@contextmanager
def _pooled(pool: ConnectionPool) -> Iterator[psycopg.Connection]:
    """A pooled connection, or a 503 when the database cannot give one in POOL_WAIT_SECONDS."""
    try:
        manager = pool.connection(timeout=POOL_WAIT_SECONDS)
        conn = manager.__enter__()
    except (PoolTimeout, psycopg.OperationalError) as exc:
        raise ApiError(
            503,
            "the database is unavailable; retry later",
            code="unavailable",
            headers={"Retry-After": "5"},
        ) from exc
    try:
        yield conn
    except BaseException as exc:
        if not manager.__exit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        manager.__exit__(None, None, None)


def _presented_key(bearer: HTTPAuthorizationCredentials | None, header: str | None) -> str:
    if bearer is not None and bearer.credentials:
        return bearer.credentials.strip()
    if header:
        return header.strip()
    raise ApiError(
        401,
        "an API key is required: send `Authorization: Bearer <key>` (`iiot api-keys create`)",
        code="unauthenticated",
        headers={"WWW-Authenticate": "Bearer"},
    )


def open_session(
    request: Request,
    key: str,
    acting_for: str | None,
    minimum: str,
    *,
    needs_tenant: bool = True,
) -> Iterator[Session]:
    """Authenticate ``key``; refuse it below ``minimum``, and a platform key that names no
    tenant for an operation of one tenant (``needs_tenant``) before the request is validated."""
    refused = ApiError(
        401,
        "the API key is unknown, revoked or expired",
        code="unauthenticated",
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )
    if not keys.well_formed(key):
        raise refused
    state = request.app.state
    digest = keys.digest(key)
    with _pooled(state.pool) as conn, conn.transaction():
        found = conn.execute(
            "SELECT key_id, tenant_id, tenant_slug, role, key_name"
            " FROM iiot_api_authenticate(%s, %s)",
            (digest, acting_for or None),
        ).fetchone()
        if found is None:
            # a platform key naming an unknown tenant gets 404; any other key 401
            if (
                acting_for
                and conn.execute(
                    "SELECT 1 FROM iiot_api_authenticate(%s, NULL) WHERE role = 'platform'",
                    (digest,),
                ).fetchone()
            ):
                raise ApiError(404, f"tenant {acting_for[:70]!r} not found")
            raise refused
        key_id, tenant_id, slug, role, name = found
        if role != keys.PLATFORM:
            acting_for = None  # a tenant key's tenant comes from the key and nothing else
        request.state.key_id = key_id
        wait = state.buckets.take(key_id)
        if wait > 0:
            raise ApiError(
                429,
                f"rate limit of {state.settings.api_rate_per_second} requests a second for this "
                f"key exceeded; retry in {wait:.2f} s",
                code="rate_limited",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        if RANKS[role] < RANKS[minimum]:
            raise ApiError(
                403,
                f"{_a(role)} key cannot do this: it needs {_a(minimum)} key",
                code="forbidden",
            )
        if needs_tenant and tenant_id is None:
            raise _tenant_required()
        yield Session(
            conn,
            key_id,
            role,
            name,
            tenant_id,
            slug,
            getattr(request.state, "request_id", ""),
            digest,
        )


def _requiring(minimum: str, *, needs_tenant: bool = True):
    def dependency(
        request: Request,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        header_key: Annotated[str | None, Depends(_key_header)],
        acting_for: Annotated[str | None, _ACTING_FOR] = None,
    ) -> Iterator[Session]:
        key = _presented_key(bearer, header_key)
        yield from open_session(request, key, acting_for, minimum, needs_tenant=needs_tenant)

    dependency.__name__ = f"{minimum}_session"  # the role in the OpenAPI document: x-iiot-role
    return Depends(dependency, scope="function")


Viewer = Annotated[Session, _requiring("viewer")]
Editor = Annotated[Session, _requiring("editor")]
Admin = Annotated[Session, _requiring("admin")]
Platform = Annotated[Session, _requiring("platform", needs_tenant=False)]
# any key, a platform key with or without X-IIOT-Tenant (GET /me)
AnyKey = Annotated[Session, _requiring("viewer", needs_tenant=False)]
