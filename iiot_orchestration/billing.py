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

import bisect
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg.types.json import Jsonb

from iiot_orchestration.errors import IiotError
from iiot_orchestration.reports.units import to_resolution
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
    "late_usage",
    "quota_notice",
)
QUOTA_THRESHOLDS = (80, 100)  # percent of a plan's included devices, messages and storage


class BillingError(IiotError):
    """A billing rule refused the operation (final invoice changed, bad period, ...)."""


def money(value: Decimal) -> Decimal:
    """Round half up to the cent (the rounding rule of every invoice line)."""
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


def _columns(rows: list[tuple], width: int) -> list[list[Any]]:
    """Rows to the column arrays of an ``unnest`` statement."""
    columns: list[list[Any]] = [[] for _ in range(width)]
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns


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
    messages_per_minute_per_device: int

    def included_messages(self, days: int) -> int:
        """The messages a period of ``days`` includes: every included device at its rate."""
        return self.included_devices * self.messages_per_minute_per_device * 1440 * days


def plans(conn: psycopg.Connection) -> dict[str, Plan]:
    rows = conn.execute(
        "SELECT plan_id, name, included_devices, storage_bytes, monthly_price,"
        " overage_device_price, overage_price_per_1k_messages, overage_storage_price_per_gib,"
        " hard_block, currency, messages_per_minute_per_device FROM plans"
    ).fetchall()
    return {row[0]: Plan(*row) for row in rows}


PRICE_FIELDS = (
    "monthly_price",
    "overage_device_price",
    "overage_price_per_1k_messages",
    "overage_storage_price_per_gib",
)

# plan_id -> (the first local days of its price versions, ascending; the versions' prices)
PriceHistory = dict[str, tuple[list[date], list[tuple[Decimal | None, ...]]]]


def price_history(conn: psycopg.Connection) -> PriceHistory:
    """Every plan's price versions (migration 0026), oldest first."""
    history: PriceHistory = {}
    for plan_id, valid_from, *prices in conn.execute(
        f"SELECT plan_id, valid_from, {', '.join(PRICE_FIELDS)} FROM plan_prices"
        " ORDER BY plan_id, valid_from"
    ):
        days, versions = history.setdefault(plan_id, ([], []))
        days.append(valid_from)
        versions.append(tuple(prices))
    return history


def pricing(
    conn: psycopg.Connection,
) -> tuple[dict[str, Plan], Callable[[str, date], Plan]]:
    """The plans and ``price_of(plan_id, day)``: the plan with the prices valid on that local
    day (each priced plan built once: a bulk night asks for every tenant-day)."""
    catalog, history = plans(conn), price_history(conn)
    priced: dict[tuple[str, int], Plan] = {}

    def price_of(plan_id: str, day: date) -> Plan:
        days, versions = history[plan_id]
        key = (plan_id, bisect.bisect_right(days, day) - 1)
        if key not in priced:
            prices = dict(zip(PRICE_FIELDS, versions[key[1]], strict=True))
            priced[key] = replace(catalog[plan_id], **prices)
        return priced[key]

    return catalog, price_of


@dataclass(frozen=True)
class Tenant:
    tenant_id: int
    slug: str
    timezone: str
    cycle_day: int
    plan_id: str
    status: str
    created: date  # the local day the tenant was created: its billing starts then


_TENANT_COLUMNS = (
    "tenant_id, slug, timezone, billing_cycle_day, plan_id, status,"
    " (created_at AT TIME ZONE timezone)::date"
)


def tenant(conn: psycopg.Connection, slug: str) -> Tenant:
    row = conn.execute(
        f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE slug = %s",
        (slug,),
    ).fetchone()
    if row is None:
        raise BillingError(f"unknown tenant {slug[:70]!r}")
    return Tenant(*row)


def tenants(
    conn: psycopg.Connection,
    slugs: Iterable[str] | None = None,
    *,
    timezones: Iterable[str] | None = None,
    active_only: bool = True,
) -> list[Tenant]:
    """Many tenants in one statement, by tenant id: the given slugs (unknown slugs raise), or
    every (active) tenant, optionally only those in ``timezones``."""
    wanted = None if slugs is None else sorted(set(slugs))
    zones = None if timezones is None else sorted(set(timezones))
    rows = conn.execute(
        f"SELECT {_TENANT_COLUMNS} FROM tenants"
        " WHERE (%(slugs)s::text[] IS NULL OR slug = ANY(%(slugs)s))"
        "   AND (%(zones)s::text[] IS NULL OR timezone = ANY(%(zones)s))"
        "   AND (NOT %(active)s OR %(slugs)s::text[] IS NOT NULL OR status = 'active')"
        " ORDER BY tenant_id",
        {"slugs": wanted, "zones": zones, "active": active_only},
    ).fetchall()
    found = [Tenant(*row) for row in rows]
    if wanted is not None and len(found) < len(wanted):
        unknown = sorted(set(wanted) - {who.slug for who in found})
        raise BillingError(f"unknown tenant {unknown[0][:70]!r}")
    return found


def local_today(conn: psycopg.Connection, who: Tenant) -> date:
    return conn.execute("SELECT (now() AT TIME ZONE %s)::date", (who.timezone,)).fetchone()[0]


def first_period(who: Tenant) -> Period:
    """The period holding the tenant's creation day: its first billed period."""
    return period_containing(who.created, who.cycle_day)


def _refuse_unbillable_day(who: Tenant, day: date, today: date) -> None:
    if day < who.created:
        raise BillingError(
            f"day {day} of {who.slug} is before the tenant was created ({who.created}, its "
            "local day): billing starts on that day"
        )
    if day >= today:
        raise BillingError(
            f"day {day} of {who.slug} has not ended yet (local date {today} in {who.timezone})"
        )


def _refuse_unbillable_period(who: Tenant, period: Period, today: date) -> None:
    if period.end <= who.created:
        raise BillingError(
            f"period {period.label:%Y-%m} of {who.slug} ended before the tenant was created "
            f"({who.created}, its local day): its first period is "
            f"{first_period(who).label:%Y-%m}"
        )
    if period.start > today:
        raise BillingError(f"period {period.label:%Y-%m} of {who.slug} has not started yet")


def _refuse_final_days(
    conn: psycopg.Connection, pairs: list[tuple[Tenant, date]], todays: dict[int, date]
) -> None:
    """A day of a period with a final invoice is a snapshot that never changes (the database
    refuses it too, migration 0024): say how to correct it instead."""
    final = conn.execute(
        "SELECT w.n, i.period FROM unnest(%s::integer[], %s::date[]) WITH ORDINALITY"
        "       AS w (tenant_id, day, n)"
        "  JOIN invoices i ON i.tenant_id = w.tenant_id AND i.status = 'final'"
        "   AND w.day >= i.period_start AND w.day < i.period_end"
        " ORDER BY w.n LIMIT 1",
        _columns([(who.tenant_id, day) for who, day in pairs], 2),
    ).fetchone()
    if final is None:
        return
    who, day = pairs[final[0] - 1]
    current = period_containing(todays[who.tenant_id], who.cycle_day).label
    raise BillingError(
        f"day {day} of {who.slug} belongs to the final invoice {final[1]:%Y-%m}: its usage is a "
        "snapshot that never changes. To correct it, add an adjustment to the open period: "
        f"iiot billing adjust --tenant {who.slug} --period {current:%Y-%m} --amount <amount> "
        f'--reason "correction of {final[1]:%Y-%m}"'
    )


def billable_days(who: Tenant, period: Period, today: date) -> list[date]:
    """The period's days billed by ``today``: from the tenant's creation day (or the period's
    start) to yesterday (or the period's end)."""
    return [day for day in period.dates(until=today) if day >= who.created]


def latest_local_date(conn: psycopg.Connection) -> date:
    """The date where it is latest now (UTC+14): a day after it has begun nowhere."""
    return conn.execute("SELECT (now() AT TIME ZONE 'Etc/GMT-14')::date").fetchone()[0]


