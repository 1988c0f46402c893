"""Which closed months each active tenant must have a report for, and which ones are missing."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg

from iiot_orchestration.partitions import PARTITIONS_START
from iiot_orchestration.reports.data import Period, queries
from iiot_orchestration.reports.files import FORMATS, report_exists

# A month closes at local midnight; the marts build of 00:45 UTC after it, and the report run
# after that, are done well within this.
DUE_AFTER = timedelta(hours=30)


@dataclass(frozen=True)
class MissingReport:
    tenant: str
    month: str  # 2026-10
    formats: tuple[str, ...]


def closed_months(created_at: datetime, timezone: str, until: datetime) -> list[Period]:
    """Months from the tenant's first (in its time zone, not before the partitions start)
    whose local end is at or before ``until``."""
    local_created = created_at.astimezone(ZoneInfo(timezone)).date()
    first = max(date.fromisoformat(PARTITIONS_START), local_created).replace(day=1)
    months = []
    month = Period.month(first.year, first.month)
    while month.bounds(timezone)[1] <= until:
        months.append(month)
        after = month.last_day + timedelta(days=1)
        month = Period.month(after.year, after.month)
    return months


def missing_reports(
    conn: psycopg.Connection, root: Path | str, now: datetime
) -> tuple[int, list[MissingReport]]:
    """(reports expected, the missing ones): every active tenant, every month closed more than
    DUE_AFTER ago, a PDF and an XLSX under the reports root."""
    expected = 0
    missing = []
    for slug, timezone, created_at in conn.execute(queries()["active_tenants"]):
        for month in closed_months(created_at, timezone, now - DUE_AFTER):
            expected += 1
            absent = tuple(
                fmt for fmt in FORMATS if not report_exists(root, slug, month.label, fmt)
            )
            if absent:
                missing.append(MissingReport(slug, month.label, absent))
    return expected, missing
