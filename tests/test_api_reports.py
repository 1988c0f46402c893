"""Consumption from the marts, report files and on-demand reports over the tenant API, against a
real `iiot api`, PostgreSQL with the dbt marts built (once for the module) and, for the
on-demand run, a real `dagster-webserver` that launches it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import httpx
import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from assets.marts import dbt_resource, marts  # before any other dagster_dbt import
from assets.rollups import telemetry_daily, telemetry_hourly
from iiot_orchestration.api.pagination import encode
from iiot_orchestration.api.routes.reports import REPORT_JOB
from iiot_orchestration.partitions import TENANTS, tenant_key
from iiot_orchestration.reports import make_reports, parse_period
from iiot_orchestration.reports.units import to_resolution
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.services import free_port
from sensors.reports import consumption_reports_job
from tests.api_helpers import ApiServer, Tenant, assert_envelope, running_api, seed_tenant
from tests.conftest import REPO_ROOT
from tests.test_api_billing import assert_no_file, module_database  # noqa: F401 (a fixture)

# seed_tenant's readings: 2026-11-02 00:00 to 05:45 UTC, local 2026-11-01 21:00 to 02:45
SEED_DAY = "2026-11-02"
WEBSERVER_TIMEOUT_S = 120
RUN_TIMEOUT_S = 180


@dataclass
class Marts:
    server: ApiServer
    url: str
    root: Path
    acme: Tenant
    globex: Tenant


def build_marts(url: str) -> None:
    resources = {"postgres": PostgresResource(database_url=url)}
    rolled = dg.materialize(
        [telemetry_hourly, telemetry_daily],
        tags={
            "dagster/asset_partition_range_start": SEED_DAY,
            "dagster/asset_partition_range_end": SEED_DAY,
        },
        resources=resources,
    )
    assert rolled.success
    assert dg.materialize([marts], resources={**resources, "dbt": dbt_resource()}).success


@pytest.fixture(scope="module")
def built(module_database, tmp_path_factory) -> Iterator[Marts]:  # noqa: F811
    """Two tenants' readings in the marts; acme's November and week 45 reports, globex's
    October; an API whose Dagster webserver does not answer."""
    root = tmp_path_factory.mktemp("reports")
    with psycopg.connect(module_database, autocommit=True) as conn:
        acme = seed_tenant(conn, "acme", octet=1)
        globex = seed_tenant(conn, "globex", octet=2, devices=1)
        build_marts(module_database)
        make_reports(conn, "acme", parse_period("2026-11"), root)
        make_reports(conn, "acme", parse_period("2026-W45"), root, ["pdf"])
        make_reports(conn, "globex", parse_period("2026-10"), root)
    # what is not a report of acme's: a folder that is no period, an invoice, a link to globex's
    (root / "acme" / "notes").mkdir()
    (root / "acme" / "notes" / "consumption.pdf").write_bytes(b"%PDF-1.4 not a report")
    (root / "acme" / "2026-11" / "invoice.pdf").write_bytes(b"%PDF-1.4 an invoice")
    (root / "acme" / "2026-09").symlink_to(root / "globex" / "2026-10", target_is_directory=True)
    (root / "acme" / "2026-08").mkdir()
    (root / "acme" / "2026-08" / "consumption.pdf").symlink_to(
        root / "globex" / "2026-10" / "consumption.pdf"
    )
    env = {"IIOT_REPORTS_ROOT": str(root), "IIOT_DAGSTER_PORT": str(free_port())}
    with running_api(module_database, tmp_path_factory.mktemp("api"), **env) as server:
        yield Marts(server, module_database, root, acme, globex)


def get(built: Marts, path: str, role: str = "viewer", tenant: str = "acme", **params):
    who = built.acme if tenant == "acme" else built.globex
    with built.server.client(who.keys[role]) as client:
        return client.get(path, params=params)


def every_page(built: Marts, path: str, **params) -> list[dict]:
    items, cursor = [], None
    while True:
        response = get(built, path, **params, **({"cursor": cursor} if cursor else {}))
        assert response.status_code == 200, response.text
        items += response.json()["items"]
        cursor = response.json()["next_cursor"]
        if cursor is None:
            return items


def mart(built: Marts, name: str, tenant: Tenant, order: str) -> list[dict]:
    with psycopg.connect(built.url) as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            f"SELECT * FROM marts.{name} WHERE tenant_id = %s ORDER BY {order}",
            (tenant.tenant_id,),
        ).fetchall()


def test_daily_consumption_per_device_and_local_day(built):
    rows = mart(built, "consumption_daily", built.acme, "local_day, device_id, unit")
    expected = [
        {
            "local_day": r["local_day"].isoformat(),
            "device_id": r["device_id"],
            "unit": r["unit"],
            "consumption": to_resolution(r["consumption"], r["unit"]),
            "readings": r["readings"],
            "hours_with_data": r["hours_with_data"],
            "counter_resets": r["counter_resets"],
        }
        for r in rows
    ]
    # local Nov 1 (21:00 to 23:45) and Nov 2 (00:00 to 02:45) for each of the two meters
    assert [(r["local_day"], r["device_id"]) for r in expected] == [
        ("2026-11-01", built.acme.devices[0]),
        ("2026-11-01", built.acme.devices[1]),
        ("2026-11-02", built.acme.devices[0]),
        ("2026-11-02", built.acme.devices[1]),
    ]
    # 24 readings 0.25 kWh apart: 23 increases
    assert sum(r["consumption"] for r in expected) == pytest.approx(2 * 23 * 0.25)
    assert every_page(built, "/api/v1/consumption/daily") == expected
    assert every_page(built, "/api/v1/consumption/daily", limit=1) == expected

    device = built.acme.devices[1]
    one = every_page(built, "/api/v1/consumption/daily", device_id=device, **{"from": "2026-11-02"})
    assert one == [r for r in expected if r["device_id"] == device and r["local_day"] == SEED_DAY]
    upto = every_page(built, "/api/v1/consumption/daily", to="2026-11-01", unit="kWh")
    assert upto == expected[:2]
    assert every_page(built, "/api/v1/consumption/daily", unit="m3") == []
    # another tenant's device is filtered out like one that does not exist
    theirs = built.globex.devices[0]
    assert every_page(built, "/api/v1/consumption/daily", device_id=theirs) == []


def test_monthly_consumption_and_the_device_comparison(built):
    monthly = every_page(built, "/api/v1/consumption/monthly", limit=1)
    assert [(m["local_month"], m["device_id"]) for m in monthly] == [
        ("2026-11", built.acme.devices[0]),
        ("2026-11", built.acme.devices[1]),
    ]
    assert [m["days_with_data"] for m in monthly] == [2, 2]
    assert [m["hours_with_data"] for m in monthly] == [6, 6]
    assert [m["consumption"] for m in monthly] == [5.75, 5.75]
    assert every_page(built, "/api/v1/consumption/monthly", **{"from": "2026-12"}) == []
    assert len(every_page(built, "/api/v1/consumption/monthly", to="2026-11")) == 2

    comparison = every_page(built, "/api/v1/consumption/comparison", month="2026-11", limit=1)
    rows = mart(built, "device_comparison", built.acme, "local_month, unit, rank_in_tenant")
    assert [(c["device_id"], c["rank_in_tenant"]) for c in comparison] == [
        (r["device_id"], r["rank_in_tenant"]) for r in rows
    ]
    first = comparison[0]
    assert first["devices_in_tenant"] == 2
    assert first["tenant_consumption"] == 11.5
    assert first["share_of_tenant"] == 0.5
    assert first["previous_month_consumption"] is None
    assert every_page(built, "/api/v1/consumption/comparison", month="2026-10") == []
    globex = every_page(built, "/api/v1/consumption/comparison", tenant="globex")
    assert [c["device_id"] for c in globex] == built.globex.devices


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        ("/api/v1/consumption/daily", {"from": "2026-11-31"}, 422, "validation_error"),
        # a number is no date (pydantic's lax mode took it for a Unix timestamp: 1970-01-01)
        ("/api/v1/consumption/daily", {"to": "0"}, 422, "validation_error"),
        ("/api/v1/consumption/daily", {"from": "1767225600"}, 422, "validation_error"),
        ("/api/v1/consumption/daily", {"device_id": "x"}, 422, "validation_error"),
        ("/api/v1/consumption/daily", {"device_id": 2**40}, 422, "validation_error"),
        ("/api/v1/consumption/daily", {"unit": "W"}, 422, "validation_error"),
        (
            "/api/v1/consumption/daily",
            {"cursor": encode(["2026-11-99", 1, "kWh"])},
            400,
            "bad_cursor",
        ),
        (
            "/api/v1/consumption/daily",
            {"cursor": encode(["2026-11-01", "1", "kWh"])},
            400,
            "bad_cursor",
        ),
        ("/api/v1/consumption/monthly", {"from": "2026-1"}, 422, "validation_error"),
        ("/api/v1/consumption/monthly", {"to": "2026-00"}, 422, "validation_error"),
        ("/api/v1/consumption/monthly", {"to": "0000-01"}, 422, "validation_error"),
        ("/api/v1/consumption/comparison", {"month": "2026-11-01"}, 422, "validation_error"),
        (
            "/api/v1/consumption/comparison",
            {"cursor": encode(["x", "kWh", 1, 1])},
            400,
            "bad_cursor",
        ),
    ],
)
def test_malformed_consumption_requests_get_the_envelope(built, path, params, status, code):
    assert_envelope(get(built, path, **params), status, code)


def test_report_files_are_listed_with_filters_and_pages(built):
    files = every_page(built, "/api/v1/reports")
    assert [(f["period"], f["kind"], f["format"]) for f in files] == [
        ("2026-W45", "week", "pdf"),
        ("2026-11", "month", "pdf"),
        ("2026-11", "month", "xlsx"),
    ]
    pdf = built.root / "acme" / "2026-11" / "consumption.pdf"
    assert files[1]["size"] == pdf.stat().st_size
    assert files[1]["url"] == "/api/v1/reports/2026-11/pdf"
    assert files[1]["modified"].endswith(("Z", "+00:00"))
    assert every_page(built, "/api/v1/reports", limit=1) == files
    assert every_page(built, "/api/v1/reports", format="xlsx") == files[2:]
    assert every_page(built, "/api/v1/reports", kind="week") == files[:1]
    globex = every_page(built, "/api/v1/reports", tenant="globex")
    assert [(f["period"], f["format"]) for f in globex] == [("2026-10", "pdf"), ("2026-10", "xlsx")]


def test_a_report_downloads_as_written(built):
    response = get(built, "/api/v1/reports/2026-11/xlsx")
    assert response.status_code == 200
    assert response.headers["content-type"] == (
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    )
    assert 'filename="consumption-acme-2026-11.xlsx"' in response.headers["content-disposition"]
    assert response.content == (built.root / "acme" / "2026-11" / "consumption.xlsx").read_bytes()
    week = get(built, "/api/v1/reports/2026-W45/pdf", role="admin")
    assert week.content.startswith(b"%PDF")
    error = assert_envelope(get(built, "/api/v1/reports/2026-W45/xlsx"), 404, "not_found")
    assert error["message"] == "XLSX report of 2026-W45 not found"


@pytest.mark.parametrize("period", ["2026-10", "2026-09", "2026-08"])
def test_another_tenants_report_is_not_found_even_through_a_link(built, period):
    """globex has 2026-10; acme's 2026-09 folder and 2026-08 file are links to it."""
    response = get(built, f"/api/v1/reports/{period}/pdf")
    error = assert_envelope(response, 404, "not_found")
    assert "globex" not in error["message"]
    assert not response.content.startswith(b"%PDF")


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/reports/..%2F..%2Fglobex%2F2026-10/pdf",
        "/api/v1/reports/..%2Fglobex%2F2026-10/pdf",
        "/api/v1/reports/..%252F..%252Fglobex%252F2026-10/pdf",
        "/api/v1/reports/%2E%2E/pdf",
        "/api/v1/reports/..%5C..%5Cglobex%5C2026-10/pdf",
        "/api/v1/reports/%2Fetc%2Fpasswd/pdf",
        "/api/v1/reports/%2F" + "..%2F" * 8 + "etc%2Fpasswd/pdf",
        "/api/v1/reports/2026-10%2F..%2F..%2Fglobex%2F2026-10/pdf",
        "/api/v1/reports/2026-11/..%2F..%2F..%2Fglobex%2F2026-10%2Fconsumption.pdf",
        "/api/v1/reports/2026-11/pdf%2F..%2F..%2Fnotes",
        "/api/v1/reports/2026-11%00/pdf",
        "/api/v1/reports/notes/pdf",
        "/api/v1/reports/2026-13/pdf",
        "/api/v1/reports/2026-10-01..2026-10-01/pdf",
        "/api/v1/reports/2026-10-01..%2F..%2Fglobex/pdf",
        "/api/v1/reports/2026-11/PDF",
    ],
)
def test_report_downloads_take_no_path_from_the_request(built, path):
    assert_no_file(get(built, path))


