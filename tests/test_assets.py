import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import dagster as dg
import psycopg

from assets.telemetry import PARTITIONS_AHEAD_CHECK, telemetry_partitions
from iiot_orchestration.definitions import defs
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.services import ensure_database
from iiot_orchestration.settings import dagster_url_for
from tests.conftest import REPO_ROOT, drop_database


def materialize(database_url):
    return dg.materialize(
        [telemetry_partitions],
        resources={"postgres": PostgresResource(database_url=database_url)},
        raise_on_error=False,
    )


def check_result(result):
    [evaluation] = result.get_asset_check_evaluations()
    assert evaluation.check_name == PARTITIONS_AHEAD_CHECK
    return evaluation


def test_definitions_load_with_resources_and_schedule():
    repository = defs.get_repository_def()
    assert dg.AssetKey("telemetry_partitions") in repository.asset_graph.get_all_asset_keys()
    [schedule] = [s for s in defs.schedules if s.name == "telemetry_partitions_schedule"]
    assert schedule.cron_schedule == "15 0 * * *"
    assert "postgres" in defs.resources


def test_dagster_definitions_validate_passes(cli_env, database_url, pg_server, tmp_path):
    """With the project's own dagster.yaml: PostgreSQL run storage and the queued coordinator."""
    dagster_url = dagster_url_for(database_url)
    dagster_db = psycopg.conninfo.conninfo_to_dict(dagster_url)["dbname"]
    ensure_database(dagster_url, dagster_db)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {
        **cli_env,
        "DAGSTER_HOME": str(home),
        "IIOT_DAGSTER_DATABASE_URL": dagster_url,
        "IIOT_MAX_CONCURRENT_RUNS": "2",
    }
    try:
        result = subprocess.run(
            [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        drop_database(pg_server, dagster_db)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful" in result.stdout + result.stderr


def test_materialize_makes_every_day_to_the_horizon_take_data(
    database_url, storage_mode, monkeypatch
):
    monkeypatch.setenv("IIOT_PARTITIONS_AHEAD_DAYS", "12")
    result = materialize(database_url)
    assert result.success
    assert check_result(result).passed
    [event] = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["storage_mode"].value == storage_mode
    horizon = datetime.now(UTC).date() + timedelta(days=12)
    if storage_mode == "postgres":
        assert metadata["created"].value == 5  # the migration made 7 days ahead
        assert metadata["newest_day"].value == str(horizon)
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
            " VALUES (1, 1, 'energy_kwh', %s, 1)",
            (datetime(horizon.year, horizon.month, horizon.day, 23, 59, tzinfo=UTC),),
        )
    assert materialize(database_url).success  # idempotent


def test_check_fails_when_a_day_cannot_take_data(database_url, postgres_mode):
    day = datetime.now(UTC).date() + timedelta(days=3)
    name = f"telemetry_p{day:%Y%m%d}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE telemetry DETACH PARTITION {name}")
    result = materialize(database_url)
    evaluation = check_result(result)
    assert not evaluation.passed
    assert evaluation.metadata["missing_days"].value == str(day)
