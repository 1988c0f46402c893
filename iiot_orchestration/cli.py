"""The ``iiot`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import psycopg

from iiot_orchestration import __version__, migrate, registry

# helpers shared with the command modules (cli_billing, ...), which must not import this module
from iiot_orchestration.cli_common import HelpGroup, _json, _settings, _table, friendly_errors
from iiot_orchestration.db import connect
from iiot_orchestration.errors import IiotError
from iiot_orchestration.logs import configure_logging
from iiot_orchestration.settings import SettingsError, describe
from iiot_orchestration.signals import stop_on_signals

EXIT_USAGE = 2


@click.group(
    cls=HelpGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="iiot")
def main() -> None:
    """IIoT telemetry orchestration: MQTT ingest, PostgreSQL/TimescaleDB storage and Dagster.

    Configuration comes from IIOT_* environment variables; `iiot config` shows them.
    """
    try:
        settings = _settings()
        level, fmt = settings.log_level, settings.log_format
    except SettingsError:  # the command itself reports the bad variable; --help still works
        level, fmt = "INFO", "text"
    command = click.get_current_context().invoked_subcommand
    configure_logging(level, fmt, process_name=f"iiot-{command}" if command else "iiot")


@main.command("config")
@friendly_errors
def config_command() -> None:
    """Show every IIOT_* variable, its effective value and where it came from."""
    click.echo(_table(["variable", "value", "source"], describe(_settings())))


@main.group()
def db() -> None:
    """Schema migrations."""


@db.command("migrate")
@friendly_errors
def db_migrate() -> None:
    """Apply pending migrations in order (safe to run concurrently and repeatedly)."""
    settings = _settings()
    migrate.migrate(settings.require_database_url(), settings.storage, echo=click.echo)


@db.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def db_status(as_json: bool) -> None:
    """List applied and pending migrations and the storage mode."""
    settings = _settings()
    state = migrate.status(settings.require_database_url(), settings.storage)
    rows = [
        {
            "version": f"{m.version:04d}",
            "name": m.name,
            "variant": m.variant,
            "state": "applied",
            "applied_at": m.applied_at,
        }
        for m in state.applied
    ] + [
        {
            "version": f"{m.version:04d}",
            "name": m.name,
            "variant": m.variant,
            "state": "pending",
            "applied_at": None,
        }
        for m in state.pending
    ]
    if as_json:
        click.echo(_json(rows))
        return
    click.echo(f"storage mode: {state.storage_mode or 'not chosen yet (chosen at first migrate)'}")
    click.echo(
        _table(
            ["version", "name", "variant", "state", "applied_at"], [list(r.values()) for r in rows]
        )
    )
    click.echo(f"{len(state.applied)} applied, {len(state.pending)} pending")


@main.group()
def tenants() -> None:
    """Tenants: customers with a plan, a time zone and a retention policy."""


@tenants.command("create")
@click.argument("slug")
@click.option("--name", required=True, help="Display name, e.g. 'Acme Energia Ltda'.")
@click.option(
    "--plan", default="starter", show_default=True, help="Plan id: starter, pro or enterprise."
)
@click.option("--timezone", default=None, help="IANA time zone [default: IIOT_DEFAULT_TIMEZONE].")
@click.option(
    "--locale",
    type=click.Choice(registry.LOCALES),
    default="pt_BR",
    show_default=True,
    help="Language of the tenant's reports.",
)
@click.option(
    "--retention-days",
    type=click.IntRange(1, 36_500),
    default=None,
    help="Override the plan's raw-telemetry retention.",
)
@click.option(
    "--billing-day",
    type=click.IntRange(1, 28),
    default=1,
    show_default=True,
    help="Day of the month the billing cycle starts.",
)
@friendly_errors
def tenants_create(
    slug: str,
    name: str,
    plan: str,
    timezone: str | None,
    locale: str,
    retention_days: int | None,
    billing_day: int,
) -> None:
    """Create tenant SLUG (2-63 lowercase letters, digits and '-')."""
    settings = _settings()
    with connect(settings.require_database_url()) as conn:
        tenant = registry.create_tenant(
            conn,
            slug=slug,
            name=name,
            plan=plan,
            timezone=timezone or settings.default_timezone,
            locale=locale,
            retention_days=retention_days,
            billing_cycle_day=billing_day,
        )
    click.echo(
        f"Created tenant {tenant.slug} (id {tenant.tenant_id}) on plan {tenant.plan_id}, "
        f"{tenant.included_devices} devices included, retention {tenant.retention_days} days."
    )


@tenants.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def tenants_list(as_json: bool) -> None:
    """List tenants with their plan and device count."""
    with connect(_settings().require_database_url()) as conn:
        found = registry.list_tenants(conn)
    if as_json:
        click.echo(_json([t.__dict__ for t in found]))
        return
    click.echo(
        _table(
            ["slug", "name", "plan", "devices", "timezone", "retention", "status"],
            [
                [
                    t.slug,
                    t.name,
                    t.plan_id,
                    f"{t.device_count}/{t.included_devices}",
                    t.timezone,
                    f"{t.retention_days}d",
                    t.status,
                ]
                for t in found
            ],
        )
    )


@main.group()
def devices() -> None:
    """Devices: meters and gateways that publish over MQTT, identified by MAC."""


@devices.command("provision")
@click.option("--tenant", required=True, help="Tenant slug.")
@click.option("--mac", help="MAC of one device (aa:bb:cc:dd:ee:ff, aabbccddeeff, ...).")
@click.option(
    "--kind",
    "meter_kind",
    type=click.Choice(registry.METER_KINDS),
    help="Meter kind of the one device.",
)
@click.option("--name", help="Display name of the one device.")
@click.option("--metrics", help="Comma-separated metrics [default: the kind's default metrics].")
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Provision many devices from a CSV with columns mac,meter_kind[,name,metrics].",
)
@click.option("--dry-run", is_flag=True, help="Validate and report, but register nothing.")
@click.option(
    "--issue-cert",
    is_flag=True,
    help="Also issue each newly provisioned device's certificate (RSA 2048, CN = MAC, 10 years) "
    "and write its gateway files under IIOT_PKI_DIR/devices/<mac> (or --cert-out).",
)
@click.option(
    "--cert-out",
    type=click.Path(file_okay=False, path_type=Path),
    help="With --issue-cert and one --mac: the directory for ca.pem and identity.pem.",
)
@friendly_errors
def devices_provision(
    tenant: str,
    mac: str | None,
    meter_kind: str | None,
    name: str | None,
    metrics: str | None,
    csv_path: Path | None,
    dry_run: bool,
    issue_cert: bool,
    cert_out: Path | None,
) -> None:
    """Register one device (--mac, --kind) or many (--csv), with a report per device.

    Devices beyond the plan's device quota are refused for starter and pro tenants.
    Re-running the same CSV skips devices already provisioned. Exits 1 if any were refused.
    With --issue-cert each newly provisioned device also gets its certificate
    (docs/certificates.md); the CA must exist (iiot pki init).
    """
    if csv_path is not None and (mac or meter_kind or name or metrics):
        raise click.UsageError("--csv cannot be combined with --mac, --kind, --name or --metrics")
    if csv_path is None and not (mac and meter_kind):
        raise click.UsageError("give --mac and --kind for one device, or --csv for many")
    if cert_out is not None and (not issue_cert or csv_path is not None):
        raise click.UsageError("--cert-out needs --issue-cert and one --mac")
    if issue_cert and dry_run:
        raise click.UsageError("--issue-cert cannot be combined with --dry-run")
    ca = None
    if issue_cert:  # before provisioning: a missing CA must not leave devices without certificates
        from iiot_orchestration import cli_pki

        ca = cli_pki._ca()
    rejected: list[registry.ProvisionResult] = []
    if csv_path is not None:
        parsed = registry.parse_device_csv(csv_path.read_bytes())
        requests, rejected = parsed.requests, parsed.rejected
    else:
        requests = [
            registry.DeviceRequest(
                mac=mac or "",
                meter_kind=meter_kind or "",
                name=name,
                metrics=tuple(m for m in (metrics or "").replace(" ", ",").split(",") if m),
            )
        ]
    with connect(_settings().require_database_url()) as conn, conn.transaction() as tx:
        results = registry.provision_devices(conn, tenant, requests) if requests else []
        if dry_run:
            raise psycopg.Rollback(tx)
    results = sorted(results + rejected, key=lambda r: r.line)
    _report_provisioning(results, csv=csv_path is not None, dry_run=dry_run)
    if ca is not None:
        for result in results:
            if result.status == "provisioned":
                cli_pki.issue_and_write(ca, result.mac, cert_out, actor="cli")
    if any(r.status == "rejected" for r in results):
        sys.exit(1)


def _report_provisioning(
    results: list[registry.ProvisionResult], *, csv: bool, dry_run: bool
) -> None:
    headers = ["line", "mac", "result", "detail"] if csv else ["mac", "result", "detail"]
    shown = {"provisioned": "would provision"} if dry_run else {}
    rows = [
        ([r.line] if csv else []) + [r.mac, shown.get(r.status, r.status), r.message]
        for r in results
    ]
    click.echo(_table(headers, rows))
    counts = {
        s: sum(r.status == s for r in results) for s in ("provisioned", "skipped", "rejected")
    }
    if dry_run:
        provisioned = f"dry run, nothing registered: would provision {counts['provisioned']}"
    else:
        provisioned = f"{counts['provisioned']} provisioned"
    click.echo(
        f"{provisioned}, {counts['skipped']} skipped (already provisioned), "
        f"{counts['rejected']} rejected"
    )


@devices.command("list")
@click.option("--tenant", help="Only this tenant's devices.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def devices_list(tenant: str | None, as_json: bool) -> None:
    """List devices with their tenant, kind, metrics and last reading time."""
    with connect(_settings().require_database_url()) as conn:
        found = registry.list_devices(conn, tenant)
    if as_json:
        click.echo(_json(found))
        return
    click.echo(
        _table(
            ["tenant", "mac", "name", "kind", "status", "metrics", "last_seen"],
            [
                [
                    d["tenant"],
                    d["mac"],
                    d["name"],
                    d["meter_kind"],
                    d["status"],
                    d["metrics"],
                    d["last_seen"],
                ]
                for d in found
            ],
        )
    )


@main.command("ingest")
@click.option(
    "--processes",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Processes on the shared subscription, slots 0..N-1.",
)
@click.option(
    "--slot",
    type=click.IntRange(0, 63),
    default=0,
    show_default=True,
    help="This process's slot: its MQTT client id is <group>-<slot>.",
)
@click.option(
    "--group",
    default="iiot-ingest",
    show_default=True,
    help="Shared-subscription group; also the client id prefix.",
)
@click.option(
    "--slots",
    type=click.IntRange(1, 64),
    default=None,
    help="Slots of the group in all, on every host [default: --processes, or --slot + 1]. "
    "With more than one, "
    "IIOT_MQTT_SHARED_SUBSCRIPTION=auto subscribes to the shared form.",
)
@click.option(
    "--batch-rows",
    type=click.IntRange(1, 1_000_000),
    default=5_000,
    show_default=True,
    help="Flush a batch at this many readings.",
)
@click.option(
    "--batch-age-ms",
    type=click.IntRange(1, 60_000),
    default=200,
    show_default=True,
    help="Flush a batch at this age.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=9108,
    show_default=True,
    help="Port of /metrics and /health/* plus the slot number; 0 turns them off.",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="Interface of /metrics and /health/* (0.0.0.0 for a remote Prometheus).",
)
@click.option(
    "--stop-timeout",
    type=click.FloatRange(0, 3600),
    default=30.0,
    show_default=True,
    help="Seconds a stop waits for an unavailable database before leaving the rest "
    "unacknowledged for the broker to deliver again (exit 1).",
)
@click.option(
    "--writer-process/--no-writer-process",
    default=True,
    show_default=True,
    help="Judge and commit in a second process of the slot, so that receiving has the "
    "interpreter to itself (docs/ingest.md); --no-writer-process does everything in one.",
)
@click.option(
    "--supervisor-metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="With --processes above 1: port of the parent's /metrics (slot restarts) "
    "[default: --metrics-port minus 1, the port before the first slot's (9107), clear of "
    "`iiot dagster-metrics` on 9110; 0 turns it off].",
)
@click.option("--supervisor-pid", type=int, default=None, hidden=True)  # set for the slots
@friendly_errors
def ingest_command(
    processes: int,
    slot: int,
    group: str,
    slots: int | None,
    batch_rows: int,
    batch_age_ms: int,
    metrics_port: int,
    metrics_host: str,
    stop_timeout: float,
    writer_process: bool,
    supervisor_metrics_port: int | None,
    supervisor_pid: int | None,
) -> None:
    """Land MQTT telemetry in the database until SIGTERM or Ctrl-C, which drain, flush,
    acknowledge and exit 0. Messages are acknowledged only after their batch is committed.
    With --processes above 1 this process supervises the slots: one that dies is restarted."""
    from iiot_orchestration.mqtt import MqttError, MqttOptions, check_options
    from ingest_daemon.daemon import IngestConfig, IngestDaemon
    from ingest_daemon.supervisor import EXIT_CONFIGURATION, Supervisor, watch_parent

    settings = _settings()
    if not settings.mqtt_url:
        raise click.UsageError(
            "IIOT_MQTT_URL is not set: expected mqtt://host:port or mqtts://host:port"
        )
    slots = slots or max(processes, slot + 1)
    if slots < processes or slot >= slots:
        raise click.UsageError(
            f"--slots {slots} is fewer than the group's slots 0..{max(processes - 1, slot)}"
        )
    shared = settings.mqtt_shared_subscription
    if shared is None:  # auto: the plain filter, which a broker restart keeps, for one slot
        shared = slots > 1
    if slots > 1 and not shared:
        raise click.UsageError(
            "IIOT_MQTT_SHARED_SUBSCRIPTION=off gives every slot every message: "
            "run one slot (--processes 1, --slots 1)"
        )
    check_options(MqttOptions.from_settings(settings))  # wrong TLS files: one error, not N
    settings.require_database_url()  # unset: one error before any slot starts
    if processes > 1:
        options = [
            "--group",
            group,
            "--slots",
            str(slots),
            "--batch-rows",
            str(batch_rows),
            "--batch-age-ms",
            str(batch_age_ms),
            "--metrics-port",
            str(metrics_port),
            "--metrics-host",
            metrics_host,
            "--stop-timeout",
            str(stop_timeout),
            "--writer-process" if writer_process else "--no-writer-process",
        ]
        if supervisor_metrics_port is None:
            supervisor_metrics_port = metrics_port - 1 if metrics_port > 1 else 0
        supervisor = Supervisor(
            [sys.executable, "-m", "iiot_orchestration.cli", "ingest", *options],
            processes,
            metrics_port=supervisor_metrics_port or None,
            metrics_host=metrics_host,
        )
        with stop_on_signals() as stop:
            sys.exit(supervisor.run(stop))
    config = IngestConfig.from_settings(
        settings,
        group=group,
        slot=slot,
        batch_rows=batch_rows,
        batch_age_s=batch_age_ms / 1000,
        metrics_port=metrics_port + slot if metrics_port else None,
        metrics_host=metrics_host,
        stop_timeout_s=stop_timeout,
        shared_subscription=shared,
        slots=slots,
        writer_process=writer_process,
    )
    click.echo(f"Ingesting {config.subscription} as {config.client_id} (SIGTERM or Ctrl-C stops)")
    with stop_on_signals() as stop:
        if supervisor_pid is not None:
            watch_parent(supervisor_pid, stop)  # no orphan: the slot stops with its parent
        try:
            counters = IngestDaemon(config).run(stop)
        except MqttError as exc:
            if supervisor_pid is None:
                raise
            # the broker refused us or TLS failed: the supervisor stops every slot, instead of
            # restarting them into the same refusal
            click.secho(f"error: slot {slot}: {exc}", fg="red", err=True)
            sys.exit(EXIT_CONFIGURATION)
    click.echo(
        f"Stopped: {counters.received:,} messages, {counters.landed:,} readings landed, "
        f"{counters.duplicates:,} duplicates, {counters.dead_letters:,} dead letters."
    )
    if counters.unacknowledged:
        raise IiotError(
            f"the database stayed unavailable for {stop_timeout:g} s after the stop: "
            f"{counters.unacknowledged:,} messages were left unacknowledged; the broker delivers "
            f"them again when {config.client_id} reconnects (nothing is lost)"
        )


@main.command("simulate")
@click.option(
    "--devices",
    "limit",
    type=click.IntRange(1),
    default=None,
    help="Simulate at most this many provisioned devices [default: all active].",
)
@click.option("--tenant", help="Only this tenant's devices.")
@click.option(
    "--rate",
    type=click.FloatRange(min=0.001),
    default=1.0,
    show_default=True,
    help="Messages per second per device.",
)
@click.option(
    "--count",
    type=click.IntRange(1),
    default=None,
    help="Stop after this many messages per device.",
)
@click.option(
    "--duration", type=click.FloatRange(min=0.1), default=None, help="Stop after this many seconds."
)
@click.option(
    "--batch",
    "batch_size",
    type=click.IntRange(1, 1000),
    default=1,
    show_default=True,
    help="Readings per message (a batch payload when more than 1).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the meter models.")
@click.option(
    "--history",
    "history_text",
    metavar="DURATION",
    help="First publish this much of the past (7d, 36h, 90m; at most the tenant's retention), "
    "then run live.",
)
@click.option(
    "--history-step",
    type=click.FloatRange(min=1),
    default=None,
    help="Seconds between history readings [default: 300, or the live cadence if coarser].",
)
@friendly_errors
def simulate_command(
    limit: int | None,
    tenant: str | None,
    rate: float,
    count: int | None,
    duration: float | None,
    batch_size: int,
    seed: int,
    history_text: str | None,
    history_step: float | None,
) -> None:
    """Publish realistic meter readings for provisioned devices until Ctrl-C, --count or
    --duration, after --history of the past if asked. Cumulative registers (kWh, m3) only
    grow; gauges follow a daily shape."""
    from firmware.simulator import (
        DEFAULT_HISTORY_STEP_S,
        SimulationStats,
        SimulatorError,
        check_history,
        load_fleet,
        parse_history,
        run_simulation,
    )
    from iiot_orchestration.mqtt import MqttOptions, check_options

    history = None
    cadence = 1.0 / (rate * batch_size)  # seconds between a device's live readings
    step = history_step or max(DEFAULT_HISTORY_STEP_S, cadence)
    if history_text is not None:
        try:
            history = parse_history(history_text)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--history'") from None
        if step < cadence:
            raise click.BadParameter(
                f"{step:g} s is finer than the live cadence ({cadence:g} s between a device's "
                f"readings at --rate {rate:g} --batch {batch_size})",
                param_hint="'--history-step'",
            )
        if step >= history.total_seconds():
            raise click.BadParameter(
                f"{step:g} s leaves no reading in a history of {history_text}",
                param_hint="'--history-step'",
            )
    settings = _settings()
    if not settings.mqtt_url:
        raise click.UsageError(
            "IIOT_MQTT_URL is not set: expected mqtt://host:port or mqtts://host:port"
        )
    broker = MqttOptions.from_settings(settings)
    check_options(broker)
    fleet = load_fleet(settings.require_database_url(), tenant=tenant, limit=limit)
    if not fleet:
        raise registry.RegistryError("no active devices to simulate: provision some first")
    if history is not None:
        try:
            check_history(fleet, history)
        except SimulatorError as exc:
            raise click.BadParameter(str(exc), param_hint="'--history'") from None
        click.echo(
            f"Publishing {history_text.strip()} of history first, a reading every {step:g} s "
            "per device, paced under the plan's messages per minute."
        )
    click.echo(
        f"Simulating {len(fleet)} devices at {rate:g} messages/s each to "
        f"{broker.shown_url} under {settings.topic_prefix}/ (Ctrl-C stops)"
    )

    def show(s: SimulationStats) -> None:
        if s.history_messages and s.published <= s.history_messages:
            done = s.published * 100 // s.history_messages
            line = f"history: {s.published:,} of {s.history_messages:,} messages ({done} %)"
        else:
            line = f"{s.published:,} published"
        click.echo(f"\r{line}, {s.acknowledged:,} acknowledged".ljust(72), nl=False)

    with stop_on_signals() as stop:
        stats = run_simulation(
            fleet,
            broker,
            prefix=settings.topic_prefix,
            rate=rate,
            count=count,
            duration=duration,
            batch_size=batch_size,
            seed=seed,
            stop=stop,
            progress=show,
            history=history,
            history_step=step,
        )
    click.echo(
        f"\nDone: {stats.published:,} messages published, {stats.acknowledged:,} "
        f"acknowledged by the broker, {stats.devices} devices, {stats.seconds:.1f} s."
    )


@main.command("dev")
@click.option("--no-dagster", is_flag=True, help="Start only the database, broker and demo data.")
@friendly_errors
def dev_command(no_dagster: bool) -> None:
    """Run the whole stack locally: database, broker, migrations, demo tenant, Dagster UI.

    Uses an embedded PostgreSQL unless IIOT_DATABASE_URL is set, and Mosquitto (if on PATH) or
    the in-process amqtt broker unless IIOT_MQTT_URL is set. Ctrl-C stops everything.
    """
    from iiot_orchestration.dev import run_dev_stack

    sys.exit(run_dev_stack(_settings(), dagster=not no_dagster, echo=click.echo))


# command groups defined in their own modules, which import the helpers above
from iiot_orchestration.cli_alert_webhook import alert_webhook_command  # noqa: E402
from iiot_orchestration.cli_alerts import alerts_group, dagster_metrics_command  # noqa: E402
from iiot_orchestration.cli_api import api_command, api_keys_group  # noqa: E402
from iiot_orchestration.cli_archive import archive_group, tenants_delete_command  # noqa: E402
from iiot_orchestration.cli_backup import backup_group  # noqa: E402
from iiot_orchestration.cli_billing import billing_group, set_plan_command  # noqa: E402
from iiot_orchestration.cli_claim_codes import claim_codes_group  # noqa: E402
from iiot_orchestration.cli_dagster import dagster_command  # noqa: E402
from iiot_orchestration.cli_dead_letters import dead_letters_group  # noqa: E402
from iiot_orchestration.cli_ingest_sessions import ingest_sessions_group  # noqa: E402
from iiot_orchestration.cli_pki import issue_cert_command, pki_group, revoke_command  # noqa: E402
from iiot_orchestration.cli_report import report_command  # noqa: E402
from iiot_orchestration.cli_tenant_logins import logins_group  # noqa: E402

main.add_command(billing_group)
main.add_command(alerts_group)
main.add_command(dagster_metrics_command)
main.add_command(alert_webhook_command)
tenants.add_command(set_plan_command)
main.add_command(report_command)
main.add_command(backup_group)
main.add_command(pki_group)
devices.add_command(revoke_command)
devices.add_command(issue_cert_command)
main.add_command(archive_group)
main.add_command(dead_letters_group)
main.add_command(ingest_sessions_group)
tenants.add_command(tenants_delete_command)
tenants.add_command(logins_group)
main.add_command(dagster_command)
main.add_command(api_command)
main.add_command(api_keys_group)
devices.add_command(claim_codes_group)

if __name__ == "__main__":  # pragma: no cover
    main()
