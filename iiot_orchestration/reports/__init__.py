"""Consumption reports per tenant and period, as PDF and Excel files (docs/reports.md).

``make_reports`` reads a report from the marts once and writes the asked formats to
``<reports root>/<tenant>/<period>/consumption.<ext>``, each through a temporary name renamed
into place. The Dagster asset ``consumption_report`` (monthly) and ``iiot report`` (any month,
week or range of days) both call it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg

from iiot_orchestration.reports.data import (
    ConsumptionReport,
    Period,
    ReportError,
    load_report,
    parse_period,
)
from iiot_orchestration.reports.files import FORMATS, report_path, staged_file
from iiot_orchestration.reports.pdf import estimated_pages, render_pdf
from iiot_orchestration.reports.xlsx import build_sheets, count_rows, render_xlsx

__all__ = [
    "FORMATS",
    "ConsumptionReport",
    "Period",
    "ReportError",
    "ReportFile",
    "load_report",
    "make_reports",
    "parse_period",
    "work_units",
    "write_report",
]

# (format, units done, units in all) for a progress bar: pages of a PDF, rows of a workbook
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ReportFile:
    format: str
    path: Path | str  # a URL under a remote reports root
    size: int
    pages: int | None = None  # PDF
    rows: int | None = None  # XLSX data rows


def work_units(report: ConsumptionReport, fmt: str) -> int:
    """How much work a format is, in the units its progress reports (for sizing a bar)."""
    return estimated_pages(report) if fmt == "pdf" else count_rows(build_sheets(report))


def write_report(
    report: ConsumptionReport,
    root: Path | str,
    formats: Sequence[str] = FORMATS,
    progress: Progress | None = None,
) -> list[ReportFile]:
    written = []
    for fmt in dict.fromkeys(formats):
        path = report_path(root, report.tenant.slug, report.period.label, fmt)

        def step(done: int, total: int, fmt: str = fmt) -> None:
            if progress is not None:
                progress(fmt, done, total)

        try:
            with staged_file(path) as temporary:
                if fmt == "pdf":
                    pdf = render_pdf(report, temporary, step)
                    found = ReportFile("pdf", path, pdf.size, pages=pdf.pages)
                else:
                    xlsx = render_xlsx(report, temporary, step)
                    found = ReportFile("xlsx", path, xlsx.size, rows=xlsx.rows)
        except OSError as exc:  # a reports root that is a file, read-only, full...
            reason = exc.strerror or type(exc).__name__
            raise ReportError(f"cannot write {path}: {reason} (IIOT_REPORTS_ROOT={root})") from exc
        written.append(found)
    return written


def make_reports(
    conn: psycopg.Connection,
    slug: str,
    period: Period,
    root: Path | str,
    formats: Sequence[str] = FORMATS,
    *,
    now: datetime | None = None,
    progress: Progress | None = None,
) -> tuple[ConsumptionReport, list[ReportFile]]:
    """Read one tenant's report for one period and write it in every asked format."""
    report = load_report(conn, slug, period, now=now)
    return report, write_report(report, root, formats, progress)
