"""Per-request database sessions: authenticate the key, scope the transaction to its tenant.

Every route takes a ``Session`` through ``viewer``, ``editor``, ``admin`` or ``platform``. The
session's connection is a pooled one in role ``app_rw``; ``iiot_api_authenticate()`` finds the
key by its SHA-256 and sets ``iiot.tenant_id`` for the transaction, so PostgreSQL's row-level
security confines every statement of the request to the key's tenant. The transaction commits
when the route returns (before the response is sent) and rolls back when it raises.

The hot reads (``AsyncViewer``: the latest reading) take an ``AsyncSession`` instead: the same
authentication and transaction on a connection of an asyncio pool, so that the request never
leaves the event loop. A synchronous session costs three hops through the thread pool (the
dependency's start and end and the route), about half of a short request's time under load
(docs/performance.md, "Tenant API").
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import psycopg
from fastapi import Depends, Header, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

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


def _pool_options(database_url: str, size: int, name: str) -> dict[str, Any]:
    """Connections in role app_rw: the role is a setting of the connection's start (``-c
    role=app_rw``), so that no statement runs before it and a ``RESET ROLE`` returns to it."""
    return {
        "conninfo": database_url,
        "min_size": 1,
        "max_size": size,
        "kwargs": {"application_name": "iiot-api", "options": "-c role=app_rw"},
        "open": False,
        "name": name,
    }


def make_pool(database_url: str, *, size: int = 8) -> ConnectionPool:
    """The pool of the requests' sessions."""
    return ConnectionPool(**_pool_options(database_url, size, "iiot-api"))


def make_async_pool(database_url: str, *, size: int = 8) -> AsyncConnectionPool:
    """The asyncio pool of the hot reads (``AsyncViewer``)."""
    return AsyncConnectionPool(**_pool_options(database_url, size, "iiot-api-async"))


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
class Caller:
    """The key of an authenticated request and (unless platform-wide) its tenant."""

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


@dataclass
class Session(Caller):
    """One authenticated request and its transaction."""

    conn: psycopg.Connection = None  # type: ignore[assignment]

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


@dataclass
class AsyncSession(Caller):
    """One authenticated request and its transaction on an asyncio connection (reads only)."""

    conn: psycopg.AsyncConnection = None  # type: ignore[assignment]

    async def rows(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        async with self.conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql, params)
            return await cur.fetchall()


def _a(role: str) -> str:
    return f"{'an' if role[0] in 'aeiou' else 'a'} {role}"


def _tenant_required() -> ApiError:
    return ApiError(
        400,
        f"a platform key acts for one tenant per request: name it with {TENANT_HEADER}",
        code="tenant_required",
    )


def _unavailable() -> ApiError:
    return ApiError(
        503,
        "the database is unavailable; retry later",
        code="unavailable",
        headers={"Retry-After": "5"},
    )


@contextmanager
def _pooled(pool: ConnectionPool, timeout: float) -> Iterator[psycopg.Connection]:
    """A pooled connection, or a 503 when the database cannot give one in ``timeout`` seconds
    (IIOT_API_POOL_TIMEOUT_SECONDS)."""
    try:
        manager = pool.connection(timeout=timeout)
        conn = manager.__enter__()
    except (PoolTimeout, psycopg.OperationalError) as exc:
        raise _unavailable() from exc
    try:
        yield conn
    except BaseException as exc:
        if not manager.__exit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        manager.__exit__(None, None, None)


@asynccontextmanager
async def _async_pooled(
    pool: AsyncConnectionPool, timeout: float
) -> AsyncIterator[psycopg.AsyncConnection]:
    """``_pooled`` of the asyncio pool."""
    try:
        manager = pool.connection(timeout=timeout)
        conn = await manager.__aenter__()
    except (PoolTimeout, psycopg.OperationalError) as exc:
        raise _unavailable() from exc
    try:
        yield conn
    except BaseException as exc:
        if not await manager.__aexit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        await manager.__aexit__(None, None, None)


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


AUTHENTICATE = (
    "SELECT key_id, tenant_id, tenant_slug, role, key_name FROM iiot_api_authenticate(%s, %s)"
)
# a platform key naming an unknown tenant gets 404; any other key 401
IS_PLATFORM = "SELECT 1 FROM iiot_api_authenticate(%s, NULL) WHERE role = 'platform'"


