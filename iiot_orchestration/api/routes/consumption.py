"""Consumption per device, local day and local month, and the device comparison, from the dbt
marts (docs/marts.md) through their tenant views: ``tenant.consumption_daily``,
``tenant.consumption_monthly`` and ``tenant.device_comparison`` keep the request's tenant's rows
only. The views exist once the marts have been built; until then these routes answer 409
(``marts_not_built``): a state of the installation, not a failure of the server."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import Query
from psycopg import sql
from pydantic import BaseModel, Field

from iiot_orchestration.api.context import Session, Viewer
from iiot_orchestration.api.errors import ApiError, keyed_router
from iiot_orchestration.api.pagination import Cursor, Limit, Page, decode, page
from iiot_orchestration.api.params import IsoDate
from iiot_orchestration.reports.units import to_resolution

router = keyed_router("consumption")

MONTH_PATTERN = r"^[1-9][0-9]{3}-(0[1-9]|1[0-2])$"
Month = Annotated[str | None, Query(pattern=MONTH_PATTERN, description="A local month, YYYY-MM.")]
DeviceId = Annotated[int | None, Query(ge=1, le=2**31 - 1, description="Only this device.")]
Unit = Annotated[str | None, Query(pattern=r"^(kWh|m3)$", description="Only this unit.")]


class DailyConsumption(BaseModel):
    local_day: date = Field(description="Calendar day in the tenant's time zone.")
    device_id: int
    unit: str = Field(description="kWh or m3")
    consumption: float = Field(description="To the meters' resolution (0.001).")
    readings: int
    hours_with_data: int
    counter_resets: int


class MonthlyConsumption(BaseModel):
    local_month: str = Field(description="YYYY-MM in the tenant's time zone.")
    device_id: int
    unit: str
    consumption: float
    readings: int
    days_with_data: int
    hours_with_data: int
    counter_resets: int


class DeviceComparison(BaseModel):
    local_month: str
    unit: str
    device_id: int
    consumption: float
    rank_in_tenant: int = Field(description="1 = the largest of the tenant's devices of the unit.")
    devices_in_tenant: int
    tenant_consumption: float
    share_of_tenant: float | None = Field(description="None when the tenant's total is 0.")
    previous_month_consumption: float | None
    change_vs_previous_month: float | None
    change_ratio_vs_previous_month: float | None


def require_mart(s: Session, view: str) -> None:
    """A 409 that says why when the mart's tenant view does not exist yet."""
    s.tenant()
    if s.row("SELECT to_regclass(%s) AS found", (f"tenant.{view}",))["found"] is None:
        raise ApiError(
            409,
            f"consumption is not available yet: the marts ({view}) have not been built; they "
            "are built nightly by marts_job (docs/marts.md)",
            code="marts_not_built",
        )


def _month(text: str | None) -> date | None:
    return None if text is None else date.fromisoformat(f"{text}-01")


def after_key(cursor: str | None, *shape: type) -> list | None:
    """``decode`` for keys that hold dates (carried as ISO strings): the sort key of the last
    item, dates parsed; a damaged cursor is a 400, never a database error."""
    value = decode(cursor, *(str if kind is date else kind for kind in shape))
    if value is None:
        return None
    parts = value if len(shape) > 1 else [value]
    try:
        parsed = [
            date.fromisoformat(part) if kind is date else part
            for part, kind in zip(parts, shape, strict=True)
        ]
    except ValueError:
        parsed = None
    if parsed is None or any(isinstance(part, str) and "\x00" in part for part in parsed):
        raise ApiError(
            400,
            "invalid cursor: pass next_cursor of the previous page unchanged",
            code="bad_cursor",
        )
    return parsed


def _ratio(value: float | None) -> float | None:
    return None if value is None else round(value, 6) + 0.0


def _resolved(value: float | None, unit: str) -> float | None:
    return None if value is None else to_resolution(value, unit)


def _per_device(
    s: Session,
    view: str,
    period: str,
    counts: tuple[str, ...],
    limit: int,
    cursor: str | None,
    filters: dict[str, Any],
) -> list[dict[str, Any]]:
    """A page of a per-device mart ``tenant.<view>`` by its ``period`` column (as ``period``),
    device and unit, with its ``counts`` columns; consumption to the meters' resolution."""
    require_mart(s, view)
    after = after_key(cursor, date, int, str)
    rows = s.rows(
        sql.SQL(
            "SELECT {period} AS period, device_id, unit, consumption, {counts}"
            "  FROM tenant.{view}"
            " WHERE (%(device)s::integer IS NULL OR device_id = %(device)s)"
            "   AND (%(unit)s::text IS NULL OR unit = %(unit)s)"
            "   AND (%(first)s::date IS NULL OR {period} >= %(first)s)"
            "   AND (%(last)s::date IS NULL OR {period} <= %(last)s)"
            "   AND (%(after)s::date IS NULL OR ({period}, device_id, unit)"
            "        > (%(after)s, %(after_device)s, %(after_unit)s))"
            " ORDER BY {period}, device_id, unit LIMIT %(limit)s"
        ).format(
            period=sql.Identifier(period),
            view=sql.Identifier(view),
            counts=sql.SQL(", ").join(
                sql.SQL("{0}::bigint AS {0}").format(sql.Identifier(c)) for c in counts
            ),
        ),
        {
            **filters,
            "after": after[0] if after else None,
            "after_device": after[1] if after else None,
            "after_unit": after[2] if after else None,
            "limit": limit + 1,
        },
    )
    for row in rows:
        row["consumption"] = to_resolution(row["consumption"], row["unit"])
    return rows


