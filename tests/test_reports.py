"""Consumption reports against a real PostgreSQL: two tenants' readings over September and
October 2026 are rolled up, the dbt marts are built through Dagster (once for the module: it
takes a few seconds), and the PDF and XLSX files are read back and compared with SQL."""

import os
import re
import shutil
import struct
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from openpyxl import Workbook, load_workbook
from pypdf import PdfReader
from reportlab.graphics.charts.linecharts import HorizontalLineChart

from assets.marts import dbt_resource, marts
from assets.reports import (
    CLOSED_MONTHS_REPORTED,
    REPORT_ASSET,
    TOTALS_MATCH_MARTS,
    closed_months_reported,
    consumption_report,
)
from assets.rollups import telemetry_daily, telemetry_hourly
from iiot_orchestration import registry
from iiot_orchestration.definitions import defs
from iiot_orchestration.partitions import TENANT_MONTHS, TENANTS, tenant_key
from iiot_orchestration.reports import FORMATS, make_reports, parse_period
from iiot_orchestration.reports.coverage import closed_months, missing_reports
from iiot_orchestration.reports.data import (
    Alerts,
    ConsumptionReport,
    DeviceDay,
    DeviceLine,
    Period,
    ReportError,
    TenantInfo,
    hours_between,
)
from iiot_orchestration.reports.files import atomic_file, report_path
from iiot_orchestration.reports.labels import labels_for, parse_number
from iiot_orchestration.reports.pdf import _daily_chart, render_pdf
from iiot_orchestration.reports.units import AxisScale, axis_scale
from iiot_orchestration.reports.verify import pdf_text, verify_files
from iiot_orchestration.reports.xlsx import build_sheets, count_rows, render_xlsx
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.storage import storage_for
from sensors.reports import MARTS_ASSET, closed_month_reports_sensor, report_requests
from tests.conftest import REPO_ROOT, create_database, drop_database

NOW = datetime(2026, 11, 2, 12, 30, tzinfo=UTC)
DOCS_IMAGE = REPO_ROOT / "docs" / "images" / "report-first-page.png"
DEVICE_HEADER = (
    "# Device MAC Meter kind Consumption Share Previous month Change Hours with data / in period"
)
OCTOBER = "2026-10"
FORMULA_NAME = '=HYPERLINK("http://example.invalid","gas")'
# (tenant, device name) -> (MAC, kind); acme is in Sao Paulo (UTC-3, no DST since 2019)
DEVICES = {
    ("acme", "Main board"): ("02:00:00:00:0a:01", "energy"),
    ("acme", "Chiller <b>& pump"): ("02:00:00:00:0a:02", "energy"),  # markup in a name
    ("acme", "Inlet"): ("02:00:00:00:0a:03", "water"),
    ("acme", "Boiler gas"): ("02:00:00:00:0a:04", "gas"),
    ("acme", "Idle spare"): ("02:00:00:00:0a:05", "energy"),  # active, never reports
    ("beta", "Beta secret meter"): ("02:00:00:00:0b:01", "energy"),
}
TENANT_SETTINGS = {"acme": ("America/Sao_Paulo", "pt_BR"), "beta": ("UTC", "en")}
# SQL per device: readings as generate_series over the local hours of the tenant, with
# value = start + step * n. Local Sep 1 00:00 in Sao Paulo is 03:00 UTC.
SERIES = {
    # hourly through September (1.0 an hour) and October (1.5 an hour)
    "Main board": [
        ("energy_kwh", "2026-09-01 03:00", "2026-10-01 02:00", "1 hour", 0.0, 1.0),
        ("energy_kwh", "2026-10-01 03:00", "2026-11-01 02:00", "1 hour", 720.0, 1.5),
    ],
    # October only, with a gap of local Oct 10 00:00 to Oct 19 23:00 (240 hours)
    "Chiller <b>& pump": [
        ("energy_kwh", "2026-10-01 03:00", "2026-10-10 02:00", "1 hour", 100.0, 2.0),
        ("energy_kwh", "2026-10-20 03:00", "2026-11-01 02:00", "1 hour", 1000.0, 2.0),
    ],
    "Inlet": [("water_m3", "2026-10-01 03:00", "2026-11-01 02:00", "1 hour", 50.0, 0.1)],
    "Boiler gas": [("gas_m3", "2026-10-01 03:00", "2026-11-01 02:00", "2 hours", 10.0, 0.5)],
    "Beta secret meter": [
        ("energy_kwh", "2026-10-01 00:00", "2026-10-31 23:00", "1 hour", 5.0, 3.0)
    ],
}
DEAD_LETTERS = [  # (tenant, reason, received_at)
    ("acme", "bad_payload", "2026-10-05 12:00+00"),
    ("acme", "bad_payload", "2026-10-25 12:00+00"),
    ("acme", "unknown_metric", "2026-10-31 23:00-03"),  # local Oct 31
    ("acme", "unknown_metric", "2026-11-01 00:30-03"),  # local Nov 1: not October's
    ("beta", "bad_payload", "2026-10-07 12:00+00"),
]

# The consumption of each cumulative meter in local October, from the raw readings by the
# rollups' rule (increases between consecutive readings), independently of the marts.
RAW_CONSUMPTION = """
WITH steps AS (
    SELECT t.tenant_id, t.device_id, m.unit, t.ts,
           t.value - lag(t.value) OVER (PARTITION BY t.device_id, t.metric ORDER BY t.ts) AS step
      FROM telemetry t JOIN metric_catalog m ON m.metric = t.metric AND m.cumulative
)
SELECT d.mac::text, s.unit, sum(s.step)
  FROM steps s
  JOIN devices d USING (device_id)
  JOIN tenants tn ON tn.tenant_id = s.tenant_id
 WHERE tn.slug = %s AND s.step IS NOT NULL
   AND (s.ts AT TIME ZONE tn.timezone)::date BETWEEN %s AND %s
 GROUP BY 1, 2
"""


@dataclass(frozen=True)
class ReportDatabase:
    url: str
    device_ids: dict[str, int]  # device name -> id


