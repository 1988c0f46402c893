import itertools
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import dagster as dg
import orjson
import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner

from assets.rollups import telemetry_daily, telemetry_hourly
from firmware.simulator import (
    CUMULATIVE_METRICS,
    HISTORY_BATCH,
    HISTORY_PACE,
    DeviceSpec,
    SimulatedMeter,
    SimulationStats,
    SimulatorError,
    check_history,
    encode_batch,
    encode_reading,
    history_times,
    load_fleet,
    parse_history,
    run_simulation,
    telemetry_topic,
)
from iiot_orchestration.cli import main
from iiot_orchestration.registry import DeviceRequest, create_tenant, provision_devices
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.services import free_port, start_amqtt
from tests.ingest_helpers import count, start_ingest_process, wait_for

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
ALL_ENERGY = ("current_a", "energy_kwh", "power_w", "temperature_c", "voltage_v")
GAUGE_RANGES = {
    "power_w": (0.0, 50_000.0),
    "voltage_v": (200.0, 250.0),
    "current_a": (0.0, 250.0),
    "flow_lpm": (0.0, 500.0),
    "temperature_c": (15.0, 40.0),
    "battery_pct": (0.0, 100.0),
}
START = datetime(2026, 11, 22, 20, 31, 7, 123_000, tzinfo=UTC)


def fleet_of(n: int) -> list[DeviceSpec]:
    return [
        DeviceSpec(f"02:00:5e:00:00:{i:02x}", "energy", ("energy_kwh", "power_w")) for i in range(n)
    ]


def unique_prefix() -> str:
    return f"simtest{uuid.uuid4().hex[:8]}"


class Inbox:
    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.messages: list[tuple[str, bytes]] = []

    def on_message(self, client, userdata, message) -> None:
        with self.changed:
            self.messages.append((message.topic, message.payload))
            self.changed.notify_all()

    def wait_for(self, n: int, timeout: float = 30.0) -> list[tuple[str, bytes]]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.messages) >= n, timeout=timeout)
            return list(self.messages)


@contextmanager
def subscribed(mqtt_url: str, topic: str) -> Iterator[Inbox]:
    parts = urlsplit(mqtt_url)
    inbox = Inbox()
    ready = threading.Event()
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"simtest-sub-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv311,
    )
    client.on_message = inbox.on_message
    client.on_subscribe = lambda *args: ready.set()
    client.connect(parts.hostname, parts.port or 1883)
    client.loop_start()
    try:
        client.subscribe(topic, qos=1)
        assert ready.wait(15), "no SUBACK"
        yield inbox
    finally:
        client.disconnect()
        client.loop_stop()


def test_load_fleet_reads_active_devices_with_their_metrics(conn, database_url):
    for slug in ("acme", "globex"):
        create_tenant(conn, slug=slug, name=slug.title(), plan="pro", timezone="UTC")
    provision_devices(
        conn,
        "acme",
        [
            DeviceRequest("02:00:00:00:00:03", "energy", metrics=("energy_kwh", "voltage_v")),
            DeviceRequest("02:00:00:00:00:01", "water"),
            DeviceRequest("02:00:00:00:00:04", "gas", metrics=("gas_m3", "battery_pct")),
        ],
    )
    provision_devices(conn, "globex", [DeviceRequest("02:00:00:00:00:02", "energy")])
    conn.execute("UPDATE devices SET status = 'inactive' WHERE mac = '02:00:00:00:00:04'")

    assert load_fleet(database_url) == [
        DeviceSpec("02:00:00:00:00:01", "water", ("water_m3",)),
        DeviceSpec("02:00:00:00:00:02", "energy", ("energy_kwh", "power_w")),
        DeviceSpec("02:00:00:00:00:03", "energy", ("energy_kwh", "voltage_v")),
    ]
    assert [d.mac for d in load_fleet(database_url, "acme")] == [
        "02:00:00:00:00:01",
        "02:00:00:00:00:03",
    ]
    assert [d.mac for d in load_fleet(database_url, limit=1)] == ["02:00:00:00:00:01"]
    with pytest.raises(SimulatorError, match="unknown tenant"):
        load_fleet(database_url, "initech")
    with pytest.raises(ValueError, match="limit"):
        load_fleet(database_url, limit=-1)


