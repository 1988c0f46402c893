"""The dbt marts built through Dagster against a real PostgreSQL: readings of two tenants are
rolled up, `dbt build` runs as the `marts` asset, and the marts are compared with numbers worked
out by hand and with SQL over telemetry_hourly."""

import os
import shutil
import threading
import uuid
from datetime import UTC, date, datetime

import dagster as dg
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from assets.marts import (  # before any dagster_dbt import: it silences a warning of its deps
    DBT_PROJECT_DIR,
    DbtProject,
    _manifest_is_current,
    dbt_connection_env,
    dbt_resource,
    environment,
    marts,
    prepare_manifest,
)
from assets.rollups import telemetry_daily, telemetry_hourly
from iiot_orchestration import registry
from iiot_orchestration.db import connect, set_tenant
from iiot_orchestration.definitions import defs
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.storage import storage_for
from tests.test_rollups import insert

OCT_31 = date(2026, 10, 31)
NOV_1 = date(2026, 11, 1)
MONTHS = (date(2026, 10, 1), date(2026, 11, 1))
UNIT_TEST = "accepted_values_consumption_daily_unit__kWh__m3"


def utc(day: int, hour: int, minute: int = 0) -> datetime:
    """A time on 2026-10-<day> (31) or 2026-11-<day> (1), UTC."""
    month = 10 if day == 31 else 11
    return datetime(2026, month, day, hour, minute, tzinfo=UTC)


# America/Sao_Paulo is UTC-3 all year: UTC 2026-11-01 01:30 is 2026-10-31 22:30 there
READINGS = {
    ("acme", "meter_a"): [
        ("energy_kwh", utc(31, 10), 1000.0),  # first reading: no increase
        ("energy_kwh", utc(31, 20), 1010.0),
        ("energy_kwh", utc(1, 1, 30), 1030.0),  # UTC Nov 1, local Oct 31
        ("energy_kwh", utc(1, 12), 1100.0),
        ("power_w", utc(1, 12), 500.0),  # instantaneous: in no mart
    ],
    ("acme", "meter_b"): [
        ("energy_kwh", utc(31, 10), 500.0),
        ("energy_kwh", utc(1, 12), 530.0),  # the gap's 30 goes to this hour
        ("energy_kwh", utc(1, 15), 545.0),
    ],
    ("acme", "water_c"): [
        ("water_m3", utc(1, 6), 10.0),
        ("water_m3", utc(1, 7), 12.5),
    ],
    ("other", "meter_d"): [  # a tenant on UTC: local days are UTC days
        ("energy_kwh", utc(31, 23, 30), 7.0),
        ("energy_kwh", utc(1, 0, 30), 9.0),
    ],
}
DEVICES = {
    ("acme", "meter_a"): ("02:00:00:00:0a:01", "energy"),
    ("acme", "meter_b"): ("02:00:00:00:0a:02", "energy"),
    ("acme", "water_c"): ("02:00:00:00:0a:03", "water"),
    ("other", "meter_d"): ("02:00:00:00:0b:01", "energy"),
}
TIMEZONES = {"acme": "America/Sao_Paulo", "other": "UTC"}

# (device, unit, local day) -> (consumption, readings, hours with data), worked out by hand
EXPECTED_DAILY = {
    ("meter_a", "kWh", OCT_31): (30.0, 3, 3),  # 10 (UTC Oct 31) + 20 (UTC Nov 1 01:30)
    ("meter_a", "kWh", NOV_1): (70.0, 1, 1),
    ("meter_b", "kWh", OCT_31): (0.0, 1, 1),
    ("meter_b", "kWh", NOV_1): (45.0, 2, 2),
    ("water_c", "m3", NOV_1): (2.5, 2, 2),
    ("meter_d", "kWh", OCT_31): (0.0, 1, 1),
    ("meter_d", "kWh", NOV_1): (2.0, 1, 1),
}

# (device, unit, month) -> (consumption, rank, share, previous month, change)
EXPECTED_COMPARISON = {
    ("meter_a", "kWh", MONTHS[0]): (30.0, 1, 1.0, None, None),
    ("meter_b", "kWh", MONTHS[0]): (0.0, 2, 0.0, None, None),
    ("meter_a", "kWh", MONTHS[1]): (70.0, 1, 70 / 115, 30.0, 40.0),
    ("meter_b", "kWh", MONTHS[1]): (45.0, 2, 45 / 115, 0.0, 45.0),
    ("water_c", "m3", MONTHS[1]): (2.5, 1, 1.0, None, None),
    ("meter_d", "kWh", MONTHS[0]): (0.0, 1, None, None, None),  # a tenant total of 0: no share
    ("meter_d", "kWh", MONTHS[1]): (2.0, 1, 1.0, 0.0, 2.0),
}