def seed(conn: psycopg.Connection) -> dict[str, int]:
    storage_for(conn).ensure_partitions(conn, date(2026, 8, 31), date(2026, 11, 2))
    for slug, (timezone, locale) in TENANT_SETTINGS.items():
        registry.create_tenant(
            conn,
            slug=slug,
            name=f"{slug.title()} Energia",
            plan="pro",
            timezone=timezone,
            locale=locale,
        )
    ids = {}
    for (slug, name), (mac, kind) in DEVICES.items():
        [device] = registry.provision_devices(conn, slug, [registry.DeviceRequest(mac, kind, name)])
        ids[name] = device.device_id
        for metric, first, last, step, start, increase in SERIES.get(name, []):
            conn.execute(
                "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
                " SELECT d.tenant_id, d.device_id, %s, ts,"
                "        %s + %s * (row_number() OVER (ORDER BY ts) - 1)"
                "   FROM devices d, generate_series(%s::timestamptz, %s::timestamptz,"
                "        %s::interval) ts WHERE d.device_id = %s",
                (metric, start, increase, f"{first}+00", f"{last}+00", step, device.device_id),
            )
    # written by another path than the registry, which refuses it: a spreadsheet formula
    conn.execute(
        "UPDATE devices SET name = %s WHERE device_id = %s", (FORMULA_NAME, ids["Boiler gas"])
    )
    # registered before the periods of the tests
    conn.execute("UPDATE tenants SET created_at = '2026-08-15 12:00+00'")
    conn.execute("UPDATE devices SET created_at = '2026-08-15 12:00+00'")
    for slug, reason, received in DEAD_LETTERS:
        conn.execute(
            "INSERT INTO dead_letters (received_at, topic, tenant_id, reason, payload,"
            " payload_size) SELECT %s, 'iiot/devices/x/telemetry', tenant_id, %s, '\\x00', 1"
            "   FROM tenants WHERE slug = %s",
            (received, reason, slug),
        )
    return ids


def roll_up_and_build_marts(url: str) -> None:
    resources = {"postgres": PostgresResource(database_url=url)}
    rolled = dg.materialize(
        [telemetry_hourly, telemetry_daily],
        tags={
            "dagster/asset_partition_range_start": "2026-08-31",
            "dagster/asset_partition_range_end": "2026-11-01",
        },
        resources=resources,
    )
    assert rolled.success
    built = dg.materialize([marts], resources={**resources, "dbt": dbt_resource()})
    assert built.success


@pytest.fixture(scope="module")
def report_db(pg_server: str, template_database: str) -> Iterator[ReportDatabase]:
    name = f"iiot_t_{uuid.uuid4().hex[:12]}"
    url = create_database(pg_server, name, template=template_database)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            ids = seed(conn)
        roll_up_and_build_marts(url)
        yield ReportDatabase(url, ids)
    finally:
        drop_database(pg_server, name)


@pytest.fixture
def conn(report_db: ReportDatabase) -> Iterator[psycopg.Connection]:
    """The shared database (the conftest `conn` is a fresh empty one per test)."""
    with psycopg.connect(report_db.url, autocommit=True) as connection:
        yield connection


def make(conn, slug="acme", period=OCTOBER, root=None, formats=FORMATS, now=NOW):
    report, files = make_reports(conn, slug, parse_period(period), root, formats, now=now)
    return report, {f.format: f for f in files}


def raw_consumption(conn, slug, first, last) -> dict[tuple[str, str], float]:
    return {
        (mac, unit): total
        for mac, unit, total in conn.execute(RAW_CONSUMPTION, (slug, first, last))
    }


def sheet_rows(path, title) -> list[tuple]:
    wb = load_workbook(path, read_only=True, data_only=True)
    try:
        return [tuple(row) for row in wb[title].iter_rows(values_only=True)]
    finally:
        wb.close()


def table(rows: list[tuple], header_first: str) -> list[dict]:
    """The rows under the header row that starts with ``header_first``, as dicts."""
    start = next(n for n, row in enumerate(rows) if row and row[0] == header_first)
    header = rows[start]
    found = []
    for row in rows[start + 1 :]:
        if not row or row[0] is None:
            break
        found.append(dict(zip(header, row + (None,) * (len(header) - len(row)), strict=True)))
    return found


def all_text(path) -> str:
    wb = load_workbook(path, read_only=True)
    try:
        return "\n".join(
            str(value)
            for ws in wb
            for row in ws.iter_rows(values_only=True)
            for value in row
            if value is not None
        )
    finally:
        wb.close()


MACS = {name: mac for (_, name), (mac, _) in DEVICES.items()}


def test_pdf_and_xlsx_numbers_match_sql_over_the_raw_readings(conn, tmp_path):
    report, files = make(conn, root=tmp_path)
    labels = labels_for("pt_BR")
    expected = raw_consumption(conn, "acme", date(2026, 10, 1), date(2026, 10, 31))
    # worked out by hand from SERIES: the first October reading counts from September's last
    assert expected == {
        (MACS["Main board"], "kWh"): pytest.approx(1 + 743 * 1.5),
        (MACS["Chiller <b>& pump"], "kWh"): pytest.approx(215 * 2 + 470 + 287 * 2),
        (MACS["Inlet"], "m3"): pytest.approx(743 * 0.1),
        (MACS["Boiler gas"], "m3"): pytest.approx(371 * 0.5),
    }

    devices = table(sheet_rows(files["xlsx"].path, labels["sheet_devices"]), labels["rank"])
    by_mac = {(row["MAC"], row[labels["unit"]]): row[labels["consumption"]] for row in devices}
    assert by_mac.pop((MACS["Idle spare"], "kWh")) == 0
    assert by_mac == {key: pytest.approx(value) for key, value in expected.items()}

    summary = table(sheet_rows(files["xlsx"].path, labels["sheet_summary"]), labels["kind"])
    totals = {(row[labels["kind"]], row[labels["unit"]]): row for row in summary}
    assert list(totals) == [("Energia", "kWh"), ("Água", "m3"), ("Gás", "m3")]
    energy = expected[(MACS["Main board"], "kWh")] + expected[(MACS["Chiller <b>& pump"], "kWh")]
    assert totals[("Energia", "kWh")][labels["consumption"]] == pytest.approx(energy)
    assert totals[("Energia", "kWh")][labels["devices"]] == 3
    assert totals[("Água", "m3")][labels["consumption"]] == pytest.approx(74.3)
    assert totals[("Gás", "m3")][labels["consumption"]] == pytest.approx(185.5)
    assert totals[("Energia", "kWh")][labels["previous_month"]] == pytest.approx(719)

    daily = table(sheet_rows(files["xlsx"].path, labels["sheet_daily"]), labels["day"])
    assert len(daily) == 31
    assert sum(row["Energia (kWh)"] for row in daily) == pytest.approx(energy)
    day_one = {
        (row[1], row[2]): row[5]
        for row in sheet_rows(files["xlsx"].path, labels["sheet_device_days"])[1:]
        if row[0].date() == date(2026, 10, 1)
    }
    assert day_one[("Main board", MACS["Main board"])] == pytest.approx(1 + 23 * 1.5)

    text = pdf_text(files["pdf"].path)
    assert "Energia\nkWh\n3\n2\n2.589,500\n" in text  # pt_BR: thousands '.', decimals ','
    assert "Gerado em 02/11/2026 09:30 (America/Sao_Paulo)" in text  # 12:30 UTC, local time
    assert "Água\nm3\n1\n1\n74,300\n" in text
    assert "1.474,000 kWh" in text
    assert "1.115,500 kWh" in text
    # the files' own reconciliation agrees
    assert verify_files(conn, report, {k: f.path for k, f in files.items()}) == {
        "pdf": [],
        "xlsx": [],
    }


