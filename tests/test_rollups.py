"""Rollups materialized through Dagster against a real PostgreSQL, compared with the same numbers
computed here in Python from the readings the test inserted."""

import subprocess
import sys
import uuid
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from assets.rollups import (
    COUNTS_MATCH,
    HOURS_TAG,
    NO_NEGATIVE_CONSUMPTION,
    ROWS_HAVE_TENANT,
    parse_hours_tag,
    raw_telemetry_fresh,
    telemetry_daily,
    telemetry_hourly,
)
from iiot_orchestration import registry, rollups
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.storage import storage_for
from ingest_daemon.validation import Reading
from ingest_daemon.writer import BatchWriter, Delivery
from sensors.rollups import LATE_DAY_TAG, closed_hour_request, late_requests

DAY = datetime(2026, 11, 20, tzinfo=UTC)
CUMULATIVE = {"energy_kwh", "water_m3", "gas_m3"}


def at(hours: float) -> datetime:
    return DAY + timedelta(hours=hours)


# (metric, ts, value): a reading the day before seeds consumption; hour 01 has no readings (a
# gap, attributed to hour 02); at 02:45 the counter restarts from zero (a reset)
READINGS = [
    ("energy_kwh", at(-0.2), 100.0),
    ("energy_kwh", at(10 / 60), 110.0),
    ("energy_kwh", at(40 / 60), 130.0),
    ("energy_kwh", at(2.25), 160.0),
    ("energy_kwh", at(2.75), 5.0),
    ("energy_kwh", at(23 + 59 / 60), 25.0),
    ("power_w", at(5 / 60), 50.0),
    ("power_w", at(35 / 60), 150.0),
]


def expected_hours(readings, start, end):
    """The documented definitions, computed independently of the SQL."""
    by_series = defaultdict(list)
    for metric, ts, value in sorted(readings, key=lambda r: r[1]):
        by_series[metric].append((ts, value))
    rows = {}
    for metric, series in by_series.items():
        previous = None
        for ts, value in series:
            step = None if previous is None else value - previous
            previous = value
            if not start <= ts < end:
                continue
            hour = ts.replace(minute=0, second=0, microsecond=0)
            row = rows.setdefault(
                (metric, hour),
                {"values": [], "consumption": 0.0 if metric in CUMULATIVE else None, "resets": 0},
            )
            row["values"].append(value)
            if metric in CUMULATIVE and step is not None:
                row["consumption"] += value if step < 0 else step
                row["resets"] += step < 0
    return {
        key: (
            len(r["values"]),
            sum(r["values"]),
            min(r["values"]),
            max(r["values"]),
            r["values"][0],
            r["values"][-1],
            r["consumption"],
            r["resets"],
        )
        for key, r in rows.items()
    }


@pytest.fixture
def seeded(conn):
    storage_for(conn).ensure_partitions(conn, date(2026, 11, 18), date(2026, 11, 21))
    devices = {}
    for slug, mac in (("acme", "02:00:00:00:0a:01"), ("other", "02:00:00:00:0b:01")):
        tenant = registry.create_tenant(conn, slug=slug, name=slug, plan="pro", timezone="UTC")
        [device] = registry.provision_devices(conn, slug, [registry.DeviceRequest(mac, "energy")])
        devices[slug] = (tenant.tenant_id, device.device_id)
    insert(conn, devices["acme"], READINGS)
    insert(conn, devices["other"], [("energy_kwh", at(3.5), 7.0)])
    return devices


def insert(conn, device, readings):
    tenant_id, device_id = device
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
            " VALUES (%s, %s, %s, %s, %s)",
            [(tenant_id, device_id, metric, ts, value) for metric, ts, value in readings],
        )


def materialize(database_url, partition="2026-11-20", tags=None, selection=None):
    return dg.materialize(
        selection or [telemetry_hourly, telemetry_daily],
        partition_key=partition,
        tags=tags or {},
        resources={"postgres": PostgresResource(database_url=database_url)},
        raise_on_error=False,
    )


