"""``iiot devices claim-codes``: claim codes printed at manufacturing, claimed by a tenant
through the API (``POST /api/v1/devices/claim``, docs/api.md)."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime, timedelta

import click

from iiot_orchestration import registry
from iiot_orchestration.api import claims
from iiot_orchestration.cli_common import HelpGroup, _json, _settings, _table, friendly_errors
from iiot_orchestration.db import connect

_SHOWN_ONCE = (
    "warning: this claim code is shown only now; the database keeps only its SHA-256. Print it "
    "on the device's label"
)


@click.group("claim-codes", cls=HelpGroup)
def claim_codes_group() -> None:
    """Claim codes of devices no tenant owns yet: create (shown once) and list."""


@claim_codes_group.command("create")
@click.option("--mac", required=True, help="MAC of the device (aa:bb:cc:dd:ee:ff, ...).")
@click.option(
    "--meter-kind",
    required=True,
    type=click.Choice(registry.METER_KINDS),
    help="Meter kind of the device.",
)
@click.option("--metrics", help="Comma-separated metrics [default: the kind's default metrics].")
@click.option(
    "--expires-in-days",
    type=click.IntRange(1, 3650),
    default=None,
    help="The code cannot be claimed after this many days [default: never].",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def create_command(
    mac: str, meter_kind: str, metrics: str | None, expires_in_days: int | None, as_json: bool
) -> None:
    """Create a device's one-time claim code and print it once."""
    expires_at = None
    if expires_in_days is not None:
        expires_at = datetime.now(UTC) + timedelta(days=expires_in_days)
    with connect(_settings().require_database_url(), role="platform_rw") as conn:
        new = claims.create_code(
            conn,
            mac=mac,
            meter_kind=meter_kind,
            metrics=tuple(m for m in (metrics or "").replace(" ", ",").split(",") if m),
            expires_at=expires_at,
            actor="cli",
        )
    if as_json:
        click.echo(json.dumps(asdict(new), indent=2, default=str))
    else:
        click.echo(f"claim code: {new.code}")
        click.echo(f"id:         {new.claim_id}")
        click.echo(f"device:     {new.mac} ({new.meter_kind})")
        click.echo(f"metrics:    {', '.join(new.metrics) or 'the default ones'}")
        click.echo(f"expires:    {new.expires_at or 'never'}")
    click.secho(_SHOWN_ONCE, fg="yellow", err=True)


@claim_codes_group.command("list")
@click.option("--unclaimed", is_flag=True, help="Only codes not claimed yet.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def list_command(unclaimed: bool, as_json: bool) -> None:
    """List claim codes (never the codes themselves): device, expiry, state and claimant."""
    with connect(_settings().require_database_url(), role="platform_rw") as conn:
        rows = claims.list_codes(conn, unclaimed=unclaimed)
    if as_json:
        click.echo(_json(rows))
        return
    headers = ("claim_id", "mac", "meter_kind", "state", "expires_at", "claimed_at", "tenant")
    click.echo(
        _table(
            ("id", *headers[1:], "device"),
            [[r[h] for h in headers] + [r["device_id"]] for r in rows],
        )
    )