def test_devices_are_ranked_with_share_and_change_from_the_previous_month(conn, tmp_path):
    _, files = make(conn, root=tmp_path, formats=["xlsx"])
    labels = labels_for("pt_BR")
    rows = table(sheet_rows(files["xlsx"].path, labels["sheet_comparison"]), labels["kind"])
    compared = {row["MAC"]: row for row in rows}
    chiller, main, idle = (
        compared[MACS[n]] for n in ("Chiller <b>& pump", "Main board", "Idle spare")
    )
    assert (chiller[labels["rank"]], main[labels["rank"]], idle[labels["rank"]]) == (1, 2, 3)
    assert chiller[labels["share"]] == pytest.approx(1474 / 2589.5)
    assert main[labels["previous_month"]] == pytest.approx(719)
    assert main[labels["change"]] == pytest.approx(1115.5 - 719)
    assert main[f"{labels['change']} %"] == pytest.approx((1115.5 - 719) / 719)
    assert chiller[labels["previous_month"]] is None  # no September data: no change
    assert compared[MACS["Inlet"]][labels["rank"]] == 1  # ranked among its kind only


def test_a_device_with_gaps_shows_its_completeness(conn, tmp_path):
    report, files = make(conn, root=tmp_path)
    labels = labels_for("pt_BR")
    lines = {line.mac: line for line in report.devices}
    chiller = lines[MACS["Chiller <b>& pump"]]
    assert (chiller.hours_with_data, chiller.expected_hours) == (744 - 240, 744)
    assert (
        lines[MACS["Boiler gas"]].hours_with_data,
        lines[MACS["Idle spare"]].hours_with_data,
    ) == (372, 0)
    devices = table(sheet_rows(files["xlsx"].path, labels["sheet_devices"]), labels["rank"])
    row = next(r for r in devices if r["MAC"] == MACS["Chiller <b>& pump"])
    assert (row[labels["hours"]], row[labels["expected_hours"]]) == (504, 744)
    assert row[labels["completeness"]] == pytest.approx(504 / 744)
    assert row[labels["days_with_data"]] == 31 - 10
    text = pdf_text(files["pdf"].path)
    assert "504/744\n67,7 %" in text
    assert "0/744\n0,0 %" in text  # the idle device is listed, with nothing
    assert "372/744\n50,0 %" in text


def test_a_tenant_never_sees_another_tenants_devices(conn, tmp_path, report_db):
    beta_mac = MACS["Beta secret meter"]
    # a stray mart row that claims an acme device for beta must not leak either way
    conn.execute(
        "INSERT INTO marts.consumption_daily (tenant_id, device_id, unit, local_day, timezone,"
        " consumption, readings, hours_with_data, counter_resets)"
        " SELECT t.tenant_id, %s, 'kWh', '2026-10-05', 'UTC', 999999, 1, 1, 0"
        "   FROM tenants t WHERE t.slug = 'beta'",
        (report_db.device_ids["Main board"],),
    )
    try:
        acme, acme_files = make(conn, "acme", root=tmp_path)
        beta, beta_files = make(conn, "beta", root=tmp_path)
    finally:
        conn.execute("DELETE FROM marts.consumption_daily WHERE consumption = 999999")
    acme_macs = {mac for (slug, _), (mac, _) in DEVICES.items() if slug == "acme"}
    assert {line.mac for line in acme.devices} == acme_macs
    assert [line.mac for line in beta.devices] == [beta_mac]
    assert beta.summary[0].consumption == pytest.approx(743 * 3)  # not 999999 more
    for text in (pdf_text(acme_files["pdf"].path), all_text(acme_files["xlsx"].path)):
        assert beta_mac not in text
        assert "Beta secret meter" not in text
        assert "999.999" not in text
    for text in (pdf_text(beta_files["pdf"].path), all_text(beta_files["xlsx"].path)):
        assert not any(mac in text for mac in acme_macs)
        assert "Main board" not in text
        assert "999999" not in text
        assert "999,999" not in text


def test_an_empty_month_gives_a_valid_report_that_says_no_data(conn, tmp_path):
    for slug, message in (
        ("acme", "Sem dados neste período."),
        ("beta", "No data for this period."),
    ):
        report, files = make(conn, slug, "2026-08", root=tmp_path)
        assert not report.has_data
        assert files["pdf"].pages >= 1
        assert message in pdf_text(files["pdf"].path)
        assert message in all_text(files["xlsx"].path)
        # the devices are there, with no hours of data out of August's 744
        assert {line.expected_hours for line in report.devices} == {744}
        assert {line.hours_with_data for line in report.devices} == {0}
        assert verify_files(conn, report, {k: f.path for k, f in files.items()}) == {
            "pdf": [],
            "xlsx": [],
        }
    before = make(conn, "acme", "2026-01", root=tmp_path)[0]  # before the tenant existed
    assert before.devices == ()
    assert not before.has_data


def test_an_open_month_counts_the_hours_up_to_now(conn, tmp_path):
    now = datetime(2026, 10, 11, 3, 0, tzinfo=UTC)  # local Oct 11 00:00: ten whole days
    report, files = make(conn, root=tmp_path, now=now)
    assert report.open_period
    assert report.period_hours == 240
    assert {line.expected_hours for line in report.devices} == {240}
    idle = next(line for line in report.devices if line.mac == MACS["Idle spare"])
    assert (idle.hours_with_data, idle.completeness) == (0, 0.0)
    assert "Período em aberto: dados até 11/10/2026 00:00 (America/Sao_Paulo)." in pdf_text(
        files["pdf"].path
    )
    assert not make(conn, root=tmp_path)[0].open_period


def test_dead_letters_of_the_tenants_local_month(conn, tmp_path):
    report, files = make(conn, root=tmp_path)
    assert report.dead_letters == (("bad_payload", 2), ("unknown_metric", 1))  # local October
    assert "bad_payload\n2\nunknown_metric\n1\nTotal\n3" in pdf_text(files["pdf"].path)
    summary = sheet_rows(files["xlsx"].path, "Resumo")
    assert ("bad_payload", 2) in summary
    assert ("Total", 3) in summary
    empty, files = make(conn, "beta", "2026-09", root=tmp_path)
    assert empty.dead_letters == ()
    assert "No message of this tenant was refused in the period." in pdf_text(files["pdf"].path)


