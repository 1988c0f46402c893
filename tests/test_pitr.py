"""Point-in-time recovery with pgBackRest (iiot_orchestration/pitr.py, `iiot backup pitr`).

Against a throwaway cluster the module makes (initdb into a directory of its own, on a free
port, run as the postgres OS user when the tests run as root): setup with a restart between
its two runs, full and incremental backups, a restore to the instant before a table was dropped,
drills (one while rows are written all along), a failing drill, the status, the Dagster assets
and checks. The recovery point, info parsing and input checks need no cluster."""

from __future__ import annotations

import getpass
import json
import os
import pwd
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from click.testing import CliRunner, Result

from assets.backups import (
    NOT_CONFIGURED,
    BackupResource,
    pitr_backup,
    pitr_drill_recent_and_passed,
    pitr_drill_within_targets,
    pitr_within_rpo,
)
from iiot_orchestration import backups, migrate, pitr, registry
from iiot_orchestration.cli import main
from iiot_orchestration.services import free_port
from iiot_orchestration.settings import SettingsError, load_settings

RPO_HOURS = (("starter", 48), ("pro", 26), ("enterprise", 26))
RTO_MINUTES = (("starter", 480), ("pro", 240), ("enterprise", 60))
PITR_CHECKS = [pitr_within_rpo, pitr_drill_recent_and_passed, pitr_drill_within_targets]
MB16 = 16 * 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Without a cluster


def state(**changes) -> pitr.ArchiveState:
    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    base = pitr.ArchiveState(
        archive_mode="on",
        last_archived_wal="000000010000000000000007",
        last_archived_time=now - timedelta(seconds=40),
        last_failed_wal=None,
        last_failed_time=None,
        insert_lsn=8 * MB16 + 5000,  # some bytes into segment 8
        segment_size=MB16,
        now=now,
    )
    return pitr.ArchiveState(**{**base.__dict__, **changes})


def test_recovery_point_is_the_newest_archived_segment_while_writing():
    point = pitr.recovery_point(state())
    assert point.problem is None
    assert point.rpo == timedelta(seconds=40)


def test_recovery_point_is_now_when_nothing_was_written_since():
    point = pitr.recovery_point(state(insert_lsn=8 * MB16 + 40))
    assert (point.problem, point.rpo) == (None, timedelta(0))


def test_recovery_point_is_unknown_when_segments_wait_or_archiving_fails():
    now = state().now
    behind = pitr.recovery_point(
        state(
            insert_lsn=11 * MB16 + 100,
            last_failed_wal="000000010000000000000008",
            last_failed_time=now - timedelta(seconds=5),
        )
    )
    assert behind.rpo is None
    assert behind.waiting_segments == 3
    assert "3 closed WAL segments wait to be archived" in behind.problem
    assert "archiving 000000010000000000000008 failed at" in behind.problem
    assert "archive_mode is off" in pitr.recovery_point(state(archive_mode="off")).problem
    assert "no WAL segment" in pitr.recovery_point(state(last_archived_wal=None)).problem
    # a backup history file names the segment it belongs to; the repository knows better
    history = state(last_archived_wal="000000010000000000000006.00000028.backup")
    assert pitr.recovery_point(history).waiting_segments == 1
    repo = pitr.RepoInfo(0, "ok", [], None, "000000010000000000000007", "15")
    point = pitr.recovery_point(history, repo)
    assert (point.problem, point.newest_wal) == (None, "000000010000000000000007")


def test_recovery_point_needs_the_repository_to_hold_what_the_server_archived():
    repo = pitr.RepoInfo(0, "ok", [], "000000010000000000000001", "000000010000000000000005", "15")
    point = pitr.recovery_point(state(), repo)
    assert point.rpo is None
    assert "archive_command does not push to this repository" in point.problem
    ok = pitr.RepoInfo(0, "ok", [], None, "000000010000000000000007", "15")
    assert pitr.recovery_point(state(), ok).problem is None


