"""Nightly billing per tenant: daily usage, the monthly invoice (draft, then final) and its PDF
and XLSX. Rules and rounding: iiot_orchestration/billing.py and docs/billing.md."""

import warnings
from datetime import date, timedelta

import dagster as dg

from iiot_orchestration import alerts, billing, billing_alerts, billing_exports
from iiot_orchestration.partitions import DAYS, TENANT_DAYS, TENANT_MONTHS, tenant_key
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.retries import retry_transient
from iiot_orchestration.settings import load_settings

TOTAL_IS_SUM = "total_equals_lines"
NO_UNEXPLAINED_CREDIT = "no_negative_line_without_reason"
NIGHT_BILLED = "every_tenant_billed"
RECONCILED = "billed_readings_match_raw"
EVERY_MONTH_INVOICED = "every_closed_month_invoiced"
BILLING_ASSET = {
    "group_name": "billing",
    "kinds": {"postgres"},
    "owners": ["team:finance"],
    # nightly at 02:00 in each tenant's time zone: a day without any billing run is late
    "freshness_policy": dg.FreshnessPolicy.time_window(
        fail_window=timedelta(hours=26), warn_window=timedelta(hours=25)
    ),
}


def _send_quota_notices(conn, tenant_ids) -> int:
    """Quota notices of these tenants not delivered yet, through the alert notifier."""
    notifier = alerts.Notifier.from_settings(load_settings())
    return len(billing_alerts.send_quota_notices(conn, notifier, tenant_ids))


def _keys(context: dg.AssetExecutionContext, dimension: str) -> tuple[date, str]:
    # a run launched with the dagster/partition tag alone (GraphQL, the launchpad) has a plain
    # "2026-10-10|acme" for its key, not a MultiPartitionKey
    partitions_def = TENANT_DAYS if dimension == "day" else TENANT_MONTHS
    keys = partitions_def.get_partition_key_from_str(context.partition_key).keys_by_dimension
    return date.fromisoformat(keys[dimension]), keys["tenant"]


