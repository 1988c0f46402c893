import os
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from iiot_orchestration import migrate
from iiot_orchestration.migrate import MIGRATION_LOCK_KEY, MIGRATIONS_DIR, MigrationError
from iiot_orchestration.storage import TIMESCALE_MISSING, StorageError, storage_for

EXPECTED_TABLES = {
    "plans",
    "tenants",
    "tenant_plan_history",
    "metric_catalog",
    "devices",
    "device_metrics",
    "device_certificates",
    "telemetry",
    "dead_letters",
    "dirty_windows",
    "audit_log",
    "iiot_schema_migrations",
    "iiot_storage",
}


def quiet(_: str) -> None:
    pass


def copy_migrations(tmp_path: Path) -> Path:
    target = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, target)
    return target


def test_migrate_empty_database_needs_no_manual_step(empty_database_url, storage_mode):
    lines: list[str] = []
    applied = migrate.migrate(empty_database_url, "auto", echo=lines.append)
    assert [m.version for m in applied] == list(range(1, len(applied) + 1))
    assert len(applied) >= 5
    with psycopg.connect(empty_database_url) as conn:
        tables = {
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        assert tables >= EXPECTED_TABLES
        assert conn.execute("SELECT count(*) FROM iiot_schema_migrations").fetchone()[0] == len(
            applied
        )
        assert conn.execute("SELECT mode FROM iiot_storage").fetchone()[0] == storage_mode
        plans = dict(conn.execute("SELECT plan_id, hard_block FROM plans").fetchall())
        assert plans == {"starter": True, "pro": True, "enterprise": False}
    assert lines[-1].startswith("Database is at ")


def test_second_run_is_a_no_op_that_says_so(database_url):
    lines: list[str] = []
    assert migrate.migrate(database_url, "auto", echo=lines.append) == []
    # roles are cluster-wide: another test's app_rw login may draw a warning meanwhile
    lines = [line for line in lines if not line.startswith("Warning:")]
    assert lines == [lines[0]]
    assert lines[0].startswith("Nothing to migrate")


def test_status_lists_pending_then_applied(empty_database_url, storage_mode):
    before = migrate.status(empty_database_url)
    assert before.applied == []
    assert before.storage_mode is None
    assert [m.version for m in before.pending] == list(range(1, len(before.pending) + 1))
    migrate.migrate(empty_database_url, echo=quiet)
    after = migrate.status(empty_database_url)
    assert after.pending == []
    assert after.current_version == len(before.pending)
    assert after.storage_mode == storage_mode


def test_changed_applied_migration_is_refused_by_name(database_url, tmp_path):
    directory = copy_migrations(tmp_path)
    edited = directory / "0002_devices.sql"
    edited.write_text(edited.read_text() + "\n-- sneaky edit\n")
    with pytest.raises(MigrationError, match=r"0002_devices\.sql was changed after it was applied"):
        migrate.migrate(database_url, echo=quiet, directory=directory)
    with pytest.raises(MigrationError, match=r"0002_devices\.sql"):
        migrate.status(database_url, directory=directory)


def test_database_newer_than_code_is_refused(database_url, tmp_path):
    directory = copy_migrations(tmp_path)
    newest = sorted(directory.glob("*.sql"))[-1].name[:4]
    for variant in directory.glob(f"{newest}_*.sql"):  # both storage modes' files, if any
        variant.unlink()
    with pytest.raises(MigrationError, match="newer than the code"):
        migrate.migrate(database_url, echo=quiet, directory=directory)


def test_new_migration_is_applied_once(database_url, tmp_path):
    directory = copy_migrations(tmp_path)
    number = len(migrate.discover(directory)) + 1
    (directory / f"{number:04d}_extra.sql").write_text("CREATE TABLE extra (id int);")
    applied = migrate.migrate(database_url, echo=quiet, directory=directory)
    assert [m.label for m in applied] == [f"{number:04d}_extra"]
    assert migrate.migrate(database_url, echo=quiet, directory=directory) == []


def test_failing_migration_rolls_back_and_is_not_recorded(database_url, tmp_path):
    directory = copy_migrations(tmp_path)
    number = len(migrate.discover(directory)) + 1
    (directory / f"{number:04d}_broken.sql").write_text(
        "CREATE TABLE half_done (id int);\nSELECT * FROM no_such_table;"
    )
    with pytest.raises(MigrationError, match=f"{number:04d}_broken.sql failed and was rolled back"):
        migrate.migrate(database_url, echo=quiet, directory=directory)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT to_regclass('half_done')").fetchone()[0] is None
        recorded = conn.execute("SELECT max(version) FROM iiot_schema_migrations").fetchone()[0]
        assert recorded == number - 1


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["0001_a.sql", "0001_b.sql"], "two migrations are numbered 0001"),
        (["0001_a.sql", "0003_c.sql"], "without gaps"),
        (["0001_a.sql", "1_bad name.sql"], "are named NNNN_name.sql"),
        (["0001_a.postgres.sql"], "needs both a .postgres.sql and a .timescale.sql"),
        (["0001_a.sql", "0001_a.postgres.sql"], "two migrations are numbered 0001"),
    ],
)
def test_malformed_migration_directory_is_refused(tmp_path, files, message):
    for name in files:
        (tmp_path / name).write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=message):
        migrate.discover(tmp_path)


