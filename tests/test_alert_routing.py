"""Alert routing: the Prometheus rules with promtool, the Alertmanager configuration with amtool,
the webhook receiver against a real database and a local HTTP server standing in for the
generic webhook and Telegram, and one end-to-end run: a real Prometheus scrapes an ingest
metrics server the test stops, and IngestDown reaches the webhook through a real Alertmanager.
Prometheus and Alertmanager are the Debian packages prometheus and prometheus-alertmanager."""

import http.client
import json
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from iiot_orchestration import alert_webhook
from iiot_orchestration.alert_webhook import AlertmanagerReceiver, parse_payload
from iiot_orchestration.services import free_port
from tests.ingest_helpers import wait_for
from tests.test_alerts import Receiver, notifier, receiver  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "ops" / "prometheus"
ALERTMANAGER_CONFIG = ROOT / "ops" / "alertmanager" / "alertmanager.yml"


def binary(package: str, *names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(f"{names[0]} not on PATH: install the Debian package {package}")


def rules() -> dict[str, dict]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_promtool_checks_the_rules_and_the_configuration():
    promtool = binary("prometheus", "promtool")
    checked = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 2 rule files found" in checked.stdout


def test_every_alert_fires_on_a_synthetic_series_and_stays_quiet_on_a_normal_one():
    promtool = binary("prometheus", "promtool")
    tests_file = PROMETHEUS_DIR / "rules_test.yml"
    fires, quiet = set(), set()
    for group in yaml.safe_load(tests_file.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            (fires if case["exp_alerts"] else quiet).add(case["alertname"])
    assert fires == set(rules()), set(rules()) ^ fires
    assert quiet == set(rules()), set(rules()) ^ quiet
    run = subprocess.run(
        [promtool, "test", "rules", str(tests_file)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_rule_has_severity_component_and_an_existing_runbook():
    for name, rule in rules().items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["labels"]["component"] in ("ingest", "dagster", "api"), name
        runbook = rule["annotations"]["runbook_url"]
        assert runbook.startswith("docs/runbooks/"), name
        text = (ROOT / runbook).read_text()
        assert name in text, f"{runbook} does not name {name}"


def test_alertmanager_configuration_routes_to_the_webhook_and_inhibits_warnings():
    amtool = binary("prometheus-alertmanager", "amtool")
    checked = subprocess.run(
        [amtool, "check-config", str(ALERTMANAGER_CONFIG)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    (receiver_config,) = config["receivers"]
    (hook,) = receiver_config["webhook_configs"]
    assert hook["url"].endswith(f":9095{alert_webhook.PATH}")  # `iiot alert-webhook` default
    assert hook["send_resolved"] is True
    (inhibit,) = config["inhibit_rules"]
    assert inhibit["source_matchers"] == ['severity="critical"']
    assert inhibit["target_matchers"] == ['severity="warning"']
    assert inhibit["equal"] == ["component"]
    # a critical and a warning of the same component: amtool routes both to the webhook
    for labels in (
        "alertname=IngestDown severity=critical",
        "alertname=IngestLag severity=warning",
    ):
        routed = subprocess.run(
            [
                amtool,
                "config",
                "routes",
                "test",
                f"--config.file={ALERTMANAGER_CONFIG}",
                *labels.split(),
                "component=ingest",
            ],
            capture_output=True,
            text=True,
        )
        assert routed.stdout.strip() == "iiot-webhook", routed.stdout + routed.stderr


RUNBOOKS = [
    "ingest-down",
    "broker-down",
    "database-down",
    "dead-letter-backlog",
    "ingest-lag",
    "billing-run-failed",
    "backup-failed",
    "crl-stale",
]
SQL_BLOCK = re.compile(r"```sql\n(.*?)```", re.DOTALL)


def test_the_runbooks_queries_run_against_the_schema(conn):
    ran = 0
    for name in RUNBOOKS:
        text = (ROOT / "docs" / "runbooks" / f"{name}.md").read_text()
        queries = [q for block in SQL_BLOCK.findall(text) for q in block.split(";") if q.strip()]
        queries += re.findall(r"`(SELECT [^`]+);`", text)
        for query in queries:
            conn.execute(query).fetchall()
            ran += 1
    assert ran >= 5


def test_the_late_tenants_query_keeps_each_tenants_own_clock(conn):
    """The billing SLO is 04:00 in each tenant's time zone; NightlyBillingLate keeps São Paulo's.
    The runbook's query lists the tenants whose own 04:00 passed without yesterday's usage."""
    from iiot_orchestration import registry

    text = (ROOT / "docs" / "runbooks" / "billing-run-failed.md").read_text()
    [query] = [b for b in SQL_BLOCK.findall(text) if "unbilled_day" in b]
    zones = {"tokyo": "Asia/Tokyo", "sp": "America/Sao_Paulo", "new": "UTC"}
    for slug, zone in zones.items():
        registry.create_tenant(conn, slug=slug, name=slug, plan="pro", timezone=zone)
    conn.execute("UPDATE tenants SET created_at = now() - interval '5 days' WHERE slug <> 'new'")
    late = {slug: day for slug, _, day, _ in conn.execute(query.rstrip().rstrip(";"))}
    # each tenant's last night whose 04:00 has passed, in its zone; "new" was created today
    expected = {}
    for slug in ("tokyo", "sp"):
        [[day]] = conn.execute(
            "SELECT (now() AT TIME ZONE %s - interval '4 hours')::date - 1", (zones[slug],)
        )
        expected[slug] = day
    assert late == expected
    conn.execute(
        "INSERT INTO billing_daily_usage (tenant_id, day, plan_id, messages, readings,"
        " overage_messages, rate_limited, active_devices, provisioned_devices, stored_readings,"
        " bytes_per_reading, storage_bytes)"
        " SELECT tenant_id, %s, 'pro', 0, 0, 0, 0, 0, 0, 0, 100, 0"
        " FROM tenants WHERE slug = 'tokyo'",
        (expected["tokyo"],),
    )
    assert [row[0] for row in conn.execute(query.rstrip().rstrip(";"))] == ["sp"]


# --- the receiver ---------------------------------------------------------------------------

NOW = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)


def am_alert(status="firing", name="IngestDown", instance="127.0.0.1:9108", **extra):
    return {
        "status": status,
        "labels": {
            "alertname": name,
            "severity": "critical",
            "component": "ingest",
            "job": "iiot-ingest",
            "instance": instance,
        },
        "annotations": {
            "summary": f"Ingest process {instance} is down",
            "description": "Prometheus cannot scrape it for 2 minutes.",
            "runbook_url": "docs/runbooks/ingest-down.md",
        },
        "startsAt": "2026-11-20T14:58:00Z",
        "fingerprint": "0123456789abcdef",
        **extra,
    }


def payload(*alerts_, status="firing") -> bytes:
    return json.dumps(
        {"version": "4", "status": status, "receiver": "iiot-webhook", "alerts": list(alerts_)}
    ).encode()


@pytest.fixture
def webhook(database_url, receiver):  # noqa: F811 - the receiver fixture
    """The receiver on a free port, delivering to the local HTTP server."""
    handler = AlertmanagerReceiver(
        notifier(receiver), database_url, runbook_base="https://git.example/iiot/-/blob/main/"
    )
    server = handler.serve("127.0.0.1", 0)
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield handler
    server.shutdown()
    server.server_close()


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_firing_alert_is_recorded_and_delivered_once(webhook, receiver, conn):  # noqa: F811
    url = webhook.url + alert_webhook.PATH
    status, first = post(url, payload(am_alert()))
    assert (status, first["deliveries"]) == (200, {"sent": 2})
    (_, hook), (_, bot) = receiver.requests
    assert hook["key"] == "prometheus:IngestDown:0123456789abcdef"
    assert (hook["severity"], hook["source"]) == ("CRITICAL", "prometheus")
    assert hook["title"] == "Ingest process 127.0.0.1:9108 is down"
    assert hook["detail"]["runbook"] == (
        "https://git.example/iiot/-/blob/main/docs/runbooks/ingest-down.md"
    )
    assert hook["detail"]["instance"] == "127.0.0.1:9108"
    assert bot["text"].startswith("🚨 [CRITICAL] Ingest process 127.0.0.1:9108 is down\n")
    # Alertmanager sends the group again (repeat_interval, a retry): recorded, not resent
    status, again = post(url, payload(am_alert(), am_alert()))
    assert (status, again["deliveries"]) == (200, {"suppressed": 1})
    assert len(receiver.requests) == 2
    rows = conn.execute(
        "SELECT source, severity, state, title FROM alerts WHERE alert_key = %s",
        (hook["key"],),
    ).fetchall()
    assert rows == [("prometheus", "CRITICAL", "open", "Ingest process 127.0.0.1:9108 is down")]


def test_a_resolved_alert_is_closed_and_said_once(webhook, receiver, conn):  # noqa: F811
    url = webhook.url + alert_webhook.PATH
    post(url, payload(am_alert()))
    assert post(url, payload(am_alert(status="resolved")))[0] == 200
    assert post(url, payload(am_alert(status="resolved")))[1]["deliveries"] == {}
    titles = [body.get("title") or body["text"] for _path, body in receiver.requests]
    assert titles[2] == "Resolved: Ingest process 127.0.0.1:9108 is down"
    assert len(receiver.requests) == 4  # firing and resolved, each to webhook and Telegram
    states = conn.execute("SELECT state FROM alerts WHERE source = 'prometheus'").fetchall()
    assert states == [("resolved",)]


MALFORMED = [
    (b"not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[]", "no list of alerts"),
    (b'{"alerts": 3}', "no list of alerts"),
    (payload("x"), "alert 0 is not an object"),
    (payload(am_alert(status="pending")), "status must be firing or resolved"),
    (payload(am_alert(labels={"severity": "critical"})), "no alertname"),
    (payload(am_alert(labels={"alertname": 5})), "must be a string"),
    (payload(am_alert(annotations=["summary"])), "annotations must be an object"),
    (payload(*[am_alert(instance=str(n)) for n in range(1001)]), "at most 1000"),
]


def test_malformed_payloads_are_refused_and_deliver_nothing(webhook, receiver, conn):  # noqa: F811
    for body, says in MALFORMED:
        status, answer = post(webhook.url + alert_webhook.PATH, body)
        assert (status, says in answer["error"]) == (400, True), (body[:60], answer)
    assert receiver.requests == []
    assert conn.execute("SELECT count(*) FROM alerts").fetchone() == (0,)


def test_oversized_unsized_and_misdirected_requests_are_refused(webhook, receiver):  # noqa: F811
    webhook.max_body_bytes = 4096
    port = int(webhook.url.rsplit(":", 1)[1])
    # the answer comes before the body, which is never read: send the headers alone
    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.putrequest("POST", alert_webhook.PATH)
    connection.putheader("Content-Length", str(50 << 20))
    connection.endheaders()
    response = connection.getresponse()
    assert (response.status, json.loads(response.read())) == (
        413,
        {"error": "body over 4096 bytes"},
    )
    connection.close()
    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.putrequest("POST", alert_webhook.PATH)
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    assert connection.getresponse().status == 411
    connection.close()
    assert post(webhook.url + "/other", payload(am_alert()))[0] == 404
    assert receiver.requests == []


def test_a_token_is_required_when_configured(webhook, receiver):  # noqa: F811
    webhook.token = "s3cret"
    url = webhook.url + alert_webhook.PATH
    assert post(url, payload(am_alert()))[0] == 401
    assert post(url, payload(am_alert()), {"Authorization": "Bearer wrong"})[0] == 401
    assert receiver.requests == []
    assert post(url, payload(am_alert()), {"Authorization": "Bearer s3cret"})[0] == 200
    assert len(receiver.requests) == 2


def test_without_the_database_alerts_still_go_out_deduplicated(receiver):  # noqa: F811
    down = f"postgresql://iiot@127.0.0.1:{free_port()}/iiot"
    handler = AlertmanagerReceiver(notifier(receiver), down)
    firing = parse_payload(payload(am_alert()), now=NOW)
    outcome = handler.handle(firing)
    assert (outcome.database, [d.status for d in outcome.deliveries]) == (False, ["sent"] * 2)
    later = parse_payload(payload(am_alert()), now=NOW + timedelta(minutes=5))
    assert [d.status for d in handler.handle(later).deliveries] == ["suppressed"]
    resolved = parse_payload(payload(am_alert(status="resolved")), now=NOW + timedelta(minutes=6))
    assert [d.status for d in handler.handle(resolved).deliveries] == ["sent"] * 2
    assert handler.handle(resolved).deliveries == []
    hook_titles = [body["title"] for path, body in receiver.requests if path == "/hook"]
    assert hook_titles == [
        "Ingest process 127.0.0.1:9108 is down",
        "Resolved: Ingest process 127.0.0.1:9108 is down",
    ]


def test_failed_channels_make_alertmanager_retry(webhook, receiver, conn):  # noqa: F811
    receiver.plan = [500] * 6  # three attempts each for the webhook and Telegram
    status, answer = post(webhook.url + alert_webhook.PATH, payload(am_alert()))
    assert (status, answer["deliveries"]) == (502, {"failed": 2})
    # the retry is not suppressed: nothing was sent
    status, answer = post(webhook.url + alert_webhook.PATH, payload(am_alert()))
    assert (status, answer["deliveries"]) == (200, {"sent": 2})


def test_the_cli_serves_the_webhook(cli_env):
    port = free_port()
    iiot = Path(sys.executable).with_name("iiot")
    process = subprocess.Popen(
        [str(iiot), "alert-webhook", "--port", str(port)],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        health = f"http://127.0.0.1:{port}/health"

        def answers() -> bool:
            try:
                with urllib.request.urlopen(health, timeout=1) as response:
                    return json.loads(response.read()) == {"status": "live"}
            except OSError:
                return False

        assert wait_for(answers, 20)
        status, answer = post(f"http://127.0.0.1:{port}{alert_webhook.PATH}", b"{}")
        assert (status, answer["error"]) == (400, "not an Alertmanager payload: no list of alerts")
    finally:
        process.terminate()
        try:
            out, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
    assert f"receiving Alertmanager webhooks on http://127.0.0.1:{port}/alertmanager" in out
    assert process.returncode == 0, out  # SIGTERM stops it cleanly
    assert out.rstrip().endswith("stopped")


# --- end to end -----------------------------------------------------------------------------


def start(command: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def prometheus_up(port: int, job: str) -> list[str]:
    query = urllib.parse.urlencode({"query": f'up{{job="{job}"}}'})
    url = f"http://127.0.0.1:{port}/api/v1/query?{query}"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            result = json.loads(response.read())["data"]["result"]
    except (OSError, ValueError, KeyError):
        return []
    return [sample["value"][1] for sample in result]


def test_a_stopped_ingest_target_reaches_the_webhook_through_alertmanager(
    tmp_path,
    webhook,
    receiver,  # noqa: F811
    conn,
):
    prometheus = binary("prometheus", "prometheus")
    alertmanager = binary("prometheus-alertmanager", "prometheus-alertmanager", "alertmanager")
    from ingest_daemon.metrics import IngestMetrics, serve

    metrics = IngestMetrics()
    metrics.broker_connected.set(1)
    metrics.database_connected.set(1)
    metrics_port = free_port()
    target = serve(metrics, metrics_port, ready=lambda: True)

    # the project's rules and routing, with intervals of seconds instead of minutes
    rules_file = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    for group in rules_file["groups"]:
        for rule in group["rules"]:
            rule["for"] = "2s"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules_file))
    routing = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    routing["route"].update(group_wait="1s", group_interval="1s", repeat_interval="1m")
    routing["receivers"][0]["webhook_configs"][0]["url"] = webhook.url + alert_webhook.PATH
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(routing))
    am_port, prom_port = free_port(), free_port()
    scraping = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "alerts.yml")],
        "alerting": {
            "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]
        },
        "scrape_configs": [
            {
                "job_name": "iiot-ingest",
                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(scraping))

    am = start(
        [
            alertmanager,
            f"--config.file={tmp_path / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'am'}",
            f"--web.listen-address=127.0.0.1:{am_port}",
            "--cluster.listen-address=",
        ],
        tmp_path / "alertmanager.log",
    )
    prom = start(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        tmp_path / "prometheus.log",
    )
    try:
        assert wait_for(lambda: prometheus_up(prom_port, "iiot-ingest") == ["1"], 20), (
            tmp_path / "prometheus.log"
        ).read_text()[-2000:]
        target.shutdown()
        target.server_close()
        assert wait_for(lambda: len(receiver.requests) >= 2, 30), (
            tmp_path / "alertmanager.log"
        ).read_text()[-2000:]
        (_, hook), (_, bot) = receiver.requests[:2]
        assert hook["title"] == f"Ingest process 127.0.0.1:{metrics_port} is down"
        assert hook["severity"] == "CRITICAL"
        assert hook["detail"]["alert"] == "IngestDown"
        assert hook["detail"]["runbook"].endswith("/docs/runbooks/ingest-down.md")
        assert "[CRITICAL] Ingest process" in bot["text"]
        # a healthy target raised nothing: IngestDown is the only alert that arrived
        assert {body.get("detail", {}).get("alert") for _p, body in receiver.requests} <= {
            "IngestDown",
            None,
        }
        key = hook["key"]

        def recorded() -> list[tuple]:
            # the receiver commits once its deliveries are sent, just after they arrive here
            return conn.execute("SELECT state FROM alerts WHERE alert_key = %s", (key,)).fetchall()

        assert wait_for(lambda: recorded() == [("open",)], 10), recorded()
    finally:
        stop(prom)
        stop(am)
        target.server_close()