INFO = [
    {
        "name": "iiot",
        "status": {"code": 0, "message": "ok"},
        "db": [{"id": 1, "version": "15"}],
        "archive": [
            {"id": "15-1", "min": "000000010000000000000001", "max": "0000000100000000000000A3"}
        ],
        "backup": [
            {
                "label": "20261206-040000F_20261207-040000I",
                "type": "incr",
                "timestamp": {"start": 1796616000, "stop": 1796616030},
                "info": {"size": 500, "repository": {"delta": 100}},
                "lsn": {"start": "0/A0000028", "stop": "0/A1000050"},
                "archive": {
                    "start": "0000000100000000000000A0",
                    "stop": "0000000100000000000000A1",
                },
                "prior": "20261206-040000F",
            },
            {
                "label": "20261206-040000F",
                "type": "full",
                "timestamp": {"start": 1796529600, "stop": 1796529700},
                "info": {"size": 500, "repository": {"delta": 300}},
                "lsn": {"start": "0/9000028", "stop": "0/9000100"},
                "archive": {
                    "start": "000000010000000000000009",
                    "stop": "000000010000000000000009",
                },
            },
        ],
    }
]


def test_info_is_parsed_oldest_first_and_backups_chosen_by_position_and_time():
    info = pitr.parse_info(json.dumps(INFO), "iiot")
    assert [b.label for b in info.backups] == [
        "20261206-040000F",
        "20261206-040000F_20261207-040000I",
    ]
    assert (info.ok, info.pg_version, info.archive_max) == (True, "15", "0000000100000000000000A3")
    full, incr = info.backups
    assert full.lsn_stop == 0x9000100
    assert info.newest_before(lsn=0xA1000050).label == incr.label
    assert info.newest_before(lsn=0xA0000000).label == full.label
    assert info.newest_before(at=incr.finished_at - timedelta(seconds=1)).label == full.label
    with pytest.raises(pitr.PitrError, match="no pgBackRest backup finished before"):
        info.newest_before(at=full.finished_at - timedelta(days=1))
    missing = pitr.parse_info("[]", "iiot")
    assert not missing.ok
    assert missing.newest is None
    with pytest.raises(pitr.PitrError, match="gave no JSON"):
        pitr.parse_info("ERROR: [055]", "iiot")


def test_auto_takes_a_full_backup_weekly():
    info = pitr.parse_info(json.dumps(INFO), "iiot")
    full = info.newest_full()
    assert pitr.choose_backup_type(info, full.finished_at + timedelta(days=6)) == "incr"
    assert pitr.choose_backup_type(info, full.finished_at + timedelta(days=7)) == "full"
    assert pitr.choose_backup_type(pitr.parse_info("[]", "iiot"), full.finished_at) == "full"


def test_restore_targets_become_pgbackrest_options():
    at = pitr.RestoreTarget.at(datetime(2026, 12, 6, 11, 0, tzinfo=UTC) + timedelta(hours=-3))
    assert at.options() == [
        "--type=time",
        "--target=2026-12-06 08:00:00+00:00",
        "--target-action=promote",
    ]
    assert pitr.RestoreTarget.before_lsn("0/A1000050").options()[-1] == "--target-exclusive"
    assert pitr.RestoreTarget("latest").options() == ["--type=default"]
    with pytest.raises(pitr.PitrError, match="needs a time zone"):
        pitr.RestoreTarget.at(datetime(2026, 12, 6, 11, 0))


def test_pitr_settings_default_and_parse():
    settings = load_settings({"IIOT_DATA_DIR": "/srv/iiot"})
    assert pitr.PitrConfig.from_settings(settings) is None
    assert settings.pitr_repo == Path("/srv/iiot/pgbackrest/repo")
    assert settings.pitr_config == Path("/srv/iiot/pgbackrest/pgbackrest.conf")
    assert settings.pitr_scratch_dir == Path("/srv/iiot/pitr-scratch")
    config = pitr.PitrConfig.from_settings(
        load_settings({"IIOT_PITR_STANZA": "main", "IIOT_PITR_RPO_MINUTES": "3"})
    )
    assert (config.stanza, config.rpo, config.archive_timeout) == ("main", timedelta(minutes=3), 60)
    for name, value, expected in (
        ("IIOT_PITR_STANZA", "main; rm -rf /", "stanza name: letters, digits"),
        ("IIOT_PITR_OS_USER", "Root User", "an operating-system user name"),
        ("IIOT_PITR_RPO_MINUTES", "0", "1 to 1440"),
        ("IIOT_PITR_ARCHIVE_TIMEOUT_SECONDS", "5", "15 to 3600"),
        ("IIOT_PITR_RETENTION_FULL", "0", "1 to 100"),
    ):
        with pytest.raises(SettingsError, match=f"{name}=.*{expected}"):
            load_settings({name: value})


