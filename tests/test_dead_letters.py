"""Dead letters: device named on too_large, conflicting duplicates, the unknown-device throttle,
retention, and `iiot dead-letters list|replay`."""

import json
import threading
import uuid
from datetime import UTC, datetime, timedelta, timezone

import dagster as dg
import orjson
import paho.mqtt.client as mqtt
import psycopg
import pytest
from click.testing import CliRunner

from assets.dead_letters import NO_EXPIRED_DEAD_LETTERS, dead_letter_retention
from iiot_orchestration import dead_letters, migrate, registry
from iiot_orchestration.cli import main
from iiot_orchestration.db import connect
from iiot_orchestration.definitions import defs
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.settings import SettingsError, load_settings
from iiot_orchestration.storage import storage_for
from ingest_daemon.daemon import IngestConfig, IngestDaemon
from ingest_daemon.judge import Judge, Judged
from ingest_daemon.registry_cache import load_devices
from ingest_daemon.validation import DEFAULT_LIMITS, Limits
from ingest_daemon.writer import BatchWriter
from tests.ingest_helpers import MAC, count, provision, wait_for

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


def one(ts: str, value: float, metric: str = "energy_kwh") -> bytes:
    return orjson.dumps({"ts": ts, "metrics": {metric: value}})


def stored(conn):
    return conn.execute("SELECT metric, ts, value FROM telemetry ORDER BY metric, ts").fetchall()


def test_conflicting_values_in_one_batch_dead_letter_the_second(conn, writer):
    provision(conn)
    ts = (NOW - timedelta(minutes=10)).isoformat()
    judged, result = judge_and_write(
        conn, writer, [(TOPIC, one(ts, 1.5)), (TOPIC, one(ts, 2.5)), (TOPIC, one(ts, 2.5))]
    )
    assert (result.landed, result.duplicates, result.dead_letters) == (1, 1, 1)
    assert stored(conn) == [("energy_kwh", NOW - timedelta(minutes=10), 1.5)]
    [(reason, detail, payload, topic, mac)] = letters(
        conn, "reason, detail, payload, topic, mac::text"
    )
    assert (reason, topic, mac) == ("conflicting_duplicate", TOPIC, MAC)
    at = (NOW - timedelta(minutes=10)).isoformat()
    assert detail == f"energy_kwh at {at} is stored as 1.5; refused 2.5"  # kept and refused
    assert orjson.loads(payload) == {"ts": ts, "metrics": {"energy_kwh": 2.5}}
    assert judged.written(result).dead_letter_reasons == {"conflicting_duplicate": 1}


def test_one_instant_written_with_two_offsets_and_two_values(conn, writer):
    provision(conn)
    instant = (NOW - timedelta(hours=2)).replace(minute=0)
    utc = instant.isoformat()
    sao_paulo = instant.astimezone(timezone(timedelta(hours=-3))).isoformat()
    assert sao_paulo.endswith("-03:00")
    judge_and_write(conn, writer, [(TOPIC, one(utc, 10.0))])
    _, result = judge_and_write(conn, writer, [(TOPIC, one(sao_paulo, 11.0))])
    assert (result.landed, result.duplicates, result.dead_letters) == (0, 0, 1)
    assert stored(conn) == [("energy_kwh", instant, 10.0)]
    [(reason, detail, payload)] = letters(conn, "reason, detail, payload")
    assert reason == "conflicting_duplicate"
    assert detail == f"energy_kwh at {utc} is stored as 10.0; refused 11.0"
    assert orjson.loads(payload)["ts"] == sao_paulo  # as the device wrote it


def test_identical_redelivery_lands_once_silently(conn, writer):
    provision(conn)
    ts = (NOW - timedelta(minutes=3)).isoformat()
    message = (TOPIC, orjson.dumps({"ts": ts, "metrics": {"energy_kwh": 1e15, "power_w": -1e15}}))
    _, first = judge_and_write(conn, writer, [message, message])
    _, second = judge_and_write(conn, writer, [message])
    assert (first.landed, first.duplicates, first.dead_letters) == (2, 2, 0)
    assert (second.landed, second.duplicates, second.dead_letters) == (0, 2, 0)
    assert letters(conn) == []
    # the same instant in another offset, same values: still the same reading, silently
    other = datetime.fromisoformat(ts).astimezone(timezone(timedelta(hours=5, minutes=30)))
    _, third = judge_and_write(
        conn,
        writer,
        [(TOPIC, orjson.dumps({"ts": other.isoformat(), "metrics": {"power_w": -1e15}}))],
    )
    assert (third.landed, third.duplicates, third.dead_letters) == (0, 1, 0)


