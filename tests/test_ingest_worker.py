"""The writer process's loop (ingest_daemon.worker), run here in a thread on a real pipe and a
real PostgreSQL: what it answers, and that a batch retried after an outage is judged once."""

import multiprocessing
import threading
import time
import types
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from iiot_orchestration.db import DatabaseUnavailable
from ingest_daemon import judge as judge_module
from ingest_daemon.validation import DEFAULT_LIMITS
from ingest_daemon.worker import ProcessWriter, WorkerConfig, WorkerFailed, serve
from ingest_daemon.writer import BatchWriter
from tests.ingest_helpers import MAC, count, database_refusing_ingest, provision

TOPIC = f"iiot/devices/{MAC}/telemetry"


def message(value: int, minutes_ago: int) -> tuple[str, bytes, float]:
    ts = (datetime.now(UTC) - timedelta(minutes=minutes_ago)).isoformat()
    payload = orjson.dumps({"ts": ts, "metrics": {"energy_kwh": float(value)}})
    return (TOPIC, payload, time.time())


@pytest.fixture
def loop(database_url):
    """The loop in a thread; yields the receiving end of its pipe."""
    ours, theirs = multiprocessing.Pipe()
    config = WorkerConfig(database_url, "iiot", DEFAULT_LIMITS, 0)
    thread = threading.Thread(target=serve, args=(theirs, config))
    thread.start()
    yield ours
    ours.send(("stop",))
    thread.join(30)
    assert not thread.is_alive()


@pytest.fixture
def still_clock(monkeypatch):
    """The judge's rate buckets on a clock that does not move: at 3 messages a minute a bucket
    refills a token every 20 s, which a loaded machine can spend between two judgings."""
    monkeypatch.setattr(judge_module, "time", types.SimpleNamespace(monotonic=lambda: 1000.0))


def test_a_batch_retried_after_an_outage_is_judged_once(
    conn, database_url, pg_server, still_clock, loop
):
    # the plan is changed before the loop's first request: the registry is read then, not
    # when the thread starts (it was, and the test raced the cache's reload on NOTIFY)
    provision(conn, "starter")
    conn.execute("UPDATE plans SET messages_per_minute_per_device = 3")
    loop.send(("open",))
    assert loop.recv() == ("ok", None)
    batch = [message(value, 5) for value in range(1, 6)] + [(TOPIC, b"{", time.time())]
    with database_refusing_ingest(pg_server, database_url):
        loop.send(("write", 1, batch))
        kind, (error, reason) = loop.recv()
        assert kind == "unavailable"
        assert error
        assert reason == "connection"  # its connection was terminated
    loop.send(("write", 1, batch))  # the same batch again: its verdicts are kept
    kind, written = loop.recv()
    assert kind == "ok"
    # the plan allows 3 a minute: judged twice, the second judging would limit all five
    assert (written.result.landed, written.result.dead_letters) == (3, 3)
    assert written.dead_letter_reasons == {"rate_limited": 2, "malformed_json": 1}
    assert written.newest is not None
    assert count(conn, "telemetry") == 3
    assert count(conn, "dead_letters", "reason = 'rate_limited'") == 2
    loop.send(("write", 2, [message(1, 5)]))  # a new batch is judged: the bucket is empty
    kind, written = loop.recv()
    assert (written.result.landed, written.dead_letter_reasons) == (0, {"rate_limited": 1})


def test_a_worker_without_the_database_says_so_and_waits(loop_without_database):
    for request in (("open",), ("write", 1, [message(1, 5)]), ("open",)):
        loop_without_database.send(request)
        kind, (error, reason) = loop_without_database.recv()
        assert kind == "unavailable"  # asked again, it tries again; nothing is judged
        assert "device registry" in error
        assert reason == "connection"


@pytest.fixture
def loop_without_database():
    ours, theirs = multiprocessing.Pipe()
    config = WorkerConfig(
        "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1", "iiot", DEFAULT_LIMITS, 0
    )
    thread = threading.Thread(target=serve, args=(theirs, config))
    thread.start()
    yield ours
    ours.send(("stop",))
    thread.join(30)
    assert not thread.is_alive()


def test_the_process_handle_reports_a_writer_waiting_for_the_database():
    writer = ProcessWriter(
        WorkerConfig(
            "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1", "iiot", DEFAULT_LIMITS, 0
        )
    )
    try:
        with pytest.raises(DatabaseUnavailable, match="device registry"):
            writer.open()
        assert writer.process.is_alive()  # it tries again when asked again
    finally:
        writer.close()
    assert not writer.process.is_alive()


def test_the_process_handle_reports_a_writer_that_cannot_start(empty_database_url):
    writer = ProcessWriter(WorkerConfig(empty_database_url, "iiot", DEFAULT_LIMITS, 0))
    try:
        with pytest.raises(WorkerFailed, match="device registry"):  # not migrated: no waiting
            writer.open()
    finally:
        writer.close()
    assert not writer.process.is_alive()


def test_batches_in_flight_commit_in_order_after_an_outage(conn, database_url, pg_server, loop):
    """Two batches sent before either answer (the receiving process pipelines them): when the
    first fails, the second is refused untried, and it stays refused until the first lands."""
    provision(conn, "enterprise")
    loop.send(("open",))
    assert loop.recv() == ("ok", None)
    first = [message(value, 9) for value in range(3)]
    second = [message(value, 8) for value in range(3, 5)]
    with database_refusing_ingest(pg_server, database_url):
        loop.send(("write", 1, first))
        loop.send(("write", 2, second))
        assert loop.recv()[0] == "unavailable"
        answer = loop.recv()
    waiting = ("unavailable", ("batch 1 is waiting for the database", "connection"))
    assert answer == waiting
    loop.send(("write", 2, second))  # out of order: still refused, nothing lands
    assert loop.recv() == waiting
    assert count(conn, "telemetry") == 0
    loop.send(("write", 1, first))
    loop.send(("write", 2, second))
    answers = [loop.recv(), loop.recv()]
    assert [kind for kind, _ in answers] == ["ok", "ok"]
    assert [written.result.landed for _, written in answers] == [3, 2]
    assert count(conn, "telemetry") == 5


def test_a_writer_that_fails_unexpectedly_says_so(database_url, loop, monkeypatch):
    """An error that is not the database being away (a bug) is a fatal answer, and the loop
    ends, instead of leaving the receiving process waiting for an answer for ever."""

    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(BatchWriter, "write", broken)
    loop.send(("open",))
    assert loop.recv() == ("ok", None)
    loop.send(("write", 1, [message(1, 5)]))
    kind, error = loop.recv()
    assert kind == "fatal"
    assert "a bug in the writer" in error
