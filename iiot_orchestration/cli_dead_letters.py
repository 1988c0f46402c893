"""``iiot dead-letters``: list the refused messages, and replay them once the registry knows
better (a device registered late, a metric added) (docs/ingest.md, docs/cli.md)."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

import click

from iiot_orchestration import dead_letters
from iiot_orchestration.cli_common import HelpGroup, _json, _settings, _table, friendly_errors
from iiot_orchestration.db import connect
from ingest_daemon.validation import REASONS

_DAY = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
SHOWN_OUTCOMES = 50


class TimeType(click.ParamType):
    """An ISO date (its 00:00 UTC) or date and time (UTC when it names no offset)."""

    name = "ISO-TIME"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        text = str(value).strip()
        try:
            if len(text) > 40:
                raise ValueError
            if _DAY.match(text):
                day = date.fromisoformat(text)
                return datetime(day.year, day.month, day.day, tzinfo=UTC)
            moment = datetime.fromisoformat(text)
        except ValueError:
            self.fail(
                f"{text[:40]!r} is not an ISO date or time such as 2026-12-01 or "
                "2026-12-01T08:00:00-03:00",
                param,
                ctx,
            )
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


TIME = TimeType()


def _filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--tenant",
            help="Only this tenant's (slug), with those from MACs it owns that came before the "
            "device was registered.",
        ),
        click.option(
            "--reason",
            "reasons",
            multiple=True,
            type=click.Choice(REASONS),
            help="Only this reason (repeatable).",
        ),
        click.option("--since", type=TIME, help="Received at or after (ISO date or time)."),
        click.option("--until", type=TIME, help="Received before (ISO date or time)."),
        click.option("--limit", type=click.IntRange(1, 1_000_000), help="At most this many."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _filters(
    conn: Any,
    tenant: str | None,
    reasons: tuple[str, ...],
    since: datetime | None,
    until: datetime | None,
    limit: int | None,
) -> dead_letters.Filters:
    if since and until and until <= since:
        raise click.BadParameter(f"{until.isoformat()} is not after --since", param_hint="--until")
    return dead_letters.Filters(
        dead_letters.tenant_id(conn, tenant) if tenant else None,
        reasons or None,
        since,
        until,
        limit,
    )


def _connection() -> Any:
    url = _settings().require_database_url()
    return connect(url, autocommit=True, role="platform_rw", application_name="iiot-dead-letters")


def _printable(text: str, width: int) -> str:
    """One line of at most ``width`` characters, control characters shown as '?'."""
    flat = "".join(c if c.isprintable() else "?" for c in text)
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _payload(payload: bytes) -> dict[str, str]:
    try:
        return {"payload": payload.decode("utf-8"), "payload_encoding": "utf-8"}
    except UnicodeDecodeError:
        return {"payload": base64.b64encode(payload).decode(), "payload_encoding": "base64"}


@click.group("dead-letters", cls=HelpGroup)
def dead_letters_group() -> None:
    """Refused messages: list them, replay them once the registry knows better."""


@dead_letters_group.command("list")
@_filter_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with payloads) instead.")
@friendly_errors
def dead_letters_list(
    tenant: str | None,
    reasons: tuple[str, ...],
    since: datetime | None,
    until: datetime | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """List dead letters, oldest first."""
    with _connection() as conn:
        found = dead_letters.find(conn, _filters(conn, tenant, reasons, since, until, limit))
    if as_json:
        rows = []
        for letter in found:
            payload = bytes(letter.pop("payload"))
            rows.append({**letter, **_payload(payload)})
        click.echo(_json(rows))
        return
    click.echo(
        _table(
            ["id", "received", "tenant", "mac", "reason", "bytes", "detail"],
            [
                [
                    f["dead_letter_id"],
                    f["received_at"].astimezone(UTC),
                    f["tenant"],
                    f["mac"],
                    f["reason"],
                    f"{f['payload_size']:,}" + (" (cut)" if f["payload_truncated"] else ""),
                    _printable(f["detail"], 70),
                ]
                for f in found
            ],
        )
    )
    click.echo(f"{len(found):,} dead letters")


@dead_letters_group.command("replay")
@_filter_options
@click.option("--dry-run", is_flag=True, help="Show what would land; change nothing.")
@friendly_errors
def dead_letters_replay(
    tenant: str | None,
    reasons: tuple[str, ...],
    since: datetime | None,
    until: datetime | None,
    limit: int | None,
    dry_run: bool,
) -> None:
    """Judge dead letters again with the registry as it is now; land what is valid now, once,
    and delete those dead letters in the same transaction. What is still refused stays, and is
    reported with its reason now. rate_limited ones only when named with --reason."""
    settings = _settings()
    with _connection() as conn:
        filters = _filters(conn, tenant, reasons, since, until, limit)
        filters = dead_letters.Filters(
            filters.tenant_id,
            dead_letters.replayable(filters.reasons),
            filters.since,
            filters.until,
            filters.limit,
        )

        def progress(done: int, total: int) -> None:
            if total > dead_letters.REPLAY_CHUNK_ROWS:
                click.echo(f"{done:,} of {total:,} dead letters judged", err=True)

        run = dead_letters.replay(
            conn, filters, prefix=settings.topic_prefix, dry_run=dry_run, progress=progress
        )
        left_alone = 0
        if not reasons:
            skipped = dead_letters.Filters(
                filters.tenant_id, dead_letters.NOT_REPLAYED_UNLESS_NAMED, since, until
            )
            left_alone = dead_letters.count(conn, skipped)
    _report(run, dry_run, left_alone)


def _report(run: dead_letters.ReplayRun, dry_run: bool, left_alone: int) -> None:
    would = "would " if dry_run else ""
    for outcome in run.outcomes[:SHOWN_OUTCOMES]:
        head = (
            f"#{outcome.dead_letter_id} {outcome.received_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z "
            f"{outcome.mac or '-'} {outcome.reason}:"
        )
        if outcome.action == "truncated":
            click.echo(f"{head} kept: its payload was truncated when stored, cannot be replayed")
        elif outcome.action == "refused":
            click.echo(f"{head} kept, still refused ({', '.join(outcome.refused)})")
        else:
            refused = f"; refused now: {', '.join(outcome.refused)}" if outcome.refused else ""
            plural = "" if outcome.readings == 1 else "s"
            click.echo(f"{head} {would}land {outcome.readings} reading{plural}{refused}")
    if len(run.outcomes) > SHOWN_OUTCOMES:
        click.echo(f"... and {len(run.outcomes) - SHOWN_OUTCOMES:,} more")
    refused = run.refused_reasons()
    refused_text = ", ".join(f"{reason} {n:,}" for reason, n in sorted(refused.items()))
    click.echo(
        f"{'Dry run: ' if dry_run else ''}{run.matched:,} dead letters judged: "
        f"{run.deleted:,} {would}replay ({run.landed:,} readings {would}land, "
        f"{run.already_stored:,} already stored"
        + (f", {run.added:,} refused parts {would}stay as new dead letters" if run.added else "")
        + f"); {run.count('refused'):,} still refused and kept"
        + (f" ({refused_text})" if refused_text else "")
        + f"; {run.count('truncated'):,} truncated, cannot be replayed."
        + (" Nothing was changed." if dry_run else "")
    )
    if left_alone:
        click.echo(
            f"{left_alone:,} rate_limited dead letters were left alone: name them with "
            "--reason rate_limited to land them past the plan's rate."
        )