def test_conflicts_among_many_readings_of_one_batch_message(conn, writer):
    provision(conn)
    times = [(NOW - timedelta(minutes=m)).isoformat() for m in range(1, 51)]
    batch = {"readings": [{"ts": t, "metrics": {"energy_kwh": 1.0}} for t in times]}
    judge_and_write(conn, writer, [(TOPIC, orjson.dumps(batch))])
    changed = {
        "readings": [
            {"ts": t, "metrics": {"energy_kwh": float(i % 2)}} for i, t in enumerate(times)
        ]
    }
    _, result = judge_and_write(conn, writer, [(TOPIC, orjson.dumps(changed))])
    assert (result.landed, result.duplicates, result.dead_letters) == (0, 25, 25)
    assert {r[0] for r in letters(conn)} == {"conflicting_duplicate"}


@pytest.fixture
def postgres_mode_url(empty_database_url):
    """A database migrated in PostgreSQL storage mode, whatever the server supports."""
    migrate.migrate(empty_database_url, "postgres", echo=lambda _: None)
    return empty_database_url


def test_conflicts_in_postgres_storage_mode(postgres_mode_url):
    with (
        psycopg.connect(postgres_mode_url, autocommit=True) as conn,
        connect(postgres_mode_url, role="platform_rw") as writer_conn,
    ):
        assert storage_for(conn).mode == "postgres"
        provision(conn)
        writer = BatchWriter(writer_conn)
        old = (NOW - timedelta(days=20)).isoformat()  # a day without a partition yet
        messages = [(TOPIC, one(old, 1.0)), (TOPIC, one(old, 2.0)), (TOPIC, one(old, 1.0))]
        _, result = judge_and_write(conn, writer, messages)
        assert (result.landed, result.duplicates, result.dead_letters) == (1, 1, 1)
        assert [r[0] for r in letters(conn)] == ["conflicting_duplicate"]


def test_one_message_naming_an_instant_three_times(conn, writer):
    provision(conn)
    ts = (NOW - timedelta(minutes=7)).isoformat()
    message = {"readings": [{"ts": ts, "metrics": {"energy_kwh": v}} for v in (1.0, 2.0, 3.0)]}
    _, result = judge_and_write(conn, writer, [(TOPIC, orjson.dumps(message))])
    assert (result.landed, result.duplicates, result.dead_letters) == (1, 0, 2)
    refused = sorted(orjson.loads(p)["metrics"]["energy_kwh"] for (p,) in letters(conn, "payload"))
    assert refused == [2.0, 3.0]


def unknown_topic(n: int) -> str:
    return f"iiot/devices/0200{n:08x}/telemetry"


def test_a_flood_from_100000_unknown_macs_stores_what_the_throttle_allows(conn, writer):
    """The user's finding: 100,000 made-up MACs became 100,000 rows. Judged as the writer
    process judges them, in one minute: one dead letter for each of the first 1,000 senders."""
    provision(conn)
    judge = Judge(load_devices(conn).get, "iiot", DEFAULT_LIMITS)
    judged = Judged()
    payload = one(NOW.isoformat(), 1.0)
    for n in range(100_000):
        judge.judge(judged, unknown_topic(n), payload, NOW)
        assert len(judge.unknown) <= DEFAULT_LIMITS.unknown_device_macs_per_minute
    judge.judge(judged, TOPIC, payload, NOW)  # a registered device is never throttled
    result = writer.write(judged.readings, judged.dead_letters, now=NOW)
    written = judged.written(result)
    assert result.landed == 1
    assert written.unknown_device_throttled == 99_000
    assert written.dead_letter_reasons == {"unknown_device": 1_000}
    assert count(conn, "dead_letters") == 1_000


