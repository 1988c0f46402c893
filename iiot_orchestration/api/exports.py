"""Exports streamed in constant memory: CSV through ``COPY (SELECT ...) TO STDOUT``, Parquet
through a server-side cursor read in batches into Arrow record batches.

A streamed response outlives its request's session (that transaction commits before the first
byte is sent), so an export runs on a pooled connection of its own, opened when the response
starts, in a read-only transaction scoped to the tenant the session authenticated. The blocking
database work runs in a worker thread a chunk at a time; when the client goes away, the
generator is closed there too, so its COPY is cancelled and its connection goes back to the pool.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from psycopg import sql
from psycopg_pool import ConnectionPool

log = logging.getLogger("iiot.api")

CSV_MEDIA_TYPE = "text/csv; charset=utf-8"
PARQUET_MEDIA_TYPE = "application/vnd.apache.parquet"
CHUNK_BYTES = 256 * 1024
FETCH_ROWS = 16_384
ROW_GROUP_ROWS = 8 * FETCH_ROWS
CURSOR_NAME = "iiot_export"


class ExportSlots:
    """At most ``size`` exports stream at once, so that exports (each holding a pooled connection
    for as long as it streams) never take every connection the API's requests need."""

    _lock = threading.Lock()

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = threading.BoundedSemaphore(size)

    @classmethod
    def of(cls, state: Any) -> ExportSlots:
        """The slots of an application (``app.state``): half its pool's connections."""
        with cls._lock:
            if getattr(state, "export_slots", None) is None:
                state.export_slots = cls(max(1, state.pool.max_size // 2))
            return state.export_slots

    def take(self) -> Callable[[], None] | None:
        """A slot's release (to call once, more calls do nothing), or None when all are taken."""
        if not self._free.acquire(blocking=False):
            return None
        once = threading.Lock()

        def release() -> None:
            if once.acquire(blocking=False):
                self._free.release()

        return release


class ExportAborted(Exception):
    """An export that stopped before its end: the response is cut, never completed."""


@dataclass(frozen=True)
class ExportQuery:
    """A SELECT with ``%(name)s`` placeholders, its parameters and its columns' Arrow types."""

    select: str
    params: dict[str, Any]
    columns: tuple[tuple[str, pa.DataType], ...]

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(list(self.columns))


def csv_chunks(conn: psycopg.Connection, query: ExportQuery) -> Iterator[bytes]:
    """The rows as CSV with a header line, in chunks of about CHUNK_BYTES."""
    statement = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER)").format(
        sql.SQL(query.select)  # type: ignore[arg-type]  # the routes' own SQL, never input
    )
    buffer = bytearray()
    with conn.cursor() as cur, cur.copy(statement, query.params) as copy:
        for data in copy:  # one row per message
            buffer += data
            if len(buffer) >= CHUNK_BYTES:
                yield bytes(buffer)
                buffer.clear()
    if buffer:
        yield bytes(buffer)


class _Drain:
    """A write-only file for ParquetWriter whose bytes are taken out after each row group."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.closed = False

    def write(self, data: bytes) -> int:
        self.buffer += data
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


def _record_batch(rows: list[tuple], schema: pa.Schema) -> pa.RecordBatch:
    columns = zip(*rows, strict=True)
    arrays = [
        pa.array(values, type=field.type) for values, field in zip(columns, schema, strict=True)
    ]
    return pa.record_batch(arrays, schema=schema)


def parquet_chunks(conn: psycopg.Connection, query: ExportQuery) -> Iterator[bytes]:
    """The rows as a Parquet file (zstd) in row groups of ROW_GROUP_ROWS, fetched FETCH_ROWS at
    a time: only one fetch's rows are ever Python objects, and one row group Arrow arrays."""
    schema = query.schema
    sink = _Drain()
    writer = pq.ParquetWriter(pa.PythonFile(sink, mode="w"), schema, compression="zstd")
    try:
        with conn.cursor(name=CURSOR_NAME, binary=True) as cur:
            cur.execute(query.select, query.params)
            group: list[pa.RecordBatch] = []
            grouped = 0
            done = False
            while not done:
                rows = cur.fetchmany(FETCH_ROWS)
                done = len(rows) < FETCH_ROWS
                if rows:
                    group.append(_record_batch(rows, schema))
                    grouped += len(rows)
                del rows  # before the next fetch
                if group and (done or grouped >= ROW_GROUP_ROWS):
                    writer.write_table(pa.Table.from_batches(group), row_group_size=grouped)
                    group, grouped = [], 0
                    yield sink.take()
    finally:
        writer.close()  # the footer; after an error it is never sent
    yield sink.take()


def stream(
    pool: ConnectionPool,
    tenant_id: int,
    timeout_seconds: float,
    chunks: Callable[[psycopg.Connection], Iterator[bytes]],
    *,
    request_id: str = "",
    pool_timeout: float = 10.0,
) -> Iterator[bytes]:
    """``chunks`` of an export on a pooled connection of its own, in a read-only transaction of
    ``tenant_id`` (the session's, never the request's) that ``timeout_seconds`` bound: the COPY
    statement by ``statement_timeout``, a cursor's whole run by a deadline between batches."""
    deadline = time.monotonic() + timeout_seconds
    sent = 0
    with pool.connection(timeout=pool_timeout) as conn, conn.transaction():
        conn.execute("SET TRANSACTION READ ONLY")
        conn.execute(
            "SELECT set_config('iiot.tenant_id', %s, true),"
            " set_config('statement_timeout', %s, true),"
            " set_config('TimeZone', 'UTC', true)",
            (str(tenant_id), f"{int(timeout_seconds * 1000)}ms"),
        )
        produced = chunks(conn)
        try:
            for chunk in produced:
                if time.monotonic() > deadline:
                    raise ExportAborted(f"took longer than {timeout_seconds:g} s")
                sent += len(chunk)
                yield chunk
            return
        except psycopg.errors.QueryCanceled:
            problem = f"took longer than {timeout_seconds:g} s"
        except (ExportAborted, psycopg.Error) as exc:
            problem = str(exc)
        finally:
            produced.close()  # a COPY still running is cancelled before the connection returns
        log.warning(
            "export cut after %d bytes: %s",
            sent,
            problem,
            extra={"request_id": request_id, "tenant_id": tenant_id},
        )
        raise ExportAborted(problem)


async def in_worker_thread(
    chunks: Iterator[bytes], release: Callable[[], None]
) -> AsyncIterator[bytes]:
    """A blocking generator as an async one: each chunk is produced in a worker thread, and the
    generator is closed there when the response ends early (the client went away). ``release``
    runs at the end, however it ends."""
    try:
        while (chunk := await anyio.to_thread.run_sync(next, chunks, None)) is not None:
            yield chunk
    finally:
        try:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(chunks.close)
        finally:
            release()


def streamed(chunks: Iterator[bytes], release: Callable[[], None]) -> AsyncIterator[bytes]:
    """``in_worker_thread``, whose ``release`` also runs if the response never starts."""
    body = in_worker_thread(chunks, release)
    weakref.finalize(body, release)
    return body