def _refused() -> ApiError:
    return ApiError(
        401,
        "the API key is unknown, revoked or expired",
        code="unauthenticated",
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


def _digest(key: str) -> bytes:
    if not keys.well_formed(key):
        raise _refused()
    return keys.digest(key)


def _not_found(acting_for: str | None, platform: bool) -> ApiError:
    """The error of a key ``iiot_api_authenticate`` refused."""
    if acting_for and platform:
        return ApiError(404, f"tenant {acting_for[:70]!r} not found")
    return _refused()


def _admit(
    request: Request, found: tuple, digest: bytes, minimum: str, *, needs_tenant: bool
) -> Caller:
    """The caller of a key ``iiot_api_authenticate`` found; refused when over its rate limit,
    below ``minimum``, or a platform key that names no tenant for an operation of one tenant
    (``needs_tenant``), all before the request is validated."""
    key_id, tenant_id, slug, role, name = found
    state = request.app.state
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
            403, f"{_a(role)} key cannot do this: it needs {_a(minimum)} key", code="forbidden"
        )
    if needs_tenant and tenant_id is None:
        raise _tenant_required()
    rid = getattr(request.state, "request_id", "")
    return Caller(key_id, role, name, tenant_id, slug, rid, digest)


def open_session(
    request: Request, key: str, acting_for: str | None, minimum: str, *, needs_tenant: bool = True
) -> Iterator[Session]:
    """Authenticate ``key`` and yield the request's session (``_admit``). A tenant key's tenant
    comes from the key and nothing else: ``acting_for`` is for platform keys only (the function
    ignores it for the others)."""
    digest = _digest(key)
    state = request.app.state
    with _pooled(state.pool, state.settings.api_pool_timeout_seconds) as conn, conn.transaction():
        found = conn.execute(AUTHENTICATE, (digest, acting_for or None)).fetchone()
        if found is None:
            platform = bool(acting_for) and conn.execute(IS_PLATFORM, (digest,)).fetchone()
            raise _not_found(acting_for, bool(platform))
        caller = _admit(request, found, digest, minimum, needs_tenant=needs_tenant)
        yield Session(**vars(caller), conn=conn)


async def open_async_session(
    request: Request, key: str, acting_for: str | None, minimum: str, *, needs_tenant: bool = True
) -> AsyncIterator[AsyncSession]:
    """``open_session`` on the asyncio pool. ``AsyncViewer``'s dependency lives as long as the
    request, so its ``COMMIT`` goes after the response has been sent (the session only reads)."""
    digest = _digest(key)
    state = request.app.state
    async with (
        _async_pooled(state.async_pool, state.settings.api_pool_timeout_seconds) as conn,
        conn.transaction(),
    ):
        found = await (await conn.execute(AUTHENTICATE, (digest, acting_for or None))).fetchone()
        if found is None:
            platform = acting_for and await (await conn.execute(IS_PLATFORM, (digest,))).fetchone()
            raise _not_found(acting_for, bool(platform))
        caller = _admit(request, found, digest, minimum, needs_tenant=needs_tenant)
        yield AsyncSession(**vars(caller), conn=conn)


async def _credentials(
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_key_header)],
    acting_for: Annotated[str | None, _ACTING_FOR] = None,
) -> tuple[str, str | None]:
    """The presented key and X-IIOT-Tenant, for both kinds of session (a coroutine: it does no
    I/O, and a plain function would take a hop through the thread pool)."""
    return _presented_key(bearer, header_key), acting_for


Credentials = Annotated[tuple[str, str | None], Depends(_credentials)]


def _requiring(minimum: str, *, needs_tenant: bool = True):
    def dependency(request: Request, credentials: Credentials) -> Iterator[Session]:
        yield from open_session(request, *credentials, minimum, needs_tenant=needs_tenant)

    dependency.__name__ = f"{minimum}_session"  # the role in the OpenAPI document: x-iiot-role
    return Depends(dependency, scope="function")


def _requiring_async(minimum: str):
    async def dependency(request: Request, credentials: Credentials) -> AsyncIterator[AsyncSession]:
        async for session in open_async_session(request, *credentials, minimum):
            yield session

    dependency.__name__ = f"{minimum}_session"
    return Depends(dependency, scope="request")


Viewer = Annotated[Session, _requiring("viewer")]
Editor = Annotated[Session, _requiring("editor")]
Admin = Annotated[Session, _requiring("admin")]
Platform = Annotated[Session, _requiring("platform", needs_tenant=False)]
# any key, a platform key with or without X-IIOT-Tenant (GET /me)
AnyKey = Annotated[Session, _requiring("viewer", needs_tenant=False)]
# the hot reads: a viewer's session on the asyncio pool
AsyncViewer = Annotated[AsyncSession, _requiring_async("viewer")]