def test_asking_for_a_report_needs_an_editor_and_a_valid_past_month(built):
    with built.server.client(built.acme.keys["viewer"]) as client:
        response = client.post("/api/v1/reports", json={"period": "2026-11"})
    assert_envelope(response, 403, "forbidden")
    with built.server.client(built.acme.keys["editor"]) as client:
        for body in (
            {},
            {"period": "2026-13"},
            {"period": "2026-11-01"},
            {"period": "2026-W45"},
            {"period": "../2026-11"},
            {"period": 202611},
            {"period": "1900-01"},
            {"period": "2999-01"},  # has not started
        ):
            assert_envelope(client.post("/api/v1/reports", json=body), 422, "validation_error")
        response = client.post("/api/v1/reports", content=b"period=2026-11")
        assert_envelope(response, 422, "validation_error")


def test_an_unreachable_dagster_is_a_clear_503(built):
    for role in ("editor", "admin"):
        with built.server.client(built.acme.keys[role]) as client:
            response = client.post("/api/v1/reports", json={"period": "2026-11"})
        error = assert_envelope(response, 503, "dagster_unavailable")
        assert "Dagster is unavailable" in error["message"]
        assert "IIOT_DAGSTER_PORT" in error["message"]
    with psycopg.connect(built.url) as conn:
        launched = conn.execute(
            "SELECT count(*) FROM audit_log"
            " WHERE action = 'report.requested' AND detail ->> 'period' = '2026-11'"
        ).fetchone()[0]
    assert launched == 0


