"""Billing through Dagster and the CLI against a real PostgreSQL: the invoice asset with its
checks and files, the nightly per-time-zone requests, and `iiot billing ...`."""

import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
from click.testing import CliRunner
from openpyxl import load_workbook

from assets.billing import (
    NIGHT_BILLED,
    NO_UNEXPLAINED_CREDIT,
    RECONCILED,
    TOTAL_IS_SUM,
    billing_daily_usage,
    billing_invoice,
    billing_nightly,
    every_closed_month_invoiced,
    missing_invoices,
)
from iiot_orchestration import billing, registry
from iiot_orchestration.cli import main
from iiot_orchestration.partitions import TENANTS, tenant_key
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.storage import storage_for
from sensors.billing import BILLING_TAG, nightly_bulk_requests, nightly_requests
from tests.test_billing import rewrite_final_usage


@pytest.fixture
def acme(conn):
    """An enterprise tenant in Sao Paulo since September, with one meter that sent three
    readings on 2026-10-10 (local), counted in ingest_usage as the daemon counts them."""
    registry.create_tenant(
        conn, slug="acme", name="Acme", plan="enterprise", timezone="America/Sao_Paulo"
    )
    who = billing.tenant(conn, "acme")
    conn.execute(
        "UPDATE tenant_plan_history SET valid_from = '2026-09-01 03:00Z' WHERE tenant_id = %s",
        (who.tenant_id,),
    )
    conn.execute(
        "UPDATE tenants SET created_at = '2026-09-10 12:00Z' WHERE tenant_id = %s",
        (who.tenant_id,),
    )
    [device] = registry.provision_devices(
        conn, "acme", [registry.DeviceRequest("02:00:00:00:0a:01", "energy")]
    )
    storage_for(conn).ensure_partitions(conn, date(2026, 10, 9), date(2026, 10, 11))
    received = datetime(2026, 10, 10, 15, 30, tzinfo=UTC)
    for minute in range(3):
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value, received_at)"
            " VALUES (%s, %s, 'energy_kwh', %s, %s, %s)",
            (
                who.tenant_id,
                device.device_id,
                received - timedelta(minutes=minute),
                minute,
                received,
            ),
        )
    conn.execute(
        "INSERT INTO ingest_usage (tenant_id, device_id, hour, messages, readings)"
        " VALUES (%s, %s, '2026-10-10 15:00Z', 3, 3)",
        (who.tenant_id, device.device_id),
    )
    return billing.tenant(conn, "acme")  # created on 2026-09-10


def materialize(database_url, assets, key, tmp_path):
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(TENANTS, ["acme"])
        return dg.materialize(
            assets,
            partition_key=key,
            instance=instance,
            resources={"postgres": PostgresResource(database_url=database_url)},
            raise_on_error=False,
        )


@pytest.fixture
def reports_root(tmp_path, monkeypatch):
    monkeypatch.setenv("IIOT_REPORTS_ROOT", str(tmp_path / "reports"))
    return tmp_path / "reports"


def checks(result):
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def test_the_invoice_asset_finalises_a_closed_month_with_files_and_checks(
    conn, database_url, acme, reports_root, tmp_path
):
    result = materialize(
        database_url, [billing_invoice], tenant_key("2026-10-01", "acme"), tmp_path
    )
    assert result.success
    assert checks(result) == {TOTAL_IS_SUM: True, NO_UNEXPLAINED_CREDIT: True, RECONCILED: True}
    [materialization] = result.asset_materializations_for_node("billing_invoice")
    meta = materialization.metadata
    assert meta["status"].value == "final"
    assert meta["total"].value == 4900.0
    usage = conn.execute(
        "SELECT messages, readings, active_devices FROM billing_daily_usage"
        " WHERE tenant_id = %s AND day = '2026-10-10'",
        (acme.tenant_id,),
    ).fetchone()
    assert usage == (3, 3, 1)
    xlsx = reports_root / "acme" / "2026-10" / "invoice.xlsx"
    pdf = reports_root / "acme" / "2026-10" / "invoice.pdf"
    assert meta["xlsx"].value == str(xlsx)
    sheet = load_workbook(xlsx).active
    totals = [row for row in sheet.iter_rows(values_only=True) if row[2] == "Total"]
    assert [Decimal(str(row[7])) for row in totals] == [Decimal("4900.00")]
    assert pdf.read_bytes().startswith(b"%PDF")
    assert not list(reports_root.rglob("*.partial"))

    again = materialize(database_url, [billing_invoice], tenant_key("2026-10-01", "acme"), tmp_path)
    assert again.success  # a final invoice re-run compares and changes nothing
    [rerun] = again.asset_materializations_for_node("billing_invoice")
    assert rerun.metadata["action"].value == "unchanged"