def hourly_rows(conn, device_id):
    return {
        (metric, bucket): (count, total, low, high, first, last, consumption, resets)
        for metric, bucket, count, total, low, high, first, last, consumption, resets in (
            conn.execute(
                "SELECT metric, bucket, readings, value_sum, value_min, value_max, first_value,"
                " last_value, consumption, counter_resets FROM telemetry_hourly"
                " WHERE device_id = %s",
                (device_id,),
            )
        )
    }


def all_rows(conn, table):
    return conn.execute(
        f"SELECT * FROM {table} ORDER BY tenant_id, bucket, device_id, metric"
    ).fetchall()


def test_hourly_and_daily_match_the_definitions(conn, database_url, seeded):
    result = materialize(database_url)
    assert result.success
    assert all(e.passed for e in result.get_asset_check_evaluations())
    _, device_id = seeded["acme"]
    # exact: the test values are small integers, so float sums carry no rounding
    assert hourly_rows(conn, device_id) == expected_hours(READINGS, DAY, DAY + timedelta(days=1))
    # the gap's consumption went to hour 02, the reset added the new value
    assert hourly_rows(conn, device_id)[("energy_kwh", at(2))][6:] == (35.0, 1)
    daily = conn.execute(
        "SELECT readings, value_min, value_max, first_value, last_value, consumption,"
        " counter_resets FROM telemetry_daily WHERE device_id = %s AND metric = 'energy_kwh'",
        (device_id,),
    ).fetchone()
    assert daily == (5, 5.0, 160.0, 110.0, 25.0, 85.0, 1)
    avg = conn.execute(
        "SELECT value_avg, consumption FROM telemetry_daily WHERE metric = 'power_w'"
    ).fetchone()
    assert avg == (100.0, None)  # instantaneous metrics have no consumption
    tenants = conn.execute("SELECT DISTINCT tenant_id FROM telemetry_hourly").fetchall()
    assert sorted(t for (t,) in tenants) == sorted(t for t, _ in seeded.values())


def test_rerunning_a_partition_gives_identical_rows(conn, database_url, seeded):
    assert materialize(database_url).success
    first = [row[:-1] for row in all_rows(conn, "telemetry_hourly")]  # all but computed_at
    days = [row[:-1] for row in all_rows(conn, "telemetry_daily")]
    assert materialize(database_url).success
    assert [row[:-1] for row in all_rows(conn, "telemetry_hourly")] == first
    assert [row[:-1] for row in all_rows(conn, "telemetry_daily")] == days


def test_consumption_steps_from_a_reading_days_before_the_window(conn, database_url, seeded):
    """The seed is looked up in the day before the window first, then in every older one."""
    insert(conn, seeded["other"], [("energy_kwh", at(-30), 1.0)])  # 2026-11-18 18:00
    assert materialize(database_url, selection=[telemetry_hourly]).success
    rows = hourly_rows(conn, seeded["other"][1])
    assert rows[("energy_kwh", at(3))][6:] == (6.0, 0)  # 7 - 1, no reset


def test_one_connection_gives_the_rows_of_two(conn, database_url, seeded):
    """The asset runs the consumption pass on a second connection in the exported snapshot;
    called without one, rollup_hours runs it inline: the same rows either way, and a reading
    committed while the side pass runs is in neither pass (one snapshot)."""
    assert materialize(database_url, selection=[telemetry_hourly]).success
    two = [row[:-1] for row in all_rows(conn, "telemetry_hourly")]
    with psycopg.connect(database_url) as other:
        result = rollups.rollup_hours(other, [rollups.Window(DAY, DAY + timedelta(days=1))])
    in_day = len(READINGS) - 1 + 1  # acme's, less the one of the day before, and other's one
    assert result.readings == result.source_readings == in_day
    assert [row[:-1] for row in all_rows(conn, "telemetry_hourly")] == two

    late = ("energy_kwh", at(4.5), 170.0)

    def side():
        insert(conn, seeded["acme"], [late])  # autocommit: lands before the side pass starts
        return psycopg.connect(database_url)

    with psycopg.connect(database_url) as main:
        result = rollups.rollup_hours(
            main, [rollups.Window(DAY, DAY + timedelta(days=1))], side=side
        )
    assert result.readings == result.source_readings == in_day  # not the late one
    assert [row[:-1] for row in all_rows(conn, "telemetry_hourly")] == two