@pytest.fixture
def unconfigured(monkeypatch):
    monkeypatch.setenv("IIOT_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/iiot")
    monkeypatch.delenv("IIOT_PITR_STANZA", raising=False)
    monkeypatch.delenv("IIOT_BACKUP_DATABASE_URL", raising=False)

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(main, ["backup", "pitr", *args])

    return invoke


def test_pitr_commands_say_when_pitr_is_not_configured(unconfigured):
    help_text = CliRunner().invoke(main, ["backup", "pitr", "--help"]).output
    for command in ("setup", "backup", "status", "restore", "drill"):
        assert command in help_text
    result = unconfigured("status")
    assert result.exit_code == 1
    assert "IIOT_PITR_STANZA is not set" in result.output


@pytest.mark.parametrize(
    ("to", "message"),
    [
        ("yesterday", "is not a time"),
        ("2026-12-06 08:00:00", "give the time zone too"),
        ("2999-01-01T00:00:00Z", "is in the future"),
    ],
)
def test_restore_refuses_a_bad_instant_before_anything_runs(unconfigured, monkeypatch, to, message):
    monkeypatch.setenv("IIOT_PITR_STANZA", "iiot")
    result = unconfigured("restore", "--to", to, "--into", "/nonexistent/x", "--port", "6543")
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# A throwaway cluster


