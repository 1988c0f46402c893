"""The writer process of an ingest slot: judges raw messages and commits them, beside the process
that receives them.

In one Python process, paho's network thread and the work done per message (JSON, validation,
quotas, the COPY rows) share one interpreter lock, and the slot then received at about 0.7 x the
rate of a paho client doing nothing. With ``IngestConfig.writer_process`` the receiving process
only collects each message (topic, payload, arrival time; it keeps the packet ids) into the
open batch and hands sealed batches to this process through a pipe; this process judges them,
commits them in one transaction and answers with what landed, and the receiving process then
acknowledges the batch to the broker. Acknowledgements still follow the commit, so a crash of
either process loses nothing the broker accepted.

The pipe carries ``(kind, ...)`` tuples. Requests: ``("open",)``, ``("write", batch_id,
messages)``, ``("stop",)``. Answers: ``("ok", payload)``, ``("unavailable", (error, reason))``
(the database; ``reason`` is ``writer.retry_reason``: the receiving process retries the same
batch, which is not judged twice) or ``("fatal", error)``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import queue
import signal
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection

import psycopg

from iiot_orchestration.db import DatabaseUnavailable, open_connection
from iiot_orchestration.errors import IiotError
from iiot_orchestration.logs import configure_from_environment
from ingest_daemon.judge import Judge, Judged, Written
from ingest_daemon.registry_cache import RegistryCache
from ingest_daemon.validation import Limits
from ingest_daemon.writer import BatchNotTaken, BatchWriter, retry_reason

log = logging.getLogger(__name__)

# topic, payload, arrival (epoch seconds); the packet ids stay with the receiving process
RawMessage = tuple[str, bytes, float]


@dataclass(frozen=True)
class WorkerConfig:
    database_url: str
    prefix: str
    limits: Limits
    slot: int


class WorkerFailed(IiotError):
    """The writer process could not start, or died."""


def open_writer(config: WorkerConfig) -> BatchWriter:
    """The slot's batch writer on its own connection (as platform_rw), in either process."""
    return BatchWriter(
        open_connection(
            config.database_url,
            role="platform_rw",
            application_name=f"iiot-ingest-{config.slot}",
        )
    )


def judge_raw(judge: Judge, messages: list[RawMessage]) -> Judged:
    judged = Judged()
    for topic, payload, arrived in messages:
        judge.judge(judged, topic, payload, datetime.fromtimestamp(arrived, UTC))
    return judged


