"""Database logins bound to one tenant (docs/security.md): LOGIN roles in ``tenant_reader`` that
read only the views of schema ``tenant``, created, listed, rotated and revoked here.

Each change is one transaction: the role, its ``tenant_logins`` row and its audit row. Passwords
reach the server only as SCRAM verifiers computed here, so the plaintext is in no server log.
"""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from iiot_orchestration.db import set_actor
from iiot_orchestration.errors import IiotError
from iiot_orchestration.registry import audit
from iiot_orchestration.settings import to_url

GROUP_ROLE = "tenant_reader"
LOGIN_NAME = re.compile(r"[a-z][a-z0-9_]{2,62}")
LOGIN_NAME_RULE = "3-63 lowercase letters, digits and '_', starting with a letter"
DEFAULT_CONNECTION_LIMIT = 5
MAX_CONNECTION_LIMIT = 100
STATEMENT_TIMEOUT = "5min"
SEARCH_PATH = "tenant, public"
PASSWORD_BYTES = 24  # 32 url-safe characters
TERMINATE_WAIT_MS = 5000
_SUFFIX_ALPHABET = string.ascii_lowercase + string.digits
_SUFFIX_LENGTH = 6


class TenantLoginError(IiotError):
    """A tenant login request was refused; the message says why and nothing was changed."""


class MissingPrivilege(TenantLoginError):
    """The connecting user lacks what managing tenant logins needs; the message names it."""


@dataclass(frozen=True)
class NewPassword:
    """A created or rotated login with its password, which exists only in this object."""

    login: str
    tenant: str
    tenant_id: int
    password: str
    valid_until: datetime | None
    connection_limit: int | None


@dataclass(frozen=True)
class TenantLogin:
    login: str
    tenant: str
    tenant_id: int
    created_at: datetime
    created_by: str
    valid_until: datetime | None
    rotated_at: datetime | None
    revoked_at: datetime | None
    revoked_by: str | None
    state: str  # active, expired, revoked, or missing (the role was dropped by hand)


@dataclass(frozen=True)
class Revocation:
    login: str
    tenant: str
    revoked_at: datetime
    revoked_by: str
    already_revoked: bool
    sessions_terminated: int
    sessions_left: int  # still open: terminating them needs pg_signal_backend


def check_login_name(login: str) -> str:
    if not LOGIN_NAME.fullmatch(login):
        raise TenantLoginError(f"bad login name {login[:70]!r}: use {LOGIN_NAME_RULE}")
    if login.startswith("pg_"):
        raise TenantLoginError(f"bad login name {login!r}: PostgreSQL reserves names 'pg_*'")
    return login


def default_login_name(slug: str) -> str:
    """``t_<slug>_<6 random characters>``, the slug shortened to fit 63 characters."""
    suffix = "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(_SUFFIX_LENGTH))
    stem = slug.replace("-", "_")[: 63 - len("t__") - _SUFFIX_LENGTH]
    return f"t_{stem}_{suffix}"


def connection_url(database_url: str, login: str, password: str) -> str:
    """The URL a tenant connects with: host, port and database of ``database_url``."""
    params = conninfo_to_dict(database_url)
    return to_url(
        {
            "user": login,
            "password": password,
            "host": params.get("host") or "localhost",
            "port": params.get("port"),
            "dbname": params.get("dbname") or login,
        }
    )