@pytest.mark.parametrize(
    ("kind", "metrics"),
    [
        ("energy", (*ALL_ENERGY, "battery_pct")),
        ("water", ("water_m3", "flow_lpm", "temperature_c")),
        ("gas", ("gas_m3", "battery_pct")),
    ],
)
@pytest.mark.parametrize("step_s", [1, 137])
def test_registers_never_go_down_and_gauges_stay_in_range(kind, metrics, step_s):
    meter = SimulatedMeter(DeviceSpec("02:00:00:00:00:01", kind, metrics), seed=7)
    readings = [meter.reading(START + timedelta(seconds=i * step_s)) for i in range(1_000)]
    assert all(set(r) == set(metrics) for r in readings)
    for metric in metrics:
        series = [r[metric] for r in readings]
        assert all(isinstance(v, float) and v == v for v in series)
        if metric in CUMULATIVE_METRICS:
            assert all(a <= b for a, b in itertools.pairwise(series)), metric
            assert all(v == round(v, 3) for v in series)
        else:
            low, high = GAUGE_RANGES[metric]
            assert all(low <= v <= high for v in series), (metric, min(series), max(series))
    if step_s > 1:  # 38 hours: every register has moved
        for metric in set(metrics) & CUMULATIVE_METRICS:
            assert readings[-1][metric] > readings[0][metric], metric


def test_energy_follows_power_and_starts_at_a_realistic_register():
    meter = SimulatedMeter(DeviceSpec("02:00:00:00:00:01", "energy", ALL_ENERGY), seed=1)
    first = meter.reading(START)
    assert 1_000 <= first["energy_kwh"] <= 50_000
    assert first["current_a"] == pytest.approx(first["power_w"] / first["voltage_v"], abs=0.01)
    hour = [meter.reading(START + timedelta(seconds=s)) for s in range(1, 3_601)]
    mean_power = sum(r["power_w"] for r in hour) / len(hour)
    used = hour[-1]["energy_kwh"] - first["energy_kwh"]
    assert used == pytest.approx(mean_power / 1_000, rel=0.05)


def test_a_clock_stepping_back_does_not_run_registers_backwards():
    meter = SimulatedMeter(DeviceSpec("02:00:00:00:00:01", "water", ("water_m3",)), seed=3)
    later = meter.reading(START + timedelta(hours=2))["water_m3"]
    assert meter.reading(START)["water_m3"] >= later


def test_meters_are_deterministic_per_seed_and_device():
    def run(mac: str, seed: int) -> list[dict[str, float]]:
        meter = SimulatedMeter(DeviceSpec(mac, "energy", ALL_ENERGY), seed=seed)
        return [meter.reading(START + timedelta(seconds=5 * i)) for i in range(200)]

    assert run("02:00:00:00:00:01", 42) == run("02:00:00:00:00:01", 42)
    assert run("02:00:00:00:00:01", 42) != run("02:00:00:00:00:01", 43)
    assert run("02:00:00:00:00:01", 42) != run("02:00:00:00:00:02", 42)


def test_meter_skips_metrics_it_has_no_model_for(caplog):
    spec = DeviceSpec("02:00:00:00:00:01", "energy", ("energy_kwh", "reactive_kvarh"))
    with caplog.at_level(logging.WARNING, logger="firmware.simulator"):
        meter = SimulatedMeter(spec)
    assert "reactive_kvarh" in caplog.text
    assert meter.metrics == ("energy_kwh",)
    assert list(meter.reading(START)) == ["energy_kwh"]


def test_meter_refuses_naive_times():
    meter = SimulatedMeter(fleet_of(1)[0])
    with pytest.raises(ValueError, match="timezone-aware"):
        meter.reading(datetime(2026, 1, 1))


