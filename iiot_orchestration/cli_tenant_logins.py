"""``iiot tenants logins``: database logins bound to one tenant, for BI tools and analysts that
read the tenant's views directly (docs/cli.md#tenant-logins, docs/security.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, date, datetime
from typing import Any

import click
import psycopg

from iiot_orchestration import tenant_logins
from iiot_orchestration.cli_archive import DAY
from iiot_orchestration.cli_common import HelpGroup, _json, _settings, _table, friendly_errors
from iiot_orchestration.db import connect
from iiot_orchestration.tenant_logins import NewPassword, TenantLoginError

_SHOWN_ONCE_WARNING = (
    "warning: this password is shown only now and is stored nowhere (the database keeps only its "
    "SCRAM verifier); hand it to the tenant over a secure channel"
)


@contextmanager
def _connection() -> Iterator[tuple[psycopg.Connection, str]]:
    """The session user of IIOT_DATABASE_URL (no SET ROLE), and the URL."""
    url = _settings().require_database_url()
    try:
        with connect(url, autocommit=True, application_name="iiot-tenant-logins") as conn:
            yield conn, url
    except psycopg.errors.InsufficientPrivilege as exc:
        reason = (exc.diag.message_primary or str(exc)).strip()
        raise tenant_logins.MissingPrivilege(
            f"the database refused: {reason} (managing tenant logins needs CREATEROLE and "
            "membership in migration_admin, or a superuser)"
        ) from None


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _json_object(value: dict[str, Any]) -> str:
    return json.dumps(value, indent=2, default=str, ensure_ascii=False)


def _show_password(new: NewPassword, url: str, as_json: bool, headline: str) -> None:
    connection_url = tenant_logins.connection_url(url, new.login, new.password)
    if as_json:
        click.echo(_json_object({**asdict(new), "url": connection_url}))
    else:
        click.echo(headline)
        click.echo(f"login:    {new.login}")
        click.echo(f"password: {new.password}")
        click.echo(f"url:      {connection_url}")
    click.secho(_SHOWN_ONCE_WARNING, fg="yellow", err=True)


@click.group("logins", cls=HelpGroup)
def logins_group() -> None:
    """Database logins bound to one tenant: they read only its views in schema `tenant`."""


@logins_group.command("create")
@click.option("--tenant", required=True, help="Tenant slug.")
@click.option(
    "--name",
    "login",
    help="Login name (3-63 of a-z, 0-9, '_', starting with a letter) "
    "[default: t_<tenant>_<6 random characters>].",
)
@click.option(
    "--valid-until",
    type=DAY,
    help="Day the password stops working (00:00 UTC); must be in the future [default: never].",
)
@click.option(
    "--connection-limit",
    type=click.IntRange(1, tenant_logins.MAX_CONNECTION_LIMIT),
    default=tenant_logins.DEFAULT_CONNECTION_LIMIT,
    show_default=True,
    help="Sessions the login may hold at once.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@friendly_errors
def create_command(
    tenant: str,
    login: str | None,
    valid_until: date | None,
    connection_limit: int,
    as_json: bool,
) -> None:
    """Create a login for one tenant and print its password, once.

    Needs CREATEROLE and membership in migration_admin (the owner of tenant_logins), or a
    superuser.
    """
    try:
        if login is not None:
            tenant_logins.check_login_name(login)
    except TenantLoginError as exc:
        raise click.BadParameter(str(exc), param_hint="--name") from None
    if valid_until is not None and valid_until <= datetime.now(UTC).date():
        raise click.BadParameter(
            f"{valid_until.isoformat()} is not in the future (the password stops working at "
            "00:00 UTC of that day)",
            param_hint="--valid-until",
        )
    with _connection() as (conn, url):
        new = tenant_logins.create_login(
            conn,
            tenant,
            login=login,
            valid_until=valid_until,
            connection_limit=connection_limit,
        )
    until = f"valid until {_when(new.valid_until)}" if new.valid_until else "no expiry"
    _show_password(
        new,
        url,
        as_json,
        f"Created tenant login {new.login} for tenant {new.tenant} (id {new.tenant_id}): "
        f"connection limit {new.connection_limit}, {until}.",
    )


@logins_group.command("list")
@click.option("--tenant", help="Only this tenant's logins (slug).")
@click.option("--all", "include_revoked", is_flag=True, help="Also the revoked logins.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def list_command(tenant: str | None, include_revoked: bool, as_json: bool) -> None:
    """List tenant logins: tenant, who created them, expiry, last rotation and state."""
    with _connection() as (conn, _url):
        found = tenant_logins.list_logins(conn, tenant, include_revoked=include_revoked)
    if as_json:
        click.echo(_json([asdict(login) for login in found]))
        return
    headers = ["login", "tenant", "created_at", "created_by", "valid_until", "rotated_at"]
    if include_revoked:
        headers.append("revoked_at")
    rows = []
    for login in found:
        row = [
            login.login,
            login.tenant,
            _when(login.created_at),
            login.created_by,
            _when(login.valid_until),
            _when(login.rotated_at),
        ]
        if include_revoked:
            row.append(_when(login.revoked_at))
        rows.append([*row, login.state])
    click.echo(_table([*headers, "state"], rows))


@logins_group.command("revoke")
@click.argument("login")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@friendly_errors
def revoke_command(login: str, as_json: bool) -> None:
    """Disable tenant login LOGIN for good and end its open sessions.

    Refuses any role that is not a tenant login. Revoking again changes nothing (exit 0).
    """
    with _connection() as (conn, _url):
        done = tenant_logins.revoke_login(conn, login)
    if as_json:
        click.echo(_json_object(asdict(done)))
    elif done.already_revoked:
        click.echo(
            f"Tenant login {done.login} was already revoked at {_when(done.revoked_at)} by "
            f"{done.revoked_by}; {done.sessions_terminated} open sessions terminated."
        )
    else:
        click.echo(
            f"Revoked tenant login {done.login} of tenant {done.tenant}: it can no longer log in; "
            f"{done.sessions_terminated} open sessions terminated."
        )
    if done.sessions_left:
        click.secho(
            f"warning: {done.sessions_left} sessions of {done.login} are still open: terminating "
            "them needs pg_signal_backend or a superuser; they read nothing now that the login "
            "is revoked",
            fg="yellow",
            err=True,
        )


@logins_group.command("rotate")
@click.argument("login")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@friendly_errors
def rotate_command(login: str, as_json: bool) -> None:
    """Give tenant login LOGIN a new password and print it, once; the old one stops working.

    Open sessions stay open (revoke ends them).
    """
    with _connection() as (conn, url):
        new = tenant_logins.rotate_login(conn, login)
    _show_password(
        new,
        url,
        as_json,
        f"New password for tenant login {new.login} of tenant {new.tenant}; the old one no "
        "longer works.",
    )
