"""The Prometheus rules and the Grafana dashboard refer only to metrics the ingest daemon, the
tenant API and `iiot dagster-metrics` export and to tables that exist; their SQL runs."""

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from iiot_orchestration.api.app import Metrics as ApiMetrics
from ingest_daemon.metrics import IngestMetrics

OPS = Path(__file__).resolve().parents[1] / "ops"
NAME = re.compile(r"\biiot_[a-z_]+\b")


DAGSTER_NAMES = {"iiot_dagster_runs", "iiot_dagster_last_success_timestamp_seconds"}


def exported_samples() -> list:
    metrics = IngestMetrics()
    metrics.dead_letters.labels(reason="bad_json").inc()  # labelled families show samples
    api = ApiMetrics()  # the tenant API's /metrics
    api.requests.labels("/api/v1/me", "GET", "200").inc()
    api.latency.labels("/api/v1/me", "GET").observe(0.01)
    registries = (metrics.registry, api.registry)
    return [s for registry in registries for family in registry.collect() for s in family.samples]


def exported_names() -> set[str]:
    return {sample.name for sample in exported_samples()} | DAGSTER_NAMES


def test_alert_rules_are_complete_and_use_exported_metrics():
    rules = yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())
    names = exported_names()
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert {"IngestDown", "DatabaseDown", "DeadLetterSpike", "IngestLag"} <= alerts.keys()
    assert "DagsterRunFailures" in alerts
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name
        used = set(NAME.findall(rule["expr"]))
        assert used <= names, (name, used - names)


def test_dashboard_uses_exported_metrics_and_valid_sql(conn):
    dashboard = json.loads((OPS / "grafana" / "iiot-ingest.json").read_text())
    names = exported_names()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    sql_panels = 0
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            if "expr" in target:
                used = set(NAME.findall(target["expr"]))
                assert used <= names, (panel["title"], used - names)
            else:
                conn.execute(target["rawSql"]).fetchall()  # runs against the schema
                sql_panels += 1
    assert sql_panels >= 3


@pytest.mark.parametrize(
    "name",
    [
        "iiot_ingest_messages_received_total",
        "iiot_ingest_lag_seconds_bucket",
        "iiot_ingest_batches_retried_total",  # IngestRetryRate: retried / committed batches
        "iiot_ingest_batch_messages_count",
    ],
)
def test_the_names_the_rules_rely_on_exist(name):
    assert name in exported_names()


def test_dagster_run_outcomes_as_metrics():
    import dagster as dg
    from prometheus_client import generate_latest

    from iiot_orchestration.dagster_metrics import registry_for

    @dg.op
    def fine():
        return 1

    @dg.op
    def broken():
        raise RuntimeError("no")

    @dg.job
    def steady():
        fine()

    @dg.job
    def fragile():
        broken()

    with dg.instance_for_test() as instance:
        steady.execute_in_process(instance=instance)
        steady.execute_in_process(instance=instance)
        fragile.execute_in_process(instance=instance, raise_on_error=False)
        text = generate_latest(registry_for(instance)).decode()
    assert 'iiot_dagster_runs{job="steady",status="SUCCESS"} 2.0' in text
    assert 'iiot_dagster_runs{job="fragile",status="FAILURE"} 1.0' in text
    assert 'iiot_dagster_last_success_timestamp_seconds{job="steady"}' in text
    assert 'iiot_dagster_last_success_timestamp_seconds{job="fragile"}' not in text


