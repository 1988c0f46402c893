"""A time zone's bulk billing night in IIOT_BILLING_NIGHTLY_SHARDS runs (sensors/billing.py):
every due tenant in exactly one run, the same run whatever other tenants come and go, no run for
an empty shard, one shard exactly the single bulk run of before; the sensor reads the setting,
and bad values are refused naming it."""

from __future__ import annotations

import zlib
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg
import pytest

from iiot_orchestration import registry
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.settings import SettingsError, load_settings
from sensors.billing import (
    BILLING_TAG,
    BULK_FROM,
    billing_nightly_job,
    night_shard,
    nightly_billing_sensor,
    nightly_bulk_requests,
    nightly_requests,
)

SAO_PAULO = "America/Sao_Paulo"
AT_SP_2AM = datetime(2026, 11, 23, 5, 10, tzinfo=UTC)  # 02:10 in Sao Paulo, 14:10 in Tokyo
NIGHT = "2026-11-22"


def zone(slugs, timezone: str = SAO_PAULO) -> list[tuple[str, str, int]]:
    return [(slug, timezone, 1) for slug in slugs]


def slugs_of(request: dg.RunRequest) -> list[str]:
    return request.run_config["ops"]["billing_nightly"]["config"]["tenants"]


def shard_of_each(requests: list[dg.RunRequest]) -> dict[str, str]:
    """Tenant to the run key of the bulk run that bills it; fails if one is in two runs."""
    found: dict[str, str] = {}
    for request in requests:
        for slug in slugs_of(request):
            assert slug not in found, f"{slug} in {found[slug]} and {request.run_key}"
            found[slug] = request.run_key
    return found


def test_one_shard_is_the_single_bulk_run_of_before():
    tenants = [*zone(f"sp{n}" for n in range(60)), ("tokyo", "Asia/Tokyo", 15)]
    requests = nightly_bulk_requests(AT_SP_2AM, tenants, shards=1)
    assert requests == nightly_bulk_requests(AT_SP_2AM, tenants)  # the default
    [bulk] = requests
    assert bulk.run_key == f"nightly:{SAO_PAULO}:{NIGHT}"
    assert bulk.tags == {BILLING_TAG: f"nightly:{SAO_PAULO}:{NIGHT}"}
    assert (bulk.job_name, bulk.partition_key) == (billing_nightly_job.name, NIGHT)
    assert bulk.run_config == {
        "ops": {"billing_nightly": {"config": {"tenants": sorted(f"sp{n}" for n in range(60))}}}
    }


def test_every_due_tenant_is_in_exactly_one_shard():
    slugs = [f"tenant-{n:04d}" for n in range(400)]
    tenants = zone(slugs) + zone(["ba0", "ba1", "ba2"], "America/Argentina/Buenos_Aires")
    requests = nightly_bulk_requests(AT_SP_2AM, tenants, bulk_from=3, shards=4)
    assert all(r.job_name == billing_nightly_job.name for r in requests)
    assert all(r.partition_key == NIGHT for r in requests)
    assert all(r.tags == {BILLING_TAG: r.run_key} for r in requests)  # one run per shard at once
    assert all(slugs_of(r) == sorted(slugs_of(r)) for r in requests)
    sao_paulo = [r for r in requests if r.run_key.startswith(f"nightly:{SAO_PAULO}:")]
    assert [r.run_key for r in sao_paulo] == [
        f"nightly:{SAO_PAULO}:{NIGHT}:{i}/4" for i in (1, 2, 3, 4)
    ]
    placed = shard_of_each(sao_paulo)
    assert sorted(placed) == slugs
    for slug, key in placed.items():
        assert key.endswith(f":{zlib.crc32(slug.encode()) % 4 + 1}/4")
    # 400 tenants spread over the four runs, none of them near all or none
    assert all(50 < len(slugs_of(r)) < 150 for r in sao_paulo), [
        len(slugs_of(r)) for r in sao_paulo
    ]
    # another zone due in the same hour: shards of its own
    buenos_aires = shard_of_each([r for r in requests if r not in sao_paulo])
    assert sorted(buenos_aires) == ["ba0", "ba1", "ba2"]
    assert all(
        key.startswith("nightly:America/Argentina/Buenos_Aires:") for key in buenos_aires.values()
    )


def test_a_tenant_keeps_its_shard_as_tenants_come_and_go():
    before = [f"t{n}" for n in range(300)]
    after = before[40:] + [f"new{n}" for n in range(120)]  # 40 removed, 120 added
    for shards in (2, 7, 64):
        was = shard_of_each(nightly_bulk_requests(AT_SP_2AM, zone(before), shards=shards))
        now = shard_of_each(nightly_bulk_requests(AT_SP_2AM, zone(after), shards=shards))
        assert set(now) == set(after)
        assert {slug: now[slug] for slug in before[40:]} == {
            slug: was[slug] for slug in before[40:]
        }
    # the order the database returns the tenants in does not matter either
    shuffled = shard_of_each(nightly_bulk_requests(AT_SP_2AM, zone(reversed(after)), shards=7))
    assert shuffled == shard_of_each(nightly_bulk_requests(AT_SP_2AM, zone(after), shards=7))


