"""Billing: daily usage per tenant-local day, monthly invoices, adjustments and the event trail.

Rules (docs/billing.md):

- A tenant's **period** runs from its billing cycle day (1 to 28) of one month to the same day of
  the next, in its time zone, and is labelled by its first month ("2026-10-01").
- Each local day is billed at the plan in effect at the end of that day (the day of a change
  bills the new plan), so plan changes are prorated by day: the base price of a plan is
  ``monthly_price x days on the plan / days in the period``.
- Enterprise (no hard block) is billed overage, day by day on the days it is on such a plan:
  devices over the included count (device-days, at the monthly device price / days in the
  period), messages sent over the per-minute rate (per 1,000), storage over the quota (GiB-days,
  at the monthly GiB price / days in the period).
- Money is ``Decimal``: every line is computed exactly, then rounded half up to the cent once;
  the total is the sum of the rounded lines.
- A final invoice never changes: recomputing it gives the same lines or fails loudly.
  Corrections are adjustments (credit or debit lines with a reason) in an open period.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from iiot_orchestration.errors import IiotError
from iiot_orchestration.storage import storage_for

CENT = Decimal("0.01")
GIB = Decimal(1024**3)
THOUSAND = Decimal(1000)
MAX_AMOUNT = Decimal(10) ** 12  # numeric(14,2)
DEFAULT_BYTES_PER_READING = Decimal("100")
EVENT_KINDS = (
    "draft_computed",
    "invoice_finalised",
    "plan_changed",
    "adjustment_added",
    "quota_blocked",
    "quota_warning",
)


class BillingError(IiotError):
    """A billing rule refused the operation (final invoice changed, bad period, ...)."""


def money(value: Decimal) -> Decimal:
    """Round half up to the cent (the rounding rule of every invoice line)."""
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


def add_months(day: date, months: int) -> date:
    month = day.month - 1 + months
    return day.replace(year=day.year + month // 12, month=month % 12 + 1)


@dataclass(frozen=True)
class Period:
    """A billing cycle: [start, end) in local days, labelled by its first month."""

    label: date
    start: date
    end: date

    @property
    def days(self) -> int:
        return (self.end - self.start).days

    def dates(self, until: date | None = None) -> list[date]:
        last = self.end if until is None else min(self.end, until)
        return [self.start + timedelta(days=n) for n in range((last - self.start).days)]


def period_of(label: date, cycle_day: int) -> Period:
    """The period labelled ``label`` (any day of its first month) for a cycle day."""
    start = date(label.year, label.month, cycle_day)
    return Period(date(label.year, label.month, 1), start, add_months(start, 1))


def period_containing(day: date, cycle_day: int) -> Period:
    label = day if day.day >= cycle_day else add_months(day.replace(day=1), -1)
    return period_of(label, cycle_day)


def parse_period(text: str) -> date:
    """A period label from ``2026-10`` or ``2026-10-01``."""
    for fmt in ("%Y-%m", "%Y-%m-%d"):
        try:
            parsed = datetime.strptime(text.strip(), fmt).date()
        except ValueError:
            continue
        return parsed.replace(day=1)
    raise BillingError(f"bad period {text[:40]!r}: expected YYYY-MM, e.g. 2026-10")


@dataclass(frozen=True)
class Plan:
    plan_id: str
    name: str
    included_devices: int
    storage_bytes: int
    monthly_price: Decimal
    overage_device_price: Decimal | None
    overage_price_per_1k_messages: Decimal | None
    overage_storage_price_per_gib: Decimal | None
    hard_block: bool
    currency: str


def plans(conn: psycopg.Connection) -> dict[str, Plan]:
    rows = conn.execute(
        "SELECT plan_id, name, included_devices, storage_bytes, monthly_price,"
        " overage_device_price, overage_price_per_1k_messages, overage_storage_price_per_gib,"
        " hard_block, currency FROM plans"
    ).fetchall()
    return {row[0]: Plan(*row) for row in rows}


@dataclass(frozen=True)
class Tenant:
    tenant_id: int
    slug: str
    timezone: str
    cycle_day: int
    plan_id: str
    status: str


def tenant(conn: psycopg.Connection, slug: str) -> Tenant:
    row = conn.execute(
        "SELECT tenant_id, slug, timezone, billing_cycle_day, plan_id, status FROM tenants"
        " WHERE slug = %s",
        (slug,),
    ).fetchone()
    if row is None:
        raise BillingError(f"unknown tenant {slug[:70]!r}")
    return Tenant(*row)


def local_today(conn: psycopg.Connection, who: Tenant) -> date:
    return conn.execute("SELECT (now() AT TIME ZONE %s)::date", (who.timezone,)).fetchone()[0]


# ---------------------------------------------------------------------------------------------
# Daily usage


@dataclass
class DailyUsage:
    day: date
    plan_id: str
    messages: int = 0
    readings: int = 0
    overage_messages: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    rate_limited: int = 0
    active_devices: int = 0
    provisioned_devices: int = 0
    stored_readings: int = 0
    bytes_per_reading: Decimal = DEFAULT_BYTES_PER_READING
    storage_bytes: int = 0
    consumption: dict[str, float] = field(default_factory=dict)


_DAY_USAGE = """
WITH bounds AS (
    SELECT (%(day)s::date)::timestamp AT TIME ZONE t.timezone AS day_start,
           (%(day)s::date + 1)::timestamp AT TIME ZONE t.timezone AS day_end,
           coalesce(t.retention_days, p.retention_days) AS retention_days
      FROM tenants t JOIN plans p USING (plan_id) WHERE t.tenant_id = %(tenant)s
)
SELECT
    (SELECT h.plan_id FROM tenant_plan_history h
      WHERE h.tenant_id = %(tenant)s AND h.valid_from < b.day_end
      ORDER BY h.valid_from DESC LIMIT 1),
    (SELECT coalesce(sum(u.messages), 0) FROM ingest_usage u
      WHERE u.tenant_id = %(tenant)s AND u.hour >= b.day_start AND u.hour < b.day_end),
    (SELECT coalesce(sum(u.readings), 0) FROM ingest_usage u
      WHERE u.tenant_id = %(tenant)s AND u.hour >= b.day_start AND u.hour < b.day_end),
    (SELECT coalesce(sum(u.overage_messages), 0) FROM ingest_usage u
      WHERE u.tenant_id = %(tenant)s AND u.hour >= b.day_start AND u.hour < b.day_end),
    (SELECT count(DISTINCT u.device_id) FROM ingest_usage u
      WHERE u.tenant_id = %(tenant)s AND u.hour >= b.day_start AND u.hour < b.day_end
        AND u.messages > 0),
    (SELECT count(*) FROM devices d
      WHERE d.tenant_id = %(tenant)s AND d.created_at < b.day_end
        AND d.status <> 'decommissioned'),
    (SELECT coalesce(sum(r.readings), 0) FROM telemetry_daily r
      WHERE r.tenant_id = %(tenant)s AND r.bucket < b.day_end
        AND r.bucket >= b.day_end - make_interval(days => b.retention_days)),
    (SELECT coalesce(jsonb_object_agg(reason, n), '{}') FROM (
        SELECT l.reason, count(*) AS n FROM dead_letters l
         WHERE l.tenant_id = %(tenant)s AND l.received_at >= b.day_start
           AND l.received_at < b.day_end
         GROUP BY l.reason) reasons)
  FROM bounds b
