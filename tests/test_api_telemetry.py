"""Telemetry over the tenant API: the latest reading of each series and ranges of raw readings
or rollups, against a real `iiot api` (uvicorn) and PostgreSQL; two tenants that must never see
each other's devices."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from iiot_orchestration import rollups
from tests.api_helpers import (
    SEED_START,
    ApiServer,
    Tenant,
    assert_envelope,
    platform_key,
    running_api,
)
from tests.api_helpers import seed_tenant as seed
from tests.conftest import create_database, drop_database

OLD_READING = datetime(2025, 1, 10, 6, 30, tzinfo=UTC)  # older than every window but the last
SEEDED_DAYS = rollups.Window(SEED_START, SEED_START + timedelta(days=2))


@dataclass
class Seeded:
    url: str
    acme: Tenant
    globex: Tenant
    now: datetime


def seed_tenants(url: str) -> Seeded:
    """acme and globex, two energy meters each with 30 hours of readings from SEED_START, rolled
    up; acme's power series also hold one reading each: old, recent, and ahead of the clock."""
    now = datetime.now(UTC).replace(microsecond=0)
    with psycopg.connect(url) as conn:
        acme = seed(conn, "acme", hours=30, octet=1)
        globex = seed(conn, "globex", hours=30, octet=2)
        for day in (OLD_READING, now - timedelta(days=2)):
            conn.execute(
                "SELECT iiot_ensure_telemetry_partitions(%s::date, %s::date + 4)", (day, day)
            )
        conn.cursor().executemany(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
            " VALUES (%s, %s, 'power_w', %s, %s)",
            [
                (acme.tenant_id, acme.devices[0], OLD_READING, 1500.0),
                (acme.tenant_id, acme.devices[1], now - timedelta(minutes=10), 250.5),
                (acme.tenant_id, acme.devices[1], now - timedelta(hours=30), 200.0),
                (acme.tenant_id, acme.devices[1], now + timedelta(minutes=5), 260.0),
            ],
        )
        conn.commit()
        rollups.rollup_hours(conn, [SEEDED_DAYS])
        conn.commit()
        rollups.rollup_days(conn, SEEDED_DAYS)
        conn.commit()
    return Seeded(url, acme, globex, now)


@pytest.fixture(scope="module", name="seeded")
def seeded_fixture(pg_server: str, template_database: str) -> Iterator[Seeded]:
    name = f"iiot_t_{uuid.uuid4().hex[:12]}"
    url = create_database(pg_server, name, template=template_database)
    try:
        yield seed_tenants(url)
    finally:
        drop_database(pg_server, name)