def test_the_api_is_scraped_alerted_on_and_on_the_dashboard():
    from iiot_orchestration.settings import load_settings

    defaults = load_settings({})
    config = yaml.safe_load((OPS / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    (targets,) = [c["targets"] for c in jobs["iiot-api"]["static_configs"]]
    assert targets == [f"{defaults.api_host}:{defaults.api_port}"]
    assert jobs["iiot-api"].get("metrics_path", "/metrics") == "/metrics"
    rules = yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert {"ApiDown", "ApiServerErrors"} <= alerts
    dashboard = json.loads((OPS / "grafana" / "iiot-ingest.json").read_text())
    exprs = [t.get("expr", "") for panel in dashboard["panels"] for t in panel["targets"]]
    assert any("iiot_api_requests_total" in e and "by (status)" in e for e in exprs)
    assert any("iiot_api_request_duration_seconds_bucket" in e and "route" in e for e in exprs)


# --- ingest slots by file-based service discovery (docs/ingest.md, "Several hosts") ----------

PROMETHEUS = OPS / "prometheus"
# labels a rule, a recording rule or a panel may group, join or select by, besides the metrics'
# own: Prometheus's job and instance, and those of the targets files
SCRAPE_LABELS = {"job", "instance"}
LABEL_USES = (
    re.compile(r"\b(?:by|on|without|ignoring|group_left|group_right)\s*\(([^)]*)\)"),
    re.compile(r"\$labels\.(\w+)"),
    re.compile(r"[{,]\s*(\w+)\s*(?:=~|!~|!=|=)\s*\""),
)


def ingest_job() -> dict:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "iiot-ingest"]
    return job


def ingest_target_files() -> list[Path]:
    """The files the iiot-ingest job's file_sd_configs name (globs, relative to the config)."""
    return sorted(
        path
        for sd in ingest_job()["file_sd_configs"]
        for pattern in sd["files"]
        for path in PROMETHEUS.glob(pattern)
    )


def ingest_targets() -> list[tuple[str, dict[str, str]]]:
    """(target, labels) of every entry of every targets file, checked for Prometheus's form."""
    found = []
    for path in ingest_target_files():
        entries = yaml.safe_load(path.read_text())
        assert isinstance(entries, list), path
        for entry in entries:
            assert set(entry) <= {"targets", "labels"}, (path, entry)
            labels = entry.get("labels", {})
            assert all(isinstance(v, str) for v in labels.values()), (path, labels)
            found += [(target, labels) for target in entry["targets"]]
    return found


def label_uses(expr: str) -> set[str]:
    names = set()
    for pattern in LABEL_USES:
        for match in pattern.findall(expr):
            names |= {name.strip() for name in match.split(",") if name.strip()}
    return names


def test_ingest_slots_are_scraped_from_targets_files():
    job = ingest_job()
    assert "static_configs" not in job  # one place to list slots: the targets files
    assert ingest_target_files(), "no file matches the iiot-ingest job's file_sd_configs"
    targets = ingest_targets()
    from iiot_orchestration.cli import ingest_command

    metrics_port = next(p.default for p in ingest_command.params if p.name == "metrics_port")
    slots = set()
    for target, labels in targets:
        assert labels.keys() == {"host", "slot"}, (target, labels)  # never job or instance
        host, _, port = target.rpartition(":")
        assert host, target
        slot = int(labels["slot"])
        assert int(port) == metrics_port + slot, (target, labels)  # --metrics-port + slot
        slots.add(slot)
    assert len({t for t, _ in targets}) == len(targets), "a target listed twice"
    assert sorted(slots) == list(range(len(targets))), "one target per slot, slots 0..N-1"
    # the shipped example holds the local slots the compose file and the units run
    compose = yaml.safe_load((OPS / "container" / "compose.yaml").read_text())
    local = {
        int(s["command"][s["command"].index("--slot") + 1])
        for s in compose["services"].values()
        if s.get("command", [None])[0] == "ingest"
    }
    assert {(f"127.0.0.1:{metrics_port + slot}", str(slot)) for slot in local} <= {
        (t, labels["slot"]) for t, labels in targets
    }


def test_the_labels_the_rules_and_panels_use_reach_the_ingest_series():
    names = SCRAPE_LABELS | {k for _, labels in ingest_targets() for k in labels}
    names |= {label for sample in exported_samples() for label in sample.labels}
    names |= {"status", "slot"}  # iiot_dagster_runs{job,status}; the supervisor's restarts
    used: dict[str, set[str]] = {}
    for file in ("alerts.yml", "slo.yml"):
        for group in yaml.safe_load((PROMETHEUS / file).read_text())["groups"]:
            for rule in group["rules"]:
                name = rule.get("alert") or rule["record"]
                texts = [rule["expr"], *rule.get("annotations", {}).values()]
                used[name] = set().union(*map(label_uses, texts))
    dashboard = json.loads((OPS / "grafana" / "iiot-ingest.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            used[panel["title"]] = label_uses(target.get("expr", "")) | legend
    assert used["IngestRetryRate"] >= {"instance"}  # the extraction finds what is there
    unknown = {name: labels - names for name, labels in used.items() if labels - names}
    assert not unknown, unknown


@pytest.mark.parametrize(
    "entries",
    [
        "- targets: ['127.0.0.1:9108']\n  labelz: {slot: '0'}\n",  # unknown key
        "- targets: ['127.0.0.1:9108']\n  labels: {bad-name: x}\n",  # not a label name
        "targets: ['127.0.0.1:9108']\n",  # not a list of groups
        "- targets: ['127.0.0.1:9108'\n",  # not YAML
        "- targets: ['127.0.0.1:9108/metrics']\n",  # a path, not host:port
        "- targets: 127.0.0.1:9108\n",  # one string, not a list
        "- targets: ['127.0.0.1:9108']\n  labels: {slot: [0]}\n",  # not a label value
    ],
)
def test_promtool_refuses_a_malformed_targets_file(tmp_path, entries):
    from tests.test_alert_routing import binary

    promtool = binary("prometheus", "promtool")
    config = shutil.copytree(PROMETHEUS, tmp_path / "prometheus")
    (config / "targets" / "ingest-bad.yml").write_text(entries)
    checked = subprocess.run(
        [promtool, "check", "config", str(config / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "FAILED" in checked.stderr, checked.stderr


def test_prometheus_discovers_slots_on_several_hosts_from_the_files(tmp_path):
    """A real Prometheus with the shipped iiot-ingest job and SLO rules: a slot on each of two
    hosts (127.0.0.1 and 127.0.0.2), the second host's file added while it runs."""
    from iiot_orchestration.services import free_port
    from ingest_daemon.metrics import serve
    from tests.ingest_helpers import wait_for
    from tests.test_alert_routing import binary, start, stop

    prometheus = binary("prometheus", "prometheus")
    servers, entries = [], []
    for slot, address in enumerate(["127.0.0.1", "127.0.0.2"]):
        metrics = IngestMetrics()
        metrics.broker_connected.set(1)
        metrics.database_connected.set(1)
        port = free_port(address)
        servers.append(serve(metrics, port, ready=lambda: True, host=address))
        target = {
            "targets": [f"{address}:{port}"],
            "labels": {"host": f"h{slot}", "slot": str(slot)},
        }
        entries.append(target)
    config = tmp_path / "prometheus"
    (config / "targets").mkdir(parents=True)
    shutil.copy(PROMETHEUS / "slo.yml", config)
    job = {**ingest_job(), "scrape_interval": "1s"}
    scraping = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["slo.yml"],
        "scrape_configs": [job],
    }
    (config / "prometheus.yml").write_text(yaml.safe_dump(scraping))
    (config / "targets" / "ingest-h0.yml").write_text(yaml.safe_dump(entries[:1]))
    web = free_port()
    process = start(
        [
            prometheus,
            f"--config.file={config / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        tmp_path / "prometheus.log",
    )

    def series(query: str) -> set[tuple[str | None, ...]]:
        """(instance, host, slot, value) of each series the query gives."""
        url = f"http://127.0.0.1:{web}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                result = json.loads(response.read())["data"]["result"]
        except (OSError, ValueError, KeyError):
            return set()
        labels = ("instance", "host", "slot")
        return {(*(s["metric"].get(k) for k in labels), s["value"][1]) for s in result}

    def expected(*slots: int) -> set[tuple[str, str, str, str]]:
        return {(entries[s]["targets"][0], f"h{s}", str(s), "1") for s in slots}

    try:
        log = tmp_path / "prometheus.log"
        assert wait_for(lambda: series('up{job="iiot-ingest"}') == expected(0), 30), (
            log.read_text()[-2000:]
        )
        # a new host's file is picked up without a restart or a reload
        (config / "targets" / "ingest-h1.yml").write_text(yaml.safe_dump(entries[1:]))
        assert wait_for(lambda: series('up{job="iiot-ingest"}') == expected(0, 1), 60), (
            log.read_text()[-2000:]
        )
        # the SLO's availability is per slot: one series per target (its instance)
        available = {(instance, None, None, "1") for instance, *_ in expected(0, 1)}
        assert wait_for(lambda: series("iiot:ingest_slot_available") == available, 30)
    finally:
        stop(process)
        for server in servers:
            server.shutdown()
            server.server_close()
