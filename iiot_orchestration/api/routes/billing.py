"""Invoices with their lines and files, the billing event trail, and usage against the plan's
quotas (docs/billing.md). Row-level security keeps every statement to the key's tenant; an
invoice of another tenant is a 404 like one that does not exist."""

from __future__ import annotations

import logging
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Path as PathParam
from fastapi import Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, Field

from iiot_orchestration import billing, filestore
from iiot_orchestration.api import API_PREFIX
from iiot_orchestration.api.context import Session, Viewer
from iiot_orchestration.api.errors import ApiError, ErrorEnvelope, keyed_router, not_found
from iiot_orchestration.api.pagination import Cursor, Limit, Page, decode, page
from iiot_orchestration.api.routes.consumption import MONTH_PATTERN, after_key
from iiot_orchestration.reports.data import check_slug
from iiot_orchestration.reports.files import ROOT_VARIABLE

log = logging.getLogger(__name__)
router = keyed_router("billing")
STORE_DOWN = {
    "model": ErrorEnvelope,
    "description": "The database, or the reports root on object storage, is unavailable: retry "
    "after Retry-After seconds",
}

FORMATS = {
    "pdf": "application/pdf",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}
Format = Literal["pdf", "xlsx"]
InvoiceId = Annotated[int, PathParam(ge=1, le=2**63 - 1)]
Period = Annotated[
    str | None, Query(pattern=MONTH_PATTERN, description="A billing period, YYYY-MM.")
]
# the lines whose monthly price is prorated by the days of the period (billing.invoice_lines)
_PER_DAY = {"base", "overage_devices", "overage_storage"}
_LATE_USAGE_UNIT = "messages over the rate"  # an adjustment billing late usage per 1,000


class InvoiceFile(BaseModel):
    format: str
    url: str
    size: int
    modified: datetime


class Invoice(BaseModel):
    invoice_id: int
    period: str = Field(description="The period's label, YYYY-MM (its first month).")
    period_start: date
    period_end: date = Field(description="Exclusive: the day after the period's last day.")
    status: Literal["draft", "final"]
    currency: str
    total: str = Field(description="A decimal string, to the cent: 294.00.")
    days_billed: int
    computed_at: datetime
    finalised_at: datetime | None


class InvoiceLine(BaseModel):
    line_no: int
    kind: str
    description: str
    quantity: str = Field(description="A decimal string: 1800, 0.25.")
    unit: str
    unit_price: str = Field(description="A decimal string: 4.90.")
    fraction: str = Field(description="quantity x unit_price x fraction = amount, rounded: 1/30.")
    amount: str = Field(description="A decimal string, to the cent.")
    reason: str | None


class InvoiceDetail(Invoice):
    lines: list[InvoiceLine]
    files: list[InvoiceFile] = Field(description="The exported PDF and XLSX, when written.")


class BillingEvent(BaseModel):
    event_id: int
    occurred_at: datetime
    period: str | None
    kind: str
    actor: str
    before_amount: str | None = Field(description="A decimal string, to the cent.")
    after_amount: str | None
    detail: dict[str, Any]


class QuotaUsage(BaseModel):
    used: int
    included: int
    percent: float | None = Field(description="used / included, in %, to one decimal.")
    over: bool


class Usage(BaseModel):
    tenant: str
    plan_id: str
    plan_name: str
    over_quota: Literal["blocked", "billed"] = Field(
        description="What the plan does over its quotas: starter and pro block new devices, "
        "enterprise bills overage."
    )
    period: str
    period_start: date
    period_end: date
    local_date: date = Field(description="Today in the tenant's time zone.")
    devices: QuotaUsage = Field(description="Devices not decommissioned, now.")
    messages: QuotaUsage = Field(
        description="Messages accepted in the period so far, against the period's allowance "
        "(included devices x messages per minute x 1,440 x days)."
    )
    storage: QuotaUsage = Field(
        description="The storage estimate of the latest billed day, in bytes (docs/billing.md)."
    )
    storage_day: date | None = Field(description="The local day the storage estimate is of.")
    storage_blocked: bool = Field(description="New devices refused until under the quota.")
    measured_at: datetime = Field(description="When devices and messages were counted.")


