"""The report as an Excel workbook (openpyxl): sheets Summary, Devices, Daily, Comparison and
Device days, with typed numeric cells whose number formats carry the unit, frozen header rows,
auto-filters, column widths and a native line chart on the Daily sheet.

The workbook is always streamed (openpyxl's write-only mode): memory stays flat however many
devices and days a report has, and small reports lose nothing by it. Each styled cell of a
column is one reused ``WriteOnlyCell``: a row is serialised as soon as it is appended, so the
next row can set new values on the same cells, which keeps styling nearly free.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openpyxl import Workbook
from openpyxl.cell import WriteOnlyCell
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.chart import LineChart, Reference
from openpyxl.styles import Alignment, Font, PatternFill
from openpyxl.utils import get_column_letter
from openpyxl.worksheet._write_only import WriteOnlyWorksheet

from iiot_orchestration.reports.data import ConsumptionReport
from iiot_orchestration.reports.labels import Labels
from iiot_orchestration.reports.units import axis_scale, decimals

Progress = Callable[[int, int], None]
PROGRESS_EVERY = 2_000
HEADER_FILL = PatternFill("solid", fgColor="1F4E79")
HEADER_FONT = Font(bold=True, color="FFFFFF")
TITLE_FONT = Font(bold=True, size=14, color="1F4E79")
BOLD = Font(bold=True)
FORMATS = {
    "int": "#,##0",
    "percent": "0.0%",
    "change": "+0.0%;-0.0%;0.0%",
}


@dataclass(frozen=True)
class Column:
    header: str
    kind: str  # text, int, number, percent, change, date
    width: float
    unit: str | None = None  # a fixed unit of a number column
    unit_column: int | None = None  # or the column holding each row's unit

    @property
    def fitted_width(self) -> float:
        """The width, widened so that the header wraps between words, never inside one."""
        longest = max((len(word) for word in self.header.split()), default=0)
        return max(self.width, longest + 2)


@dataclass
class Block:
    """A table: header row, then rows of plain values (the writer adds types and formats)."""

    columns: list[Column]
    rows: list[Sequence[Any]]
    title: str | None = None


@dataclass
class Sheet:
    title: str
    blocks: list[Block]
    preamble: list[Sequence[Any]] = field(default_factory=list)
    chart_units: list[str] = field(default_factory=list)  # Daily: one line chart per unit

    @property
    def header_row(self) -> int:
        """1-based row of the first block's header (the frozen, filtered one)."""
        first = self.blocks[0]
        return len(self.preamble) + (2 if first.title else 1)


@dataclass(frozen=True)
class XlsxResult:
    rows: int
    size: int


def safe_text(value: str) -> str:
    """Text without the control characters that XML (and so XLSX) cannot hold."""
    return ILLEGAL_CHARACTERS_RE.sub("", value)


def _unit_format(unit: str | None) -> str:
    """``#,##0.000 "kWh"``: the unit's resolution, and the unit."""
    places = decimals(unit or "")
    base = "#,##0" + ("." + "0" * places if places else "")
    cleaned = re.sub(r"[^A-Za-z0-9/%. ]", "", unit or "")
    return f'{base} "{cleaned}"' if cleaned else base


