"""Daily and monthly partitions start on the installation's first day, not on a constant."""

import json
import logging
import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta

import pytest

from iiot_orchestration import partitions, registry
from iiot_orchestration.storage import storage_for
from tests.conftest import REPO_ROOT

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/iiot"
FIRST_KEYS = """
import json
from assets.retention import RETENTION_PARTITIONS
from assets.rollups import ROLLUP_PARTITIONS
from iiot_orchestration.definitions import defs
from iiot_orchestration.partitions import DAYS, MONTHS
starts = {name: f"{p.start:%Y-%m-%d}" for name, p in [
    ("days", DAYS), ("rollups", ROLLUP_PARTITIONS), ("retention", RETENTION_PARTITIONS)]}
print(json.dumps({**starts, "month": MONTHS.get_first_partition_key()}))
"""


def first_keys(**env: str) -> tuple[dict[str, str], str]:
    """Import the code location in a new process, as Dagster does: where its daily partitions
    start, its first month, and what it logged."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    completed = subprocess.run(
        [sys.executable, "-c", FIRST_KEYS],
        env={**environ, **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout.splitlines()[-1]), completed.stderr


def test_the_setting_wins_without_asking_the_database(caplog):
    caplog.set_level(logging.INFO, logger=partitions.__name__)
    environ = {"IIOT_PARTITIONS_START": "2026-03-17", "IIOT_DATABASE_URL": UNREACHABLE}
    assert partitions.first_day(environ) == date(2026, 3, 17)
    assert "IIOT_PARTITIONS_START" in caplog.text
    assert "unreachable" not in caplog.text


def test_partitions_start_on_the_day_the_database_was_migrated(conn, database_url):
    conn.execute(
        "UPDATE iiot_schema_migrations"
        "   SET applied_at = timestamptz '2026-06-15 23:30+00' + version * interval '1 second'"
    )
    assert partitions.first_day({"IIOT_DATABASE_URL": database_url}) == date(2026, 6, 15)


def test_readings_older_than_the_installation_move_the_start_back(conn, database_url):
    """History imported into a new install (or published by `iiot simulate --history`)."""
    storage_for(conn).ensure_partitions(conn, date(2026, 5, 19), date(2026, 5, 21))
    tenant = registry.create_tenant(conn, slug="acme", name="Acme", plan="pro", timezone="UTC")
    request = registry.DeviceRequest("02:00:00:00:0d:01", "energy")
    [device] = registry.provision_devices(conn, "acme", [request])
    conn.execute(
        "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
        " VALUES (%s, %s, 'power_w', '2026-05-20 08:00+00', 1)",
        (tenant.tenant_id, device.device_id),
    )
    assert partitions.first_day({"IIOT_DATABASE_URL": database_url}) == date(2026, 5, 20)


def test_an_unreachable_database_falls_back_to_today_and_says_so(caplog):
    caplog.set_level(logging.INFO, logger=partitions.__name__)
    assert partitions.first_day({"IIOT_DATABASE_URL": UNREACHABLE}) == datetime.now(UTC).date()
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "today" in record.getMessage()
    assert "unreachable" in record.getMessage()
    assert "IIOT_PARTITIONS_START" in record.getMessage()


def test_a_database_not_migrated_yet_falls_back_to_today(empty_database_url, caplog):
    caplog.set_level(logging.INFO, logger=partitions.__name__)
    assert partitions.first_day({"IIOT_DATABASE_URL": empty_database_url}) == (
        datetime.now(UTC).date()
    )
    assert "not migrated" in caplog.text


def test_the_code_location_loads_with_the_database_unreachable():
    keys, logged = first_keys(IIOT_DATABASE_URL=UNREACHABLE)
    today = datetime.now(UTC).date()
    assert keys == {
        "days": str(today),
        "rollups": str(today),
        "retention": str(today),
        "month": str(today.replace(day=1)),  # the installation's own month can be billed
    }
    assert "partitions start today" in logged
    assert "IIOT_PARTITIONS_START" in logged


def test_every_partitioned_asset_starts_on_the_configured_day(database_url):
    keys, _ = first_keys(IIOT_PARTITIONS_START="2026-03-17", IIOT_DATABASE_URL=database_url)
    assert keys == {
        "days": "2026-03-17",
        "rollups": "2026-03-17",
        "retention": "2026-03-17",
        "month": "2026-03-01",
    }


@pytest.mark.parametrize("raw", ["2026-02-30", "yesterday", "2026-3-1"])
def test_a_malformed_start_names_the_variable(raw):
    from iiot_orchestration.settings import SettingsError

    with pytest.raises(SettingsError, match="IIOT_PARTITIONS_START"):
        partitions.first_day({"IIOT_PARTITIONS_START": raw})


def test_a_new_install_has_no_missing_days_before_it(database_url):
    """The complaint of issue 21: "Missing (335)" on a new install."""
    keys, _ = first_keys(IIOT_DATABASE_URL=database_url)
    migrated = datetime.now(UTC).date()  # the session's template database was migrated today
    assert date.fromisoformat(keys["days"]) >= migrated - timedelta(days=1)