@dataclass
class Lab:
    home: Path
    os_user: str
    bindir: Path
    source: pitr.LocalCluster
    server_url: str
    url: str
    env: dict[str, str | None]
    outputs: dict[str, str] = field(default_factory=dict)

    def iiot(self, *args: str, **env: str | None) -> Result:
        return CliRunner().invoke(main, ["backup", *args], env={**self.env, **env})

    def settings(self, **env: str | None):
        values = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
        values.update({k: v for k, v in {**self.env, **env}.items() if v is not None})
        return load_settings(values)

    def config(self, **env: str | None) -> pitr.PitrConfig:
        return pitr.require_config(self.settings(**env))

    def sql(self, query: str, params: tuple = (), url: str | None = None) -> list[tuple]:
        with psycopg.connect(url or self.url, autocommit=True) as conn:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description else []

    def archive(self) -> None:
        """Close the current WAL segment and wait until the repository has it."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            pitr.archive_through(conn, "test", timedelta(minutes=2))


def _requirements() -> tuple[Path, str]:
    if shutil.which("pgbackrest") is None:
        pytest.skip("pgbackrest is not installed (Debian package pgbackrest)")
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        pytest.skip("initdb is not installed (Debian package postgresql-15)")
    if os.geteuid() != 0:
        return found[-1].parent, getpass.getuser()
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root without a postgres OS user to run PostgreSQL as")
    if shutil.which("runuser") is None:
        pytest.skip("running as root without runuser (util-linux) to run PostgreSQL as postgres")
    return found[-1].parent, "postgres"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """A migrated database in a cluster of its own, archiving into a pgBackRest repository
    set up by `iiot backup pitr setup` (run twice around the restart it asks for), with a full
    backup. Everything lives in a directory under /tmp owned by the cluster's OS user: pytest's
    tmp_path is private to root, and PostgreSQL runs as postgres."""
    bindir, os_user = _requirements()
    home = Path(tempfile.mkdtemp(prefix="iiot-pitr-test-"))
    pitr.make_dir(home, os_user, 0o755, adopt=True)
    port = free_port()
    source = pitr.init_cluster(
        home / "source", bindir=bindir, os_user=os_user, port=port, socket_dir=home
    )
    try:
        source.start(timeout=120)
        server_url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE iiot_pitr")
        url = f"postgresql://postgres@127.0.0.1:{port}/iiot_pitr"
        migrate.migrate(url, "auto", echo=lambda _: None)
        env = {
            "IIOT_DATABASE_URL": url,
            "IIOT_BACKUP_DATABASE_URL": None,
            "IIOT_DATA_DIR": str(home / "var"),
            "IIOT_PITR_STANZA": "iiot",
            "IIOT_PITR_REPO": str(home / "repo"),
            "IIOT_PITR_CONFIG": str(home / "pgbackrest" / "pgbackrest.conf"),
            "IIOT_PITR_SCRATCH_DIR": str(home / "scratch"),
            "IIOT_PITR_OS_USER": os_user,
            "IIOT_PITR_PG_BINDIR": str(bindir),
            "IIOT_ALERT_WEBHOOK_URL": None,
            "IIOT_TELEGRAM_BOT_TOKEN": None,
        }
        found = Lab(home, os_user, bindir, source, server_url, url, env)
        first = found.iiot("pitr", "setup", "--apply")
        assert first.exit_code == 0, first.output
        source.stop()
        source.start(timeout=120)
        second = found.iiot("pitr", "setup")
        assert second.exit_code == 0, second.output
        full = found.iiot("pitr", "backup", "--type", "full", "--json")
        assert full.exit_code == 0, full.output
        found.outputs.update(setup=first.output, again=second.output, full=full.output)
        yield found
    finally:
        source.stop("immediate")
        shutil.rmtree(home, ignore_errors=True)


def test_setup_writes_the_stanza_and_archives_after_the_restart(lab):
    assert (
        "Set with ALTER SYSTEM: archive_mode, archive_command, archive_timeout"
        in (lab.outputs["setup"])
    )
    assert "Restart PostgreSQL for archive_mode" in lab.outputs["setup"]
    assert "Stanza iiot is ready: WAL reaches the repository" in lab.outputs["again"]
    assert "Unchanged:" in lab.outputs["again"]  # the second run rewrote nothing
    conf = Path(lab.env["IIOT_PITR_CONFIG"]).read_text()
    assert "[iiot]" in conf
    assert f"pg1-path={lab.source.data}" in conf
    assert f"pg1-port={lab.source.port}" in conf
    settings = dict(
        lab.sql(
            "SELECT name, setting FROM pg_settings"
            " WHERE name IN ('archive_mode', 'archive_command', 'archive_timeout')"
        )
    )
    assert settings["archive_mode"] == "on"
    assert settings["archive_timeout"] == "60"
    assert settings["archive_command"].endswith("--stanza=iiot archive-push %p")
    [full] = json.loads(lab.outputs["full"])
    assert full["type"] == "full"
    assert full["bytes"] > 0


def test_restore_to_the_instant_before_a_table_was_dropped(lab):
    lab.sql("CREATE TABLE probe (n integer PRIMARY KEY, note text NOT NULL)")
    lab.sql("INSERT INTO probe SELECT n, 'row ' || n FROM generate_series(1, 1000) n")
    lab.archive()
    [(instant,)] = lab.sql("SELECT clock_timestamp()")
    lab.sql("DROP TABLE probe")
    lab.archive()  # the drop's commit is past the instant: recovery stops before it
    assert lab.sql("SELECT to_regclass('probe')") == [(None,)]

    into = lab.home / "restored"
    port = free_port()
    result = lab.iiot(
        "pitr", "restore", "--to", instant.isoformat(), "--into", str(into), "--port", str(port),
        "--listen", "",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    restored = pitr.LocalCluster(
        into, port, into, lab.bindir, lab.os_user, into.parent / "restored.log"
    )
    try:
        assert "recovery stopping before commit of transaction" in result.output
        assert "database iiot_pitr: schema 00" in result.output
        copy = restored.url("iiot_pitr", "postgres")
        assert lab.sql("SELECT count(*), min(note), max(n) FROM probe", url=copy) == [
            (1000, "row 1", 1000)
        ]
        assert lab.sql("SELECT pg_is_in_recovery(), current_setting('archive_mode')", url=copy) == [
            (False, "off")
        ]
        again = lab.iiot(
            "pitr", "restore", "--to", instant.isoformat(), "--into", str(into),
            "--port", str(free_port()),
        )  # fmt: skip
        assert again.exit_code == 1
        assert "exists and is not empty: a restore never overwrites" in again.output
        busy = lab.iiot(
            "pitr", "restore", "--to", "latest", "--into", str(lab.home / "other"),
            "--port", str(lab.source.port),
        )  # fmt: skip
        assert busy.exit_code == 1
        assert f"port {lab.source.port} is in use" in busy.output
        assert not (lab.home / "other").exists()
    finally:
        restored.stop("immediate")
    before = lab.iiot(
        "pitr", "restore", "--to", "2020-01-01T00:00:00Z", "--into", str(lab.home / "early"),
        "--port", str(free_port()),
    )  # fmt: skip
    assert before.exit_code == 1
    assert "no pgBackRest backup finished before 2020-01-01" in before.output


@pytest.fixture(scope="module")
def drilled(lab) -> pitr.PitrDrill:
    """A drill while a writer commits a row every 10 milliseconds: the restored copy must match
    the snapshot exactly all the same."""
    with psycopg.connect(lab.url, autocommit=True) as conn:
        registry.create_tenant(conn, slug="acme", name="Acme", plan="pro", timezone="UTC")
    lab.sql(
        "CREATE TABLE ticks (n bigserial PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())"
    )
    stop = threading.Event()
    written = []

    def writer() -> None:
        with psycopg.connect(lab.url, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO ticks DEFAULT VALUES")
                written.append(1)
                time.sleep(0.01)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        drill = pitr.run_drill(lab.url, lab.config(), rpo_hours=RPO_HOURS, rto_minutes=RTO_MINUTES)
    finally:
        stop.set()
        thread.join(10)
    assert len(written) > 20
    return drill


def test_a_drill_restores_the_instant_exactly_while_rows_are_written(lab, drilled):
    r = drilled.result
    assert drilled.passed, r.error
    assert r.mismatches == []
    assert r.tables_checked > 20
    assert r.backup_id.endswith("F")
    assert r.scratch_database.startswith(backups.PITR_SCRATCH_PREFIX)
    assert drilled.point is not None
    assert drilled.point.problem is None
    assert r.rpo is not None
    assert r.rpo <= timedelta(minutes=5)
    assert r.rpo_met
    assert r.rto_met
    assert r.rto == timedelta(seconds=r.restore_s + r.verify_s)
    assert drilled.target_lsn
    assert not any((lab.home / "scratch").iterdir())  # the scratch cluster is gone
    assert lab.sql(
        "SELECT status, backup_id, rpo_target_seconds, rto_target_seconds FROM backup_drills"
        " WHERE drill_id = %s",
        (r.drill_id,),
    ) == [("passed", r.backup_id, 300, 240 * 60)]
    with psycopg.connect(lab.url) as conn:
        assert [d.kind for d in backups.drills(conn, "iiot_pitr", kind=None)] == ["pitr"]
        assert backups.drills(conn, "iiot_pitr") == []  # the logical drills' view


def test_incremental_backup_then_status_reports_the_recovery_point_and_the_drill(lab, drilled):
    incr = lab.iiot("pitr", "backup", "--type", "incr")
    assert incr.exit_code == 0, incr.output
    assert incr.output.startswith("Incr backup ")
    status = lab.iiot("pitr", "status", "--json")
    assert status.exit_code == 0, status.output
    [found] = json.loads(status.output)
    assert found["checks"] == {
        "pitr_within_rpo": True,
        "pitr_drill_recent_and_passed": True,
        "pitr_drill_within_targets": True,
    }
    assert found["rpo_seconds"] <= 300
    assert [b["type"] for b in found["backups"]] == ["incr", "full"]
    assert found["last_drill"]["drill_id"] == drilled.result.drill_id
    text = lab.iiot("status")  # the logical checks fail: no dump was taken here
    assert text.exit_code == 1
    for line in (
        "Point-in-time recovery (stanza iiot): RPO target 5.0 min, RTO target 4.0 h",
        "ok   pitr_within_rpo",
        "ok   pitr_drill_recent_and_passed",
        "ok   pitr_drill_within_targets",
        "FAIL backup_within_rpo",
    ):
        assert line in text.output
    history = lab.iiot("drills")
    assert "pitr" in history.output
    print(text.output, status.output, sep="\n")


def test_dagster_backup_asset_and_checks(lab, drilled, monkeypatch):
    for name, value in lab.env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    resources = {"backup": BackupResource(database_url=lab.url, root=str(lab.home / "dumps"))}
    with dg.instance_for_test() as instance:
        made = dg.materialize([pitr_backup], instance=instance, resources=resources)
        assert made.success
        [event] = made.get_asset_materialization_events()
        metadata = event.materialization.metadata
        assert metadata["type"].value == "incr"  # the fixture's full one is not a week old
        checked = dg.materialize(
            PITR_CHECKS,
            instance=instance,
            resources=resources,
            selection=dg.AssetSelection.checks(*PITR_CHECKS),
        )
    found = {e.check_name: e for e in checked.get_asset_check_evaluations()}
    assert {name: e.passed for name, e in found.items()} == {
        "pitr_within_rpo": True,
        "pitr_drill_recent_and_passed": True,
        "pitr_drill_within_targets": True,
    }
    monkeypatch.delenv("IIOT_PITR_STANZA")
    with dg.instance_for_test() as instance:
        idle = dg.materialize(
            PITR_CHECKS,
            instance=instance,
            resources=resources,
            selection=dg.AssetSelection.checks(*PITR_CHECKS),
        )
    for evaluation in idle.get_asset_check_evaluations():
        assert (evaluation.passed, evaluation.description) == (True, NOT_CONFIGURED)


def test_a_failing_drill_is_recorded_and_alerted_and_leaves_nothing(lab, drilled):
    # another database of the cluster, so that the drills above stay the last of theirs
    lab.sql("CREATE DATABASE iiot_pitr_b TEMPLATE iiot_pitr", url=lab.server_url)
    url = lab.url.replace("/iiot_pitr", "/iiot_pitr_b")
    config = lab.config(IIOT_PITR_PG_BINDIR=str(lab.home / "no-bin"))
    drill = pitr.run_drill(url, config, rpo_hours=RPO_HOURS, rto_minutes=RTO_MINUTES)
    assert not drill.passed
    assert "no postgres in" in drill.result.error
    assert lab.sql(
        "SELECT status, error IS NOT NULL FROM backup_drills WHERE drill_id = %s",
        (drill.result.drill_id,),
        url=url,
    ) == [("failed", True)]
    assert lab.sql("SELECT alert_key, source FROM alerts WHERE state = 'open'", url=url) == [
        ("pitr_drill:iiot_pitr_b", "pitr_drill")
    ]
    assert not any((lab.home / "scratch").iterdir())
    cli = lab.iiot("pitr", "drill", IIOT_DATABASE_URL=url, IIOT_PITR_PG_BINDIR="/no/such/bin")
    assert cli.exit_code == 1
    assert "point-in-time recovery drill of iiot_pitr_b FAILED: no postgres in /no/such/bin" in (
        cli.output
    )


def test_drill_alerts_tell_point_in_time_drills_from_logical_ones(conn):
    from sensors.alerts import drill_alerts

    now = datetime.now(UTC)
    for scratch, status, error in (
        ("iiot_drill_20261206050000_1a2b3c4d", "passed", None),
        ("iiot_drill_pitr_20261206060000_1a2b3c4d", "failed", "no postgres in /x"),
    ):
        conn.execute(
            "INSERT INTO backup_drills (database_name, scratch_database, status, started_at,"
            " finished_at, rpo_target_seconds, rto_target_seconds, error)"
            " VALUES ('iiot', %s, %s, %s, %s, 300, 3600, %s)",
            (scratch, status, now, now, error),
        )
    found = drill_alerts(conn, now)
    assert found["restore_drill:iiot"] is None
    failed = found["pitr_drill:iiot"]
    assert (failed.severity, failed.source) == ("CRITICAL", "pitr_drill")
    assert failed.title == "Point-in-time recovery drill of iiot failed"
    assert [d.kind for d in backups.drills(conn, "iiot", kind=None)] == ["pitr", "logical"]
    assert [d.kind for d in backups.drills(conn, "iiot", kind="pitr")] == ["pitr"]


def test_parallel_verification_gives_the_serial_result(conn, database_url, monkeypatch):
    from tests.test_backups import seed

    seed(conn)
    conn.execute("CREATE TABLE wide AS SELECT n, md5(n::text) AS h FROM generate_series(1, 5000) n")
    backups.session_settings(conn)
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        serial = backups.describe_database(conn)
    monkeypatch.setattr(backups, "PART_BYTES", 8192)  # every table of more than a block splits
    with conn.transaction():
        parts = backups._parts(conn, 2)
    split = {p.qualified for p in parts if p.blocks is not None}
    assert {"public.telemetry", "public.wide", "public.telemetry_hourly"} <= split
    assert backups.describe_database_parallel(database_url, 2) == serial
    assert backups.describe_database_parallel(database_url, 1) == serial
    assert serial.tables["public.wide"].rows == 5000