def test_reconciliation_fails_when_raw_readings_were_not_billed(
    conn, database_url, acme, reports_root, tmp_path
):
    device_id = conn.execute("SELECT device_id FROM devices").fetchone()[0]
    conn.execute(
        "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value, received_at)"
        " VALUES (%s, %s, 'energy_kwh', '2026-10-10 12:00Z', 9, '2026-10-10 16:00Z')",
        (acme.tenant_id, device_id),
    )
    result = materialize(
        database_url, [billing_invoice], tenant_key("2026-10-01", "acme"), tmp_path
    )
    assert checks(result)[RECONCILED] is False
    evaluation = next(e for e in result.get_asset_check_evaluations() if e.check_name == RECONCILED)
    assert evaluation.metadata["raw_readings"].value == 4
    assert evaluation.metadata["billed_readings"].value == 3


def test_a_changed_final_month_fails_the_run_loudly(
    conn, database_url, acme, reports_root, tmp_path
):
    key = tenant_key("2026-10-01", "acme")
    assert materialize(database_url, [billing_invoice], key, tmp_path).success
    # a UI backfill of a day of the final month is refused, saying how to correct it
    backfill = materialize(
        database_url, [billing_daily_usage], tenant_key("2026-10-10", "acme", "day"), tmp_path
    )
    assert not backfill.success
    failure = backfill.get_step_failure_events()[0].event_specific_data.error.message
    assert "day 2026-10-10 of acme belongs to the final invoice 2026-10" in failure
    assert "iiot billing adjust --tenant acme" in failure
    rewrite_final_usage(
        conn,
        "UPDATE billing_daily_usage SET provisioned_devices = 1200 WHERE tenant_id = %s",
        (acme.tenant_id,),
    )
    result = materialize(database_url, [billing_invoice], key, tmp_path)
    assert not result.success
    failure = result.get_step_failure_events()[0].event_specific_data.error.message
    assert "no longer matches its data" in failure


def test_the_daily_usage_asset(conn, database_url, acme, tmp_path):
    result = materialize(
        database_url, [billing_daily_usage], tenant_key("2026-10-10", "acme", "day"), tmp_path
    )
    assert result.success
    [materialization] = result.asset_materializations_for_node("billing_daily_usage")
    assert materialization.metadata["readings"].value == 3


