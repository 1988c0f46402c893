"""The critical flow end to end, with real processes: a simulated fleet (`iiot simulate`)
publishes to Mosquitto, `iiot ingest` lands it in PostgreSQL, the rollups, the dbt marts, the
billing draft and the report files follow through Dagster. Two failure flows: a malformed burst
lands in dead letters while the rest flows, and the database goes away mid-stream (connections
cut and refused, as in a restart) and nothing is lost or doubled."""

import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import paho.mqtt.client as mqtt
import pytest

from assets.marts import dbt_resource, marts
from assets.reports import consumption_report
from assets.rollups import telemetry_daily, telemetry_hourly
from iiot_orchestration import billing, billing_exports, registry
from iiot_orchestration.partitions import TENANTS, tenant_key
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.services import free_port
from iiot_orchestration.storage import storage_for
from tests.ingest_helpers import count, database_refusing_ingest, wait_for

DEVICES = 4
MESSAGES = 15  # per device; an energy meter's message carries energy_kwh and power_w
READINGS = DEVICES * MESSAGES * 2
IIOT = [sys.executable, "-m", "iiot_orchestration.cli"]


def health(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:  # 503 while not ready
        return exc.code
    except OSError:
        return 0


@pytest.fixture
def fleet(conn, database_url, ingest_broker, tmp_path):
    """A pro tenant with four energy meters, the ingest daemon running as `iiot ingest`."""
    registry.create_tenant(conn, slug="acme", name="Acme", plan="pro", timezone="UTC")
    registry.provision_devices(
        conn,
        "acme",
        [registry.DeviceRequest(f"02:00:00:00:e2:0{n}", "energy") for n in range(DEVICES)],
    )
    today = datetime.now(UTC).date()
    storage_for(conn).ensure_partitions(conn, today - timedelta(days=1), today + timedelta(days=1))
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(
        IIOT_DATABASE_URL=database_url,
        IIOT_MQTT_URL=ingest_broker.url,
        IIOT_DATA_DIR=str(tmp_path / "var"),
        IIOT_REPORTS_ROOT=str(tmp_path / "reports"),
    )
    port = free_port()
    log = (tmp_path / "ingest.log").open("w")
    daemon = subprocess.Popen(
        [
            *IIOT,
            "ingest",
            "--group",
            "e2e",
            "--batch-age-ms",
            "50",
            "--metrics-port",
            str(port),
            "--stop-timeout",
            "60",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    ready = f"http://127.0.0.1:{port}/health/ready"
    try:
        assert wait_for(lambda: health(ready) == 200, 120), "iiot ingest did not become ready"
        yield env, ready, daemon
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(10)
            log.close()


def simulate(env, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*IIOT, "simulate", "--tenant", "acme", "--count", str(MESSAGES), "--rate", "20", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    return output


def test_fleet_to_rollups_marts_billing_and_reports(
    conn, database_url, fleet, tmp_path, monkeypatch
):
    env, _, _ = fleet
    finish(simulate(env))
    assert wait_for(lambda: count(conn, "telemetry") == READINGS, 60)
    assert count(conn, "dead_letters") == 0

    resources = {"postgres": PostgresResource(database_url=database_url)}
    today = datetime.now(UTC).date()
    rolled = dg.materialize(
        [telemetry_hourly, telemetry_daily], partition_key=f"{today}", resources=resources
    )
    assert rolled.success
    assert all(e.passed for e in rolled.get_asset_check_evaluations())
    assert conn.execute("SELECT sum(readings) FROM telemetry_daily").fetchone()[0] == READINGS

    built = dg.materialize([marts], resources={**resources, "dbt": dbt_resource()})
    assert built.success
    devices_in_marts = conn.execute(
        "SELECT count(DISTINCT device_id) FROM marts.consumption_daily WHERE local_day = %s",
        (today,),
    ).fetchone()[0]
    assert devices_in_marts == DEVICES

    who = billing.tenant(conn, "acme")
    label = today.replace(day=1)
    # as the nightly run tonight: the month to date, today included
    outcome = billing.bill(conn, who, label, today=today + timedelta(days=1))
    assert outcome.invoice.status == "draft"
    usage = conn.execute(
        "SELECT messages, readings, active_devices, consumption ? 'kWh'"
        "  FROM billing_daily_usage WHERE tenant_id = %s AND day = %s",
        (who.tenant_id, today),
    ).fetchone()
    assert usage == (DEVICES * MESSAGES, READINGS, DEVICES, True)
    assert billing.reconcile(conn, who, outcome.invoice.period, today + timedelta(days=1)) == (
        READINGS,
        READINGS,
    )

    files = billing_exports.export(Path(env["IIOT_REPORTS_ROOT"]), who, outcome.invoice)
    assert files.pdf.stat().st_size > 1000
    assert files.xlsx.stat().st_size > 1000

    # the month's consumption report, through its asset, with the totals check reading it back
    monkeypatch.setenv("IIOT_REPORTS_ROOT", env["IIOT_REPORTS_ROOT"])
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(TENANTS, ["acme"])
        reported = dg.materialize(
            [consumption_report],
            partition_key=tenant_key(f"{label}", "acme"),
            instance=instance,
            resources=resources,
        )
    assert reported.success
    assert all(e.passed for e in reported.get_asset_check_evaluations())
    folder = Path(env["IIOT_REPORTS_ROOT"]) / "acme" / f"{label:%Y-%m}"
    assert sorted(p.name for p in folder.iterdir()) == [
        "consumption.pdf",
        "consumption.xlsx",
        "invoice.pdf",
        "invoice.xlsx",
    ]


def test_a_malformed_burst_is_dead_lettered_while_the_rest_flows(conn, fleet, ingest_broker):
    env, _, _ = fleet
    fleet_run = simulate(env)
    burst = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    burst.connect(ingest_broker.host, ingest_broker.port)
    burst.loop_start()
    try:
        topic = "iiot/devices/02:00:00:00:e2:00/telemetry"
        for n in range(50):
            payload = [b"\x00\xff", b"{", b'{"ts": 1}', b"[" * 5000, b"null"][n % 5]
            burst.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        burst.loop_stop()
        burst.disconnect()
    finish(fleet_run)
    assert wait_for(lambda: count(conn, "dead_letters") == 50, 60)
    assert wait_for(lambda: count(conn, "telemetry") == READINGS, 60)
    reasons = dict(conn.execute("SELECT reason, count(*) FROM dead_letters GROUP BY 1").fetchall())
    assert sum(reasons.values()) == 50
    assert len(reasons) >= 2


def test_the_database_going_away_mid_stream_loses_and_doubles_nothing(
    conn, database_url, pg_server, fleet
):
    env, ready, _ = fleet
    fleet_run = simulate(env, "--rate", "1")
    assert wait_for(lambda: count(conn, "telemetry") > 0, 30)
    cut = threading.Event()
    with database_refusing_ingest(pg_server, database_url):
        cut.set()
        assert wait_for(lambda: health(ready) == 503, 30)  # it met the outage, retries
    finish(fleet_run)
    assert cut.is_set()
    assert wait_for(lambda: count(conn, "telemetry") == READINGS, 90)
    assert wait_for(lambda: health(ready) == 200, 30)
    doubled = conn.execute(
        "SELECT count(*) FROM (SELECT device_id, metric, ts FROM telemetry"
        " GROUP BY 1, 2, 3 HAVING count(*) > 1) d"
    ).fetchone()[0]
    assert doubled == 0
    messages = conn.execute("SELECT sum(messages) FROM ingest_usage").fetchone()[0]
    assert messages == DEVICES * MESSAGES  # each message counted once for billing