_INVOICE_COLUMNS = (
    "invoice_id, period, period_start, period_end, status, currency, total, days_billed,"
    " computed_at, finalised_at"
)


def _invoice(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "period": f"{row['period']:%Y-%m}", "total": str(row["total"])}


def decimal_text(value: Decimal | None, places: int = 0) -> str | None:
    """A decimal as plain digits, trailing zeros dropped down to ``places``: 1800, 4.90."""
    if value is None:
        return None
    plain = value.normalize()
    if -plain.as_tuple().exponent < places:
        plain = value.quantize(Decimal(1).scaleb(-places))
    return f"{plain:f}"


def _invoice_row(s: Session, invoice_id: int) -> dict[str, Any]:
    row = s.row(f"SELECT {_INVOICE_COLUMNS} FROM invoices WHERE invoice_id = %s", (invoice_id,))
    if row is None:
        raise not_found(f"invoice {invoice_id}")
    return row


def _fraction(kind: str, unit: str, days: int) -> str:
    if kind in _PER_DAY:
        return f"1/{days}"
    if kind == "overage_messages" or (kind == "adjustment" and unit == _LATE_USAGE_UNIT):
        return "1/1000"
    return "1"


class TenantFolder:
    """The key's tenant's folder under IIOT_REPORTS_ROOT, which holds its reports and invoice
    files: a local directory read with plain file operations (a file or folder linking out of it
    is not there), or a prefix on object storage read through filestore.py. The folder's name
    comes from the session's tenant, never from the request; the names under it are built from
    validated parts. A store that cannot be reached is a 503 that names neither its endpoint nor
    its bucket (the log, with the request id, has the error)."""

    def __init__(self, request: Request, s: Session) -> None:
        s.tenant()
        self.slug = check_slug(s.tenant_slug or "")
        self.request_id = s.request_id
        root = request.app.state.settings.reports_root
        self.remote = filestore.is_url(root)
        self.root = str(root) if self.remote else Path(root)
        self._listed: dict[str, tuple[int, datetime]] | None = None

    def _local(self, *parts: str) -> Path:
        return Path(self.root).joinpath(self.slug, *parts)

    def _key(self, *parts: str) -> str:
        return "/".join((self.slug, *parts))

    @contextmanager
    def _store(self, doing: str) -> Iterator[filestore.Store]:
        try:
            yield filestore.open_root(self.root, ROOT_VARIABLE)
        except filestore.StoreError as exc:
            raise self._unavailable(doing, exc) from None

    def _unavailable(self, doing: str, exc: Exception) -> ApiError:
        log.warning(
            "reports store failed",
            extra={"request_id": self.request_id, "doing": doing, "error": str(exc)[:500]},
        )
        return ApiError(
            503,
            f"the store of reports and invoice files cannot be reached ({doing}); retry later",
            code="unavailable",
            headers={"Retry-After": "5"},
        )

    def folders(self) -> list[str]:
        """The names in the tenant's folder (a folder per period); remotely, one listing of
        every file under it, which ``stat`` then answers from."""
        if not self.remote:
            try:
                return [entry.name for entry in self._local().iterdir()]
            except OSError:  # nothing written yet, or a root that cannot be read
                return []
        with self._store("listing files") as store:
            self._listed = store.files(self.slug)
        under = (key.removeprefix(f"{self.slug}/") for key in self._listed)
        return sorted({name.partition("/")[0] for name in under if "/" in name})

    def stat(self, *parts: str) -> tuple[int, datetime] | None:
        """Size and modification time of the file ``parts`` under the folder, None when there
        is none."""
        if not self.remote:
            return regular_file(self._local(*parts), self._local())
        if self._listed is not None:
            return self._listed.get(self._key(*parts))
        with self._store("reading a file") as store:
            return store.stat(self._key(*parts))

    def download(
        self, parts: tuple[str, ...], media_type: str, filename: str, missing: ApiError
    ) -> Response:
        """The file as an attachment named ``filename``; ``missing`` when there is none."""
        if not self.remote:
            if self.stat(*parts) is None:
                raise missing
            return FileResponse(self._local(*parts), media_type=media_type, filename=filename)
        with self._store("reading a file") as store:
            try:
                length, pieces = store.stream(self._key(*parts))
            except FileNotFoundError:
                raise missing from None
        headers = {
            "Content-Length": str(length),
            "Content-Disposition": f'attachment; filename="{filename}"',
        }
        return StreamingResponse(self._logged(pieces), media_type=media_type, headers=headers)

    def _logged(self, pieces: Iterator[bytes]) -> Iterator[bytes]:
        """The pieces; a failure once the headers are out can only cut the response short (the
        client sees fewer bytes than Content-Length), so it is logged."""
        try:
            yield from pieces
        except Exception as exc:
            log.warning(
                "download cut short",
                extra={"request_id": self.request_id, "error": str(exc)[:500]},
            )
            raise


