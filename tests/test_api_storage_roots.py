"""Report and invoice downloads over the tenant API when IIOT_REPORTS_ROOT is on object storage:
a real `iiot api` against a local S3 endpoint (moto in server mode, as tests/test_storage_roots.py
runs it), the files written by the project's own writers (make_reports, billing_exports.export),
listed and downloaded through the API, kept from another tenant, and a 503 once the endpoint
stops."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime

import psycopg
import pytest

pytest.importorskip("s3fs", reason="s3fs is not installed: the archive-s3 extra (S3 storage roots)")
moto_server = pytest.importorskip(
    "moto.server", reason="moto[server] is not installed: the local S3 endpoint of these tests"
)

from iiot_orchestration import billing, billing_exports, filestore  # noqa: E402
from iiot_orchestration.api import keys  # noqa: E402
from iiot_orchestration.reports import make_reports, parse_period  # noqa: E402
from iiot_orchestration.services import free_port  # noqa: E402
from tests.api_helpers import ApiServer, Tenant, assert_envelope, running_api  # noqa: E402
from tests.test_api_billing import BILLED_ON, NOV, OCT, assert_no_file, backdate  # noqa: E402
from tests.test_reports import NOW, OCTOBER, report_db  # noqa: E402, F401 (a fixture)
from tests.test_storage_roots import S3, s3  # noqa: E402, F401 (a fixture)

XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


@dataclass
class Served:
    server: ApiServer
    root: str  # s3://iiot/api-<random>
    store: filestore.FsspecStore
    keys: dict[str, str]  # tenant -> viewer key
    invoices: dict[tuple[str, date], int]  # (tenant, period) -> invoice id

    def get(self, path: str, tenant: str = "acme", **params):
        with self.server.client(self.keys[tenant]) as client:
            return client.get(path, params=params)


def write_files(conn: psycopg.Connection, root: str) -> tuple[dict[str, str], dict]:
    """acme: October's report (PDF and XLSX), week 40's PDF, October's invoice files and a
    November draft never exported; beta: September's report and October's invoice files. Every
    file is written by the project's writers; a viewer key per tenant."""
    make_reports(conn, "acme", parse_period(OCTOBER), root, now=NOW)
    make_reports(conn, "acme", parse_period("2026-W40"), root, ["pdf"], now=NOW)
    make_reports(conn, "beta", parse_period("2026-09"), root, now=NOW)
    invoices, viewers = {}, {}
    for slug in ("acme", "beta"):
        tenant_id = billing.tenant(conn, slug).tenant_id
        who = backdate(conn, Tenant(slug, tenant_id))
        for label in (OCT, NOV):
            outcome = billing.bill(conn, who, label, actor="test", today=BILLED_ON)
            invoices[(slug, label)] = outcome.invoice_id
            if label == OCT:
                billing_exports.export(root, who, outcome.invoice)
        viewers[slug] = keys.create(
            conn, tenant=slug, role="viewer", name=f"{slug} viewer", actor="test"
        ).key
    return viewers, invoices


@pytest.fixture(scope="module")
def served(s3: S3, report_db, tmp_path_factory) -> Iterator[Served]:  # noqa: F811
    root = s3.root("api")
    with psycopg.connect(report_db.url, autocommit=True) as conn:
        viewers, invoices = write_files(conn, root)
    store = filestore.open_root(root, "IIOT_REPORTS_ROOT")
    # what is no report of acme's: a folder that is no period, an invoice beside a report
    store.write_atomic("acme/notes/consumption.pdf", [b"%PDF-1.4 not a report"])
    store.write_atomic("acme/2026-10-01..2026-10-01/consumption.pdf", [b"%PDF-1.4 no period"])
    api = tmp_path_factory.mktemp("api")
    with running_api(report_db.url, api, IIOT_REPORTS_ROOT=root) as server:
        yield Served(server, root, store, viewers, invoices)


