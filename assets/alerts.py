"""Threshold rules on telemetry, evaluated over the latest rollups (docs/alerts.md)."""

from datetime import timedelta

import dagster as dg

from iiot_orchestration import alerts
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.settings import load_settings


@dg.asset(
    group_name="alerts",
    kinds={"postgres"},
    owners=["team:platform"],
    code_version="1",
    freshness_policy=dg.FreshnessPolicy.time_window(
        fail_window=timedelta(minutes=20), warn_window=timedelta(minutes=10)
    ),
    description="Evaluates every enabled rule in alert_rules (above/below a value, rate of "
    "change, no data for N minutes) over the latest hourly rollups and devices' last_seen: "
    "opens an alert per rule and device whose condition holds, resolves those whose condition "
    "cleared, and notifies the new ones (webhook/Telegram, deduplicated).",
)
def threshold_alerts(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> dg.MaterializeResult:
    notifier = alerts.Notifier.from_settings(load_settings())
    with postgres.get_connection() as conn:
        result = alerts.evaluate_rules(conn, notifier)
        open_now = conn.execute(
            "SELECT severity, count(*) FROM alerts WHERE state = 'open' GROUP BY severity"
        ).fetchall()
    context.log.info(
        f"alert rules: {len(result.opened)} opened, {result.still_open} still open, "
        f"{result.resolved} resolved"
    )
    return dg.MaterializeResult(
        metadata={
            "opened": len(result.opened),
            "still_open": result.still_open,
            "resolved": result.resolved,
            "open_by_severity": dg.MetadataValue.json(dict(open_now)),
            "opened_titles": dg.MetadataValue.md(
                "\n".join(f"- [{a.severity}] {a.title}" for a in result.opened) or "none"
            ),
        }
    )
