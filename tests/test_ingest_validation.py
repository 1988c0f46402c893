from datetime import UTC, datetime, timedelta

import orjson
import pytest

from ingest_daemon.validation import (
    DEFAULT_LIMITS,
    REASONS,
    Device,
    Limits,
    mac_from_topic,
    validate,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
MAC = "aa:bb:cc:00:00:01"
TOPIC = f"iiot/devices/{MAC}/telemetry"
DEVICES = {
    MAC: Device(1, 10, MAC, "active", frozenset({"energy_kwh", "power_w"}), 30),
    "aa:bb:cc:00:00:02": Device(2, 10, "aa:bb:cc:00:00:02", "inactive", frozenset(), 30),
    "aa:bb:cc:00:00:03": Device(3, 20, "aa:bb:cc:00:00:03", "active", frozenset({"gas_m3"}), 30),
}


def judge(payload, topic=TOPIC, limits=DEFAULT_LIMITS):
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return validate(topic, data, DEVICES.get, prefix="iiot", now=NOW, limits=limits)


def reasons(verdict):
    return [r.reason for r in verdict.rejections]


def test_single_reading_lands_every_metric():
    verdict = judge({"ts": "2026-11-22T11:59:00Z", "metrics": {"energy_kwh": 12.5, "power_w": 300}})
    assert reasons(verdict) == []
    assert [(r.tenant_id, r.device_id, r.metric, r.value) for r in verdict.readings] == [
        (10, 1, "energy_kwh", 12.5),
        (10, 1, "power_w", 300.0),
    ]
    assert verdict.readings[0].ts == datetime(2026, 11, 22, 11, 59, tzinfo=UTC)


def test_batch_lands_good_readings_and_refuses_bad_ones():
    verdict = judge(
        {
            "readings": [
                {"ts": "2026-11-22T11:00:00Z", "metrics": {"energy_kwh": 1}},
                {"ts": "yesterday", "metrics": {"energy_kwh": 2}},
                {"ts": "2026-11-22T11:02:00Z", "metrics": {"energy_kwh": "3", "power_w": 4}},
                {"ts": "2026-11-22T11:03:00Z", "metrics": {"'; DROP TABLE telemetry;--": 5}},
                "not an object",
            ]
        }
    )
    assert [r.value for r in verdict.readings] == [1.0, 4.0]
    assert reasons(verdict) == ["bad_timestamp", "bad_value", "unknown_metric", "schema"]
    assert verdict.rejections[0].detail.startswith("reading 1: ")
    assert orjson.loads(verdict.rejections[1].payload) == {
        "ts": "2026-11-22T11:02:00Z",
        "metrics": {"energy_kwh": "3"},
    }


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "malformed_json"),
        (b"\x00\xff\xfe garbage \x89PNG", "malformed_json"),
        (b"{'ts': 1}", "malformed_json"),
        (b'{"ts": "2026-11-22T11:00:00Z", "metrics": {"energy_kwh": NaN}}', "malformed_json"),
        (b'{"ts": "2026-11-22T11:00:00Z", "metrics": {"energy_kwh": Infinity}}', "malformed_json"),
        (b"[" * 5000 + b"]" * 5000, "malformed_json"),
        (b'{"a":' * 2000 + b"1" + b"}" * 2000, "malformed_json"),
        (b"[1, 2, 3]", "schema"),
        (b'"just a string"', "schema"),
        (b'{"readings": []}', "schema"),
        (b'{"readings": {"ts": 1}}', "schema"),
        (b'{"ts": "2026-11-22T11:00:00Z"}', "schema"),
        (b'{"ts": "2026-11-22T11:00:00Z", "metrics": {}}', "schema"),
        (b'{"ts": "2026-11-22T11:00:00Z", "metrics": [1]}', "schema"),
        (b'{"metrics": {"energy_kwh": 1}}', "bad_timestamp"),
        (b'{"ts": 1732000000, "metrics": {"energy_kwh": 1}}', "bad_timestamp"),
        (b'{"ts": "2026-11-22T11:00:00", "metrics": {"energy_kwh": 1}}', "bad_timestamp"),
        (b'{"ts": "2026-11-22T12:30:00Z", "metrics": {"energy_kwh": 1}}', "bad_timestamp"),
        (b'{"ts": "2026-09-01T00:00:00Z", "metrics": {"energy_kwh": 1}}', "bad_timestamp"),
        (b'{"ts": "2026-11-22T11:00:00Z", "metrics": {"energy_kwh": 1e300}}', "bad_value"),
        (b'{"ts": "2026-11-22T11:00:00Z", "metrics": {"energy_kwh": true}}', "bad_value"),
        (b'{"ts": "2026-11-22T11:00:00Z", "metrics": {"energy_kwh": null}}', "bad_value"),
        (b'{"ts": "2026-11-22T11:00:00Z", "metrics": {"energy_kwh": {"v": 1}}}', "bad_value"),
        (b'{"ts": "2026-11-22T11:00:00Z", "metrics": {"gas_m3": 1}}', "unknown_metric"),
    ],
)
def test_bad_payloads_get_their_reason(payload, reason):
    verdict = judge(payload)
    assert verdict.readings == []
    assert reasons(verdict) == [reason]
    assert reason in REASONS
    assert len(verdict.rejections[0].detail) < 300