def test_payloads_follow_the_contract():
    single = orjson.loads(encode_reading(START, {"energy_kwh": 1234.567, "power_w": 350.2}))
    assert single == {
        "ts": "2026-11-22T20:31:07.123Z",
        "metrics": {"energy_kwh": 1234.567, "power_w": 350.2},
    }
    other_zone = START.astimezone(datetime.now().astimezone().tzinfo)
    assert orjson.loads(encode_reading(other_zone, {}))["ts"] == single["ts"]

    at = [START + timedelta(milliseconds=i) for i in range(3)]
    batch = orjson.loads(encode_batch([(t, {"water_m3": 10.0 + i}) for i, t in enumerate(at)]))
    assert list(batch) == ["readings"]
    assert [r["ts"] for r in batch["readings"]] == [
        "2026-11-22T20:31:07.123Z",
        "2026-11-22T20:31:07.124Z",
        "2026-11-22T20:31:07.125Z",
    ]
    assert [r["metrics"] for r in batch["readings"]] == [
        {"water_m3": 10.0},
        {"water_m3": 11.0},
        {"water_m3": 12.0},
    ]
    with pytest.raises(ValueError, match="at least one"):
        encode_batch([])
    with pytest.raises(ValueError, match="timezone-aware"):
        encode_reading(datetime(2026, 1, 1), {})


def test_telemetry_topic():
    assert (
        telemetry_topic("iiot", "aa:bb:cc:dd:ee:ff") == "iiot/devices/aa:bb:cc:dd:ee:ff/telemetry"
    )


def test_fleet_publishes_every_message_and_waits_for_acknowledgements(mqtt_url):
    prefix = unique_prefix()
    fleet = fleet_of(3)
    with subscribed(mqtt_url, f"{prefix}/devices/+/telemetry") as inbox:
        stats = run_simulation(fleet, mqtt_url, prefix=prefix, count=5, rate=50, seed=1)
        messages = inbox.wait_for(15)

    assert stats.published == stats.acknowledged == 15
    assert (stats.devices, stats.rejected) == (3, 0)
    assert len(messages) == 15
    topics = [topic for topic, _ in messages]
    assert sorted(set(topics)) == [telemetry_topic(prefix, d.mac) for d in fleet]
    assert all(topics.count(topic) == 5 for topic in set(topics))
    for _, payload in messages:
        body = orjson.loads(payload)
        assert set(body) == {"ts", "metrics"}
        assert TS.match(body["ts"])
        assert set(body["metrics"]) == {"energy_kwh", "power_w"}
    for device in fleet:
        mine = [orjson.loads(p) for t, p in messages if t == telemetry_topic(prefix, device.mac)]
        stamps = [m["ts"] for m in mine]
        assert stamps == sorted(stamps)
        assert len(set(stamps)) == 5
        energy = [m["metrics"]["energy_kwh"] for m in mine]
        assert energy == sorted(energy)


def test_batches_carry_batch_size_readings_with_distinct_times(mqtt_url):
    prefix = unique_prefix()
    fleet = fleet_of(3)
    with subscribed(mqtt_url, f"{prefix}/devices/+/telemetry") as inbox:
        stats = run_simulation(
            fleet, mqtt_url, prefix=prefix, count=5, rate=50, batch_size=3, qos=1
        )
        messages = inbox.wait_for(15)

    assert stats.published == stats.acknowledged == 15
    assert len(messages) == 15
    by_device: dict[str, list[str]] = {}
    for topic, payload in messages:
        body = orjson.loads(payload)
        assert list(body) == ["readings"]
        assert len(body["readings"]) == 3
        for reading in body["readings"]:
            assert set(reading) == {"ts", "metrics"}
            assert reading["ts"].endswith("Z")
            by_device.setdefault(topic, []).append(reading["ts"])
    for stamps in by_device.values():
        assert len(stamps) == 15
        assert len(set(stamps)) == 15
        assert stamps == sorted(stamps)


def test_stop_ends_an_unbounded_run_and_progress_reports(mqtt_url):
    stop = threading.Event()
    reports: list[SimulationStats] = []

    def progress(stats: SimulationStats) -> None:
        reports.append(stats)
        stop.set()

    prefix = unique_prefix()
    with subscribed(mqtt_url, f"{prefix}/#"):  # delivered: the broker had a subscriber
        stats = run_simulation(
            fleet_of(2), mqtt_url, prefix=prefix, rate=20, stop=stop, progress=progress
        )
    assert reports
    assert reports[-1] == stats
    assert stats.published > 0
    assert stats.published == stats.acknowledged


def test_duration_ends_a_run(mqtt_url):
    stats = run_simulation(
        fleet_of(1), mqtt_url, prefix=unique_prefix(), rate=10, duration=0.3, qos=0
    )
    assert stats.published >= 1
    assert stats.published == stats.acknowledged