def test_one_unknown_mac_gets_n_dead_letters_a_minute(conn, writer):
    limits = Limits(unknown_device_per_minute=3)
    judge = Judge(load_devices(conn).get, "iiot", limits)
    judged = Judged()
    garbage = b"\x00\xff" * 10
    for second in range(0, 120, 10):  # two minutes, six messages in each
        judge.judge(judged, unknown_topic(7), garbage, NOW + timedelta(seconds=second))
    # a topic that names no MAC counts as its own sender, SQL or not
    hostile = "iiot/devices/'); DELETE FROM dead_letters;--/telemetry"
    for _ in range(5):
        judge.judge(judged, hostile, garbage, NOW)
    writer.write(judged.readings, judged.dead_letters, now=NOW)
    assert judged.throttled == 6 + 2
    assert conn.execute(
        "SELECT reason, count(*) FROM dead_letters GROUP BY reason ORDER BY reason"
    ).fetchall() == [("topic_mismatch", 3), ("unknown_device", 6)]


def test_no_dead_letters_of_unknown_devices_at_zero(conn, writer):
    judge = Judge(load_devices(conn).get, "iiot", Limits(unknown_device_per_minute=0))
    judged = Judged()
    judge.judge(judged, unknown_topic(1), b"{}", NOW)
    assert (judged.dead_letters, judged.throttled) == ([], 1)


@pytest.mark.parametrize("writer_process", [False, True], ids=["one-process", "writer-process"])
def test_throttle_through_the_broker_reaches_prometheus(
    conn, database_url, ingest_broker, writer_process
):
    provision(conn)
    stop = threading.Event()
    daemon = IngestDaemon(
        IngestConfig(
            database_url=database_url,
            mqtt_url=ingest_broker.url,
            group=f"g{uuid.uuid4().hex[:6]}",
            batch_age_s=0.05,
            limits=Limits(unknown_device_per_minute=2),
            writer_process=writer_process,
        )
    )
    thread = threading.Thread(target=daemon.run, args=(stop,))
    thread.start()
    try:
        assert daemon.connected.wait(15)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.connect(ingest_broker.host, ingest_broker.port)
        client.loop_start()
        messages = [(unknown_topic(9), b"{}")] * 10 + [(TOPIC, one(NOW.isoformat(), 1.0))]
        for topic, payload in messages:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
        client.loop_stop()
        client.disconnect()
        assert wait_for(lambda: daemon.counters.landed == 1 and daemon.counters.received == 11)
    finally:
        stop.set()
        thread.join(30)
    throttled = daemon.metrics.registry.get_sample_value(
        "iiot_ingest_unknown_device_throttled_total"
    )
    stored = count(conn, "dead_letters")
    # 2 a minute: 2 stored, or 4 if the ten straddled a minute's end
    assert stored in (2, 4)
    assert throttled == daemon.counters.unknown_device_throttled == 10 - stored


@pytest.mark.parametrize("raw", ["-1", "ten", "'; DROP TABLE dead_letters;--", "9" * 40])
def test_throttle_and_retention_settings_name_the_variable(raw):
    for name in ("IIOT_UNKNOWN_DEVICE_DEAD_LETTERS_PER_MINUTE", "IIOT_DEAD_LETTER_RETENTION_DAYS"):
        with pytest.raises(SettingsError, match=name):
            load_settings({name: raw})
    settings = load_settings({})
    assert (
        settings.unknown_device_dead_letters_per_minute,
        settings.dead_letter_retention_days,
    ) == (
        10,
        30,
    )


def insert_letter(conn, received_at, *, mac=None, reason="unknown_device", payload=b"{}"):
    conn.execute(
        "INSERT INTO dead_letters (received_at, topic, mac, reason, detail, payload, payload_size)"
        " VALUES (%s, %s, %s, %s, '', %s, %s)",
        (received_at, f"iiot/devices/{mac}/telemetry", mac, reason, payload, len(payload)),
    )


def materialize_retention(database_url):
    return dg.materialize(
        [dead_letter_retention],
        resources={"postgres": PostgresResource(database_url=database_url)},
    )