def test_late_data_reruns_only_its_hours_and_clears_the_marks(conn, database_url, seeded):
    assert materialize(database_url).success
    tenant_id, device_id = seeded["acme"]
    before = hourly_rows(conn, device_id)
    late = [("energy_kwh", at(2.5), 150.0)]
    insert(conn, seeded["acme"], late)
    conn.execute(
        "INSERT INTO dirty_windows (tenant_id, window_start, last_marked_at)"
        " VALUES (%s, %s, now() - interval '1 hour')",
        (tenant_id, at(2)),
    )
    with dg.DagsterInstance.ephemeral() as instance:
        dirty = rollups.dirty_hours(conn, datetime.now(UTC))
        [request], waiting = late_requests(instance, dirty, datetime.now(UTC))
    assert waiting == []
    assert request.partition_key == "2026-11-20"
    assert request.tags == {HOURS_TAG: "2026-11-20T02", LATE_DAY_TAG: "2026-11-20"}
    # a mark made while the run is in flight must survive it: stamp before, re-mark after
    result = materialize(database_url, tags=request.tags)
    assert result.success
    after = hourly_rows(conn, device_id)
    expected = expected_hours(READINGS + late, DAY, DAY + timedelta(days=1))
    assert after[("energy_kwh", at(2))] == expected[("energy_kwh", at(2))]
    assert {k: v for k, v in after.items() if k[1] != at(2)} == {
        k: v for k, v in before.items() if k[1] != at(2)
    }
    readings = conn.execute(
        "SELECT readings FROM telemetry_daily WHERE device_id = %s AND metric = 'energy_kwh'",
        (device_id,),
    ).fetchone()[0]
    assert readings == 6
    assert conn.execute("SELECT count(*) FROM dirty_windows").fetchone()[0] == 0


def daily_metadata(result, key):
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.path == [key]]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_a_late_run_re_sums_only_the_series_that_changed(conn, database_url, seeded):
    assert materialize(database_url).success
    late_tags = {HOURS_TAG: "2026-11-20T02,2026-11-20T03"}
    # nothing changed: the late run marks and re-sums nothing, and the day stays as it was
    day_before = all_rows(conn, "telemetry_daily")
    unchanged = materialize(database_url, tags=late_tags)
    assert unchanged.success
    assert daily_metadata(unchanged, "telemetry_hourly")["series_changed"] == 0
    assert daily_metadata(unchanged, "telemetry_daily")["series_resummed"] == 0
    assert all_rows(conn, "telemetry_daily") == day_before

    # a late reading of acme's energy in hour 02, and the other tenant's only reading removed
    # from hour 03 (its series vanishes from the day): two series change, the rest stays
    insert(conn, seeded["acme"], [("energy_kwh", at(2.5), 150.0)])
    conn.execute("DELETE FROM telemetry WHERE device_id = %s", (seeded["other"][1],))
    # the hourly step alone (a daily step that failed, say) leaves its marks for the next run
    assert materialize(database_url, tags=late_tags, selection=[telemetry_hourly]).success
    assert conn.execute("SELECT count(*) FROM rollup_stale_days").fetchone()[0] == 2
    result = materialize(database_url, tags={HOURS_TAG: "2026-11-20T05"})
    assert result.success
    assert all(e.passed for e in result.get_asset_check_evaluations())
    assert daily_metadata(result, "telemetry_daily")["series_resummed"] == 2
    assert conn.execute("SELECT count(*) FROM rollup_stale_days").fetchone()[0] == 0
    incremental = all_rows(conn, "telemetry_daily")
    assert len(incremental) == len(day_before) - 1  # the vanished series' day is gone
    # the same rows as re-summing the whole day (computed_at aside)
    assert materialize(database_url).success
    whole = all_rows(conn, "telemetry_daily")
    assert [r[:-1] for r in incremental] == [r[:-1] for r in whole]
    assert conn.execute(
        "SELECT readings FROM telemetry_daily WHERE device_id = %s AND metric = 'energy_kwh'",
        (seeded["acme"][1],),
    ).fetchone() == (6,)


