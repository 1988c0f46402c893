"""Connections to the application database, tenant scoping for row-level security, named queries."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from iiot_orchestration.errors import IiotError
from iiot_orchestration.settings import mask_password

APP_ROLES = ("app_rw", "platform_rw", "readonly_audit", "migration_admin")
_QUERY_HEADER = re.compile(r"^-- name: ([a-z_]+)\s*$", re.MULTILINE)


class DatabaseUnavailable(IiotError):
    """The database could not be reached; the message names the (password-masked) URL."""


def open_connection(
    database_url: str,
    *,
    autocommit: bool = False,
    application_name: str = "iiot",
    role: str | None = None,
    connect_timeout: int = 10,
) -> psycopg.Connection:
    """A new connection, optionally as ``role``; the caller closes it."""
    if role is not None and role not in APP_ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(APP_ROLES)}")
    try:
        conn = psycopg.connect(
            database_url,
            autocommit=autocommit,
            application_name=application_name,
            connect_timeout=connect_timeout,
        )
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DatabaseUnavailable(
            f"cannot connect to {mask_password(database_url)}: {reason}"
        ) from exc
    if role is not None:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        if not autocommit:
            conn.commit()
    return conn


@contextmanager
def connect(database_url: str, **options: Any) -> Iterator[psycopg.Connection]:
    """A connection that commits on success and rolls back on error (see open_connection)."""
    with open_connection(database_url, **options) as conn:
        yield conn


def set_tenant(conn: psycopg.Connection, tenant_id: int | None) -> None:
    """Scope the current transaction to one tenant for row-level security (app_rw)."""
    value = "" if tenant_id is None else str(int(tenant_id))
    conn.execute("SELECT set_config('iiot.tenant_id', %s, true)", (value,))


def set_actor(conn: psycopg.Connection, actor: str) -> None:
    """Name who makes the changes of the current transaction (used by history triggers)."""
    conn.execute("SELECT set_config('iiot.actor', %s, true)", (actor,))


@cache
def queries() -> dict[str, str]:
    """Named queries from ``sql/queries.sql``, loaded once."""
    text = resources.files("iiot_orchestration").joinpath("sql/queries.sql").read_text()
    parts = _QUERY_HEADER.split(text)
    named = dict(zip(parts[1::2], (body.strip() for body in parts[2::2]), strict=True))
    if len(named) != len(parts[1::2]):
        raise RuntimeError("sql/queries.sql names a query twice")
    return named


def query(name: str) -> str:
    try:
        return queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in sql/queries.sql") from None
