"""Reading written reports back and reconciling their totals with the marts.

The XLSX is read with openpyxl (typed cells: exact totals per meter kind and per device, to the
meters' resolution, as the report rounds them); the PDF's text is extracted with pypdf and the
summary table's printed totals (three decimals, in the tenant's number format) are parsed. The
marts are read by their own queries here, not by the report's: a month from
``consumption_monthly``, a week or range of days from ``consumption_daily``.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from openpyxl import load_workbook

from iiot_orchestration.filestore import StoreError
from iiot_orchestration.reports.data import METER_KINDS, ConsumptionReport, queries
from iiot_orchestration.reports.files import local_report
from iiot_orchestration.reports.labels import Labels, parse_number
from iiot_orchestration.reports.units import to_resolution

XLSX_TOLERANCE = 1e-6
PDF_TOLERANCE = 0.0005 + 1e-9  # printed with three decimals
PDF_SUMMARY_PAGES = 2
_NUMBER = r"-?[0-9][0-9.,]*"


class UnreadableReport(Exception):
    """A report file could not be read back (corrupt, or not the layout this code writes)."""


@dataclass
class Totals:
    """Consumption per (meter kind, unit), and per (MAC, unit) where the source has it."""

    by_kind: dict[tuple[str, str], float] = field(default_factory=dict)
    devices: dict[tuple[str, str], int] = field(default_factory=dict)
    by_device: dict[tuple[str, str], float] | None = None


def mart_totals(conn: psycopg.Connection, report: ConsumptionReport) -> Totals:
    period = report.period
    name = "mart_month_totals" if period.kind == "month" else "mart_day_totals"
    params = {
        "tenant_id": report.tenant.tenant_id,
        "first_day": period.first_day,
        "last_day": period.last_day,
    }
    totals = Totals(by_kind=defaultdict(float), by_device={})
    for _, mac, kind, unit, consumption in conn.execute(queries()[name], params):
        # the files show each device to its meter's resolution, and totals as the sum of those
        totals.by_kind[(kind, unit)] += to_resolution(consumption, unit)
        totals.by_device[(mac, unit)] = to_resolution(consumption, unit)
    totals.by_kind = {key: to_resolution(value, key[1]) for key, value in totals.by_kind.items()}
    return totals


def _kinds_by_label(labels: Labels) -> dict[str, str]:
    return {labels.kind(kind): kind for kind in METER_KINDS}


def read_xlsx(path: Path, labels: Labels) -> Totals:
    """Totals of the Summary sheet and the per-device consumption of the Devices sheet."""
    try:
        wb = load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # zipfile, XML and openpyxl errors alike: the file is unusable
        raise UnreadableReport(f"{path.name} is not a readable workbook: {exc}") from exc
    try:
        kinds = _kinds_by_label(labels)
        totals = Totals(by_device={})
        summary = wb[labels["sheet_summary"]]
        in_table = False
        for row in summary.iter_rows(values_only=True):
            if not in_table:
                in_table = row[:2] == (labels["kind"], labels["unit"])
                continue
            if not row or row[0] is None:
                break
            key = (kinds.get(row[0], row[0]), row[1])
            totals.by_kind[key] = float(row[4])
            totals.devices[key] = int(row[2])
        if not in_table:
            raise UnreadableReport(f"{path.name}: no summary table on the summary sheet")
        devices = wb[labels["sheet_devices"]].iter_rows(values_only=True)
        header = list(next(devices))
        mac, unit, consumption = (
            header.index(labels["mac"]),
            header.index(labels["unit"]),
            header.index(labels["consumption"]),
        )
        for row in devices:  # a read-only sheet leaves out a row's trailing empty cells
            row = row + (None,) * (len(header) - len(row))
            key = (row[mac], row[unit])
            totals.by_device[key] = totals.by_device.get(key, 0.0) + float(row[consumption])
        return totals
    except (KeyError, ValueError, TypeError, StopIteration, IndexError) as exc:
        raise UnreadableReport(f"{path.name}: unexpected layout ({exc!r})") from exc
    finally:
        wb.close()


def pdf_text(path: Path, pages: int | None = None) -> str:
    """The text of the first ``pages`` pages (all when None), through pypdf."""
    try:
        from pypdf import PdfReader
        from pypdf.errors import PyPdfError
    except ImportError as exc:  # a dependency of the project; say so if an install lacks it
        raise UnreadableReport(
            "pypdf is not installed, so the PDF cannot be read back: pip install pypdf"
        ) from exc
    try:
        reader = PdfReader(path)
        chosen = reader.pages if pages is None else reader.pages[:pages]
        return "\n".join(page.extract_text() or "" for page in chosen)
    except (PyPdfError, OSError, ValueError) as exc:
        raise UnreadableReport(f"{path.name} is not a readable PDF: {exc}") from exc


def read_pdf(path: Path, labels: Labels, units: list[tuple[str, str]]) -> Totals:
    """The summary table's totals, as printed on the first pages."""
    text = pdf_text(path, PDF_SUMMARY_PAGES)
    totals = Totals()
    for kind, unit in units:
        pattern = (
            rf"^{re.escape(labels.kind(kind))}\s+{re.escape(unit)}\s+([0-9]+)\s+([0-9]+)"
            rf"\s+({_NUMBER})"
        )
        match = re.search(pattern, text, re.MULTILINE)
        if match is None:
            raise UnreadableReport(f"{path.name}: no summary line for {kind} ({unit})")
        totals.by_kind[(kind, unit)] = parse_number(match[3], labels)
        totals.devices[(kind, unit)] = int(match[1])
    return totals


