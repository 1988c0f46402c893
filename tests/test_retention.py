"""Retention against the real PostgreSQL (and TimescaleDB when the server has it): two tenants
with different retention, archives read back and compared with the readings inserted, a
corrupted archive, runs killed between archive and removal and in the middle of it, late
readings, restore holds, unknown tenants, the database's own refusal to drop a day, compression
(on by default in TimescaleDB mode; late and re-delivered readings into compressed chunks through
the ingest writer), and the manifest and store against malformed and hostile input."""

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import dagster as dg
import psycopg
import pyarrow.parquet as pq
import pytest

from assets.retention import (
    ARCHIVED_EQUALS_REMOVED,
    ARCHIVES_VERIFIED,
    COMPRESSION_ENABLED,
    EXPIRED_READINGS_REMOVED,
    ArchiveResource,
    archive_checksums_verify,
    no_expired_readings,
    telemetry_archive,
    telemetry_compression,
)
from iiot_orchestration import archive, registry, retention
from iiot_orchestration.db import connect
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.storage import storage_for
from ingest_daemon.validation import Reading
from ingest_daemon.writer import BatchWriter, Delivery
from tests.conftest import REPO_ROOT

TODAY = datetime.now(UTC).date()
RUN_DAY = TODAY - timedelta(days=1)
RETENTION = {"short": 3, "long": 6}
DAYS_OF_DATA = 10
DAY2 = timedelta(days=2)


def ago(n: int) -> date:
    return TODAY - timedelta(days=n)


def midnight(day: date) -> datetime:
    return datetime.combine(day, datetime.min.time(), UTC)


@dataclass
class Fleet:
    tenants: dict[str, int]
    readings: dict[tuple[str, date], list[tuple]]  # as inserted, in canonical order

    def expected_left(self) -> dict[tuple[str, date], int]:
        """Readings per tenant and day that the run for RUN_DAY keeps."""
        return {
            (slug, day): len(rows)
            for (slug, day), rows in self.readings.items()
            if day >= RUN_DAY + timedelta(days=1 - RETENTION[slug])
        }


def make_fleet(conn: psycopg.Connection) -> Fleet:
    """Two tenants ('short' keeps 3 days, 'long' 6), each an energy and a water meter, three
    readings per series on each of the last ten UTC days, with microseconds and awkward values."""
    storage_for(conn).ensure_partitions(conn, ago(DAYS_OF_DATA + 2), TODAY)
    fleet = Fleet({}, {})
    series = {"energy": ("energy_kwh", "power_w"), "water": ("water_m3",)}
    for n, slug in enumerate(RETENTION):
        tenant = registry.create_tenant(
            conn, slug=slug, name=slug, plan="pro", timezone="UTC", retention_days=RETENTION[slug]
        )
        fleet.tenants[slug] = tenant.tenant_id
        devices = registry.provision_devices(
            conn,
            slug,
            [
                registry.DeviceRequest(f"02:00:00:00:0{n}:01", "energy"),
                registry.DeviceRequest(f"02:00:00:00:0{n}:02", "water"),
            ],
        )
        for age in range(1, DAYS_OF_DATA + 1):
            day = ago(age)
            rows = []
            for device, kind in zip(devices, ("energy", "water"), strict=True):
                for metric in series[kind]:
                    for k in range(3):
                        ts = midnight(day) + timedelta(hours=8 * k, microseconds=123_457 * k + age)
                        value = (0.1 + 0.2) * age + k * 1e-9 if k != 2 else -1.5e300
                        received = ts + timedelta(seconds=2, microseconds=7)
                        rows.append(
                            (tenant.tenant_id, device.device_id, metric, ts, value, received)
                        )
            rows.sort(key=lambda r: (r[1], r[2], r[3]))
            fleet.readings[(slug, day)] = rows
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value, received_at)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            [row for rows in fleet.readings.values() for row in rows],
        )
    return fleet


def raw(conn: psycopg.Connection, tenant_id: int, day: date) -> list[tuple]:
    start, end = retention.day_bounds(day)
    return conn.execute(
        "SELECT tenant_id, device_id, metric, ts, value, received_at FROM telemetry"
        " WHERE tenant_id = %s AND ts >= %s AND ts < %s ORDER BY device_id, metric, ts",
        (tenant_id, start, end),
    ).fetchall()


