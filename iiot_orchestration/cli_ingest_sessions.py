"""``iiot ingest-sessions ...``: the ingest slots' broker sessions, listed, drained and ended
(docs/ingest.md, "Sessions")."""

from __future__ import annotations

import click

from iiot_orchestration.cli_common import HelpGroup, _json, _settings, _table, friendly_errors
from iiot_orchestration.db import connect
from iiot_orchestration.errors import IiotError


@click.group("ingest-sessions", cls=HelpGroup)
def ingest_sessions_group() -> None:
    """The ingest slots' broker sessions: list them, drain and end a retired slot's."""


@ingest_sessions_group.command("list")
@click.option("--group", default=None, help="Only this ingest group [default: every group].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def list_command(group: str | None, as_json: bool) -> None:
    """Each slot's session as the slots recorded it: subscription, host, state, last seen and
    until when the broker keeps it (and queues the slot's messages) once the slot stops."""
    from ingest_daemon.sessions import list_sessions

    with connect(_settings().require_database_url(), role="readonly_audit") as conn:
        sessions = list_sessions(conn, group)
    if as_json:
        click.echo(_json([s.as_dict() for s in sessions]))
        return
    if not sessions:
        click.echo(f"no ingest sessions recorded{f' for group {group}' if group else ''}")
        return
    click.echo(
        _table(
            [
                "group",
                "slot",
                "client id",
                "subscription",
                "host",
                "pid",
                "status",
                "last seen",
                "kept until",
            ],
            [
                [
                    s.group,
                    s.slot,
                    s.client_id,
                    s.subscription,
                    s.host,
                    s.pid,
                    s.status,
                    s.last_seen_at,
                    None if s.state == "ended" else s.expires_at,
                ]
                for s in sessions
            ],
        )
    )


@ingest_sessions_group.command("drain")
@click.option("--slot", type=click.IntRange(0, 63), required=True, help="The slot to retire.")
@click.option("--group", default="iiot-ingest", show_default=True, help="Its ingest group.")
@click.option(
    "--idle",
    type=click.FloatRange(0.5, 600),
    default=5.0,
    show_default=True,
    help="Seconds without a message after which the slot's session counts as drained.",
)
@click.option(
    "--force", is_flag=True, help="Drain even though the slot's record says it is running."
)
@friendly_errors
def drain_command(slot: int, group: str, idle: float, force: bool) -> None:
    """Retire a stopped slot: connect as it, remove its subscription so nothing new is routed
    to it, land what its session holds (acknowledged after commit, as ingest does), then end
    the session so the broker forgets it. Stop the slot first."""
    from iiot_orchestration.signals import stop_on_signals
    from ingest_daemon.daemon import IngestConfig, IngestDaemon
    from ingest_daemon.sessions import SessionInfo, end_broker_session, list_sessions, record

    settings = _settings()
    if not settings.mqtt_url:
        raise click.UsageError(
            "IIOT_MQTT_URL is not set: expected mqtt://host:port or mqtts://host:port"
        )
    database_url = settings.require_database_url()
    config = IngestConfig.from_settings(settings, group=group, slot=slot, drain_idle_s=idle)
    with connect(database_url, role="platform_rw") as conn:
        known = [s for s in list_sessions(conn, group) if s.slot == slot]
    if known and known[0].live and not force:
        running = known[0]
        raise IiotError(
            f"slot {slot} of group {group} is running (pid {running.pid} on {running.host}, "
            f"seen {running.silent_for.total_seconds():.0f} s ago): stop it first, or pass "
            "--force if that process is gone"
        )
    click.echo(f"Draining {config.client_id}: landing what its session holds (Ctrl-C stops)")
    daemon = IngestDaemon(config)
    with stop_on_signals() as stop:
        counters = daemon.run(stop)
    if counters.unacknowledged:
        raise IiotError(
            f"the database stayed unavailable: {counters.unacknowledged:,} messages stay in "
            f"{config.client_id}'s session; run the drain again"
        )
    if not daemon.drained:
        raise IiotError(
            f"stopped before {config.client_id} was drained ({counters.landed:,} readings "
            "landed so far): its session is kept; run the drain again"
        )
    end_broker_session(config.mqtt_options, config.client_id)
    info = SessionInfo(config.client_id, group, slot, "(ended)", 0)
    with connect(database_url, role="platform_rw") as conn:
        record(conn, info, "ended")
    click.echo(
        f"Drained {config.client_id}: {counters.received:,} messages, {counters.landed:,} "
        f"readings landed, {counters.duplicates:,} duplicates, {counters.dead_letters:,} dead "
        "letters; its broker session is ended."
    )
