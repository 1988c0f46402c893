"""Invoices, their files, the billing event trail and usage against quota over the tenant API,
against a real `iiot api` and PostgreSQL: two tenants billed by billing.py as the nightly run
bills them, one invoice exported as PDF and XLSX."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from openpyxl import load_workbook

from iiot_orchestration import billing, billing_exports
from iiot_orchestration.api.pagination import encode
from tests.api_helpers import ApiServer, Tenant, assert_envelope, running_api, seed_tenant
from tests.conftest import create_database, drop_database

OCT, NOV = date(2026, 10, 1), date(2026, 11, 1)
# the tenants' local "today" when they were billed: October closed, November open (day 16)
BILLED_ON = date(2026, 11, 16)
CREATED = datetime(2026, 9, 1, 3, tzinfo=UTC)  # local midnight in Sao Paulo
USAGE_HOURS = (datetime(2026, 10, 10, 15, tzinfo=UTC), datetime(2026, 11, 10, 15, tzinfo=UTC))


@dataclass
class Billed:
    server: ApiServer
    url: str
    root: Path
    acme: Tenant
    globex: Tenant
    invoices: dict[tuple[str, date], int]  # (slug, period) -> invoice id


@pytest.fixture(scope="module")
def module_database(pg_server: str, template_database: str) -> Iterator[str]:
    """A migrated database shared by the tests of a module (they only read it)."""
    name = f"iiot_t_{uuid.uuid4().hex[:12]}"
    url = create_database(pg_server, name, template=template_database)
    try:
        yield url
    finally:
        drop_database(pg_server, name)


def backdate(conn: psycopg.Connection, tenant: Tenant) -> billing.Tenant:
    """The tenant created on CREATED, with its devices and plan history, so that it has
    billable periods in the past."""
    conn.execute(
        "UPDATE tenants SET created_at = %s WHERE tenant_id = %s", (CREATED, tenant.tenant_id)
    )
    conn.execute(
        "UPDATE tenant_plan_history SET valid_from = %s WHERE tenant_id = %s",
        (CREATED, tenant.tenant_id),
    )
    conn.execute(
        "UPDATE devices SET created_at = %s WHERE tenant_id = %s", (CREATED, tenant.tenant_id)
    )
    return billing.tenant(conn, tenant.slug)


def seed_usage(conn: psycopg.Connection, tenant: Tenant, hours, messages: int) -> None:
    for hour in hours:
        conn.execute(
            "INSERT INTO ingest_usage (tenant_id, device_id, hour, messages, readings)"
            " VALUES (%s, %s, %s, %s, %s)",
            (tenant.tenant_id, tenant.devices[0], hour, messages, messages * 2),
        )


@pytest.fixture(scope="module")
def billed(module_database, tmp_path_factory) -> Iterator[Billed]:
    root = tmp_path_factory.mktemp("reports")
    invoices = {}
    with psycopg.connect(module_database, autocommit=True) as conn:
        acme = seed_tenant(conn, "acme", octet=1)
        globex = seed_tenant(conn, "globex", octet=2)
        for tenant, messages in ((acme, 1000), (globex, 7)):
            who = backdate(conn, tenant)
            seed_usage(conn, tenant, USAGE_HOURS, messages)
            billing.add_adjustment(
                conn, who, NOV, Decimal("-10.00"), "outage credit", actor="test", today=BILLED_ON
            )
            for label in (OCT, NOV):
                outcome = billing.bill(conn, who, label, actor="test", today=BILLED_ON)
                invoices[(tenant.slug, label)] = outcome.invoice_id
                if tenant is acme and label == OCT:
                    billing_exports.export(root, who, outcome.invoice)
        # messages of the current hour: always in the tenant's current period
        conn.execute(
            "INSERT INTO ingest_usage (tenant_id, device_id, hour, messages, readings)"
            " VALUES (%s, %s, date_trunc('hour', now()), 42, 84)",
            (acme.tenant_id, acme.devices[1]),
        )
    api_dir = tmp_path_factory.mktemp("api")
    with running_api(module_database, api_dir, IIOT_REPORTS_ROOT=str(root)) as server:
        yield Billed(server, module_database, root, acme, globex, invoices)


def get(billed: Billed, path: str, role: str = "viewer", tenant: str = "acme", **params):
    who = billed.acme if tenant == "acme" else billed.globex
    with billed.server.client(who.keys[role]) as client:
        return client.get(path, params=params)


def test_invoices_are_listed_newest_first_with_filters_and_pages(billed):
    response = get(billed, "/api/v1/invoices")
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert [(i["period"], i["status"]) for i in items] == [
        ("2026-11", "draft"),
        ("2026-10", "final"),
    ]
    assert [i["invoice_id"] for i in items] == [
        billed.invoices[("acme", NOV)],
        billed.invoices[("acme", OCT)],
    ]
    october = items[1]
    assert october["period_start"] == "2026-10-01"
    assert october["period_end"] == "2026-11-01"
    assert october["total"] == "790.00"  # pro, 31 of 31 days
    assert len(october["currency"]) == 3
    assert october["finalised_at"]
    assert items[0]["finalised_at"] is None

    first = get(billed, "/api/v1/invoices", limit=1).json()
    assert [i["period"] for i in first["items"]] == ["2026-11"]
    rest = get(billed, "/api/v1/invoices", limit=1, cursor=first["next_cursor"]).json()
    assert [i["period"] for i in rest["items"]] == ["2026-10"]
    assert rest["next_cursor"] is None

    finals = get(billed, "/api/v1/invoices", status="final").json()["items"]
    assert [i["period"] for i in finals] == ["2026-10"]
    by_period = get(billed, "/api/v1/invoices", period="2026-11").json()["items"]
    assert [i["status"] for i in by_period] == ["draft"]
    assert get(billed, "/api/v1/invoices", period="2026-09").json()["items"] == []


def test_an_invoice_has_its_lines_adding_up_on_their_face_and_its_files(billed):
    invoice_id = billed.invoices[("acme", NOV)]
    body = get(billed, f"/api/v1/invoices/{invoice_id}").json()
    assert body["status"] == "draft"
    assert body["days_billed"] == 15
    kinds = [(line["kind"], line["fraction"]) for line in body["lines"]]
    assert kinds == [("base", "1/30"), ("adjustment", "1")]
    base, credit = body["lines"]
    # 790 x 15 / 30 = 395.00: quantity x unit price x fraction = amount
    assert (base["quantity"], base["unit_price"], base["amount"]) == ("15", "790.00", "395.00")
    assert Decimal(base["quantity"]) * Decimal(base["unit_price"]) / 30 == Decimal(base["amount"])
    assert (credit["amount"], credit["reason"]) == ("-10.00", "outage credit")
    assert body["total"] == "385.00"
    assert body["files"] == []  # never exported

    october = get(billed, f"/api/v1/invoices/{billed.invoices[('acme', OCT)]}").json()
    assert [f["format"] for f in october["files"]] == ["pdf", "xlsx"]
    assert october["files"][0]["url"] == f"/api/v1/invoices/{october['invoice_id']}/pdf"


def test_invoice_files_download_as_exported_and_unexported_ones_say_so(billed):
    invoice_id = billed.invoices[("acme", OCT)]
    pdf = get(billed, f"/api/v1/invoices/{invoice_id}/pdf")
    assert pdf.status_code == 200
    assert pdf.headers["content-type"] == "application/pdf"
    assert "invoice-acme-2026-10.pdf" in pdf.headers["content-disposition"]
    exported = billed.root / "acme" / "2026-10"
    assert pdf.content == (exported / "invoice.pdf").read_bytes()
    xlsx = get(billed, f"/api/v1/invoices/{invoice_id}/xlsx")
    assert xlsx.status_code == 200
    assert xlsx.content == (exported / "invoice.xlsx").read_bytes()
    path = billed.root / "downloaded.xlsx"
    path.write_bytes(xlsx.content)
    assert load_workbook(path).active["A1"].value  # a workbook Excel opens

    draft = billed.invoices[("acme", NOV)]
    error = assert_envelope(get(billed, f"/api/v1/invoices/{draft}/pdf"), 404, "not_exported")
    assert "has not been exported yet" in error["message"]
    assert_envelope(get(billed, f"/api/v1/invoices/{invoice_id}/csv"), 422, "validation_error")


def test_another_tenants_invoice_is_not_found_and_never_named(billed):
    theirs = billed.invoices[("globex", OCT)]
    for path in (
        f"/api/v1/invoices/{theirs}",
        f"/api/v1/invoices/{theirs}/pdf",
        f"/api/v1/invoices/{theirs}/xlsx",
    ):
        response = get(billed, path)
        error = assert_envelope(response, 404, "not_found")
        assert error["message"] == f"invoice {theirs} not found"
        assert "globex" not in response.text
    missing = assert_envelope(get(billed, "/api/v1/invoices/999999"), 404, "not_found")
    assert missing["message"] == "invoice 999999 not found"
    listed = get(billed, "/api/v1/invoices", tenant="globex").json()["items"]
    assert {i["invoice_id"] for i in listed} == {
        billed.invoices[("globex", OCT)],
        billed.invoices[("globex", NOV)],
    }


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/invoices/1/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/v1/invoices/1/%2Fetc%2Fpasswd",
        "/api/v1/invoices/..%2F1/pdf",
        "/api/v1/invoices/1%2F..%2F2/pdf",
        "/api/v1/invoices/%2E%2E/pdf",
        "/api/v1/invoices/1/pdf%00.txt",
    ],
)
def test_invoice_downloads_take_no_path_from_the_request(billed, path):
    assert_no_file(get(billed, path))


def assert_no_file(response) -> None:
    """A 404 or 422 in the error envelope, never a PDF or XLSX (a ZIP) file."""
    assert response.status_code in (404, 422), response.text
    assert response.json()["error"]["code"] in ("not_found", "validation_error")
    assert not response.content.startswith((b"%PDF", b"PK"))


def test_the_billing_event_trail_pages_oldest_first_with_filters(billed):
    events = []
    cursor = None
    while True:
        body = get(
            billed, "/api/v1/billing/events", limit=2, **({"cursor": cursor} if cursor else {})
        )
        assert body.status_code == 200, body.text
        events += body.json()["items"]
        cursor = body.json()["next_cursor"]
        if cursor is None:
            break
    ids = [e["event_id"] for e in events]
    assert ids == sorted(set(ids))
    kinds = {e["kind"] for e in events}
    assert {"adjustment_added", "invoice_finalised", "draft_computed"} <= kinds
    finalised = next(e for e in events if e["kind"] == "invoice_finalised")
    assert (finalised["period"], finalised["after_amount"]) == ("2026-10", "790.00")
    adjustment = next(e for e in events if e["kind"] == "adjustment_added")
    assert adjustment["period"] == "2026-11"
    assert adjustment["actor"] == "test"

    only = get(billed, "/api/v1/billing/events", kind="invoice_finalised", period="2026-10")
    assert [e["event_id"] for e in only.json()["items"]] == [finalised["event_id"]]
    theirs = get(billed, "/api/v1/billing/events", tenant="globex").json()["items"]
    assert not {e["event_id"] for e in theirs} & set(ids)
    assert_envelope(get(billed, "/api/v1/billing/events", kind="bogus"), 422, "validation_error")


def test_usage_against_the_plans_quotas(billed):
    with psycopg.connect(billed.url) as conn:
        who = billing.tenant(conn, "acme")
        today = billing.local_today(conn, who)
        plan = billing.plans(conn)["pro"]
        latest = conn.execute(
            "SELECT day, storage_bytes FROM billing_daily_usage WHERE tenant_id = %s"
            " ORDER BY day DESC LIMIT 1",
            (who.tenant_id,),
        ).fetchone()
    period = billing.period_containing(today, who.cycle_day)
    response = get(billed, "/api/v1/usage")
    assert response.status_code == 200, response.text
    usage = response.json()
    assert usage["tenant"] == "acme"
    assert (usage["plan_id"], usage["over_quota"]) == ("pro", "blocked")
    assert usage["period"] == f"{period.label:%Y-%m}"
    assert usage["local_date"] == today.isoformat()
    assert usage["devices"] == {
        "used": 2,
        "included": plan.included_devices,
        "percent": round(200 / plan.included_devices, 1),
        "over": False,
    }
    assert usage["messages"]["used"] == 42  # the current hour's; October's and November's are past
    assert usage["messages"]["included"] == plan.included_messages(period.days)
    # the storage estimate of the latest billed day: November 15 (billed on the 16th)
    assert latest[0] == date(2026, 11, 15)
    assert latest[1] > 0
    assert usage["storage_day"] == "2026-11-15"
    assert usage["storage"]["used"] == latest[1]
    assert usage["storage"]["included"] == plan.storage_bytes
    assert usage["storage_blocked"] is False
    assert get(billed, "/api/v1/usage", tenant="globex").json()["messages"]["used"] == 0


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        ("/api/v1/invoices", {"status": "paid"}, 422, "validation_error"),
        ("/api/v1/invoices", {"period": "2026-13"}, 422, "validation_error"),
        ("/api/v1/invoices", {"period": "0000-01"}, 422, "validation_error"),
        ("/api/v1/billing/events", {"period": "0999-12"}, 422, "validation_error"),
        # fullwidth digits are digits to a regular expression's \d
        ("/api/v1/invoices", {"period": "\uff12\uff10\uff12\uff16-10"}, 422, "validation_error"),
        ("/api/v1/invoices", {"cursor": "not-a-cursor"}, 400, "bad_cursor"),
        ("/api/v1/invoices", {"cursor": encode("2026-99-99")}, 400, "bad_cursor"),
        ("/api/v1/invoices", {"cursor": encode("2026-10-01\x00")}, 400, "bad_cursor"),
        ("/api/v1/invoices", {"limit": 0}, 422, "validation_error"),
        ("/api/v1/invoices/abc", {}, 422, "validation_error"),
        ("/api/v1/invoices/0", {}, 422, "validation_error"),
        ("/api/v1/billing/events", {"cursor": "IjEi"}, 400, "bad_cursor"),
    ],
)
def test_malformed_billing_requests_get_the_envelope(billed, path, params, status, code):
    assert_envelope(get(billed, path, **params), status, code)


def test_every_role_reads_billing_and_no_key_reads_nothing(billed):
    invoice_id = billed.invoices[("acme", OCT)]
    for role in ("viewer", "editor", "admin"):
        for path in ("/api/v1/invoices", f"/api/v1/invoices/{invoice_id}", "/api/v1/usage"):
            assert get(billed, path, role=role).status_code == 200, (role, path)
    with billed.server.client() as anonymous:
        for path in ("/api/v1/invoices", f"/api/v1/invoices/{invoice_id}/pdf", "/api/v1/usage"):
            assert_envelope(anonymous.get(path), 401, "unauthenticated")


def test_consumption_and_reports_before_the_marts_are_built_say_so(billed):
    """This module's database never built the marts: their tenant views do not exist."""
    for path in (
        "/api/v1/consumption/daily",
        "/api/v1/consumption/monthly",
        "/api/v1/consumption/comparison",
    ):
        error = assert_envelope(get(billed, path), 409, "marts_not_built")
        assert "marts" in error["message"]
    with billed.server.client(billed.acme.keys["editor"]) as client:
        response = client.post("/api/v1/reports", json={"period": "2026-11"})
    assert_envelope(response, 409, "marts_not_built")
    listed = get(billed, "/api/v1/reports")  # files only: none yet, and no error
    assert listed.json() == {"items": [], "next_cursor": None}
