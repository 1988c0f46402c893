"""Lands a batch in one transaction: readings through a binary COPY and a staging table, dead
letters beside them. Either the whole batch is committed or none of it is."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

import orjson
import psycopg

from iiot_orchestration.db import DatabaseUnavailable, query
from iiot_orchestration.storage import storage_for
from ingest_daemon.validation import Reading, Rejection

log = logging.getLogger(__name__)

MAX_KEPT_PAYLOAD = 16 * 1024
_READING_TYPES = ("int4", "int4", "text", "timestamptz", "float8", "timestamptz", "int4", "bool")
# SQLSTATEs of a connection the server ended or refused: admin, crash and start-up shutdown
_CONNECTION_STATES = ("57P01", "57P02", "57P03")


class BatchNotTaken(DatabaseUnavailable):
    """The writer process could not commit a batch; ``reason`` is its ``retry_reason``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def retry_reason(error: BaseException) -> str:
    """Why a batch write failed, for ``iiot_ingest_batches_retried_total{reason}`` (one of
    ``ingest_daemon.metrics.RETRY_REASONS``): ``serialization`` for a
    serialization failure or a deadlock (SQLSTATE class 40), ``connection`` for a connection
    lost, refused or ended by the server (no SQLSTATE: libpq's own error; class 08; 57P01-03),
    ``other`` for the rest (a cancelled statement, a full disk)."""
    if isinstance(error, BatchNotTaken):
        return error.reason
    if isinstance(error, DatabaseUnavailable):
        return "connection"
    if isinstance(error, psycopg.Error):
        state = error.sqlstate  # psycopg's SerializationFailure is no TransactionRollback
        if state is not None and state.startswith("40"):
            return "serialization"
        if state is None or state.startswith("08") or state in _CONNECTION_STATES:
            return "connection"
    return "other"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    received_at: datetime
    topic: str
    mac: str | None
    tenant_id: int | None
    device_id: int | None
    rejection: Rejection

    def row(self, keep: int) -> tuple[object, ...]:
        payload = self.rejection.payload
        return (
            self.received_at,
            self.topic[:500],
            self.mac,
            self.tenant_id,
            self.device_id,
            self.rejection.reason,
            self.rejection.detail[:1000],
            payload[:keep],
            len(payload),
            len(payload) > keep,
        )


class Delivery(NamedTuple):
    """The message a reading came in: when it was received, its number within the batch (so
    usage counts messages, not readings), whether it was over the plan's rate (overage) and its
    topic (for the dead letter of a conflicting duplicate)."""

    received_at: datetime
    number: int
    overage: bool = False
    topic: str = ""


class Conflict(NamedTuple):
    """A reading refused because its (device, metric, ts) is stored with another value."""

    reading: Reading
    kept: float
    delivery: Delivery
    mac: str | None

    def dead_letter(self) -> DeadLetter:
        reading = self.reading
        detail = (
            f"{reading.metric} at {reading.ts.astimezone(UTC).isoformat()} is stored as "
            f"{self.kept!r}; refused {reading.value!r}"
        )
        # the refused reading alone, its ts as the device wrote it: a message of its own
        payload = orjson.dumps(
            {"ts": reading.ts.isoformat(), "metrics": {reading.metric: reading.value}}
        )
        return DeadLetter(
            self.delivery.received_at,
            self.delivery.topic,
            self.mac,
            reading.tenant_id,
            reading.device_id,
            Rejection("conflicting_duplicate", detail, payload),
        )


@dataclass(frozen=True)
class BatchResult:
    landed: int
    duplicates: int  # identical re-deliveries, skipped silently
    dead_letters: int
    conflicts: tuple[Conflict, ...] = ()  # dead-lettered too, unless the caller kept them