ALERTS = [  # (tenant, opened_at, severity); the columns are those of the alerts table
    ("acme", "2026-10-03 10:00+00", "CRITICAL"),
    ("acme", "2026-10-04 10:00+00", "WARNING"),
    ("acme", "2026-10-05 10:00+00", "WARNING"),
    ("acme", "2026-09-30 10:00+00", "CRITICAL"),  # September
    ("beta", "2026-10-03 10:00+00", "CRITICAL"),  # another tenant
]


def test_the_alerts_section_reads_the_alerts_table_when_there_is_one(conn, tmp_path):
    """Each case runs in a transaction that is rolled back: the shared database keeps whatever
    alerts table its migrations made (the alerting work adds one)."""
    with conn.transaction(force_rollback=True):
        if conn.execute("SELECT to_regclass('alerts')").fetchone()[0] is not None:
            conn.execute("ALTER TABLE alerts RENAME TO alerts_elsewhere")
        report, files = make(conn, root=tmp_path)
        assert not report.alerts.available
        assert "Ainda não há dados de alertas para este cliente." in pdf_text(files["pdf"].path)
    with conn.transaction(force_rollback=True):
        if conn.execute("SELECT to_regclass('alerts')").fetchone()[0] is None:
            conn.execute(
                "CREATE TABLE alerts (tenant_id integer, source text, alert_key text,"
                " severity text, title text, opened_at timestamptz)"
            )
        for n, (slug, opened, severity) in enumerate(ALERTS):
            conn.execute(
                "INSERT INTO alerts (tenant_id, source, alert_key, severity, title, opened_at)"
                " SELECT tenant_id, 'rule', %s, %s, 'test', %s FROM tenants WHERE slug = %s",
                (f"test-{n}", severity, opened, slug),
            )
        report, files = make(conn, root=tmp_path)
        assert report.alerts.counts == (("WARNING", 2), ("CRITICAL", 1))
        assert "Alertas no período: 3" in pdf_text(files["pdf"].path)
        assert ("WARNING", 2) in sheet_rows(files["xlsx"].path, "Resumo")
        conn.execute("ALTER TABLE alerts RENAME COLUMN opened_at TO at_some_point")
        report, files = make(conn, root=tmp_path)
        assert report.alerts.available
        assert not report.alerts.readable
        assert "sem colunas que este relatório saiba ler" in all_text(files["xlsx"].path)


def test_the_first_page_renders_to_png(conn, tmp_path):
    """pdftoppm (poppler-utils) draws the cover; a copy goes to docs/ for people to look at."""
    if shutil.which("pdftoppm") is None:
        pytest.skip("pdftoppm is not installed (Debian package poppler-utils)")
    _, files = make(conn, root=tmp_path, formats=["pdf"])
    target = tmp_path / "first-page"
    subprocess.run(
        [
            "pdftoppm",
            "-png",
            "-r",
            "60",
            "-f",
            "1",
            "-l",
            "1",
            "-singlefile",
            str(files["pdf"].path),
            str(target),
        ],
        check=True,
        timeout=60,
    )
    png = target.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png.read_bytes()[16:24])
    assert (round(width / 10), round(height / 10)) == (50, 70)  # A4 at 60 dpi
    assert png.stat().st_size > 10_000  # a drawn page, not a blank one
    if os.environ.get("IIOT_REFRESH_DOC_IMAGES"):  # a test run leaves the tree as it found it
        shutil.copyfile(png, DOCS_IMAGE)


def synthetic_report(devices: int, locale: str = "en", names=None) -> ConsumptionReport:
    """A report model without a database, for layout tests of the renderers."""
    tenant = TenantInfo(1, "synth", "Synthetic <Tenant> & Co", "UTC", locale, "active", NOW)
    names = names or [f"Meter {n:04d}" for n in range(devices)]
    lines = tuple(
        DeviceLine(
            device_id=n,
            mac=f"02:00:00:00:{n >> 8:02x}:{n & 255:02x}",
            name=names[n],
            meter_kind="energy",
            status="active",
            unit="kWh",
            consumption=float(devices - n),
            readings=24 * 30,
            days_with_data=30,
            hours_with_data=720 - n % 5,
            counter_resets=0,
            previous_consumption=float(devices - n + 1) if n % 2 else None,
            rank=n + 1,
            share=(devices - n) / (devices * (devices + 1) / 2),
            expected_hours=720,
        )
        for n in range(devices)
    )
    days = tuple(
        DeviceDay(date(2026, 9, 1 + d), n, "kWh", (devices - n) / 30, 24, 24)
        for d in range(30)
        for n in range(devices)
    )
    end = datetime(2026, 10, 1, tzinfo=UTC)
    return ConsumptionReport(
        tenant=tenant,
        period=parse_period("2026-09"),
        generated_at=NOW,
        data_until=end,
        period_hours=720,
        devices=lines,
        device_days=days,
        dead_letters=(("bad_payload", 4),),
        alerts=Alerts(available=False),
    )


def test_the_device_table_repeats_its_header_on_every_page_and_pages_are_numbered(tmp_path):
    report = synthetic_report(160)
    path = tmp_path / "long.pdf"
    result = render_pdf(report, path)
    texts = [page.extract_text() for page in PdfReader(path).pages]
    assert result.pages == len(texts) >= 5
    for number, text in enumerate(texts, start=1):
        assert f"Page {number} of {result.pages}" in text
        assert "Generated 2026-11-02 12:30 (UTC)" in text
    first = next(n for n, t in enumerate(texts) if "Devices: consumption, comparison" in t)
    table_pages = [t for t in texts[first:] if "Meter 0" in t]
    assert len(table_pages) >= 3
    assert all(DEVICE_HEADER in " ".join(t.split()) for t in table_pages)
    rows = "\n".join(texts[first:])
    assert all(f"Meter {n:04d}" in rows for n in range(160))


def test_hostile_names_are_text_in_both_files(tmp_path):
    names = ["<b>bold</b> & <i>", '=cmd|" /C calc"!A0', "Medidor ção 🚀 电表", "x" * 100]
    report = synthetic_report(4, "pt_BR", names)
    render_pdf(report, tmp_path / "r.pdf")
    render_xlsx(report, tmp_path / "r.xlsx")
    text = pdf_text(tmp_path / "r.pdf")
    assert "Synthetic <Tenant> & Co" in text
    assert "<b>bold</b> & <i>" in text
    assert "Medidor ção" in text
    wb = load_workbook(tmp_path / "r.xlsx")
    cells = [row[1] for row in wb["Dispositivos"].iter_rows(min_row=2)]
    assert [c.value for c in cells] == names
    assert {c.data_type for c in cells} == {"s"}  # a formula-looking name stays text