def schedule_price(
    conn: psycopg.Connection,
    plan_id: str,
    valid_from: date,
    prices: dict[str, Decimal],
    *,
    actor: str,
    today: date | None = None,
) -> dict[str, Decimal | None]:
    """Schedule new prices of a plan from the local day ``valid_from`` on, which must not have
    begun anywhere (``today``: the latest local date now); the prices not given stay as they
    are on that day. Audited (``plan.price_scheduled``). Returns the prices from that day."""
    catalog, price_of = pricing(conn)
    if plan_id not in catalog:
        raise BillingError(
            f"unknown plan {plan_id[:40]!r}: expected one of {', '.join(sorted(catalog))}"
        )
    today = today or latest_local_date(conn)
    if valid_from <= today:
        raise BillingError(
            f"a price change must start on a day that has not begun anywhere: after {today} "
            f"(not {valid_from}), so no billed day changes its price"
        )
    unknown = sorted(set(prices) - set(PRICE_FIELDS))
    if unknown or not prices:
        raise BillingError(f"give one or more prices of {', '.join(PRICE_FIELDS)}")
    before = price_of(plan_id, valid_from)
    if before.hard_block and set(prices) != {"monthly_price"}:
        raise BillingError(f"plan {plan_id} bills no overage: only its monthly price can change")
    for name, value in prices.items():
        places = CENT if name == "monthly_price" else Decimal("0.0001")
        if not value.is_finite() or not 0 <= value < MAX_AMOUNT or value != value.quantize(places):
            raise BillingError(
                f"bad {name.replace('_', ' ')} {str(value)[:30]}: a price of 0 or more with at "
                f"most {-places.as_tuple().exponent} decimals"
            )
    after = {name: prices.get(name, getattr(before, name)) for name in PRICE_FIELDS}
    if all(after[name] == getattr(before, name) for name in PRICE_FIELDS):
        raise BillingError(f"plan {plan_id} already has these prices on {valid_from}")
    with conn.transaction():
        try:
            with conn.transaction():
                conn.execute(
                    f"INSERT INTO plan_prices (plan_id, valid_from, {', '.join(PRICE_FIELDS)},"
                    " scheduled_by) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (plan_id, valid_from, *after.values(), actor),
                )
        except psycopg.errors.UniqueViolation:
            raise BillingError(
                f"plan {plan_id} already has a price change on {valid_from}"
            ) from None
        except psycopg.errors.InsufficientPrivilege as exc:
            raise BillingError(str(exc.diag.message_primary)) from None
        conn.execute(
            "INSERT INTO audit_log (actor, action, entity, entity_id, detail)"
            " VALUES (%s, 'plan.price_scheduled', 'plan', %s, %s)",
            (
                actor,
                plan_id,
                Jsonb(
                    {
                        "valid_from": valid_from.isoformat(),
                        "before": {n: str(getattr(before, n)) for n in PRICE_FIELDS},
                        "after": {n: str(v) for n, v in after.items()},
                    }
                ),
            ),
        )
    return after


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


# A constant number of statements for any number of (tenant, local day) pairs: the nightly run
# passes every tenant of a batch with its yesterday, the per-tenant path one tenant and its
# days. The first computes each pair's bounds once (its local day in UTC, its retention).
# The second reads the pairs' ``ingest_usage`` rows: pairs with the same bounds (the tenants of
# one time zone on one day) share one branch, a bitmap scan of the primary key over their
# tenants and those hours, which can run in parallel; a branch per distinct day and time zone.
# The third reads the rest through tenant indexes (plan history, devices, dead letters) and
# the stored readings from the daily usage already recorded (``billing_daily_usage``, one row
# per tenant and day, plus the readings of the pairs being computed) instead of the rollups.
_BOUNDS = """
SELECT w.tenant_id, w.day,
       (w.day)::timestamp AT TIME ZONE t.timezone,
       (w.day + 1)::timestamp AT TIME ZONE t.timezone,
       coalesce(t.retention_days, p.retention_days)
  FROM unnest(%s::integer[], %s::date[]) AS w (tenant_id, day)
  JOIN tenants t ON t.tenant_id = w.tenant_id
  JOIN plans p ON p.plan_id = t.plan_id
 ORDER BY w.tenant_id, w.day
"""

# one branch of the hours statement: tenants sharing a local day and its bounds. The sums come
# from the tenants' rows per UTC hour and the active devices from the devices' rows per UTC day,
# the bits of the day's hours that fall in the local day (masks), both kept by ingest_usage's
# triggers (migration 0018): about 24 rows a tenant and 2 a device instead of a row per device
# and hour.
_HOURS = """
SELECT h.tenant_id, %(day)s::date, h.messages, h.readings, h.overage_messages,
       coalesce(a.devices, 0)
  FROM (SELECT tenant_id, sum(messages) AS messages, sum(readings) AS readings,
               sum(overage_messages) AS overage_messages
          FROM ingest_usage_tenant_hours
         WHERE tenant_id = ANY(%(tenants)s::integer[])
           AND hour >= %(start)s AND hour < %(end)s
         GROUP BY tenant_id) h
  LEFT JOIN (SELECT tenant_id, count(*) AS devices
               FROM (SELECT d.tenant_id, d.device_id
                       FROM ingest_usage_device_days d
                       JOIN unnest(%(utc_days)s::date[], %(masks)s::integer[]) AS m (day, mask)
                         ON d.day = m.day
                      WHERE d.tenant_id = ANY(%(tenants)s::integer[]) AND d.hours & m.mask <> 0
                      GROUP BY d.tenant_id, d.device_id) active
              GROUP BY tenant_id) a USING (tenant_id)
"""


def hour_masks(start: datetime, end: datetime) -> dict[date, int]:
    """The UTC hours h with start <= h < end, as bit masks per UTC day (bit n: hour n)."""
    masks: dict[date, int] = {}
    hour = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    if hour < start:
        hour += timedelta(hours=1)
    while hour < end:
        masks[hour.date()] = masks.get(hour.date(), 0) | 1 << hour.hour
        hour += timedelta(hours=1)
    return masks


_USAGE = """
WITH wanted AS (
    SELECT * FROM unnest(%(tenants)s::integer[], %(days)s::date[], %(starts)s::timestamptz[],
                         %(ends)s::timestamptz[], %(retention)s::integer[],
                         %(readings)s::bigint[])
                  AS w (tenant_id, day, day_start, day_end, retention_days, readings)
),
daily AS (
    SELECT tenant_id, day, readings FROM wanted
    UNION ALL
    SELECT b.tenant_id, b.day, b.readings
      FROM billing_daily_usage b
     WHERE b.tenant_id = ANY(%(tenants)s) AND b.day >= %(first_kept)s AND b.day <= %(last_day)s
       AND NOT EXISTS (SELECT FROM wanted w WHERE w.tenant_id = b.tenant_id AND w.day = b.day)
),
stored AS (
    SELECT w.tenant_id, w.day, sum(d.readings) AS stored_readings
      FROM wanted w
      JOIN daily d
        ON d.tenant_id = w.tenant_id AND d.day > w.day - w.retention_days AND d.day <= w.day
     GROUP BY w.tenant_id, w.day
),
provisioned AS (
    SELECT w.tenant_id, w.day, count(*) AS devices
      FROM wanted w
      JOIN devices d
        ON d.tenant_id = w.tenant_id AND d.created_at < w.day_end
       AND d.status <> 'decommissioned'
     GROUP BY w.tenant_id, w.day
),
dead AS (
    SELECT tenant_id, day, jsonb_object_agg(reason, n) AS reasons
      FROM (SELECT w.tenant_id, w.day, l.reason, count(*) AS n
              FROM wanted w
              JOIN dead_letters l
                ON l.tenant_id = w.tenant_id AND l.received_at >= w.day_start
               AND l.received_at < w.day_end
             GROUP BY w.tenant_id, w.day, l.reason) by_reason
     GROUP BY tenant_id, day
)
SELECT w.tenant_id, w.day,
       (SELECT h.plan_id FROM tenant_plan_history h
         WHERE h.tenant_id = w.tenant_id AND h.valid_from < w.day_end
         ORDER BY h.valid_from DESC LIMIT 1),
       coalesce(provisioned.devices, 0), coalesce(stored.stored_readings, 0),
       coalesce(dead.reasons, '{}')
  FROM wanted w
  LEFT JOIN stored ON stored.tenant_id = w.tenant_id AND stored.day = w.day
  LEFT JOIN provisioned ON provisioned.tenant_id = w.tenant_id AND provisioned.day = w.day
  LEFT JOIN dead ON dead.tenant_id = w.tenant_id AND dead.day = w.day
"""