def check_privileges(conn: psycopg.Connection, *, manage: bool = True) -> None:
    """MissingPrivilege unless the session user may read (``manage=False``) or manage logins.

    Managing needs CREATEROLE (with ADMIN OPTION on tenant_reader from PostgreSQL 16) and the
    right to write tenant_logins, which only its owner (migration_admin) has; or a superuser.
    """
    if conn.execute("SELECT to_regclass('public.tenant_logins')").fetchone()[0] is None:
        raise TenantLoginError("table tenant_logins does not exist: run `iiot db migrate` first")
    with conn.cursor(row_factory=dict_row) as cur:
        me = cur.execute(
            "SELECT current_user AS name, r.rolsuper AS superuser, r.rolcreaterole AS createrole,"
            " has_table_privilege('public.tenant_logins', 'SELECT') AS can_read,"
            " has_table_privilege('public.tenant_logins', 'INSERT, UPDATE') AS can_write,"
            " has_table_privilege('public.audit_log', 'INSERT') AS can_audit,"
            " pg_has_role(%s, 'USAGE WITH ADMIN OPTION') AS group_admin,"
            " current_setting('server_version_num')::int >= 160000 AS needs_group_admin"
            " FROM pg_roles r WHERE r.rolname = current_user",
            (GROUP_ROLE,),
        ).fetchone()
    if me["superuser"]:
        return
    name = me["name"]
    if not manage:
        if not me["can_read"]:
            raise MissingPrivilege(
                f"database user {name!r} cannot read tenant_logins: connect as a member of "
                "migration_admin, platform_rw or readonly_audit, or as a superuser"
            )
        return
    missing = []
    if not me["createrole"]:
        missing.append(f"CREATEROLE (ALTER ROLE {name} CREATEROLE)")
    if me["needs_group_admin"] and not me["group_admin"]:
        missing.append(
            f"ADMIN OPTION on {GROUP_ROLE} (GRANT {GROUP_ROLE} TO {name} WITH ADMIN OPTION)"
        )
    if not (me["can_write"] and me["can_audit"]):
        missing.append(
            "membership in migration_admin, the owner of tenant_logins "
            f"(GRANT migration_admin TO {name})"
        )
    if missing:
        raise MissingPrivilege(
            f"database user {name!r} cannot manage tenant logins: it needs "
            + " and ".join(missing)
            + ", or connect as a superuser"
        )


def create_login(
    conn: psycopg.Connection,
    tenant: str,
    *,
    login: str | None = None,
    valid_until: date | None = None,
    connection_limit: int = DEFAULT_CONNECTION_LIMIT,
    actor: str = "cli",
    today: date | None = None,
) -> NewPassword:
    """Create a login for ``tenant`` with a new random password, in one transaction.

    ``valid_until`` is the day (00:00 UTC) the password stops working; it must be after today.
    """
    if login is not None:
        check_login_name(login)
    if not 1 <= connection_limit <= MAX_CONNECTION_LIMIT:
        raise TenantLoginError(
            f"connection limit must be between 1 and {MAX_CONNECTION_LIMIT}, not {connection_limit}"
        )
    expires = None
    if valid_until is not None:
        today = today or datetime.now(UTC).date()
        if valid_until <= today:
            raise TenantLoginError(
                f"--valid-until {valid_until.isoformat()} is not in the future: the login would "
                "never work (it expires at 00:00 UTC of that day)"
            )
        expires = datetime.combine(valid_until, time(0), tzinfo=UTC)
    with conn.transaction():
        check_privileges(conn)
        set_actor(conn, actor)
        row = conn.execute("SELECT tenant_id FROM tenants WHERE slug = %s", (tenant,)).fetchone()
        if row is None:
            raise TenantLoginError(
                f"unknown tenant {tenant[:70]!r}: `iiot tenants list` shows the tenants"
            )
        tenant_id = row[0]
        if login is None:
            login = default_login_name(tenant)
            while _role_exists(conn, login):
                login = default_login_name(tenant)
        elif _role_exists(conn, login):
            raise TenantLoginError(
                f"a database role named {login!r} already exists: pick another --name"
            )
        if conn.execute("SELECT 1 FROM tenant_logins WHERE login = %s", (login,)).fetchone():
            raise TenantLoginError(
                f"login {login!r} is already in tenant_logins: pick another --name"
            )
        password = secrets.token_urlsafe(PASSWORD_BYTES)
        statement = sql.SQL(
            "CREATE ROLE {login} LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION"
            " NOBYPASSRLS PASSWORD {verifier} IN ROLE {group} CONNECTION LIMIT {limit}"
        ).format(
            login=sql.Identifier(login),
            verifier=sql.Literal(_verifier(conn, login, password)),
            group=sql.Identifier(GROUP_ROLE),
            limit=sql.Literal(int(connection_limit)),
        )
        if expires is not None:
            statement += sql.SQL(" VALID UNTIL {}").format(sql.Literal(expires.isoformat()))
        try:
            with conn.transaction():
                conn.execute(statement)
        except psycopg.errors.DuplicateObject:
            raise TenantLoginError(f"a database role named {login!r} already exists") from None
        # BI tools find the tenant's views before the tables they cannot read, and the
        # functions in public (iiot_current_tenant, TimescaleDB's time_bucket); a runaway query
        # is stopped
        conn.execute(
            sql.SQL("ALTER ROLE {} SET search_path = {}").format(
                sql.Identifier(login), sql.SQL(SEARCH_PATH)
            )
        )
        conn.execute(
            sql.SQL("ALTER ROLE {} SET statement_timeout = {}").format(
                sql.Identifier(login), sql.Literal(STATEMENT_TIMEOUT)
            )
        )
        conn.execute(
            "INSERT INTO tenant_logins (login, tenant_id, valid_until) VALUES (%s, %s, %s)",
            (login, tenant_id, expires),
        )
        audit(
            conn,
            actor=actor,
            action="tenant_login.created",
            entity="tenant_login",
            entity_id=login,
            tenant_id=tenant_id,
            detail={
                "valid_until": expires.isoformat() if expires else None,
                "connection_limit": connection_limit,
            },
        )
    return NewPassword(login, tenant, tenant_id, password, expires, connection_limit)


