"""The consumption report of one tenant and period: periods, the queries and the report model.

The numbers come from the dbt marts (``marts.consumption_daily``, docs/marts.md) and the registry;
every query filters by the tenant. A period is a calendar month, an ISO week or a range of days,
always in the tenant's time zone, as the marts' local days are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from importlib import resources
from itertools import groupby
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from iiot_orchestration.errors import IiotError
from iiot_orchestration.reports.labels import Labels, labels_for
from iiot_orchestration.reports.units import to_resolution

MAX_PERIOD_DAYS = 366
MIN_YEAR, MAX_YEAR = 2000, 2100
METER_KINDS = ("energy", "water", "gas")
_SLUG = re.compile(r"[a-z0-9][a-z0-9-]{1,62}", re.ASCII)
_MONTH = re.compile(r"([0-9]{4})-([0-9]{2})", re.ASCII)
_WEEK = re.compile(r"([0-9]{4})-W([0-9]{2})", re.ASCII)
_DAY = r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
_RANGE = re.compile(rf"{_DAY}(?:\.\.{_DAY})?", re.ASCII)
_QUERY_HEADER = re.compile(r"^-- name: ([a-z_]+)\s*$", re.MULTILINE)
# the alerts table comes with a later issue: these are the column names it may use
ALERT_TIME_COLUMNS = ("raised_at", "opened_at", "triggered_at", "started_at", "created_at", "ts")
ALERT_GROUP_COLUMNS = ("severity", "rule", "kind", "alert_type", "type")


class ReportError(IiotError):
    """A report cannot be made as asked (bad period, unknown tenant, marts not built)."""


@cache
def queries() -> dict[str, str]:
    """The named queries of ``reports/queries.sql``, loaded once."""
    text = resources.files(__package__).joinpath("queries.sql").read_text()
    parts = _QUERY_HEADER.split(text)
    return dict(zip(parts[1::2], (body.strip() for body in parts[2::2]), strict=True))


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


@dataclass(frozen=True)
class Period:
    """Local calendar days ``first_day`` to ``last_day`` (inclusive) of a month, week or range."""

    kind: str  # month, week or range
    first_day: date
    last_day: date

    @property
    def label(self) -> str:
        """The canonical spelling, also the period's folder: 2026-10, 2026-W44, 2026-10-01..15."""
        if self.kind == "month":
            return f"{self.first_day:%Y-%m}"
        if self.kind == "week":
            year, week, _ = self.first_day.isocalendar()
            return f"{year}-W{week:02d}"
        if self.first_day == self.last_day:
            return self.first_day.isoformat()
        return f"{self.first_day.isoformat()}..{self.last_day.isoformat()}"

    @property
    def days(self) -> list[date]:
        return [
            self.first_day + timedelta(days=n)
            for n in range((self.last_day - self.first_day).days + 1)
        ]

    @classmethod
    def month(cls, year: int, month: int) -> Period:
        first = date(year, month, 1)
        following = date(year + month // 12, month % 12 + 1, 1)
        return cls("month", first, following - timedelta(days=1))

    @classmethod
    def from_month_key(cls, key: str) -> Period:
        """The month of a partition key such as ``2026-10-01``."""
        parsed = date.fromisoformat(key)
        return cls.month(parsed.year, parsed.month)

    def previous(self) -> Period:
        """The month or week before, or the same number of days just before a range."""
        if self.kind == "month":
            before = self.first_day - timedelta(days=1)
            return Period.month(before.year, before.month)
        length = (self.last_day - self.first_day).days + 1
        return Period(
            self.kind,
            self.first_day - timedelta(days=length),
            self.first_day - timedelta(days=1),
        )

    def bounds(self, timezone: str) -> tuple[datetime, datetime]:
        """Start and end (exclusive) of the period in UTC, from local midnights."""
        zone = ZoneInfo(timezone)
        start = datetime.combine(self.first_day, time(), zone)
        end = datetime.combine(self.last_day + timedelta(days=1), time(), zone)
        return start.astimezone(UTC), end.astimezone(UTC)

    def describe(self, labels: Labels) -> str:
        first, last = labels.day(self.first_day), labels.day(self.last_day)
        if self.kind == "month":
            return labels.month(self.first_day)
        if self.kind == "week":
            year, week, _ = self.first_day.isocalendar()
            return labels["period_week"].format(week=week, year=year, first=first, last=last)
        if self.first_day == self.last_day:
            return first
        return labels["period_range"].format(first=first, last=last)


def parse_period(text: str) -> Period:
    """A month ``2026-10``, an ISO week ``2026-W44``, a day ``2026-10-05`` or a range of days
    ``2026-10-01..2026-10-15`` (at most a year); ReportError naming the expected forms."""
    raw = text.strip()
    expected = (
        "expected a month 2026-10, an ISO week 2026-W44, a day 2026-10-05 "
        "or a range of days 2026-10-01..2026-10-15"
    )
    try:
        if match := _MONTH.fullmatch(raw):
            period = Period.month(int(match[1]), int(match[2]))
        elif match := _WEEK.fullmatch(raw):
            monday = date.fromisocalendar(int(match[1]), int(match[2]), 1)
            period = Period("week", monday, monday + timedelta(days=6))
        elif match := _RANGE.fullmatch(raw):
            first = date(int(match[1]), int(match[2]), int(match[3]))
            last = date(int(match[4]), int(match[5]), int(match[6])) if match[4] else first
            period = Period("range", first, last)
        else:
            raise ReportError(f"bad period {_shown(text)}: {expected}")
    except ValueError as exc:  # month 13, day 31 of a short month, week 54
        raise ReportError(f"bad period {_shown(text)}: {exc} ({expected})") from None
    if period.last_day < period.first_day:
        raise ReportError(f"bad period {_shown(text)}: the range ends before it starts")
    if (period.last_day - period.first_day).days + 1 > MAX_PERIOD_DAYS:
        raise ReportError(
            f"bad period {_shown(text)}: a range spans at most {MAX_PERIOD_DAYS} days"
        )
    if period.first_day.year < MIN_YEAR or period.last_day.year > MAX_YEAR:
        raise ReportError(f"bad period {_shown(text)}: years {MIN_YEAR} to {MAX_YEAR} only")
    return period


def check_slug(text: str) -> str:
    if not _SLUG.fullmatch(text):
        raise ReportError(f"bad tenant slug {_shown(text)}: 2-63 lowercase letters, digits and '-'")
    return text


@dataclass(frozen=True)
class TenantInfo:
    tenant_id: int
    slug: str
    name: str
    timezone: str
    locale: str
    status: str
    created_at: datetime


@dataclass(frozen=True)
class DeviceLine:
    """A device's consumption of one unit in the period, its comparison and completeness."""

    device_id: int
    mac: str
    name: str
    meter_kind: str
    status: str
    unit: str
    consumption: float
    readings: int
    days_with_data: int
    hours_with_data: int
    counter_resets: int
    previous_consumption: float | None
    rank: int
    share: float | None
    expected_hours: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "consumption", to_resolution(self.consumption, self.unit))
        if self.previous_consumption is not None:
            previous = to_resolution(self.previous_consumption, self.unit)
            object.__setattr__(self, "previous_consumption", previous)

    @property
    def change(self) -> float | None:
        if self.previous_consumption is None:
            return None
        return to_resolution(self.consumption - self.previous_consumption, self.unit)

    @property
    def change_ratio(self) -> float | None:
        if not self.previous_consumption:
            return None
        return (self.consumption - self.previous_consumption) / self.previous_consumption

    @property
    def completeness(self) -> float | None:
        if self.expected_hours <= 0:
            return None
        return min(self.hours_with_data / self.expected_hours, 1.0)


