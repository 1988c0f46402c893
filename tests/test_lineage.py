"""Raw telemetry at the root of the asset graph, observed from what the ingest writer landed."""

from datetime import UTC, datetime, timedelta

import dagster as dg
import psycopg
import pytest

from assets.raw_telemetry import RAW_TELEMETRY_KEY, observe
from iiot_orchestration import registry, rollups
from iiot_orchestration.definitions import defs
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.storage import storage_for
from ingest_daemon.validation import Reading
from ingest_daemon.writer import BatchWriter, Delivery
from sensors.raw_telemetry import raw_telemetry_sensor

DATA_GROUPS = {"ingest", "rollups", "retention", "marts", "billing", "reports"}


def lineage_of(graph, key: dg.AssetKey) -> set[dg.AssetKey]:
    """Every asset connected to ``key`` through dependencies, in either direction."""
    found, todo = set(), [key]
    while todo:
        node = graph.get(todo.pop())
        if node.key in found:
            continue
        found.add(node.key)
        todo += [*node.parent_keys, *node.child_keys]
    return found


def test_raw_telemetry_is_the_root_of_one_lineage():
    graph = defs.resolve_asset_graph()
    root = graph.get(RAW_TELEMETRY_KEY)
    assert not root.parent_keys
    assert not root.is_materializable  # the ingest daemon writes it, Dagster observes it
    assert root.group_name == "ingest"
    hanging = {"telemetry_hourly", "telemetry_archive", "telemetry_partitions"}
    hanging.add("dead_letter_retention")
    assert {k.to_user_string() for k in root.child_keys} == hanging
    data_assets = {
        key for key in graph.get_all_asset_keys() if graph.get(key).group_name in DATA_GROUPS
    }
    assert data_assets - lineage_of(graph, RAW_TELEMETRY_KEY) == set()
    assert len(data_assets) > 15  # rollups, marts, billing and reports are all in it


def test_every_asset_has_a_group_and_the_registry_feeds_the_marts():
    """No asset floats outside every group in the UI's lineage: the registry tables the dbt
    marts read as sources are external assets of the `registry` group (no "default")."""
    graph = defs.resolve_asset_graph()
    groups = {key.to_user_string(): graph.get(key).group_name for key in graph.get_all_asset_keys()}
    expected = DATA_GROUPS | {"registry", "alerts", "backups", "certificates"}
    assert {name: group for name, group in groups.items() if group not in expected} == {}
    registry_tables = {name for name, group in groups.items() if group == "registry"}
    assert registry_tables == {"registry/metric_catalog", "registry/tenants"}
    for name in registry_tables:
        node = graph.get(dg.AssetKey.from_user_string(name))
        assert not node.is_materializable  # the CLI and the API write them, not Dagster
        assert node.description
        assert node.owners
        assert dg.AssetKey("consumption_daily") in node.child_keys


def land(database_url: str, device: tuple[int, int], received: list[datetime]) -> None:
    """Readings through the real ingest writer, one message each, received at ``received``."""
    tenant_id, device_id = device
    with psycopg.connect(database_url) as writer_conn:
        BatchWriter(writer_conn).write(
            [
                (Reading(tenant_id, device_id, "power_w", at, 100.0 + n), Delivery(at, n))
                for n, at in enumerate(received)
            ],
            [],
            now=max(received),
        )


@pytest.fixture
def device(conn) -> tuple[int, int]:
    today = datetime.now(UTC).date()
    storage_for(conn).ensure_partitions(conn, today - timedelta(days=2), today + timedelta(days=1))
    tenant = registry.create_tenant(conn, slug="acme", name="Acme", plan="pro", timezone="UTC")
    request = registry.DeviceRequest("02:00:00:00:0c:01", "energy")
    [made] = registry.provision_devices(conn, "acme", [request])
    return tenant.tenant_id, made.device_id


def values(observation: dg.AssetObservation) -> dict:
    return {key: meta.value for key, meta in observation.metadata.items()}


def test_a_new_install_is_observed_as_waiting_for_devices(conn):
    now = datetime(2026, 12, 5, 10, 20, tzinfo=UTC)
    seen = values(observe(conn, now, freshness_minutes=15))
    assert seen["latest_reading"] == "none"
    assert seen["freshness"] == "no device online"
    assert seen["readings_this_hour"] == seen["readings_last_hour"] == 0
    assert "dagster/last_updated_timestamp" not in seen
    table = seen["readings_per_hour"].splitlines()
    assert len(table) == 2 + 24
    assert table[2] == "| 2026-12-05 10:00 | 0 |"
    assert table[-1] == "| 2026-12-04 11:00 | 0 |"


def test_the_observation_counts_what_landed_per_hour_and_judges_freshness(
    conn, database_url, device
):
    now = rollups.floor_hour(datetime.now(UTC) - timedelta(days=1)) + timedelta(minutes=30)
    this_hour = [now - timedelta(minutes=m) for m in (1, 5, 20)]
    hour_before = [now - timedelta(minutes=m) for m in (45, 50)]
    land(database_url, device, this_hour)
    land(database_url, device, hour_before)
    land(database_url, device, [now - timedelta(hours=30)])  # outside the 24 hours shown

    seen = values(observe(conn, now, freshness_minutes=15))
    assert seen["readings_this_hour"] == 3
    assert seen["readings_last_hour"] == 2
    assert f"| {now:%Y-%m-%d %H}:00 | 3 |" in seen["readings_per_hour"]
    assert seen["latest_reading"] == this_hour[0].timestamp()
    assert seen["dagster/last_updated_timestamp"] == this_hour[0].timestamp()
    assert seen["latest_reading_age_minutes"] == 1.0
    assert (seen["online_devices"], seen["freshness"]) == (1, "fresh")

    later = values(observe(conn, now + timedelta(minutes=46), freshness_minutes=15))
    assert (later["freshness"], later["latest_reading_age_minutes"]) == ("stale", 47.0)
    assert (later["readings_this_hour"], later["readings_last_hour"]) == (0, 3)


def test_the_sensor_reports_the_observation_without_a_run(database_url, device):
    land(database_url, device, [datetime.now(UTC) - timedelta(minutes=2)])
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(
            instance=instance, resources={"postgres": PostgresResource(database_url=database_url)}
        )
        result = raw_telemetry_sensor(context)
    assert not result.run_requests
    [observation] = result.asset_events
    assert observation.asset_key == RAW_TELEMETRY_KEY
    assert values(observation)["freshness"] == "fresh"
    assert (
        values(observation)["readings_this_hour"] + values(observation)["readings_last_hour"] == 1
    )