def list_logins(
    conn: psycopg.Connection, tenant: str | None = None, *, include_revoked: bool = False
) -> list[TenantLogin]:
    """Tenant logins by tenant and creation, revoked ones only with ``include_revoked``."""
    check_privileges(conn, manage=False)
    if (
        tenant is not None
        and not conn.execute("SELECT 1 FROM tenants WHERE slug = %s", (tenant,)).fetchone()
    ):
        raise TenantLoginError(
            f"unknown tenant {tenant[:70]!r}: `iiot tenants list` shows the tenants"
        )
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT l.login, t.slug AS tenant, l.tenant_id, l.created_at, l.created_by,"
            "       l.valid_until, l.rotated_at, l.revoked_at, l.revoked_by,"
            "       CASE WHEN l.revoked_at IS NOT NULL THEN 'revoked'"
            "            WHEN r.rolname IS NULL THEN 'missing'"
            "            WHEN l.valid_until <= now() THEN 'expired'"
            "            ELSE 'active' END AS state"
            "  FROM tenant_logins l JOIN tenants t USING (tenant_id)"
            "  LEFT JOIN pg_roles r ON r.rolname = l.login"
            " WHERE (%(tenant)s::text IS NULL OR t.slug = %(tenant)s)"
            "   AND (%(all)s OR l.revoked_at IS NULL)"
            " ORDER BY t.slug, l.created_at, l.login",
            {"tenant": tenant, "all": include_revoked},
        ).fetchall()
    return [TenantLogin(**row) for row in rows]


def revoke_login(conn: psycopg.Connection, login: str, *, actor: str = "cli") -> Revocation:
    """Disable ``login`` and end its sessions; revoking again changes nothing and says so.

    Commits before terminating the sessions, so a terminated client cannot log in again; call
    it outside a transaction.
    """
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise psycopg.ProgrammingError("revoke_login commits its own transaction")
    with conn.transaction():
        check_privileges(conn)
        set_actor(conn, actor)
        found = _locked_login(conn, login)
        role_exists = _check_tenant_role(conn, login)
        if role_exists:
            conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(login)))
        already = found["revoked_at"] is not None
        if not already:
            with conn.cursor(row_factory=dict_row) as cur:
                found.update(
                    cur.execute(
                        "UPDATE tenant_logins SET revoked_at = now(), revoked_by = session_user"
                        " WHERE login = %s RETURNING revoked_at, revoked_by",
                        (login,),
                    ).fetchone()
                )
            audit(
                conn,
                actor=actor,
                action="tenant_login.revoked",
                entity="tenant_login",
                entity_id=login,
                tenant_id=found["tenant_id"],
                detail={"role_existed": role_exists},
            )
    terminated, left = _terminate_sessions(conn, login)
    return Revocation(
        login,
        found["tenant"],
        found["revoked_at"],
        found["revoked_by"],
        already,
        terminated,
        left,
    )


