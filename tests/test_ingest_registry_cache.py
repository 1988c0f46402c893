import pytest

from iiot_orchestration import registry
from ingest_daemon.registry_cache import RegistryCache
from tests.ingest_helpers import wait_for


@pytest.fixture
def tenant(conn):
    registry.create_tenant(
        conn, slug="acme", name="Acme", plan="starter", timezone="UTC", retention_days=90
    )
    registry.provision_devices(conn, "acme", [registry.DeviceRequest("aa:bb:cc:00:00:01", "gas")])
    return "acme"


def test_cache_holds_devices_with_metrics_retention_and_plan(database_url, tenant):
    cache = RegistryCache(database_url)
    device = cache.get("aa:bb:cc:00:00:01")
    assert device.metrics == frozenset({"gas_m3"})
    assert device.retention_days == 90
    assert (device.messages_per_minute, device.hard_block) == (6, True)
    assert device.status == "active"
    assert cache.get("aa:bb:cc:00:00:02") is None
    assert len(cache) == 1


def test_suspended_tenant_makes_its_devices_inactive(conn, database_url, tenant):
    conn.execute("UPDATE tenants SET status = 'suspended'")
    assert RegistryCache(database_url).get("aa:bb:cc:00:00:01").status == "tenant suspended"


def test_changes_reach_a_running_cache(conn, database_url, tenant):
    cache = RegistryCache(database_url, refresh_seconds=3600)
    cache.start()
    try:
        registry.provision_devices(conn, "acme", [registry.DeviceRequest("aabbcc000002", "water")])
        assert wait_for(lambda: cache.get("aa:bb:cc:00:00:02") is not None)
        conn.execute("UPDATE devices SET status = 'inactive' WHERE mac = 'aa:bb:cc:00:00:01'")
        assert wait_for(lambda: cache.get("aa:bb:cc:00:00:01").status == "inactive")
        conn.execute(
            "UPDATE plans SET messages_per_minute_per_device = 7 WHERE plan_id = 'starter'"
        )
        assert wait_for(lambda: cache.get("aa:bb:cc:00:00:02").messages_per_minute == 7)
    finally:
        cache.stop()