def test_another_tenants_run_is_not_found_before_dagster_is_asked(built):
    """globex's run is recorded; for acme it does not exist (404, even with Dagster down),
    for globex it does (so Dagster is asked: 503 here)."""
    run_id = str(uuid.uuid4())
    with psycopg.connect(built.url) as conn:
        conn.execute(
            "INSERT INTO audit_log (actor, tenant_id, action, entity, entity_id, detail)"
            " VALUES ('test', %s, 'report.requested', 'report_run', %s, %s)",
            (built.globex.tenant_id, run_id, Jsonb({"period": "2026-10"})),
        )
    response = get(built, f"/api/v1/reports/runs/{run_id}")
    error = assert_envelope(response, 404, "not_found")
    assert error["message"] == f"report run {run_id} not found"
    assert "globex" not in response.text
    assert_envelope(get(built, f"/api/v1/reports/runs/{uuid.uuid4()}"), 404, "not_found")
    assert_envelope(
        get(built, f"/api/v1/reports/runs/{run_id}", tenant="globex"), 503, "dagster_unavailable"
    )
    assert_envelope(get(built, "/api/v1/reports/runs/not-a-run"), 422, "validation_error")


def test_the_job_and_partition_key_are_the_code_locations():
    assert consumption_reports_job.name == REPORT_JOB
    assert str(tenant_key("2026-10-01", "acme")) == "2026-10-01|acme"