def rotate_login(conn: psycopg.Connection, login: str, *, actor: str = "cli") -> NewPassword:
    """Give ``login`` a new random password; the old one stops working at once."""
    with conn.transaction():
        check_privileges(conn)
        set_actor(conn, actor)
        found = _locked_login(conn, login)
        if found["revoked_at"] is not None:
            raise TenantLoginError(
                f"login {login!r} was revoked at {found['revoked_at']:%Y-%m-%d %H:%M:%S%z}: "
                "create a new login instead"
            )
        if not _check_tenant_role(conn, login):
            raise TenantLoginError(
                f"login {login!r} is in tenant_logins but its role no longer exists: revoke it"
            )
        password = secrets.token_urlsafe(PASSWORD_BYTES)
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(login), sql.Literal(_verifier(conn, login, password))
            )
        )
        conn.execute("UPDATE tenant_logins SET rotated_at = now() WHERE login = %s", (login,))
        audit(
            conn,
            actor=actor,
            action="tenant_login.rotated",
            entity="tenant_login",
            entity_id=login,
            tenant_id=found["tenant_id"],
        )
    return NewPassword(
        login, found["tenant"], found["tenant_id"], password, found["valid_until"], None
    )


def _verifier(conn: psycopg.Connection, login: str, password: str) -> str:
    """The SCRAM-SHA-256 verifier of ``password``, computed here: the server never sees it."""
    return conn.pgconn.encrypt_password(
        password.encode(), login.encode(), b"scram-sha-256"
    ).decode()


def _role_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is not None


def _locked_login(conn: psycopg.Connection, login: str) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        found = cur.execute(
            "SELECT l.login, l.tenant_id, t.slug AS tenant, l.valid_until, l.revoked_at,"
            "       l.revoked_by"
            "  FROM tenant_logins l JOIN tenants t USING (tenant_id)"
            " WHERE l.login = %s FOR UPDATE OF l",
            (login,),
        ).fetchone()
    if found is None:
        raise TenantLoginError(
            f"{login[:70]!r} is not a tenant login (`iiot tenants logins list --all` shows them): "
            "nothing changed"
        )
    return found


def _check_tenant_role(conn: psycopg.Connection, login: str) -> bool:
    """Whether the role exists; TenantLoginError when it is anything but a tenant login.

    tenant_logins is written only by its owner, but a role listed there by mistake (a person's
    login, a service role) must never be disabled or given a new password by this module.
    """
    with conn.cursor(row_factory=dict_row) as cur:
        role = cur.execute(
            "SELECT r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication"
            "       OR r.rolbypassrls AS powerful,"
            "       coalesce(array_agg(m.roleid::regrole::text ORDER BY m.roleid::regrole::text)"
            "                FILTER (WHERE m.roleid IS NOT NULL), '{}') AS groups"
            "  FROM pg_roles r LEFT JOIN pg_auth_members m ON m.member = r.oid"
            " WHERE r.rolname = %s GROUP BY r.oid, r.rolsuper, r.rolcreaterole, r.rolcreatedb,"
            "       r.rolreplication, r.rolbypassrls",
            (login,),
        ).fetchone()
    if role is None:
        return False
    if role["powerful"] or role["groups"] != [GROUP_ROLE]:
        raise TenantLoginError(
            f"refusing to change role {login!r}: it is listed in tenant_logins but is not a "
            f"tenant login (it must be a plain member of {GROUP_ROLE} and nothing else); "
            "nothing changed"
        )
    return True


def _terminate_sessions(conn: psycopg.Connection, login: str) -> tuple[int, int]:
    """(terminated, left open) sessions of ``login`` on the whole server."""
    with conn.transaction():
        allowed = conn.execute(
            "SELECT rolsuper OR pg_has_role('pg_signal_backend', 'USAGE')"
            "  FROM pg_roles WHERE rolname = current_user"
        ).fetchone()[0]
        if not allowed:
            open_sessions = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (login,)
            ).fetchone()[0]
            return 0, open_sessions
        terminated, found = conn.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, %s)), count(*)"
            "  FROM pg_stat_activity WHERE usename = %s AND pid <> pg_backend_pid()",
            (TERMINATE_WAIT_MS, login),
        ).fetchone()
    return terminated, found - terminated