def land(database_url, device, readings):
    """Late readings through the ingest daemon's writer, which marks their hours and devices."""
    tenant_id, device_id = device
    now = DAY + timedelta(days=2)
    with psycopg.connect(database_url) as writer_conn:
        BatchWriter(writer_conn).write(
            [
                (Reading(tenant_id, device_id, metric, ts, value), Delivery(now, n))
                for n, (metric, ts, value) in enumerate(readings)
            ],
            [],
            now=now,
        )


SENSOR_TAGS = {HOURS_TAG: "2026-11-20T02", LATE_DAY_TAG: "2026-11-20"}


def test_a_sensor_run_rewrites_only_the_devices_marked_dirty(conn, database_url, seeded):
    other = seeded["other"]
    insert(conn, other, [("energy_kwh", at(2.1), 6.0)])  # hour 02 holds both devices
    assert materialize(database_url).success
    before_other = hourly_rows(conn, other[1])
    tenant_id, device_id = seeded["acme"]
    # a cumulative and an instantaneous metric: their statistics come from different queries
    late = [("energy_kwh", at(2.5), 150.0), ("power_w", at(2.4), 80.0), ("power_w", at(2.2), 60.0)]
    land(database_url, seeded["acme"], late)
    assert conn.execute(
        "SELECT window_start, tenant_id, device_id FROM dirty_window_devices"
    ).fetchall() == [(at(2), tenant_id, device_id)]

    result = materialize(database_url, tags=SENSOR_TAGS)
    assert result.success
    assert all(e.passed for e in result.get_asset_check_evaluations())
    assert daily_metadata(result, "telemetry_hourly")["dirty_devices"] == "1"
    expected = expected_hours(READINGS + late, DAY, DAY + timedelta(days=1))
    for metric in ("energy_kwh", "power_w"):
        assert hourly_rows(conn, device_id)[(metric, at(2))] == expected[(metric, at(2))]
    assert hourly_rows(conn, other[1]) == before_other
    assert conn.execute("SELECT count(*) FROM dirty_window_devices").fetchone()[0] == 0
    partial = [all_rows(conn, t) for t in ("telemetry_hourly", "telemetry_daily")]
    # the whole day re-summed alone: in TimescaleDB mode from the daily aggregate, refreshed with
    # the hourly one for the hour the sensor's run read from the raw readings
    resummed = materialize(database_url, selection=[telemetry_daily])
    assert resummed.success
    assert all(e.passed for e in resummed.get_asset_check_evaluations())
    assert [r[:-1] for r in all_rows(conn, "telemetry_daily")] == [r[:-1] for r in partial[1]]
    # the same rows as rewriting the whole day (computed_at aside)
    assert materialize(database_url).success
    whole = [all_rows(conn, t) for t in ("telemetry_hourly", "telemetry_daily")]
    assert [[r[:-1] for r in rows] for rows in partial] == [
        [r[:-1] for r in rows] for rows in whole
    ]


def test_a_sensor_run_rewrites_the_whole_hour_when_rows_changed_without_marks(
    conn, database_url, seeded
):
    assert materialize(database_url).success
    # a reading inserted behind the daemon's back (no mark), then a marked one of another device
    insert(conn, seeded["other"], [("energy_kwh", at(2.2), 6.0)])
    land(database_url, seeded["acme"], [("energy_kwh", at(2.5), 150.0)])
    result = materialize(database_url, tags=SENSOR_TAGS)
    assert result.success
    assert daily_metadata(result, "telemetry_hourly")["dirty_devices"] == "all"
    assert all(e.passed for e in result.get_asset_check_evaluations())
    assert hourly_rows(conn, seeded["other"][1])[("energy_kwh", at(2))][0] == 1


