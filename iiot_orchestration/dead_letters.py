"""Dead letters after the fact: they expire, they can be listed, and they can be replayed once
the registry has changed (a device registered late, a metric added) (docs/ingest.md)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg

from iiot_orchestration.db import query
from iiot_orchestration.errors import IiotError
from ingest_daemon.judge import Judge, Judged
from ingest_daemon.registry_cache import load_devices
from ingest_daemon.validation import DEFAULT_LIMITS, REASONS, Reading, Rejection
from ingest_daemon.writer import BatchWriter, DeadLetter, Delivery

EXPIRE_BATCH_ROWS = 10_000
REPLAY_CHUNK_ROWS = 500
# refused by the plan's rate when they came: a replay would land them past the quota
NOT_REPLAYED_UNLESS_NAMED = ("rate_limited",)


class DeadLetterError(IiotError):
    """A dead-letter command cannot run as asked (an unknown tenant, say)."""


@dataclass(frozen=True)
class Filters:
    """Which dead letters: a tenant's (also those of MACs it owns now that came with no tenant,
    from before the device was registered), of some reasons, received in [since, until)."""

    tenant_id: int | None = None
    reasons: tuple[str, ...] | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int | None = None

    def params(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "reasons": list(self.reasons) if self.reasons is not None else None,
            "since": self.since,
            "until": self.until,
        }


def replayable(reasons: tuple[str, ...] | None) -> tuple[str, ...]:
    """The reasons a replay takes: those named, or every one but ``rate_limited``."""
    if reasons:
        return reasons
    return tuple(r for r in REASONS if r not in NOT_REPLAYED_UNLESS_NAMED)


def tenant_id(conn: psycopg.Connection, slug: str) -> int:
    row = conn.execute("SELECT tenant_id FROM tenants WHERE slug = %s", (slug,)).fetchone()
    if row is None:
        raise DeadLetterError(
            f"unknown tenant {slug[:70]!r}: `iiot tenants list` shows the tenants"
        )
    return row[0]


def expire(
    conn: psycopg.Connection, cutoff: datetime, *, batch_rows: int = EXPIRE_BATCH_ROWS
) -> int:
    """Delete the dead letters received before ``cutoff``, ``batch_rows`` per transaction (an
    autocommit connection), so ingest never waits long on them; returns how many went."""
    deleted = 0
    while True:
        with conn.transaction():
            batch = conn.execute(
                query("expire_dead_letters"), {"cutoff": cutoff, "batch_rows": batch_rows}
            ).rowcount
        deleted += batch
        if batch < batch_rows:
            return deleted


def expired_left(conn: psycopg.Connection, cutoff: datetime) -> int:
    return conn.execute(
        "SELECT count(*) FROM dead_letters WHERE received_at < %s", (cutoff,)
    ).fetchone()[0]


def find(conn: psycopg.Connection, filters: Filters) -> list[dict[str, Any]]:
    """The matching dead letters, oldest first, at most ``filters.limit``."""
    cursor = conn.execute(query("find_dead_letters"), {**filters.params(), "limit": filters.limit})
    names = [column.name for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]


def count(conn: psycopg.Connection, filters: Filters) -> int:
    return conn.execute(
        query("count_dead_letters"), {**filters.params(), "last": 2**63 - 1}
    ).fetchone()[0]


@dataclass
class Outcome:
    """What a replay did with one dead letter."""

    dead_letter_id: int
    received_at: datetime
    mac: str | None
    reason: str
    action: str  # "landed", "refused" (kept), "truncated" (kept)
    readings: int = 0  # now stored (landed, or already there with the same value)
    refused: list[str] = field(default_factory=list)  # reasons of what still does not land


@dataclass
class ReplayRun:
    matched: int = 0
    landed: int = 0  # readings written
    already_stored: int = 0  # readings that were there with the same value
    deleted: int = 0  # dead letters replayed, so deleted
    added: int = 0  # dead letters for the refused parts of messages that partly landed
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, action: str) -> int:
        return sum(1 for o in self.outcomes if o.action == action)

    def refused_reasons(self) -> Counter[str]:
        return Counter(r for o in self.outcomes if o.action == "refused" for r in o.refused)


def replay(
    conn: psycopg.Connection,
    filters: Filters,
    *,
    prefix: str,
    dry_run: bool = False,
    chunk_rows: int = REPLAY_CHUNK_ROWS,
    progress: Callable[[int, int], None] | None = None,
    now: datetime | None = None,
) -> ReplayRun:
    """Judge the matching dead letters again with the registry as it is now and land what is
    valid through the ingest path (``BatchWriter``), deleting each replayed dead letter in the
    same transaction; one transaction per chunk. What is still refused stays as it is. Each
    reading keeps the time its message was received, so usage counts the hour it came.

    ``conn`` is an autocommit connection as ``platform_rw``. Dead letters another replay holds
    are skipped (``SKIP LOCKED``), so replays may run at once, and beside ingest: a reading
    stored meanwhile is a duplicate (same value) or a conflict (another), never a second row."""
    now = now or datetime.now(UTC)
    devices = load_devices(conn)
    judge = Judge(devices.get, prefix, DEFAULT_LIMITS, quotas=False)
    retention_days = {device.device_id: device.retention_days for device in devices.values()}
    writer = BatchWriter(conn)
    run = ReplayRun()
    params = filters.params()
    last = conn.execute("SELECT coalesce(max(dead_letter_id), 0) FROM dead_letters").fetchone()[0]
    total = conn.execute(query("count_dead_letters"), {**params, "last": last}).fetchone()[0]
    if filters.limit is not None:
        total = min(total, filters.limit)
    after = 0
    while run.matched < total:
        rows_wanted = min(chunk_rows, total - run.matched)
        with conn.transaction() as tx:
            rows = conn.execute(
                query("replay_dead_letters"),
                {**params, "after": after, "last": last, "rows": rows_wanted},
            ).fetchall()
            if not rows:
                break
            after = rows[-1][0]
            run.matched += len(rows)
            _replay_chunk(conn, writer, judge, retention_days, rows, run, now)
            if dry_run:
                raise psycopg.Rollback(tx)
        if progress is not None:
            progress(run.matched, total)
    return run


def _replay_chunk(
    conn: psycopg.Connection,
    writer: BatchWriter,
    judge: Judge,
    retention_days: dict[int, int],
    rows: list[tuple],
    run: ReplayRun,
    now: datetime,
) -> None:
    readings: list[tuple[Reading, Delivery]] = []
    judged: dict[int, Judged] = {}
    outcomes: list[Outcome] = []
    for number, (letter_id, received_at, topic, mac, reason, payload, truncated) in enumerate(rows):
        outcome = Outcome(letter_id, received_at, mac, reason, "truncated")
        outcomes.append(outcome)
        if truncated:
            continue  # only its first bytes were kept
        one = Judged()
        judge.judge(one, topic, bytes(payload), received_at)
        _refuse_expired(one, retention_days, received_at, topic, mac, now)
        judged[number] = one
        delivery = Delivery(received_at, number, False, topic)
        readings.extend((reading, delivery) for reading, _ in one.readings)
    result = writer.write(readings, [], now=now, dead_letter_conflicts=False)
    run.landed += result.landed
    run.already_stored += result.duplicates
    conflicts: dict[int, list] = {}
    for conflict in result.conflicts:
        conflicts.setdefault(conflict.delivery.number, []).append(conflict)
    replayed: list[int] = []
    added: list[DeadLetter] = []
    for number, one in judged.items():
        outcome, mine = outcomes[number], conflicts.get(number, [])
        refused = [letter.rejection.reason for letter in one.dead_letters]
        refused += ["conflicting_duplicate"] * len(mine)
        if len(mine) == len(one.readings):  # nothing of it lands: it stays as it is
            outcome.action, outcome.refused = "refused", refused
            continue
        outcome.action, outcome.refused = "landed", refused
        outcome.readings = len(one.readings) - len(mine)
        replayed.append(outcome.dead_letter_id)
        added += one.dead_letters
        added += [conflict.dead_letter() for conflict in mine]
    if added:
        writer.write([], added, now=now)
    if replayed:
        conn.execute(query("delete_replayed_dead_letters"), {"ids": replayed})
    run.deleted += len(replayed)
    run.added += len(added)
    run.outcomes += outcomes


def _refuse_expired(
    judged: Judged,
    retention_days: dict[int, int],
    received_at: datetime,
    topic: str,
    mac: str | None,
    now: datetime,
) -> None:
    """Judged as of its arrival, a reading may have left its tenant's retention since: landing
    it would put back what retention removed."""
    kept = []
    for reading, delivery in judged.readings:
        days = retention_days[reading.device_id]
        if reading.ts >= now - timedelta(days=days):
            kept.append((reading, delivery))
            continue
        fragment = orjson.dumps(
            {"ts": reading.ts.isoformat(), "metrics": {reading.metric: reading.value}}
        )
        detail = f"ts {reading.ts.isoformat()} is older than the tenant's {days}-day retention"
        judged.dead_letters.append(
            DeadLetter(
                received_at,
                topic,
                mac,
                reading.tenant_id,
                reading.device_id,
                Rejection("bad_timestamp", detail, fragment),
            )
        )
    judged.readings = kept