"""

_DAY_CONSUMPTION = """
SELECT unit, sum(consumption) FROM marts.consumption_daily
 WHERE tenant_id = %(tenant)s AND local_day = %(day)s GROUP BY unit ORDER BY unit
"""


def bytes_per_reading(conn: psycopg.Connection) -> Decimal:
    """Disk bytes per stored raw reading (table, indexes, TOAST), measured over the whole raw
    table from the planner's statistics: the estimate that turns a tenant's stored readings
    into storage bytes (docs/billing.md). Falls back to 100 bytes before statistics exist."""
    if storage_for(conn).mode == "timescale":
        size, rows = conn.execute(
            "SELECT hypertable_size('telemetry'), approximate_row_count('telemetry')"
        ).fetchone()
    else:
        size, rows = conn.execute(
            "SELECT sum(pg_total_relation_size(p.relid)), sum(greatest(c.reltuples, 0))"
            "  FROM pg_partition_tree('telemetry') p JOIN pg_class c ON c.oid = p.relid"
            " WHERE p.isleaf"
        ).fetchone()
    if not size or not rows or rows < 1000:
        return DEFAULT_BYTES_PER_READING
    return (Decimal(size) / Decimal(rows)).quantize(CENT, rounding=ROUND_HALF_UP)


def compute_daily_usage(
    conn: psycopg.Connection, who: Tenant, day: date, per_reading: Decimal | None = None
) -> DailyUsage:
    params = {"tenant": who.tenant_id, "day": day}
    row = conn.execute(_DAY_USAGE, params).fetchone()
    plan_id = row[0] or who.plan_id
    per_reading = per_reading if per_reading is not None else bytes_per_reading(conn)
    consumption: dict[str, float] = {}
    if conn.execute("SELECT to_regclass('marts.consumption_daily')").fetchone()[0]:
        consumption = {unit: float(v) for unit, v in conn.execute(_DAY_CONSUMPTION, params)}
    dead = {reason: int(n) for reason, n in row[7].items()}
    return DailyUsage(
        day=day,
        plan_id=plan_id,
        messages=int(row[1]),
        readings=int(row[2]),
        overage_messages=int(row[3]),
        active_devices=int(row[4]),
        provisioned_devices=int(row[5]),
        stored_readings=int(row[6]),
        dead_letters=dead,
        rate_limited=dead.get("rate_limited", 0),
        bytes_per_reading=per_reading,
        storage_bytes=int(Decimal(int(row[6])) * per_reading),
        consumption=consumption,
    )


def save_daily_usage(conn: psycopg.Connection, who: Tenant, usage: DailyUsage) -> None:
    conn.execute(
        "INSERT INTO billing_daily_usage (tenant_id, day, plan_id, messages, readings,"
        " overage_messages, dead_letters, rate_limited, active_devices, provisioned_devices,"
        " stored_readings, bytes_per_reading, storage_bytes, consumption)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (tenant_id, day) DO UPDATE SET plan_id = excluded.plan_id,"
        " messages = excluded.messages, readings = excluded.readings,"
        " overage_messages = excluded.overage_messages, dead_letters = excluded.dead_letters,"
        " rate_limited = excluded.rate_limited, active_devices = excluded.active_devices,"
        " provisioned_devices = excluded.provisioned_devices,"
        " stored_readings = excluded.stored_readings,"
        " bytes_per_reading = excluded.bytes_per_reading,"
        " storage_bytes = excluded.storage_bytes, consumption = excluded.consumption,"
        " computed_at = now()",
        (
            who.tenant_id,
            usage.day,
            usage.plan_id,
            usage.messages,
            usage.readings,
            usage.overage_messages,
            Jsonb(usage.dead_letters),
            usage.rate_limited,
            usage.active_devices,
            usage.provisioned_devices,
            usage.stored_readings,
            usage.bytes_per_reading,
            usage.storage_bytes,
            Jsonb(usage.consumption),
        ),
    )


def load_daily_usage(conn: psycopg.Connection, who: Tenant, days: list[date]) -> list[DailyUsage]:
    if not days:
        return []
    rows = conn.execute(
        "SELECT day, plan_id, messages, readings, overage_messages, dead_letters, rate_limited,"
        " active_devices, provisioned_devices, stored_readings, bytes_per_reading,"
        " storage_bytes, consumption FROM billing_daily_usage"
        " WHERE tenant_id = %s AND day >= %s AND day <= %s ORDER BY day",
        (who.tenant_id, days[0], days[-1]),
    ).fetchall()
    return [
        DailyUsage(
            day=r[0],
            plan_id=r[1],
            messages=r[2],
            readings=r[3],
            overage_messages=r[4],
            dead_letters=dict(r[5]),
            rate_limited=r[6],
            active_devices=r[7],
            provisioned_devices=r[8],
            stored_readings=r[9],
            bytes_per_reading=r[10],
            storage_bytes=r[11],
            consumption=dict(r[12]),
        )
        for r in rows
    ]


def record_usage(
    conn: psycopg.Connection, who: Tenant, days: Iterable[date], *, actor: str = "dagster"
) -> list[DailyUsage]:
    """Compute and store the usage of ``days`` in one transaction, then apply the storage quota
    of starter and pro to the latest day (a warning event, new devices blocked)."""
    per_reading = bytes_per_reading(conn)
    with conn.transaction():
        done = []
        for day in sorted(days):
            usage = compute_daily_usage(conn, who, day, per_reading)
            save_daily_usage(conn, who, usage)
            done.append(usage)
        if done:
            enforce_storage_quota(conn, who, done[-1], actor=actor)
    return done


def enforce_storage_quota(
    conn: psycopg.Connection, who: Tenant, usage: DailyUsage, *, actor: str
) -> bool | None:
    """Starter and pro over their storage quota: a quota_warning event and new devices blocked
    (tenants.storage_blocked_at) until usage is under the quota again. Returns the new state
    (True blocked, False cleared) or None when nothing changed."""
    plan = plans(conn)[usage.plan_id]
    if not plan.hard_block:
        return None
    over = usage.storage_bytes > plan.storage_bytes
    blocked = conn.execute(
        "SELECT storage_blocked_at IS NOT NULL FROM tenants WHERE tenant_id = %s",
        (who.tenant_id,),
    ).fetchone()[0]
    if over == blocked:
        return None
    conn.execute(
        "UPDATE tenants SET storage_blocked_at = CASE WHEN %s THEN now() END WHERE tenant_id = %s",
        (over, who.tenant_id),
    )
    event(
        conn,
        who.tenant_id,
        period_containing(usage.day, who.cycle_day).label,
        "quota_warning",
        actor=actor,
        detail={
            "quota": "storage",
            "state": "blocked" if over else "cleared",
            "day": usage.day.isoformat(),
            "storage_bytes": usage.storage_bytes,
            "quota_bytes": plan.storage_bytes,
            "plan": plan.plan_id,
        },
    )
    return over


def event(
    conn: psycopg.Connection,
    tenant_id: int,
    period: date | None,
    kind: str,
    *,
    actor: str,
    before: Decimal | None = None,
    after: Decimal | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        "INSERT INTO billing_events (tenant_id, period, kind, actor, before_amount,"
        " after_amount, detail) VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (tenant_id, period, kind, actor, before, after, Jsonb(detail or {})),
    )


# ---------------------------------------------------------------------------------------------
# Invoices


@dataclass(frozen=True)
class Line:
    kind: str
    description: str
    quantity: Decimal
    unit: str
    unit_price: Decimal
    amount: Decimal
    reason: str | None = None


@dataclass(frozen=True)
class Invoice:
    tenant_id: int
    period: Period
    status: str
    currency: str
    lines: tuple[Line, ...]
    days_billed: int
    inputs_sha256: str

    @property
    def total(self) -> Decimal:
        return sum((line.amount for line in self.lines), Decimal("0.00"))


def _segments(usage: list[DailyUsage]) -> list[tuple[str, list[DailyUsage]]]:
    """Consecutive days on the same plan."""
    segments: list[tuple[str, list[DailyUsage]]] = []
    for day in usage:
        if segments and segments[-1][0] == day.plan_id:
            segments[-1][1].append(day)
        else:
            segments.append((day.plan_id, [day]))
    return segments


def _quantity(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)


def invoice_lines(
    usage: list[DailyUsage],
    period: Period,
    catalog: dict[str, Plan],
    adjustments: list[tuple[Decimal, str]] = (),  # type: ignore[assignment]
) -> list[Line]:
    """The lines of a period from its days' usage: pure arithmetic, no database."""
    days_in_period = Decimal(period.days)
    lines: list[Line] = []
    for plan_id, days in _segments(usage):
        plan = catalog[plan_id]
        span = f"{days[0].day:%Y-%m-%d} to {days[-1].day:%Y-%m-%d}"
        lines.append(
            Line(
                "base",
                f"{plan.name} plan, {span} ({len(days)} of {period.days} days)",
                Decimal(len(days)),
                "days",
                plan.monthly_price,
                money(plan.monthly_price * len(days) / days_in_period),
            )
        )
    for plan_id, days in _segments(usage):
        plan = catalog[plan_id]
        if plan.hard_block:
            continue
        span = f"{days[0].day:%Y-%m-%d} to {days[-1].day:%Y-%m-%d}"
        device_days = sum(max(0, d.provisioned_devices - plan.included_devices) for d in days)
        if device_days:
            lines.append(
                Line(
                    "overage_devices",
                    f"Devices over the {plan.included_devices} included, {span}",
                    Decimal(device_days),
                    "device-days",
                    plan.overage_device_price,
                    money(plan.overage_device_price * device_days / days_in_period),
                )
            )
        messages = sum(d.overage_messages for d in days)
        if messages:
            lines.append(
                Line(
                    "overage_messages",
                    f"Messages over the per-minute rate, {span}",
                    Decimal(messages),
                    "messages",
                    plan.overage_price_per_1k_messages,
                    money(plan.overage_price_per_1k_messages * messages / THOUSAND),
                )
            )
        gib_days = sum(
            (Decimal(max(0, d.storage_bytes - plan.storage_bytes)) / GIB for d in days),
            Decimal(0),
        )
        if gib_days:
            lines.append(
                Line(
                    "overage_storage",
                    f"Storage over the {Decimal(plan.storage_bytes) / GIB:.0f} GiB quota, {span}",
                    _quantity(gib_days),
                    "GiB-days",
                    plan.overage_storage_price_per_gib,
                    money(plan.overage_storage_price_per_gib * gib_days / days_in_period),
                )
            )
    for amount, reason in adjustments:
        kind = "credit" if amount < 0 else "debit"
        lines.append(
            Line(
                "adjustment", f"Adjustment ({kind})", Decimal(1), "", amount, money(amount), reason
            )
        )
    return lines