def test_late_data_corrects_the_next_bucket_of_its_series(conn, database_url, seeded):
    """A late reading that becomes the last one before a later bucket changes that bucket's
    first increase: in the run's day it is corrected at once, in a later day it is marked."""
    _, device_id = seeded["acme"]
    insert(conn, seeded["acme"], [("energy_kwh", at(24.5), 40.0)])  # the next day, 00:30
    assert materialize(database_url).success
    assert materialize(database_url, partition="2026-11-21").success
    # 23:59 reads 25 after 02:45's 5: 20 consumed in hour 23. A late 140 at 03:15 makes 23:59 a
    # counter reset (25 consumed, one reset); a late 30 at 23:59:30 then moves the next day's
    # 00:30 increase from 15 (40 - 25) to 10 (40 - 30)
    first, second = ("energy_kwh", at(3.25), 140.0), ("energy_kwh", at(23 + 59.5 / 60), 30.0)
    land(database_url, seeded["acme"], [first])
    result = materialize(
        database_url, tags={HOURS_TAG: "2026-11-20T03", LATE_DAY_TAG: "2026-11-20"}
    )
    assert result.success
    assert all(e.passed for e in result.get_asset_check_evaluations())
    assert daily_metadata(result, "telemetry_hourly")["next_buckets_corrected"] == 1
    expected = expected_hours([*READINGS, first], DAY, DAY + timedelta(days=1))
    assert hourly_rows(conn, device_id) == {
        k: v for k, v in expected.items() if k[1] < DAY + timedelta(days=1)
    } | {("energy_kwh", at(24)): hourly_rows(conn, device_id)[("energy_kwh", at(24))]}
    assert hourly_rows(conn, device_id)[("energy_kwh", at(23))][6:] == (25.0, 1)  # a reset now

    land(database_url, seeded["acme"], [second])
    tags = {HOURS_TAG: "2026-11-20T23", LATE_DAY_TAG: "2026-11-20"}
    result = materialize(database_url, tags=tags)
    assert result.success
    rows = hourly_rows(conn, device_id)
    assert rows[("energy_kwh", at(23))][6:] == (30.0, 1)  # 25 after the reset, then 5
    metadata = daily_metadata(result, "telemetry_hourly")
    assert metadata["next_buckets_marked_dirty"] == 1
    # the next day's hour 00 is marked for the sensor, device included
    assert conn.execute("SELECT window_start, device_id FROM dirty_window_devices").fetchall() == [
        (at(24), device_id)
    ]
    assert rollups.dirty_hours(conn, datetime.now(UTC) + timedelta(minutes=1)) == {
        DAY + timedelta(days=1): [at(24)]
    }
    next_day = {HOURS_TAG: "2026-11-21T00", LATE_DAY_TAG: "2026-11-21"}
    assert materialize(database_url, partition="2026-11-21", tags=next_day).success
    assert hourly_rows(conn, device_id)[("energy_kwh", at(24))][6:] == (10.0, 0)
    daily = conn.execute(
        "SELECT bucket, consumption FROM telemetry_daily WHERE device_id = %s"
        " AND metric = 'energy_kwh' ORDER BY bucket",
        (device_id,),
    ).fetchall()
    hourly = conn.execute(
        "SELECT date_trunc('day', bucket, 'UTC'), sum(consumption) FROM telemetry_hourly"
        " WHERE device_id = %s AND metric = 'energy_kwh' GROUP BY 1 ORDER BY 1",
        (device_id,),
    ).fetchall()
    assert [(b, round(c, 6)) for b, c in daily] == [(b, round(c, 6)) for b, c in hourly]


def test_a_mark_renewed_after_the_hourly_step_stays_dirty(conn, database_url, seeded):
    tenant_id, _ = seeded["acme"]
    conn.execute(
        "INSERT INTO dirty_windows (tenant_id, window_start) VALUES (%s, %s)", (tenant_id, at(2))
    )
    assert materialize(database_url, selection=[telemetry_hourly]).success
    conn.execute("UPDATE dirty_windows SET last_marked_at = now()")  # the daemon marks again
    assert materialize(database_url, selection=[telemetry_daily]).success
    assert conn.execute("SELECT count(*) FROM dirty_windows").fetchone()[0] == 1