def test_the_usage_consumption_is_stored_and_shown_at_the_meters_resolution(
    conn, database_url, acme, tmp_path
):
    """The mart's consumption summed in floats (0.1 + 0.2 kWh = 0.30000000000000004, 1.1 + 2.2 m3
    = 3.3000000000000003) reaches billing_daily_usage and the asset's metadata at the meters'
    resolution, thousandths."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS marts.consumption_daily"
        " (tenant_id integer, local_day date, unit text, consumption double precision);"
        " GRANT SELECT ON marts.consumption_daily TO platform_rw"
    )
    conn.execute(
        "INSERT INTO marts.consumption_daily (tenant_id, local_day, unit, consumption)"
        " VALUES (%(t)s, '2026-10-10', 'kWh', 0.1), (%(t)s, '2026-10-10', 'kWh', 0.2),"
        "        (%(t)s, '2026-10-10', 'm3', 1.1), (%(t)s, '2026-10-10', 'm3', 2.2)",
        {"t": acme.tenant_id},
    )
    result = materialize(
        database_url, [billing_daily_usage], tenant_key("2026-10-10", "acme", "day"), tmp_path
    )
    assert result.success
    [materialization] = result.asset_materializations_for_node("billing_daily_usage")
    stored = conn.execute(
        "SELECT consumption::text FROM billing_daily_usage WHERE tenant_id = %s",
        (acme.tenant_id,),
    ).fetchone()[0]
    assert json.loads(stored) == {"kWh": 0.3, "m3": 3.3}
    assert materialization.metadata["consumption"].value == {"kWh": 0.3, "m3": 3.3}


def test_the_assets_refuse_days_and_periods_before_the_tenant_existed(
    conn, database_url, acme, reports_root, tmp_path
):
    """acme was created on 2026-09-10 (Sao Paulo): its usage of Sep 9 and its 2026-08 invoice
    are refused, and nothing is written."""
    usage = materialize(
        database_url, [billing_daily_usage], tenant_key("2026-09-09", "acme", "day"), tmp_path
    )
    invoice = materialize(
        database_url, [billing_invoice], tenant_key("2026-08-01", "acme"), tmp_path
    )
    for result, message in (
        (usage, "day 2026-09-09 of acme is before the tenant was created (2026-09-10"),
        (invoice, "period 2026-08 of acme ended before the tenant was created"),
    ):
        assert not result.success
        failure = result.get_step_failure_events()[0].event_specific_data.error.message
        assert message in failure
    assert conn.execute(
        "SELECT (SELECT count(*) FROM billing_daily_usage) + (SELECT count(*) FROM invoices)"
    ).fetchone() == (0,)


def months_over_since(first: date) -> list[date]:
    """The first days of the months from ``first`` to the last one over in Sao Paulo now."""
    current = datetime.now(ZoneInfo("America/Sao_Paulo")).date().replace(day=1)
    months = []
    while first < current:
        months.append(first)
        first = (first + timedelta(days=32)).replace(day=1)
    return months


def current_period() -> str:
    """The billing period open now for a Sao Paulo tenant (calendar months)."""
    return datetime.now(ZoneInfo("America/Sao_Paulo")).strftime("%Y-%m")


def test_every_closed_month_must_have_a_final_invoice(conn, database_url, acme, reports_root):
    resources = {"postgres": PostgresResource(database_url=database_url)}
    closed = months_over_since(date(2026, 9, 1))  # acme is billed from September
    assert missing_invoices(conn) == [f"acme:{month:%Y-%m}" for month in closed]
    assert len(closed) >= 2
    context = dg.build_asset_check_context(resources=resources)
    assert every_closed_month_invoiced(context).passed is False
    for label in closed:
        billing.bill(conn, acme, label)
    assert missing_invoices(conn) == []
    assert every_closed_month_invoiced(dg.build_asset_check_context(resources=resources)).passed


def test_nightly_requests_follow_each_tenants_time_zone():
    tenants = [("sp", "America/Sao_Paulo", 1), ("tokyo", "Asia/Tokyo", 15)]
    at_sp_2am = datetime(2026, 11, 23, 5, 10, tzinfo=UTC)  # 02:10 in Sao Paulo, 14:10 in Tokyo
    requests = nightly_requests(at_sp_2am, tenants)
    assert [(r.job_name, r.partition_key, r.run_key) for r in requests] == [
        ("billing_usage_job", tenant_key("2026-11-22", "sp", "day"), "usage:sp:2026-11-22"),
        ("billing_invoice_job", tenant_key("2026-11-01", "sp"), "invoice:sp:2026-11-22"),
    ]
    assert {r.tags[BILLING_TAG] for r in requests} == {"sp:2026-11"}
    at_tokyo_2am = datetime(2026, 11, 14, 17, 30, tzinfo=UTC)  # 02:30 Nov 15 in Tokyo
    [usage, invoice] = nightly_requests(at_tokyo_2am, tenants)
    # Nov 14 was the last day of the Tokyo tenant's 2026-10 period (Oct 15 to Nov 14)
    assert usage.partition_key == tenant_key("2026-11-14", "tokyo", "day")
    assert invoice.partition_key == tenant_key("2026-10-01", "tokyo")
    assert nightly_requests(datetime(2026, 11, 23, 12, tzinfo=UTC), tenants) == []


@pytest.fixture
def run(cli_env, monkeypatch):
    for key in [k for k in cli_env if k.startswith("IIOT_")]:
        monkeypatch.setenv(key, cli_env[key])

    def invoke(*args):
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    return invoke


def test_cli_invoice_adjust_events_and_set_plan(conn, acme, run, tmp_path):
    result = run("billing", "invoice", "--tenant", "acme", "--period", "2026-10", "--json")
    assert result.exit_code == 0, result.output
    [invoice] = json.loads(result.output)
    assert (invoice["status"], invoice["total"]) == ("final", "4900.00")
    assert invoice["pdf"].endswith("acme/2026-10/invoice.pdf")

    result = run(
        "billing",
        "adjust",
        "--tenant",
        "acme",
        "--period",
        current_period(),
        "--amount",
        "-12.34",
        "--reason",
        "credit: 2026-10 outage",
    )
    assert result.exit_code == 0, result.output
    result = run("tenants", "set-plan", "acme", "pro", "--actor", "ops@acme")
    assert result.exit_code == 0
    assert "enterprise -> pro" in result.output
    assert "already on pro" in run("tenants", "set-plan", "acme", "pro").output

    result = run("billing", "events", "--tenant", "acme", "--period", current_period(), "--json")
    events = json.loads(result.output)
    kinds = [e["kind"] for e in events]
    assert "adjustment_added" in kinds
    assert "plan_changed" in kinds
    assert [e for e in events if e["kind"] == "plan_changed"][-1]["actor"] == "ops@acme"
    table = run("billing", "events", "--tenant", "acme", "--period", "2026-10").output
    assert "invoice_finalised" in table
    assert (
        "no billing events"
        in run("billing", "events", "--tenant", "acme", "--period", "2025-01").output
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["billing", "invoice", "--tenant", "acme", "--period", "2026-13"], "bad period"),
        (["billing", "invoice", "--tenant", "nobody", "--period", "2026-10"], "unknown tenant"),
        (["billing", "invoice", "--tenant", "acme", "--period", "2099-01"], "has not started"),
        (
            [
                "billing",
                "adjust",
                "--tenant",
                "acme",
                "--period",
                "2026-11",
                "--amount",
                "ten",
                "--reason",
                "why not",
            ],
            "bad amount",
        ),
        (
            [
                "billing",
                "adjust",
                "--tenant",
                "acme",
                "--period",
                "2026-11",
                "--amount",
                "NaN",
                "--reason",
                "why not",
            ],
            "bad amount",
        ),
        (
            [
                "billing",
                "adjust",
                "--tenant",
                "acme",
                "--period",
                "2026-11",
                "--amount",
                "0.001",
                "--reason",
                "why not",
            ],
            "non-zero amount in cents",
        ),
        (
            [
                "billing",
                "adjust",
                "--tenant",
                "acme",
                "--period",
                "2026-10",
                "--amount",
                "5",
                "--reason",
                "too late",
            ],
            "is final",
        ),
        (
            [
                "billing",
                "adjust",
                "--tenant",
                "acme",
                "--period",
                "2026-11",
                "--amount",
                "1e999",
                "--reason",
                "huge",
            ],
            "non-zero amount in cents",
        ),
        (
            [
                "billing",
                "adjust",
                "--tenant",
                "acme",
                "--period",
                "2026-11",
                "--amount",
                "-5",
                "--reason",
                "x",
            ],
            "reason of 3 to 500",
        ),
        (["tenants", "set-plan", "acme", "platinum"], "unknown plan"),
    ],
)
def test_cli_refuses_bad_input_clearly(conn, acme, run, args, message):
    billing.bill(conn, acme, date(2026, 10, 1))  # October final
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def bill_acme_night(database_url, instance):
    """billing_nightly for acme and the night of 2026-10-10."""
    return dg.materialize(
        [billing_nightly],
        partition_key="2026-10-10",
        instance=instance,
        resources={"postgres": PostgresResource(database_url=database_url)},
        run_config={"ops": {"billing_nightly": {"config": {"tenants": ["acme"]}}}},
    )


def test_the_bulk_nightly_asset_bills_like_the_per_tenant_assets(
    conn, database_url, acme, reports_root, tmp_path
):
    """billing_nightly for 2026-10-10: acme's usage of that day (the same row the usage asset
    writes) and its October invoice with its files, one bulk run."""
    with dg.instance_for_test() as instance:
        result = bill_acme_night(database_url, instance)
        # the per-tenant partitions it wrote show as materialized
        usage_event = instance.get_latest_materialization_event(billing_daily_usage.key)
        invoice_event = instance.get_latest_materialization_event(billing_invoice.key)
    assert usage_event.dagster_event.partition == tenant_key("2026-10-10", "acme", "day")
    assert invoice_event.dagster_event.partition == tenant_key("2026-10-01", "acme")
    assert result.success
    assert checks(result) == {NIGHT_BILLED: True, RECONCILED: True}
    [materialization] = [
        m
        for m in result.asset_materializations_for_node("billing_nightly")
        if m.asset_key == billing_nightly.key
    ]
    assert materialization.metadata["tenants"].value == 1
    assert materialization.metadata["failed"].value == 0
    usage = conn.execute(
        "SELECT messages, readings, active_devices FROM billing_daily_usage"
        " WHERE tenant_id = %s AND day = '2026-10-10'",
        (acme.tenant_id,),
    ).fetchone()
    assert usage == (3, 3, 1)
    stored = billing.stored_invoice(conn, acme.tenant_id, date(2026, 10, 1))
    assert stored.total == Decimal("4900.00")
    assert (reports_root / "acme" / "2026-10" / "invoice.pdf").read_bytes().startswith(b"%PDF")


def test_the_bulk_night_reconciles_the_day_with_raw_readings(
    conn, database_url, acme, reports_root
):
    """A raw reading received on 2026-10-10 that ingest never counted: billed 3, raw 4."""
    device_id = conn.execute("SELECT device_id FROM devices").fetchone()[0]
    conn.execute(
        "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value, received_at)"
        " VALUES (%s, %s, 'energy_kwh', '2026-10-10 12:00Z', 9, '2026-10-10 16:00Z')",
        (acme.tenant_id, device_id),
    )
    with dg.instance_for_test() as instance:
        result = bill_acme_night(database_url, instance)
    assert checks(result) == {NIGHT_BILLED: True, RECONCILED: False}
    [evaluation] = [e for e in result.get_asset_check_evaluations() if e.check_name == RECONCILED]
    meta = {k: v.value for k, v in evaluation.metadata.items()}
    assert meta == {
        "billed_readings": 3,
        "raw_readings": 4,
        "tenants_differing": 1,
        "first_differing": "acme",
    }


def test_many_tenants_due_in_one_zone_get_one_bulk_run():
    at_sp_2am = datetime(2026, 11, 23, 5, 10, tzinfo=UTC)
    tenants = [(f"sp{n}", "America/Sao_Paulo", 1) for n in range(3)] + [("tokyo", "Asia/Tokyo", 15)]
    [bulk] = nightly_bulk_requests(at_sp_2am, tenants, bulk_from=3)
    assert (bulk.job_name, bulk.partition_key) == ("billing_nightly_job", "2026-11-22")
    assert bulk.run_key == "nightly:America/Sao_Paulo:2026-11-22"
    assert bulk.run_config["ops"]["billing_nightly"]["config"]["tenants"] == ["sp0", "sp1", "sp2"]
    # below the threshold: the per-tenant runs, as before
    assert nightly_bulk_requests(at_sp_2am, tenants, bulk_from=4) == nightly_requests(
        at_sp_2am, tenants
    )
