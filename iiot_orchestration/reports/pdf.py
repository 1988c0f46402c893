"""The report as a printable PDF (reportlab): a cover with the summary, charts drawn with
reportlab graphics, the paginated device table with its header on every page, page numbers and
the generation time in the tenant's time zone, in the tenant's language."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from reportlab.graphics.charts.barcharts import HorizontalBarChart
from reportlab.graphics.charts.legends import Legend
from reportlab.graphics.charts.linecharts import HorizontalLineChart
from reportlab.graphics.shapes import Drawing, String
from reportlab.lib import colors
from reportlab.lib.enums import TA_RIGHT
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.pdfbase.pdfmetrics import stringWidth
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    BaseDocTemplate,
    Flowable,
    Frame,
    KeepTogether,
    LongTable,
    PageBreak,
    PageTemplate,
    Paragraph,
    Spacer,
    Table,
    TableStyle,
)

from iiot_orchestration.reports.data import ConsumptionReport, DeviceLine
from iiot_orchestration.reports.labels import Labels
from iiot_orchestration.reports.units import AxisScale, axis_scale, decimals

Progress = Callable[[int, int], None]
PAGE_WIDTH, PAGE_HEIGHT = A4
MARGIN = 16 * mm
CONTENT_WIDTH = PAGE_WIDTH - 2 * MARGIN
TOP_BAR_DEVICES = 15
TOP_TABLE_DEVICES = 10
NAME_CHARS = 24
DEVICE_ROWS_PER_PAGE = 52  # for the progress estimate only
BRAND = colors.HexColor("#1f4e79")
ZEBRA = colors.HexColor("#f2f5f9")
GRID = colors.HexColor("#c8d0da")
SERIES_COLORS = {
    "energy": colors.HexColor("#e08a00"),
    "water": colors.HexColor("#1f77b4"),
    "gas": colors.HexColor("#7f3c8d"),
}


@dataclass(frozen=True)
class PdfResult:
    pages: int
    size: int


def _styles() -> dict[str, ParagraphStyle]:
    base = getSampleStyleSheet()
    return {
        "title": ParagraphStyle(
            "title", parent=base["Title"], fontSize=24, leading=30, textColor=BRAND, alignment=0
        ),
        "subtitle": ParagraphStyle("subtitle", parent=base["Normal"], fontSize=14, leading=20),
        "meta": ParagraphStyle(
            "meta", parent=base["Normal"], fontSize=10, leading=14, textColor=colors.dimgray
        ),
        "h1": ParagraphStyle(
            "h1", parent=base["Heading2"], textColor=BRAND, spaceBefore=10, spaceAfter=6
        ),
        "h2": ParagraphStyle("h2", parent=base["Heading4"], spaceBefore=6, spaceAfter=3),
        "body": ParagraphStyle("body", parent=base["Normal"], fontSize=9, leading=12),
        "note": ParagraphStyle(
            "note", parent=base["Normal"], fontSize=7.5, leading=10, textColor=colors.dimgray
        ),
        "nodata": ParagraphStyle(
            "nodata", parent=base["Normal"], fontSize=12, leading=16, textColor=colors.firebrick
        ),
        "right": ParagraphStyle("right", parent=base["Normal"], alignment=TA_RIGHT),
    }


def _text(value: str) -> str:
    """User text (tenant and device names) made safe for reportlab's paragraph markup."""
    return escape(value)


def _short(value: str, limit: int = NAME_CHARS) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


HEADER_STYLE = ParagraphStyle(
    "table_header",
    fontName="Helvetica-Bold",
    fontSize=7,
    leading=8.5,
    textColor=colors.white,
    splitLongWords=False,  # "Participação", never "Participaç" over "ão"
)
CELL_FONT, CELL_SIZE = "Helvetica", 7
CELL_PADDING = 3 + 3 + 1  # left and right padding of _table_style, and a point to spare
HEADER_STYLE_RIGHT = ParagraphStyle("table_header_right", parent=HEADER_STYLE, alignment=TA_RIGHT)


def _header_cells(texts: list[str], numeric_from: int) -> list[Paragraph]:
    """Header cells that wrap inside their column instead of spilling over the next one."""
    return [
        Paragraph(_text(text), HEADER_STYLE_RIGHT if n >= numeric_from else HEADER_STYLE)
        for n, text in enumerate(texts)
    ]