def test_late_sensor_never_requests_a_day_already_in_flight(conn, seeded):
    tenant_id, _ = seeded["acme"]
    conn.execute(
        "INSERT INTO dirty_windows (tenant_id, window_start, last_marked_at)"
        " VALUES (%s, %s, now() - interval '1 hour'), (%s, %s, now() - interval '1 hour'),"
        " (%s, %s, now())",
        (tenant_id, at(2), tenant_id, at(-20), tenant_id, at(5)),
    )
    dirty = rollups.dirty_hours(conn, datetime.now(UTC) - timedelta(minutes=5))
    assert dirty == {DAY: [at(2)], DAY - timedelta(days=1): [at(-20)]}  # 05:00 not settled yet
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_run(
            dg.DagsterRun(
                job_name="telemetry_rollups_job",
                tags={LATE_DAY_TAG: "2026-11-20"},
                status=dg.DagsterRunStatus.STARTED,
            )
        )
        requests, waiting = late_requests(instance, dirty, datetime.now(UTC))
    assert waiting == ["2026-11-20"]
    assert [r.partition_key for r in requests] == ["2026-11-19"]
    assert requests[0].tags[HOURS_TAG] == "2026-11-19T04"


def test_schedule_requests_the_hour_that_closed():
    request = closed_hour_request(datetime(2026, 11, 21, 0, 5, tzinfo=UTC))
    assert request.partition_key == "2026-11-20"
    assert request.tags == {HOURS_TAG: "2026-11-20T23"}


@pytest.mark.parametrize("bad", ["2026-11-20 02", "2026-11-21T00", "tomorrow"])
def test_bad_hours_tag_fails_clearly(bad):
    window = rollups.Window(DAY, DAY + timedelta(days=1))
    with pytest.raises(dg.Failure, match="iiot/hours"):
        parse_hours_tag(bad, window)


def test_backfill_range_runs_as_one_run(conn, database_url, seeded):
    result = dg.materialize(
        [telemetry_hourly, telemetry_daily],
        tags={  # what a single-run backfill of the range launches
            "dagster/asset_partition_range_start": "2026-11-19",
            "dagster/asset_partition_range_end": "2026-11-20",
        },
        resources={"postgres": PostgresResource(database_url=database_url)},
    )
    assert result.success
    days = conn.execute("SELECT DISTINCT bucket FROM telemetry_daily ORDER BY 1").fetchall()
    assert [d for (d,) in days] == [DAY - timedelta(days=1), DAY]


def failed_checks(result):
    return {e.check_name for e in result.get_asset_check_evaluations() if not e.passed}


def test_checks_fail_on_bad_rollups(conn, database_url, seeded):
    """Fault injection through the real database: a trigger that corrupts what the rollup
    writes, and a reading whose tenant does not exist."""
    conn.execute(
        "CREATE FUNCTION corrupt() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN NEW.readings := NEW.readings + 1;"
        " NEW.consumption := -abs(coalesce(NEW.consumption, 1)); RETURN NEW; END $$"
    )
    conn.execute(
        "CREATE TRIGGER corrupt BEFORE INSERT ON telemetry_hourly"
        " FOR EACH ROW EXECUTE FUNCTION corrupt()"
    )
    _, device_id = seeded["acme"]
    insert(conn, (999_999, device_id), [("voltage_v", at(4), 230.0)])
    result = materialize(database_url)
    assert not result.success  # blocking checks stop the daily step
    assert failed_checks(result) == {COUNTS_MATCH, NO_NEGATIVE_CONSUMPTION, ROWS_HAVE_TENANT}