def test_retention_deletes_what_is_older_than_the_setting_in_batches(
    conn, database_url, monkeypatch
):
    monkeypatch.setenv("IIOT_DEAD_LETTER_RETENTION_DAYS", "7")
    monkeypatch.setattr(dead_letters, "EXPIRE_BATCH_ROWS", 3)
    now = datetime.now(UTC)
    hostile = b"'); DROP TABLE dead_letters; --" + b"\x00\xff" * 1000
    for days in range(8, 18):  # ten expired, several batches
        insert_letter(conn, now - timedelta(days=days), payload=hostile)
    for days in (0, 1, 6):
        insert_letter(conn, now - timedelta(days=days, hours=12))
    insert_letter(conn, now - timedelta(days=6, hours=23))  # just inside
    result = materialize_retention(database_url)
    metadata = result.asset_materializations_for_node("dead_letter_retention")[0].metadata
    assert metadata["deleted"].value == 10
    assert metadata["kept"].value == 4
    [check] = result.get_asset_check_evaluations()
    assert (check.check_name, check.passed) == (NO_EXPIRED_DEAD_LETTERS, True)
    assert count(conn, "dead_letters") == 4
    again = materialize_retention(database_url)  # nothing more to do
    assert (
        again.asset_materializations_for_node("dead_letter_retention")[0].metadata["deleted"].value
        == 0
    )


def test_retention_is_scheduled_daily_in_the_definitions():
    repository = defs.get_repository_def()
    assert dg.AssetKey("dead_letter_retention") in repository.asset_graph.get_all_asset_keys()
    [schedule] = [s for s in defs.schedules if s.name == "dead_letter_retention_schedule"]
    assert schedule.cron_schedule == "45 0 * * *"
    assert schedule.job.name == "dead_letter_retention_job"


@pytest.fixture
def iiot(database_url, monkeypatch):
    """Run `iiot ...` against the test's database."""
    monkeypatch.setenv("IIOT_DATABASE_URL", database_url)

    def invoke(*args):
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    return invoke


def register_late(conn):
    """Tenant acme exists; its device publishes before it is registered (an hour late)."""
    registry.create_tenant(conn, slug="acme", name="Acme", plan="pro", timezone="UTC")