def compare(expected: Totals, found: Totals, tolerance: float, what: str) -> list[str]:
    """Differences between the marts and a file, one line each (empty: they agree)."""
    problems = []
    for key in sorted(set(expected.by_kind) | set(found.by_kind)):
        want, got = expected.by_kind.get(key, 0.0), found.by_kind.get(key)
        if got is None:
            problems.append(f"{what}: no total for {key[0]} ({key[1]}); the marts have {want}")
        elif not math.isclose(want, got, rel_tol=1e-9, abs_tol=tolerance):
            problems.append(f"{what}: {key[0]} ({key[1]}) is {got}, the marts have {want}")
    if expected.by_device is not None and found.by_device is not None:
        for key in sorted(set(expected.by_device) | set(found.by_device)):
            want, got = expected.by_device.get(key, 0.0), found.by_device.get(key)
            if got is None:
                problems.append(f"{what}: device {key[0]} ({key[1]}) is missing")
            elif not math.isclose(want, got, rel_tol=1e-9, abs_tol=tolerance):
                problems.append(f"{what}: device {key[0]} ({key[1]}) is {got}, the marts {want}")
    return problems


def verify_files(
    conn: psycopg.Connection, report: ConsumptionReport, files: dict[str, Path | str]
) -> dict[str, list[str]]:
    """Per written format, how its totals differ from the marts (empty lists: all agree)."""
    expected = mart_totals(conn, report)
    labels = report.labels
    problems: dict[str, list[str]] = {}
    for fmt, location in files.items():
        try:
            with local_report(location) as path:
                if fmt == "xlsx":
                    found = read_xlsx(path, labels)
                    problems[fmt] = compare(expected, found, XLSX_TOLERANCE, path.name)
                    if sum(found.devices.values()) != len(report.devices):
                        problems[fmt].append(f"{path.name}: device counts do not add up")
                else:
                    found = read_pdf(path, labels, report.units)
                    by_kind = Totals(by_kind=expected.by_kind)
                    problems[fmt] = compare(by_kind, found, PDF_TOLERANCE, path.name)
        except (UnreadableReport, StoreError) as exc:
            problems[fmt] = [str(exc)]
    return problems