def main(pipe: Connection, config: WorkerConfig) -> None:  # pragma: no cover - a subprocess
    """The writer process: signals are the receiving process's to handle (it drains, then sends
    ``stop``), so they are ignored here. A spawned process starts with no logging set up: it
    reads IIOT_LOG_LEVEL and IIOT_LOG_FORMAT (inherited) for the receiving process's format."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_from_environment()
    serve(pipe, config)


def serve(pipe: Connection, config: WorkerConfig) -> None:
    """The writer process's loop; returns on ``stop`` or when the receiving process is gone.

    This thread reads requests and judges each new batch; a committer thread opens the
    connection and commits the judged batches in the order they came, so the next batch is
    judged while the database lands the current one. After a batch fails for want of the
    database, the committer refuses every other write (without trying it) until that batch is
    committed: the receiving process sends the failed batches again, in order, and batches are
    never committed out of order.

    Until the registry has been read, every request is answered ``unavailable`` (the receiving
    process waits for the database with backoff and asks again), and nothing is judged."""
    registry, request = _read_registry(pipe, config)
    if registry is None:
        return
    registry.start()
    judge = Judge(registry.get, config.prefix, config.limits)
    judged: dict[int, Judged] = {}  # judged and not committed yet: a retry is not judged again
    work: queue.Queue[tuple | None] = queue.Queue(maxsize=1)
    committer = threading.Thread(
        target=_commit, args=(pipe, config, work, judged), name="ingest-committer"
    )
    committer.start()
    try:
        while committer.is_alive():
            if request is None:
                if not pipe.poll(0.5):
                    continue
                try:
                    request = pipe.recv()
                except EOFError:
                    return  # the receiving process is gone: nothing of ours was acknowledged
            if request[0] == "stop":
                return
            if request[0] == "write":
                _, batch_id, messages = request
                if batch_id not in judged:
                    judged[batch_id] = judge_raw(judge, messages)
                request = ("write", batch_id)
            _hand(work, committer, request)
            request = None
    finally:
        _hand(work, committer, None)
        committer.join()
        registry.stop()


def _read_registry(
    pipe: Connection, config: WorkerConfig
) -> tuple[RegistryCache | None, tuple | None]:
    """The registry, read when the first request comes and again at each request while the
    database is unavailable (answered ``unavailable``, not judged); also the request that found
    it readable, still to be served. ``(None, None)`` on ``stop``, when the receiving process
    is gone, or when the registry cannot be read for another reason (answered ``fatal``)."""
    while True:
        try:
            request = pipe.recv()
        except EOFError:
            return None, None
        if request[0] == "stop":
            return None, None
        try:
            return RegistryCache(config.database_url), request
        except (psycopg.OperationalError, DatabaseUnavailable) as exc:
            message = f"cannot read the device registry: {exc}"[:500]
            pipe.send(("unavailable", (message, retry_reason(exc))))
        except psycopg.Error as exc:  # not migrated, no privilege: waiting would not help
            pipe.send(("fatal", f"cannot read the device registry: {exc}"[:500]))
            return None, None


def _hand(work: queue.Queue, committer: threading.Thread, request: tuple | None) -> None:
    """Queue a request for the committer, unless it has died (it said why)."""
    while committer.is_alive():
        try:
            work.put(request, timeout=0.5)
            return
        except queue.Full:
            continue


def _commit(
    pipe: Connection, config: WorkerConfig, work: queue.Queue, judged: dict[int, Judged]
) -> None:
    """The committer thread of ``serve``: answers every request it takes, in order."""
    writer: BatchWriter | None = None
    failed: int | None = None  # the batch the database did not take: none after it is tried
    failed_reason = "connection"
    try:
        while (request := work.get()) is not None:
            if request[0] == "write" and failed not in (None, request[1]):
                waiting = f"batch {failed} is waiting for the database"
                pipe.send(("unavailable", (waiting, failed_reason)))
                continue
            try:
                writer = writer or open_writer(config)
                if request[0] == "open":
                    pipe.send(("ok", None))
                    continue
                batch = judged[request[1]]
                result = writer.write(batch.readings, batch.dead_letters, now=datetime.now(UTC))
            except (psycopg.OperationalError, DatabaseUnavailable) as exc:
                if writer is not None:
                    writer.conn.close()
                    writer = None
                if request[0] == "write":
                    failed, failed_reason = request[1], retry_reason(exc)
                pipe.send(("unavailable", (str(exc)[:500], retry_reason(exc))))
                continue
            failed = None
            del judged[request[1]]
            pipe.send(("ok", batch.written(result)))
    except BrokenPipeError:
        pass  # the receiving process is gone (killed): nothing of ours was acknowledged
    except Exception as exc:  # a bug: say so, and the process ends
        log.exception("the ingest writer failed")
        with contextlib.suppress(OSError):
            pipe.send(("fatal", f"the ingest writer failed: {exc!r}"[:500]))
    finally:
        if writer is not None:
            writer.conn.close()


class ProcessWriter:
    """The receiving process's handle on its writer process."""

    def __init__(self, config: WorkerConfig) -> None:
        context = multiprocessing.get_context("spawn")  # no copy of paho's threads or sockets
        self._pipe, child = context.Pipe()
        self.process = context.Process(
            target=main, args=(child, config), name=f"ingest-writer-{config.slot}", daemon=True
        )
        self.process.start()
        child.close()

    def _send(self, request: tuple) -> None:
        try:
            self._pipe.send(request)
        except OSError as exc:
            raise WorkerFailed(f"the ingest writer process stopped ({exc!r})") from exc

    def receive(self) -> Written | None:
        """The answer to the oldest request not answered yet; raises DatabaseUnavailable when
        that was a write the database did not take, or one refused untried behind it (send
        them again, same ids, in order)."""
        try:
            kind, payload = self._pipe.recv()
        except (EOFError, OSError) as exc:
            raise WorkerFailed(f"the ingest writer process stopped ({exc!r})") from exc
        if kind == "unavailable":
            raise BatchNotTaken(*payload)
        if kind == "fatal":
            raise WorkerFailed(payload)
        return payload

    def open(self) -> None:
        """Raises DatabaseUnavailable while the writer process cannot reach the database."""
        self._send(("open",))
        self.receive()

    def submit(self, messages: list[RawMessage], batch_id: int) -> None:
        """Send a batch to be judged and committed; its answer comes from ``receive``, after
        the answers of the batches submitted before it."""
        self._send(("write", batch_id, messages))

    def write(self, messages: list[RawMessage], batch_id: int) -> Written:
        """Judge and commit one batch; raises DatabaseUnavailable (retry with the same id)."""
        self.submit(messages, batch_id)
        return self.receive()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._pipe.send(("stop",))
        self.process.join(10)
        if self.process.is_alive():  # pragma: no cover - a writer stuck in the database
            self.process.kill()
            self.process.join(5)
        self._pipe.close()