@dataclass(frozen=True)
class KindSummary:
    """The tenant's total for one meter kind and unit."""

    meter_kind: str
    unit: str
    devices: int
    devices_with_data: int
    consumption: float
    readings: int
    hours_with_data: int
    expected_hours: int
    previous_consumption: float | None

    @property
    def completeness(self) -> float | None:
        if self.expected_hours <= 0:
            return None
        return min(self.hours_with_data / self.expected_hours, 1.0)

    @property
    def change_ratio(self) -> float | None:
        if not self.previous_consumption:
            return None
        return (self.consumption - self.previous_consumption) / self.previous_consumption


@dataclass(frozen=True)
class DeviceDay:
    local_day: date
    device_id: int
    unit: str
    consumption: float
    readings: int
    hours_with_data: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "consumption", to_resolution(self.consumption, self.unit))


@dataclass(frozen=True)
class Alerts:
    """Alerts of the period by group (severity, rule...), or why there are none to show."""

    available: bool
    readable: bool = True
    counts: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class ConsumptionReport:
    tenant: TenantInfo
    period: Period
    generated_at: datetime  # in the tenant's time zone
    data_until: datetime  # end of the period, or the generation time for an open period
    period_hours: int
    devices: tuple[DeviceLine, ...]
    device_days: tuple[DeviceDay, ...]
    dead_letters: tuple[tuple[str, int], ...]
    alerts: Alerts
    summary: tuple[KindSummary, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "summary", summarise(self.devices))

    @property
    def labels(self) -> Labels:
        return labels_for(self.tenant.locale)

    @property
    def has_data(self) -> bool:
        return any(line.readings > 0 for line in self.devices)

    @property
    def open_period(self) -> bool:
        return self.data_until < self.period.bounds(self.tenant.timezone)[1]

    @property
    def units(self) -> list[tuple[str, str]]:
        """(meter kind, unit) pairs in the report's order."""
        return [(s.meter_kind, s.unit) for s in self.summary]

    @property
    def elapsed_days(self) -> list[date]:
        """The period's local days that have begun by ``data_until`` (all, once it closed):
        an open period's later days have no data yet, rather than none consumed."""
        zone = ZoneInfo(self.tenant.timezone)
        return [
            day for day in self.period.days if datetime.combine(day, time(), zone) < self.data_until
        ]

    def devices_by_id(self) -> dict[int, DeviceLine]:
        return {line.device_id: line for line in self.devices}

    def daily_totals(self) -> dict[date, dict[tuple[str, str], float]]:
        """Per elapsed local day of the period, the tenant's consumption per (meter kind, unit),
        to the unit's resolution."""
        kinds = {line.device_id: line.meter_kind for line in self.devices}
        totals: dict[date, dict[tuple[str, str], float]] = {
            day: dict.fromkeys(self.units, 0.0) for day in self.elapsed_days
        }
        for row in self.device_days:
            key = (kinds.get(row.device_id, ""), row.unit)
            if row.local_day in totals and key in totals[row.local_day]:
                totals[row.local_day][key] += row.consumption
        for day_totals in totals.values():
            for key, value in day_totals.items():
                day_totals[key] = to_resolution(value, key[1])
        return totals