def _fitted_widths(
    header: list[str], rows: list[list[str]], preferred_mm: list[float]
) -> list[float]:
    """Column widths in points, each at least its longest header word and its widest cell, so
    that a header wraps between words and no value spills into the next column; what that adds
    is taken from the columns with room to spare, so the table keeps its width."""
    needed = []
    for n, text in enumerate(header):
        word = max(
            (stringWidth(w, HEADER_STYLE.fontName, HEADER_STYLE.fontSize) for w in text.split()),
            default=0.0,
        )
        cell = max((stringWidth(row[n], CELL_FONT, CELL_SIZE) for row in rows), default=0.0)
        needed.append(max(word, cell) + CELL_PADDING)
    widths = [max(p * mm, need) for p, need in zip(preferred_mm, needed, strict=True)]
    excess = sum(widths) - sum(preferred_mm) * mm
    room = [w - need for w, need in zip(widths, needed, strict=True)]
    if excess > 0 and sum(room) > 0:
        taken = min(excess, sum(room))
        widths = [w - taken * r / sum(room) for w, r in zip(widths, room, strict=True)]
    return widths


def _amount(labels: Labels, value: float | None, unit: str) -> str:
    """A consumption to its unit's resolution, in the report's number format."""
    return labels.number(value, decimals(unit))


def _table_style(header_rows: int = 1, numeric_from: int = 1) -> TableStyle:
    return TableStyle(
        [
            ("FONT", (0, 0), (-1, -1), "Helvetica", 7),
            ("FONT", (0, 0), (-1, header_rows - 1), "Helvetica-Bold", 7),
            ("BACKGROUND", (0, 0), (-1, header_rows - 1), BRAND),
            ("TEXTCOLOR", (0, 0), (-1, header_rows - 1), colors.white),
            ("ROWBACKGROUNDS", (0, header_rows), (-1, -1), [colors.white, ZEBRA]),
            ("LINEBELOW", (0, 0), (-1, -1), 0.25, GRID),
            ("ALIGN", (numeric_from, 0), (-1, -1), "RIGHT"),
            ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
            ("TOPPADDING", (0, 0), (-1, -1), 2),
            ("BOTTOMPADDING", (0, 0), (-1, -1), 2),
            ("LEFTPADDING", (0, 0), (-1, -1), 3),
            ("RIGHTPADDING", (0, 0), (-1, -1), 3),
        ]
    )


def _numbered_canvas(report: ConsumptionReport) -> type[Canvas]:
    """A canvas that draws "page N of M" and the generation time once the total is known."""
    labels = report.labels
    left = f"{report.tenant.name} · {report.period.describe(labels)}"
    generated = f"{labels['generated']} {labels.timestamp(report.generated_at)}"

    class NumberedCanvas(Canvas):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pages: list[dict[str, Any]] = []

        def showPage(self) -> None:
            self._pages.append(dict(self.__dict__))
            self._startPage()

        def save(self) -> None:
            total = len(self._pages)
            for state in self._pages:
                self.__dict__.update(state)
                self._footer(total)
                super().showPage()
            super().save()

        def _footer(self, total: int) -> None:
            self.saveState()
            self.setStrokeColor(GRID)
            self.line(MARGIN, 12 * mm, PAGE_WIDTH - MARGIN, 12 * mm)
            self.setFont("Helvetica", 7.5)
            self.setFillColor(colors.dimgray)
            self.drawString(MARGIN, 8 * mm, _short(left, 90))
            self.drawCentredString(PAGE_WIDTH / 2, 4.5 * mm, generated)
            self.drawRightString(PAGE_WIDTH - MARGIN, 8 * mm, labels.page(self._pageNumber, total))
            self.restoreState()

    return NumberedCanvas


def _summary_table(report: ConsumptionReport) -> Table:
    labels = report.labels
    previous = labels[f"previous_{report.period.kind}"] if report.period.kind != "range" else None
    header = [
        labels["kind"],
        labels["unit"],
        labels["devices"],
        labels["devices_with_data"],
        labels["consumption"],
        labels["readings"],
        labels["hours_of_period"],
        labels["completeness_of_hours"],
        previous or labels["previous"],
        labels["change"],
    ]
    rows = [
        [
            labels.kind(s.meter_kind),
            s.unit,
            str(s.devices),
            str(s.devices_with_data),
            _amount(labels, s.consumption, s.unit),
            labels.number(s.readings, 0),
            f"{labels.number(s.hours_with_data, 0)}/{labels.number(s.expected_hours, 0)}",
            labels.percent(s.completeness),
            _amount(labels, s.previous_consumption, s.unit),
            labels.percent(s.change_ratio, signed=True),
        ]
        for s in report.summary
    ]
    widths = _fitted_widths(header, rows, [20, 12, 19, 15, 23, 16, 22, 19, 19, 13])
    cells: list[list[Any]] = [_header_cells(header, numeric_from=2), *rows]
    table = Table(cells, colWidths=widths, repeatRows=1, hAlign="LEFT")
    table.setStyle(_table_style(numeric_from=2))
    return table