@pytest.fixture(scope="module", name="server")
def server_fixture(seeded: Seeded, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with running_api(seeded.url, tmp_path_factory.mktemp("api")) as api:
        yield api


def when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def db_rows(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def latest_in_db(url: str, tenant: Tenant) -> list[tuple]:
    return db_rows(
        url,
        "SELECT DISTINCT ON (device_id, metric) device_id, metric, ts, value FROM telemetry"
        " WHERE tenant_id = %s ORDER BY device_id, metric, ts DESC",
        (tenant.tenant_id,),
    )


def all_pages(client, path: str, **params) -> list[dict]:
    items, cursor, pages = [], None, 0
    while True:
        response = client.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        body = response.json()
        items += body["items"]
        pages += 1
        assert pages < 500
        cursor = body["next_cursor"]
        if cursor is None:
            return items


def test_latest_reading_of_every_series(server, seeded):
    acme = seeded.acme
    with server.client(acme.keys["viewer"]) as client:
        body = client.get("/api/v1/telemetry/latest").json()
    assert body["next_cursor"] is None
    got = [(i["device_id"], i["metric"], when(i["ts"]), i["value"]) for i in body["items"]]
    assert got == latest_in_db(seeded.url, acme)
    by_series = {(i["device_id"], i["metric"]): i for i in body["items"]}
    # the old reading is found past every window, the newest is the one ahead of the clock
    assert when(by_series[acme.devices[0], "power_w"]["ts"]) == OLD_READING
    assert by_series[acme.devices[1], "power_w"]["value"] == 260.0
    assert {i["unit"] for i in body["items"]} == {"kWh", "W"}
    last_energy = SEED_START + timedelta(minutes=15 * (30 * 4 - 1))
    assert when(by_series[acme.devices[0], "energy_kwh"]["ts"]) == last_energy
    assert not {i["device_id"] for i in body["items"]} & set(seeded.globex.devices)


def test_latest_filters_and_pages(server, seeded):
    acme = seeded.acme
    with server.client(acme.keys["viewer"]) as client:
        everything = client.get("/api/v1/telemetry/latest").json()["items"]
        assert all_pages(client, "/api/v1/telemetry/latest", limit=1) == everything
        one = client.get(
            "/api/v1/telemetry/latest",
            params={"device_id": acme.devices[1], "metric": "energy_kwh"},
        ).json()["items"]
        assert [(i["device_id"], i["metric"]) for i in one] == [(acme.devices[1], "energy_kwh")]
        both = client.get(
            "/api/v1/telemetry/latest", params={"device_id": acme.devices, "metric": "power_w"}
        ).json()["items"]
        assert [i["device_id"] for i in both] == acme.devices


def test_latest_of_another_tenants_device_is_not_found(server, seeded):
    acme, globex = seeded.acme, seeded.globex
    with server.client(acme.keys["viewer"]) as client:
        theirs = client.get("/api/v1/telemetry/latest", params={"device_id": globex.devices[0]})
        nobody = client.get("/api/v1/telemetry/latest", params={"device_id": 999_999})
        mixed = client.get(
            "/api/v1/telemetry/latest", params={"device_id": [acme.devices[0], globex.devices[1]]}
        )
    for response in (theirs, nobody, mixed):
        error = assert_envelope(response, 404, "not_found")
        assert "items" not in response.text
        assert "globex" not in error["message"]
    assert theirs.json()["error"]["message"] == f"device {globex.devices[0]} not found"


def test_a_raw_range_pages_through_the_readings(server, seeded):
    acme = seeded.acme
    start, end = SEED_START + timedelta(hours=1), SEED_START + timedelta(hours=5)
    params = {"start": start.isoformat(), "end": end.isoformat()}
    with server.client(acme.keys["viewer"]) as client:
        first = client.get("/api/v1/telemetry", params={**params, "limit": 5}).json()
        items = all_pages(client, "/api/v1/telemetry", **params, limit=7)
    assert first["bucket"] == "raw"
    assert first["units"] == {"energy_kwh": "kWh"}
    assert len(first["items"]) == 5
    assert first["next_cursor"]
    expected = db_rows(
        seeded.url,
        "SELECT device_id, metric, ts, value FROM telemetry WHERE tenant_id = %s"
        " AND ts >= %s AND ts < %s ORDER BY device_id, metric, ts",
        (acme.tenant_id, start, end),
    )
    assert len(expected) == 2 * 16
    assert [(i["device_id"], i["metric"], when(i["ts"]), i["value"]) for i in items] == expected
    assert all(i["readings"] is None and i["consumption"] is None for i in items)


@pytest.mark.parametrize(
    ("span", "bucket", "table"),
    [
        (timedelta(days=3), "hour", "telemetry_hourly"),
        (timedelta(days=90), "day", "telemetry_daily"),
    ],
)
def test_auto_chooses_the_rollups_for_longer_ranges(server, seeded, span, bucket, table):
    acme = seeded.acme
    start = SEED_START - timedelta(days=1)
    params = {"start": start.isoformat(), "end": (start + span).isoformat()}
    params["device_id"] = acme.devices
    with server.client(acme.keys["viewer"]) as client:
        first = client.get("/api/v1/telemetry", params=params).json()
        items = all_pages(client, "/api/v1/telemetry", **params, limit=4)
    assert first["bucket"] == bucket
    expected = db_rows(
        seeded.url,
        "SELECT device_id, metric, bucket, value_avg, readings, value_min, value_max,"
        f"       last_value, consumption FROM {table}"
        " WHERE tenant_id = %s ORDER BY device_id, metric, bucket",
        (acme.tenant_id,),
    )
    assert expected
    fields = ("value", "readings", "value_min", "value_max", "last_value", "consumption")
    got = [(i["device_id"], i["metric"], when(i["ts"]), *(i[f] for f in fields)) for i in items]
    assert got == expected


def test_buckets_can_be_chosen(server, seeded):
    acme = seeded.acme
    one_day = {"start": "2026-11-02", "end": "2026-11-03"}  # without an offset: UTC
    with server.client(acme.keys["viewer"]) as client:
        for bucket, count in (("raw", 2 * 96), ("hour", 2 * 24), ("day", 2)):
            body = client.get(
                "/api/v1/telemetry", params={**one_day, "bucket": bucket, "limit": 1000}
            ).json()
            assert (body["bucket"], len(body["items"])) == (bucket, count)
            assert body["start"] == "2026-11-02T00:00:00Z"


def test_ranges_of_another_tenants_device_are_not_found(server, seeded):
    acme, globex = seeded.acme, seeded.globex
    params = {"start": "2026-11-01", "end": "2026-11-04"}
    with server.client(acme.keys["viewer"]) as client:
        for bucket in ("raw", "hour", "day"):
            response = client.get(
                "/api/v1/telemetry",
                params={**params, "bucket": bucket, "device_id": globex.devices[0]},
            )
            assert_envelope(response, 404, "not_found")
        mine = all_pages(client, "/api/v1/telemetry", **params, bucket="raw", limit=1000)
    assert {i["device_id"] for i in mine} == set(acme.devices)
    with server.client(globex.keys["viewer"]) as client:
        theirs = all_pages(client, "/api/v1/telemetry", **params, bucket="hour", limit=1000)
    assert {i["device_id"] for i in theirs} == set(globex.devices)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"start": "2026-11-03", "end": "2026-11-02"}, "query.end"),
        ({"start": "2026-11-02", "end": "2026-11-02"}, "query.end"),
        ({"start": "2026-01-01", "end": "2027-01-03"}, "query.end"),
        ({"start": "2026-10-01", "end": "2026-11-03", "bucket": "raw"}, "query.end"),
        ({"start": "yesterday", "end": "2026-11-02"}, "query.start"),
        ({"start": "2026-11-02'; DROP TABLE telemetry; --", "end": "2026-11-03"}, "query.start"),
        ({"start": "0001-01-01T00:00:00+14:00", "end": "2026-11-03"}, "query.start"),
        ({"end": "2026-11-03"}, "query.start"),
        ({"start": "2026-11-02", "end": "2026-11-03", "bucket": "minute"}, "query.bucket"),
        ({"start": "2026-11-02", "end": "2026-11-03", "limit": 10**9}, "query.limit"),
        ({"start": "2026-11-02", "end": "2026-11-03", "limit": 0}, "query.limit"),
        ({"start": "2026-11-02", "end": "2026-11-03", "device_id": "1 OR 1=1"}, "query.device_id"),
        ({"start": "2026-11-02", "end": "2026-11-03", "device_id": 2**40}, "query.device_id"),
        ({"start": "2026-11-02", "end": "2026-11-03", "metric": "energy_kwh'--"}, "query.metric"),
        ({"start": "2026-11-02", "end": "2026-11-03", "metric": "no_such_metric"}, "query.metric"),
    ],
)
def test_bad_ranges_and_parameters_are_422(server, seeded, params, field):
    with server.client(seeded.acme.keys["viewer"]) as client:
        response = client.get("/api/v1/telemetry", params=params)
    error = assert_envelope(response, 422, "validation_error")
    assert error["details"][0]["field"].startswith(field)