_CONSUMPTION = """
SELECT c.tenant_id, c.local_day, c.unit, sum(c.consumption)
  FROM marts.consumption_daily c
  JOIN unnest(%(tenants)s::integer[], %(days)s::date[]) AS w (tenant_id, day)
    ON c.tenant_id = w.tenant_id AND c.local_day = w.day
 GROUP BY c.tenant_id, c.local_day, c.unit
 ORDER BY c.tenant_id, c.local_day, c.unit
"""


def bytes_per_reading(conn: psycopg.Connection) -> Decimal:
    """Disk bytes per stored raw reading (table, indexes, TOAST), measured over the whole raw
    table from the planner's statistics: the estimate that turns a tenant's stored readings
    into storage bytes (docs/billing.md). Falls back to 100 bytes before statistics exist.
    The bulk paths measure it once per call (once a night), not once per tenant."""
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


def _pairs(wanted: Iterable[tuple[Tenant, date]]) -> list[tuple[Tenant, date]]:
    """Distinct (tenant, day) pairs, by tenant and day."""
    unique = {(who.tenant_id, day): (who, day) for who, day in wanted}
    return [unique[key] for key in sorted(unique)]


def compute_usage(
    conn: psycopg.Connection,
    wanted: Iterable[tuple[Tenant, date]],
    per_reading: Decimal | None = None,
) -> dict[tuple[int, date], DailyUsage]:
    """The usage of many (tenant, local day) pairs in three statements (one more when the
    consumption mart exists), keyed by (tenant_id, day); nothing is stored."""
    pairs = _pairs(wanted)
    if not pairs:
        return {}
    per_reading = per_reading if per_reading is not None else bytes_per_reading(conn)
    params = {
        "tenants": [who.tenant_id for who, _ in pairs],
        "days": [day for _, day in pairs],
    }
    fallback = {who.tenant_id: who.plan_id for who, _ in pairs}
    bounds = conn.execute(_BOUNDS, [params["tenants"], params["days"]]).fetchall()
    if not bounds:
        return {}
    groups: dict[tuple, list[int]] = {}
    for tenant_id, day, start, end, _ in bounds:
        groups.setdefault((day, start, end), []).append(tenant_id)
    with conn.transaction():
        # JIT compilation costs more than it saves here (as for the rollups); the active
        # devices' hash aggregate fits in memory
        conn.execute("SET LOCAL jit = off; SET LOCAL work_mem = '64MB'")
        hours = {}
        for (day, start, end), ids in groups.items():
            masks = hour_masks(start, end)
            params_hours = {
                "day": day,
                "tenants": ids,
                "start": start,
                "end": end,
                "utc_days": list(masks),
                "masks": list(masks.values()),
            }
            for row in conn.execute(_HOURS, params_hours):
                hours[(row[0], row[1])] = row[2:]
        zero = (0, 0, 0, 0)
        readings = [int(hours.get((b[0], b[1]), zero)[1]) for b in bounds]
        columns = _columns(bounds, 5)
        rows = conn.execute(
            _USAGE,
            {
                **dict(
                    zip(("tenants", "days", "starts", "ends", "retention"), columns, strict=True)
                ),
                "readings": readings,
                "first_kept": min(b[1] - timedelta(days=b[4] - 1) for b in bounds),
                "last_day": max(b[1] for b in bounds),
            },
        ).fetchall()
    consumption: dict[tuple[int, date], dict[str, float]] = {}
    if conn.execute("SELECT to_regclass('marts.consumption_daily')").fetchone()[0]:
        for tenant_id, day, unit, value in conn.execute(_CONSUMPTION, params):
            # the sum of float register differences carries noise (0.5010000000002037)
            consumption.setdefault((tenant_id, day), {})[unit] = to_resolution(float(value), unit)
    result: dict[tuple[int, date], DailyUsage] = {}
    for tenant_id, day, plan_id, provisioned, stored, reasons in rows:
        messages, day_readings, overage, active = hours.get((tenant_id, day), zero)
        dead = {reason: int(n) for reason, n in reasons.items()}
        result[(tenant_id, day)] = DailyUsage(
            day=day,
            plan_id=plan_id or fallback[tenant_id],
            messages=int(messages),
            readings=int(day_readings),
            overage_messages=int(overage),
            active_devices=int(active),
            provisioned_devices=int(provisioned),
            stored_readings=int(stored),
            dead_letters=dead,
            rate_limited=dead.get("rate_limited", 0),
            bytes_per_reading=per_reading,
            storage_bytes=int(Decimal(int(stored)) * per_reading),
            consumption=consumption.get((tenant_id, day), {}),
        )
    return result


def compute_daily_usage(
    conn: psycopg.Connection, who: Tenant, day: date, per_reading: Decimal | None = None
) -> DailyUsage:
    return compute_usage(conn, [(who, day)], per_reading)[(who.tenant_id, day)]


_SAVE_USAGE = """
INSERT INTO billing_daily_usage (tenant_id, day, plan_id, messages, readings, overage_messages,
                                 dead_letters, rate_limited, active_devices,
                                 provisioned_devices, stored_readings, bytes_per_reading,
                                 storage_bytes, consumption)
SELECT * FROM unnest(%s::integer[], %s::date[], %s::text[], %s::bigint[], %s::bigint[],
                     %s::bigint[], %s::jsonb[], %s::bigint[], %s::integer[], %s::integer[],
                     %s::bigint[], %s::numeric[], %s::bigint[], %s::jsonb[])
ON CONFLICT (tenant_id, day) DO UPDATE SET plan_id = excluded.plan_id,
    messages = excluded.messages, readings = excluded.readings,
    overage_messages = excluded.overage_messages, dead_letters = excluded.dead_letters,
    rate_limited = excluded.rate_limited, active_devices = excluded.active_devices,
    provisioned_devices = excluded.provisioned_devices,
    stored_readings = excluded.stored_readings, bytes_per_reading = excluded.bytes_per_reading,
    storage_bytes = excluded.storage_bytes, consumption = excluded.consumption,
    computed_at = now()
"""


def save_usage(conn: psycopg.Connection, rows: Iterable[tuple[int, DailyUsage]]) -> None:
    """Store (tenant_id, usage) rows in one statement (replacing earlier rows of those days)."""
    rows = sorted({(t, u.day): (t, u) for t, u in rows}.items())
    if not rows:
        return
    values = [
        (
            tenant_id,
            u.day,
            u.plan_id,
            u.messages,
            u.readings,
            u.overage_messages,
            Jsonb(u.dead_letters),
            u.rate_limited,
            u.active_devices,
            u.provisioned_devices,
            u.stored_readings,
            u.bytes_per_reading,
            u.storage_bytes,
            Jsonb(u.consumption),
        )
        for (tenant_id, _), (_, u) in rows
    ]
    conn.execute(_SAVE_USAGE, _columns(values, 14))


def save_daily_usage(conn: psycopg.Connection, who: Tenant, usage: DailyUsage) -> None:
    save_usage(conn, [(who.tenant_id, usage)])


_LOAD_USAGE = """
SELECT w.n, u.day, u.plan_id, u.messages, u.readings, u.overage_messages, u.dead_letters,
       u.rate_limited, u.active_devices, u.provisioned_devices, u.stored_readings,
       u.bytes_per_reading, u.storage_bytes, u.consumption
  FROM unnest(%s::integer[], %s::date[], %s::date[]) WITH ORDINALITY
       AS w (tenant_id, first, last, n)
  JOIN billing_daily_usage u ON u.tenant_id = w.tenant_id AND u.day >= w.first AND u.day <= w.last
 ORDER BY w.n, u.day
"""