def left(conn: psycopg.Connection, fleet: Fleet) -> dict[tuple[str, date], int]:
    slugs = {v: k for k, v in fleet.tenants.items()}
    rows = conn.execute(
        "SELECT tenant_id, (ts AT TIME ZONE 'UTC')::date, count(*) FROM telemetry GROUP BY 1, 2"
    ).fetchall()
    return {(slugs.get(t, str(t)), d): n for t, d, n in rows}


def compressed_days(conn: psycopg.Connection) -> set[date]:
    """The UTC days whose telemetry chunk is compressed (TimescaleDB mode)."""
    rows = conn.execute(
        "SELECT (range_start AT TIME ZONE 'UTC')::date FROM timescaledb_information.chunks"
        " WHERE hypertable_name = 'telemetry' AND is_compressed"
    ).fetchall()
    return {r[0] for r in rows}


def parquet_rows(path: Path) -> list[tuple]:
    table = pq.read_table(path)
    return list(zip(*(table.column(c).to_pylist() for c in archive.COLUMNS), strict=True))


@pytest.fixture
def fleet(conn):
    return make_fleet(conn)


@pytest.fixture
def timescale_mode(storage_mode):
    if storage_mode != "timescale":
        pytest.skip("timescaledb extension not available: chunk compression needs TimescaleDB")


@pytest.fixture
def root(tmp_path):
    return tmp_path / "archive"


@pytest.fixture
def store(root):
    return archive.open_store(root)


@pytest.fixture
def service(database_url):
    """An autocommit connection as the Dagster service role."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute("SET ROLE platform_rw")
        yield connection


def materialize(database_url, root, day=RUN_DAY, batch_rows=None, assets=None):
    return dg.materialize(
        assets or [telemetry_archive],
        partition_key=None if assets else str(day),
        resources={
            "postgres": PostgresResource(database_url=database_url),
            "archive": ArchiveResource(root=str(root), batch_rows=batch_rows),
        },
        raise_on_error=False,
    )


def checks(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def test_two_tenants_each_lose_only_what_they_outgrew(
    conn, database_url, fleet, root, storage_mode
):
    result = materialize(database_url, root, batch_rows=4)
    assert result.success
    assert checks(result) == {
        ARCHIVES_VERIFIED: True,
        ARCHIVED_EQUALS_REMOVED: True,
        EXPIRED_READINGS_REMOVED: True,
    }
    assert left(conn, fleet) == fleet.expected_left()
    # days 7..10 ago: outgrown by both, their whole partition or chunk went; 4..6: short only
    days = set(storage_for(conn).partition_days(conn))
    assert not days & {ago(n) for n in range(7, DAYS_OF_DATA + 3)}
    assert {ago(n) for n in range(1, 7)} <= days
    found = {(r.tenant_slug, r.day): r for r in retention.records(conn)}
    assert set(found) == set(fleet.readings) - set(fleet.expected_left())
    for (slug, day), record in found.items():
        assert (record.rows, record.deleted_rows) == (len(fleet.readings[(slug, day)]),) * 2
        assert record.deleted_by == ("partition" if day <= ago(7) else "batches")
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["removed_readings"].value == sum(len(r) for r in fleet.readings.values()) - sum(
        fleet.expected_left().values()
    )
    progress = dict(conn.execute("SELECT tenant_id, archived_through FROM retention_progress"))
    assert progress == {fleet.tenants["short"]: ago(4), fleet.tenants["long"]: ago(7)}
    # nothing is left for the same day: a second run finds no work
    again = materialize(database_url, root)
    assert again.success
    assert (
        again.get_asset_materialization_events()[0].materialization.metadata["tenant_days"].value
        == 0
    )


def test_archives_read_back_exactly_the_rows_inserted(conn, fleet, root, service, store):
    retention.run_retention(service, store, RUN_DAY)
    archived = [key for key in fleet.readings if key not in fleet.expected_left()]
    assert len(archived) == 7 + 4
    for slug, day in archived:
        tenant_id = fleet.tenants[slug]
        assert (
            parquet_rows(root / archive.parquet_path(tenant_id, day)) == fleet.readings[(slug, day)]
        )
        manifest = json.loads((root / archive.manifest_path(tenant_id, day)).read_text())
        data = (root / archive.parquet_path(tenant_id, day)).read_bytes()
        assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
        assert manifest["bytes"] == len(data)
        assert (manifest["rows"], manifest["devices"]) == (9, 2)
        assert manifest["min_ts"] == min(r[3] for r in fleet.readings[(slug, day)]).isoformat()
        assert manifest["max_ts"] == max(r[3] for r in fleet.readings[(slug, day)]).isoformat()
        assert manifest["schema_version"] == archive.SCHEMA_VERSION
    assert not list(root.rglob("*.tmp"))
    assert retention.verify_archives(conn, store).problems == []


def test_a_rerun_leaves_a_matching_archive_alone(conn, fleet, root, service, store):
    short = fleet.tenants["short"]
    first = retention.ensure_archive(service, store, short, "short", ago(5))
    path = root / archive.parquet_path(short, ago(5))
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    second = retention.ensure_archive(service, store, short, "short", ago(5))
    assert (first.action, second.action) == ("written", "reused")
    assert second.record == first.record
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert len(raw(conn, short, ago(5))) == 9  # archiving alone removes nothing


def test_a_corrupted_archive_stops_its_removal_and_fails_the_checks(
    conn, database_url, fleet, root, service, store
):
    short = fleet.tenants["short"]
    retention.ensure_archive(service, store, short, "short", ago(5))
    path = root / archive.parquet_path(short, ago(5))
    good = path.read_bytes()
    path.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])

    result = materialize(database_url, root)
    assert not result.success  # a blocking check failed
    assert checks(result)[ARCHIVES_VERIFIED] is False
    assert checks(result)[EXPIRED_READINGS_REMOVED] is False
    assert raw(conn, short, ago(5)) == fleet.readings[("short", ago(5))]
    assert len(raw(conn, fleet.tenants["short"], ago(4))) == 0  # the other days went on
    resources = {
        "postgres": PostgresResource(database_url=database_url),
        "archive": ArchiveResource(root=str(root)),
    }
    verdict = archive_checksums_verify(**resources)
    assert not verdict.passed
    assert str(path) in verdict.metadata["problems"].value
    assert "corrupted" in verdict.metadata["problems"].value
    assert retention.get_record(conn, short, ago(5)).deleted_rows == 0

    path.write_bytes(good)
    assert materialize(database_url, root).success
    assert raw(conn, short, ago(5)) == []
    assert archive_checksums_verify(**resources).passed


CRASH_SCRIPT = """
import sys, time
from datetime import date
import psycopg
from iiot_orchestration import archive, retention