# the same rule as the model, written independently from the rollup table itself
LOCAL_DAYS_FROM_HOURLY = """
    SELECT h.device_id, m.unit, (h.bucket AT TIME ZONE t.timezone)::date,
           sum(h.consumption), sum(h.readings), count(*)
      FROM telemetry_hourly h
      JOIN metric_catalog m ON m.metric = h.metric AND m.cumulative
      JOIN tenants t ON t.tenant_id = h.tenant_id
     GROUP BY 1, 2, 3
"""


@pytest.fixture
def seeded(conn):
    """Two tenants, four devices, readings over the UTC days 2026-10-31 and 2026-11-01."""
    storage_for(conn).ensure_partitions(conn, date(2026, 10, 30), date(2026, 11, 2))
    for slug, timezone in TIMEZONES.items():
        registry.create_tenant(conn, slug=slug, name=slug, plan="pro", timezone=timezone)
    ids = {}
    for (slug, name), (mac, kind) in DEVICES.items():
        [device] = registry.provision_devices(conn, slug, [registry.DeviceRequest(mac, kind, name)])
        tenant_id = conn.execute(
            "SELECT tenant_id FROM tenants WHERE slug = %s", (slug,)
        ).fetchone()
        ids[name] = (tenant_id[0], device.device_id)
        insert(conn, ids[name], READINGS[(slug, name)])
    return ids


def roll_up(database_url: str) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [telemetry_hourly, telemetry_daily],
        tags={  # both UTC days in one run, as a backfill of the range runs them
            "dagster/asset_partition_range_start": "2026-10-31",
            "dagster/asset_partition_range_end": "2026-11-01",
        },
        resources={"postgres": PostgresResource(database_url=database_url)},
    )


def build_marts(database_url: str) -> dg.ExecuteInProcessResult:
    """`dbt build` as the marts_job runs it; dbt reaches the database named by the postgres
    resource through the DBT_IIOT_* variables of its profile."""
    return dg.materialize(
        [marts],
        resources={"dbt": dbt_resource(), "postgres": PostgresResource(database_url=database_url)},
        raise_on_error=False,
    )


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def by_name(ids):
    return {device_id: name for name, (_, device_id) in ids.items()}


def test_marts_match_the_rollups_in_tenant_local_time(conn, database_url, seeded):
    assert roll_up(database_url).success
    result = build_marts(database_url)
    assert result.success
    checks = check_results(result)
    assert UNIT_TEST in checks
    assert "consumption_matches_daily_rollup" in checks
    assert all(checks.values()), {name for name, passed in checks.items() if not passed}
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {
        "stg_telemetry_hourly",
        "stg_telemetry_daily",
        "consumption_daily",
        "consumption_monthly",
        "device_comparison",
    }

    names = by_name(seeded)
    daily = {
        (names[device], unit, day): (consumption, readings, hours)
        for device, unit, day, consumption, readings, hours in conn.execute(
            "SELECT device_id, unit, local_day, consumption, readings, hours_with_data"
            "  FROM marts.consumption_daily"
        )
    }
    assert daily == EXPECTED_DAILY
    from_hourly = {
        (names[device], unit, day): (consumption, readings, hours)
        for device, unit, day, consumption, readings, hours in conn.execute(LOCAL_DAYS_FROM_HOURLY)
    }
    assert daily == from_hourly

    monthly = dict(
        conn.execute(
            "SELECT device_id || '/' || local_month, consumption FROM marts.consumption_monthly"
        ).fetchall()
    )
    assert monthly[f"{seeded['meter_a'][1]}/2026-10-01"] == 30.0
    assert monthly[f"{seeded['meter_a'][1]}/2026-11-01"] == 70.0

    comparison = {
        (names[device], unit, month): (consumption, rank, share, previous, change)
        for device, unit, month, consumption, rank, share, previous, change in conn.execute(
            "SELECT device_id, unit, local_month, consumption, rank_in_tenant, share_of_tenant,"
            "       previous_month_consumption, change_vs_previous_month"
            "  FROM marts.device_comparison"
        )
    }
    assert comparison.keys() == EXPECTED_COMPARISON.keys()
    for key, (consumption, rank, share, previous, change) in EXPECTED_COMPARISON.items():
        got = comparison[key]
        assert got[:2] == (consumption, rank), key
        assert got[2] == (None if share is None else pytest.approx(share)), key
        assert got[3:] == (previous, change), key
    ratio = conn.execute(
        "SELECT change_ratio_vs_previous_month FROM marts.device_comparison"
        " WHERE device_id = %s AND local_month = '2026-11-01'",
        (seeded["meter_a"][1],),
    ).fetchone()[0]
    assert ratio == pytest.approx(40 / 30)
    # dbt's relations live in their own schema, the marts' tenant views in the schema tenant;
    # public holds only the application's tables
    schemas = conn.execute(
        "SELECT DISTINCT table_name, table_schema FROM information_schema.tables"
        " WHERE table_name IN ('consumption_daily', 'stg_telemetry_hourly') ORDER BY 1, 2"
    ).fetchall()
    assert schemas == [
        ("consumption_daily", "marts"),
        ("consumption_daily", "tenant"),
        ("stg_telemetry_hourly", "marts"),
    ]


