"""Monthly consumption reports per tenant: a PDF to print for customers and an Excel workbook
for analysts, read from the dbt marts (docs/reports.md).

Partitioned by month and tenant (``TENANT_MONTHS``): a month key such as ``2026-10-01`` is that
calendar month in the tenant's time zone, and new tenants appear as partitions through
``tenant_partitions_sensor``. Files go to ``<IIOT_REPORTS_ROOT>/<tenant>/<YYYY-MM>/``.
"""

from datetime import UTC, datetime, timedelta

import dagster as dg

from iiot_orchestration.partitions import TENANT_MONTHS
from iiot_orchestration.reports import Period, make_reports
from iiot_orchestration.reports.coverage import DUE_AFTER, missing_reports
from iiot_orchestration.reports.data import ConsumptionReport
from iiot_orchestration.reports.verify import verify_files
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.retries import retry_transient
from iiot_orchestration.settings import load_settings

REPORT_ASSET = "consumption_report"
TOTALS_MATCH_MARTS = "report_totals_match_marts"
CLOSED_MONTHS_REPORTED = "closed_months_reported"
PREVIEW_DEVICES = 10
MARTS_READ = [dg.AssetKey("consumption_daily"), dg.AssetKey("consumption_monthly")]


def _md(value: object) -> str:
    """A Markdown table cell: device names may hold pipes, stars or line breaks."""
    text = str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return "".join(f"\\{ch}" if ch in "*_`[]<>#" else ch for ch in text)


def preview(report: ConsumptionReport) -> str:
    labels = report.labels
    lines = [
        "| kind | unit | devices | consumption | completeness |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {s.meter_kind} | {s.unit} | {s.devices} | {s.consumption:,.3f} | "
        f"{labels.percent(s.completeness)} |"
        for s in report.summary
    ]
    top = sorted(report.devices, key=lambda d: d.share or 0.0, reverse=True)[:PREVIEW_DEVICES]
    lines += [
        "",
        "| rank | device | MAC | kind | consumption | share | hours with data |",
        "|---:|---|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {d.rank} | {_md(d.name)} | {d.mac} | {d.meter_kind} | {d.consumption:,.3f} "
        f"{d.unit} | {labels.percent(d.share)} | {d.hours_with_data}/{d.expected_hours} |"
        for d in top
    ]
    if not report.has_data:
        lines.insert(0, "**No data for this period.**\n")
    return "\n".join(lines)


@dg.asset(
    name=REPORT_ASSET,
    partitions_def=TENANT_MONTHS,
    deps=MARTS_READ,
    group_name="reports",
    kinds={"pdf", "excel"},
    owners=["team:data"],
    code_version="1",
    # a month's reports come within 30 hours of its end: a 31-day month, then that, is late
    freshness_policy=dg.FreshnessPolicy.time_window(
        fail_window=timedelta(days=33), warn_window=timedelta(days=32)
    ),
    check_specs=[
        dg.AssetCheckSpec(
            TOTALS_MATCH_MARTS,
            asset=REPORT_ASSET,
            description="The totals printed in the PDF and stored in the XLSX (read back from "
            "the files) equal the marts' for the tenant and month.",
        )
    ],
)
@retry_transient
def consumption_report(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> dg.MaterializeResult:
    """A tenant's month as a PDF and an Excel workbook: consumption per meter kind, device and
    day, device ranking and change from the previous month, completeness, dead letters."""
    # a plain "2026-10-01|acme" when the run was launched with the dagster/partition tag alone
    keys = TENANT_MONTHS.get_partition_key_from_str(context.partition_key).keys_by_dimension
    slug, period = keys["tenant"], Period.from_month_key(keys["month"])
    root = load_settings().reports_root
    with postgres.get_connection() as conn:
        report, files = make_reports(conn, slug, period, root)
        problems = verify_files(conn, report, {f.format: f.path for f in files})
    by_format = {f.format: f for f in files}
    pdf, xlsx = by_format["pdf"], by_format["xlsx"]
    context.log.info(
        "consumption report written",
        extra={"tenant": slug, "period": period.label, "pdf": str(pdf.path)},
    )
    mismatches = [line for lines in problems.values() for line in lines]
    return dg.MaterializeResult(
        metadata={
            "tenant": slug,
            "period": period.label,
            "pdf_path": dg.MetadataValue.path(str(pdf.path)),
            "pdf_bytes": pdf.size,
            "pdf_pages": pdf.pages,
            "xlsx_path": dg.MetadataValue.path(str(xlsx.path)),
            "xlsx_bytes": xlsx.size,
            "xlsx_rows": xlsx.rows,
            "devices": len(report.devices),
            "has_data": report.has_data,
            "preview": dg.MetadataValue.md(preview(report)),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=TOTALS_MATCH_MARTS,
                passed=not mismatches,
                metadata={
                    "kinds": len(report.summary),
                    "devices": len(report.devices),
                    "mismatches": dg.MetadataValue.md(
                        "\n".join(f"- {_md(line)}" for line in mismatches[:20]) or "none"
                    ),
                },
            )
        ],
    )


@dg.asset_check(
    asset=consumption_report,
    name=CLOSED_MONTHS_REPORTED,
    description="Every active tenant has a PDF and an XLSX report for every month closed more "
    f"than {DUE_AFTER.total_seconds() / 3600:g} hours ago (from the month it was registered).",
)
def closed_months_reported(postgres: PostgresResource) -> dg.AssetCheckResult:
    root = load_settings().reports_root
    with postgres.get_connection() as conn:
        expected, missing = missing_reports(conn, root, datetime.now(UTC))
    listed = "\n".join(
        f"- {m.tenant} {m.month}: {', '.join(m.formats)} missing" for m in missing[:50]
    )
    return dg.AssetCheckResult(
        passed=not missing,
        metadata={
            "expected_reports": expected,
            "missing_reports": len(missing),
            "reports_root": str(root),
            "missing": dg.MetadataValue.md(listed or "none"),
        },
    )
