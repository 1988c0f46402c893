"""Alerts against a real PostgreSQL and a local HTTP server standing in for the webhook and the
Telegram bot API: message format, deduplication, retries, threshold rules, sensors, CLI."""

import json
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import pytest
from click.testing import CliRunner

from iiot_orchestration import alerts, registry
from iiot_orchestration.cli import main
from iiot_orchestration.resources import PostgresResource
from sensors.alerts import (
    certificate_alert,
    dead_letter_alert,
    dead_letter_backlog_sensor,
    freshness_alert,
    ingest_freshness_sensor,
)

NOW = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)


class Receiver:
    """A local HTTP server recording every POST; answers the statuses queued in ``plan``."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []
        self.plan: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((self.path, json.loads(body)))
                status = receiver.plan.pop(0) if receiver.plan else 200
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


def notifier(receiver, **options):
    return alerts.Notifier(
        webhook_url=f"{receiver.url}/hook",
        telegram_token="123:abc",
        telegram_chat_id="-1001",
        telegram_api_url=receiver.url,
        backoff_s=0.01,
        **options,
    )


def an_alert(**fields):
    values = {
        "key": "test:1",
        "severity": "CRITICAL",
        "title": "Main feeder overload",
        "source": "test",
        "detail": {"value": 512.5},
        "at": NOW,
    }
    return alerts.Alert(**{**values, **fields})


def test_webhook_and_telegram_bodies(conn, receiver):
    deliveries = notifier(receiver).notify(conn, an_alert())
    assert [(d.channel, d.status, d.attempts) for d in deliveries] == [
        ("webhook", "sent", 1),
        ("telegram", "sent", 1),
    ]
    (hook_path, hook), (bot_path, bot) = receiver.requests
    assert hook_path == "/hook"
    assert hook["severity"] == "CRITICAL"
    assert hook["title"] == "Main feeder overload"
    assert hook["at"] == "2026-11-20T15:00:00+00:00"
    assert hook["at_local"] == "2026-11-20 12:00:00 (America/Sao_Paulo)"  # UTC-3
    assert bot_path == "/bot123:abc/sendMessage"
    assert bot["chat_id"] == "-1001"
    assert bot["text"].splitlines() == [
        "🚨 [CRITICAL] Main feeder overload",
        "value: 512.5",
        "2026-11-20 12:00:00 (America/Sao_Paulo)",
    ]


def test_the_same_alert_is_not_resent_within_the_window(conn, receiver):
    sender = notifier(receiver, dedup_minutes=30)
    sender.notify(conn, an_alert())
    again = sender.notify(conn, an_alert(at=NOW + timedelta(minutes=10)))
    assert [(d.channel, d.status) for d in again] == [("log", "suppressed")]
    assert len(receiver.requests) == 2
    other = sender.notify(conn, an_alert(key="test:2", at=NOW + timedelta(minutes=10)))
    assert {d.status for d in other} == {"sent"}
    later = sender.notify(conn, an_alert(at=NOW + timedelta(minutes=31)))
    assert {d.status for d in later} == {"sent"}
    assert len(receiver.requests) == 6


def test_failed_deliveries_are_retried_then_recorded(conn, receiver):
    receiver.plan = [500, 503]  # the webhook fails twice, then succeeds
    sender = alerts.Notifier(webhook_url=f"{receiver.url}/hook", backoff_s=0.01, attempts=3)
    [delivery] = sender.notify(conn, an_alert())
    assert (delivery.status, delivery.attempts) == ("sent", 3)
    receiver.plan = [500, 500, 500]
    [delivery] = sender.notify(conn, an_alert(key="test:down"))
    assert (delivery.status, delivery.attempts, delivery.error) == ("failed", 3, "HTTP 500")
    unreachable = alerts.Notifier(webhook_url="http://127.0.0.1:9/hook", backoff_s=0.01)
    [delivery] = unreachable.notify(conn, an_alert(key="test:nowhere"))
    assert delivery.status == "failed"
    recorded = conn.execute(
        "SELECT alert_key, status, attempts FROM alert_deliveries ORDER BY delivery_id"
    ).fetchall()
    assert recorded == [
        ("test:1", "sent", 3),
        ("test:down", "failed", 3),
        ("test:nowhere", "failed", 3),
    ]


def test_without_configuration_alerts_go_to_the_log(conn, caplog):
    [delivery] = alerts.Notifier().notify(conn, an_alert())
    assert (delivery.channel, delivery.status) == ("log", "sent")
    assert "Main feeder overload" in caplog.text


def test_bad_severity_is_refused():
    with pytest.raises(alerts.AlertError, match="unknown severity"):
        an_alert(severity="PANIC")


@pytest.fixture
def fleet(conn):
    tenant = registry.create_tenant(conn, slug="acme", name="Acme", plan="pro", timezone="UTC")
    devices = registry.provision_devices(
        conn,
        "acme",
        [registry.DeviceRequest(f"02:00:00:00:0f:0{n}", "energy") for n in (1, 2)],
    )
    return tenant.tenant_id, [d.device_id for d in devices]


def hourly(conn, tenant_id, device_id, bucket, last_value, metric="power_w"):
    conn.execute(
        "INSERT INTO telemetry_hourly (tenant_id, device_id, metric, bucket, readings,"
        " value_sum, value_min, value_max, value_avg, first_ts, first_value, last_ts,"
        " last_value) VALUES (%s, %s, %s, %s, 1, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            tenant_id,
            device_id,
            metric,
            bucket,
            last_value,
            last_value,
            last_value,
            last_value,
            bucket,
            last_value,
            bucket + timedelta(minutes=59),
            last_value,
        ),
    )


def test_threshold_rules_open_and_resolve_alerts(conn, fleet, receiver):
    tenant_id, (first, second) = fleet
    hour = NOW.replace(minute=0) - timedelta(hours=1)
    hourly(conn, tenant_id, first, hour, 900.0)
    hourly(conn, tenant_id, second, hour, 100.0)
    above = alerts.add_rule(
        conn,
        tenant="acme",
        name="Overload",
        kind="above",
        severity="CRITICAL",
        metric="power_w",
        threshold=500,
    )
    below = alerts.add_rule(
        conn,
        tenant="acme",
        name="Dropout",
        kind="below",
        severity="WARNING",
        metric="power_w",
        threshold=50,
        device_mac="02:00:00:00:0f:02",
    )
    silent = alerts.add_rule(
        conn, tenant="acme", name="Silent", kind="no_data", severity="INFO", window_minutes=30
    )
    conn.execute("UPDATE devices SET last_seen = %s", (NOW - timedelta(minutes=5),))
    sender = notifier(receiver)
    result = alerts.evaluate_rules(conn, sender, now=NOW)
    assert [(a.rule_id, a.device_id) for a in result.opened] == [(above, first)]
    assert len(receiver.requests) == 2  # webhook + telegram for the one new alert

    # the condition persists: no new alert, no new delivery
    assert alerts.evaluate_rules(conn, sender, now=NOW).opened == []
    assert len(receiver.requests) == 2

    # next hour: the first device is back to normal, the second dropped, both went silent
    later = NOW + timedelta(hours=1)
    hourly(conn, tenant_id, first, hour + timedelta(hours=1), 300.0)
    hourly(conn, tenant_id, second, hour + timedelta(hours=1), 10.0)
    result = alerts.evaluate_rules(conn, sender, now=later)
    assert sorted((a.rule_id, a.device_id) for a in result.opened) == sorted(
        [(below, second), (silent, first), (silent, second)]
    )
    assert result.resolved == 1
    history = alerts.list_alerts(conn, "acme", "all")
    assert [(a["state"], a["severity"]) for a in history if a["title"].startswith("Overload")] == [
        ("resolved", "CRITICAL")
    ]
    # a disabled rule's alerts resolve
    conn.execute("UPDATE alert_rules SET enabled = false WHERE rule_id = %s", (silent,))
    assert alerts.evaluate_rules(conn, sender, now=later).resolved == 2


def test_rate_of_change_rule(conn, fleet):
    tenant_id, (first, _) = fleet
    start = NOW.replace(minute=0) - timedelta(hours=3)
    for n, value in enumerate((100.0, 110.0, 400.0)):
        hourly(conn, tenant_id, first, start + timedelta(hours=n), value, metric="energy_kwh")
    rule = alerts.add_rule(
        conn,
        tenant="acme",
        name="Jump",
        kind="rate_of_change",
        severity="WARNING",
        metric="energy_kwh",
        threshold=100,
        window_minutes=60,
    )
    [opened] = alerts.evaluate_rules(conn, now=NOW).opened
    assert opened.rule_id == rule
    assert opened.detail["rate_per_hour"] == 290.0  # 110 -> 400 in one hour


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "above", "metric": "power_w"}, "needs a finite --threshold"),
        ({"kind": "above", "metric": "power_w", "threshold": float("nan")}, "finite"),
        ({"kind": "above", "threshold": 5.0}, "needs a --metric"),
        ({"kind": "no_data", "threshold": 5.0}, "has no threshold"),
        ({"kind": "sideways", "metric": "power_w", "threshold": 1.0}, "unknown rule kind"),
        ({"kind": "above", "metric": "nope", "threshold": 1.0}, "unknown metric"),
        ({"kind": "above", "metric": "power_w", "threshold": 1.0, "device_mac": "zz"}, "MAC"),
        (
            {
                "kind": "above",
                "metric": "power_w",
                "threshold": 1.0,
                "device_mac": "02:00:00:00:99:99",
            },
            "no device",
        ),
        ({"kind": "no_data", "window_minutes": 0}, "1 to 10080 minutes"),
        ({"kind": "no_data", "tenant": "nobody"}, "unknown tenant"),
        ({"kind": "no_data", "name": " "}, "needs a name"),
    ],
)
def test_bad_rules_are_refused(conn, fleet, options, message):
    values = {"tenant": "acme", "name": "rule", "severity": "WARNING", **options}
    with pytest.raises(alerts.AlertError, match=message):
        alerts.add_rule(conn, **values)


def test_operational_sensors(conn, database_url, fleet, monkeypatch):
    tenant_id, (first, _) = fleet
    for n in range(3):
        conn.execute(
            "INSERT INTO dead_letters (received_at, topic, reason, payload, payload_size)"
            " VALUES (%s, 't', %s, '', 0)",
            (NOW - timedelta(minutes=n), "bad_json" if n else "rate_limited"),
        )
    backlog = dead_letter_alert(conn, threshold=2, now=NOW)
    assert backlog.detail["by_reason"] == {"bad_json": 2, "rate_limited": 1}
    assert dead_letter_alert(conn, threshold=3, now=NOW) is None

    conn.execute("UPDATE devices SET last_seen = %s", (NOW - timedelta(minutes=40),))
    stale = freshness_alert(conn, minutes=15, now=NOW)
    assert (stale.severity, stale.detail["online_devices"]) == ("CRITICAL", 2)
    assert freshness_alert(conn, minutes=60, now=NOW) is None

    assert certificate_alert(conn, NOW) is None
    conn.execute(
        "INSERT INTO device_certificates (tenant_id, device_id, serial, subject_cn,"
        " fingerprint_sha256, not_before, not_after, certificate_pem)"
        " VALUES (%s, %s, 1, 'cn', 'fp', %s, %s, 'pem')",
        (tenant_id, first, NOW - timedelta(days=3650), NOW + timedelta(days=10)),
    )
    assert certificate_alert(conn, NOW).severity == "WARNING"
    assert certificate_alert(conn, NOW + timedelta(days=11)).severity == "CRITICAL"

    # the sensors open, then resolve, the alert
    monkeypatch.setenv("IIOT_ALERT_DEAD_LETTER_THRESHOLD", "1")
    monkeypatch.setenv("IIOT_FRESHNESS_MINUTES", "15")
    conn.execute("UPDATE dead_letters SET received_at = now()")
    conn.execute("UPDATE devices SET last_seen = now() - interval '2 hours'")
    resources = {"postgres": PostgresResource(database_url=database_url)}
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources=resources)
        assert "log:sent" in dead_letter_backlog_sensor(context).skip_message
        assert "log:sent" in ingest_freshness_sensor(context).skip_message
        conn.execute("DELETE FROM dead_letters")
        conn.execute("UPDATE devices SET last_seen = now()")
        assert dead_letter_backlog_sensor(context).skip_message.endswith("resolved")
        assert ingest_freshness_sensor(context).skip_message.endswith("resolved")
    states = conn.execute("SELECT source, state FROM alerts ORDER BY alert_id").fetchall()
    assert states == [("dead_letters", "resolved"), ("ingest_freshness", "resolved")]


def test_run_failure_sensor_alerts(conn, database_url, monkeypatch, receiver):
    from sensors.alerts import run_failure_alert_sensor

    monkeypatch.setenv("IIOT_DATABASE_URL", database_url)
    monkeypatch.setenv("IIOT_ALERT_WEBHOOK_URL", f"{receiver.url}/hook")

    @dg.op
    def broken():
        raise RuntimeError("meter table exploded")

    @dg.job
    def fragile():
        broken()

    with dg.instance_for_test() as instance:
        result = fragile.execute_in_process(instance=instance, raise_on_error=False)
        failure = next(e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE")
        context = dg.build_run_status_sensor_context(
            sensor_name="run_failure_alert_sensor",
            dagster_event=failure,
            dagster_instance=instance,
            dagster_run=result.dagster_run,
        ).for_run_failure()
        run_failure_alert_sensor(context)
    [(_path, body)] = receiver.requests
    assert body["severity"] == "CRITICAL"
    assert body["title"] == "Dagster run of fragile failed"
    assert body["detail"]["job"] == "fragile"


@pytest.fixture
def run(cli_env, monkeypatch):
    for key in [k for k in cli_env if k.startswith("IIOT_")]:
        monkeypatch.setenv(key, cli_env[key])

    def invoke(*args):
        return CliRunner().invoke(main, list(args))

    return invoke


def test_cli_rules_and_alerts(conn, fleet, run):
    result = run(
        "alerts",
        "rules",
        "add",
        "--tenant",
        "acme",
        "--name",
        "Overload",
        "--kind",
        "above",
        "--metric",
        "power_w",
        "--threshold",
        "500",
        "--severity",
        "CRITICAL",
    )
    assert result.exit_code == 0, result.output
    rule_id = int(result.output.split()[1])
    listed = json.loads(run("alerts", "rules", "list", "--tenant", "acme", "--json").output)
    assert [(r["id"], r["kind"], r["threshold"], r["enabled"]) for r in listed] == [
        (rule_id, "above", 500.0, True)
    ]
    assert run("alerts", "rules", "disable", str(rule_id)).exit_code == 0
    assert run("alerts", "rules", "enable", str(rule_id)).exit_code == 0
    assert "no open alerts for acme" in run("alerts", "list", "--tenant", "acme").output
    tenant_id, (first, _) = fleet
    hourly(
        conn, tenant_id, first, datetime.now(UTC).replace(minute=0, second=0, microsecond=0), 900.0
    )
    alerts.evaluate_rules(conn)
    table = run("alerts", "list", "--tenant", "acme").output
    assert "CRITICAL" in table
    assert "Overload: 02:00:00:00:0f:01" in table
    assert run("alerts", "rules", "delete", str(rule_id)).exit_code == 0
    result = run("alerts", "rules", "delete", str(rule_id))
    assert (result.exit_code, "no rule" in result.output) == (1, True)
    result = run(
        "alerts",
        "rules",
        "add",
        "--tenant",
        "acme",
        "--name",
        "x",
        "--kind",
        "above",
        "--metric",
        "power_w",
    )
    assert result.exit_code == 1
    assert "needs a finite --threshold" in result.output
    result = run("alerts", "list", "--tenant", "ghost")
    assert (result.exit_code, "unknown tenant" in result.output) == (1, True)


def test_restore_drill_sensor(conn, database_url):
    from sensors.alerts import drill_alerts, restore_drill_sensor

    if conn.execute("SELECT to_regclass('backup_drills')").fetchone()[0] is None:
        pytest.skip("the backup_drills table comes with the backups migration, not present")

    def drill(status, finished, error=None):
        conn.execute(
            "INSERT INTO backup_drills (database_name, scratch_database, status, started_at,"
            " finished_at, rpo_target_seconds, rto_target_seconds, error)"
            " VALUES ('iiot', 'iiot_drill_x', %s, %s, %s, 86400, 3600, %s)",
            (status, finished - timedelta(minutes=5), finished, error),
        )

    assert drill_alerts(conn, NOW) == {}
    drill("passed", NOW - timedelta(days=2))
    assert drill_alerts(conn, NOW) == {"restore_drill:iiot": None}
    assert drill_alerts(conn, NOW + timedelta(days=5)) == {"restore_drill:iiot": None}
    stale = drill_alerts(conn, NOW + timedelta(days=6, hours=1))["restore_drill:iiot"]
    assert stale.severity == "WARNING"
    drill("failed", NOW - timedelta(days=1), "sha256 mismatch: the dump was altered")
    failed = drill_alerts(conn, NOW)["restore_drill:iiot"]
    assert (failed.severity, failed.detail["error"]) == (
        "CRITICAL",
        "sha256 mismatch: the dump was altered",
    )
    resources = {"postgres": PostgresResource(database_url=database_url)}
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources=resources)
        assert "log:sent" in restore_drill_sensor(context).skip_message
    drill("passed", datetime.now(UTC))
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources=resources)
        assert restore_drill_sensor(context).skip_message.endswith("resolved")