def load_usage(
    conn: psycopg.Connection, spans: Iterable[tuple[int, date, date]]
) -> list[list[DailyUsage]]:
    """Stored daily usage of many (tenant_id, first day, last day) spans, inclusive, in one
    statement: for each span, in order, its stored days."""
    spans = list(spans)
    result: list[list[DailyUsage]] = [[] for _ in spans]
    if not spans:
        return result
    for r in conn.execute(_LOAD_USAGE, _columns(spans, 3)).fetchall():
        result[r[0] - 1].append(
            DailyUsage(
                day=r[1],
                plan_id=r[2],
                messages=r[3],
                readings=r[4],
                overage_messages=r[5],
                dead_letters=dict(r[6]),
                rate_limited=r[7],
                active_devices=r[8],
                provisioned_devices=r[9],
                stored_readings=r[10],
                bytes_per_reading=r[11],
                storage_bytes=r[12],
                consumption=dict(r[13]),
            )
        )
    return result


def _load_billable(
    conn: psycopg.Connection, spans: list[tuple[int, date, date]]
) -> list[list[DailyUsage]]:
    """``load_usage`` reduced to the columns an invoice is computed from (day, plan, overage
    messages, provisioned devices, storage bytes; the other fields keep their defaults), for
    the bulk invoices: no JSON to decode for thousands of tenant-days."""
    result: list[list[DailyUsage]] = [[] for _ in spans]
    if not spans:
        return result
    for n, day, plan_id, overage, provisioned, storage in conn.execute(
        "SELECT w.n, u.day, u.plan_id, u.overage_messages, u.provisioned_devices,"
        "       u.storage_bytes"
        "  FROM unnest(%s::integer[], %s::date[], %s::date[]) WITH ORDINALITY"
        "       AS w (tenant_id, first, last, n)"
        "  JOIN billing_daily_usage u"
        "    ON u.tenant_id = w.tenant_id AND u.day >= w.first AND u.day <= w.last"
        " ORDER BY w.n, u.day",
        _columns(spans, 3),
    ).fetchall():  # one fetch: iterating the cursor costs more per row
        result[n - 1].append(
            DailyUsage(
                day=day,
                plan_id=plan_id,
                overage_messages=overage,
                provisioned_devices=provisioned,
                storage_bytes=storage,
            )
        )
    return result


def load_daily_usage(conn: psycopg.Connection, who: Tenant, days: list[date]) -> list[DailyUsage]:
    if not days:
        return []
    [usage] = load_usage(conn, [(who.tenant_id, days[0], days[-1])])
    return usage


def record_usage_many(
    conn: psycopg.Connection,
    wanted: Iterable[tuple[Tenant, date]],
    *,
    actor: str = "dagster",
    per_reading: Decimal | None = None,
    today: date | None = None,
) -> dict[int, list[DailyUsage]]:
    """``record_usage`` for many (tenant, local day) pairs at once: bytes per reading measured
    once, the usage of every pair computed in one statement and stored in one, then each
    tenant's storage quota applied to its latest day when that is the latest day stored for
    it, all in one transaction. Returns tenant_id -> the usage stored, by day. A day before the
    tenant's creation, or one that has not ended (``today`` defaults to each tenant's local
    date), is refused and nothing is written."""
    pairs = _pairs(wanted)
    if not pairs:
        return {}
    todays = _todays(conn, (who for who, _ in pairs), today)
    for who, day in pairs:
        _refuse_unbillable_day(who, day, todays[who.tenant_id])
    _refuse_final_days(conn, pairs, todays)
    per_reading = per_reading if per_reading is not None else bytes_per_reading(conn)
    by_id = {who.tenant_id: who for who, _ in pairs}
    with conn.transaction():
        _lock(conn, by_id.values())
        usage = compute_usage(conn, pairs, per_reading)
        done: dict[int, list[DailyUsage]] = {}
        for (tenant_id, _), day_usage in sorted(usage.items()):
            done.setdefault(tenant_id, []).append(day_usage)
        save_usage(conn, ((t, u) for t, days in done.items() for u in days))
        latest = _latest_days(conn, list(done))
        newest = [(by_id[t], days[-1]) for t, days in done.items() if days[-1].day == latest[t]]
        enforce_storage_quotas(conn, newest, actor=actor)
        quota_notices(conn, newest, actor=actor)
    return done


def _latest_days(conn: psycopg.Connection, tenant_ids: list[int]) -> dict[int, date]:
    """Each tenant's latest stored day: the only day its quota state comes from (computing an
    old period must not clear, or set, today's block)."""
    return dict(
        conn.execute(
            "SELECT t, (SELECT max(day) FROM billing_daily_usage WHERE tenant_id = t)"
            "  FROM unnest(%s::integer[]) AS t",
            (tenant_ids,),
        ).fetchall()
    )


def record_usage(
    conn: psycopg.Connection,
    who: Tenant,
    days: Iterable[date],
    *,
    actor: str = "dagster",
    today: date | None = None,
) -> list[DailyUsage]:
    """Compute and store the usage of ``days`` in one transaction, then apply the storage quota
    of starter and pro to the latest day (a warning event, new devices blocked)."""
    done = record_usage_many(conn, [(who, day) for day in days], actor=actor, today=today)
    return done.get(who.tenant_id, [])


def enforce_storage_quota(
    conn: psycopg.Connection, who: Tenant, usage: DailyUsage, *, actor: str
) -> bool | None:
    """Starter and pro over their storage quota: a quota_warning event and new devices blocked
    (tenants.storage_blocked_at) until usage is under the quota again. Returns the new state
    (True blocked, False cleared) or None when nothing changed."""
    return enforce_storage_quotas(conn, [(who, usage)], actor=actor)[who.tenant_id]