def test_the_workbook_layout(conn, tmp_path):
    _, files = make(conn, root=tmp_path, formats=["xlsx"])
    labels = labels_for("pt_BR")
    wb = load_workbook(files["xlsx"].path)
    assert wb.sheetnames == [
        "Resumo",
        "Dispositivos",
        "Diário",
        "Comparação",
        "Dias por dispositivo",
    ]
    devices = wb["Dispositivos"]
    assert devices.freeze_panes == "A2"
    assert devices.auto_filter.ref == "A1:M6"
    assert devices.column_dimensions["B"].width == 30
    consumption = devices["G2"]
    assert consumption.data_type == "n"
    assert consumption.number_format == '#,##0.000 "kWh"'
    assert devices["L2"].number_format == "0.0%"
    water = next(row for row in devices.iter_rows(min_row=2) if row[4].value == "m3")
    assert water[6].number_format == '#,##0.000 "m3"'
    daily = wb["Diário"]
    assert daily.freeze_panes == "A2"
    assert daily["A2"].is_date
    assert daily["A2"].number_format == "dd/mm/yyyy"
    charts = daily._charts
    assert len(charts) == 2  # kWh, and m3 (water and gas)
    assert [len(chart.series) for chart in charts] == [1, 2]
    summary = wb["Resumo"]
    header = next(r for r in summary.iter_rows() if r[0].value == labels["kind"])[0].row
    assert summary.freeze_panes == f"A{header + 1}"
    assert summary.auto_filter.ref == f"A{header}:K{header + 3}"
    assert files["xlsx"].rows == 3 + 5 + 31 + 5 + 115 + 2 + 1  # data rows of every table


def test_the_workbook_is_streamed_and_keeps_up_with_many_rows(tmp_path):
    report = synthetic_report(300)
    seen = []
    result = render_xlsx(
        report, tmp_path / "big.xlsx", lambda done, total: seen.append((done, total))
    )
    total = count_rows(build_sheets(report))
    assert result.rows == total == 1 + 300 + 30 + 300 + 300 * 30 + 2 + 1
    assert seen[-1] == (total, total)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    rows = sheet_rows(tmp_path / "big.xlsx", "Device days")
    assert len(rows) == 1 + 300 * 30


NOISY = 0.5010000000002037  # a sum of register differences, as the marts carry it


def small_water_report(locale: str = "pt_BR", now: datetime = NOW) -> ConsumptionReport:
    """Two water meters of about half a cubic metre a month in UTC, their values carrying the
    float noise of summed register differences; open until ``now`` when that is in October."""
    tenant = TenantInfo(1, "aqua", "Aqua", "UTC", locale, "active", NOW)
    october = parse_period("2026-10")
    end = min(now, october.bounds("UTC")[1])
    elapsed = [day for day in october.days if datetime.combine(day, datetime.min.time(), UTC) < end]
    per_day = [(0.1 + 0.2) / 9, NOISY / 31]  # 0.0333..., 0.01616...
    lines = tuple(
        DeviceLine(
            device_id=n,
            mac=f"02:00:00:00:0c:0{n}",
            name=f"Torneira {n}",
            meter_kind="water",
            status="active",
            unit="m3",
            consumption=per_day[n] * len(elapsed),
            readings=24 * len(elapsed),
            days_with_data=len(elapsed),
            hours_with_data=24 * len(elapsed) - 3,
            counter_resets=0,
            previous_consumption=0.4000000000000001,
            rank=n + 1,
            share=None,
            expected_hours=24 * len(elapsed),
        )
        for n in range(2)
    )
    days = tuple(DeviceDay(day, n, "m3", per_day[n], 24, 24) for day in elapsed for n in range(2))
    return ConsumptionReport(
        tenant=tenant,
        period=october,
        generated_at=now,
        data_until=end,
        period_hours=24 * len(elapsed),
        devices=lines,
        device_days=days,
        dead_letters=(),
        alerts=Alerts(available=False),
    )


def chart_page(texts: list[str], title: str) -> str:
    return next(t for t in texts if title in t)


def test_axes_and_bar_labels_show_the_decimals_the_unit_needs(tmp_path):
    report = small_water_report()
    render_pdf(report, tmp_path / "r.pdf")
    texts = [page.extract_text() for page in PdfReader(tmp_path / "r.pdf").pages]
    daily = chart_page(texts, "Consumo diário (m3)").split("\n")
    # the value axis of a daily volume of a few hundredths: ticks that differ, not "0,0" each
    ticks = [t for t in daily if re.fullmatch(r"0(,[0-9]+)?", t)]
    assert len(set(ticks)) == len(ticks) >= 3, ticks
    assert "0,0" not in ticks
    top = chart_page(texts, "Maiores consumidores (m3)")
    # the bar labels: each device's volume to the register's 0.001 (they read "0,5" and "1,0")
    assert "1,033\n" in top
    assert "0,501\n" in top
    # the axis ends a step above the largest value, so the largest bar has room for its label
    assert [axis_scale(v, "m3") for v in (0.5, 0.0495, 1115.5, 0)] == [
        AxisScale(0.1, 0.6, 1),
        AxisScale(0.01, 0.06, 2),
        AxisScale(500, 1500, 0),
        AxisScale(1, 1, 0),
    ]

    render_xlsx(report, tmp_path / "r.xlsx")
    [chart] = load_workbook(tmp_path / "r.xlsx")["Diário"]._charts
    # hundredths of a cubic metre a day: "#,##0" showed 0 at every tick
    assert chart.y_axis.number_format.formatCode == "#,##0.00"
    big = synthetic_report(3)  # 0.2 kWh a day
    render_xlsx(big, tmp_path / "big.xlsx")
    [chart] = load_workbook(tmp_path / "big.xlsx")["Daily"]._charts
    assert chart.y_axis.number_format.formatCode == "#,##0.00"


