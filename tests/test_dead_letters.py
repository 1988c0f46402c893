"""Dead letters: device named on too_large, conflicting duplicates, the unknown-device throttle,
retention, and `iiot dead-letters list|replay`."""

from datetime import UTC, datetime

import pytest

from iiot_orchestration.db import connect
from ingest_daemon.judge import Judge, Judged
from ingest_daemon.registry_cache import load_devices
from ingest_daemon.validation import DEFAULT_LIMITS, Limits
from ingest_daemon.writer import BatchWriter
from tests.ingest_helpers import MAC, provision

TOPIC = f"iiot/devices/{MAC}/telemetry"
NOW = datetime.now(UTC).replace(second=0, microsecond=0)


@pytest.fixture
def writer(database_url):
    with connect(database_url, role="platform_rw") as conn:
        yield BatchWriter(conn)


def judge_and_write(conn, writer, messages, limits=DEFAULT_LIMITS, received_at=NOW):
    """Judge ``(topic, payload)`` messages with the registry as it is now, and commit them."""
    judge = Judge(load_devices(conn).get, "iiot", limits)
    judged = Judged()
    for topic, payload in messages:
        judge.judge(judged, topic, payload, received_at)
    result = writer.write(judged.readings, judged.dead_letters, now=NOW)
    return judged, result


def letters(conn, columns="reason, tenant_id, device_id"):
    return conn.execute(f"SELECT {columns} FROM dead_letters ORDER BY dead_letter_id").fetchall()


def test_too_large_keeps_tenant_and_device_of_a_registered_topic(conn, writer):
    provision(conn)
    tenant_id, device_id = conn.execute("SELECT tenant_id, device_id FROM devices").fetchone()
    huge = b'{"ts": "' + b"9" * 3000 + b'"}'
    limits = Limits(max_payload_bytes=1000)
    messages = [
        (TOPIC, huge),
        (TOPIC, huge),  # the same message again: a second dead letter, both named
        ("iiot/devices/02:ff:ff:00:00:09/telemetry", huge),  # unknown MAC
        ("iiot/devices/x' OR '1'='1/telemetry", huge),  # hostile topic: no MAC at all
    ]
    judge_and_write(conn, writer, messages, limits)
    assert letters(conn, "reason, tenant_id, device_id, mac::text") == [
        ("too_large", tenant_id, device_id, MAC),
        ("too_large", tenant_id, device_id, MAC),
        ("too_large", None, None, "02:ff:ff:00:00:09"),
        ("too_large", None, None, None),
    ]