def enforce_storage_quotas(
    conn: psycopg.Connection, latest: list[tuple[Tenant, DailyUsage]], *, actor: str
) -> dict[int, bool | None]:
    """``enforce_storage_quota`` for many tenants (each with its latest day): the plans and
    the blocked states are read in one statement each; only a tenant whose state changes is
    written (an update and its event)."""
    catalog = plans(conn)
    changes: dict[int, bool | None] = {who.tenant_id: None for who, _ in latest}
    capped = [(who, u) for who, u in latest if catalog[u.plan_id].hard_block]
    if not capped:
        return changes
    blocked = dict(
        conn.execute(
            "SELECT tenant_id, storage_blocked_at IS NOT NULL FROM tenants"
            " WHERE tenant_id = ANY(%s)",
            ([who.tenant_id for who, _ in capped],),
        ).fetchall()
    )
    for who, usage in capped:
        plan = catalog[usage.plan_id]
        over = usage.storage_bytes > plan.storage_bytes
        if over == blocked[who.tenant_id]:
            continue
        conn.execute(
            "UPDATE tenants SET storage_blocked_at = CASE WHEN %s THEN now() END"
            " WHERE tenant_id = %s",
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
        changes[who.tenant_id] = over
    return changes


def downgrade_excess(conn: psycopg.Connection, who: Tenant, plan_id: str) -> list[str]:
    """What the tenant uses now beyond a plan that blocks (starter, pro): its devices and the
    storage of its latest day, with the numbers; empty when the plan fits or bills overage."""
    plan = plans(conn)[plan_id]
    if not plan.hard_block:
        return []
    devices, day, storage = conn.execute(
        "SELECT (SELECT count(*) FROM devices WHERE tenant_id = %(t)s"
        "          AND status <> 'decommissioned'),"
        "       u.day, coalesce(u.storage_bytes, 0)"
        "  FROM (SELECT 1) one LEFT JOIN LATERAL (SELECT day, storage_bytes"
        "    FROM billing_daily_usage WHERE tenant_id = %(t)s ORDER BY day DESC LIMIT 1) u ON true",
        {"t": who.tenant_id},
    ).fetchone()
    excess = []
    if devices > plan.included_devices:
        excess.append(f"{devices:,} devices, {plan_id} includes {plan.included_devices:,}")
    if storage > plan.storage_bytes:
        excess.append(
            f"{Decimal(storage) / GIB:,.2f} GiB stored on {day}, {plan_id} includes "
            f"{Decimal(plan.storage_bytes) / GIB:,.2f} GiB"
        )
    return excess


_PERIOD_MESSAGES = """
SELECT w.tenant_id, (SELECT coalesce(sum(u.messages), 0)::bigint FROM billing_daily_usage u
                      WHERE u.tenant_id = w.tenant_id AND u.day >= w.first AND u.day <= w.last)
  FROM unnest(%s::integer[], %s::date[], %s::date[]) AS w (tenant_id, first, last)
"""

_SAVE_NOTICES = """
INSERT INTO billing_events (tenant_id, period, kind, actor, detail)
SELECT w.tenant_id, w.period, 'quota_notice', %s, w.detail
  FROM unnest(%s::integer[], %s::date[], %s::jsonb[]) AS w (tenant_id, period, detail)
ON CONFLICT (tenant_id, period, (detail ->> 'quota'), (detail ->> 'threshold'))
   WHERE kind = 'quota_notice' DO NOTHING
RETURNING tenant_id, period, detail
"""


@dataclass(frozen=True)
class QuotaNotice:
    tenant_id: int
    period: date
    detail: dict[str, Any]


def quota_notices(
    conn: psycopg.Connection, latest: list[tuple[Tenant, DailyUsage]], *, actor: str
) -> list[QuotaNotice]:
    """Each tenant's usage on its latest day against its plan's included devices, messages
    (the period to date against the period's allowance) and storage: a ``quota_notice`` event
    at 80 % and at 100 %, once per period, quota and threshold. Returns the notices new now
    (``billing_alerts.send_quota_notices`` sends them)."""
    if not latest:
        return []
    catalog = plans(conn)
    periods = {who.tenant_id: period_containing(u.day, who.cycle_day) for who, u in latest}
    messages = dict(
        conn.execute(
            _PERIOD_MESSAGES,
            _columns(
                [(who.tenant_id, periods[who.tenant_id].start, u.day) for who, u in latest], 3
            ),
        ).fetchall()
    )
    rows = []
    for who, usage in latest:
        plan, period = catalog[usage.plan_id], periods[who.tenant_id]
        for quota, used, included in (
            ("devices", usage.provisioned_devices, plan.included_devices),
            ("messages", messages[who.tenant_id], plan.included_messages(period.days)),
            ("storage", usage.storage_bytes, plan.storage_bytes),
        ):
            for threshold in QUOTA_THRESHOLDS:
                if included and used * 100 >= included * threshold:
                    detail = {
                        "quota": quota,
                        "threshold": threshold,
                        "used": used,
                        "included": included,
                        "percent": round(used * 100 / included, 1),
                        "plan": plan.plan_id,
                        "day": usage.day.isoformat(),
                    }
                    rows.append((who.tenant_id, period.label, Jsonb(detail)))
    if not rows:
        return []
    return [QuotaNotice(*row) for row in conn.execute(_SAVE_NOTICES, [actor, *_columns(rows, 3)])]


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
    """An invoice line: ``quantity x unit_price x fraction``, rounded half up to the cent, is
    ``amount`` (the fraction prorates a monthly price by the days of the period, or turns a price
    per 1,000 messages into one per message; it is not stored)."""

    kind: str
    description: str
    quantity: Decimal
    unit: str
    unit_price: Decimal
    amount: Decimal
    reason: str | None = None
    fraction: Fraction = Fraction(1)


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


def _segments(
    usage: list[DailyUsage], price_of: Callable[[str, date], Plan]
) -> list[tuple[Plan, list[DailyUsage]]]:
    """Consecutive days on the same plan at the same prices."""
    segments: list[tuple[Plan, list[DailyUsage]]] = []
    for day in usage:
        plan = price_of(day.plan_id, day.day)
        if segments and segments[-1][0] == plan:
            segments[-1][1].append(day)
        else:
            segments.append((plan, [day]))
    return segments


def _quantity(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)


def invoice_lines(
    usage: list[DailyUsage],
    period: Period,
    catalog: dict[str, Plan],
    adjustments: list[tuple[Decimal, str]] = (),  # type: ignore[assignment]
    late: list[LateUsage] = (),  # type: ignore[assignment]
    price_of: Callable[[str, date], Plan] | None = None,
) -> list[Line]:
    """The lines of a period from its days' usage, its adjustments and the late usage of final
    periods billed on it: pure arithmetic, no database. ``price_of(plan_id, day)`` gives a
    plan at the prices of a day (default: the catalog's prices for every day)."""
    days_in_period = Decimal(period.days)
    per_day, per_message = Fraction(1, period.days), Fraction(1, 1000)
    lines: list[Line] = []
    segments = _segments(usage, price_of or (lambda plan_id, _: catalog[plan_id]))
    for plan, days in segments:
        span = f"{days[0].day:%Y-%m-%d} to {days[-1].day:%Y-%m-%d}"
        lines.append(
            Line(
                "base",
                f"{plan.name} plan, {span} ({len(days)} of {period.days} days)",
                Decimal(len(days)),
                "days",
                plan.monthly_price,
                money(plan.monthly_price * len(days) / days_in_period),
                fraction=per_day,
            )
        )
    for plan, days in segments:
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
                    fraction=per_day,
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
                    fraction=per_message,
                )
            )
        gib_days = sum(
            (Decimal(max(0, d.storage_bytes - plan.storage_bytes)) / GIB for d in days),
            Decimal(0),
        )
        if gib_days:
            shown = _quantity(gib_days)  # the amount from the quantity on the invoice's face
            lines.append(
                Line(
                    "overage_storage",
                    f"Storage over the {Decimal(plan.storage_bytes) / GIB:.0f} GiB quota, {span}",
                    shown,
                    "GiB-days",
                    plan.overage_storage_price_per_gib,
                    money(plan.overage_storage_price_per_gib * shown / days_in_period),
                    fraction=per_day,
                )
            )
    for amount, reason in adjustments:
        kind = "credit" if amount < 0 else "debit"
        lines.append(
            Line(
                "adjustment", f"Adjustment ({kind})", Decimal(1), "", amount, money(amount), reason
            )
        )
    for x in late:
        lines.append(
            Line(
                "adjustment",
                f"Late usage of {x.day} (final invoice {x.source_period:%Y-%m}): "
                f"{x.messages:,} messages, {x.readings:,} readings",
                Decimal(x.overage_messages),
                "messages over the rate",
                x.unit_price,
                x.amount,
                f"received after the final invoice {x.source_period:%Y-%m} was computed",
                per_message,
            )
        )
    return lines


@dataclass(frozen=True)
class LateUsage:
    """Usage of a final period's day that its invoice did not hold, billed on a later one."""

    day: date
    source_period: date
    messages: int
    readings: int
    overage_messages: int
    unit_price: Decimal
    amount: Decimal


def _late_usage(
    conn: psycopg.Connection, keys: list[tuple[int, date]]
) -> dict[tuple[int, date], list[LateUsage]]:
    """The late usage billed on many (tenant_id, period label) invoices, by source day."""
    result: dict[tuple[int, date], list[LateUsage]] = {}
    if not keys:
        return result
    for tenant_id, period, *late in conn.execute(
        "SELECT l.tenant_id, l.period, l.day, l.source_period, l.messages, l.readings,"
        "       l.overage_messages, l.unit_price, l.amount"
        "  FROM billing_late_usage l"
        "  JOIN (SELECT DISTINCT * FROM unnest(%s::integer[], %s::date[])) AS w (tenant_id, period)"
        "    ON l.tenant_id = w.tenant_id AND l.period = w.period"
        " ORDER BY l.day, l.late_id",
        _columns(keys, 2),
    ):
        result.setdefault((tenant_id, period), []).append(LateUsage(*late))
    return result