def test_the_future_days_of_an_open_period_are_not_plotted(tmp_path):
    report = small_water_report(now=datetime(2026, 10, 15, 12, 0, tzinfo=UTC))
    assert report.open_period
    drawing = _daily_chart(report, "m3")
    [chart] = [c for c in drawing.contents if isinstance(c, HorizontalLineChart)]
    for series in chart.data:
        assert len(series) == 31  # the month's days on the axis
        assert None not in series[:15]  # Oct 1 to Oct 15 (today, partly)
        assert series[15:] == [None] * 16  # not a line down to 0
    render_xlsx(report, tmp_path / "r.xlsx")
    daily = table(sheet_rows(tmp_path / "r.xlsx", "Diário"), "Dia")
    assert [row["Dia"].date() for row in daily] == [date(2026, 10, d) for d in range(1, 16)]


def consumption_cells(path: Path) -> list[float]:
    """Every volume or energy value of the workbook (not counts, shares or changes in %)."""
    wb = load_workbook(path)
    return [
        cell.value
        for ws in wb
        for row in ws.iter_rows()
        for cell in row
        if cell.data_type == "n"
        and cell.value is not None
        and ('"kWh"' in cell.number_format or '"m3"' in cell.number_format)
    ]


def test_values_are_rounded_to_the_meter_resolution_in_both_files(conn, tmp_path):
    for report, path in (
        (small_water_report(), tmp_path / "small"),
        (make(conn, root=tmp_path / "acme", formats=[])[0], tmp_path / "acme"),
    ):
        render_xlsx(report, path.with_suffix(".xlsx"))
        values = consumption_cells(path.with_suffix(".xlsx"))
        assert len(values) > 20
        noisy = [v for v in values if v != round(v, 3)]
        assert noisy == [], noisy[:5]
        render_pdf(report, path.with_suffix(".pdf"))
        assert not re.search(r"[0-9][.,][0-9]{4,}", pdf_text(path.with_suffix(".pdf")))
    line = small_water_report(now=datetime(2026, 11, 2, tzinfo=UTC)).devices[1]
    assert (line.consumption, line.change) == (0.501, 0.101)  # not 0.5010000000002037


@pytest.mark.parametrize("locale", ["pt_BR", "en"])
def test_table_headers_break_between_words_only(tmp_path, locale):
    report = synthetic_report(12, locale)
    labels = report.labels
    render_pdf(report, tmp_path / "r.pdf")
    lines = set(pdf_text(tmp_path / "r.pdf").split("\n"))
    words = {
        word
        for key in ("share", "completeness", "consumption", "device", "previous_month", "hours")
        for word in labels[key].split()
    }
    broken = {w for w in words if w not in " ".join(lines).split()}
    assert broken == set()  # "Participação", never "Participaç" / "ão"
    render_xlsx(report, tmp_path / "r.xlsx")
    for ws in load_workbook(tmp_path / "r.xlsx"):
        header = next(row for row in ws.iter_rows() if row[0].fill.fgColor.rgb == "001F4E79")
        for cell in header:
            width = ws.column_dimensions[cell.column_letter].width
            longest = max(len(word) for word in str(cell.value).split())
            assert longest + 2 <= width, (ws.title, cell.value, width)


def test_the_summary_says_what_its_hours_and_percentages_are(conn, tmp_path):
    _, files = make(conn, root=tmp_path, formats=["pdf"])
    first = pdf_text(files["pdf"].path, 1)
    # energy: 744 + 504 + 0 hours with data out of 3 devices x 744 hours
    assert "1.248/2.232\n55,9 %" in first
    flat = " ".join(first.split())
    assert "Horas com dados / no período" in flat
    assert "Completude (% das horas)" in flat
    assert (
        "Horas com dados: horas com pelo menos uma leitura, somadas sobre os dispositivos do tipo, "
        "de um total de horas do período vezes o número de dispositivos" in flat
    )


@pytest.mark.parametrize(
    ("text", "kind", "label", "first", "last"),
    [
        ("2026-10", "month", "2026-10", date(2026, 10, 1), date(2026, 10, 31)),
        ("2024-02", "month", "2024-02", date(2024, 2, 1), date(2024, 2, 29)),
        ("2026-12", "month", "2026-12", date(2026, 12, 1), date(2026, 12, 31)),
        ("2026-W44", "week", "2026-W44", date(2026, 10, 26), date(2026, 11, 1)),
        ("2026-W53", "week", "2026-W53", date(2026, 12, 28), date(2027, 1, 3)),
        (" 2026-10-05 ", "range", "2026-10-05", date(2026, 10, 5), date(2026, 10, 5)),
        ("2026-10-05..2026-10-05", "range", "2026-10-05", date(2026, 10, 5), date(2026, 10, 5)),
        (
            "2026-10-01..2026-10-15",
            "range",
            "2026-10-01..2026-10-15",
            date(2026, 10, 1),
            date(2026, 10, 15),
        ),
    ],
)
def test_periods_parse_to_local_days(text, kind, label, first, last):
    period = parse_period(text)
    assert (period.kind, period.label, period.first_day, period.last_day) == (
        kind,
        label,
        first,
        last,
    )
    assert parse_period(period.label) == period


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2026-13", "month must be in 1..12"),
        ("2026-00", "month must be in 1..12"),
        ("2026-W54", "Invalid week: 54"),
        ("2025-W53", "Invalid week: 53"),
        ("2026-02-30", "day is out of range for month"),
        ("2026-10-15..2026-10-01", "the range ends before it starts"),
        ("2025-01-01..2026-06-01", "a range spans at most 366 days"),
        ("1999-12", "years 2000 to 2100 only"),
        ("2026-10..2026-11", "expected a month 2026-10"),
        ("../../etc/passwd", "expected a month 2026-10"),
        ("2026-10'; DROP TABLE tenants; --", "expected a month 2026-10"),
        (
            "\u0662\u0660\u0662\u0666-\u0661\u0660",
            "expected a month 2026-10",
        ),  # Arabic-Indic digits
        ("2026-10\n2026-11", "expected a month 2026-10"),
        ("", "expected a month 2026-10"),
        ("2026-1" + "0" * 5000, "expected a month 2026-10"),
    ],
)
def test_malformed_and_hostile_periods_are_refused_clearly(text, message):
    with pytest.raises(ReportError, match="bad period") as raised:
        parse_period(text)
    assert message in str(raised.value)
    assert len(str(raised.value)) < 300
    assert "\n" not in str(raised.value)


def test_previous_periods_and_local_bounds():
    assert parse_period("2026-03").previous() == parse_period("2026-02")
    assert parse_period("2026-01").previous() == parse_period("2025-12")
    assert parse_period("2026-W01").previous().label == "2025-W52"
    assert parse_period("2026-10-11..2026-10-20").previous().label == "2026-10-01..2026-10-10"
    start, end = parse_period("2026-10").bounds("America/Sao_Paulo")
    assert (start, end) == (
        datetime(2026, 10, 1, 3, tzinfo=UTC),
        datetime(2026, 11, 1, 3, tzinfo=UTC),
    )
    # New York leaves summer time on 2026-11-01: November has 30 * 24 + 1 hours there
    start, end = parse_period("2026-11").bounds("America/New_York")
    assert hours_between(start, end) == 721
    assert Period.from_month_key("2026-10-01") == parse_period("2026-10")


