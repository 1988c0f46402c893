"""``iiot alerts ...``: the alert list and the threshold rules, which are data (docs/alerts.md)."""

from __future__ import annotations

import contextlib

import click

from iiot_orchestration import alerts
from iiot_orchestration.cli_common import HelpGroup, _json, _settings, _table, friendly_errors
from iiot_orchestration.db import connect


@click.group("alerts", cls=HelpGroup)
def alerts_group() -> None:
    """Alerts and the threshold rules that open them."""


@alerts_group.command("list")
@click.option("--tenant", required=True, help="Tenant slug.")
@click.option(
    "--state",
    type=click.Choice(["open", "resolved", "all"]),
    default="open",
    show_default=True,
    help="Which alerts.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def list_command(tenant: str, state: str, as_json: bool) -> None:
    """A tenant's alerts, newest first."""
    with connect(_settings().require_database_url(), role="readonly_audit") as conn:
        if not conn.execute("SELECT 1 FROM tenants WHERE slug = %s", (tenant,)).fetchone():
            raise alerts.AlertError(f"unknown tenant {tenant[:70]!r}")
        found = alerts.list_alerts(conn, tenant, state)
    if as_json:
        click.echo(_json(found))
        return
    if not found:
        click.echo(f"no {state if state != 'all' else ''} alerts for {tenant}".replace("  ", " "))
        return
    click.echo(
        _table(
            ["id", "severity", "state", "title", "source", "opened at", "resolved at"],
            [
                [
                    a["id"],
                    a["severity"],
                    a["state"],
                    a["title"],
                    a["source"],
                    a["opened_at"],
                    a["resolved_at"],
                ]
                for a in found
            ],
        )
    )


@alerts_group.group("rules")
def rules_group() -> None:
    """Threshold rules per tenant, device or metric."""


@rules_group.command("add")
@click.option("--tenant", required=True, help="Tenant slug.")
@click.option("--name", required=True, help="What the alert says, e.g. 'Main feeder overload'.")
@click.option("--kind", required=True, type=click.Choice(alerts.RULE_KINDS), help="Condition.")
@click.option("--metric", help="Metric, e.g. power_w (all but no_data).")
@click.option("--device", "device_mac", help="Only this device (MAC); default every device.")
@click.option("--threshold", type=float, help="Value (above/below) or change per hour.")
@click.option(
    "--window",
    "window_minutes",
    type=int,
    default=60,
    show_default=True,
    help="Minutes: silence for no_data, look-back for rate_of_change.",
)
@click.option(
    "--severity",
    type=click.Choice(alerts.SEVERITIES),
    default="WARNING",
    show_default=True,
    help="Severity of the alerts it opens.",
)
@click.option("--actor", default="cli", show_default=True, help="Who adds the rule.")
@friendly_errors
def add_command(
    tenant: str,
    name: str,
    kind: str,
    metric: str | None,
    device_mac: str | None,
    threshold: float | None,
    window_minutes: int,
    severity: str,
    actor: str,
) -> None:
    """Add a rule; the next evaluation (every five minutes) applies it."""
    with connect(_settings().require_database_url(), role="platform_rw") as conn:
        rule_id = alerts.add_rule(
            conn,
            tenant=tenant,
            name=name,
            kind=kind,
            severity=severity,
            metric=metric,
            device_mac=device_mac,
            threshold=threshold,
            window_minutes=window_minutes,
            actor=actor,
        )
    click.echo(f"rule {rule_id} added for {tenant}")


@rules_group.command("list")
@click.option("--tenant", required=True, help="Tenant slug.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def rules_list_command(tenant: str, as_json: bool) -> None:
    """A tenant's rules, enabled or not."""
    with connect(_settings().require_database_url(), role="readonly_audit") as conn:
        rows = conn.execute(
            "SELECT r.rule_id, r.name, r.kind, r.metric, d.mac::text, r.threshold,"
            "       r.window_minutes, r.severity, r.enabled"
            "  FROM alert_rules r JOIN tenants t USING (tenant_id)"
            "  LEFT JOIN devices d ON d.device_id = r.device_id"
            " WHERE t.slug = %s ORDER BY r.rule_id",
            (tenant,),
        ).fetchall()
    keys = ["id", "name", "kind", "metric", "device", "threshold", "window", "severity", "enabled"]
    if as_json:
        click.echo(_json([dict(zip(keys, row, strict=True)) for row in rows]))
        return
    if not rows:
        click.echo(f"no rules for {tenant}")
        return
    click.echo(_table(keys, rows))


def _set_enabled(rule_id: int, enabled: bool | None) -> None:
    with connect(_settings().require_database_url(), role="platform_rw") as conn:
        if enabled is None:
            found = conn.execute(
                "DELETE FROM alert_rules WHERE rule_id = %s RETURNING rule_id", (rule_id,)
            ).fetchone()
        else:
            found = conn.execute(
                "UPDATE alert_rules SET enabled = %s WHERE rule_id = %s RETURNING rule_id",
                (enabled, rule_id),
            ).fetchone()
    if found is None:
        raise alerts.AlertError(f"no rule {rule_id}")
    done = {True: "enabled", False: "disabled", None: "deleted"}[enabled]
    click.echo(f"rule {rule_id} {done}; its open alerts resolve at the next evaluation")


@rules_group.command("enable")
@click.argument("rule_id", type=int)
@friendly_errors
def enable_command(rule_id: int) -> None:
    """Enable a rule."""
    _set_enabled(rule_id, True)


@rules_group.command("disable")
@click.argument("rule_id", type=int)
@friendly_errors
def disable_command(rule_id: int) -> None:
    """Disable a rule (kept, not evaluated)."""
    _set_enabled(rule_id, False)


@rules_group.command("delete")
@click.argument("rule_id", type=int)
@friendly_errors
def delete_command(rule_id: int) -> None:
    """Delete a rule (its alerts stay, as history)."""
    _set_enabled(rule_id, None)


@click.command("dagster-metrics")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface of /metrics.")
@click.option("--port", type=click.IntRange(1, 65535), default=9110, show_default=True)
@friendly_errors
def dagster_metrics_command(host: str, port: int) -> None:
    """Serve Dagster run outcomes (runs per job and status in the last 24 h, last success per
    job) as Prometheus metrics, for the instance in DAGSTER_HOME."""
    import dagster as dg

    from iiot_orchestration.dagster_metrics import serve

    try:
        instance = dg.DagsterInstance.get()
    except dg.DagsterInvariantViolationError as exc:
        raise alerts.AlertError(f"no Dagster instance: {exc}".splitlines()[0]) from None
    click.echo(f"serving Dagster run metrics on http://{host}:{port}/metrics (Ctrl-C stops)")
    with contextlib.suppress(KeyboardInterrupt):
        serve(instance, host, port)