def test_a_unit_outside_the_accepted_values_fails_the_build(conn, database_url, seeded):
    """A cumulative metric in litres reaches consumption_daily: the accepted_values test fails,
    the run fails, and the marts downstream of the failed test are not built."""
    conn.execute(
        "INSERT INTO metric_catalog (metric, unit, meter_kind, cumulative, description)"
        " VALUES ('water_l', 'L', 'water', true, 'Cumulative volume in litres (test)')"
    )
    insert(conn, seeded["water_c"], [("water_l", utc(1, 6), 100.0), ("water_l", utc(1, 7), 180.0)])
    assert roll_up(database_url).success
    result = build_marts(database_url)
    assert not result.success
    failed = {name for name, passed in check_results(result).items() if not passed}
    assert failed == {UNIT_TEST}
    units = conn.execute("SELECT DISTINCT unit FROM marts.consumption_daily ORDER BY 1").fetchall()
    assert units == [("L",), ("kWh",), ("m3",)]  # built, then its test failed
    downstream = conn.execute(
        "SELECT to_regclass('marts.consumption_monthly'), to_regclass('marts.device_comparison')"
    ).fetchone()
    assert downstream == (None, None)


def test_the_marts_sit_downstream_of_the_rollups_in_one_asset_graph():
    graph = defs.resolve_asset_graph()
    key = dg.AssetKey
    assert key("telemetry_hourly") in graph.get(key("stg_telemetry_hourly")).parent_keys
    assert key("telemetry_daily") in graph.get(key("stg_telemetry_daily")).parent_keys
    for mart in ("consumption_daily", "consumption_monthly", "device_comparison"):
        assert key("telemetry_hourly") in graph.get_ancestor_asset_keys(key(mart))
        assert graph.get(key(mart)).group_name == "marts"
    assert key(UNIT_TEST) not in graph.get_all_asset_keys()  # tests are checks, not assets
    assert dg.AssetCheckKey(key("consumption_daily"), UNIT_TEST) in graph.asset_check_keys
    schedule = defs.resolve_schedule_def("marts_schedule")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("45 0 * * *", "UTC")
    job = defs.resolve_job_def("marts_job")
    assert key("device_comparison") in job.asset_layer.selected_asset_keys
    assert key("telemetry_daily") not in job.asset_layer.selected_asset_keys


def test_connection_variables_come_from_the_database_url(monkeypatch):
    monkeypatch.delenv("DBT_IIOT_HOST", raising=False)
    env = dbt_connection_env("postgresql://svc:s%40cret@db.internal:6543/iiot?sslmode=require")
    assert env == {
        "DBT_IIOT_HOST": "db.internal",
        "DBT_IIOT_PORT": "6543",
        "DBT_IIOT_USER": "svc",
        "DBT_ENV_SECRET_IIOT_PASSWORD": "s@cret",
        "DBT_IIOT_DBNAME": "iiot",
        "DBT_IIOT_SSLMODE": "require",
        "DBT_IIOT_ROLE": "platform_rw",
    }
    socket = dbt_connection_env("postgresql://app@/iiot?host=/var/run/postgresql")
    assert socket["DBT_IIOT_HOST"] == "/var/run/postgresql"
    assert socket["DBT_IIOT_PORT"] == "5432"
    with environment({"DBT_IIOT_HOST": "elsewhere"}):
        assert os.environ["DBT_IIOT_HOST"] == "elsewhere"
    assert "DBT_IIOT_HOST" not in os.environ