def test_a_device_registered_an_hour_late_replays_once(conn, database_url, writer, iiot):
    register_late(conn)
    arrived = NOW - timedelta(hours=1)
    good = [(TOPIC, one((arrived - timedelta(minutes=m)).isoformat(), float(m))) for m in (1, 2)]
    partly = orjson.dumps(
        {"ts": arrived.isoformat(), "metrics": {"power_w": 5.0, "no_such_metric": 1.0}}
    )
    still_bad = one(arrived.isoformat(), 1.0, metric="no_such_metric")
    judge_and_write(conn, writer, [*good, (TOPIC, partly), (TOPIC, still_bad)], received_at=arrived)
    insert_letter(conn, arrived, mac=MAC, payload=b'{"ts": "2026-')  # cut when stored
    conn.execute(
        "UPDATE dead_letters SET payload_truncated = true WHERE payload = %s", (b'{"ts": "2026-',)
    )
    assert [r[0] for r in letters(conn)] == ["unknown_device"] * 5
    registry.provision_devices(conn, "acme", [registry.DeviceRequest(MAC, "energy")])

    listed = iiot("dead-letters", "list", "--tenant", "acme", "--json")
    assert listed.exit_code == 0, listed.output
    assert len(json.loads(listed.output)) == 5  # no tenant on them, but acme owns the MAC now

    before = letters(conn, "dead_letter_id, reason, payload")
    dry = iiot("dead-letters", "replay", "--tenant", "acme", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "unknown_device: would land 1 reading\n" in dry.output
    assert "Nothing was changed" in dry.output
    assert (count(conn, "telemetry"), letters(conn, "dead_letter_id, reason, payload")) == (
        0,
        before,
    )

    result = iiot("dead-letters", "replay", "--tenant", "acme")
    assert result.exit_code == 0, result.output
    assert (
        "5 dead letters judged: 3 replay (3 readings land, 0 already stored, 1 refused parts "
        "stay as new dead letters); 1 still refused and kept (unknown_metric 1); 1 truncated"
    ) in result.output
    assert "still refused (unknown_metric)" in result.output
    assert "cannot be replayed" in result.output
    rows = conn.execute(
        "SELECT metric, value, received_at FROM telemetry ORDER BY metric, ts"
    ).fetchall()
    assert rows == [
        ("energy_kwh", 2.0, arrived),
        ("energy_kwh", 1.0, arrived),
        ("power_w", 5.0, arrived),
    ]
    assert {r[2] for r in rows} == {arrived}  # the time it came, for usage and billing
    usage = conn.execute(
        "SELECT hour, sum(messages), sum(readings) FROM ingest_usage GROUP BY hour"
    )
    assert usage.fetchall() == [(arrived.replace(minute=0), 3, 3)]
    left = letters(conn, "reason, payload_truncated, tenant_id IS NULL")
    assert sorted(left) == [
        ("unknown_device", False, True),  # the message still refused as a whole stays as it was
        ("unknown_device", True, True),  # truncated
        ("unknown_metric", False, False),  # the refused part of the message that landed
    ]

    after = letters(conn, "dead_letter_id, reason, payload")
    again = iiot("dead-letters", "replay", "--tenant", "acme")
    assert again.exit_code == 0, again.output
    assert "0 replay (0 readings land" in again.output
    assert count(conn, "telemetry") == 3
    assert letters(conn, "dead_letter_id, reason, payload") == after


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "is not an ISO date or time"),
        (["--since", "2026-12-01'; DROP TABLE dead_letters;--"], "is not an ISO date or time"),
        (["--until", "9" * 5000], "is not an ISO date or time"),
        (["--since", "2026-13-45"], "is not an ISO date or time"),
        (["--since", "2026-12-02", "--until", "2026-12-01"], "is not after --since"),
        (["--reason", "x' OR '1'='1"], "is not one of"),
        (["--reason", ""], "is not one of"),
        (["--limit", "0"], "0 is not in the range"),
        (["--limit", "9" * 40], "is not in the range"),
        (["--limit", "ten"], "is not a valid integer"),
    ],
)
@pytest.mark.parametrize("command", ["list", "replay"])
def test_malformed_and_hostile_filters_are_usage_errors(conn, iiot, command, args, message):
    insert_letter(conn, NOW, mac=MAC)
    result = iiot("dead-letters", command, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert count(conn, "dead_letters") == 1


@pytest.mark.parametrize("slug", ["nobody", "'; DROP TABLE tenants;--", "x" * 10_000])
def test_an_unknown_tenant_is_one_line_of_error(conn, iiot, slug):
    result = iiot("dead-letters", "replay", "--tenant", slug)
    assert result.exit_code == 1, result.output
    [line] = result.output.splitlines()
    assert line.startswith("error: unknown tenant")
    assert len(line) < 200
    assert count(conn, "tenants") == 0


def test_list_filters_and_json_with_binary_payloads(conn, iiot):
    insert_letter(conn, NOW - timedelta(days=2), mac=MAC, payload=b"\x00\xff\x1b[31m")
    insert_letter(conn, NOW - timedelta(hours=1), mac=MAC, reason="malformed_json", payload=b"{")
    insert_letter(conn, NOW, mac=None, reason="topic_mismatch", payload=b"{}")
    listed = json.loads(iiot("dead-letters", "list", "--json").output)
    assert [(r["reason"], r["payload_encoding"]) for r in listed] == [
        ("unknown_device", "base64"),
        ("malformed_json", "utf-8"),
        ("topic_mismatch", "utf-8"),
    ]
    since = (NOW - timedelta(days=1)).date().isoformat()
    recent = json.loads(iiot("dead-letters", "list", "--json", "--since", since).output)
    assert [r["reason"] for r in recent] == ["malformed_json", "topic_mismatch"]
    until = (NOW - timedelta(minutes=30)).isoformat()
    older = iiot("dead-letters", "list", "--until", until, "--reason", "unknown_device")
    assert older.exit_code == 0, older.output
    assert "\x1b" not in older.output
    assert older.output.splitlines()[-1] == "1 dead letters"
    limited = json.loads(iiot("dead-letters", "list", "--json", "--limit", "2").output)
    assert len(limited) == 2


def test_replay_of_readings_stored_since_same_or_other_value(conn, writer, iiot):
    """A dead letter whose reading was stored since with the same value is done with; one
    whose reading was stored with another value stays, now a conflict."""
    register_late(conn)
    arrived = NOW - timedelta(hours=1)
    same, other = (arrived - timedelta(minutes=1)).isoformat(), arrived.isoformat()
    messages = [(TOPIC, one(same, 1.0)), (TOPIC, one(same, 1.0)), (TOPIC, one(other, 2.0))]
    judge_and_write(conn, writer, messages, received_at=arrived)
    registry.provision_devices(conn, "acme", [registry.DeviceRequest(MAC, "energy")])
    judge_and_write(conn, writer, [(TOPIC, one(same, 1.0)), (TOPIC, one(other, 3.0))])
    result = iiot("dead-letters", "replay")
    assert result.exit_code == 0, result.output
    assert "2 replay (0 readings land, 2 already stored)" in result.output
    assert "still refused and kept (conflicting_duplicate 1)" in result.output
    assert letters(conn, "reason, payload") == [("unknown_device", one(other, 2.0))]
    assert stored(conn) == [
        ("energy_kwh", arrived - timedelta(minutes=1), 1.0),
        ("energy_kwh", arrived, 3.0),
    ]


def test_rate_limited_dead_letters_only_when_named(conn, iiot):
    provision(conn)
    insert_letter(conn, NOW, mac=MAC, reason="rate_limited", payload=one(NOW.isoformat(), 1.0))
    result = iiot("dead-letters", "replay")
    assert "1 rate_limited dead letters were left alone" in result.output
    assert count(conn, "telemetry") == 0
    named = iiot("dead-letters", "replay", "--reason", "rate_limited")
    assert "1 replay (1 readings land" in named.output
    assert (count(conn, "telemetry"), count(conn, "dead_letters")) == (1, 0)


def test_concurrent_replays_land_each_reading_once(conn, database_url, writer):
    register_late(conn)
    arrived = NOW - timedelta(hours=1)
    messages = [
        (TOPIC, one((arrived - timedelta(seconds=s)).isoformat(), float(s))) for s in range(300)
    ]
    unthrottled = Limits(unknown_device_per_minute=1_000)
    judge_and_write(conn, writer, messages, unthrottled, received_at=arrived)
    registry.provision_devices(conn, "acme", [registry.DeviceRequest(MAC, "energy")])
    runs = []

    def replay():
        with connect(database_url, autocommit=True, role="platform_rw") as own:
            runs.append(
                dead_letters.replay(own, dead_letters.Filters(), prefix="iiot", chunk_rows=7)
            )

    threads = [threading.Thread(target=replay) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sum(run.deleted for run in runs) == 300
    assert sum(run.landed for run in runs) == 300
    assert (count(conn, "telemetry"), count(conn, "dead_letters")) == (300, 0)
    usage = conn.execute("SELECT sum(messages), sum(readings) FROM ingest_usage").fetchone()
    assert usage == (300, 300)


def test_replay_refuses_what_left_retention_and_survives_hostile_payloads(conn, iiot):
    provision(conn)
    conn.execute("UPDATE tenants SET retention_days = 30")
    long_ago = NOW - timedelta(days=40)
    insert_letter(conn, long_ago, mac=MAC, payload=one(long_ago.isoformat(), 1.0))
    hostile = [
        b"'; DELETE FROM telemetry; --",
        b"\x00\xff" * 100,
        b'{"ts": "' + b"9" * 10_000 + b'", "metrics": {"energy_kwh": 1}}',
        b'{"readings": [' + b"{}," * 2_000 + b"{}]}",
        b"[" * 5_000,
    ]
    for payload in hostile:
        insert_letter(conn, NOW, mac=MAC, payload=payload)
    before = letters(conn, "dead_letter_id, reason, payload")
    result = iiot("dead-letters", "replay")
    assert result.exit_code == 0, result.output
    assert "0 replay (0 readings land" in result.output
    # fine when it came, not any more
    assert result.output.splitlines()[0].endswith(
        "unknown_device: kept, still refused (bad_timestamp)"
    )
    assert "(bad_timestamp 2, malformed_json 3, too_large 1)" in result.output
    assert (count(conn, "telemetry"), letters(conn, "dead_letter_id, reason, payload")) == (
        0,
        before,
    )
