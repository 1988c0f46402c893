from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from iiot_orchestration import registry
from iiot_orchestration.db import DatabaseUnavailable, connect
from ingest_daemon.metrics import RETRY_REASONS
from ingest_daemon.validation import Reading, Rejection
from ingest_daemon.writer import BatchNotTaken, BatchWriter, DeadLetter, Delivery, retry_reason

NOW = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)


@pytest.fixture
def device(conn):
    tenant = registry.create_tenant(conn, slug="acme", name="Acme", plan="pro", timezone="UTC")
    [result] = registry.provision_devices(
        conn, "acme", [registry.DeviceRequest("aa:bb:cc:00:00:01", "energy")]
    )
    return tenant.tenant_id, result.device_id


@pytest.fixture
def writer(database_url):
    with connect(database_url, role="platform_rw") as conn:
        yield BatchWriter(conn)


def readings(device, *times, metric="energy_kwh", overage=False):
    """One message per reading."""
    tenant_id, device_id = device
    return [
        (Reading(tenant_id, device_id, metric, ts, float(i)), Delivery(NOW, i, overage))
        for i, ts in enumerate(times)
    ]


def usage(conn):
    return conn.execute(
        "SELECT hour, sum(messages), sum(readings), sum(overage_messages)"
        " FROM ingest_usage GROUP BY hour ORDER BY hour"
    ).fetchall()


def test_batch_lands_marks_last_seen_and_dirty_past_hours(conn, device, writer):
    batch = readings(device, NOW, NOW - timedelta(hours=2), NOW - timedelta(hours=2, minutes=5))
    result = writer.write(batch, [], now=NOW)
    assert (result.landed, result.duplicates, result.dead_letters) == (3, 0, 0)
    assert conn.execute("SELECT count(*) FROM telemetry").fetchone()[0] == 3
    assert conn.execute("SELECT last_seen FROM devices").fetchone()[0] == NOW
    dirty = [r[0] for r in conn.execute("SELECT window_start FROM dirty_windows")]
    assert dirty == [(NOW - timedelta(hours=2)).replace(minute=0)]


def test_redelivered_readings_land_once(conn, device, writer):
    batch = readings(device, NOW - timedelta(minutes=1), NOW - timedelta(minutes=2))
    assert writer.write(batch, [], now=NOW).landed == 2
    again = writer.write(batch + batch, [], now=NOW)
    assert (again.landed, again.duplicates) == (0, 4)
    assert conn.execute("SELECT count(*) FROM telemetry").fetchone()[0] == 2
    assert usage(conn) == [(NOW.replace(minute=0), 2, 2, 0)]  # redeliveries are not usage


def test_usage_counts_messages_readings_and_overage_per_hour(conn, device, writer):
    tenant_id, device_id = device
    one_message = Delivery(NOW, 0, overage=True)
    batch = [
        (Reading(tenant_id, device_id, metric, NOW, 1.0), one_message)
        for metric in ("energy_kwh", "voltage_v")
    ]
    second = Reading(tenant_id, device_id, "energy_kwh", NOW - timedelta(minutes=1), 0.5)
    batch.append((second, Delivery(NOW, 1)))
    batch += batch[:2]  # the first message delivered twice in one batch counts once
    assert writer.write(batch, [], now=NOW).landed == 3
    assert usage(conn) == [(NOW.replace(minute=0), 2, 3, 1)]
    later = Delivery(NOW + timedelta(hours=1), 0)
    reading = Reading(tenant_id, device_id, "energy_kwh", NOW + timedelta(minutes=40), 2.0)
    writer.write([(reading, later)], [], now=NOW)
    assert usage(conn) == [
        (NOW.replace(minute=0), 2, 3, 1),
        (NOW.replace(minute=0) + timedelta(hours=1), 1, 1, 0),
    ]


def test_dead_letters_keep_the_payload_truncated_past_the_limit(conn, database_url, device):
    letters = [
        DeadLetter(
            NOW,
            "iiot/devices/x/telemetry",
            None,
            None,
            None,
            Rejection("topic_mismatch", "bad topic", b"\x00\xffbinary"),
        ),
        DeadLetter(
            NOW,
            "iiot/devices/aa:bb:cc:00:00:01/telemetry",
            "aa:bb:cc:00:00:01",
            *device,
            Rejection("too_large", "big", b"x" * 100),
        ),
    ]
    with connect(database_url, role="platform_rw") as other:
        result = BatchWriter(other, keep_payload_bytes=10).write([], letters, now=NOW)
    assert result.dead_letters == 2
    rows = conn.execute(
        "SELECT reason, payload, payload_size, payload_truncated, tenant_id FROM dead_letters"
        " ORDER BY dead_letter_id"
    ).fetchall()
    assert rows == [
        ("topic_mismatch", b"\x00\xffbinary", 8, False, None),
        ("too_large", b"x" * 10, 100, True, device[0]),
    ]


def test_a_day_without_partition_is_created_on_demand(conn, device, writer):
    old = NOW - timedelta(days=40)
    assert writer.write(readings(device, old), [], now=NOW).landed == 1
    assert conn.execute("SELECT ts FROM telemetry").fetchone()[0] == old


def test_a_failing_batch_commits_nothing(conn, device, writer):
    bad_letter = DeadLetter(NOW, "t", None, None, None, Rejection("NOT A REASON", "", b""))
    with pytest.raises(psycopg.errors.CheckViolation):
        writer.write(readings(device, NOW), [bad_letter], now=NOW)
    assert conn.execute("SELECT count(*) FROM telemetry").fetchone()[0] == 0
    assert writer.write(readings(device, NOW), [], now=NOW).landed == 1  # usable afterwards


def test_days_years_apart_in_one_batch_all_land(conn, device, writer):
    conn.execute("UPDATE tenants SET retention_days = 36500")
    batch = readings(device, NOW, NOW - timedelta(days=365 * 20), NOW - timedelta(days=400))
    assert writer.write(batch, [], now=NOW).landed == 3


def test_a_write_on_a_terminated_connection_is_a_connection_retry(conn, device, writer):
    """What the daemon retries, classed for iiot_ingest_batches_retried_total{reason}."""
    pid = writer.conn.info.backend_pid
    assert conn.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone()[0]
    with pytest.raises(psycopg.OperationalError) as lost:
        writer.write(readings(device, NOW), [], now=NOW)
    assert retry_reason(lost.value) == "connection"
    assert conn.execute("SELECT count(*) FROM telemetry").fetchone()[0] == 0


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (psycopg.errors.SerializationFailure("could not serialize access"), "serialization"),
        (psycopg.errors.DeadlockDetected("deadlock detected"), "serialization"),
        (psycopg.errors.AdminShutdown("terminating connection"), "connection"),
        (psycopg.errors.CannotConnectNow("the database system is starting up"), "connection"),
        (psycopg.errors.ConnectionFailure("connection failure"), "connection"),
        (psycopg.OperationalError("server closed the connection unexpectedly"), "connection"),
        (DatabaseUnavailable("cannot connect to postgresql://..."), "connection"),
        (BatchNotTaken("from the writer process", "serialization"), "serialization"),
        (psycopg.errors.QueryCanceled("canceling statement due to statement timeout"), "other"),
        (psycopg.errors.DiskFull("could not extend file"), "other"),
    ],
)
def test_retry_reasons(error, reason):
    assert retry_reason(error) == reason
    assert reason in RETRY_REASONS