def test_falls_back_to_mqtt_311_for_a_broker_without_mqtt_5(caplog):
    broker = start_amqtt()
    try:
        with caplog.at_level(logging.INFO, logger="firmware.simulator"):
            stats = run_simulation(
                fleet_of(2), broker.url, prefix=unique_prefix(), count=2, rate=50
            )
    finally:
        broker.stop()
    assert stats.published == stats.acknowledged == 4
    assert "MQTT 3.1.1" in caplog.text


def test_nothing_to_do_does_not_connect():
    stats = run_simulation([], "mqtt://127.0.0.1:1", count=5)
    assert stats == SimulationStats(0, 0, 0, 0.0)
    assert run_simulation(fleet_of(1), "mqtt://127.0.0.1:1", count=0).published == 0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"rate": 0}, "rate"),
        ({"batch_size": 0}, "batch_size"),
        ({"qos": 3}, "qos"),
        ({"count": -1}, "count"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error):
    with pytest.raises(ValueError, match=error):
        run_simulation(fleet_of(1), "mqtt://127.0.0.1:1883", **kwargs)


def test_unusable_brokers_are_reported():
    with pytest.raises(SimulatorError, match="cannot connect"):
        run_simulation(fleet_of(1), f"mqtts://127.0.0.1:{free_port()}", count=1)
    with pytest.raises(SimulatorError, match="expected mqtt://host:port"):
        run_simulation(fleet_of(1), "http://127.0.0.1:1883", count=1)
    with pytest.raises(SimulatorError, match="cannot connect"):
        run_simulation(fleet_of(1), f"mqtt://127.0.0.1:{free_port()}", count=1)


def test_a_message_no_subscriber_took_is_kept_and_sent_again(mqtt_url):
    """PUBACK 0x10 (no matching subscribers, as from Mosquitto just restarted) is not a
    delivery: the message is sent again until a subscriber takes it."""
    prefix = unique_prefix()
    reports: list[SimulationStats] = []
    result: dict[str, SimulationStats] = {}

    def run() -> None:
        result["stats"] = run_simulation(
            fleet_of(1),
            mqtt_url,
            prefix=prefix,
            rate=50,
            count=3,
            drain_timeout=60,
            progress=reports.append,
        )

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert wait_for(lambda: bool(reports) and reports[-1].resent > 0)
        assert reports[-1].acknowledged == 0
        with subscribed(mqtt_url, f"{prefix}/#") as inbox:
            thread.join(60)
            assert len(inbox.wait_for(3)) >= 3
    finally:
        thread.join(60)
    stats = result["stats"]
    assert stats.published == stats.acknowledged == 3
    assert stats.rejected == 0


@pytest.mark.parametrize(
    ("text", "span"),
    [("7d", timedelta(days=7)), (" 36h ", timedelta(hours=36)), ("90m", timedelta(minutes=90))],
)
def test_history_durations(text, span):
    assert parse_history(text) == span


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("-7d", "history reaches back, so it is positive"),
        ("0d", "must be longer than zero"),
        ("0h", "must be longer than zero"),
        ("7", "expected a whole number and a unit d, h or m, such as 7d"),
        ("7x", "expected a whole number and a unit"),
        ("1.5d", "expected a whole number and a unit"),
        ("a week", "expected a whole number and a unit"),
        ("", "expected a whole number and a unit"),
        ("9" * 30 + "d", "far too long"),
    ],
)
def test_bad_history_durations_say_what_is_wrong(text, error):
    with pytest.raises(ValueError, match=error):
        parse_history(text)


def test_history_times_lie_inside_the_window_on_multiples_of_the_step():
    times = history_times(START, timedelta(days=7), 300)
    assert len(times) == 7 * 288
    assert START - timedelta(days=7) < times[0] < START - timedelta(days=7) + timedelta(minutes=5)
    assert START - timedelta(minutes=5) <= times[-1] < START
    assert all(b - a == timedelta(minutes=5) for a, b in itertools.pairwise(times))
    assert {(t.minute % 5, t.second, t.microsecond) for t in times} == {(0, 0, 0)}
    on_the_step = datetime(2026, 11, 22, 20, 30, tzinfo=UTC)
    assert history_times(on_the_step, timedelta(hours=1), 300)[0] == on_the_step - timedelta(
        minutes=55
    )  # the oldest is inside a retention of exactly the history


