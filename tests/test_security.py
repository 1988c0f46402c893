"""Row-level security and least privilege, exercised through the real roles."""

from datetime import date

import psycopg
import pytest

from iiot_orchestration import registry
from iiot_orchestration.db import connect, set_tenant
from iiot_orchestration.storage import storage_for

TENANT_TABLES = (
    "tenants",
    "devices",
    "device_metrics",
    "telemetry",
    "dead_letters",
    "audit_log",
    "tenant_plan_history",
    "ingest_usage",
    "ingest_usage_tenant_hours",
    "ingest_usage_device_days",
)


@pytest.fixture
def two_tenants(conn):
    ids = {}
    for slug, mac in (("tenant-a", "02:00:00:00:0a:01"), ("tenant-b", "02:00:00:00:0b:01")):
        tenant = registry.create_tenant(
            conn, slug=slug, name=slug, plan="pro", timezone="America/Sao_Paulo"
        )
        [result] = registry.provision_devices(conn, slug, [registry.DeviceRequest(mac, "energy")])
        ids[slug] = (tenant.tenant_id, result.device_id)
    storage_for(conn).ensure_partitions(conn, date(2026, 11, 1), date(2026, 11, 1))
    for tenant_id, device_id in ids.values():
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
            " VALUES (%s, %s, 'energy_kwh', '2026-11-01T00:00:00Z', 1)",
            (tenant_id, device_id),
        )
        conn.execute(
            "INSERT INTO dead_letters (topic, tenant_id, reason, payload, payload_size)"
            " VALUES ('t', %s, 'schema', '\\x00', 1)",
            (tenant_id,),
        )
        conn.execute(
            "INSERT INTO ingest_usage (tenant_id, device_id, hour, messages, readings)"
            " VALUES (%s, %s, '2026-11-01T00:00:00Z', 1, 1)",
            (tenant_id, device_id),
        )
    return ids


def count_visible(conn, table):
    return conn.execute(f"SELECT count(*), count(DISTINCT tenant_id) FROM {table}").fetchone()


@pytest.mark.parametrize("table", TENANT_TABLES)
def test_app_role_sees_only_its_tenant(database_url, two_tenants, table):
    a_id, _ = two_tenants["tenant-a"]
    b_id, _ = two_tenants["tenant-b"]
    with connect(database_url, role="app_rw") as conn:
        set_tenant(conn, a_id)
        rows, tenants = count_visible(conn, table)
        assert rows >= 1
        assert tenants == 1
        assert (
            conn.execute(f"SELECT count(*) FROM {table} WHERE tenant_id = %s", (b_id,)).fetchone()[
                0
            ]
            == 0
        )


@pytest.mark.parametrize("table", TENANT_TABLES)
def test_app_role_without_tenant_sees_nothing(database_url, two_tenants, table):
    with connect(database_url, role="app_rw") as conn:
        assert count_visible(conn, table)[0] == 0


def test_app_role_cannot_write_into_another_tenant(database_url, two_tenants):
    a_id, a_device = two_tenants["tenant-a"]
    b_id, _ = two_tenants["tenant-b"]
    with connect(database_url, role="app_rw") as conn:
        set_tenant(conn, a_id)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute(
                "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
                " VALUES (%s, %s, 'energy_kwh', '2026-11-01T01:00:00Z', 1)",
                (b_id, a_device),
            )
    with connect(database_url, role="app_rw") as conn:
        set_tenant(conn, a_id)
        updated = conn.execute(
            "UPDATE devices SET name = 'hijacked' WHERE tenant_id = %s", (b_id,)
        ).rowcount
        assert updated == 0


def test_tenant_setting_cannot_be_smuggled(database_url, two_tenants):
    with connect(database_url, role="app_rw") as conn:
        conn.execute("SELECT set_config('iiot.tenant_id', '1 OR true', true)")
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            conn.execute("SELECT count(*) FROM devices")


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE sneaky (id int)",
        "DROP TABLE devices",
        "ALTER TABLE devices ADD COLUMN x int",
        "TRUNCATE telemetry",
        "CREATE TABLE telemetry_p29990101 PARTITION OF telemetry"
        " FOR VALUES FROM ('2999-01-01') TO ('2999-01-02')",
        "SELECT iiot_ensure_telemetry_partitions(current_date, current_date + 1)",
    ],
)
def test_app_role_cannot_run_ddl(database_url, statement):
    refused = (
        psycopg.errors.InsufficientPrivilege,
        psycopg.errors.UndefinedTable,
        psycopg.errors.FeatureNotSupported,  # a hypertable refuses PARTITION OF even earlier
    )
    with connect(database_url, role="app_rw") as conn, pytest.raises(refused):
        conn.execute(statement)


def test_platform_role_sees_every_tenant_and_can_extend_storage(database_url, two_tenants):
    with connect(database_url, role="platform_rw") as conn:
        assert count_visible(conn, "telemetry") == (2, 2)
        conn.execute("SELECT iiot_ensure_telemetry_partitions('2030-01-01', '2030-01-02')")
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
            " VALUES (%s, %s, 'energy_kwh', '2030-01-02T12:00:00Z', 1)",
            two_tenants["tenant-a"],
        )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP TABLE telemetry")


def test_readonly_audit_reads_everything_and_writes_nothing(database_url, two_tenants):
    with connect(database_url, role="readonly_audit") as conn:
        assert count_visible(conn, "devices") == (2, 2)
        assert conn.execute("SELECT count(*) FROM iiot_schema_migrations").fetchone()[0] >= 5
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO audit_log (actor, action, entity) VALUES ('x', 'y.z', 'e')")


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_log SET actor = 'someone else'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ],
)
def test_audit_log_is_append_only_even_for_its_owner(conn, two_tenants, statement):
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        conn.execute(statement)


def test_unknown_role_is_refused(database_url):
    with pytest.raises(ValueError, match="unknown role"), connect(database_url, role="postgres"):
        pass
