"""A new install's backup checks warn until the first scheduled backup and drill were due."""

from datetime import UTC, datetime

import dagster as dg
import pytest

from assets.backups import (
    NOT_CONFIGURED,
    BackupResource,
    backup_within_rpo,
    database_backup,
    drill_recent_and_passed,
    drill_rto_within_target,
    first_backup_due,
    first_drill_due,
    first_pitr_backup_due,
    first_pitr_drill_due,
    pitr_drill_recent_and_passed,
    pitr_drill_within_targets,
    pitr_within_rpo,
)
from iiot_orchestration import registry
from iiot_orchestration.definitions import defs
from sensors.backups import backup_checks_job

CHECKS = [backup_within_rpo, drill_recent_and_passed, drill_rto_within_target]


@pytest.mark.parametrize(
    ("installed", "backup", "drill"),
    [
        # Saturday night: that night's 03:00 backup, Sunday's 05:00 drill
        ("2026-12-05 00:46", "2026-12-05 03:00", "2026-12-06 05:00"),
        # Sunday after the drill's hour: Monday's backup, the next Sunday's drill
        ("2026-12-06 04:00", "2026-12-07 03:00", "2026-12-13 05:00"),
        # Saturday 03:00 sharp: that tick is not the install's, Sunday's backup then its drill
        ("2026-12-05 03:00", "2026-12-06 03:00", "2026-12-06 05:00"),
        # Saturday 04:00: the Sunday backup is before Sunday's 05:00 drill
        ("2026-12-05 04:00", "2026-12-06 03:00", "2026-12-06 05:00"),
    ],
)
def test_first_backup_and_drill_follow_the_schedules(installed, backup, drill):
    def utc(text: str) -> datetime:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)

    assert first_backup_due(utc(installed)) == utc(backup)
    assert first_drill_due(utc(installed)) == utc(drill)


def evaluate(database_url, root) -> dict[str, dg.AssetCheckEvaluation]:
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            CHECKS,
            instance=instance,
            resources={"backup": BackupResource(database_url=database_url, root=str(root))},
            selection=dg.AssetSelection.checks(*CHECKS),
            raise_on_error=False,
        )
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


@pytest.fixture
def tenant(conn):
    registry.create_tenant(conn, slug="acme", name="Acme", plan="pro", timezone="UTC")


def installed_at(conn, when: str) -> datetime:
    conn.execute(
        f"UPDATE iiot_schema_migrations SET applied_at = {when} + version * interval '1 ms'"
    )
    return conn.execute("SELECT min(applied_at) FROM iiot_schema_migrations").fetchone()[0]


def test_a_fresh_stack_warns_with_the_first_due_times(conn, database_url, tmp_path, tenant):
    installed = installed_at(conn, "now()")
    found = evaluate(database_url, tmp_path / "backups")
    assert {(e.passed, e.severity) for e in found.values()} == {(False, dg.AssetCheckSeverity.WARN)}
    assert len(found) == len(CHECKS)
    backup_at = f"{first_backup_due(installed):%Y-%m-%d %H:%M} UTC"
    drill_at = f"{first_drill_due(installed):%Y-%m-%d %H:%M} UTC"
    assert (
        found["backup_within_rpo"].description == f"no backup yet, the first is due at {backup_at}"
    )
    for name in ("drill_recent_and_passed", "drill_rto_within_target"):
        assert found[name].description == f"no restore drill yet, the first is due at {drill_at}"
    assert found["backup_within_rpo"].metadata["first_due"].value == backup_at


def test_after_the_first_scheduled_time_a_missing_backup_fails(
    conn, database_url, tmp_path, tenant
):
    installed = installed_at(conn, "now() - interval '10 days'")
    found = evaluate(database_url, tmp_path / "backups")
    assert {(e.passed, e.severity) for e in found.values()} == {
        (False, dg.AssetCheckSeverity.ERROR)
    }
    due = f"{first_backup_due(installed):%Y-%m-%d %H:%M} UTC"
    assert found["backup_within_rpo"].description == f"no backup: the first was due at {due}"


def test_the_first_backup_settles_its_check_and_the_drills_still_wait(
    conn, database_url, tmp_path, tenant, monkeypatch
):
    monkeypatch.setenv("IIOT_DATABASE_URL", database_url)
    installed_at(conn, "now()")
    root = tmp_path / "backups"
    with dg.instance_for_test() as instance:
        backed_up = dg.materialize(
            [database_backup],
            instance=instance,
            resources={"backup": BackupResource(database_url=database_url, root=str(root))},
        )
    assert backed_up.success
    found = evaluate(database_url, root)
    assert (found["backup_within_rpo"].passed, found["backup_within_rpo"].description) == (
        True,
        None,
    )
    assert found["drill_recent_and_passed"].severity == dg.AssetCheckSeverity.WARN


def test_point_in_time_checks_pass_saying_pitr_is_not_configured(
    conn, database_url, tmp_path, tenant, monkeypatch
):
    monkeypatch.delenv("IIOT_PITR_STANZA", raising=False)
    checks = [pitr_within_rpo, pitr_drill_recent_and_passed, pitr_drill_within_targets]
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            checks,
            instance=instance,
            resources={"backup": BackupResource(database_url=database_url, root=str(tmp_path))},
            selection=dg.AssetSelection.checks(*checks),
        )
    found = result.get_asset_check_evaluations()
    assert len(found) == 3
    assert {(e.passed, e.description) for e in found} == {(True, NOT_CONFIGURED)}
    # and the hourly backup checks run them
    assert {
        c.name for c in backup_checks_job.selection.resolve_checks(defs.resolve_asset_graph())
    } >= {
        "pitr_within_rpo",
        "pitr_drill_recent_and_passed",
        "pitr_drill_within_targets",
    }


def test_first_pgbackrest_backup_and_pitr_drill_follow_their_schedules():
    configured = datetime(2026, 12, 5, 3, 30, tzinfo=UTC)  # a Saturday
    assert first_pitr_backup_due(configured) == datetime(2026, 12, 5, 4, tzinfo=UTC)
    assert first_pitr_drill_due(configured) == datetime(2026, 12, 6, 6, tzinfo=UTC)
    sunday_night = datetime(2026, 12, 6, 5, tzinfo=UTC)
    assert first_pitr_drill_due(sunday_night) == datetime(2026, 12, 13, 6, tzinfo=UTC)