def test_the_store_stats_lists_and_streams_files_locally_and_on_s3(s3, tmp_path):  # noqa: F811
    for root in (str(tmp_path), s3.root("store")):
        store = filestore.open_root(root, "IIOT_REPORTS_ROOT")
        store.write_atomic("t/2026-10/a.pdf", [b"x" * 2500])
        store.write_atomic("t/b.txt", [b"yz"])
        store.write_atomic("u/c.txt", [b"other"])
        size, modified = store.stat("t/2026-10/a.pdf")
        assert size == 2500
        assert modified.tzinfo is not None
        assert store.stat("t/2026-10") is None  # a folder
        assert store.stat("t/missing.pdf") is None
        listed = store.files("t")
        assert sorted(listed) == ["t/2026-10/a.pdf", "t/b.txt"], root
        assert listed["t/b.txt"][0] == 2
        assert store.files("nothing") == {}
        length, pieces = store.stream("t/2026-10/a.pdf", size=1000)
        assert length == 2500
        assert [len(p) for p in pieces] == [1000, 1000, 500]
        with pytest.raises(FileNotFoundError):
            store.stream("t/missing.pdf")


def test_reports_on_s3_are_listed_and_download_as_written(served):
    response = served.get("/api/v1/reports")
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert [(f["period"], f["kind"], f["format"]) for f in items] == [
        ("2026-W40", "week", "pdf"),
        ("2026-10", "month", "pdf"),
        ("2026-10", "month", "xlsx"),
    ]
    for item in items:
        key = f"acme/{item['period']}/consumption.{item['format']}"
        size, modified = served.store.stat(key)
        assert item["size"] == size
        assert datetime.fromisoformat(item["modified"]) == modified
        download = served.get(item["url"])
        assert download.status_code == 200, download.text
        assert download.content == served.store.read_bytes(key)
        assert download.headers["content-length"] == str(size)
    xlsx = served.get("/api/v1/reports/2026-10/xlsx")
    assert xlsx.headers["content-type"] == XLSX
    assert xlsx.headers["content-disposition"] == (
        'attachment; filename="consumption-acme-2026-10.xlsx"'
    )
    assert served.get("/api/v1/reports/2026-W40/pdf").headers["content-type"] == "application/pdf"
    paged = served.get("/api/v1/reports", limit=1, format="pdf").json()
    assert [f["period"] for f in paged["items"]] == ["2026-W40"]
    assert paged["next_cursor"]


def test_invoice_files_on_s3_are_listed_and_download_as_written(served):
    invoice_id = served.invoices[("acme", OCT)]
    detail = served.get(f"/api/v1/invoices/{invoice_id}")
    assert detail.status_code == 200, detail.text
    files = detail.json()["files"]
    assert [f["format"] for f in files] == ["pdf", "xlsx"]
    for file in files:
        key = f"acme/2026-10/invoice.{file['format']}"
        assert file["size"] == served.store.stat(key)[0]
        download = served.get(file["url"])
        assert download.status_code == 200, download.text
        assert download.content == served.store.read_bytes(key)
        assert download.headers["content-length"] == str(file["size"])
        assert download.headers["content-disposition"] == (
            f'attachment; filename="invoice-acme-2026-10.{file["format"]}"'
        )
    assert served.get(files[0]["url"]).headers["content-type"] == "application/pdf"
    assert served.get(files[1]["url"]).headers["content-type"] == XLSX


def test_another_tenant_neither_lists_nor_downloads_them(served):
    listed = served.get("/api/v1/reports", tenant="beta").json()["items"]
    assert [(f["period"], f["format"]) for f in listed] == [("2026-09", "pdf"), ("2026-09", "xlsx")]
    # acme's October report, and a period neither has: the same answer
    theirs = served.get("/api/v1/reports/2026-10/pdf", tenant="beta")
    nobodys = served.get("/api/v1/reports/2026-08/pdf", tenant="beta")
    assert assert_envelope(theirs, 404, "not_found")["message"] == "PDF report of 2026-10 not found"
    missing = assert_envelope(nobodys, 404, "not_found")["message"]
    assert missing == "PDF report of 2026-08 not found"
    assert "acme" not in theirs.text
    acme_invoice = served.invoices[("acme", OCT)]
    for path in (f"/api/v1/invoices/{acme_invoice}", f"/api/v1/invoices/{acme_invoice}/pdf"):
        response = served.get(path, tenant="beta")
        error = assert_envelope(response, 404, "not_found")
        assert error["message"] == f"invoice {acme_invoice} not found"
        assert "acme" not in response.text
    own = served.get(f"/api/v1/invoices/{served.invoices[('beta', OCT)]}/xlsx", tenant="beta")
    assert own.content == served.store.read_bytes("beta/2026-10/invoice.xlsx")


