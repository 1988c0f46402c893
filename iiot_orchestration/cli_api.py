"""``iiot api`` serves the tenant API; ``iiot api-keys`` manages its keys (docs/api.md)."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime, timedelta

import click

from iiot_orchestration.api import keys
from iiot_orchestration.cli_common import HelpGroup, _json, _settings, _table, friendly_errors
from iiot_orchestration.db import connect

_SHOWN_ONCE = (
    "warning: this key is shown only now; the database keeps only its SHA-256. Hand it over a "
    "secure channel"
)


@click.command("api")
@click.option("--host", default=None, help="Interface to listen on [default: IIOT_API_HOST].")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=None, help="Port [default: IIOT_API_PORT]."
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    help="Server processes [default: IIOT_API_WORKERS].",
)
@friendly_errors
def api_command(host: str | None, port: int | None, workers: int | None) -> None:
    """Serve the tenant API (/api/v1, OpenAPI at /api/v1/openapi.json) with uvicorn."""
    import os
    import tempfile

    import uvicorn

    settings = _settings()
    host, port = host or settings.api_host, port or settings.api_port
    workers = workers or settings.api_workers
    options = {
        "host": host,
        "port": port,
        "log_config": None,
        "access_log": False,
        "proxy_headers": False,
        "server_header": False,
    }
    click.echo(
        f"iiot api on http://{host}:{port}/api/v1 (docs at /api/v1/docs), "
        f"{workers} worker{'s' if workers > 1 else ''}",
        err=True,
    )
    if workers == 1:
        from iiot_orchestration.api.app import create_app

        uvicorn.run(create_app(settings), **options)
        return
    # several processes: each builds the application from the environment, and their metrics
    # are summed through prometheus_client's multiprocess mode (files in a directory of ours)
    with tempfile.TemporaryDirectory(prefix="iiot-api-metrics-") as metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        os.environ["IIOT_API_WORKERS"] = str(workers)
        uvicorn.run(
            "iiot_orchestration.api.app:app_from_environment",
            factory=True,
            workers=workers,
            **options,
        )


@click.group("api-keys", cls=HelpGroup)
def api_keys_group() -> None:
    """API keys of the tenant API: create (shown once), list, revoke, rotate."""


def _expiry(days: int | None) -> datetime | None:
    return None if days is None else datetime.now(UTC) + timedelta(days=days)


@api_keys_group.command("create")
@click.option("--tenant", help="Slug of the tenant the key belongs to.")
@click.option(
    "--platform",
    is_flag=True,
    help="A platform key: acts for any tenant named by the X-IIOT-Tenant header.",
)
@click.option(
    "--role",
    type=click.Choice(keys.ROLES),
    default="viewer",
    show_default=True,
    help="viewer reads; editor also manages devices and acknowledges alerts; admin "
    "also manages keys and threshold rules.",
)
@click.option("--name", required=True, help="What the key is for (1 to 100 characters).")
@click.option(
    "--expires-in-days",
    type=click.IntRange(1, 3650),
    default=None,
    help="The key stops working after this many days [default: never].",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def create_command(
    tenant: str | None,
    platform: bool,
    role: str,
    name: str,
    expires_in_days: int | None,
    as_json: bool,
) -> None:
    """Create a key and print it once."""
    if platform == (tenant is not None):
        raise click.UsageError("give exactly one of --tenant SLUG and --platform")
    with connect(_settings().require_database_url(), role="platform_rw") as conn:
        new = keys.create(
            conn,
            tenant=tenant,
            role=keys.PLATFORM if platform else role,
            name=name,
            actor="cli",
            expires_at=_expiry(expires_in_days),
        )
    _show(new, as_json)


def _show(new: keys.NewKey, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(asdict(new), indent=2, default=str))
    else:
        click.echo(f"key:     {new.key}")
        click.echo(f"id:      {new.key_id} (prefix {new.prefix})")
        click.echo(f"tenant:  {new.tenant or 'all (platform key)'}")
        click.echo(f"role:    {new.role}")
        click.echo(f"expires: {new.expires_at or 'never'}")
    click.secho(_SHOWN_ONCE, fg="yellow", err=True)


@api_keys_group.command("list")
@click.option("--tenant", help="Only this tenant's keys.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def list_command(tenant: str | None, as_json: bool) -> None:
    """List keys (never the keys themselves): prefix, role, expiry, last use, revocation."""
    with connect(_settings().require_database_url(), role="platform_rw") as conn:
        rows = keys.list_keys(conn, tenant)
    if as_json:
        click.echo(_json(rows))
        return
    headers = (
        "key_id",
        "prefix",
        "tenant",
        "role",
        "name",
        "expires_at",
        "last_used_at",
        "revoked_at",
    )
    click.echo(_table(headers, [[r[h] for h in headers] for r in rows]))


@api_keys_group.command("revoke")
@click.argument("key")
@friendly_errors
def revoke_command(key: str) -> None:
    """Revoke KEY (its id or prefix) at once."""
    with connect(_settings().require_database_url(), role="platform_rw") as conn:
        row = keys.revoke(conn, key, actor="cli")
    click.echo(f"revoked key {row['key_id']} (prefix {row['prefix']}) at {row['revoked_at']}")


@api_keys_group.command("rotate")
@click.argument("key")
@click.option(
    "--grace-hours",
    type=click.IntRange(0, 8760),
    default=None,
    help="Hours the old key keeps working [default: IIOT_API_KEY_GRACE_HOURS].",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def rotate_command(key: str, grace_hours: int | None, as_json: bool) -> None:
    """Replace KEY (its id or prefix) with a new key of the same tenant, role and name."""
    settings = _settings()
    hours = settings.api_key_grace_hours if grace_hours is None else grace_hours
    with connect(settings.require_database_url(), role="platform_rw") as conn:
        new, old = keys.rotate(conn, key, actor="cli", grace=timedelta(hours=hours))
        tenant = conn.execute(
            "SELECT slug FROM tenants WHERE tenant_id = %s", (old["tenant_id"],)
        ).fetchone()
    new = keys.NewKey(**{**asdict(new), "tenant": tenant[0] if tenant else None})
    _show(new, as_json)
    until = old["revoked_at"] or old["expires_at"]
    click.echo(f"the old key {old['prefix']} works until {until}", err=True)
