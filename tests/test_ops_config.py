"""The Prometheus rules and the Grafana dashboard refer only to metrics the ingest daemon, the
tenant API and `iiot dagster-metrics` export and to tables that exist; their SQL runs."""

import json
import re
from pathlib import Path

import pytest
import yaml

from iiot_orchestration.api.app import Metrics as ApiMetrics
from ingest_daemon.metrics import IngestMetrics

OPS = Path(__file__).resolve().parents[1] / "ops"
NAME = re.compile(r"\biiot_[a-z_]+\b")


DAGSTER_NAMES = {"iiot_dagster_runs", "iiot_dagster_last_success_timestamp_seconds"}


def exported_names() -> set[str]:
    metrics = IngestMetrics()
    metrics.dead_letters.labels(reason="bad_json").inc()  # labelled families show samples
    api = ApiMetrics()  # the tenant API's /metrics
    api.requests.labels("/api/v1/me", "GET", "200").inc()
    api.latency.labels("/api/v1/me", "GET").observe(0.01)
    names = set()
    for registry in (metrics.registry, api.registry):
        for family in registry.collect():
            for sample in family.samples:
                names.add(sample.name)
    return names | DAGSTER_NAMES


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