def test_numbers_dates_and_words_follow_the_locale():
    pt, en = labels_for("pt_BR"), labels_for("en")
    assert (pt.number(1234567.891), en.number(1234567.891)) == ("1.234.567,891", "1,234,567.891")
    assert (pt.percent(0.1234), en.percent(-0.5, signed=True)) == ("12,3 %", "-50.0%")
    assert parse_number("1.234.567,891", pt) == pytest.approx(1234567.891)
    assert parse_number(en.number(-42.5), en) == -42.5
    assert (pt.month(date(2026, 3, 1)), en.month(date(2026, 3, 1))) == (
        "março de 2026",
        "March 2026",
    )
    assert pt.day(date(2026, 10, 5)) == "05/10/2026"
    assert pt.kind("water") == "Água"
    assert en.kind("gas") == "Gas"
    assert pt.page(2, 9) == "Página 2 de 9"
    assert pt.number(None) == "\u2013"
    assert set(pt.words) == set(en.words)  # every word in both languages
    with pytest.raises(ValueError, match="no report labels for locale 'fr'"):
        labels_for("fr")


def test_report_paths_are_stable_and_refuse_escapes(tmp_path):
    assert (
        report_path(tmp_path, "acme", "2026-10", "pdf") == tmp_path / "acme/2026-10/consumption.pdf"
    )
    for slug, label in (("../x", "2026-10"), ("acme", ".."), ("acme", "a/b"), ("Acme", "2026-10")):
        with pytest.raises(ReportError):
            report_path(tmp_path, slug, label, "pdf")
    with pytest.raises(ReportError, match="unknown report format 'csv'"):
        report_path(tmp_path, "acme", "2026-10", "csv")


def test_a_failed_render_leaves_the_previous_file_and_no_temporary(conn, tmp_path):
    _, files = make(conn, root=tmp_path, formats=["pdf"])
    before = files["pdf"].path.read_bytes()

    class Boom(Exception):
        pass

    def explode(temporary):
        temporary.write_bytes(b"half a file")
        raise Boom

    with pytest.raises(Boom), atomic_file(files["pdf"].path) as temporary:
        explode(temporary)
    assert files["pdf"].path.read_bytes() == before
    assert [p.name for p in files["pdf"].path.parent.iterdir()] == ["consumption.pdf"]


def test_the_reconciliation_finds_tampered_and_unreadable_files(conn, tmp_path):
    report, files = make(conn, root=tmp_path)
    paths = {k: f.path for k, f in files.items()}
    labels = labels_for("pt_BR")
    wb = load_workbook(paths["xlsx"])
    devices = wb[labels["sheet_devices"]]
    devices["G2"] = devices["G2"].value + 1  # one device 1 kWh more
    wb.save(paths["xlsx"])
    problems = verify_files(conn, report, paths)
    assert problems["pdf"] == []
    assert problems["xlsx"] == [
        f"consumption.xlsx: device {MACS['Chiller <b>& pump']} (kWh) is 1475.0, the marts 1474.0"
    ]

    # a device listed twice (a copied row) counts twice, and so no longer matches
    wb = load_workbook(paths["xlsx"])
    devices = wb[labels["sheet_devices"]]
    devices["G2"] = devices["G2"].value - 1
    devices.append([cell.value for cell in devices[3]])
    wb.save(paths["xlsx"])
    [problem] = verify_files(conn, report, {"xlsx": paths["xlsx"]})["xlsx"][:1]
    assert problem == (
        f"consumption.xlsx: device {MACS['Main board']} (kWh) is 2231.0, the marts 1115.5"
    )

    # a PDF whose printed total is not the marts' (a report model that was changed)
    bigger = replace(
        report, devices=tuple(replace(d, consumption=d.consumption * 2) for d in report.devices)
    )
    render_pdf(bigger, paths["pdf"])
    [problem, *_] = verify_files(conn, report, {"pdf": paths["pdf"]})["pdf"]
    assert problem.startswith("consumption.pdf: energy (kWh) is 5179.0, the marts have 2589.5")

    paths["pdf"].write_bytes(b"%PDF-1.4 truncated")
    paths["xlsx"].write_bytes(b"PK\x03\x04 not really a zip")
    problems = verify_files(conn, report, paths)
    assert problems["pdf"][0].startswith("consumption.pdf is not a readable PDF")
    assert problems["xlsx"][0].startswith("consumption.xlsx is not a readable workbook")

    other = Workbook()
    other.active.title = "Something else"
    other.save(paths["xlsx"])
    assert "unexpected layout" in verify_files(conn, report, {"xlsx": paths["xlsx"]})["xlsx"][0]


@pytest.fixture
def reports_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "reports"
    monkeypatch.setenv("IIOT_REPORTS_ROOT", str(root))
    return root


def materialize_report(instance, url, slug="acme", month="2026-10-01"):
    instance.add_dynamic_partitions(TENANTS, ["acme", "beta"])
    return dg.materialize(
        [consumption_report],
        partition_key=tenant_key(month, slug),
        instance=instance,
        resources={"postgres": PostgresResource(database_url=url)},
        raise_on_error=False,
    )


def test_the_monthly_asset_writes_both_files_with_metadata_and_checks_them(report_db, reports_root):
    with dg.instance_for_test() as instance:
        result = materialize_report(instance, report_db.url)
        assert result.success
        [materialization] = result.asset_materializations_for_node(REPORT_ASSET)
        metadata = materialization.metadata
        pdf = reports_root / "acme" / "2026-10" / "consumption.pdf"
        xlsx = reports_root / "acme" / "2026-10" / "consumption.xlsx"
        assert metadata["pdf_path"].value == str(pdf)
        assert metadata["xlsx_path"].value == str(xlsx)
        assert metadata["pdf_bytes"].value == pdf.stat().st_size
        assert metadata["xlsx_bytes"].value == xlsx.stat().st_size
        assert metadata["pdf_pages"].value == len(PdfReader(pdf).pages)
        assert metadata["xlsx_rows"].value == 162
        assert metadata["devices"].value == 5
        preview = metadata["preview"].value
        assert "| energy | kWh | 3 | 2,589.500 | 55,9 % |" in preview
        assert "Chiller \\<b\\>& pump" in preview  # markup escaped in the Markdown
        [check] = result.get_asset_check_evaluations()
        assert (check.check_name, check.passed) == (TOTALS_MATCH_MARTS, True)
        assert sorted(p.name for p in pdf.parent.iterdir()) == [
            "consumption.pdf",
            "consumption.xlsx",
        ]
        # a tenant whose month has no data still gets its (valid, "no data") report
        assert materialize_report(instance, report_db.url, "beta", "2026-08-01").success