def test_a_history_longer_than_a_tenants_retention_is_refused():
    fleet = [
        DeviceSpec("02:00:5e:00:00:01", "energy", ("energy_kwh",), "acme", 180, 60),
        DeviceSpec("02:00:5e:00:00:02", "energy", ("energy_kwh",), "tiny", 30, 6),
    ]
    check_history(fleet, timedelta(days=30))
    with pytest.raises(
        SimulatorError,
        match=r"a history of 31d reaches further back than the 30-day retention "
        r"of tenant 'tiny'.*at most 30d",
    ):
        check_history(fleet, timedelta(days=31))
    check_history(fleet_of(1), timedelta(days=3650))  # no registry data: nothing to check


def test_history_is_published_first_and_the_live_run_continues_its_registers(mqtt_url):
    prefix = unique_prefix()
    fleet = [
        DeviceSpec(f"02:00:5e:00:01:{i:02x}", "energy", ("energy_kwh", "power_w"), "acme", 7, 120)
        for i in range(2)
    ]
    reports: list[SimulationStats] = []
    with subscribed(mqtt_url, f"{prefix}/devices/+/telemetry") as inbox:
        before = datetime.now(UTC)
        stats = run_simulation(
            fleet,
            mqtt_url,
            prefix=prefix,
            count=2,
            rate=50,
            history=timedelta(days=2),
            progress=reports.append,
        )
        after = datetime.now(UTC)
        messages = inbox.wait_for(8)

    # two days at five minutes are 575 or 576 readings a device: two batches, then two live
    assert stats.published == stats.acknowledged == 8
    assert stats.history_messages == 4
    assert reports[-1].history_messages == 4
    assert stats.seconds >= 60 / 120 * HISTORY_PACE  # the second batch waited for the plan's rate
    for device in fleet:
        bodies = [orjson.loads(p) for t, p in messages if t == telemetry_topic(prefix, device.mac)]
        history, live = bodies[:2], bodies[2:]
        assert len(history[0]["readings"]) == HISTORY_BATCH
        readings = [r for b in history for r in b["readings"]]
        assert len(readings) in (575, 576)
        stamps = [datetime.fromisoformat(r["ts"]) for r in readings]
        assert before - timedelta(days=2) < stamps[0] <= before - timedelta(days=2, minutes=-5)
        assert stamps[-1] < before
        assert all(b - a == timedelta(minutes=5) for a, b in itertools.pairwise(stamps))
        assert len({s.hour for s in stamps}) == 24  # every hour of the day has readings
        live_stamps = [datetime.fromisoformat(b["ts"]) for b in live]
        assert stamps[-1] < live_stamps[0] < live_stamps[1] <= after
        energy = [r["metrics"]["energy_kwh"] for r in readings] + [
            b["metrics"]["energy_kwh"] for b in live
        ]
        assert energy == sorted(energy)  # the live run continues the history's register
        used = energy[-1] - energy[0]
        assert 2 * 24 * 0.3 * 0.4 < used < 2 * 24 * 4.0 * 2.5  # kWh of 300 W to 4 kW over 2 days
        assert live[0]["metrics"]["energy_kwh"] - energy[len(readings) - 1] < 1.0


def test_history_arguments_are_checked():
    with pytest.raises(ValueError, match="history must be positive"):
        run_simulation(fleet_of(1), "mqtt://127.0.0.1:1", count=1, history=timedelta(0))
    with pytest.raises(ValueError, match="history_step"):
        run_simulation(
            fleet_of(1), "mqtt://127.0.0.1:1", count=1, history=timedelta(days=1), history_step=0
        )


