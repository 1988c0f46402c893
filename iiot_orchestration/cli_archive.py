"""``iiot archive``: run retention, list, verify and restore the Parquet archives of expired
telemetry; ``iiot tenants delete`` (docs/retention.md, docs/runbooks/tenant-removal.md)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

import click
import psycopg

from iiot_orchestration import retention
from iiot_orchestration.archive import Store, open_store
from iiot_orchestration.cli_common import HelpGroup, _json, _settings, _table, friendly_errors
from iiot_orchestration.db import connect

_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


class DayType(click.ParamType):
    """A UTC day written YYYY-MM-DD."""

    name = "YYYY-MM-DD"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> date:
        if isinstance(value, date):
            return value
        text = str(value).strip()
        try:
            if not _DATE.match(text):
                raise ValueError
            return date.fromisoformat(text)
        except ValueError:
            self.fail(f"{text[:40]!r} is not a day written YYYY-MM-DD", param, ctx)


DAY = DayType()


def _store_and_url() -> tuple[Store, str]:
    settings = _settings()
    return open_store(settings.archive_root), settings.require_database_url()


def _connection(url: str) -> Any:
    return connect(url, autocommit=True, application_name="iiot-archive")


def _tenant_id(conn: psycopg.Connection, slug: str) -> int:
    row = conn.execute("SELECT tenant_id FROM tenants WHERE slug = %s", (slug,)).fetchone()
    if row is None:
        raise retention.RetentionError(
            f"unknown tenant {slug[:70]!r}: `iiot tenants list` shows the tenants"
        )
    return row[0]


def _range(first: date | None, last: date | None) -> None:
    if first and last and last < first:
        raise click.BadParameter(f"--to {last} is before --from {first}", param_hint="--to")


@click.group("archive", cls=HelpGroup)
def archive_group() -> None:
    """Parquet archives of raw telemetry that fell out of retention (docs/retention.md)."""


@archive_group.command("run")
@click.option(
    "--day",
    "run_day",
    type=DAY,
    default=None,
    help="The day that ended [default: yesterday, UTC]; readings out of retention by its end go.",
)
@friendly_errors
def archive_run(run_day: date | None) -> None:
    """Archive, verify and remove what fell out of retention, as the nightly asset does.

    Exits 1 when an archive failed its verification (those readings stay in place).
    """
    store, url = _store_and_url()
    run_day = run_day or datetime.now(UTC).date() - timedelta(days=1)
    if run_day >= datetime.now(UTC).date():
        raise click.BadParameter(f"{run_day} has not ended yet", param_hint="--day")
    with _connection(url) as conn:
        run = retention.run_retention(
            conn, store, run_day, batch_rows=_settings().retention_batch_rows
        )
    click.echo(run.summary())
    for problem in run.problems:
        click.secho(f"warning: {problem}", fg="yellow", err=True)
    if run.corrupt or run.mismatched_days:
        raise SystemExit(1)


@archive_group.command("list")
@click.option("--tenant", help="Only this tenant's archives (slug).")
@click.option("--from", "first", type=DAY, default=None, help="First day.")
@click.option("--to", "last", type=DAY, default=None, help="Last day.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def archive_list(tenant: str | None, first: date | None, last: date | None, as_json: bool) -> None:
    """List the recorded archives, oldest first, with what is still in the raw table."""
    _range(first, last)
    store, url = _store_and_url()
    with _connection(url) as conn:
        tenant_id = _tenant_id(conn, tenant) if tenant else None
        found = retention.records(conn, tenant_id, first, last)
    rows = [
        {
            "tenant": r.tenant_slug,
            "day": r.day,
            "rows": r.rows,
            "devices": r.devices,
            "bytes": r.bytes,
            "sha256": r.sha256,
            "removed": r.deleted_rows,
            "removed_by": r.deleted_by,
            "hold_until": r.hold_until,
            "path": store.describe(r.location),
        }
        for r in found
    ]
    if as_json:
        click.echo(_json(rows))
        return
    click.echo(
        _table(
            ["tenant", "day", "rows", "devices", "removed", "by", "hold until", "sha256"],
            [
                [
                    r["tenant"],
                    r["day"],
                    f"{r['rows']:,}",
                    r["devices"],
                    f"{r['removed']:,}",
                    r["removed_by"],
                    r["hold_until"],
                    r["sha256"][:12],
                ]
                for r in rows
            ],
        )
    )
    click.echo(f"{len(rows)} archives under {store.root}")


@archive_group.command("verify")
@click.option("--tenant", help="Only this tenant's archives (slug).")
@click.option("--from", "first", type=DAY, default=None, help="First day.")
@click.option("--to", "last", type=DAY, default=None, help="Last day.")
@friendly_errors
def archive_verify(tenant: str | None, first: date | None, last: date | None) -> None:
    """Read every recorded archive back: sha256 against its manifest and the database record,
    rows and their digest against the manifest. Exits 1 on any mismatch."""
    _range(first, last)
    store, url = _store_and_url()
    with _connection(url) as conn:
        tenant_id = _tenant_id(conn, tenant) if tenant else None
        found = retention.verify_archives(conn, store, tenant_id, first, last)
    for problem in found.problems:
        click.secho(f"error: {problem}", fg="red", err=True)
    if found.problems:
        click.echo(f"{len(found.problems)} of {found.checked} archives failed verification.")
        raise SystemExit(1)
    click.echo(f"{found.checked} archives verified under {store.root}.")


@archive_group.command("restore")
@click.option("--tenant", required=True, help="Tenant slug.")
@click.option("--from", "first", type=DAY, required=True, help="First day to restore.")
@click.option("--to", "last", type=DAY, required=True, help="Last day to restore.")
@click.option(
    "--hold-days",
    type=click.IntRange(0, 3650),
    default=7,
    show_default=True,
    help="Days the restored readings stay before retention removes them again.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@friendly_errors
def archive_restore(tenant: str, first: date, last: date, hold_days: int, as_json: bool) -> None:
    """Load the tenant's archived days back into the raw table (idempotent).

    Every archive in the range is checked first; a checksum that does not match refuses the
    whole restore before anything is loaded.
    """
    _range(first, last)
    store, url = _store_and_url()
    with _connection(url) as conn:
        restored = retention.restore(conn, store, tenant, first, last, hold_days=hold_days)
    if as_json:
        click.echo(_json([r.__dict__ for r in restored]))
        return
    for r in restored:
        click.echo(f"{r.day}: {r.rows:,} archived readings, {r.inserted:,} put back")
    hold = datetime.now(UTC).date() + timedelta(days=hold_days)
    click.echo(
        f"Restored {len(restored)} days of {tenant}: {sum(r.inserted for r in restored):,} "
        f"readings put back, kept until retention runs after {hold}."
    )


@click.command("delete")
@click.argument("slug")
@click.option("--yes", is_flag=True, help="Confirm: the tenant's data is removed.")
@click.option("--dry-run", is_flag=True, help="Show what would be archived and removed.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@friendly_errors
def tenants_delete_command(slug: str, yes: bool, dry_run: bool, as_json: bool) -> None:
    """Delete tenant SLUG: archive and verify its readings, then remove its data.

    The tenant is suspended first (ingest refuses its readings), every raw reading is archived
    and verified, then its readings, rollups, dead letters, alert rules and device metrics are
    removed, its certificates revoked, its devices removed or decommissioned, and the tenant
    marked deleted. Invoices, billing records and the audit log are kept. See
    docs/runbooks/tenant-removal.md.
    """
    if not yes and not dry_run:
        raise click.UsageError(
            f"deleting {slug[:70]!r} removes its data: add --yes (or look first with --dry-run)"
        )
    store, url = _store_and_url()
    with _connection(url) as conn:
        removal = retention.remove_tenant(
            conn,
            store,
            slug,
            dry_run=dry_run,
            batch_rows=_settings().retention_batch_rows,
        )
    result = {
        "tenant": removal.slug,
        "dry_run": removal.dry_run,
        "archived_days": len(removal.days),
        "archived_readings": sum(e.record.rows for e in removal.days),
        "removed_readings": removal.removed_readings,
        "steps": removal.steps,
    }
    if as_json:
        click.echo(_json([result]))
        return
    if dry_run:
        click.echo(f"Dry run, nothing changed. Deleting {removal.slug} would remove:")
        click.echo(_table(["table", "rows"], sorted(removal.steps.items())))
        return
    click.echo(
        f"Deleted tenant {removal.slug}: {result['archived_readings']:,} readings of "
        f"{result['archived_days']} days archived under {store.root} and removed."
    )
    click.echo(_table(["step", "rows"], list(removal.steps.items())))