def _fingerprint(usage: list[DailyUsage], catalog: dict[str, Plan], lines: list[Line]) -> str:
    used = {d.plan_id for d in usage}
    payload = {
        "usage": [
            [
                d.day.isoformat(),
                d.plan_id,
                d.overage_messages,
                d.provisioned_devices,
                d.storage_bytes,
            ]
            for d in usage
        ],
        "plans": {p: [str(v) for v in vars(catalog[p]).values()] for p in sorted(used)},
        "lines": [[str(v) for v in vars(line).values()] for line in lines],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def adjustments_of(conn: psycopg.Connection, who: Tenant, label: date) -> list[tuple]:
    return conn.execute(
        "SELECT amount, reason FROM billing_adjustments WHERE tenant_id = %s AND period = %s"
        " ORDER BY adjustment_id",
        (who.tenant_id, label),
    ).fetchall()


def compute_invoice(
    conn: psycopg.Connection, who: Tenant, label: date, today: date | None = None
) -> Invoice:
    """The invoice of a period from the stored daily usage: final when the period closed before
    ``today`` (the tenant's local date), else a month-to-date draft. Days without stored usage
    are computed first."""
    period = period_of(label, who.cycle_day)
    today = today or local_today(conn, who)
    if period.start > today:
        raise BillingError(f"period {label:%Y-%m} of {who.slug} has not started yet")
    days = period.dates(until=today)
    stored = {u.day for u in load_daily_usage(conn, who, days)}
    missing = [d for d in days if d not in stored]
    if missing:
        record_usage(conn, who, missing)
    usage = load_daily_usage(conn, who, days)
    catalog = plans(conn)
    lines = invoice_lines(usage, period, catalog, adjustments_of(conn, who, period.label))
    currency = catalog[usage[0].plan_id].currency if usage else catalog[who.plan_id].currency
    return Invoice(
        tenant_id=who.tenant_id,
        period=period,
        status="final" if period.end <= today else "draft",
        currency=currency,
        lines=tuple(lines),
        days_billed=len(usage),
        inputs_sha256=_fingerprint(usage, catalog, lines),
    )


@dataclass(frozen=True)
class Stored:
    invoice_id: int
    status: str
    total: Decimal
    inputs_sha256: str
    lines: tuple[Line, ...]


def stored_invoice(conn: psycopg.Connection, tenant_id: int, label: date) -> Stored | None:
    row = conn.execute(
        "SELECT invoice_id, status, total, inputs_sha256 FROM invoices"
        " WHERE tenant_id = %s AND period = %s",
        (tenant_id, label),
    ).fetchone()
    if row is None:
        return None
    lines = conn.execute(
        "SELECT kind, description, quantity, unit, unit_price, amount, reason FROM invoice_lines"
        " WHERE invoice_id = %s ORDER BY line_no",
        (row[0],),
    ).fetchall()
    return Stored(*row, tuple(Line(*line) for line in lines))


def _same(a: tuple[Line, ...], b: tuple[Line, ...]) -> bool:
    def norm(lines):
        return [
            (
                x.kind,
                x.description,
                x.quantity.normalize(),
                x.unit,
                x.unit_price.normalize(),
                x.amount,
                x.reason,
            )
            for x in lines
        ]

    return norm(a) == norm(b)


@dataclass(frozen=True)
class Outcome:
    invoice: Invoice
    invoice_id: int
    action: str  # "draft", "finalised", "unchanged"
    previous_total: Decimal | None


def bill(
    conn: psycopg.Connection,
    who: Tenant,
    label: date,
    *,
    today: date | None = None,
    actor: str = "dagster",
) -> Outcome:
    """Compute the period's invoice and store it: a draft is replaced; a closed period is
    finalised; a final invoice is only compared, and a difference is a loud error."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('iiot.billing'), %s)", (who.tenant_id,))
        invoice = compute_invoice(conn, who, label, today)
        stored = stored_invoice(conn, who.tenant_id, invoice.period.label)
        if stored is not None and stored.status == "final":
            if stored.total != invoice.total or not _same(stored.lines, invoice.lines):
                raise BillingError(
                    f"final invoice {invoice.period.label:%Y-%m} of {who.slug} no longer matches "
                    f"its data: total {stored.total} stored, {invoice.total} recomputed "
                    f"(inputs {stored.inputs_sha256[:12]} -> {invoice.inputs_sha256[:12]}); a "
                    "final invoice never changes: add an adjustment to an open period"
                )
            return Outcome(invoice, stored.invoice_id, "unchanged", stored.total)
        if stored is not None:
            conn.execute("DELETE FROM invoice_lines WHERE invoice_id = %s", (stored.invoice_id,))
        invoice_id = conn.execute(
            "INSERT INTO invoices (tenant_id, period, period_start, period_end, status, currency,"
            " total, inputs_sha256, days_billed, finalised_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s,"
            "         CASE WHEN %s = 'final' THEN now() END)"
            " ON CONFLICT (tenant_id, period) DO UPDATE SET period_start = excluded.period_start,"
            " period_end = excluded.period_end, status = excluded.status,"
            " currency = excluded.currency, total = excluded.total,"
            " inputs_sha256 = excluded.inputs_sha256, days_billed = excluded.days_billed,"
            " computed_at = now(), finalised_at = excluded.finalised_at"
            " RETURNING invoice_id",
            (
                who.tenant_id,
                invoice.period.label,
                invoice.period.start,
                invoice.period.end,
                invoice.status,
                invoice.currency,
                invoice.total,
                invoice.inputs_sha256,
                invoice.days_billed,
                invoice.status,
            ),
        ).fetchone()[0]
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO invoice_lines (invoice_id, line_no, tenant_id, kind, description,"
                " quantity, unit, unit_price, amount, reason)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    (
                        invoice_id,
                        n,
                        who.tenant_id,
                        x.kind,
                        x.description,
                        x.quantity,
                        x.unit,
                        x.unit_price,
                        x.amount,
                        x.reason,
                    )
                    for n, x in enumerate(invoice.lines, start=1)
                ],
            )
        action = "finalised" if invoice.status == "final" else "draft"
        event(
            conn,
            who.tenant_id,
            invoice.period.label,
            "invoice_finalised" if action == "finalised" else "draft_computed",
            actor=actor,
            before=None if stored is None else stored.total,
            after=invoice.total,
            detail={
                "days_billed": invoice.days_billed,
                "lines": len(invoice.lines),
                "inputs_sha256": invoice.inputs_sha256,
            },
        )
    return Outcome(invoice, invoice_id, action, None if stored is None else stored.total)


def add_adjustment(
    conn: psycopg.Connection,
    who: Tenant,
    label: date,
    amount: Decimal,
    reason: str,
    *,
    actor: str,
) -> int:
    """An explicit credit (negative) or debit line for a period that is not final yet."""
    if not amount.is_finite() or not 0 < abs(amount) < MAX_AMOUNT or amount != money(amount):
        raise BillingError(
            f"bad adjustment amount {str(amount)[:30]}: a non-zero amount in cents, below "
            f"{MAX_AMOUNT:,} in absolute value"
        )
    reason = reason.strip()
    if not 3 <= len(reason) <= 500:
        raise BillingError("an adjustment needs a reason of 3 to 500 characters")
    period = period_of(label, who.cycle_day)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('iiot.billing'), %s)", (who.tenant_id,))
        stored = stored_invoice(conn, who.tenant_id, period.label)
        if stored is not None and stored.status == "final":
            raise BillingError(
                f"invoice {period.label:%Y-%m} of {who.slug} is final: put the correction in an "
                "open period (e.g. the current one), naming the corrected period in the reason"
            )
        adjustment_id = conn.execute(
            "INSERT INTO billing_adjustments (tenant_id, period, amount, reason, actor)"
            " VALUES (%s, %s, %s, %s, %s) RETURNING adjustment_id",
            (who.tenant_id, period.label, amount, reason, actor),
        ).fetchone()[0]
        event(
            conn,
            who.tenant_id,
            period.label,
            "adjustment_added",
            actor=actor,
            before=None if stored is None else stored.total,
            after=None if stored is None else stored.total + amount,
            detail={"amount": str(amount), "reason": reason, "adjustment_id": adjustment_id},
        )
    return adjustment_id


def events(
    conn: psycopg.Connection, who: Tenant, label: date | None = None
) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT occurred_at, period, kind, actor, before_amount, after_amount, detail"
        "  FROM billing_events WHERE tenant_id = %s AND (%s::date IS NULL OR period = %s)"
        " ORDER BY occurred_at, event_id",
        (who.tenant_id, label, label),
    ).fetchall()
    keys = ("occurred_at", "period", "kind", "actor", "before", "after", "detail")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def reconcile(conn: psycopg.Connection, who: Tenant, period: Period, until: date) -> tuple:
    """Readings billed for the period's days against raw readings received in the same local
    days (the raw rows still retained)."""
    days = period.dates(until=until)
    if not days:
        return 0, 0
    billed = conn.execute(
        "SELECT coalesce(sum(readings), 0) FROM billing_daily_usage"
        " WHERE tenant_id = %s AND day >= %s AND day <= %s",
        (who.tenant_id, days[0], days[-1]),
    ).fetchone()[0]
    raw = conn.execute(
        "SELECT count(*) FROM telemetry WHERE tenant_id = %(t)s"
        "   AND received_at >= (%(s)s::date)::timestamp AT TIME ZONE %(tz)s"
        "   AND received_at < (%(e)s::date)::timestamp AT TIME ZONE %(tz)s",
        {"t": who.tenant_id, "s": days[0], "e": days[-1] + timedelta(days=1), "tz": who.timezone},
    ).fetchone()[0]
    return int(billed), int(raw)
