"""The project's dagster.yaml needs no variable the README calls optional (issue 21, point 1)."""

import os
import shutil

import dagster as dg
import psycopg
import pytest

from iiot_orchestration.services import ensure_database
from iiot_orchestration.settings import SettingsError, dagster_url_for
from tests.conftest import REPO_ROOT, drop_database


@pytest.fixture
def dagster_home(tmp_path, monkeypatch):
    """A DAGSTER_HOME with the project's dagster.yaml and no IIOT_* variable set."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    for name in os.environ:
        if name.startswith("IIOT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def load_instance(home) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(home))


def test_only_the_dagster_database_url_is_needed(dagster_home, empty_database_url, monkeypatch):
    monkeypatch.setenv("IIOT_DAGSTER_DATABASE_URL", empty_database_url)
    with load_instance(dagster_home) as instance:
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 4
        assert [r.run_id for r in instance.get_runs()] == []
    with psycopg.connect(empty_database_url) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables")}
    assert {"runs", "event_logs", "jobs"} <= tables


def test_the_dagster_database_defaults_to_the_application_database_name_dagster(
    dagster_home, database_url, pg_server, monkeypatch
):
    monkeypatch.setenv("IIOT_DATABASE_URL", database_url)
    monkeypatch.setenv("IIOT_MAX_CONCURRENT_RUNS", "2")
    dagster_url = dagster_url_for(database_url)
    dagster_db = psycopg.conninfo.conninfo_to_dict(dagster_url)["dbname"]
    ensure_database(dagster_url, dagster_db)
    try:
        with load_instance(dagster_home) as instance:
            assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 2
            instance.get_runs()
        with psycopg.connect(dagster_url) as conn:
            assert conn.execute("SELECT to_regclass('runs')").fetchone()[0] == "runs"
    finally:
        drop_database(pg_server, dagster_db)


def test_no_database_url_at_all_names_both_variables(dagster_home):
    with pytest.raises(SettingsError, match="IIOT_DAGSTER_DATABASE_URL, or IIOT_DATABASE_URL"):
        load_instance(dagster_home)


def test_a_bad_run_limit_names_its_variable(dagster_home, empty_database_url, monkeypatch):
    monkeypatch.setenv("IIOT_DAGSTER_DATABASE_URL", empty_database_url)
    monkeypatch.setenv("IIOT_MAX_CONCURRENT_RUNS", "lots")
    with pytest.raises(SettingsError, match="IIOT_MAX_CONCURRENT_RUNS='lots' is invalid"):
        load_instance(dagster_home)