def test_a_fresh_clone_parses_the_project_once(tmp_path):
    """No target/ (it is git-ignored): loading the code parses the project without a database,
    a second load reuses the manifest, and an edited model makes it stale again."""
    copy = tmp_path / "dbt_models"
    shutil.copytree(DBT_PROJECT_DIR, copy, ignore=shutil.ignore_patterns("target", "logs"))
    project = DbtProject(project_dir=copy)
    assert not project.manifest_path.exists()
    manifest = prepare_manifest(project)
    assert manifest.exists()
    assert "model.iiot_marts.device_comparison" in manifest.read_text()
    built = manifest.stat().st_mtime_ns
    assert prepare_manifest(project).stat().st_mtime_ns == built
    model = copy / "models" / "marts" / "consumption_daily.sql"
    os.utime(model, ns=(built + 10**9, built + 10**9))
    assert not _manifest_is_current(project)


@pytest.fixture
def service_url(conn, database_url):
    """A login role in platform_rw, as Dagster connects in production (docs/security.md)."""
    name = f"iiot_svc_{uuid.uuid4().hex[:8]}"
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE platform_rw").format(sql.Identifier(name)))
    params = conninfo_to_dict(database_url)
    yield make_conninfo(**{**params, "user": name})
    conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_the_service_role_builds_the_marts_in_their_own_schema_only(
    conn, database_url, service_url, seeded
):
    """platform_rw has no DDL right in public, yet dbt builds (and rebuilds) its relations in
    the marts schema; the audit role reads them and a tenant session does not."""
    assert roll_up(service_url).success
    for _ in range(2):  # the second build replaces relations the first created
        assert build_marts(service_url).success
    owners = conn.execute(  # the group role, so any other service login can rebuild them
        "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'marts'"
    ).fetchall()
    assert owners == [("platform_rw",)]
    with connect(database_url, role="readonly_audit") as audit:
        assert audit.execute("SELECT count(*) FROM marts.consumption_daily").fetchone()[0] == 7
    with (
        connect(database_url, role="app_rw") as tenant,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        tenant.execute("SELECT count(*) FROM marts.consumption_daily")
    with (
        connect(service_url, role="platform_rw") as service,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        service.execute("CREATE TABLE public.not_for_dbt (x int)")


TENANT_MARTS = ("consumption_daily", "consumption_monthly", "device_comparison")


@pytest.fixture
def tenant_login(conn, database_url):
    """Makes a login bound to a tenant (role tenant_reader, as `iiot tenants logins create`
    does) and returns its URL; the roles are dropped after their sessions are ended."""
    created = []

    def make(slug: str) -> str:
        name = f"tenant_{uuid.uuid4().hex[:12]}"
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE tenant_reader").format(sql.Identifier(name))
        )
        created.append(name)
        conn.execute(
            "INSERT INTO tenant_logins (login, tenant_id)"
            " SELECT %s, tenant_id FROM tenants WHERE slug = %s",
            (name, slug),
        )
        return make_conninfo(**{**conninfo_to_dict(database_url), "user": name})

    yield make
    for name in created:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,)
        )
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def rows(connection: psycopg.Connection, query: sql.Composable, params=()) -> list[tuple]:
    return sorted(connection.execute(query, params).fetchall(), key=repr)


def mart_rows(connection: psycopg.Connection, mart: str, tenant_id: int | None = None):
    """A mart's rows: the tenant view when ``tenant_id`` is None, else marts.<mart> filtered."""
    if tenant_id is None:
        return rows(connection, sql.SQL("SELECT * FROM tenant.{}").format(sql.Identifier(mart)))
    query = sql.SQL("SELECT * FROM marts.{} WHERE tenant_id = %s").format(sql.Identifier(mart))
    return rows(connection, query, (tenant_id,))