def test_variants_pick_the_storage_mode():
    postgres = [m.filename for m in migrate.plan_for("postgres")]
    timescale = [m.filename for m in migrate.plan_for("timescale")]
    assert "0003_telemetry.postgres.sql" in postgres
    assert "0003_telemetry.timescale.sql" in timescale
    assert len(postgres) == len(timescale)


def _waiting_for_migration_lock(conn: psycopg.Connection) -> int:
    return conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = %s",
        (MIGRATION_LOCK_KEY & 0xFFFFFFFF,),
    ).fetchone()[0]


def test_concurrent_migrate_from_two_processes_applies_each_file_once(empty_database_url):
    env = {**os.environ, "IIOT_DATABASE_URL": empty_database_url}
    command = [sys.executable, "-m", "iiot_orchestration.cli", "db", "migrate"]
    with psycopg.connect(empty_database_url, autocommit=True) as holder:
        # hold the lock so that both processes are certainly waiting at the same time
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        processes = [
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            for _ in range(2)
        ]
        deadline = time.monotonic() + 60
        while _waiting_for_migration_lock(holder) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _waiting_for_migration_lock(holder) == 2
        holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
        outputs = [p.communicate(timeout=120)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert all("waiting for it to finish" in out for out in outputs)
    appliers = [out for out in outputs if "Applied 0001_plans_and_tenants.sql" in out]
    assert len(appliers) == 1
    assert sum("Nothing to migrate" in out for out in outputs) == 1
    with psycopg.connect(empty_database_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM iiot_schema_migrations")]
        assert len(versions) == len(set(versions)) == len(migrate.discover())


def test_timescale_requested_without_extension_is_a_clear_error(empty_database_url):
    with psycopg.connect(empty_database_url) as conn:
        has_timescale = conn.execute(
            "SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'"
        ).fetchone()
        preload = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()[0]
    if has_timescale or "timescaledb" in preload:
        pytest.skip("this server has timescaledb, so the error path cannot be shown here")
    with pytest.raises(StorageError, match=f"IIOT_STORAGE=timescale, but the {TIMESCALE_MISSING}"):
        migrate.migrate(empty_database_url, "timescale", echo=quiet)
    with psycopg.connect(empty_database_url) as conn:
        assert conn.execute("SELECT to_regclass('telemetry')").fetchone()[0] is None


def test_storage_mode_cannot_change_in_place(database_url, storage_mode):
    other = "timescale" if storage_mode == "postgres" else "postgres"
    with pytest.raises(StorageError, match=f"set up in {storage_mode} mode"):
        migrate.migrate(database_url, other, echo=quiet)


def test_partitions_exist_ahead_and_reject_far_future_rows(conn, postgres_mode):
    storage = storage_for(conn)
    today = datetime.now(UTC).date()
    days = storage.partition_days(conn)
    assert today in days
    assert today + timedelta(days=7) in days
    assert storage.ensure_partitions(conn, today, today + timedelta(days=7)) == 0
    assert storage.ensure_partitions(conn, today, today + timedelta(days=9)) == 2
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
            " VALUES (1, 1, 'energy_kwh', now() + interval '400 days', 1)"
        )


def test_partition_function_refuses_backwards_ranges(conn):
    today = datetime.now(UTC).date()
    with pytest.raises(psycopg.errors.RaiseException, match="before it starts"):
        storage_for(conn).ensure_partitions(conn, today, today - timedelta(days=1))


def test_partition_function_refuses_huge_ranges(conn, postgres_mode):
    today = datetime.now(UTC).date()
    with pytest.raises(psycopg.errors.RaiseException, match="refusing to create"):
        storage_for(conn).ensure_partitions(conn, today, today + timedelta(days=5000))


def test_duplicate_reading_is_a_no_op(conn):
    insert = (
        "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
        " VALUES (1, 1, 'energy_kwh', '2026-11-22T10:00:00Z', %s) ON CONFLICT DO NOTHING"
    )
    storage_for(conn).ensure_partitions(
        conn, datetime(2026, 11, 22).date(), datetime(2026, 11, 22).date()
    )
    assert conn.execute(insert, (1.5,)).rowcount == 1
    assert conn.execute(insert, (1.5,)).rowcount == 0
    assert conn.execute("SELECT count(*) FROM telemetry").fetchone()[0] == 1


@pytest.mark.timescale
def test_timescale_mode_uses_a_hypertable_with_daily_chunks(timescale_server_url):
    from tests.conftest import create_database, drop_database

    name = f"iiot_ts_{os.getpid()}_{int(time.time())}"
    url = create_database(timescale_server_url, name)
    try:
        migrate.migrate(url, "timescale", echo=quiet)
        with psycopg.connect(url) as conn:
            storage = storage_for(conn)
            assert storage.mode == "timescale"
            assert storage.chunk_interval(conn) == "1 day"
            conn.execute(
                "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
                " VALUES (1, 1, 'energy_kwh', '2026-01-05T10:00:00Z', 1)"
            )
            assert datetime(2026, 1, 5).date() in storage.partition_days(conn)
        assert migrate.migrate(url, "auto", echo=quiet) == []
    finally:
        drop_database(timescale_server_url, name)


def test_0022_keeps_every_reading_under_a_key_with_the_tenant(
    empty_database_url, storage_mode, tmp_path
):
    """Upgrading a database with readings (compressed by hand in TimescaleDB mode, through the
    function 0016 offered) keys them by tenant without losing or changing one."""
    before = copy_migrations(tmp_path)
    for path in before.glob("*.sql"):
        if int(path.name[:4]) >= 22:
            path.unlink()
    migrate.migrate(empty_database_url, "auto", echo=quiet, directory=before)
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tenants (slug, name, plan_id)"
            " VALUES ('old-a', 'A', 'pro'), ('old-b', 'B', 'pro')"
        )
        conn.execute(
            "INSERT INTO devices (tenant_id, mac, name, meter_kind)"
            " SELECT tenant_id, ('02:00:00:00:00:0' || tenant_id)::macaddr, 'm', 'energy'"
            "   FROM tenants"
        )
        storage_for(conn).ensure_partitions(
            conn, datetime(2026, 11, 1).date(), datetime(2026, 11, 2).date()
        )
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
            " SELECT d.tenant_id, d.device_id, 'energy_kwh',"
            "        timestamptz '2026-11-01 00:00+00' + g * interval '1 minute', g * 0.01"
            "   FROM devices d, generate_series(0, 2 * 1440 - 1) g"
        )
        if storage_mode == "timescale":
            conn.execute("SELECT iiot_enable_telemetry_compression()")
            conn.execute("SELECT compress_chunk(c) FROM show_chunks('telemetry') c")
        expected = conn.execute(
            "SELECT tenant_id, device_id, metric, ts, value FROM telemetry ORDER BY 1, 2, 3, 4"
        ).fetchall()
    assert len(expected) == 2 * 2 * 1440

    applied = migrate.migrate(empty_database_url, "auto", echo=quiet)
    assert applied[0].version == 22
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        assert (
            conn.execute(
                "SELECT tenant_id, device_id, metric, ts, value FROM telemetry ORDER BY 1, 2, 3, 4"
            ).fetchall()
            == expected
        )
        key = conn.execute(
            "SELECT array_agg(a.attname ORDER BY k.n)"
            "  FROM pg_constraint c, unnest(c.conkey) WITH ORDINALITY k(attnum, n)"
            "  JOIN pg_attribute a ON a.attrelid = 'telemetry'::regclass AND a.attnum = k.attnum"
            " WHERE c.conrelid = 'telemetry'::regclass AND c.contype = 'p'"
        ).fetchone()[0]
        assert key == ["device_id", "metric", "ts", "tenant_id"]
        assert not conn.execute(
            "SELECT relrowsecurity FROM pg_class WHERE oid = 'telemetry'::regclass"
        ).fetchone()[0]
        tenant_a, device_a = conn.execute(
            "SELECT tenant_id, device_id FROM devices ORDER BY tenant_id LIMIT 1"
        ).fetchone()
        redelivered = conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
            " VALUES (%s, %s, 'energy_kwh', '2026-11-01 00:05+00', 0.05) ON CONFLICT DO NOTHING",
            (tenant_a, device_a),
        ).rowcount
        assert redelivered == 0
        if storage_mode == "timescale":
            (enabled,) = conn.execute(
                "SELECT compression_enabled FROM timescaledb_information.hypertables"
                " WHERE hypertable_name = 'telemetry'"
            ).fetchone()
            assert enabled
            compressed = conn.execute(
                "SELECT count(compress_chunk(c, if_not_compressed => true))"
                "  FROM show_chunks('telemetry') c"
            ).fetchone()[0]
            assert compressed == 2
            assert (
                conn.execute(
                    "SELECT tenant_id, device_id, metric, ts, value FROM telemetry"
                    " ORDER BY 1, 2, 3, 4"
                ).fetchall()
                == expected
            )


def test_migrate_warns_about_logins_that_can_act_as_any_tenant(database_url):
    """What docs/security.md used to recommend (an analyst login IN ROLE app_rw) can choose its
    tenant: migrate names such logins until they are replaced by tenant logins."""
    login = f"analyst_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE app_rw").format(sql.Identifier(login)))
        try:
            lines: list[str] = []
            migrate.migrate(database_url, "auto", echo=lines.append)
            assert any(login in line and "any tenant" in line for line in lines), lines
            conn.execute(sql.SQL("REVOKE app_rw FROM {}").format(sql.Identifier(login)))
            lines.clear()
            migrate.migrate(database_url, "auto", echo=lines.append)
            assert not any(login in line for line in lines), lines
        finally:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(login)))