def kind_order(meter_kind: str) -> int:
    return METER_KINDS.index(meter_kind) if meter_kind in METER_KINDS else len(METER_KINDS)


def summarise(lines: Sequence[DeviceLine]) -> tuple[KindSummary, ...]:
    ordered = sorted(lines, key=lambda line: (kind_order(line.meter_kind), line.unit))
    summaries = []
    for (kind, unit), group in groupby(ordered, key=lambda line: (line.meter_kind, line.unit)):
        members = list(group)
        previous = [m.previous_consumption for m in members if m.previous_consumption is not None]
        summaries.append(
            KindSummary(
                meter_kind=kind,
                unit=unit,
                devices=len(members),
                devices_with_data=sum(m.readings > 0 for m in members),
                consumption=to_resolution(sum(m.consumption for m in members), unit),
                readings=sum(m.readings for m in members),
                hours_with_data=sum(m.hours_with_data for m in members),
                expected_hours=sum(m.expected_hours for m in members),
                previous_consumption=to_resolution(sum(previous), unit) if previous else None,
            )
        )
    return tuple(summaries)


def load_tenant(conn: psycopg.Connection, slug: str) -> TenantInfo:
    check_slug(slug)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(queries()["tenant"], {"slug": slug}).fetchone()
    if row is None:
        raise ReportError(f"unknown tenant {slug!r}: `iiot tenants list` shows the tenants")
    return TenantInfo(**row)