def test_missing_files_are_not_found(served):
    error = assert_envelope(served.get("/api/v1/reports/2026-W40/xlsx"), 404, "not_found")
    assert error["message"] == "XLSX report of 2026-W40 not found"
    assert_envelope(served.get("/api/v1/reports/2026-09/pdf"), 404, "not_found")  # beta's has one
    draft = served.invoices[("acme", NOV)]
    error = assert_envelope(served.get(f"/api/v1/invoices/{draft}/pdf"), 404, "not_exported")
    assert "has not been exported yet" in error["message"]
    assert served.get(f"/api/v1/invoices/{draft}").json()["files"] == []


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/reports/..%2Fbeta%2F2026-09/pdf",
        "/api/v1/reports/..%252Fbeta%252F2026-09/pdf",
        "/api/v1/reports/%2E%2E/pdf",
        "/api/v1/reports/2026-10%2F..%2F..%2Fbeta%2F2026-09/pdf",
        "/api/v1/reports/2026-10/..%2F..%2Fbeta%2F2026-09%2Fconsumption.pdf",
        "/api/v1/reports/2026-10%00/pdf",
        "/api/v1/reports/notes/pdf",
        "/api/v1/reports/2026-10-01..2026-10-01/pdf",
        "/api/v1/reports/2026-10/PDF",
        "/api/v1/invoices/1/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/v1/invoices/..%2F1/pdf",
        "/api/v1/invoices/1/pdf%00.txt",
    ],
)
def test_hostile_periods_and_formats_are_refused(served, path):
    assert_no_file(served.get(path))


def test_a_stopped_endpoint_is_a_503_that_names_no_bucket(
    served,
    report_db,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    """An endpoint of its own (the module's serves the other tests), stopped while the API
    serves from it."""
    import boto3
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    endpoint = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    endpoint.start()
    stopped = False
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    s3fs.S3FileSystem.clear_instance_cache()  # the instance of the module's endpoint
    try:
        boto3.client("s3").create_bucket(Bucket="private-bucket")
        root = "s3://private-bucket/tenants"
        with psycopg.connect(report_db.url, autocommit=True) as conn:
            make_reports(conn, "acme", parse_period(OCTOBER), root, ["pdf"], now=NOW)
            who = billing.tenant(conn, "acme")
            october = billing.bill(conn, who, OCT, actor="test", today=BILLED_ON)  # unchanged
            billing_exports.export(root, who, october.invoice)
        invoice_id = october.invoice_id
        with (
            running_api(report_db.url, tmp_path, IIOT_REPORTS_ROOT=root) as server,
            server.client(served.keys["acme"]) as client,
        ):
            assert client.get(f"/api/v1/invoices/{invoice_id}/pdf").status_code == 200
            endpoint.stop()
            stopped = True
            for path in (
                f"/api/v1/invoices/{invoice_id}/pdf",
                f"/api/v1/invoices/{invoice_id}",
                "/api/v1/reports/2026-10/pdf",
                "/api/v1/reports",
            ):
                response = client.get(path)
                error = assert_envelope(response, 503, "unavailable")
                assert "cannot be reached" in error["message"]
                assert response.headers["retry-after"] == "5"
                for secret in ("private-bucket", "tenants", str(port), "s3://", "acme/"):
                    assert secret not in error["message"], path
                logged = [
                    line
                    for line in server.output().splitlines()
                    if error["request_id"] in line and "reports store failed" in line
                ]
                assert logged, server.output()[-2000:]
    finally:
        if not stopped:
            endpoint.stop()
        s3fs.S3FileSystem.clear_instance_cache()  # the dead endpoint's instance