def test_a_tenant_login_reads_its_own_marts_and_nothing_else(
    conn, database_url, seeded, tenant_login
):
    """Each tenant's login reads exactly its rows of the three mart views, even when it sets
    iiot.tenant_id to another tenant, and never the marts themselves; app_rw reads the tenant
    it chose; the numbers are those of marts.* filtered by tenant."""
    assert roll_up(database_url).success
    assert build_marts(database_url).success
    tenants = dict(conn.execute("SELECT slug, tenant_id FROM tenants").fetchall())
    for slug, tenant_id in tenants.items():
        other = next(t for s, t in tenants.items() if s != slug)
        expected = {mart: mart_rows(conn, mart, tenant_id) for mart in TENANT_MARTS}
        assert all(expected.values()), expected
        with psycopg.connect(tenant_login(slug), autocommit=True) as login:
            for mart in TENANT_MARTS:
                assert mart_rows(login, mart) == expected[mart], (slug, mart)
            login.execute("SELECT set_config('iiot.tenant_id', %s, false)", (str(other),))
            for mart in TENANT_MARTS:
                assert mart_rows(login, mart) == expected[mart], (slug, mart)
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    login.execute(sql.SQL("SELECT 1 FROM marts.{}").format(sql.Identifier(mart)))
        with connect(database_url, role="app_rw") as service:
            for mart in TENANT_MARTS:
                assert mart_rows(service, mart) == [], mart  # no tenant chosen: no rows
            set_tenant(service, tenant_id)
            for mart in TENANT_MARTS:
                assert mart_rows(service, mart) == expected[mart], (slug, mart)
    acme_devices = {device for slug, device in DEVICES if slug == "acme"}
    with psycopg.connect(tenant_login("acme"), autocommit=True) as login:
        seen = {row[0] for row in login.execute("SELECT device_id FROM tenant.device_comparison")}
    assert seen == {seeded[name][1] for name in acme_devices}


def test_a_rebuild_swaps_the_tenant_views_without_a_gap(conn, database_url, seeded, tenant_login):
    """The table materialization drops the previous table with CASCADE after its COMMIT; the
    post-hook has already pointed each view at the new table, so the views survive a second
    build, read the new table, and a tenant reading throughout never finds one missing or empty."""
    assert roll_up(database_url).success
    assert build_marts(database_url).success
    tenant_id = conn.execute("SELECT tenant_id FROM tenants WHERE slug = 'other'").fetchone()[0]
    before = {mart: mart_rows(conn, mart, tenant_id) for mart in TENANT_MARTS}
    reads: list[dict[str, int]] = []
    errors: list[Exception] = []
    built = threading.Event()

    def read_throughout(url: str) -> None:
        with psycopg.connect(url, autocommit=True) as login:
            while not built.is_set():
                try:
                    reads.append(
                        {
                            mart: login.execute(
                                sql.SQL("SELECT count(*) FROM tenant.{}").format(
                                    sql.Identifier(mart)
                                )
                            ).fetchone()[0]
                            for mart in TENANT_MARTS
                        }
                    )
                except psycopg.Error as exc:
                    errors.append(exc)

    reader = threading.Thread(target=read_throughout, args=(tenant_login("other"),))
    reader.start()
    try:
        assert build_marts(database_url).success
    finally:
        built.set()
        reader.join(timeout=30)
    assert errors == []
    assert len(reads) > 1
    assert {tuple(counts.values()) for counts in reads} == {tuple(map(len, before.values()))}

    for mart in TENANT_MARTS:
        depends_on = conn.execute(  # the view's rewrite rule reads exactly the current mart
            "SELECT DISTINCT d.refobjid::regclass::text FROM pg_depend d"
            "  JOIN pg_rewrite r ON r.oid = d.objid"
            " WHERE r.ev_class = %s::regclass AND d.refobjid <> r.ev_class"
            "   AND d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass",
            (f"tenant.{mart}",),
        ).fetchall()
        assert depends_on == [(f"marts.{mart}",)]
        options = conn.execute(
            "SELECT reloptions FROM pg_class WHERE oid = %s::regclass", (f"tenant.{mart}",)
        ).fetchone()[0]
        assert options == ["security_barrier=true"]
    leftovers = conn.execute(
        "SELECT relname FROM pg_class WHERE relname LIKE %s", ("%__dbt_backup",)
    ).fetchall()
    assert leftovers == []
    with psycopg.connect(tenant_login("other"), autocommit=True) as login:
        assert {mart: mart_rows(login, mart) for mart in TENANT_MARTS} == before
