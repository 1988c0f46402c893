"""``iiot billing ...`` and ``iiot tenants set-plan``: invoices, adjustments and the billing
event trail from the command line (docs/billing.md)."""

from __future__ import annotations

from datetime import date
from decimal import Decimal, InvalidOperation

import click

from iiot_orchestration import billing, billing_exports
from iiot_orchestration.cli_common import HelpGroup, _json, _settings, _table, friendly_errors
from iiot_orchestration.db import connect, set_actor
from iiot_orchestration.errors import IiotError

TENANT_OPTION = click.option("--tenant", required=True, help="Tenant slug.")


def _period(text: str) -> object:
    return billing.parse_period(text)


@click.group("billing", cls=HelpGroup)
def billing_group() -> None:
    """Invoices, adjustments and the billing event trail."""


@billing_group.command("invoice")
@TENANT_OPTION
@click.option("--period", required=True, help="Billing period, e.g. 2026-10.")
@click.option("--export/--no-export", default=True, help="Write the PDF and XLSX [default: on].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def invoice_command(tenant: str, period: str, export: bool, as_json: bool) -> None:
    """Compute a period's invoice now, as the nightly run does: a month-to-date draft, or the
    final invoice once the period has closed (a final invoice is only compared)."""
    label = billing.parse_period(period)
    settings = _settings()
    with connect(settings.require_database_url(), role="platform_rw") as conn:
        who = billing.tenant(conn, tenant)
        outcome = billing.bill(conn, who, label, actor="cli")
    invoice = outcome.invoice
    files = billing_exports.export(settings.reports_root, who, invoice) if export else None
    if as_json:
        click.echo(
            _json(
                [
                    {
                        "tenant": who.slug,
                        "period": f"{invoice.period.label:%Y-%m}",
                        "status": invoice.status,
                        "action": outcome.action,
                        "currency": invoice.currency,
                        "total": str(invoice.total),
                        "lines": [
                            {k: str(v) if v is not None else None for k, v in vars(x).items()}
                            for x in invoice.lines
                        ],
                        "pdf": str(files.pdf) if files else None,
                        "xlsx": str(files.xlsx) if files else None,
                    }
                ]
            )
        )
        return
    click.echo(
        f"{who.slug} {invoice.period.label:%Y-%m} ({invoice.period.start} to "
        f"{invoice.period.end}, {invoice.days_billed} of {invoice.period.days} days): "
        f"{invoice.status}, {outcome.action}"
    )
    click.echo(
        _table(
            ["#", "kind", "description", "quantity", "unit price", "fraction", "amount"],
            [
                [
                    n,
                    x.kind,
                    x.description + (f" ({x.reason})" if x.reason else ""),
                    f"{x.quantity.normalize():f} {x.unit}".strip(),
                    x.unit_price,
                    x.fraction,
                    x.amount,
                ]
                for n, x in enumerate(invoice.lines, start=1)
            ],
        )
    )
    click.echo(f"total {invoice.total} {invoice.currency}")
    if files:
        click.echo(f"wrote {files.pdf} and {files.xlsx}")


@billing_group.command("adjust")
@TENANT_OPTION
@click.option(
    "--period", required=True, help="The open billing period or the next one, e.g. 2026-11."
)
@click.option("--amount", required=True, help="Credit (negative) or debit, e.g. -10.00.")
@click.option("--reason", required=True, help="Why; name the corrected period if another.")
@click.option("--actor", default="cli", show_default=True, help="Who makes the adjustment.")
@friendly_errors
def adjust_command(tenant: str, period: str, amount: str, reason: str, actor: str) -> None:
    """Add an explicit credit or debit line to the open period or the next one."""
    label = billing.parse_period(period)
    try:
        value = Decimal(amount.strip())
    except InvalidOperation:
        raise IiotError(
            f"bad amount {amount[:30]!r}: a number of currency units, e.g. -10.00"
        ) from None
    if not value.is_finite():
        raise IiotError(f"bad amount {amount[:30]!r}: a finite number, e.g. -10.00")
    with connect(_settings().require_database_url(), role="platform_rw") as conn:
        who = billing.tenant(conn, tenant)
        adjustment_id = billing.add_adjustment(conn, who, label, value, reason, actor=actor)
    click.echo(
        f"adjustment {adjustment_id}: {value} for {who.slug} {label:%Y-%m}; the period's next "
        "invoice run includes it"
    )


def _price(text: str | None, option: str) -> Decimal | None:
    if text is None:
        return None
    try:
        return Decimal(text.strip())
    except InvalidOperation:
        raise IiotError(f"bad {option} {text[:30]!r}: a price, e.g. 890.00") from None


@billing_group.command("schedule-price")
@click.option("--plan", required=True, help="Plan id, e.g. pro.")
@click.option("--from", "valid_from", required=True, help="First local day billed, YYYY-MM-DD.")
@click.option("--monthly-price", help="New monthly price.")
@click.option("--overage-device-price", help="New monthly price of a device over the included.")
@click.option("--overage-per-1k-messages", help="New price of 1,000 messages over the rate.")
@click.option("--overage-storage-per-gib", help="New monthly price of a GiB over the quota.")
@click.option("--actor", default="cli", show_default=True, help="Who schedules the change.")
@friendly_errors
def schedule_price_command(
    plan: str,
    valid_from: str,
    monthly_price: str | None,
    overage_device_price: str | None,
    overage_per_1k_messages: str | None,
    overage_storage_per_gib: str | None,
    actor: str,
) -> None:
    """Schedule new prices of a plan from a day that has not begun anywhere; each tenant's
    days from then are billed at them (its period prorated by day), closed invoices never
    change. Audited as plan.price_scheduled."""
    try:
        day = date.fromisoformat(valid_from.strip())
    except ValueError:
        raise IiotError(f"bad --from {valid_from[:30]!r}: a date, e.g. 2027-01-01") from None
    given = {
        "monthly_price": _price(monthly_price, "--monthly-price"),
        "overage_device_price": _price(overage_device_price, "--overage-device-price"),
        "overage_price_per_1k_messages": _price(
            overage_per_1k_messages, "--overage-per-1k-messages"
        ),
        "overage_storage_price_per_gib": _price(
            overage_storage_per_gib, "--overage-storage-per-gib"
        ),
    }
    with connect(_settings().require_database_url(), role="platform_rw") as conn:
        after = billing.schedule_price(
            conn, plan, day, {k: v for k, v in given.items() if v is not None}, actor=actor
        )
    prices = ", ".join(f"{k} {v}" for k, v in after.items() if v is not None)
    click.echo(f"{plan} from {day}: {prices}")


@billing_group.command("events")
@TENANT_OPTION
@click.option("--period", help="Only this billing period, e.g. 2026-10.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def events_command(tenant: str, period: str | None, as_json: bool) -> None:
    """The billing event trail of a tenant (drafts, finalisations, plan changes, adjustments,
    quota blocks), oldest first."""
    label = billing.parse_period(period) if period else None
    with connect(_settings().require_database_url(), role="readonly_audit") as conn:
        who = billing.tenant(conn, tenant)
        found = billing.events(conn, who, label)
    if as_json:
        click.echo(_json(found))
        return
    if not found:
        click.echo(f"no billing events for {tenant}" + (f" in {period}" if period else ""))
        return
    click.echo(
        _table(
            ["occurred at", "period", "kind", "actor", "before", "after", "detail"],
            [
                [
                    e["occurred_at"],
                    e["period"] and f"{e['period']:%Y-%m}",
                    e["kind"],
                    e["actor"],
                    e["before"],
                    e["after"],
                    _json_inline(e["detail"]),
                ]
                for e in found
            ],
        )
    )


def _json_inline(detail: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(detail.items()) if v is not None)


@click.command("set-plan")
@click.argument("slug")
@click.argument("plan")
@click.option("--actor", default="cli", show_default=True, help="Who changes the plan.")
@click.option("--force", is_flag=True, help="Move to a plan smaller than the tenant's usage.")
@friendly_errors
def set_plan_command(slug: str, plan: str, actor: str, force: bool) -> None:
    """Move a tenant to another plan now; billing prorates the period by day (docs/billing.md).
    A plan that blocks (starter, pro) smaller than the tenant's devices or storage is refused
    unless --force."""
    with connect(_settings().require_database_url()) as conn:
        catalog = billing.plans(conn)
        if plan not in catalog:
            raise IiotError(
                f"unknown plan {plan[:40]!r}: expected one of {', '.join(sorted(catalog))}"
            )
        who = billing.tenant(conn, slug)
        if who.plan_id == plan:
            click.echo(f"{slug} is already on {plan}; nothing changed")
            return
        excess = billing.downgrade_excess(conn, who, plan)
        if excess and not force:
            raise IiotError(
                f"{slug} uses more than {plan} includes ({'; '.join(excess)}): on {plan} it "
                "could add no device until under the quota; --force changes the plan anyway"
            )
        with conn.transaction():
            set_actor(conn, actor)
            conn.execute(
                "UPDATE tenants SET plan_id = %s WHERE tenant_id = %s", (plan, who.tenant_id)
            )
    click.echo(f"{slug}: {who.plan_id} -> {plan}; today and later days bill {plan}")
    if excess:
        click.echo(f"over {plan}'s quotas, forced: {'; '.join(excess)}")
