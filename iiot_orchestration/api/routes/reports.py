"""Consumption reports (docs/reports.md): the tenant's PDF and XLSX files, and reports made on
demand by a Dagster run of ``consumption_reports_job``.

Files are found under ``<IIOT_REPORTS_ROOT>/<tenant>/<period>/consumption.<ext>``, the tenant
being the key's: a period in a URL must be one of the canonical spellings a report folder has
(2026-10, 2026-W44, 2026-10-05, 2026-10-01..2026-10-15), so it never names another folder.

A run the API launches is recorded as an audit row of the tenant (``report.requested``, the run
id as its entity): row security on ``audit_log`` is what keeps a tenant from polling another
tenant's run, which is a 404 like a run that does not exist.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import Path as PathParam
from fastapi import Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from iiot_orchestration.api import API_PREFIX
from iiot_orchestration.api.context import Editor, Viewer
from iiot_orchestration.api.dagster_runs import FINISHED, DagsterRuns
from iiot_orchestration.api.errors import ApiError, ErrorEnvelope, keyed_router, not_found
from iiot_orchestration.api.pagination import Cursor, Limit, Page, decode, page
from iiot_orchestration.api.routes.billing import FORMATS, STORE_DOWN, Format, TenantFolder
from iiot_orchestration.api.routes.consumption import MONTH_PATTERN, require_mart
from iiot_orchestration.reports.data import ReportError, check_slug, parse_period
from iiot_orchestration.reports.files import FILE_STEM

router = keyed_router("reports")

REPORT_JOB = "consumption_reports_job"  # sensors/reports.py
REQUESTED = "report.requested"
# the canonical period spellings of reports.data.Period.label, and only those
PERIOD_KINDS = {
    "month": r"[0-9]{4}-[0-9]{2}",
    "week": r"[0-9]{4}-W[0-9]{2}",
    "day": r"[0-9]{4}-[0-9]{2}-[0-9]{2}",
    "range": r"[0-9]{4}-[0-9]{2}-[0-9]{2}\.\.[0-9]{4}-[0-9]{2}-[0-9]{2}",
}
PERIOD_PATTERN = "^(" + "|".join(PERIOD_KINDS.values()) + ")$"
_KIND_OF = [(kind, re.compile(pattern, re.ASCII)) for kind, pattern in PERIOD_KINDS.items()]
DAGSTER_DOWN: dict[int | str, dict] = {
    503: {"model": ErrorEnvelope, "description": "Dagster unavailable: the error says where"}
}


class ReportFile(BaseModel):
    period: str = Field(description="2026-10, 2026-W44, 2026-10-05 or 2026-10-01..2026-10-15")
    kind: Literal["month", "week", "day", "range"]
    format: Literal["pdf", "xlsx"]
    size: int = Field(description="Bytes.")
    modified: datetime
    url: str


class ReportRequest(BaseModel):
    period: str = Field(pattern=MONTH_PATTERN, description="A month, YYYY-MM, local time.")


class ReportRun(BaseModel):
    run_id: UUID
    period: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    dagster_status: str = Field(description="Dagster's own status: QUEUED, STARTED, SUCCESS...")
    requested_at: datetime
    requested_by: str = Field(description="The API key that asked: api-key:<id>.")
    already_requested: bool = Field(
        default=False,
        description="True when a run for this period was still queued or running: that run is "
        "returned instead of a new one.",
    )
    files: list[ReportFile] = Field(description="The period's files once the run succeeded.")


def kind_of(period: str) -> str | None:
    """The kind of a canonical period label, None for anything else."""
    kind = next((k for k, pattern in _KIND_OF if pattern.fullmatch(period)), None)
    if kind is None:
        return None
    try:
        canonical = parse_period(period).label == period
    except ReportError:
        return None
    return kind if canonical else None


def _report(period: str, fmt: str) -> tuple[str, str]:
    """The file of a report in the tenant's folder (reports.files.report_key, under the slug)."""
    return period, f"{FILE_STEM}.{fmt}"


def _file(folder: TenantFolder, period: str, fmt: str) -> dict[str, Any] | None:
    found = folder.stat(*_report(period, fmt))
    if found is None:
        return None
    return {
        "period": period,
        "kind": kind_of(period),
        "format": fmt,
        "size": found[0],
        "modified": found[1],
        "url": f"{API_PREFIX}/reports/{period}/{fmt}",
    }


def report_files(folder: TenantFolder, periods: list[str] | None = None) -> list[dict[str, Any]]:
    """The tenant's report files, newest period spelling first (by name), PDF before XLSX."""
    if periods is None:
        periods = [name for name in folder.folders() if kind_of(name)]
    found = [_file(folder, period, fmt) for period in periods for fmt in FORMATS]
    files = [f for f in found if f is not None]
    files.sort(key=lambda f: f["format"])
    files.sort(key=lambda f: f["period"], reverse=True)
    return files


def _follows(file: dict[str, Any], after: list[str]) -> bool:
    """Whether a file comes after the cursor's (period, format): periods descending, formats
    ascending."""
    period, fmt = after
    return file["period"] < period or (file["period"] == period and file["format"] > fmt)


def _runs(request: Request) -> DagsterRuns:
    settings = request.app.state.settings
    return DagsterRuns(settings.dagster_host, settings.dagster_port)