def _cover(report: ConsumptionReport, styles: dict[str, ParagraphStyle]) -> list[Flowable]:
    labels = report.labels
    tenant = report.tenant
    story: list[Flowable] = [
        Spacer(1, 18 * mm),
        Paragraph(_text(labels["title"]), styles["title"]),
        Spacer(1, 4 * mm),
        Paragraph(f"<b>{_text(tenant.name)}</b> ({_text(tenant.slug)})", styles["subtitle"]),
        Paragraph(_text(report.period.describe(labels)), styles["subtitle"]),
        Spacer(1, 3 * mm),
        Paragraph(
            f"{labels['timezone']}: {_text(tenant.timezone)}<br/>"
            f"{labels['generated']}: {_text(labels.timestamp(report.generated_at))}",
            styles["meta"],
        ),
    ]
    if report.open_period:
        until = labels.timestamp(report.data_until)
        story.append(Paragraph(_text(labels["open_period"].format(until=until)), styles["meta"]))
    story += [Spacer(1, 10 * mm), Paragraph(_text(labels["summary"]), styles["h1"])]
    if not report.has_data:
        story.append(Paragraph(_text(labels["no_data"]), styles["nodata"]))
        story.append(Spacer(1, 3 * mm))
    if report.summary:
        story.append(_summary_table(report))
    story += [
        Spacer(1, 3 * mm),
        Paragraph(_text(labels["hours_note"]), styles["note"]),
        Paragraph(_text(labels["completeness_note"]), styles["note"]),
        Paragraph(_text(_change_note(report)), styles["note"]),
    ]
    return story


def _change_note(report: ConsumptionReport) -> str:
    labels = report.labels
    return labels["change_note"].format(previous=labels[f"previous_lower_{report.period.kind}"])


def _scale_axis(chart: Any, scale: AxisScale, labels: Labels) -> None:
    axis = chart.valueAxis
    axis.valueMin, axis.valueMax, axis.valueStep = 0, scale.top, scale.step
    axis.labels.fontSize = 6.5
    axis.labelTextFormat = lambda v: labels.number(v, scale.decimals)
    axis.visibleGrid = True
    axis.gridStrokeColor = GRID


def _daily_chart(report: ConsumptionReport, unit: str) -> Drawing:
    labels = report.labels
    totals = report.daily_totals()
    keys = [(kind, u) for kind, u in report.units if u == unit]
    days = report.period.days
    drawing = Drawing(CONTENT_WIDTH, 62 * mm)
    chart = HorizontalLineChart()
    chart.x, chart.y = 14 * mm, 12 * mm
    chart.width, chart.height = CONTENT_WIDTH - 18 * mm, 42 * mm
    # the days an open period has not reached yet are left out of the line, not drawn as 0
    chart.data = [[totals[day][key] if day in totals else None for day in days] for key in keys]
    scale = axis_scale(
        max((v for values in totals.values() for v in values.values()), default=0), unit
    )
    step = max(1, math.ceil(len(days) / 16))
    chart.categoryAxis.categoryNames = [
        labels.day(day)[:5] if n % step == 0 else "" for n, day in enumerate(days)
    ]
    chart.categoryAxis.labels.fontSize = 6
    chart.categoryAxis.labels.angle = 45
    chart.categoryAxis.labels.boxAnchor = "ne"
    _scale_axis(chart, scale, labels)
    for n, (kind, _) in enumerate(keys):
        chart.lines[n].strokeColor = SERIES_COLORS.get(kind, BRAND)
        chart.lines[n].strokeWidth = 1.5
    drawing.add(chart)
    legend = Legend()
    legend.x, legend.y = CONTENT_WIDTH - 40 * mm, 60 * mm
    legend.fontSize = 7
    legend.alignment = "right"
    legend.colorNamePairs = [
        (SERIES_COLORS.get(kind, BRAND), labels.kind(kind)) for kind, _ in keys
    ]
    drawing.add(legend)
    drawing.add(
        String(0, 58 * mm, labels["daily_chart"].format(unit=unit), fontSize=9, fillColor=BRAND)
    )
    return drawing