@pytest.fixture
def simulate(database_url, monkeypatch, mqtt_url):
    """`iiot simulate` in this process against the test's database and the shared broker."""
    for key in [k for k in os.environ if k.startswith("IIOT_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("IIOT_DATABASE_URL", database_url)
    monkeypatch.setenv("IIOT_MQTT_URL", mqtt_url)
    monkeypatch.setenv("IIOT_TOPIC_PREFIX", unique_prefix())

    def invoke(*args):
        return CliRunner().invoke(main, ["simulate", *args], catch_exceptions=False)

    return invoke


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--history", "-7d"], "history reaches back, so it is positive"),
        (["--history", "0d"], "must be longer than zero"),
        (["--history", "seven days"], "expected a whole number and a unit d, h or m"),
        (["--history", "31d"], "the 30-day retention of tenant 'acme', whose readings older"),
        (["--history", "1h", "--history-step", "3600"], "leaves no reading in a history of 1h"),
        (["--history", "1d", "--rate", "0.001", "--history-step", "60"], "finer than the live"),
    ],
)
def test_simulate_refuses_bad_histories_before_publishing(simulate, conn, args, error):
    create_tenant(conn, slug="acme", name="Acme", plan="starter", timezone="UTC")
    provision_devices(conn, "acme", [DeviceRequest("02:00:00:00:00:01", "energy")])
    result = simulate("--count", "1", *args)
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--history" in result.output
    assert error in " ".join(result.output.split())
    assert "published" not in result.output


def test_simulate_history_lands_a_week_the_rollups_then_show(
    database_url, conn, ingest_broker, tmp_path, monkeypatch
):
    """`iiot simulate --history 7d` through a real ingest daemon: a reading every five minutes
    of the past week lands (none refused), the live reading continues the register, and a
    backfill of the daily rollup has every day of the week."""
    create_tenant(conn, slug="demo", name="Demo", plan="pro", timezone="UTC")
    provision_devices(conn, "demo", [DeviceRequest("02:00:00:00:00:01", "water")])
    prefix = unique_prefix()
    log = (tmp_path / "ingest.log").open("w")
    ingest = start_ingest_process(
        database_url,
        ingest_broker.url,
        tmp_path / "ingest",
        output=log,
        IIOT_TOPIC_PREFIX=prefix,
    )
    try:
        for key in [k for k in os.environ if k.startswith("IIOT_")]:
            monkeypatch.delenv(key)
        monkeypatch.setenv("IIOT_DATABASE_URL", database_url)
        monkeypatch.setenv("IIOT_MQTT_URL", ingest_broker.url)
        monkeypatch.setenv("IIOT_TOPIC_PREFIX", prefix)
        started = datetime.now(UTC)
        result = CliRunner().invoke(
            main, ["simulate", "--history", "7d", "--count", "1"], catch_exceptions=False
        )
        assert result.exit_code == 0, result.output
        assert "Publishing 7d of history first, a reading every 300 s per device" in result.output
        assert "history: 5 of 5 messages (100 %)" in result.output
        assert "Done: 6 messages published, 6 acknowledged" in result.output
        expected = 7 * 288 + 1
        assert wait_for(lambda: count(conn, "telemetry", "metric = 'water_m3'") >= expected, 60)
    finally:
        ingest.terminate()
        ingest.wait(30)
        log.close()
    assert count(conn, "telemetry", "metric = 'water_m3'") == expected
    assert count(conn, "dead_letters") == 0
    rows = conn.execute(
        "SELECT ts, value FROM telemetry WHERE metric = 'water_m3' ORDER BY ts"
    ).fetchall()
    assert started - timedelta(days=7) < rows[0][0] < started - timedelta(days=7, minutes=-5)
    values = [value for _, value in rows]
    assert values == sorted(values)  # history, then the live reading, one register
    first_day = rows[0][0].date()
    days = [first_day + timedelta(days=n) for n in range(8)]
    rolled = dg.materialize(
        [telemetry_hourly, telemetry_daily],
        tags={
            "dagster/asset_partition_range_start": days[0].isoformat(),
            "dagster/asset_partition_range_end": days[-1].isoformat(),
        },
        resources={"postgres": PostgresResource(database_url=database_url)},
    )
    assert rolled.success
    daily = dict(
        conn.execute(
            "SELECT (bucket AT TIME ZONE 'UTC')::date, sum(readings) FROM telemetry_daily"
            " WHERE metric = 'water_m3' GROUP BY 1 ORDER BY 1"
        ).fetchall()
    )
    assert sorted(daily) == days
    assert all(daily[day] == 288 for day in days[1:-1])  # whole days: every five minutes