def test_huge_integers_do_not_crash():
    verdict = judge(
        b'{"ts": "2026-11-22T11:00:00Z", "metrics": {"energy_kwh": ' + b"9" * 400 + b"}}"
    )
    assert reasons(verdict) in (["malformed_json"], ["bad_value"])


def test_oversized_payload_is_refused_before_parsing():
    verdict = judge(b"{" + b" " * 2000 + b"}", limits=Limits(max_payload_bytes=1000))
    assert reasons(verdict) == ["too_large"]
    assert verdict.rejections[0].payload.startswith(b"{")


def test_too_many_readings_or_metrics():
    many = {
        "readings": [{"ts": "2026-11-22T11:00:00Z", "metrics": {"power_w": i}} for i in range(11)]
    }
    assert reasons(judge(many, limits=Limits(max_readings=10))) == ["too_large"]
    wide = {"ts": "2026-11-22T11:00:00Z", "metrics": {f"m{i}": 1 for i in range(5)}}
    assert reasons(judge(wide, limits=Limits(max_metrics=4))) == ["schema"]


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("iiot/devices/02:ff:ff:00:00:09/telemetry", "unknown_device"),
        ("iiot/devices/aa:bb:cc:00:00:02/telemetry", "inactive_device"),
        ("iiot/devices/not-a-mac/telemetry", "topic_mismatch"),
        ("other/devices/aa:bb:cc:00:00:01/telemetry", "topic_mismatch"),
        ("iiot/devices/aa:bb:cc:00:00:01/cert_ack", "topic_mismatch"),
    ],
)
def test_topic_problems(topic, reason):
    verdict = judge({"ts": "2026-11-22T11:00:00Z", "metrics": {"energy_kwh": 1}}, topic=topic)
    assert reasons(verdict) == [reason]
    assert verdict.readings == []


def test_device_cannot_publish_for_another_device():
    payload = {"mac": "aa:bb:cc:00:00:03", "ts": "2026-11-22T11:00:00Z", "metrics": {"gas_m3": 1}}
    assert reasons(judge(payload)) == ["topic_mismatch"]
    assert reasons(judge({**payload, "mac": "garbage"})) == ["topic_mismatch"]
    same = {"mac": "AABBCC000001", "ts": "2026-11-22T11:00:00Z", "metrics": {"power_w": 1}}
    assert reasons(judge(same)) == []


@pytest.mark.parametrize("spelling", ["aa:bb:cc:00:00:01", "AA-BB-CC-00-00-01", "aabbcc000001"])
def test_topic_mac_spellings(spelling):
    assert mac_from_topic(f"iiot/devices/{spelling}/telemetry", "iiot") == MAC


def test_offsets_are_respected():
    verdict = judge({"ts": "2026-11-22T08:59:00-03:00", "metrics": {"power_w": 1}})
    assert verdict.readings[0].ts == NOW - timedelta(minutes=1)


def test_duplicate_messages_give_identical_readings():
    payload = {"ts": "2026-11-22T11:00:00Z", "metrics": {"energy_kwh": 1}}
    assert judge(payload).readings == judge(payload).readings


@pytest.mark.parametrize(
    ("topic", "device_id"),
    [
        (TOPIC, 1),
        ("iiot/devices/aa:bb:cc:00:00:02/telemetry", 2),  # inactive: still named
        ("iiot/devices/02:ff:ff:00:00:09/telemetry", None),  # unknown
        ("iiot/devices/'; DROP TABLE devices;--/telemetry", None),  # hostile topic
    ],
)
def test_too_large_names_the_device_of_the_topic(topic, device_id):
    verdict = judge(b"{" + b" " * 2000 + b"}", topic=topic, limits=Limits(max_payload_bytes=1000))
    assert reasons(verdict) == ["too_large"]
    assert (verdict.device.device_id if verdict.device else None) == device_id