class BatchWriter:
    """Writes batches on one connection (the staging table is per session)."""

    def __init__(self, conn: psycopg.Connection, *, keep_payload_bytes: int = MAX_KEPT_PAYLOAD):
        self.conn = conn
        self.keep = keep_payload_bytes
        self.conn.execute(query("create_telemetry_staging"))
        self.conn.execute(query("create_dead_letter_staging"))
        self.conn.commit()

    def write(
        self,
        readings: list[tuple[Reading, Delivery]],
        dead_letters: list[DeadLetter],
        *,
        now: datetime,
        dead_letter_conflicts: bool = True,
    ) -> BatchResult:
        """Commit the batch; on any error nothing is committed and the error is raised.

        A reading whose key is already stored (or comes earlier in the batch) with another
        value is a conflict: dead-lettered as ``conflicting_duplicate`` in the same transaction,
        or, with ``dead_letter_conflicts`` off (replay), only returned."""
        conn = self.conn
        conflicts: list[Conflict] = []
        with conn.transaction():
            landed = self._land(readings, now) if readings else 0
            wrong_tenant: list[DeadLetter] = []
            if landed < len(readings):  # skipped readings: an extra look only then
                conflicts = self._conflicts(readings)
                if dead_letter_conflicts:
                    dead_letters = [*dead_letters, *(c.dead_letter() for c in conflicts)]
                wrong_tenant = self._wrong_tenant(readings)
                dead_letters = [*dead_letters, *wrong_tenant]
            if dead_letters:
                with conn.cursor().copy(query("copy_dead_letter_staging")) as copy:
                    for letter in dead_letters:
                        copy.write_row(letter.row(self.keep))
                conn.execute(query("land_dead_letter_staging"))
        return BatchResult(
            landed,
            len(readings) - landed - len(conflicts) - len(wrong_tenant),
            len(dead_letters),
            tuple(conflicts),
        )

    def _conflicts(self, readings: list[tuple[Reading, Delivery]]) -> list[Conflict]:
        rows = self.conn.execute(query("conflicting_staged_readings")).fetchall()
        if not rows:
            return []
        # the readings as judged (ts as written); aware datetimes of one instant are equal
        judged = {(r.device_id, r.metric, r.ts, r.value, d.number): (r, d) for r, d in readings}
        conflicts = []
        for device_id, metric, ts, value, kept, number, mac, tenant_id, received_at in rows:
            reading, delivery = judged.get(
                (device_id, metric, ts, value, number),
                (Reading(tenant_id, device_id, metric, ts, value), Delivery(received_at, number)),
            )
            conflicts.append(Conflict(reading, kept, delivery, mac))
        return conflicts

    def _wrong_tenant(self, readings: list[tuple[Reading, Delivery]]) -> list[DeadLetter]:
        """Readings staged under a tenant that is not their device's: never landed (the key
        includes the tenant, so they could not shadow the device's own readings either way)."""
        rows = self.conn.execute(query("wrong_tenant_staged_readings")).fetchall()
        if not rows:
            return []
        topics = {(r.device_id, r.metric, r.ts, r.value, d.number): d.topic for r, d in readings}
        letters = []
        for device_id, metric, ts, value, number, mac, tenant_id, received_at in rows:
            payload = orjson.dumps({"ts": ts.isoformat(), "metrics": {metric: value}})
            detail = f"device {device_id} does not belong to tenant {tenant_id}"
            topic = topics.get((device_id, metric, ts, value, number), "")
            rejection = Rejection("wrong_tenant", detail, payload)
            letters.append(DeadLetter(received_at, topic, mac, None, device_id, rejection))
        return letters

    def _land(self, readings: list[tuple[Reading, Delivery]], now: datetime) -> int:
        conn = self.conn
        with conn.cursor().copy(query("copy_telemetry_staging")) as copy:
            copy.set_types(_READING_TYPES)
            for reading, message in readings:
                copy.write_row(
                    (
                        reading.tenant_id,
                        reading.device_id,
                        reading.metric,
                        reading.ts,
                        reading.value,
                        message.received_at,
                        message.number,
                        message.overage,
                    )
                )
        try:
            with conn.transaction():
                return conn.execute(query("land_telemetry_staging"), {"now": now}).fetchone()[0]
        except psycopg.errors.CheckViolation as exc:
            if "no partition" not in str(exc):
                raise
        # each day on its own: one batch may hold days years apart (long retention overrides)
        storage = storage_for(conn)
        days = [row[0] for row in conn.execute(query("staged_days"))]
        created = sum(storage.ensure_partitions(conn, day, day) for day in days)
        log.info(
            "created telemetry partitions for a batch",
            extra={"days": len(days), "partitions_created": created},
        )
        return conn.execute(query("land_telemetry_staging"), {"now": now}).fetchone()[0]