def test_the_report_asset_sits_downstream_of_the_marts_with_tenant_month_partitions():
    graph = defs.resolve_asset_graph()
    node = graph.get(dg.AssetKey(REPORT_ASSET))
    assert node.partitions_def == TENANT_MONTHS
    assert {
        dg.AssetKey("consumption_daily"),
        dg.AssetKey("consumption_monthly"),
    } <= node.parent_keys
    checks = {key.name for key in graph.asset_check_keys if key.asset_key == node.key}
    assert checks == {TOTALS_MATCH_MARTS, CLOSED_MONTHS_REPORTED}
    job = defs.resolve_job_def("consumption_reports_job")
    assert job.asset_layer.selected_asset_keys == {node.key}
    selected = {key.name for key in job.asset_layer.asset_graph.asset_check_keys}
    assert CLOSED_MONTHS_REPORTED not in selected  # not run once per partition
    schedule = defs.resolve_schedule_def("report_coverage_schedule")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("0 7 * * *", "UTC")
    assert defs.resolve_sensor_def("closed_month_reports_sensor").job_name == job.name


def coverage_check(url):
    return dg.materialize(
        [consumption_report, closed_months_reported],
        selection=dg.AssetSelection.checks(closed_months_reported),
        resources={"postgres": PostgresResource(database_url=url)},
        raise_on_error=False,
    )


def test_every_active_tenant_must_have_a_report_for_every_closed_month(
    conn, report_db, reports_root
):
    """Tenants registered on 2026-08-15: August, September and October are closed and due (the
    test runs after 2026-11-02); each missing one fails the check, naming it."""
    [failed] = coverage_check(report_db.url).get_asset_check_evaluations()
    assert not failed.passed
    assert failed.metadata["expected_reports"].value >= 6
    missing = failed.metadata["missing"].value
    assert "- acme 2026-08: pdf, xlsx missing" in missing
    assert "- beta 2026-10: pdf, xlsx missing" in missing

    now = datetime.now(UTC)
    _, due = missing_reports(conn, reports_root, now)
    for report in due:
        make(conn, report.tenant, report.month, root=reports_root, now=now)
    [passed] = coverage_check(report_db.url).get_asset_check_evaluations()
    assert passed.passed, passed.metadata["missing"].value
    assert passed.metadata["missing_reports"].value == 0

    (reports_root / "beta" / "2026-09" / "consumption.xlsx").unlink()
    expected, missing = missing_reports(conn, reports_root, now)
    assert [(m.tenant, m.month, m.formats) for m in missing] == [("beta", "2026-09", ("xlsx",))]
    conn.execute("UPDATE tenants SET status = 'suspended' WHERE slug = 'beta'")
    try:
        fewer, missing = missing_reports(conn, reports_root, now)
    finally:
        conn.execute("UPDATE tenants SET status = 'active' WHERE slug = 'beta'")
    assert missing == []  # a suspended tenant is not owed reports
    assert fewer < expected


def test_closed_months_follow_the_tenants_time_zone():
    created = datetime(2026, 8, 15, 12, tzinfo=UTC)
    # October ends at 2026-11-01 03:00 UTC in Sao Paulo
    before = closed_months(created, "America/Sao_Paulo", datetime(2026, 11, 1, 2, 59, tzinfo=UTC))
    after = closed_months(created, "America/Sao_Paulo", datetime(2026, 11, 1, 3, tzinfo=UTC))
    assert [m.label for m in before] == ["2026-08", "2026-09"]
    assert [m.label for m in after] == ["2026-08", "2026-09", "2026-10"]
    # registered on 2025-12-31 23:30 in Tokyo is 2026-01-01 there; never before the partitions
    early = datetime(2025, 12, 31, 14, 30, tzinfo=UTC)
    assert (
        closed_months(early, "Asia/Tokyo", datetime(2026, 2, 1, tzinfo=UTC))[0].label == "2026-01"
    )
    assert (
        closed_months(datetime(2020, 1, 1, tzinfo=UTC), "UTC", datetime(2026, 2, 1, tzinfo=UTC))[
            0
        ].label
        == "2026-01"
    )


def test_the_sensor_requests_each_closed_month_once_the_marts_are_built_after_it(report_db):
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(
            instance=instance,
            resources={"postgres": PostgresResource(database_url=report_db.url)},
        )
        skipped = closed_month_reports_sensor(context)
        assert isinstance(skipped, dg.SkipReason)
        assert "marts have not been built" in skipped.skip_message

        instance.report_runless_asset_event(dg.AssetMaterialization(MARTS_ASSET))
        instance.add_dynamic_partitions(TENANTS, ["acme"])  # beta's partition not yet added
        result = closed_month_reports_sensor(context)
        keys = [request.partition_key for request in result.run_requests]
        # every month from the seed's August to the last one over in Sao Paulo today
        created = datetime(2026, 8, 15, 12, tzinfo=UTC)
        months = closed_months(created, TENANT_SETTINGS["acme"][0], datetime.now(UTC))
        assert [m.label for m in months][:3] == ["2026-08", "2026-09", "2026-10"]
        assert keys == [tenant_key(m.first_day.isoformat(), "acme") for m in months]
        assert len({request.run_key for request in result.run_requests}) == len(months)

    built = datetime(2026, 11, 1, 3, 30, tzinfo=UTC)
    tenants = [
        ("acme", "America/Sao_Paulo", datetime(2026, 9, 20, tzinfo=UTC)),
        ("tokyo", "Asia/Tokyo", datetime(2026, 9, 20, tzinfo=UTC)),
    ]
    done = {str(tenant_key("2026-09-01", "tokyo"))}
    requests = report_requests(tenants, {"acme", "tokyo"}, done, built, timedelta(minutes=5))
    # acme's October closed at 03:00 UTC: built 03:30 (after the 03:05 rollup) covers it
    assert [str(r.partition_key) for r in requests] == [
        "2026-09-01|acme",
        "2026-10-01|acme",
        "2026-10-01|tokyo",
    ]
    late = report_requests(
        tenants, {"acme"}, set(), built - timedelta(minutes=26), timedelta(minutes=5)
    )
    assert [str(r.partition_key) for r in late] == ["2026-09-01|acme"]