@router.get(
    "/consumption/daily",
    response_model=Page[DailyConsumption],
    summary="Consumption per device and local day",
)
def daily(
    s: Viewer,
    limit: Limit = 100,
    cursor: Cursor = None,
    device_id: DeviceId = None,
    unit: Unit = None,
    from_: Annotated[IsoDate | None, Query(alias="from", description="First local day.")] = None,
    to: Annotated[IsoDate | None, Query(description="Last local day (inclusive).")] = None,
) -> dict:
    filters = {"device": device_id, "unit": unit, "first": from_, "last": to}
    counts = ("readings", "hours_with_data", "counter_resets")
    rows = _per_device(s, "consumption_daily", "local_day", counts, limit, cursor, filters)
    for row in rows:
        row["local_day"] = row["period"]
    return page(rows, limit, ("period", "device_id", "unit"))


@router.get(
    "/consumption/monthly",
    response_model=Page[MonthlyConsumption],
    summary="Consumption per device and local month",
)
def monthly(
    s: Viewer,
    limit: Limit = 100,
    cursor: Cursor = None,
    device_id: DeviceId = None,
    unit: Unit = None,
    from_: Annotated[
        str | None, Query(alias="from", pattern=MONTH_PATTERN, description="First month.")
    ] = None,
    to: Annotated[
        str | None, Query(pattern=MONTH_PATTERN, description="Last month (inclusive).")
    ] = None,
) -> dict:
    filters = {"device": device_id, "unit": unit, "first": _month(from_), "last": _month(to)}
    counts = ("readings", "days_with_data", "hours_with_data", "counter_resets")
    rows = _per_device(s, "consumption_monthly", "local_month", counts, limit, cursor, filters)
    for row in rows:
        row["local_month"] = f"{row['period']:%Y-%m}"
    return page(rows, limit, ("period", "device_id", "unit"))


@router.get(
    "/consumption/comparison",
    response_model=Page[DeviceComparison],
    summary="Each device's month against the tenant's other devices of its unit",
)
def comparison(
    s: Viewer,
    limit: Limit = 100,
    cursor: Cursor = None,
    month: Month = None,
    device_id: DeviceId = None,
    unit: Unit = None,
) -> dict:
    require_mart(s, "device_comparison")
    after = after_key(cursor, date, str, int, int)
    rows = s.rows(
        "SELECT local_month AS period, unit, device_id, consumption, rank_in_tenant::bigint,"
        "       devices_in_tenant::bigint, tenant_consumption, share_of_tenant,"
        "       previous_month_consumption, change_vs_previous_month,"
        "       change_ratio_vs_previous_month"
        "  FROM tenant.device_comparison"
        " WHERE (%(month)s::date IS NULL OR local_month = %(month)s)"
        "   AND (%(device)s::integer IS NULL OR device_id = %(device)s)"
        "   AND (%(unit)s::text IS NULL OR unit = %(unit)s)"
        "   AND (%(after)s::date IS NULL OR (local_month, unit, rank_in_tenant, device_id)"
        "        > (%(after)s, %(after_unit)s, %(after_rank)s, %(after_device)s))"
        " ORDER BY local_month, unit, rank_in_tenant, device_id LIMIT %(limit)s",
        {
            "month": _month(month),
            "device": device_id,
            "unit": unit,
            "after": after[0] if after else None,
            "after_unit": after[1] if after else None,
            "after_rank": after[2] if after else None,
            "after_device": after[3] if after else None,
            "limit": limit + 1,
        },
    )
    for row in rows:
        unit_of = row["unit"]
        for name in (
            "consumption",
            "tenant_consumption",
            "previous_month_consumption",
            "change_vs_previous_month",
        ):
            row[name] = _resolved(row[name], unit_of)
        row["share_of_tenant"] = _ratio(row["share_of_tenant"])
        row["change_ratio_vs_previous_month"] = _ratio(row["change_ratio_vs_previous_month"])
        row["local_month"] = f"{row['period']:%Y-%m}"
    return page(rows, limit, ("period", "unit", "rank_in_tenant", "device_id"))