def build_sheets(report: ConsumptionReport) -> list[Sheet]:
    """The workbook's content as plain values; render_xlsx adds the formats, and the benchmark
    writes the same values with bare openpyxl."""
    labels = report.labels
    period = report.period
    previous = labels[f"previous_{period.kind}"] if period.kind != "range" else labels["previous"]
    kind = labels.kind
    summary_columns = [
        Column(labels["kind"], "text", 16),
        Column(labels["unit"], "text", 8),
        Column(labels["devices"], "int", 12),
        Column(labels["devices_with_data"], "int", 11),
        Column(labels["consumption"], "number", 20, unit_column=1),
        Column(labels["readings"], "int", 13),
        Column(labels["hours"], "int", 15),
        Column(labels["expected_hours"], "int", 15),
        Column(labels["completeness"], "percent", 13),
        Column(previous, "number", 20, unit_column=1),
        Column(labels["change"], "change", 11),
    ]
    summary_rows = [
        [
            kind(s.meter_kind),
            s.unit,
            s.devices,
            s.devices_with_data,
            s.consumption,
            s.readings,
            s.hours_with_data,
            s.expected_hours,
            s.completeness,
            s.previous_consumption,
            s.change_ratio,
        ]
        for s in report.summary
    ]
    preamble: list[Sequence[Any]] = [
        [f"{labels['title']}: {report.tenant.name}"],
        [labels["tenant"], f"{report.tenant.name} ({report.tenant.slug})"],
        [labels["period"], period.describe(labels)],
        [labels["timezone"], report.tenant.timezone],
        [labels["generated"], labels.timestamp(report.generated_at)],
    ]
    if report.open_period:
        until = labels.timestamp(report.data_until)
        preamble.append([labels["open_period"].format(until=until)])
    if not report.has_data:
        preamble.append([labels["no_data"]])
    preamble.append([])
    dead_rows = [[reason, count] for reason, count in report.dead_letters]
    if dead_rows:
        dead_rows.append([labels["total"], sum(count for _, count in report.dead_letters)])
    else:
        dead_rows.append([labels["dead_letters_none"]])
    if not report.alerts.available:
        alert_rows: list[Sequence[Any]] = [[labels["alerts_none"]]]
    elif not report.alerts.readable:
        alert_rows = [[labels["alerts_unknown"]]]
    else:
        alert_rows = [[group, count] for group, count in report.alerts.counts]
        alert_rows.append([labels["total"], sum(n for _, n in report.alerts.counts)])
    summary = Sheet(
        labels["sheet_summary"],
        [
            Block(summary_columns, summary_rows, title=labels["summary"]),
            Block(
                [Column(labels["reason"], "text", 16), Column(labels["count"], "int", 8)],
                dead_rows,
                title=labels["dead_letters"],
            ),
            Block(
                [Column(labels["alerts"], "text", 16), Column(labels["count"], "int", 8)],
                alert_rows,
                title=labels["alerts_count"],
            ),
        ],
        preamble=preamble,
    )

    devices = Sheet(
        labels["sheet_devices"],
        [
            Block(
                [
                    Column(labels["rank"], "int", 8),
                    Column(labels["device"], "text", 30),
                    Column(labels["mac"], "text", 19),
                    Column(labels["kind"], "text", 14),
                    Column(labels["unit"], "text", 8),
                    Column(labels["status"], "text", 12),
                    Column(labels["consumption"], "number", 20, unit_column=4),
                    Column(labels["readings"], "int", 12),
                    Column(labels["days_with_data"], "int", 14),
                    Column(labels["hours"], "int", 15),
                    Column(labels["expected_hours"], "int", 15),
                    Column(labels["completeness"], "percent", 13),
                    Column(labels["counter_resets"], "int", 14),
                ],
                [
                    [
                        d.rank,
                        d.name,
                        d.mac,
                        kind(d.meter_kind),
                        d.unit,
                        labels.status(d.status),
                        d.consumption,
                        d.readings,
                        d.days_with_data,
                        d.hours_with_data,
                        d.expected_hours,
                        d.completeness,
                        d.counter_resets,
                    ]
                    for d in report.devices
                ],
            )
        ],
    )

    totals = report.daily_totals()
    keys = report.units
    daily = Sheet(
        labels["sheet_daily"],
        [
            Block(
                [Column(labels["day"], "date", 13)]
                + [Column(f"{kind(k)} ({unit})", "number", 18, unit=unit) for k, unit in keys],
                [[day, *(values[key] for key in keys)] for day, values in totals.items()],
            )
        ],
        chart_units=list(dict.fromkeys(unit for _, unit in keys)) if report.has_data else [],
    )

    comparison = Sheet(
        labels["sheet_comparison"],
        [
            Block(
                [
                    Column(labels["kind"], "text", 14),
                    Column(labels["unit"], "text", 8),
                    Column(labels["rank"], "int", 8),
                    Column(labels["device"], "text", 30),
                    Column(labels["mac"], "text", 19),
                    Column(labels["consumption"], "number", 20, unit_column=1),
                    Column(labels["share"], "percent", 13),
                    Column(previous, "number", 20, unit_column=1),
                    Column(labels["change"], "number", 18, unit_column=1),
                    Column(f"{labels['change']} %", "change", 11),
                ],
                [
                    [
                        kind(d.meter_kind),
                        d.unit,
                        d.rank,
                        d.name,
                        d.mac,
                        d.consumption,
                        d.share,
                        d.previous_consumption,
                        d.change,
                        d.change_ratio,
                    ]
                    for d in report.devices
                ],
            )
        ],
    )

    by_id = report.devices_by_id()
    device_days = Sheet(
        labels["sheet_device_days"],
        [
            Block(
                [
                    Column(labels["day"], "date", 13),
                    Column(labels["device"], "text", 30),
                    Column(labels["mac"], "text", 19),
                    Column(labels["kind"], "text", 14),
                    Column(labels["unit"], "text", 8),
                    Column(labels["consumption"], "number", 20, unit_column=4),
                    Column(labels["readings"], "int", 12),
                    Column(labels["hours"], "int", 15),
                ],
                [
                    [
                        row.local_day,
                        by_id[row.device_id].name,
                        by_id[row.device_id].mac,
                        kind(by_id[row.device_id].meter_kind),
                        row.unit,
                        row.consumption,
                        row.readings,
                        row.hours_with_data,
                    ]
                    for row in report.device_days
                    if row.device_id in by_id
                ],
            )
        ],
    )
    return [summary, devices, daily, comparison, device_days]