def test_a_damaged_cursor_is_400(server, seeded):
    with server.client(seeded.acme.keys["viewer"]) as client:
        for path, extra in (
            ("/api/v1/telemetry", {"start": "2026-11-02", "end": "2026-11-03"}),
            ("/api/v1/telemetry/latest", {}),
        ):
            for cursor in ("garbage", "WzEsImEiLCJub3QtYS10aW1lIl0", "W10"):
                response = client.get(path, params={**extra, "cursor": cursor})
                assert_envelope(response, 400, "bad_cursor")


def test_a_key_is_needed_and_a_viewer_suffices(server, seeded):
    with server.client() as client:
        assert_envelope(client.get("/api/v1/telemetry/latest"), 401, "unauthenticated")
    for role in ("viewer", "editor", "admin"):
        with server.client(seeded.acme.keys[role]) as client:
            assert client.get("/api/v1/telemetry/latest").status_code == 200


def test_a_platform_key_names_its_tenant(server, seeded):
    with psycopg.connect(seeded.url) as conn:
        key = platform_key(conn)
    one_day = {"start": "2026-11-02", "end": "2026-11-03"}
    with server.client(key) as client:
        for path, params in (
            ("/api/v1/telemetry/latest", {}),
            ("/api/v1/telemetry", one_day),
            ("/api/v1/exports/telemetry", one_day),
        ):
            assert_envelope(client.get(path, params=params), 400, "tenant_required")
    with server.client(key, **{"X-IIOT-Tenant": "globex"}) as client:
        latest = client.get("/api/v1/telemetry/latest").json()["items"]
        export = client.get("/api/v1/exports/telemetry", params=one_day)
    assert {i["device_id"] for i in latest} == set(seeded.globex.devices)
    assert export.headers["content-disposition"].startswith('attachment; filename="globex-')