url, root, day, marker, point = sys.argv[1:]

def pause(*args, **kwargs):
    open(marker, "w").close()
    time.sleep(600)

if point == "before_removal":  # the first archive is recorded, nothing removed yet
    record = retention._record
    def record_then_pause(*args, **kwargs):
        found = record(*args, **kwargs)
        pause()
    retention._record = record_then_pause
else:  # after the first batch of removals committed
    batches = archive.iter_batches
    def first_then_pause(table, size):
        iterator = batches(table, size)
        yield next(iterator)
        pause()
    archive.iter_batches = first_then_pause
with psycopg.connect(url, autocommit=True, application_name="iiot-crash-test") as conn:
    conn.execute("SET ROLE platform_rw")
    retention.run_retention(conn, archive.open_store(root), date.fromisoformat(day), batch_rows=4)
"""


def run_until_killed(database_url, root, point, tmp_path, conn):
    """Start a retention run in a subprocess, SIGKILL it when it reaches ``point``."""
    marker = tmp_path / f"{point}.reached"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CRASH_SCRIPT,
            database_url,
            str(root),
            str(RUN_DAY),
            str(marker),
            point,
        ],
        cwd=REPO_ROOT,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None, "the run ended before reaching the kill point"
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.05)
    finally:
        process.kill()
        process.wait()
    # the server notices the dropped connection (and frees its lock) on its own time
    deadline = time.monotonic() + 30
    while conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'iiot-crash-test'"
    ).fetchone()[0]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_run_killed_between_archive_and_removal_leaves_the_data_and_a_rerun_completes(
    conn, database_url, fleet, root, tmp_path
):
    before = left(conn, fleet)
    run_until_killed(database_url, root, "before_removal", tmp_path, conn)
    assert left(conn, fleet) == before  # nothing removed
    first = retention.records(conn)
    assert first  # the first day's archives were written and recorded
    assert all(r.deleted_rows == 0 and r.deleted_at is None for r in first)

    result = materialize(database_url, root, batch_rows=4)
    assert result.success
    assert all(checks(result).values())
    assert left(conn, fleet) == fleet.expected_left()
    again = {(r.tenant_id, r.day): r.sha256 for r in retention.records(conn)}
    assert all(again[(r.tenant_id, r.day)] == r.sha256 for r in first)  # reused, not rewritten


def test_a_run_killed_in_the_middle_of_a_removal_is_completed_by_the_next(
    conn, database_url, fleet, root, tmp_path
):
    # only the days 'short' outgrew and 'long' keeps: removal by rows, in batches of 4
    conn.execute("DELETE FROM telemetry WHERE ts < %s", (midnight(ago(6)),))
    run_until_killed(database_url, root, "first_batch", tmp_path, conn)
    [record] = retention.records(conn)
    assert record.deleted_rows == 4
    assert record.deleted_at is None
    assert len(raw(conn, record.tenant_id, record.day)) == 9 - 4

    result = materialize(database_url, root, batch_rows=4)
    assert result.success
    assert all(checks(result).values())
    assert retention.get_record(conn, record.tenant_id, record.day).deleted_rows == 9
    assert left(conn, fleet) == fleet.expected_left()


def test_late_readings_are_added_to_the_archive_of_their_day(conn, fleet, root, service, store):
    retention.run_retention(service, store, RUN_DAY)
    short = fleet.tenants["short"]
    # a longer retention lets ingest land old readings again; back to 3 days, they must go too
    conn.execute("UPDATE tenants SET retention_days = 30 WHERE slug = 'short'")
    assert retention.run_retention(service, store, RUN_DAY).tenant_days == []
    device = fleet.readings[("short", ago(5))][0][1]
    late = (
        short,
        device,
        "power_w",
        midnight(ago(5)) + timedelta(minutes=1),
        42.0,
        midnight(TODAY),
    )
    conn.execute(
        "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value, received_at)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        late,
    )
    conn.execute("UPDATE tenants SET retention_days = 3 WHERE slug = 'short'")
    run = retention.run_retention(service, store, RUN_DAY)
    [merged] = [t for t in run.tenant_days if t.action == "merged"]
    assert (merged.slug, merged.day, merged.rows, merged.removed) == ("short", ago(5), 10, 1)
    rows = parquet_rows(root / archive.parquet_path(short, ago(5)))
    assert rows == sorted([*fleet.readings[("short", ago(5))], late], key=lambda r: r[1:4])
    record = retention.get_record(conn, short, ago(5))
    assert (record.rows, record.deleted_rows, record.deleted_by) == (10, 10, "batches")
    assert not run.mismatched_days
    assert left(conn, fleet) == fleet.expected_left()


def test_an_archive_published_but_not_recorded_is_adopted(conn, fleet, root, service, store):
    short = fleet.tenants["short"]
    written = archive.write_archive(
        store, short, "short", ago(5), retention.stream_rows(service, short, ago(5), 100)
    )
    assert retention.get_record(conn, short, ago(5)) is None
    ensured = retention.ensure_archive(service, store, short, "short", ago(5))
    assert ensured.action == "reused"
    assert ensured.record.sha256 == written.manifest.sha256


def test_readings_of_an_unknown_tenant_are_kept_and_keep_their_day(
    conn, fleet, root, service, store
):
    conn.execute(
        "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
        " VALUES (999, 1, 'x', %s, 1)",
        (midnight(ago(8)),),
    )
    run = retention.run_retention(service, store, RUN_DAY)
    assert any("tenant id 999" in p for p in run.problems)
    assert left(conn, fleet) == {**fleet.expected_left(), ("999", ago(8)): 1}
    assert ago(8) in storage_for(conn).partition_days(conn)
    [day] = [d for d in run.days if d.day == ago(8)]
    assert (day.method, day.raw_before, day.raw_after) == ("batches", 19, 1)


def test_the_database_refuses_to_drop_a_day_that_is_needed_or_not_archived(conn, fleet, service):
    def drop(day):
        with pytest.raises(psycopg.Error) as info:
            retention.drop_day(service, day)
        return str(info.value)

    assert "still within the 6-day retention of tenant long" in drop(ago(5))
    assert "is not all archived" in drop(ago(8))
    assert len(raw(conn, fleet.tenants["long"], ago(8))) == 9


def test_a_restored_day_is_held_until_its_hold_ends(conn, fleet, root, service, store):
    retention.run_retention(service, store, RUN_DAY)
    short = fleet.tenants["short"]
    [day] = retention.restore(service, store, "short", ago(5), ago(5), hold_days=2)
    assert (day.rows, day.inserted) == (9, 9)
    record = retention.get_record(conn, short, ago(5))
    assert (record.hold_until, record.deleted_rows, record.deleted_at) == (TODAY + DAY2, 0, None)
    # restored four days ago for two days: the hold ended yesterday
    retention.restore(service, store, "short", ago(6), ago(6), hold_days=2, today=ago(4))
    assert retention.get_record(conn, short, ago(6)).hold_until == ago(2)
    run = retention.run_retention(service, store, RUN_DAY)
    assert [(t.slug, t.day, t.action) for t in run.tenant_days] == [("short", ago(6), "reused")]
    assert raw(conn, short, ago(5)) == fleet.readings[("short", ago(5))]
    assert raw(conn, short, ago(6)) == []
    assert retention.expired_readings(conn, RUN_DAY) == {}
    assert retention.get_record(conn, short, ago(6)).deleted_by == "batches"


def test_expired_readings_check_and_a_shorter_retention(
    conn, database_url, fleet, root, service, store
):
    verdict = no_expired_readings(postgres=PostgresResource(database_url=database_url))
    assert not verdict.passed
    assert verdict.metadata["expired_by_tenant"].value == {"short": 7 * 9, "long": 4 * 9}
    retention.run_retention(service, store, RUN_DAY)
    assert no_expired_readings(postgres=PostgresResource(database_url=database_url)).passed
    conn.execute("UPDATE tenants SET retention_days = 2 WHERE slug = 'long'")
    run = retention.run_retention(service, store, RUN_DAY)
    assert sorted(t.day for t in run.tenant_days) == [ago(6), ago(5), ago(4), ago(3)]
    assert left(conn, fleet) == {
        k: v for k, v in fleet.expected_left().items() if k[0] == "short" or k[1] >= ago(2)
    }


def test_one_run_at_a_time(conn, fleet, service, store, database_url):
    with psycopg.connect(database_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (retention.LOCK_KEY,))
        with pytest.raises(retention.RetentionError, match="another retention run"):
            retention.run_retention(service, store, RUN_DAY)
    assert left(conn, fleet) == {k: len(v) for k, v in fleet.readings.items()}
    with psycopg.connect(database_url) as plain, pytest.raises(ValueError, match="autocommit"):
        retention.run_retention(plain, store, RUN_DAY)


def test_compression_in_postgres_mode_has_nothing_to_do(database_url, root, postgres_mode):
    result = materialize(database_url, root, assets=[telemetry_compression])
    assert result.success
    [evaluation] = result.get_asset_check_evaluations()
    assert (evaluation.check_name, evaluation.passed) == (COMPRESSION_ENABLED, True)
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert (metadata["storage_mode"].value, metadata["compressed_now"].value) == ("postgres", 0)


def test_compression_and_retention_in_timescale_mode(
    conn, database_url, fleet, root, service, store, timescale_mode, monkeypatch
):
    monkeypatch.delenv("IIOT_COMPRESS_AFTER_DAYS", raising=False)
    by_default = materialize(database_url, root, assets=[telemetry_compression])
    assert by_default.success
    assert checks(by_default) == {COMPRESSION_ENABLED: True}
    metadata = by_default.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["compressed_now"].value == DAYS_OF_DATA - 7  # the days 8 to 10 ago
    monkeypatch.setenv("IIOT_COMPRESS_AFTER_DAYS", "2")
    result = materialize(database_url, root, assets=[telemetry_compression])
    assert result.success
    assert all(checks(result).values())
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["compressed_now"].value == 7 - 2  # then the days 3 to 7 ago
    assert metadata["compressed_chunks"].value == DAYS_OF_DATA - 2
    assert compressed_days(conn) == {ago(n) for n in range(3, DAYS_OF_DATA + 1)}
    # retention archives, drops and deletes by key from compressed chunks alike
    run = retention.run_retention(service, store, RUN_DAY)
    assert not run.problems
    assert not run.mismatched_days
    assert left(conn, fleet) == fleet.expected_left()
    for slug, day in (("short", ago(5)), ("long", ago(8))):
        archived = parquet_rows(root / archive.parquet_path(fleet.tenants[slug], day))
        assert archived == fleet.readings[(slug, day)]
    assert ago(5) in compressed_days(conn)  # 'long' keeps it: 'short' went by key
    retention.restore(service, store, "short", ago(5), ago(5))
    assert raw(conn, fleet.tenants["short"], ago(5)) == fleet.readings[("short", ago(5))]
    assert retention.verify_archives(conn, store).problems == []


def test_compression_turned_off_fails_its_check_and_can_be_turned_on_again(
    conn, database_url, fleet, root, service, timescale_mode
):
    with pytest.raises(psycopg.errors.InsufficientPrivilege):  # not the service's to decide
        service.execute("ALTER TABLE telemetry SET (timescaledb.compress = false)")
    conn.execute("SET ROLE migration_admin")
    conn.execute("ALTER TABLE telemetry SET (timescaledb.compress = false)")
    off = materialize(database_url, root, assets=[telemetry_compression])
    assert off.success  # a warning: the readings are safe, only larger
    [evaluation] = off.get_asset_check_evaluations()
    assert not evaluation.passed
    assert evaluation.metadata["reason"].value == retention.COMPRESSION_OFF
    assert (
        off.get_asset_materialization_events()[0].materialization.metadata["compressed_now"].value
        == 0
    )
    # the statement docs/retention.md gives
    conn.execute(
        "ALTER TABLE telemetry SET (timescaledb.compress,"
        " timescaledb.compress_segmentby = 'tenant_id, device_id, metric',"
        " timescaledb.compress_orderby = 'ts')"
    )
    conn.execute("RESET ROLE")
    on = materialize(database_url, root, assets=[telemetry_compression])
    assert checks(on) == {COMPRESSION_ENABLED: True}
    assert compressed_days(conn) == {ago(n) for n in range(8, DAYS_OF_DATA + 1)}


def test_late_and_redelivered_readings_into_a_compressed_chunk(
    conn, database_url, fleet, root, timescale_mode, monkeypatch
):
    monkeypatch.setenv("IIOT_COMPRESS_AFTER_DAYS", "2")
    assert materialize(database_url, root, assets=[telemetry_compression]).success
    day = ago(4)  # compressed, and within the retention of 'long'
    assert day in compressed_days(conn)
    tenant_id, device_id, metric, ts, value, _ = fleet.readings[("long", day)][0]
    now = datetime.now(UTC)
    topic = "iiot/devices/02:00:00:00:01:01/telemetry"
    late = Reading(tenant_id, device_id, metric, ts + timedelta(minutes=1), 7.25)
    batch = [
        (Reading(tenant_id, device_id, metric, ts, value), Delivery(now, 0, topic=topic)),
        (Reading(tenant_id, device_id, metric, ts, value + 1), Delivery(now, 1, topic=topic)),
        (late, Delivery(now, 2, topic=topic)),
    ]
    with connect(database_url, role="platform_rw") as writing:
        result = BatchWriter(writing).write(batch, [], now=now)
    assert (result.landed, result.duplicates, result.dead_letters) == (1, 1, 1)
    [conflict] = result.conflicts
    assert (conflict.reading.value, conflict.kept) == (value + 1, value)
    letters = conn.execute("SELECT reason, tenant_id, device_id, topic FROM dead_letters")
    assert letters.fetchall() == [("conflicting_duplicate", tenant_id, device_id, topic)]
    stored = conn.execute(
        "SELECT ts, value, received_at FROM telemetry"
        " WHERE tenant_id = %s AND device_id = %s AND metric = %s AND ts >= %s AND ts < %s"
        " ORDER BY ts",
        (tenant_id, device_id, metric, ts, ts + timedelta(hours=1)),
    ).fetchall()
    assert stored == [(ts, value, fleet.readings[("long", day)][0][5]), (late.ts, 7.25, now)]
    assert len(raw(conn, tenant_id, day)) == 9 + 1
    dirty = conn.execute("SELECT tenant_id, window_start FROM dirty_windows").fetchall()
    assert dirty == [(tenant_id, late.ts.replace(minute=0, second=0, microsecond=0))]
    # the same batch again: nothing more lands, the conflict is refused again
    with connect(database_url, role="platform_rw") as writing:
        again = BatchWriter(writing).write(batch, [], now=now)
    assert (again.landed, again.duplicates, again.dead_letters) == (0, 2, 1)
    # the late reading left its chunk partly uncompressed: the next run compresses it again
    assert materialize(database_url, root, assets=[telemetry_compression]).success
    (partial,) = conn.execute(
        "SELECT count(*) FROM _timescaledb_catalog.chunk k"
        "  JOIN _timescaledb_catalog.hypertable h ON h.id = k.hypertable_id"
        " WHERE h.table_name = 'telemetry' AND k.status & 8 = 8"
    ).fetchone()
    assert partial == 0
    assert len(raw(conn, tenant_id, day)) == 9 + 1


# Without the database


def table_of(rows):
    return retention._to_table(rows)


def sample_rows(n=5, tenant=1):
    base = datetime(2026, 3, 1, tzinfo=UTC)
    return [
        (tenant, d, m, base + timedelta(seconds=s, microseconds=7), float(s) / 3, base)
        for d in (1, 2)
        for m in ("energy_kwh", "power_w")
        for s in range(n)
    ]


def test_content_digest_does_not_depend_on_batches():
    rows = sample_rows()
    whole, parts = archive.ContentDigest(), archive.ContentDigest()
    whole.update(table_of(rows))
    for i in range(0, len(rows), 3):
        parts.update(table_of(rows[i : i + 3]))
    assert whole.hexdigest() == parts.hexdigest()
    changed = archive.ContentDigest()
    changed.update(table_of([*rows[:-1], (*rows[-1][:4], rows[-1][4] + 1e-12, rows[-1][5])]))
    assert changed.hexdigest() != whole.hexdigest()


def test_merge_keeps_one_row_per_key_in_canonical_order():
    rows = sample_rows(3)
    existing, fresh = table_of(rows[:8]), table_of([*rows[4:], (*rows[0][:4], 99.0, rows[0][5])])
    merged = retention.merge(existing, fresh)
    assert merged.num_rows == len(rows)
    assert list(
        zip(*(merged.column(c).to_pylist() for c in archive.COLUMNS), strict=True)
    ) == sorted(
        rows, key=lambda r: (r[1], r[2], r[3])
    )  # the archived value wins over a different one for the same key
    assert retention.merge(table_of([]), table_of([])).num_rows == 0


def test_plan_days_looks_only_past_each_tenants_progress():
    days = [date(2026, 3, d) for d in range(1, 11)]
    run_day = date(2026, 3, 10)
    tenants = [
        retention.TenantPolicy(1, "a", 3, "active"),  # cutoff 8 March
        retention.TenantPolicy(2, "b", 5, "active"),  # cutoff 6 March
    ]
    assert retention.plan_days(
        days, tenants, {1: date(2026, 3, 6), 2: date(2026, 3, 5)}, {}, run_day
    ) == [date(2026, 3, d) for d in (1, 2, 3, 4, 5, 7)]
    assert retention.plan_days(days, [], {}, {3: {date(2026, 2, 1)}}, run_day) == []
    assert retention.plan_days([], tenants, {}, {1: {date(2026, 2, 1)}}, run_day) == [
        date(2026, 2, 1)
    ]


def good_manifest(**changes) -> dict:
    data = json.loads(
        archive.Manifest(
            tenant_id=7,
            tenant_slug="acme",
            day=date(2026, 3, 1),
            rows=10,
            devices=2,
            min_ts=datetime(2026, 3, 1, 0, 5, tzinfo=UTC),
            max_ts=datetime(2026, 3, 1, 23, 5, tzinfo=UTC),
            bytes=100,
            sha256="a" * 64,
            content_sha256="b" * 64,
            created_at=datetime(2026, 3, 2, tzinfo=UTC),
        ).to_json()
    )
    data.update(changes)
    return data


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"format": 1, "format": 1}', "appears twice"),
        (json.dumps(good_manifest(format=2)), "format '2' is not 1"),
        (json.dumps(good_manifest(schema_version=9)), "schema_version 9"),
        (json.dumps(good_manifest(file="../../etc/passwd")), "file must be"),
        (json.dumps(good_manifest(columns={"ts": "string"})), "columns differ"),
        (json.dumps(good_manifest(tenant_slug="Acme Corp; DROP")), "tenant_slug"),
        (json.dumps(good_manifest(day="2026-02-30")), "day is not"),
        (json.dumps(good_manifest(sha256="A" * 64)), "sha256 is not"),
        (json.dumps(good_manifest(rows=True)), "rows is missing"),
        (json.dumps(good_manifest(rows=-1)), "rows is missing"),
        (json.dumps(good_manifest(devices=11)), "devices <= rows"),
        (json.dumps(good_manifest(min_ts="2026-03-01T00:05:00")), "time zone"),
        (json.dumps(good_manifest(max_ts="2026-03-02T00:00:00+00:00")), "inside the day"),
        (json.dumps(good_manifest()).replace('"bytes": 100', '"bytes": NaN'), "not a number"),
        ("[" * 100_000, "not valid JSON"),
    ],
)
def test_manifest_refuses_malformed_and_hostile_input(text, expected):
    with pytest.raises(archive.ArchiveError, match=expected):
        archive.Manifest.parse(text)


def test_a_manifest_must_lie_in_its_own_directory_and_be_a_plain_small_file(root, store):
    manifest = archive.Manifest.parse(json.dumps(good_manifest()))
    assert archive.Manifest.parse(manifest.to_json()) == manifest
    elsewhere = root / archive.manifest_path(8, date(2026, 3, 1))
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text(manifest.to_json())
    with pytest.raises(archive.ArchiveError, match="lies in the directory of tenant 8"):
        archive.load_manifest(store, 8, date(2026, 3, 1))
    elsewhere.write_bytes(b"\xff\xfe" * 10)
    with pytest.raises(archive.ArchiveError, match="not UTF-8"):
        archive.load_manifest(store, 8, date(2026, 3, 1))
    elsewhere.write_bytes(b" " * (archive.MANIFEST_MAX_BYTES + 1))
    with pytest.raises(archive.ArchiveError, match="larger than"):
        archive.load_manifest(store, 8, date(2026, 3, 1))
    elsewhere.unlink()
    target = root / "outside.json"
    target.write_text(manifest.to_json())
    elsewhere.symlink_to(target)
    with pytest.raises(archive.ArchiveError, match="symbolic link"):
        archive.load_manifest(store, 8, date(2026, 3, 1))
    assert archive.load_manifest(store, 9, date(2026, 3, 1)) is None


def test_archives_on_an_fsspec_file_system():
    store = archive.open_store("memory://iiot-test-archive")
    assert isinstance(store, archive.FsspecStore)
    rows = sample_rows(tenant=3)
    written = archive.write_archive(store, 3, "acme", date(2026, 3, 1), [table_of(rows)])
    back = archive.read_archive(store, written.manifest)
    assert back.content_sha256 == written.source_digest
    assert back.table.num_rows == len(rows)
    assert store.day_dirs(3) == [archive.day_dir(3, date(2026, 3, 1))]
    assert archive.load_manifest(store, 3, date(2026, 3, 1)) == written.manifest
    data = store.read_bytes(written.manifest.parquet)
    store.write_atomic(written.manifest.parquet, [data[:-10] + b"0123456789"])
    with pytest.raises(archive.CorruptArchive, match="corrupted"):
        archive.read_archive(store, written.manifest)
    store.fs.rm(store._base, recursive=True)


def test_store_errors_are_clear(tmp_path):
    with pytest.raises(archive.ArchiveError, match="archive-s3"):
        archive.open_store("nosuchscheme://bucket/prefix")
    local = archive.open_store(f"file://{tmp_path}")
    assert isinstance(local, archive.LocalStore)
    with pytest.raises(archive.ArchiveError, match="missing"):
        local.read_bytes("telemetry/none.parquet")
    with pytest.raises(archive.ArchiveError, match="no readings"):
        archive.write_archive(local, 1, "acme", date(2026, 3, 1), [table_of([])])
    assert not list(tmp_path.rglob("*.tmp"))
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(archive.ArchiveError, match="cannot write"):
        archive.open_store(blocked).open_temporary("telemetry/a.parquet")


def test_the_nightly_schedule_archives_the_day_that_ended():
    from iiot_orchestration.definitions import defs

    schedules = {s.name: s for s in defs.get_repository_def().schedule_defs}
    schedule = schedules["telemetry_archive_schedule"]
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("30 1 * * *", "UTC")
    # the schedule context is closed before the instance: left open, it would leave Dagster's
    # current definitions-state storage pointing at the disposed instance for later tests
    with (
        dg.instance_for_test() as instance,
        dg.build_schedule_context(
            instance=instance, scheduled_execution_time=datetime(2026, 11, 23, 1, 30, tzinfo=UTC)
        ) as context,
    ):
        [request] = schedule.evaluate_tick(context).run_requests
    assert request.partition_key == "2026-11-22"
    for name in ("telemetry_compression_schedule", "archive_checks_schedule"):
        assert schedules[name].cron_schedule in ("30 2 * * *", "0 4 * * 0")
    # compression too runs by default: in PostgreSQL mode the run has nothing to do
    for name in ("telemetry_archive_schedule", "telemetry_compression_schedule"):
        assert schedules[name].default_status == dg.DefaultScheduleStatus.RUNNING


def test_stray_entries_in_the_archive_tree_are_not_archives(root, store):
    tenant = root / "telemetry" / "tenant_id=5"
    for name in ("day=2026-02-30", "day=2026-3-01", "day=..", "notes"):
        (tenant / name).mkdir(parents=True)
    (tenant / "day=2026-03-02").write_text("a file, not a directory")
    (root / "telemetry" / "tenant_id=05" / "day=2026-03-03").mkdir(parents=True)
    (tenant / "day=2026-03-04").mkdir()
    assert store.day_dirs(5) == [archive.day_dir(5, date(2026, 3, 4))]
    assert store.day_dirs() == [archive.day_dir(5, date(2026, 3, 4))]