def test_empty_shards_get_no_run():
    # slugs that all hash to the second of two shards
    odd = [s for s in (f"x{n}" for n in range(200)) if night_shard(s, 2) == 1][:BULK_FROM]
    [only] = nightly_bulk_requests(AT_SP_2AM, zone(odd), shards=2)
    assert only.run_key == f"nightly:{SAO_PAULO}:{NIGHT}:2/2"
    assert slugs_of(only) == sorted(odd)
    # three tenants, 64 shards: at most three runs, none empty
    few = nightly_bulk_requests(AT_SP_2AM, zone(["a1", "b2", "c3"]), bulk_from=3, shards=64)
    assert 1 <= len(few) <= 3
    assert all(slugs_of(r) for r in few)
    assert sorted(shard_of_each(few)) == ["a1", "b2", "c3"]


def test_below_the_bulk_threshold_shards_change_nothing():
    tenants = [*zone(f"sp{n}" for n in range(BULK_FROM - 1)), ("tokyo", "Asia/Tokyo", 15)]
    expected = nightly_requests(AT_SP_2AM, tenants)
    assert nightly_bulk_requests(AT_SP_2AM, tenants, shards=8) == expected
    assert nightly_bulk_requests(datetime(2026, 11, 23, 12, tzinfo=UTC), tenants, shards=8) == []


@pytest.mark.parametrize("raw", ["0", "65", "-1", "two", "1.5", "4 shards", "1e3", "\x00"])
def test_bad_setting_values_are_refused_naming_the_variable(raw):
    with pytest.raises(SettingsError) as refused:
        load_settings({"IIOT_BILLING_NIGHTLY_SHARDS": raw})
    assert str(refused.value).startswith(f"IIOT_BILLING_NIGHTLY_SHARDS={raw!r} is invalid")
    assert "a whole number from 1 to 64" in str(refused.value)


def test_setting_values_and_default():
    assert load_settings({}).billing_nightly_shards == 1
    assert load_settings({"IIOT_BILLING_NIGHTLY_SHARDS": ""}).billing_nightly_shards == 1
    assert load_settings({"IIOT_BILLING_NIGHTLY_SHARDS": " 64 "}).billing_nightly_shards == 64
    assert load_settings({"IIOT_BILLING_NIGHTLY_SHARDS": "1"}).billing_nightly_shards == 1


@pytest.mark.parametrize("shards", [0, 65, -2, True, 2.0, "2", None])
def test_bad_shard_counts_are_refused_by_the_function(shards):
    with pytest.raises(ValueError, match="shards must be a whole number from 1 to 64"):
        nightly_bulk_requests(AT_SP_2AM, zone(["a1"]), bulk_from=1, shards=shards)


def zone_at(hour: int) -> str:
    """A fixed-offset zone whose local time is now in ``hour`` (Etc/GMT-14 to Etc/GMT+12 cover
    every hour of the day)."""
    now = datetime.now(UTC)
    for offset in range(-12, 15):
        name = f"Etc/GMT{-offset:+d}" if offset else "Etc/GMT"
        if now.astimezone(ZoneInfo(name)).hour == hour:
            return name
    raise AssertionError(f"no Etc/GMT zone at {hour:02d}:00 at {now}")


def evaluate(database_url: str) -> tuple[str, list[dg.RunRequest]]:
    """The sensor's requests and the zone at 02:00 they were asked in (again if the hour turned
    between choosing the zone and the sensor's clock)."""
    resources = {"postgres": PostgresResource(database_url=database_url)}
    for _ in range(2):
        timezone = zone_at(2)
        with dg.instance_for_test() as instance:
            context = dg.build_sensor_context(instance=instance, resources=resources)
            requests = list(nightly_billing_sensor(context))
        if zone_at(2) == timezone:
            return timezone, requests
    raise AssertionError("the hour turned twice")


@pytest.fixture
def due_tenants(conn) -> dict[str, set[str]]:
    """BULK_FROM + 10 active tenants, created two days ago, in the zone now at 02:00 and in the
    zone now at 01:00 (at 02:00 should the hour turn during the test)."""
    zones: dict[str, set[str]] = {}
    for hour in (1, 2):
        timezone = zone_at(hour)
        for n in range(BULK_FROM + 10):
            slug = f"h{hour}-{n:03d}"
            registry.create_tenant(conn, slug=slug, name=slug, plan="starter", timezone=timezone)
            zones.setdefault(timezone, set()).add(slug)
    conn.execute("UPDATE tenants SET created_at = now() - interval '2 days'")
    return zones


def yesterday(timezone: str) -> str:
    return f"{(datetime.now(ZoneInfo(timezone)) - timedelta(days=1)).date()}"


def test_the_sensor_splits_the_night_as_the_setting_says(database_url, due_tenants, monkeypatch):
    monkeypatch.setenv("IIOT_BILLING_NIGHTLY_SHARDS", "3")
    timezone, requests = evaluate(database_url)
    assert {r.job_name for r in requests} == {billing_nightly_job.name}
    assert set(shard_of_each(requests)) == due_tenants[timezone]  # not the zone at 01:00
    keys = [f"nightly:{timezone}:{yesterday(timezone)}:{i}/3" for i in (1, 2, 3)]
    assert [r.run_key for r in requests] == keys  # 60 tenants fill all three

    monkeypatch.delenv("IIOT_BILLING_NIGHTLY_SHARDS")
    timezone, [single] = evaluate(database_url)
    assert single.run_key == single.tags[BILLING_TAG] == f"nightly:{timezone}:{yesterday(timezone)}"
    assert set(slugs_of(single)) == due_tenants[timezone]

    monkeypatch.setenv("IIOT_BILLING_NIGHTLY_SHARDS", "100")
    with pytest.raises(SettingsError, match="IIOT_BILLING_NIGHTLY_SHARDS='100' is invalid"):
        evaluate(database_url)