def _device_chart(report: ConsumptionReport, kind: str, unit: str) -> Drawing:
    labels = report.labels
    top = [d for d in report.devices if (d.meter_kind, d.unit) == (kind, unit)][:TOP_BAR_DEVICES]
    top.reverse()  # the chart draws its first category at the bottom
    height = (18 + 6 * len(top)) * mm
    drawing = Drawing(CONTENT_WIDTH, height)
    chart = HorizontalBarChart()
    chart.x, chart.y = 52 * mm, 8 * mm
    chart.width, chart.height = CONTENT_WIDTH - 62 * mm, height - 18 * mm
    chart.data = [[d.consumption for d in top]]
    chart.categoryAxis.categoryNames = [_short(d.name, 34) for d in top]
    chart.categoryAxis.labels.fontSize = 6.5
    chart.categoryAxis.labels.boxAnchor = "e"
    _scale_axis(chart, axis_scale(max((d.consumption for d in top), default=0), unit), labels)
    chart.bars[0].fillColor = SERIES_COLORS.get(kind, BRAND)
    chart.bars[0].strokeColor = None
    chart.barLabelFormat = lambda v: _amount(labels, v, unit)
    chart.barLabels.fontSize = 6
    chart.barLabels.boxAnchor = "w"
    chart.barLabels.dx = 2
    drawing.add(chart)
    title = f"{labels.kind(kind)}: " + labels["device_chart"].format(unit=unit)
    drawing.add(String(0, height - 6 * mm, title, fontSize=9, fillColor=BRAND))
    return drawing


def _device_row(line: DeviceLine, labels: Labels) -> list[str]:
    return [
        str(line.rank),
        _short(line.name),
        line.mac,
        labels.kind(line.meter_kind),
        f"{_amount(labels, line.consumption, line.unit)} {line.unit}",
        labels.percent(line.share),
        _amount(labels, line.previous_consumption, line.unit),
        labels.percent(line.change_ratio, signed=True),
        f"{line.hours_with_data}/{line.expected_hours}",
        labels.percent(line.completeness),
    ]


def _device_header(report: ConsumptionReport) -> list[str]:
    labels = report.labels
    previous = labels[f"previous_{report.period.kind}"] if report.period.kind != "range" else None
    return [
        "#",
        labels["device"],
        labels["mac"],
        labels["kind"],
        labels["consumption"],
        labels["share"],
        previous or labels["previous"],
        labels["change"],
        labels["hours_of_period"],
        labels["completeness_of_hours"],
    ]


DEVICE_WIDTHS = [7, 32, 23, 13, 24, 14, 18, 13, 15, 19]


def _top_consumers(report: ConsumptionReport, styles: dict[str, ParagraphStyle]) -> list[Flowable]:
    labels = report.labels
    story: list[Flowable] = [Paragraph(_text(labels["top"]), styles["h1"])]
    for kind, unit in report.units:
        lines = [d for d in report.devices if (d.meter_kind, d.unit) == (kind, unit)]
        if not any(d.consumption > 0 for d in lines):
            continue
        header = _device_header(report)
        rows = [_device_row(d, labels) for d in lines[:TOP_TABLE_DEVICES]]
        cells: list[list[Any]] = [_header_cells(header, numeric_from=4), *rows]
        table = Table(cells, colWidths=_fitted_widths(header, rows, DEVICE_WIDTHS), hAlign="LEFT")
        table.setStyle(_table_style(numeric_from=4))
        parts: list[Flowable] = [_device_chart(report, kind, unit), Spacer(1, 2 * mm), table]
        if len(lines) > TOP_TABLE_DEVICES:
            more = labels["more_devices"].format(count=len(lines) - TOP_TABLE_DEVICES)
            parts.append(Paragraph(_text(more), styles["note"]))
        story += [KeepTogether(parts), Spacer(1, 5 * mm)]
    return story


def _device_table(report: ConsumptionReport) -> LongTable:
    labels = report.labels
    header = _device_header(report)
    rows = [_device_row(d, labels) for d in report.devices]
    widths = _fitted_widths(header, rows, DEVICE_WIDTHS)
    cells: list[list[Any]] = [_header_cells(header, numeric_from=4), *rows]
    table = LongTable(cells, colWidths=widths, repeatRows=1, hAlign="LEFT")
    style = _table_style(numeric_from=4)
    for n, line in enumerate(report.devices, start=1):
        if line.completeness is not None and line.completeness < 0.9:
            style.add("TEXTCOLOR", (9, n), (9, n), colors.firebrick)
    table.setStyle(style)
    return table