_BILLED_DAYS = """
SELECT w.tenant_id, w.day, u.plan_id, (u.messages + coalesce(l.messages, 0))::bigint,
       (u.readings + coalesce(l.readings, 0))::bigint,
       (u.overage_messages + coalesce(l.overage_messages, 0))::bigint
  FROM unnest(%s::integer[], %s::date[]) AS w (tenant_id, day)
  JOIN billing_daily_usage u ON u.tenant_id = w.tenant_id AND u.day = w.day
  LEFT JOIN LATERAL (SELECT sum(messages) AS messages, sum(readings) AS readings,
                            sum(overage_messages) AS overage_messages
                       FROM billing_late_usage x
                      WHERE x.tenant_id = w.tenant_id AND x.day = w.day) l ON true
"""

_SAVE_LATE = """
INSERT INTO billing_late_usage (tenant_id, day, source_period, period, plan_id, messages,
                                readings, overage_messages, unit_price, amount)
SELECT * FROM unnest(%s::integer[], %s::date[], %s::date[], %s::date[], %s::text[],
                     %s::bigint[], %s::bigint[], %s::bigint[], %s::numeric[], %s::numeric[])
"""


def _settle_late_usage(
    conn: psycopg.Connection, tenants: list[Tenant], today: date | None, actor: str
) -> None:
    """Take the tenants' late-usage marks (migration 0025) inside the caller's transaction,
    which holds their advisory locks: a marked day of a period that is not final is computed
    again (the draft or the final invoice picks it up); one of a final period is billed once on
    the open invoice, as the difference between the day computed again and what was billed for
    it (its snapshot and earlier late usage), with a ``late_usage`` event naming the day and the
    counts. A mark whose day changed nothing bills nothing."""
    marks = conn.execute(
        "DELETE FROM billing_late_hours WHERE tenant_id = ANY(%s) RETURNING tenant_id, hour",
        ([who.tenant_id for who in tenants],),
    ).fetchall()
    if not marks:
        return
    by_id = {who.tenant_id: who for who in tenants}
    todays = _todays(conn, tenants, today)
    days = sorted({(t, hour.astimezone(ZoneInfo(by_id[t].timezone)).date()) for t, hour in marks})
    days = [(t, day) for t, day in days if by_id[t].created <= day < todays[t]]
    final = {
        (t, day): period
        for t, day, period in conn.execute(
            "SELECT w.tenant_id, w.day, i.period FROM unnest(%s::integer[], %s::date[])"
            "       AS w (tenant_id, day)"
            "  JOIN invoices i ON i.tenant_id = w.tenant_id AND i.status = 'final'"
            "   AND w.day >= i.period_start AND w.day < i.period_end",
            _columns(days, 2),
        )
    }
    reopened = [(by_id[t], day) for t, day in days if (t, day) not in final]
    if reopened:
        record_usage_many(conn, reopened, actor=actor)
    if not final:
        return
    recomputed = compute_usage(conn, [(by_id[t], day) for t, day in final])
    billed = {
        (t, day): rest for t, day, *rest in conn.execute(_BILLED_DAYS, _columns(list(final), 2))
    }
    _, price_of = pricing(conn)
    rows, events = [], []
    for (t, day), source in sorted(final.items()):
        plan_id, messages, readings, overage = billed[(t, day)]
        now = recomputed[(t, day)]
        more = (now.messages - messages, now.readings - readings, now.overage_messages - overage)
        if not any(more):
            continue
        plan = price_of(plan_id, day)
        price = Decimal(0) if plan.hard_block else plan.overage_price_per_1k_messages
        amount = money(price * more[2] / THOUSAND)
        label = period_containing(todays[t], by_id[t].cycle_day).label
        rows.append((t, day, source, label, plan_id, *more, price, amount))
        detail = {
            "day": day.isoformat(),
            "final_invoice": f"{source:%Y-%m}",
            "messages": more[0],
            "readings": more[1],
            "overage_messages": more[2],
            "amount": str(amount),
        }
        events.append((t, label, "late_usage", None, amount, Jsonb(detail)))
    if rows:
        conn.execute(_SAVE_LATE, _columns(rows, 10))
        conn.execute(_SAVE_EVENTS, [actor, *_columns(events, 6)])


def _fingerprint(
    usage: list[DailyUsage], price_of: Callable[[str, date], Plan], lines: list[Line]
) -> str:
    used = {price_of(d.plan_id, d.day) for d in usage}
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
        "plans": sorted([str(v) for v in vars(plan).values()] for plan in used),
        "lines": [[str(v) for v in vars(line).values()] for line in lines],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def adjustments_of(conn: psycopg.Connection, who: Tenant, label: date) -> list[tuple]:
    return _adjustments(conn, [(who.tenant_id, label)]).get((who.tenant_id, label), [])


def _adjustments(
    conn: psycopg.Connection, keys: list[tuple[int, date]]
) -> dict[tuple[int, date], list[tuple]]:
    """The adjustments of many (tenant_id, period label) pairs, each in adjustment order."""
    if not keys:
        return {}
    result: dict[tuple[int, date], list[tuple]] = {}
    for tenant_id, period, amount, reason in conn.execute(
        "SELECT a.tenant_id, a.period, a.amount, a.reason FROM billing_adjustments a"
        "  JOIN (SELECT DISTINCT * FROM unnest(%s::integer[], %s::date[])) AS w (tenant_id, period)"
        "    ON a.tenant_id = w.tenant_id AND a.period = w.period"
        " ORDER BY a.adjustment_id",
        [[k[0] for k in keys], [k[1] for k in keys]],
    ):
        result.setdefault((tenant_id, period), []).append((amount, reason))
    return result


def local_todays(conn: psycopg.Connection, tenants: Iterable[Tenant]) -> dict[int, date]:
    """Each tenant's local date now (``local_today`` of many tenants, one statement)."""
    tenants = list(tenants)
    zones = sorted({who.timezone for who in tenants})
    if not zones:
        return {}
    today = dict(
        conn.execute(
            "SELECT tz, (now() AT TIME ZONE tz)::date FROM unnest(%s::text[]) AS tz", (zones,)
        ).fetchall()
    )
    return {who.tenant_id: today[who.timezone] for who in tenants}


def _todays(
    conn: psycopg.Connection, tenants: Iterable[Tenant], today: date | None
) -> dict[int, date]:
    """``today`` for every tenant, or (None) each tenant's local date."""
    if today is not None:
        return {who.tenant_id: today for who in tenants}
    return local_todays(conn, tenants)


def _compute_invoices(
    conn: psycopg.Connection, requests: list[tuple[Tenant, date]], today: date | None
) -> list[Invoice | BillingError]:
    """The invoices of many (tenant, period label) requests, in request order; a request that
    cannot be computed gives its BillingError instead. A constant number of statements: the
    stored usage of every period, the missing days computed and stored at once
    (``record_usage_many``), the plans and the adjustments."""
    todays = _todays(conn, (who for who, _ in requests), today)
    result: list[Invoice | BillingError | None] = [None] * len(requests)
    work: list[tuple[int, Tenant, Period, date, list[date]]] = []
    for n, (who, label) in enumerate(requests):
        period = period_of(label, who.cycle_day)
        today_ = todays[who.tenant_id]
        try:
            _refuse_unbillable_period(who, period, today_)
        except BillingError as refused:
            result[n] = refused
            continue
        work.append((n, who, period, today_, billable_days(who, period, today_)))

    def usage_of(items: list) -> dict[int, list[DailyUsage]]:
        spans = [(who.tenant_id, days[0], days[-1]) for _, who, _, _, days in items if days]
        found = iter(_load_billable(conn, spans))
        return {item[0]: next(found) if item[4] else [] for item in items}

    loaded = usage_of(work)
    missing = []
    again = []
    for item in work:
        n, who, _, _, days = item
        stored = {u.day for u in loaded[n]}
        gaps = [(who, d) for d in days if d not in stored]
        if gaps:
            missing += gaps
            again.append(item)
    if missing:
        record_usage_many(conn, missing, today=today)
        loaded.update(usage_of(again))
    catalog, price_of = pricing(conn)
    keys = [(who.tenant_id, period.label) for _, who, period, _, _ in work]
    adjustments = _adjustments(conn, keys)
    late = _late_usage(conn, keys)
    for n, who, period, today_, _ in work:
        usage = loaded[n]
        key = (who.tenant_id, period.label)
        lines = invoice_lines(
            usage, period, catalog, adjustments.get(key, []), late.get(key, []), price_of
        )
        currency = catalog[usage[0].plan_id].currency if usage else catalog[who.plan_id].currency
        result[n] = Invoice(
            tenant_id=who.tenant_id,
            period=period,
            status="final" if period.end <= today_ else "draft",
            currency=currency,
            lines=tuple(lines),
            days_billed=len(usage),
            inputs_sha256=_fingerprint(usage, price_of, lines),
        )
    return result  # type: ignore[return-value]