def test_freshness_check(conn, database_url, seeded):
    resource = PostgresResource(database_url=database_url)

    def evaluate():
        return raw_telemetry_fresh(postgres=resource)

    assert evaluate().passed  # no device online: nothing expected
    conn.execute("UPDATE devices SET last_seen = now() - interval '40 minutes'")
    stale = evaluate()
    assert not stale.passed
    assert stale.severity == dg.AssetCheckSeverity.WARN
    assert stale.metadata["online_devices"].value == 2
    conn.execute("UPDATE devices SET last_seen = now() - interval '1 minute'")
    assert evaluate().passed


def test_backfill_from_the_dagster_command_line(conn, database_url, seeded, cli_env, tmp_path):
    """The documented ops procedure: `dagster asset materialize --partition-range`."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {**cli_env, "DAGSTER_HOME": str(home)}
    completed = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "asset",
            "materialize",
            "-m",
            "iiot_orchestration.definitions",
            "--select",
            "telemetry_hourly,telemetry_daily",
            "--partition-range",
            "2026-11-19...2026-11-20",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    days = conn.execute("SELECT DISTINCT bucket FROM telemetry_daily ORDER BY 1").fetchall()
    assert [d for (d,) in days] == [DAY - timedelta(days=1), DAY]


@pytest.mark.timescale
def test_both_storage_modes_give_identical_rollups(timescale_server_url):
    """The same readings in a PostgreSQL-mode and a TimescaleDB-mode database (continuous
    aggregates refreshed for the window) roll up to the same rows."""
    from iiot_orchestration import migrate
    from tests.conftest import create_database, drop_database

    tables = {}
    for mode in ("postgres", "timescale"):
        name = f"iiot_modes_{mode}_{uuid.uuid4().hex[:8]}"
        url = create_database(timescale_server_url, name)
        try:
            migrate.migrate(url, mode, echo=lambda _: None)
            with psycopg.connect(url, autocommit=True) as conn:
                assert storage_for(conn).mode == mode
                storage_for(conn).ensure_partitions(conn, date(2026, 11, 18), date(2026, 11, 21))
                tenant = registry.create_tenant(
                    conn, slug="acme", name="Acme", plan="pro", timezone="UTC"
                )
                [device] = registry.provision_devices(
                    conn, "acme", [registry.DeviceRequest("02:00:00:00:0a:01", "energy")]
                )
                insert(conn, (tenant.tenant_id, device.device_id), READINGS)
                assert materialize(url).success
                late = [("energy_kwh", at(2.5), 150.0)]  # and a late reading, one hour re-run
                insert(conn, (tenant.tenant_id, device.device_id), late)
                assert materialize(url, tags={HOURS_TAG: "2026-11-20T02"}).success
                tables[mode] = [
                    [row[:-1] for row in all_rows(conn, table)]
                    for table in ("telemetry_hourly", "telemetry_daily")
                ]
        finally:
            drop_database(timescale_server_url, name)
    assert tables["postgres"][0]  # not trivially equal
    assert tables["timescale"] == tables["postgres"]


@pytest.mark.timescale
def test_refreshing_an_aggregate_gives_the_connection_back_as_it_was(timescale_server_url):
    """refresh_aggregate runs outside a transaction; it left an autocommit connection in
    transaction mode, so that a caller's next SET TRANSACTION failed (a PITR test met it)."""
    from iiot_orchestration import migrate
    from tests.conftest import create_database, drop_database

    name = f"iiot_refresh_{uuid.uuid4().hex[:8]}"
    url = create_database(timescale_server_url, name)
    window = rollups.Window(datetime(2026, 11, 18, tzinfo=UTC), datetime(2026, 11, 19, tzinfo=UTC))
    try:
        migrate.migrate(url, "timescale", echo=lambda _: None)
        for autocommit in (True, False):
            with psycopg.connect(url, autocommit=autocommit) as conn:
                rollups.refresh_aggregate(conn, rollups.HOURLY_AGGREGATE, window)
                assert conn.autocommit is autocommit
                if not autocommit:
                    conn.execute("SELECT 1")  # a transaction of the caller's again
                    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    finally:
        drop_database(timescale_server_url, name)