def _alerts(report: ConsumptionReport, styles: dict[str, ParagraphStyle]) -> list[Flowable]:
    labels = report.labels
    story: list[Flowable] = [Paragraph(_text(labels["alerts"]), styles["h1"])]
    alerts = report.alerts
    if not alerts.available:
        story.append(Paragraph(_text(labels["alerts_none"]), styles["body"]))
    elif not alerts.readable:
        story.append(Paragraph(_text(labels["alerts_unknown"]), styles["body"]))
    else:
        total = sum(n for _, n in alerts.counts)
        story.append(Paragraph(f"{_text(labels['alerts_count'])}: {total}", styles["body"]))
        if alerts.counts:
            rows = [["", labels["count"]], *[[g, str(n)] for g, n in alerts.counts]]
            table = Table(rows, colWidths=[60 * mm, 25 * mm], hAlign="LEFT")
            table.setStyle(_table_style())
            story.append(table)
    story += [Spacer(1, 4 * mm), Paragraph(_text(labels["dead_letters"]), styles["h2"])]
    if not report.dead_letters:
        story.append(Paragraph(_text(labels["dead_letters_none"]), styles["body"]))
    else:
        rows = [[labels["reason"], labels["count"]]]
        rows += [[reason, str(count)] for reason, count in report.dead_letters]
        rows.append([labels["total"], str(sum(count for _, count in report.dead_letters))])
        table = Table(rows, colWidths=[60 * mm, 25 * mm], hAlign="LEFT")
        style = _table_style()
        style.add("FONT", (0, -1), (-1, -1), "Helvetica-Bold", 7.5)
        table.setStyle(style)
        story.append(table)
    return story


def estimated_pages(report: ConsumptionReport) -> int:
    charts = len({unit for _, unit in report.units})
    return 2 + charts + len(report.units) + math.ceil(len(report.devices) / DEVICE_ROWS_PER_PAGE)


def build_story(report: ConsumptionReport) -> list[Flowable]:
    labels = report.labels
    styles = _styles()
    story = _cover(report, styles)
    if report.has_data:
        story += [PageBreak(), Paragraph(_text(labels["daily"]), styles["h1"])]
        for unit in dict.fromkeys(unit for _, unit in report.units):
            story += [_daily_chart(report, unit), Spacer(1, 4 * mm)]
        story += [PageBreak(), *_top_consumers(report, styles)]
    if report.devices:
        story += [PageBreak(), Paragraph(_text(labels["device_table"]), styles["h1"])]
        story += [_device_table(report), Spacer(1, 2 * mm)]
        story.append(Paragraph(_text(labels["completeness_note"]), styles["note"]))
    story += _alerts(report, styles)
    return story


def render_pdf(
    report: ConsumptionReport, path: Path, progress: Progress | None = None
) -> PdfResult:
    """Write the PDF to ``path`` (the caller renames it into place); pages and bytes."""
    labels = report.labels
    doc = BaseDocTemplate(
        str(path),
        pagesize=A4,
        leftMargin=MARGIN,
        rightMargin=MARGIN,
        topMargin=MARGIN,
        bottomMargin=18 * mm,
        title=f"{labels['title']}: {report.tenant.name}, {report.period.describe(labels)}",
        author=report.tenant.name,
        subject=report.period.label,
        creator="iiot-orchestration",
        lang="pt-BR" if labels.locale == "pt_BR" else "en",
    )
    frame = Frame(doc.leftMargin, doc.bottomMargin, doc.width, doc.height, id="body")
    doc.addPageTemplates([PageTemplate(id="page", frames=[frame])])
    estimate = estimated_pages(report)
    if progress is not None:
        pages = progress  # the estimate can be passed: the bar stops at its end

        def on_progress(kind: str, value: int) -> None:
            if kind == "PAGE":
                pages(min(value, estimate), estimate)

        doc.setProgressCallBack(on_progress)
    doc.build(build_story(report), canvasmaker=_numbered_canvas(report))
    if progress is not None:
        progress(estimate, estimate)
    return PdfResult(pages=doc.page, size=path.stat().st_size)