@contextmanager
def dagster_webserver(database_url: str, reports_root: Path, home: Path) -> Iterator[int]:
    """`dagster-webserver` of the project's workspace on a free port: runs launched through it
    start at once (DefaultRunCoordinator, no daemon) in a subprocess of their own."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(
        "run_coordinator:\n"
        "  module: dagster._core.run_coordinator\n"
        "  class: DefaultRunCoordinator\n"
        "telemetry:\n"
        "  enabled: false\n"
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(
        DAGSTER_HOME=str(home),
        IIOT_DATABASE_URL=database_url,
        IIOT_REPORTS_ROOT=str(reports_root),
        IIOT_PARTITIONS_START="2026-01-01",
        IIOT_RETRY_MAX="0",
    )
    log = home / "webserver.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "dagster-webserver"),
                *("-h", "127.0.0.1", "-p", str(port), "-w", str(REPO_ROOT / "workspace.yaml")),
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its code server and run workers stop with it
        )
    # the tenants' partitions, as tenant_partitions_sensor adds them within a minute of each
    # tenant's creation (a run of a tenant that is not a partition yet fails)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(TENANTS, ["acme", "globex"])
    query = "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus } } } }"
    try:
        deadline = time.monotonic() + WEBSERVER_TIMEOUT_S
        while True:
            assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            try:
                body = httpx.post(
                    f"http://127.0.0.1:{port}/graphql", json={"query": query}, timeout=5
                ).json()
                entries = body["data"]["workspaceOrError"]["locationEntries"]
                if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                    break
            except (httpx.HTTPError, KeyError, TypeError, ValueError):
                pass
            time.sleep(0.5)
        yield port
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_tags(port: int, run_id: str) -> dict[str, str]:
    query = "query($id: ID!) { runOrError(runId: $id) { ... on Run { tags { key value } } } }"
    body = httpx.post(
        f"http://127.0.0.1:{port}/graphql",
        json={"query": query, "variables": {"id": run_id}},
        timeout=30,
    ).json()
    return {t["key"]: t["value"] for t in body["data"]["runOrError"]["tags"]}


def test_an_on_demand_report_is_a_dagster_run_the_tenant_polls(built, tmp_path):
    root = tmp_path / "reports"
    with (
        dagster_webserver(built.url, root, tmp_path / "dagster_home") as port,
        running_api(
            built.url, tmp_path, IIOT_REPORTS_ROOT=str(root), IIOT_DAGSTER_PORT=str(port)
        ) as server,
        server.client(built.acme.keys["editor"]) as editor,
        server.client(built.globex.keys["admin"]) as other,
    ):
        response = editor.post("/api/v1/reports", json={"period": "2026-10"})
        assert response.status_code == 202, response.text
        run = response.json()
        run_id = run["run_id"]
        assert response.headers["location"] == f"/api/v1/reports/runs/{run_id}"
        assert (run["period"], run["status"], run["already_requested"]) == (
            "2026-10",
            "queued",
            False,
        )
        assert run["requested_by"] == f"api-key:{built.acme.key_ids['editor']}"
        tags = run_tags(port, run_id)
        assert tags["dagster/partition"] == "2026-10-01|acme"
        assert tags["iiot/tenant"] == "acme"
        assert tags["iiot/requested_by"] == run["requested_by"]

        # asked again while it runs: the same run, not a second one
        again = editor.post("/api/v1/reports", json={"period": "2026-10"}).json()
        if again["status"] in ("queued", "running"):
            assert (again["run_id"], again["already_requested"]) == (run_id, True)

        # another tenant's run: a 404 that names nothing
        response = other.get(f"/api/v1/reports/runs/{run_id}")
        error = assert_envelope(response, 404, "not_found")
        assert "acme" not in response.text
        assert error["message"] == f"report run {run_id} not found"

        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            polled = editor.get(f"/api/v1/reports/runs/{run_id}")
            assert polled.status_code == 200, polled.text
            status = polled.json()
            if status["status"] not in ("queued", "running"):
                break
            assert time.monotonic() < deadline, status
            time.sleep(1)
        assert (status["status"], status["dagster_status"]) == ("succeeded", "SUCCESS")
        assert [(f["period"], f["format"]) for f in status["files"]] == [
            ("2026-10", "pdf"),
            ("2026-10", "xlsx"),
        ]
        pdf = editor.get(status["files"][0]["url"])
        assert pdf.content == (root / "acme" / "2026-10" / "consumption.pdf").read_bytes()
        assert pdf.content.startswith(b"%PDF")
        assert not (root / "globex").exists()
    with psycopg.connect(built.url) as conn:
        audited = conn.execute(
            "SELECT tenant_id, actor, detail ->> 'period', detail ->> 'partition' FROM audit_log"
            " WHERE action = 'report.requested' AND entity_id = %s",
            (run_id,),
        ).fetchall()
    assert audited == [
        (
            built.acme.tenant_id,
            f"api-key:{built.acme.key_ids['editor']}",
            "2026-10",
            "2026-10-01|acme",
        )
    ]