def compute_invoices(
    conn: psycopg.Connection, requests: Iterable[tuple[Tenant, date]], today: date | None = None
) -> list[Invoice]:
    """``compute_invoice`` for many (tenant, period label) requests, in request order, with a
    constant number of statements; the first request that cannot be computed raises."""
    invoices = _compute_invoices(conn, list(requests), today)
    for invoice in invoices:
        if isinstance(invoice, BillingError):
            raise invoice
    return invoices  # type: ignore[return-value]


def compute_invoice(
    conn: psycopg.Connection, who: Tenant, label: date, today: date | None = None
) -> Invoice:
    """The invoice of a period from the stored daily usage: final when the period closed before
    ``today`` (the tenant's local date), else a month-to-date draft. Days without stored usage
    are computed first."""
    [invoice] = compute_invoices(conn, [(who, label)], today)
    return invoice


@dataclass(frozen=True)
class Stored:
    invoice_id: int
    status: str
    total: Decimal
    inputs_sha256: str
    lines: tuple[Line, ...]


def stored_invoices(
    conn: psycopg.Connection, keys: Iterable[tuple[int, date]]
) -> dict[tuple[int, date], Stored]:
    """The stored invoices (with their lines) of many (tenant_id, period label) pairs."""
    keys = list(keys)
    if not keys:
        return {}
    rows = conn.execute(
        "SELECT i.tenant_id, i.period, i.invoice_id, i.status, i.total, i.inputs_sha256"
        "  FROM invoices i"
        "  JOIN (SELECT DISTINCT * FROM unnest(%s::integer[], %s::date[])) AS w (tenant_id, period)"
        "    ON i.tenant_id = w.tenant_id AND i.period = w.period",
        [[k[0] for k in keys], [k[1] for k in keys]],
    ).fetchall()
    if not rows:
        return {}
    lines: dict[int, list[Line]] = {}
    for invoice_id, *line in conn.execute(
        "SELECT invoice_id, kind, description, quantity, unit, unit_price, amount, reason"
        "  FROM invoice_lines WHERE invoice_id = ANY(%s) ORDER BY invoice_id, line_no",
        ([row[2] for row in rows],),
    ):
        lines.setdefault(invoice_id, []).append(Line(*line))
    return {(row[0], row[1]): Stored(*row[2:], tuple(lines.get(row[2], ()))) for row in rows}


def stored_invoice(conn: psycopg.Connection, tenant_id: int, label: date) -> Stored | None:
    return stored_invoices(conn, [(tenant_id, label)]).get((tenant_id, label))


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


_SAVE_INVOICES = """
INSERT INTO invoices (tenant_id, period, period_start, period_end, status, currency, total,
                      inputs_sha256, days_billed, finalised_at)
SELECT w.tenant_id, w.period, w.period_start, w.period_end, w.status, w.currency, w.total,
       w.inputs_sha256, w.days_billed, CASE WHEN w.status = 'final' THEN now() END
  FROM unnest(%s::integer[], %s::date[], %s::date[], %s::date[], %s::text[], %s::text[],
              %s::numeric[], %s::text[], %s::integer[])
       AS w (tenant_id, period, period_start, period_end, status, currency, total,
             inputs_sha256, days_billed)
ON CONFLICT (tenant_id, period) DO UPDATE SET period_start = excluded.period_start,
    period_end = excluded.period_end, status = excluded.status, currency = excluded.currency,
    total = excluded.total, inputs_sha256 = excluded.inputs_sha256,
    days_billed = excluded.days_billed, computed_at = now(), finalised_at = excluded.finalised_at
RETURNING tenant_id, period, invoice_id
"""

_SAVE_LINES = """
INSERT INTO invoice_lines (invoice_id, line_no, tenant_id, kind, description, quantity, unit,
                           unit_price, amount, reason)
SELECT * FROM unnest(%s::bigint[], %s::integer[], %s::integer[], %s::text[], %s::text[],
                     %s::numeric[], %s::text[], %s::numeric[], %s::numeric[], %s::text[])
"""

_SAVE_EVENTS = """
INSERT INTO billing_events (tenant_id, period, kind, actor, before_amount, after_amount, detail)
SELECT w.tenant_id, w.period, w.kind, %s, w.before_amount, w.after_amount, w.detail
  FROM unnest(%s::integer[], %s::date[], %s::text[], %s::numeric[], %s::numeric[],
              %s::jsonb[]) WITH ORDINALITY
       AS w (tenant_id, period, kind, before_amount, after_amount, detail, n)
 ORDER BY w.n
"""


def _lock(conn: psycopg.Connection, tenants: Iterable[Tenant]) -> None:
    """The tenants' billing locks, in tenant order, until the transaction ends: one billing run
    per tenant at a time, and ingest's late-usage marks (migration 0025) wait for it."""
    conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('iiot.billing'), t)"
        "  FROM unnest(%s::integer[]) AS t",
        (sorted({who.tenant_id for who in tenants}),),
    )


def _bill_batch(
    conn: psycopg.Connection,
    requests: list[tuple[Tenant, date]],
    today: date | None,
    actor: str,
) -> list[Outcome | BillingError]:
    """``bill`` for many (tenant, period label) requests (distinct), inside the caller's
    transaction: the tenants' advisory locks in tenant order, the invoices computed in bulk,
    then the stored invoices, their lines and the events written with one statement each. A
    request that fails (a changed final invoice, a period not started) gives its BillingError
    and writes nothing of its own."""
    tenants = list({who.tenant_id: who for who, _ in requests}.values())
    _lock(conn, tenants)
    _settle_late_usage(conn, tenants, today, actor)
    computed = _compute_invoices(conn, requests, today)
    stored = stored_invoices(
        conn,
        [(x.tenant_id, x.period.label) for x in computed if not isinstance(x, BillingError)],
    )
    results: list[Outcome | BillingError | None] = [None] * len(requests)
    write: list[tuple[int, Tenant, Invoice, Stored | None]] = []
    for n, ((who, _), invoice) in enumerate(zip(requests, computed, strict=True)):
        if isinstance(invoice, BillingError):
            results[n] = invoice
            continue
        before = stored.get((who.tenant_id, invoice.period.label))
        if before is not None and before.status == "final":
            if before.total != invoice.total or not _same(before.lines, invoice.lines):
                results[n] = BillingError(
                    f"final invoice {invoice.period.label:%Y-%m} of {who.slug} no longer matches "
                    f"its data: total {before.total} stored, {invoice.total} recomputed "
                    f"(inputs {before.inputs_sha256[:12]} -> {invoice.inputs_sha256[:12]}); a "
                    "final invoice never changes: add an adjustment to an open period"
                )
            else:
                results[n] = Outcome(invoice, before.invoice_id, "unchanged", before.total)
            continue
        write.append((n, who, invoice, before))
    if not write:
        return results  # type: ignore[return-value]
    replaced = [before.invoice_id for _, _, _, before in write if before is not None]
    if replaced:
        conn.execute("DELETE FROM invoice_lines WHERE invoice_id = ANY(%s)", (replaced,))
    ids = {
        (tenant_id, period): invoice_id
        for tenant_id, period, invoice_id in conn.execute(
            _SAVE_INVOICES,
            _columns(
                [
                    (
                        who.tenant_id,
                        x.period.label,
                        x.period.start,
                        x.period.end,
                        x.status,
                        x.currency,
                        x.total,
                        x.inputs_sha256,
                        x.days_billed,
                    )
                    for _, who, x, _ in write
                ],
                9,
            ),
        )
    }
    lines = [
        (
            ids[(who.tenant_id, x.period.label)],
            line_no,
            who.tenant_id,
            line.kind,
            line.description,
            line.quantity,
            line.unit,
            line.unit_price,
            line.amount,
            line.reason,
        )
        for _, who, x, _ in write
        for line_no, line in enumerate(x.lines, start=1)
    ]
    if lines:
        conn.execute(_SAVE_LINES, _columns(lines, 10))
    events = []
    for n, who, invoice, before in write:
        action = "finalised" if invoice.status == "final" else "draft"
        previous = None if before is None else before.total
        events.append(
            (
                who.tenant_id,
                invoice.period.label,
                "invoice_finalised" if action == "finalised" else "draft_computed",
                previous,
                invoice.total,
                Jsonb(
                    {
                        "days_billed": invoice.days_billed,
                        "lines": len(invoice.lines),
                        "inputs_sha256": invoice.inputs_sha256,
                    }
                ),
            )
        )
        results[n] = Outcome(invoice, ids[(who.tenant_id, invoice.period.label)], action, previous)
    conn.execute(_SAVE_EVENTS, [actor, *_columns(events, 6)])
    return results  # type: ignore[return-value]


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
        [outcome] = _bill_batch(conn, [(who, label)], today, actor)
        if isinstance(outcome, BillingError):
            raise outcome
    return outcome


