"""The Great Expectations suite over telemetry_daily, run as a Dagster asset check against a real
PostgreSQL: clean rollups pass, rows corrupted after the rollup fail with the expectation named."""

from datetime import UTC, date, datetime, timedelta

import dagster as dg
import pytest

from assets.quality import DAILY_EXPECTATIONS, daily_rollup_expectations
from assets.rollups import telemetry_daily, telemetry_hourly
from iiot_orchestration import registry
from iiot_orchestration.definitions import defs
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.storage import storage_for

DAY = datetime(2026, 11, 20, tzinfo=UTC)
PARTITION = "2026-11-20"


def at(hours: float) -> datetime:
    return DAY + timedelta(hours=hours)


# the day before seeds consumption; 02:45 is a counter reset
READINGS = [
    ("energy_kwh", at(-0.2), 100.0),
    ("energy_kwh", at(0.5), 130.0),
    ("energy_kwh", at(2.75), 5.0),
    ("power_w", at(0.1), 50.0),
    ("power_w", at(13), 150.0),
    ("temperature_c", at(6), 21.5),
]


@pytest.fixture
def device(conn):
    storage_for(conn).ensure_partitions(conn, date(2026, 11, 18), date(2026, 11, 22))
    tenant = registry.create_tenant(conn, slug="acme", name="Acme", plan="pro", timezone="UTC")
    [provisioned] = registry.provision_devices(
        conn, "acme", [registry.DeviceRequest("02:00:00:00:0a:01", "energy")]
    )
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
            " VALUES (%s, %s, %s, %s, %s)",
            [(tenant.tenant_id, provisioned.device_id, *reading) for reading in READINGS],
        )
    return tenant.tenant_id, provisioned.device_id


def run(database_url, partition=PARTITION):
    return dg.materialize(
        [telemetry_hourly, telemetry_daily, daily_rollup_expectations],
        partition_key=partition,
        resources={"postgres": PostgresResource(database_url=database_url)},
        raise_on_error=False,
    )


def check_only(database_url):
    """The check alone on what telemetry_daily holds now, as when launched from the UI. (The
    partition goes in as a tag: materialize() cannot resolve partition_key for a selection
    without assets.)"""
    return dg.materialize(
        [telemetry_hourly, telemetry_daily, daily_rollup_expectations],
        selection=dg.AssetSelection.checks(daily_rollup_expectations),
        tags={"dagster/partition": PARTITION},
        resources={"postgres": PostgresResource(database_url=database_url)},
        raise_on_error=False,
    )


def evaluation(result):
    [found] = [
        e for e in result.get_asset_check_evaluations() if e.check_name == DAILY_EXPECTATIONS
    ]
    return found


def failed_expectations(found):
    return {f["expectation"]: f for f in found.metadata["failed_expectations"].value}


def test_a_clean_day_passes(conn, database_url, device):
    result = run(database_url)
    assert result.success
    found = evaluation(result)
    assert found.passed
    assert found.severity == dg.AssetCheckSeverity.ERROR
    assert found.partition == PARTITION
    assert found.metadata["days"].value == PARTITION
    assert found.metadata["rows"].value == 3
    # 4 not-NULL columns, catalog, readings, resets, 2 consumption, bounds: energy_kwh min,
    # power_w min and max, temperature_c min and max
    assert found.metadata["expectations"].value == 9 + 5
    assert found.metadata["failed_expectations"].value == []


@pytest.mark.parametrize(
    ("corruption", "expectation"),
    [
        ("SET value_max = 20000000 WHERE metric = 'power_w'", "power_w_value_max_in_range"),
        ("SET value_min = -80 WHERE metric = 'temperature_c'", "temperature_c_value_min_in_range"),
        (
            "SET consumption = NULL WHERE metric = 'energy_kwh'",
            "consumption_set_for_cumulative_metrics",
        ),
        ("SET consumption = 3 WHERE metric = 'power_w'", "consumption_null_for_other_metrics"),
        ("SET counter_resets = -1 WHERE metric = 'energy_kwh'", "counter_resets_not_negative"),
        ("SET metric = 'mystery_units' WHERE metric = 'temperature_c'", "metric_in_catalog"),
    ],
)
def test_bad_rows_fail_naming_the_expectation(conn, database_url, device, corruption, expectation):
    assert evaluation(run(database_url)).passed
    conn.execute(f"UPDATE telemetry_daily {corruption}")
    result = check_only(database_url)
    assert not result.get_asset_materialization_events()  # the rows checked are the corrupted ones
    found = evaluation(result)
    assert not found.passed
    assert found.partition == PARTITION
    assert found.severity == dg.AssetCheckSeverity.ERROR
    failed = failed_expectations(found)
    assert set(failed) == {expectation}
    assert failed[expectation]["unexpected_count"] == 1
    assert failed[expectation]["description"]
    tenant_id, device_id = device
    [example] = failed[expectation]["examples"]
    assert example.startswith(f"tenant {tenant_id} device {device_id} ")
    assert f" {PARTITION}: " in example


def test_out_of_range_power_is_reported_with_the_catalog_bound(conn, database_url, device):
    run(database_url)
    conn.execute("UPDATE telemetry_daily SET value_max = 20000000 WHERE metric = 'power_w'")
    result = check_only(database_url)
    assert not result.success  # blocking: an ERROR failure fails the run
    tenant_id, device_id = device
    [failure] = evaluation(result).metadata["failed_expectations"].value
    assert failure["description"] == "power_w: value_max <= 10000000 (metric_catalog.max_value)"
    assert failure["examples"] == [
        f"tenant {tenant_id} device {device_id} power_w {PARTITION}: value_max=20000000.0"
    ]


def test_an_empty_day_passes_and_says_so(conn, database_url, device):
    result = run(database_url, partition="2026-11-21")
    assert result.success
    found = evaluation(result)
    assert found.passed
    assert found.partition == "2026-11-21"
    assert found.metadata["rows"].value == 0
    assert found.metadata["note"].value == "no daily rows: nothing to validate"


def test_a_backfill_range_checks_every_day_of_the_range(conn, database_url, device):
    result = dg.materialize(
        [telemetry_hourly, telemetry_daily, daily_rollup_expectations],
        tags={
            "dagster/asset_partition_range_start": "2026-11-19",
            "dagster/asset_partition_range_end": "2026-11-20",
        },
        resources={"postgres": PostgresResource(database_url=database_url)},
    )
    assert result.success
    found = evaluation(result)
    assert found.passed
    assert found.metadata["days"].value == "2026-11-19..2026-11-20"
    assert found.metadata["rows"].value == 4  # energy_kwh on the 19th too


def test_the_check_is_registered_with_the_rollup_job():
    job = defs.resolve_job_def("telemetry_rollups_job")
    key = dg.AssetCheckKey(dg.AssetKey("telemetry_daily"), DAILY_EXPECTATIONS)
    assert key in job.asset_layer.asset_graph.asset_check_keys