def count_rows(sheets: Iterable[Sheet]) -> int:
    """Data rows of every table (headers, titles and the preamble not counted)."""
    return sum(len(block.rows) for sheet in sheets for block in sheet.blocks)


class _PreparedRow(list):
    """A row of WriteOnlyCells, one per value, bound and styled already (see _fast_rows)."""


def _fast_rows(ws: WriteOnlyWorksheet) -> None:
    """Let ``ws.append`` take a _PreparedRow as it is. openpyxl hands each value of a row to a
    fresh cell, and a value that is a cell itself reaches it through a caught ValueError whose
    message formats the cell: that costs more than writing the cell. Rows of any other type
    still go through openpyxl's own conversion; without the hook (another openpyxl version),
    every row does, and only speed differs."""
    convert = getattr(ws, "_values_to_row", None)
    if convert is None:  # pragma: no cover - openpyxl 3.1 has it
        return

    def values_to_row(values: Sequence[Any], row_idx: int) -> Iterator[Any]:
        if not isinstance(values, _PreparedRow):
            yield from convert(values, row_idx)
            return
        for col_idx, cell in enumerate(values, 1):
            if cell is not None:
                cell.column, cell.row = col_idx, row_idx
                yield cell

    ws._values_to_row = values_to_row


class _CellCache:
    """One styled WriteOnlyCell per (column, format), reused for every row of a sheet: a row is
    written as soon as it is appended, so the next row may set new values on the same cells."""

    def __init__(self, ws: WriteOnlyWorksheet, labels: Labels) -> None:
        self.ws = ws
        self.labels = labels
        self.cells: dict[tuple[int, str], WriteOnlyCell] = {}

    def get(self, index: int, number_format: str) -> WriteOnlyCell:
        key = (index, number_format)
        cell = self.cells.get(key)
        if cell is None:
            cell = self.cells[key] = WriteOnlyCell(self.ws)
            cell.number_format = number_format
        return cell

    def writer(self, columns: Sequence[Column]) -> Callable[[Sequence[Any]], _PreparedRow]:
        """A function that turns a row of plain values of these columns into styled cells."""
        plan: list[tuple[int, str, Any]] = []
        for index, column in enumerate(columns):
            if column.kind == "text":
                plan.append((index, "text", self.get(index, "General")))
            elif column.kind == "number" and column.unit_column is not None:
                plan.append((index, "unit", column.unit_column))
            elif column.kind == "number":
                plan.append((index, "cell", self.get(index, _unit_format(column.unit))))
            elif column.kind == "date":
                plan.append((index, "cell", self.get(index, self.labels.excel_date_format)))
            else:
                plan.append((index, "cell", self.get(index, FORMATS[column.kind])))

        def row(values: Sequence[Any]) -> _PreparedRow:
            out = _PreparedRow()
            for index, how, target in plan:
                value = values[index] if index < len(values) else None
                if value is None:
                    out.append(None)
                    continue
                if how == "text" or isinstance(value, str):
                    target = target if how == "text" else self.get(index, "General")
                    target.value = safe_text(str(value))
                    target.data_type = "s"  # never a formula, whatever the text starts with
                    out.append(target)
                    continue
                if how == "unit":
                    target = self.get(index, _unit_format(values[target]))
                target.value = value
                out.append(target)
            return out

        return row