BATCH_TENANTS = 1000  # tenants per transaction of a bulk run (one advisory lock each)


@dataclass(frozen=True)
class BulkBilling:
    """What a bulk run did: the outcome of each request that succeeded, in request order, and
    the requests that failed with the reason (nothing of theirs was written)."""

    outcomes: list[Outcome]
    failures: list[tuple[Tenant, date, str]]


def bill_many(
    conn: psycopg.Connection,
    requests: Iterable[tuple[Tenant, date]],
    *,
    today: date | None = None,
    actor: str = "dagster",
    batch: int = BATCH_TENANTS,
) -> BulkBilling:
    """``bill`` for many (tenant, period label) requests with a constant number of statements
    per batch of ``batch`` tenants, each batch one transaction holding the advisory lock of
    each of its tenants (so a tenant-period is never billed by two runs at once, bulk or not).
    Same rows, numbers and events as ``bill`` for each request; a failing request (a changed
    final invoice) does not stop the others: it is reported in ``failures``."""
    unique = list({(who.tenant_id, label): (who, label) for who, label in requests}.values())
    unique.sort(key=lambda request: request[0].tenant_id)
    outcomes: list[Outcome] = []
    failures: list[tuple[Tenant, date, str]] = []
    for start in range(0, len(unique), max(batch, 1)):
        chunk = unique[start : start + max(batch, 1)]
        with conn.transaction():
            results = _bill_batch(conn, chunk, today, actor)
        for (who, label), result in zip(chunk, results, strict=True):
            if isinstance(result, BillingError):
                failures.append((who, label, str(result)))
            else:
                outcomes.append(result)
    return BulkBilling(outcomes, failures)


@dataclass(frozen=True)
class Nightly:
    """A bulk night: the usage stored per tenant and the billing outcomes."""

    usage: dict[int, list[DailyUsage]]
    billing: BulkBilling


def bill_night(
    conn: psycopg.Connection,
    tenants: Iterable[Tenant],
    day: date,
    *,
    today: date | None = None,
    actor: str = "dagster",
    batch: int = BATCH_TENANTS,
) -> Nightly:
    """The nightly billing of many tenants whose local ``day`` has ended (e.g. all tenants of
    a time zone): the usage of ``day`` for every tenant (``record_usage_many``: bytes per
    reading measured once, one statement to compute, one to store), then each tenant's invoice
    of the period holding ``day`` (``bill_many``). ``today`` defaults to each tenant's local
    date. A tenant created after ``day`` is a failure, and nothing of it is written."""
    tenants = sorted(tenants, key=lambda who: who.tenant_id)
    unborn = [who for who in tenants if who.created > day]
    tenants = [who for who in tenants if who.created <= day]
    usage = record_usage_many(conn, [(who, day) for who in tenants], today=today)
    billed = bill_many(
        conn,
        [(who, period_containing(day, who.cycle_day).label) for who in tenants],
        today=today,
        actor=actor,
        batch=batch,
    )
    refused = [
        (who, period_containing(day, who.cycle_day).label, f"{day} is before {who.slug} existed")
        for who in unborn
    ]
    return Nightly(usage, BulkBilling(billed.outcomes, refused + billed.failures))


def add_adjustment(
    conn: psycopg.Connection,
    who: Tenant,
    label: date,
    amount: Decimal,
    reason: str,
    *,
    actor: str,
    today: date | None = None,
) -> int:
    """An explicit credit (negative) or debit line for the open period or the next one (the
    periods an invoice will still be computed for; ``today`` defaults to the tenant's local
    date)."""
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
        _lock(conn, [who])
        stored = stored_invoice(conn, who.tenant_id, period.label)
        if stored is not None and stored.status == "final":
            raise BillingError(
                f"invoice {period.label:%Y-%m} of {who.slug} is final: put the correction in an "
                "open period (e.g. the current one), naming the corrected period in the reason"
            )
        current = period_containing(today or local_today(conn, who), who.cycle_day).label
        following = add_months(current, 1)
        if period.label not in (current, following):
            raise BillingError(
                f"period {period.label:%Y-%m} of {who.slug} will not be invoiced again: an "
                f"adjustment goes to the open period {current:%Y-%m} or the next one "
                f"{following:%Y-%m}, naming the corrected period in the reason"
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


# Readings billed for spans of local days (the snapshots and the late usage of those days)
# against the raw readings received in the same days by billing's rule: a UTC hour belongs to
# the local day it starts in, so a day's readings are those received from the first whole UTC
# hour at or after its local midnight to the first at or after the next (in a half-hour zone
# the hour straddling midnight counts on the day it starts in, for both).
_RECONCILE = """
SELECT w.tenant_id,
       (SELECT coalesce(sum(u.readings), 0) FROM billing_daily_usage u
         WHERE u.tenant_id = w.tenant_id AND u.day >= w.first AND u.day <= w.last)
       + (SELECT coalesce(sum(l.readings), 0) FROM billing_late_usage l
           WHERE l.tenant_id = w.tenant_id AND l.day >= w.first AND l.day <= w.last),
       (SELECT count(*) FROM telemetry r
         WHERE r.tenant_id = w.tenant_id AND r.received_at >= b.start AND r.received_at < b.stop)
  FROM unnest(%s::integer[], %s::date[], %s::date[]) AS w (tenant_id, first, last)
  JOIN tenants t ON t.tenant_id = w.tenant_id
 CROSS JOIN LATERAL (
       SELECT date_trunc('hour', (w.first::timestamp AT TIME ZONE t.timezone)
                                 - interval '1 microsecond', 'UTC') + interval '1 hour' AS start,
              date_trunc('hour', ((w.last + 1)::timestamp AT TIME ZONE t.timezone)
                                 - interval '1 microsecond', 'UTC') + interval '1 hour' AS stop) b
"""


def reconcile_many(
    conn: psycopg.Connection, spans: Iterable[tuple[int, date, date]]
) -> dict[int, tuple[int, int]]:
    """For many (tenant_id, first day, last day) spans: tenant_id -> (readings billed, raw
    readings received) over those local days, by the same rule as billing (the raw rows still
    retained). One statement."""
    spans = [span for span in spans if span[1] <= span[2]]
    if not spans:
        return {}
    return {
        tenant_id: (int(billed), int(raw))
        for tenant_id, billed, raw in conn.execute(_RECONCILE, _columns(spans, 3))
    }


def reconcile(conn: psycopg.Connection, who: Tenant, period: Period, until: date) -> tuple:
    """Readings billed for the period's days against raw readings received in the same local
    days (``reconcile_many`` for one tenant)."""
    days = billable_days(who, period, until)
    if not days:
        return 0, 0
    return reconcile_many(conn, [(who.tenant_id, days[0], days[-1])])[who.tenant_id]