@router.get(
    "/reports",
    response_model=Page[ReportFile],
    summary="The tenant's report files",
    responses={503: STORE_DOWN},
)
def list_reports(
    s: Viewer,
    request: Request,
    limit: Limit = 100,
    cursor: Cursor = None,
    format: Annotated[Format | None, Query(description="Only this format.")] = None,
    kind: Annotated[
        Literal["month", "week", "day", "range"] | None, Query(description="Only this kind.")
    ] = None,
) -> dict:
    folder = TenantFolder(request, s)
    after = decode(cursor, str, str)
    files = [
        f
        for f in report_files(folder)
        if (format is None or f["format"] == format)
        and (kind is None or f["kind"] == kind)
        and (after is None or _follows(f, after))
    ]
    return page(files, limit, ("period", "format"))


@router.post(
    "/reports",
    response_model=ReportRun,
    status_code=202,
    summary="Ask for a month's report now: a Dagster run to poll",
    responses=DAGSTER_DOWN,
)
def request_report(s: Editor, body: ReportRequest, request: Request, response: Response) -> dict:
    tenant_id = s.tenant()
    slug = check_slug(s.tenant_slug or "")
    try:
        parse_period(body.period)
    except ReportError as exc:
        raise ApiError(422, str(exc), code="validation_error") from None
    started = s.row(
        "SELECT (now() AT TIME ZONE timezone)::date >= %s::date AS started FROM tenants"
        " WHERE tenant_id = %s",
        (f"{body.period}-01", tenant_id),
    )
    if not started or not started["started"]:
        raise ApiError(
            422,
            f"period {body.period} has not started yet in the tenant's time zone",
            code="validation_error",
        )
    require_mart(s, "consumption_daily")
    require_mart(s, "consumption_monthly")
    runs = _runs(request)
    # one request at a time per tenant: a second one finds the first's run
    s.conn.execute("SELECT pg_advisory_xact_lock(hashtext('iiot.api.reports'), %s)", (tenant_id,))
    earlier = s.row(
        "SELECT entity_id, occurred_at, actor FROM audit_log"
        " WHERE tenant_id = %s AND action = %s AND entity = 'report_run'"
        "   AND detail ->> 'period' = %s"
        " ORDER BY occurred_at DESC, audit_id DESC LIMIT 1",
        (tenant_id, REQUESTED, body.period),
    )
    if earlier is not None:
        state = runs.state(earlier["entity_id"])
        if state is not None and state[0] not in FINISHED:
            response.headers["Location"] = f"{API_PREFIX}/reports/runs/{earlier['entity_id']}"
            return _run(earlier, body.period, state, [], already=True)
    key = f"{body.period}-01|{slug}"  # partitions.tenant_key: month|tenant
    run_id = runs.launch(
        REPORT_JOB,
        {
            "dagster/partition": key,
            "iiot/tenant": slug,
            "iiot/requested_by": s.actor,
            "iiot/request_id": s.request_id,
        },
    )
    s.audit(REQUESTED, "report_run", run_id, period=body.period, partition=key, job=REPORT_JOB)
    response.headers["Location"] = f"{API_PREFIX}/reports/runs/{run_id}"
    row = {"entity_id": run_id, "occurred_at": datetime.now(UTC), "actor": s.actor}
    return _run(row, body.period, ("queued", "QUEUED"), [])


def _run(
    row: dict[str, Any],
    period: str,
    state: tuple[str, str],
    files: list[dict[str, Any]],
    *,
    already: bool = False,
) -> dict[str, Any]:
    return {
        "run_id": row["entity_id"],
        "period": period,
        "status": state[0],
        "dagster_status": state[1],
        "requested_at": row["occurred_at"],
        "requested_by": row["actor"],
        "already_requested": already,
        "files": files,
    }


@router.get(
    "/reports/runs/{run_id}",
    response_model=ReportRun,
    summary="The status of a report run this tenant asked for",
    responses=DAGSTER_DOWN,
)
def report_run(s: Viewer, run_id: UUID, request: Request) -> dict:
    tenant_id = s.tenant()
    row = s.row(
        "SELECT entity_id, occurred_at, actor, detail ->> 'period' AS period FROM audit_log"
        " WHERE tenant_id = %s AND action = %s AND entity = 'report_run' AND entity_id = %s",
        (tenant_id, REQUESTED, str(run_id)),
    )
    if row is None:
        raise not_found(f"report run {run_id}")
    state = _runs(request).state(str(run_id))
    if state is None:
        raise not_found(f"report run {run_id} (Dagster no longer knows it)")
    files = []
    if state[0] == "succeeded":
        files = report_files(TenantFolder(request, s), [row["period"]])
    return _run(row, row["period"], state, files)


@router.get(
    "/reports/{period}/{fmt}",
    response_class=FileResponse,
    summary="Download a report file",
    responses={
        200: {"content": {mime: {} for mime in FORMATS.values()}, "description": "The file"},
        503: STORE_DOWN,
    },
)
def download_report(
    s: Viewer,
    request: Request,
    period: Annotated[str, PathParam(pattern=PERIOD_PATTERN, max_length=22)],
    fmt: Format,
) -> Response:
    folder = TenantFolder(request, s)
    missing = not_found(f"{fmt.upper()} report of {period}")
    if not kind_of(period):
        raise missing
    name = f"consumption-{folder.slug}-{period}.{fmt}"
    return folder.download(_report(period, fmt), FORMATS[fmt], name, missing)
