"""An invoice as a PDF (reportlab) and an XLSX workbook (openpyxl), written atomically under
``<reports root>/<tenant>/<period>/invoice.<ext>``; the reports root is a local directory or an
fsspec URL (filestore.py), where the files are rendered locally and uploaded."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from iiot_orchestration import filestore
from iiot_orchestration.billing import BillingError, Invoice, Tenant
from iiot_orchestration.reports.files import staged_file

MONEY_FORMAT = "#,##0.00"


@dataclass(frozen=True)
class Exported:
    pdf: Path | str  # URLs under a remote reports root
    xlsx: Path | str


def invoice_dir(root: Path | str, who: Tenant, invoice: Invoice) -> Path | str:
    return filestore.join(root, who.slug, f"{invoice.period.label:%Y-%m}")


def _atomic(path: Path | str, write: Callable[[Path], None]) -> Path | str:
    if not isinstance(path, Path):
        with staged_file(path, error=BillingError) as temporary:
            write(temporary)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _title(who: Tenant, invoice: Invoice) -> str:
    status = "Invoice" if invoice.status == "final" else "Draft invoice (month to date)"
    return f"{status} {invoice.period.label:%Y-%m}: {who.slug}"


def _period_text(invoice: Invoice) -> str:
    period = invoice.period
    return (
        f"period {period.start:%Y-%m-%d} to {period.end:%Y-%m-%d} (end exclusive: the last day "
        f"is {period.end - timedelta(days=1):%Y-%m-%d}), {period.days} days"
    )


def _generated(who: Tenant) -> str:
    return datetime.now(ZoneInfo(who.timezone)).strftime(f"%Y-%m-%d %H:%M ({who.timezone})")


def write_pdf(path: Path | str, who: Tenant, invoice: Invoice) -> Path | str:
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.lib.units import mm
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    styles = getSampleStyleSheet()
    rows = [
        [
            "#",
            "Description",
            "Quantity",
            "Unit",
            "Unit price",
            "Fraction",
            f"Amount ({invoice.currency})",
        ]
    ]
    for n, line in enumerate(invoice.lines, start=1):
        description = line.description + (f" - {line.reason}" if line.reason else "")
        rows.append(
            [
                str(n),
                Paragraph(description, styles["BodyText"]),
                f"{line.quantity.normalize():f}",
                line.unit,
                f"{line.unit_price:,.4f}",
                str(line.fraction),
                f"{line.amount:,.2f}",
            ]
        )
    rows.append(["", "Total", "", "", "", "", f"{invoice.total:,.2f}"])
    table = Table(
        rows,
        colWidths=[8 * mm, 64 * mm, 22 * mm, 20 * mm, 22 * mm, 14 * mm, 28 * mm],
        repeatRows=1,
    )
    table.setStyle(
        TableStyle(
            [
                ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#1f3b57")),
                ("TEXTCOLOR", (0, 0), (-1, 0), colors.white),
                ("FONTNAME", (0, 0), (-1, 0), "Helvetica-Bold"),
                ("FONTNAME", (0, -1), (-1, -1), "Helvetica-Bold"),
                ("ALIGN", (2, 1), (-1, -1), "RIGHT"),
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LINEBELOW", (0, 0), (-1, -2), 0.25, colors.grey),
                ("LINEABOVE", (0, -1), (-1, -1), 1, colors.black),
            ]
        )
    )

    def footer(canvas, doc):
        canvas.setFont("Helvetica", 8)
        canvas.drawString(15 * mm, 10 * mm, f"Generated {_generated(who)}")
        canvas.drawRightString(195 * mm, 10 * mm, f"Page {doc.page}")

    def write(target: Path) -> None:
        doc = SimpleDocTemplate(
            str(target), pagesize=A4, title=_title(who, invoice), author="iiot billing"
        )
        doc.build(
            [
                Paragraph(_title(who, invoice), styles["Title"]),
                Paragraph(
                    f"Tenant <b>{who.slug}</b>; {_period_text(invoice)}, {invoice.days_billed} "
                    f"billed; status <b>{invoice.status}</b>. Amounts in {invoice.currency}: "
                    "quantity x unit price x fraction, each line rounded half up to the cent; "
                    "taxes not included.",
                    styles["BodyText"],
                ),
                Spacer(1, 6 * mm),
                table,
            ],
            onFirstPage=footer,
            onLaterPages=footer,
        )

    return _atomic(path, write)


def write_xlsx(path: Path | str, who: Tenant, invoice: Invoice) -> Path | str:
    from openpyxl import Workbook
    from openpyxl.styles import Font

    def write(target: Path) -> None:
        book = Workbook()
        sheet = book.active
        sheet.title = "Invoice"
        sheet.append([_title(who, invoice)])
        sheet["A1"].font = Font(bold=True, size=14)
        sheet.append(
            [
                "Period",
                f"{invoice.period.start:%Y-%m-%d}",
                f"{invoice.period.end:%Y-%m-%d} (exclusive)",
                _period_text(invoice),
            ]
        )
        sheet.append(["Status", invoice.status, f"Generated {_generated(who)}"])
        sheet.append([])
        header = [
            "#",
            "Kind",
            "Description",
            "Quantity",
            "Unit",
            "Unit price",
            "Fraction",
            "Amount",
            "Reason",
        ]
        sheet.append(header)
        for cell in sheet[5]:
            cell.font = Font(bold=True)
        for n, line in enumerate(invoice.lines, start=1):
            sheet.append(
                [
                    n,
                    line.kind,
                    line.description,
                    line.quantity,
                    line.unit,
                    line.unit_price,
                    str(line.fraction),
                    line.amount,
                    line.reason,
                ]
            )
            sheet.cell(sheet.max_row, 6).number_format = "#,##0.0000"
            sheet.cell(sheet.max_row, 8).number_format = MONEY_FORMAT
        sheet.append(["", "total", "Total", None, None, None, None, invoice.total, None])
        sheet.cell(sheet.max_row, 8).number_format = MONEY_FORMAT
        sheet.cell(sheet.max_row, 8).font = Font(bold=True)
        sheet.freeze_panes = "A6"
        sheet.auto_filter.ref = f"A5:I{sheet.max_row - 1}"
        for column, width in zip("ABCDEFGHI", (5, 18, 60, 14, 12, 14, 10, 14, 40), strict=True):
            sheet.column_dimensions[column].width = width
        book.save(target)

    return _atomic(path, write)


def export(root: Path | str, who: Tenant, invoice: Invoice) -> Exported:
    return Exported(
        write_pdf(filestore.join(invoice_dir(root, who, invoice), "invoice.pdf"), who, invoice),
        write_xlsx(filestore.join(invoice_dir(root, who, invoice), "invoice.xlsx"), who, invoice),
    )