@dg.asset(
    partitions_def=TENANT_DAYS,
    code_version="1",
    deps=[dg.AssetKey("consumption_daily")],  # the dbt mart its consumption comes from
    description="What a tenant used on one local day: accepted messages and readings, dead "
    "letters by reason, rate-limited and over-rate messages, active and provisioned devices, "
    "estimated storage and consumption per unit (from the marts).",
    **BILLING_ASSET,
)
@retry_transient
def billing_daily_usage(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> dg.MaterializeResult:
    day, slug = _keys(context, "day")
    with postgres.get_connection() as conn:
        who = billing.tenant(conn, slug)
        try:
            [usage] = billing.record_usage(conn, who, [day])
        except billing.BillingError as exc:
            raise dg.Failure(str(exc)) from exc
        notices = _send_quota_notices(conn, [who.tenant_id])
    return dg.MaterializeResult(
        metadata={
            "plan": usage.plan_id,
            "messages": usage.messages,
            "readings": usage.readings,
            "overage_messages": usage.overage_messages,
            "rate_limited": usage.rate_limited,
            "dead_letters": dg.MetadataValue.json(usage.dead_letters),
            "active_devices": usage.active_devices,
            "provisioned_devices": usage.provisioned_devices,
            "storage_bytes": usage.storage_bytes,
            "consumption": dg.MetadataValue.json(usage.consumption),
            "quota_notices_sent": notices,
        }
    )


with warnings.catch_warnings():
    # MultiPartitionMapping is marked beta; the tests turn warnings into errors
    warnings.simplefilter("ignore", dg.BetaWarning)
    DAYS_OF_THE_MONTH = dg.MultiPartitionMapping(
        {
            "day": dg.DimensionPartitionMapping("month", dg.TimeWindowPartitionMapping()),
            "tenant": dg.DimensionPartitionMapping("tenant", dg.IdentityPartitionMapping()),
        }
    )


def _lines_markdown(invoice: billing.Invoice) -> str:
    rows = [
        "| # | kind | description | quantity | unit price | fraction | amount |",
        "|---|---|---|---|---|---|---|",
    ]
    rows += [
        f"| {n} | {x.kind} | {x.description} | {x.quantity.normalize():f} {x.unit} | "
        f"{x.unit_price} | {x.fraction} | {x.amount} |"
        for n, x in enumerate(invoice.lines, start=1)
    ]
    rows.append(f"| | | **total** | | | | **{invoice.total} {invoice.currency}** |")
    return "\n".join(rows)


@dg.asset(
    partitions_def=TENANT_MONTHS,
    code_version="1",
    deps=[dg.AssetDep(billing_daily_usage, partition_mapping=DAYS_OF_THE_MONTH)],
    check_specs=[
        dg.AssetCheckSpec(
            TOTAL_IS_SUM,
            asset="billing_invoice",
            blocking=True,
            description="The stored total equals the sum of the stored lines.",
        ),
        dg.AssetCheckSpec(
            NO_UNEXPLAINED_CREDIT,
            asset="billing_invoice",
            blocking=True,
            description="No negative line without an adjustment reason.",
        ),
        dg.AssetCheckSpec(
            RECONCILED,
            asset="billing_invoice",
            description="Readings billed for the period's days equal the raw readings received "
            "in those local days (while the raw rows are retained).",
        ),
    ],
    description="The tenant's invoice for one billing period: nightly a month-to-date draft, "
    "final once the period has closed (then immutable: a re-run compares and fails loudly on "
    "a difference). PDF and XLSX under the reports root.",
    **BILLING_ASSET,
)
@retry_transient
def billing_invoice(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> dg.MaterializeResult:
    label, slug = _keys(context, "month")
    with postgres.get_connection() as conn:
        who = billing.tenant(conn, slug)
        try:
            outcome = billing.bill(conn, who, label, actor=f"dagster:{context.run.run_id[:8]}")
        except billing.BillingError as exc:
            raise dg.Failure(str(exc)) from exc
        stored_total, lines_sum, unexplained = conn.execute(
            "SELECT i.total, coalesce(sum(l.amount), 0),"
            "       count(*) FILTER (WHERE l.amount < 0 AND coalesce(l.reason, '') = '')"
            "  FROM invoices i LEFT JOIN invoice_lines l USING (invoice_id)"
            " WHERE i.invoice_id = %s GROUP BY i.total",
            (outcome.invoice_id,),
        ).fetchone()
        billed, raw = billing.reconcile(
            conn, who, outcome.invoice.period, billing.local_today(conn, who)
        )
        _send_quota_notices(conn, [who.tenant_id])
    invoice = outcome.invoice
    files = billing_exports.export(load_settings().reports_root, who, invoice)
    context.log.info(f"invoice {label:%Y-%m} of {slug}: {outcome.action}, total {invoice.total}")
    return dg.MaterializeResult(
        metadata={
            "status": invoice.status,
            "action": outcome.action,
            "total": float(invoice.total),
            "currency": invoice.currency,
            "days_billed": invoice.days_billed,
            "period": f"{invoice.period.start} .. {invoice.period.end}",
            "lines": dg.MetadataValue.md(_lines_markdown(invoice)),
            "pdf": dg.MetadataValue.path(str(files.pdf)),
            "xlsx": dg.MetadataValue.path(str(files.xlsx)),
            "inputs_sha256": invoice.inputs_sha256,
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=TOTAL_IS_SUM,
                passed=stored_total == lines_sum,
                metadata={"total": float(stored_total), "sum_of_lines": float(lines_sum)},
            ),
            dg.AssetCheckResult(
                check_name=NO_UNEXPLAINED_CREDIT,
                passed=unexplained == 0,
                metadata={"negative_lines_without_reason": unexplained},
            ),
            dg.AssetCheckResult(
                check_name=RECONCILED,
                passed=billed == raw,
                metadata={"billed_readings": billed, "raw_readings": raw},
            ),
        ],
    )


class NightlyBillingConfig(dg.Config):
    """Which tenants a bulk night bills: the given slugs, or every active tenant of the given
    time zones, or (both empty) every active tenant."""

    tenants: list[str] = []
    timezones: list[str] = []


@dg.asset(
    partitions_def=DAYS,
    code_version="1",
    deps=[dg.AssetKey("consumption_daily")],
    check_specs=[
        dg.AssetCheckSpec(
            NIGHT_BILLED,
            asset="billing_nightly",
            blocking=True,
            description="Every tenant of the night got its usage and its invoice, each stored "
            "total equal to the sum of its stored lines.",
        ),
        dg.AssetCheckSpec(
            RECONCILED,
            asset="billing_nightly",
            description="For every tenant of the night, the readings billed for the day equal "
            "the raw readings received in it (billing's rule: an hour counts on the local day "
            "it starts in).",
        ),
    ],
    description="The nightly billing of many tenants at once (the tenants of a time zone whose "
    "local day, the partition, has just ended): the day's usage for all of them in a few "
    "statements, then each tenant's invoice of the period holding that day (draft, or final once "
    "closed), with the same rows and events as billing_daily_usage and billing_invoice, and the "
    "PDF and XLSX of each. nightly_billing_sensor requests it when many tenants are due.",
    **BILLING_ASSET,
)
@retry_transient
def billing_nightly(
    context: dg.AssetExecutionContext, postgres: PostgresResource, config: NightlyBillingConfig
) -> dg.MaterializeResult:
    day = date.fromisoformat(context.partition_key)
    actor = f"dagster:{context.run.run_id[:8]}"
    with postgres.get_connection() as conn:
        tenants = billing.tenants(conn, config.tenants or None, timezones=config.timezones or None)
        night = billing.bill_night(conn, tenants, day, actor=actor)
        reconciled = billing.reconcile_many(conn, [(t, day, day) for t in night.usage])
        notices = _send_quota_notices(conn, night.usage)
        ids = [o.invoice_id for o in night.billing.outcomes]
        mismatched = conn.execute(
            "SELECT count(*) FROM (SELECT i.invoice_id FROM invoices i"
            "  LEFT JOIN invoice_lines l USING (invoice_id) WHERE i.invoice_id = ANY(%s)"
            " GROUP BY i.invoice_id, i.total HAVING i.total <> coalesce(sum(l.amount), 0)) x",
            (ids,),
        ).fetchone()[0]
    by_id = {who.tenant_id: who for who in tenants}
    root = load_settings().reports_root
    # the per-tenant partitions this run wrote are recorded as materialized, so that the UI's
    # partition status and the freshness policies of billing_daily_usage and billing_invoice
    # stay right on nights billed in bulk
    for tenant_id, usages in night.usage.items():
        for usage in usages:
            context.log_event(
                dg.AssetMaterialization(
                    billing_daily_usage.key,
                    partition=tenant_key(f"{usage.day}", by_id[tenant_id].slug, "day"),
                    metadata={"readings": usage.readings, "bulk_run": True},
                )
            )
    for outcome in night.billing.outcomes:
        who = by_id[outcome.invoice.tenant_id]
        files = billing_exports.export(root, who, outcome.invoice)
        context.log_event(
            dg.AssetMaterialization(
                billing_invoice.key,
                partition=tenant_key(f"{outcome.invoice.period.label}", who.slug),
                metadata={
                    "status": outcome.invoice.status,
                    "action": outcome.action,
                    "total": float(outcome.invoice.total),
                    "pdf": dg.MetadataValue.path(str(files.pdf)),
                    "xlsx": dg.MetadataValue.path(str(files.xlsx)),
                    "bulk_run": True,
                },
            )
        )
    for who, label, reason in night.billing.failures:
        context.log.error(f"invoice {label:%Y-%m} of {who.slug}: {reason}")
    actions = [o.action for o in night.billing.outcomes]
    unreconciled = sorted(by_id[t].slug for t, (billed, raw) in reconciled.items() if billed != raw)
    result = dg.MaterializeResult(
        metadata={
            "tenants": len(tenants),
            "usage_recorded": len(night.usage),
            "drafts": actions.count("draft"),
            "finalised": actions.count("finalised"),
            "unchanged": actions.count("unchanged"),
            "failed": len(night.billing.failures),
            "quota_notices_sent": notices,
            "first_failures": ", ".join(
                f"{who.slug}:{label:%Y-%m}" for who, label, _ in night.billing.failures[:20]
            ),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=NIGHT_BILLED,
                passed=not night.billing.failures and mismatched == 0,
                metadata={"failed": len(night.billing.failures), "total_not_sum": mismatched},
            ),
            dg.AssetCheckResult(
                check_name=RECONCILED,
                passed=not unreconciled,
                metadata={
                    "billed_readings": sum(billed for billed, _ in reconciled.values()),
                    "raw_readings": sum(raw for _, raw in reconciled.values()),
                    "tenants_differing": len(unreconciled),
                    "first_differing": ", ".join(unreconciled[:20]),
                },
            ),
        ],
    )
    if night.billing.failures:
        raise dg.Failure(
            f"{len(night.billing.failures)} of {len(tenants)} invoices failed (the others are "
            f"stored): {night.billing.failures[0][2]}",
            metadata=result.metadata,
        )
    return result