def require_marts(conn: psycopg.Connection) -> None:
    missing = [name for (name,) in conn.execute(queries()["marts_missing"])]
    if missing:
        raise ReportError(
            f"the marts are not built yet ({', '.join(missing)} missing): run marts_job "
            "(docs/marts.md), then make the report"
        )


def hours_between(start: datetime, end: datetime) -> int:
    return max(int((end - start).total_seconds() // 3600), 0)


def load_alerts(conn: psycopg.Connection, tenant_id: int, start: datetime, end: datetime) -> Alerts:
    """The period's alerts when an ``alerts`` table exists (a later issue adds it)."""
    columns = {name for (name,) in conn.execute(queries()["alert_columns"])}
    if not columns:
        return Alerts(available=False)
    when = next((c for c in ALERT_TIME_COLUMNS if c in columns), None)
    if "tenant_id" not in columns or when is None:
        return Alerts(available=True, readable=False)
    group = next((c for c in ALERT_GROUP_COLUMNS if c in columns), None)
    statement = sql.SQL(
        "SELECT {group}, count(*) FROM alerts WHERE tenant_id = %s AND {when} >= %s"
        " AND {when} < %s GROUP BY 1 ORDER BY 2 DESC, 1"
    ).format(
        group=sql.SQL("{}::text").format(sql.Identifier(group)) if group else sql.Literal("total"),
        when=sql.Identifier(when),
    )
    rows = conn.execute(statement, (tenant_id, start, end)).fetchall()
    return Alerts(available=True, counts=tuple((str(g), int(n)) for g, n in rows))


def load_report(
    conn: psycopg.Connection,
    slug: str,
    period: Period,
    *,
    now: datetime | None = None,
) -> ConsumptionReport:
    """Read one tenant's report for one period (ReportError if the marts are not built)."""
    tenant = load_tenant(conn, slug)
    require_marts(conn)
    zone = ZoneInfo(tenant.timezone)
    generated = (now or datetime.now(UTC)).astimezone(zone)
    start, end = period.bounds(tenant.timezone)
    data_until = min(end, max(start, generated.astimezone(UTC)))
    period_hours = hours_between(start, data_until)
    previous = period.previous()
    params: dict[str, Any] = {
        "tenant_id": tenant.tenant_id,
        "first_day": period.first_day,
        "last_day": period.last_day,
        "previous_first_day": previous.first_day,
        "previous_last_day": previous.last_day,
        "period_start": start,
        "period_end": end,
    }
    with conn.cursor(row_factory=dict_row) as cur:
        lines = [
            DeviceLine(**row, expected_hours=period_hours)
            for row in cur.execute(queries()["device_lines"], params)
        ]
        device_days = tuple(
            DeviceDay(**row) for row in cur.execute(queries()["device_days"], params)
        )
    devices = tuple(
        sorted(lines, key=lambda d: (kind_order(d.meter_kind), d.unit, d.rank, d.name, d.mac))
    )
    dead = tuple(
        (reason, int(count)) for reason, count in conn.execute(queries()["dead_letters"], params)
    )
    return ConsumptionReport(
        tenant=tenant,
        period=period,
        generated_at=generated,
        data_until=data_until.astimezone(zone),
        period_hours=period_hours,
        devices=devices,
        device_days=device_days,
        dead_letters=dead,
        alerts=load_alerts(conn, tenant.tenant_id, start, end),
    )
