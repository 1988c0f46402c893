"""`iiot backup ...` against the real PostgreSQL: run, list, verify, drill, restore, status and
drills, with malformed, hostile and repeated input."""

import json
import uuid

import psycopg
import pytest
from click.testing import CliRunner
from psycopg.conninfo import conninfo_to_dict

from iiot_orchestration import backups, registry
from iiot_orchestration.cli import main
from iiot_orchestration.settings import to_url
from tests.conftest import database_url_for, drop_database


@pytest.fixture
def iiot(database_url, tmp_path, monkeypatch):
    """Run `iiot backup ...` against the test's database, backups under tmp_path."""
    for name in ("IIOT_BACKUP_DATABASE_URL", "IIOT_ALERT_WEBHOOK_URL", "IIOT_TELEGRAM_BOT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IIOT_DATABASE_URL", database_url)
    monkeypatch.setenv("IIOT_BACKUP_ROOT", str(tmp_path / "backups"))

    def invoke(*args):
        return CliRunner().invoke(main, ["backup", *args])

    invoke.root = tmp_path / "backups"
    return invoke


@pytest.fixture
def new_name(pg_server):
    name = f"iiot_restore_{uuid.uuid4().hex[:10]}"
    yield name
    drop_database(pg_server, name)


def test_backup_has_help():
    result = CliRunner().invoke(main, ["backup", "--help"])
    assert result.exit_code == 0
    for command in ("run", "list", "verify", "drill", "restore", "status", "drills"):
        assert command in result.output


def test_run_list_verify_drill_status_and_drills(iiot, conn):
    registry.create_tenant(conn, slug="acme", name="Acme", plan="pro", timezone="UTC")
    empty = iiot("list")
    assert empty.exit_code == 0
    assert "No backups of" in empty.output
    assert iiot("status").exit_code == 1  # no backup, no drill yet

    run = iiot("run", "--json")
    assert run.exit_code == 0, run.output
    [made] = json.loads(run.output)
    version, name = conn.execute(
        "SELECT version, name FROM iiot_schema_migrations ORDER BY version DESC LIMIT 1"
    ).fetchone()
    assert made["schema"] == f"{version:04d}_{name}"
    assert len(made["sha256"]) == 64

    listed = iiot("list", "--json")
    assert [r["backup_id"] for r in json.loads(listed.output)] == [made["backup_id"]]
    table = iiot("list")
    assert made["backup_id"] in table.output
    assert "1 backups of" in table.output

    verified = iiot("verify", made["backup_id"])
    assert verified.exit_code == 0
    assert "is intact: sha256 matches" in verified.output

    drilled = iiot("drill", "--json")
    assert drilled.exit_code == 0, drilled.output
    [outcome] = json.loads(drilled.output)
    assert outcome["status"] == "passed"
    assert outcome["backup_id"] == made["backup_id"]
    assert outcome["rto_target_seconds"] == 240 * 60  # pro

    status = iiot("status")
    assert status.exit_code == 0, status.output
    assert status.output.count("ok  ") == 3
    history = iiot("drills", "--json")
    assert [d["status"] for d in json.loads(history.output)] == ["passed"]
    assert "passed" in iiot("list").output  # the backup's last drill


def test_restore_creates_a_new_database_and_never_overwrites(iiot, conn, pg_server, new_name):
    registry.create_tenant(conn, slug="acme", name="Acme", plan="pro", timezone="UTC")
    assert iiot("run").exit_code == 0
    first = iiot("restore", "latest", "--into", new_name)
    assert first.exit_code == 0, first.output
    assert f"into {new_name}" in first.output
    with psycopg.connect(database_url_for(pg_server, new_name)) as copy:
        assert copy.execute("SELECT slug FROM tenants").fetchall() == [("acme",)]
    again = iiot("restore", "latest", "--into", new_name)
    assert again.exit_code == 1
    assert "already exists: a restore never overwrites" in again.output
    # the source database itself is refused too
    same = iiot("restore", "latest", "--into", conn.info.dbname)
    assert same.exit_code == 1
    assert "already exists" in same.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["verify", "../../etc/passwd"], "is not a backup id"),
        (["verify", "20261101T030000Z"], "no backup 20261101T030000Z of database"),
        (["drill", "--backup", "20261101T030000Z;rm"], "is not a backup id"),
        (["drill", "--backup", "20261101T030000Z"], "no backup 20261101T030000Z"),
        (["restore", "x" * 300, "--into", "copy"], "is not a backup id"),
        (["restore", "latest", "--into", "Robert'); DROP TABLE tenants;--"], "not a database name"),
        (["restore", "latest", "--into", "iiot_drill_mine"], "reserved for restore drills"),
    ],
)
def test_bad_input_is_one_clear_line_and_records_nothing(iiot, conn, args, message):
    result = iiot(*args)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert conn.execute("SELECT count(*) FROM backup_drills").fetchone() == (0,)


@pytest.mark.parametrize(
    "args",
    [["drill", "--jobs", "0"], ["drill", "--jobs", "many"], ["drills", "--limit", "-3"]],
)
def test_out_of_range_options_are_usage_errors(iiot, args):
    result = iiot(*args)
    assert result.exit_code == 2
    assert "Invalid value" in result.output


def test_failed_drill_exits_1_with_the_reason(iiot, conn):
    assert iiot("run").exit_code == 0
    [backup], _ = backups.list_backups(iiot.root, conn.info.dbname)
    backup.dump_path.write_bytes(b"not the dump")
    result = iiot("drill")
    assert result.exit_code == 1
    assert "FAILED" in result.output
    assert "is corrupted" in result.output
    status = iiot("status")
    assert status.exit_code == 1
    assert "FAIL drill_recent_and_passed" in status.output


def test_list_works_while_the_database_is_down(iiot, conn, monkeypatch, database_url):
    assert iiot("run").exit_code == 0
    params = conninfo_to_dict(database_url)
    params.update(host="127.0.0.1", port="1")  # nothing listens there
    monkeypatch.setenv("IIOT_DATABASE_URL", to_url(params))
    result = iiot("list")
    assert result.exit_code == 0
    assert "drill outcomes unknown" in result.output
    assert "1 backups of" in result.output


def test_bad_backup_settings_are_named(iiot, monkeypatch):
    monkeypatch.setenv("IIOT_BACKUP_KEEP_DAILY", "0")
    result = iiot("list")
    assert result.exit_code == 1
    assert "IIOT_BACKUP_KEEP_DAILY='0' is invalid" in result.output