@dg.asset_check(
    asset=billing_invoice,
    name=EVERY_MONTH_INVOICED,
    description="Every active tenant has a final invoice for every closed period since it was "
    "created.",
)
def every_closed_month_invoiced(postgres: PostgresResource) -> dg.AssetCheckResult:
    with postgres.get_connection() as conn:
        missing = missing_invoices(conn)
    return dg.AssetCheckResult(
        passed=not missing,
        metadata={"missing": len(missing), "first_missing": ", ".join(missing[:20])},
    )


def missing_invoices(conn) -> list[str]:
    """``slug:YYYY-MM`` of every closed period of an active tenant without a final invoice."""
    missing = []
    tenants = conn.execute(
        "SELECT slug, (created_at AT TIME ZONE timezone)::date FROM tenants"
        " WHERE status = 'active' ORDER BY slug"
    ).fetchall()
    for slug, created in tenants:
        who = billing.tenant(conn, slug)
        today = billing.local_today(conn, who)
        final = {
            period
            for (period,) in conn.execute(
                "SELECT period FROM invoices WHERE tenant_id = %s AND status = 'final'",
                (who.tenant_id,),
            )
        }
        period = billing.period_containing(created, who.cycle_day)
        while period.end <= today:
            if period.label not in final:
                missing.append(f"{slug}:{period.label:%Y-%m}")
            period = billing.period_of(billing.add_months(period.label, 1), who.cycle_day)
    return missing