def _header(ws: WriteOnlyWorksheet, columns: Sequence[Column]) -> list[WriteOnlyCell]:
    cells = []
    for column in columns:
        cell = WriteOnlyCell(ws, value=safe_text(column.header))
        cell.data_type = "s"
        cell.font = HEADER_FONT
        cell.fill = HEADER_FILL
        cell.alignment = Alignment(horizontal="center", vertical="center", wrap_text=True)
        cells.append(cell)
    return cells


def _plain(ws: WriteOnlyWorksheet, values: Sequence[Any], font: Font | None = None) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if isinstance(value, str):
            cell = WriteOnlyCell(ws, value=safe_text(value))
            cell.data_type = "s"
            if font is not None:
                cell.font = font
            out.append(cell)
        else:
            out.append(value)
    return out


def _add_charts(ws: WriteOnlyWorksheet, sheet: Sheet, labels: Labels) -> None:
    block = sheet.blocks[0]
    header = sheet.header_row
    last = header + len(block.rows)
    anchor_column = get_column_letter(len(block.columns) + 2)
    for n, unit in enumerate(sheet.chart_units):
        columns = [i for i, column in enumerate(block.columns) if column.unit == unit]
        scale = axis_scale(max((row[i] for row in block.rows for i in columns), default=0), unit)
        chart = LineChart()
        chart.title = labels["daily_chart"].format(unit=unit)
        chart.y_axis.title = unit
        chart.y_axis.number_format = scale.excel_format
        chart.y_axis.scaling.min = 0
        chart.y_axis.scaling.max = scale.top
        chart.y_axis.majorUnit = scale.step
        chart.x_axis.number_format = labels.excel_date_format
        chart.x_axis.delete = False  # openpyxl 3.1 hides both axes unless told otherwise
        chart.y_axis.delete = False
        chart.height, chart.width = 8, 20
        for index, column in enumerate(block.columns):
            if column.unit == unit:
                ref = Reference(ws, min_col=index + 1, min_row=header, max_row=last)
                chart.add_data(ref, titles_from_data=True)
        chart.set_categories(Reference(ws, min_col=1, min_row=header + 1, max_row=last))
        ws.add_chart(chart, f"{anchor_column}{2 + n * 17}")


def render_xlsx(
    report: ConsumptionReport, path: Path, progress: Progress | None = None
) -> XlsxResult:
    """Write the workbook to ``path`` (the caller renames it into place); data rows and bytes."""
    labels = report.labels
    sheets = build_sheets(report)
    total = count_rows(sheets)
    done = 0
    wb = Workbook(write_only=True)
    for sheet in sheets:
        ws = wb.create_sheet(sheet.title[:31])
        first = sheet.blocks[0]
        widths = [
            max(b.columns[i].fitted_width for b in sheet.blocks if i < len(b.columns))
            for i in range(max(len(b.columns) for b in sheet.blocks))
        ]
        for index, width in enumerate(widths, start=1):
            ws.column_dimensions[get_column_letter(index)].width = width
        ws.freeze_panes = f"A{sheet.header_row + 1}"  # before the first row: written at the top
        _fast_rows(ws)
        cells = _CellCache(ws, labels)
        row_number = 0
        for n, values in enumerate(sheet.preamble):
            ws.append(_plain(ws, values, TITLE_FONT if n == 0 else None))
            row_number += 1
        for index, block in enumerate(sheet.blocks):
            if index:
                ws.append([])
                row_number += 1
            if block.title:
                ws.append(_plain(ws, [block.title], BOLD))
                row_number += 1
            ws.append(_header(ws, block.columns))
            row_number += 1
            if index == 0:
                header_row = row_number
            row = cells.writer(block.columns)
            for values in block.rows:
                ws.append(row(values))
                done += 1
                if progress is not None and done % PROGRESS_EVERY == 0:
                    progress(done, total)
            row_number += len(block.rows)
            if index == 0:
                end = get_column_letter(len(first.columns))
                ws.auto_filter.ref = f"A{header_row}:{end}{header_row + max(len(block.rows), 1)}"
        if sheet.chart_units:
            _add_charts(ws, sheet, labels)
    wb.save(path)
    if progress is not None:
        progress(total, total)
    return XlsxResult(rows=total, size=path.stat().st_size)
