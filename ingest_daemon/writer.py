"""Lands a batch in one transaction: readings through a binary COPY and a staging table, dead
letters beside them. Either the whole batch is committed or none of it is."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import psycopg

from iiot_orchestration.db import query
from iiot_orchestration.storage import storage_for
from ingest_daemon.validation import Reading, Rejection

log = logging.getLogger(__name__)

MAX_KEPT_PAYLOAD = 16 * 1024
_READING_TYPES = ("int4", "int4", "text", "timestamptz", "float8", "timestamptz", "int4", "bool")


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
    usage counts messages, not readings) and whether it was over the plan's rate (overage)."""

    received_at: datetime
    number: int
    overage: bool = False


@dataclass(frozen=True)
class BatchResult:
    landed: int
    duplicates: int
    dead_letters: int


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
    ) -> BatchResult:
        """Commit the batch; on any error nothing is committed and the error is raised."""
        conn = self.conn
        with conn.transaction():
            landed = self._land(readings, now) if readings else 0
            if dead_letters:
                with conn.cursor().copy(query("copy_dead_letter_staging")) as copy:
                    for letter in dead_letters:
                        copy.write_row(letter.row(self.keep))
                conn.execute(query("land_dead_letter_staging"))
        return BatchResult(landed, len(readings) - landed, len(dead_letters))

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