def invoice_file(row: dict[str, Any], fmt: str) -> tuple[str, str]:
    """Where the invoice run writes the file (billing_exports.export) in the tenant's folder,
    from the database row, never from the request."""
    return f"{row['period']:%Y-%m}", f"invoice.{fmt}"


def regular_file(path: Path, within: Path) -> tuple[int, datetime] | None:
    """Size and modification time of a regular file that is really under ``within`` (neither
    it nor a folder on the way is a link out of it), else None."""
    try:
        found = path.lstat()
        inside = path.resolve(strict=True).is_relative_to(within.resolve(strict=True))
    except (OSError, RuntimeError):  # missing, unreadable, or a loop of links
        return None
    if not inside or not stat.S_ISREG(found.st_mode):
        return None
    return found.st_size, datetime.fromtimestamp(found.st_mtime, UTC)


@router.get(
    "/invoices", response_model=Page[Invoice], summary="The tenant's invoices, newest first"
)
def list_invoices(
    s: Viewer,
    limit: Limit = 100,
    cursor: Cursor = None,
    status: Annotated[Literal["draft", "final"] | None, Query()] = None,
    period: Period = None,
) -> dict:
    s.tenant()
    after = after_key(cursor, date)
    rows = s.rows(
        f"SELECT {_INVOICE_COLUMNS} FROM invoices"
        " WHERE (%(status)s::text IS NULL OR status = %(status)s)"
        "   AND (%(period)s::date IS NULL OR period = %(period)s)"
        "   AND (%(after)s::date IS NULL OR period < %(after)s)"
        " ORDER BY period DESC LIMIT %(limit)s",
        {
            "status": status,
            "period": billing.parse_period(period) if period else None,
            "after": after[0] if after else None,
            "limit": limit + 1,
        },
    )
    result = page(rows, limit, "period")
    result["items"] = [_invoice(row) for row in result["items"]]
    return result


@router.get(
    "/invoices/{invoice_id}",
    response_model=InvoiceDetail,
    summary="An invoice with its lines and files",
    responses={503: STORE_DOWN},
)
def get_invoice(s: Viewer, invoice_id: InvoiceId, request: Request) -> dict:
    s.tenant()
    row = _invoice_row(s, invoice_id)
    days = (row["period_end"] - row["period_start"]).days
    lines = s.rows(
        "SELECT line_no, kind, description, quantity, unit, unit_price, amount, reason"
        "  FROM invoice_lines WHERE invoice_id = %s ORDER BY line_no",
        (invoice_id,),
    )
    for line in lines:
        line["fraction"] = _fraction(line["kind"], line["unit"], days)
        line["quantity"] = decimal_text(line["quantity"])
        line["unit_price"] = decimal_text(line["unit_price"], 2)
        line["amount"] = str(line["amount"])
    files = []
    folder = TenantFolder(request, s)
    for fmt in FORMATS:
        found = folder.stat(*invoice_file(row, fmt))
        if found:
            url = f"{API_PREFIX}/invoices/{invoice_id}/{fmt}"
            files.append({"format": fmt, "url": url, "size": found[0], "modified": found[1]})
    return {**_invoice(row), "lines": lines, "files": files}


@router.get(
    "/invoices/{invoice_id}/{fmt}",
    response_class=FileResponse,
    summary="The invoice's PDF or XLSX as exported by the invoice run",
    responses={
        200: {"content": {mime: {} for mime in FORMATS.values()}, "description": "The file"},
        503: STORE_DOWN,
    },
)
def invoice_download(s: Viewer, invoice_id: InvoiceId, fmt: Format, request: Request) -> Response:
    s.tenant()
    row = _invoice_row(s, invoice_id)
    folder = TenantFolder(request, s)
    missing = ApiError(
        404,
        f"the {fmt.upper()} of invoice {invoice_id} ({row['period']:%Y-%m}) has not been "
        "exported yet: the nightly invoice run writes it",
        code="not_exported",
    )
    name = f"invoice-{folder.slug}-{row['period']:%Y-%m}.{fmt}"
    return folder.download(invoice_file(row, fmt), FORMATS[fmt], name, missing)


@router.get(
    "/billing/events",
    response_model=Page[BillingEvent],
    summary="The billing event trail, oldest first",
)
def billing_events(
    s: Viewer,
    limit: Limit = 100,
    cursor: Cursor = None,
    period: Period = None,
    kind: Annotated[
        Literal[billing.EVENT_KINDS] | None,  # type: ignore[valid-type]
        Query(description="Only events of this kind."),
    ] = None,
) -> dict:
    s.tenant()
    after = decode(cursor, int)
    rows = s.rows(
        "SELECT event_id, occurred_at, period, kind, actor, before_amount, after_amount, detail"
        "  FROM billing_events"
        " WHERE (%(period)s::date IS NULL OR period = %(period)s)"
        "   AND (%(kind)s::text IS NULL OR kind = %(kind)s)"
        "   AND (%(after)s::bigint IS NULL OR event_id > %(after)s)"
        " ORDER BY event_id LIMIT %(limit)s",
        {
            "period": billing.parse_period(period) if period else None,
            "kind": kind,
            "after": after,
            "limit": limit + 1,
        },
    )
    for row in rows:
        row["period"] = row["period"] and f"{row['period']:%Y-%m}"
        row["before_amount"] = decimal_text(row["before_amount"], 2)
        row["after_amount"] = decimal_text(row["after_amount"], 2)
    return page(rows, limit, "event_id")


def _quota(used: int, included: int) -> dict[str, Any]:
    return {
        "used": used,
        "included": included,
        "percent": round(used * 100 / included, 1) if included else None,
        "over": used > included,
    }


@router.get("/usage", response_model=Usage, summary="This period's usage against the plan's quotas")
def usage(s: Viewer) -> dict:
    tenant_id = s.tenant()
    who = billing.tenant(s.conn, s.tenant_slug or "")
    today = billing.local_today(s.conn, who)
    period = billing.period_containing(today, who.cycle_day)
    plan = billing.plans(s.conn)[who.plan_id]
    now = s.row(
        "SELECT now() AS now,"
        "       (SELECT count(*) FROM devices WHERE tenant_id = %(t)s"
        "           AND status <> 'decommissioned') AS devices,"
        "       (SELECT coalesce(sum(messages), 0)::bigint FROM ingest_usage_tenant_hours"
        "         WHERE tenant_id = %(t)s"
        "           AND hour >= (%(start)s::date)::timestamp AT TIME ZONE %(zone)s) AS messages,"
        "       (SELECT storage_blocked_at IS NOT NULL FROM tenants WHERE tenant_id = %(t)s)"
        "           AS blocked",
        {"t": tenant_id, "start": period.start, "zone": who.timezone},
    )
    latest = s.row(
        "SELECT day, storage_bytes FROM billing_daily_usage WHERE tenant_id = %s"
        " ORDER BY day DESC LIMIT 1",
        (tenant_id,),
    ) or {"day": None, "storage_bytes": 0}
    return {
        "tenant": who.slug,
        "plan_id": plan.plan_id,
        "plan_name": plan.name,
        "over_quota": "blocked" if plan.hard_block else "billed",
        "period": f"{period.label:%Y-%m}",
        "period_start": period.start,
        "period_end": period.end,
        "local_date": today,
        "devices": _quota(now["devices"], plan.included_devices),
        "messages": _quota(now["messages"], plan.included_messages(period.days)),
        "storage": _quota(latest["storage_bytes"], plan.storage_bytes),
        "storage_day": latest["day"],
        "storage_blocked": bool(now["blocked"]),
        "measured_at": now["now"],
    }
