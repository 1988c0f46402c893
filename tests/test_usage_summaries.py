"""ingest_usage's summaries (migration 0018) stay exactly what ingest_usage holds, whatever
writes it, and billing's active devices from them equal a count over the device-hours, in time
zones with half-hour offsets and on daylight-saving days."""

import random
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from iiot_orchestration import billing, migrate
from iiot_orchestration.billing import hour_masks

UPSERT = """
WITH landed AS (
    INSERT INTO ingest_usage AS u (tenant_id, device_id, hour, messages, readings,
                                   overage_messages)
    SELECT * FROM unnest(%s::integer[], %s::integer[], %s::timestamptz[], %s::bigint[],
                         %s::bigint[], %s::bigint[])
    ON CONFLICT (tenant_id, hour, device_id) DO UPDATE
       SET messages = u.messages + excluded.messages,
           readings = u.readings + excluded.readings,
           overage_messages = u.overage_messages + excluded.overage_messages
    RETURNING 1
)
SELECT count(*) FROM landed
"""

EXPECTED_HOURS = """
SELECT hour, tenant_id, sum(messages), sum(readings), sum(overage_messages)
  FROM ingest_usage GROUP BY 1, 2 ORDER BY 1, 2
"""
EXPECTED_DAYS = """
SELECT (hour AT TIME ZONE 'UTC')::date, tenant_id, device_id,
       bit_or(1 << extract(hour FROM hour AT TIME ZONE 'UTC')::integer)
  FROM ingest_usage WHERE messages > 0 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""


def summaries(conn):
    hours = conn.execute(
        "SELECT hour, tenant_id, messages, readings, overage_messages"
        "  FROM ingest_usage_tenant_hours ORDER BY 1, 2"
    ).fetchall()
    days = conn.execute(
        "SELECT day, tenant_id, device_id, hours FROM ingest_usage_device_days ORDER BY 1, 2, 3"
    ).fetchall()
    return hours, days


def assert_exact(conn):
    hours, days = summaries(conn)
    assert hours == conn.execute(EXPECTED_HOURS).fetchall()
    assert days == conn.execute(EXPECTED_DAYS).fetchall()


def batch(rng, size):
    """One batch of the daemon's counts: distinct (tenant, device, hour) keys."""
    keys = {
        (
            rng.randint(1, 3),
            rng.randint(1, 8),
            datetime(2026, 10, 30, tzinfo=UTC) + timedelta(hours=rng.randint(0, 72)),
        )
        for _ in range(size)
    }
    rows = []
    for tenant, device, hour in sorted(keys):
        messages = rng.choice([0, 1, 1, 2, 5])
        rows.append((tenant, device, hour, messages, messages + rng.randint(0, 3), messages // 2))
    return [list(column) for column in zip(*rows, strict=True)]


def test_summaries_follow_every_kind_of_write(conn):
    rng = random.Random(18)
    for _ in range(12):  # the daemon's upserts: new rows and increments of existing ones
        conn.execute(UPSERT, batch(rng, 40))
        assert_exact(conn)
    assert summaries(conn)[1], "no device-day was summarised"
    # an operator's corrections: counts lowered to zero, rows moved, rows deleted
    conn.execute("UPDATE ingest_usage SET messages = 0, overage_messages = 0 WHERE device_id = 3")
    assert_exact(conn)
    conn.execute("UPDATE ingest_usage SET hour = hour + interval '100 days' WHERE device_id = 4")
    assert_exact(conn)
    conn.execute("DELETE FROM ingest_usage WHERE tenant_id = 2")
    assert_exact(conn)
    conn.execute("DELETE FROM ingest_usage")
    assert summaries(conn) == ([], [])


def test_a_failed_write_leaves_the_summaries_as_they_were(conn):
    conn.execute(UPSERT, batch(random.Random(1), 20))
    before = summaries(conn)
    conn.commit()
    with pytest.raises(Exception, match="ingest_usage_messages_check"):
        conn.execute("UPDATE ingest_usage SET messages = messages - 100")
    conn.rollback()
    assert summaries(conn) == before


def test_the_migration_summarises_what_ingest_usage_already_held(conn):
    """Applied to a database with usage, the migration fills the summaries from it."""
    conn.execute("ALTER TABLE ingest_usage DISABLE TRIGGER USER")
    conn.execute(UPSERT, batch(random.Random(7), 60))
    conn.execute("ALTER TABLE ingest_usage ENABLE TRIGGER USER")
    assert summaries(conn) == ([], [])
    migration = migrate.discover()[18][None]
    sql = migration.sql()
    conn.execute(sql[sql.index("-- What ingest_usage already holds.") :])
    assert_exact(conn)


@pytest.mark.parametrize(
    ("zone", "day"),
    [
        ("America/Sao_Paulo", date(2026, 10, 10)),
        ("Asia/Kolkata", date(2026, 10, 10)),  # +05:30: the day starts at 18:30 UTC
        ("Europe/London", date(2026, 3, 29)),  # 23 hours
        ("America/New_York", date(2026, 11, 1)),  # 25 hours
        ("Pacific/Chatham", date(2026, 4, 5)),  # +12:45 / +13:45, 25 hours
    ],
)
def test_hour_masks_hold_exactly_the_hours_of_the_local_day(zone, day):
    tz = ZoneInfo(zone)
    start = datetime.combine(day, datetime.min.time(), tz).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), datetime.min.time(), tz).astimezone(UTC)
    masks = hour_masks(start, end)
    hours = sorted(
        datetime.combine(utc_day, datetime.min.time(), UTC) + timedelta(hours=h)
        for utc_day, mask in masks.items()
        for h in range(24)
        if mask >> h & 1
    )
    first = start.replace(minute=0) + (timedelta(hours=1) if start.minute else timedelta())
    expected = []
    hour = first
    while hour < end:
        expected.append(hour)
        hour += timedelta(hours=1)
    assert hours == expected
    assert len(hours) in (23, 24, 25)


def test_billing_counts_active_devices_per_local_day_as_the_device_hours_say(conn):
    """Devices publishing at random hours around the local day of tenants in four zones: the
    nightly usage's active devices, messages and readings equal a direct count over
    ingest_usage's hours of that local day."""
    from tests.test_billing import make_tenant

    rng = random.Random(5)
    day = date(2026, 11, 1)
    zones = ["America/Sao_Paulo", "Asia/Kolkata", "America/New_York", "Pacific/Chatham"]
    tenants = [
        make_tenant(
            conn, f"zone-{n}", [("enterprise", datetime(2026, 1, 1, tzinfo=UTC))], timezone=zone
        )
        for n, zone in enumerate(zones)
    ]
    base = datetime(2026, 10, 31, tzinfo=UTC)
    for who in tenants:
        rows = [
            (who.tenant_id, device, base + timedelta(hours=h), rng.choice([0, 1, 3]), 1, 0)
            for device in range(1, 30)
            for h in rng.sample(range(72), 3)
        ]
        conn.execute(UPSERT, [list(column) for column in zip(*rows, strict=True)])
    usage = billing.compute_usage(
        conn, [(who, day) for who in tenants], billing.DEFAULT_BYTES_PER_READING
    )
    for who, zone in zip(tenants, zones, strict=True):
        tz = ZoneInfo(zone)
        start = datetime.combine(day, datetime.min.time(), tz)
        end = datetime.combine(day + timedelta(days=1), datetime.min.time(), tz)
        messages, readings, active = conn.execute(
            "SELECT coalesce(sum(messages), 0), coalesce(sum(readings), 0),"
            "       count(DISTINCT device_id) FILTER (WHERE messages > 0)"
            "  FROM ingest_usage WHERE tenant_id = %s"
            "   AND hour >= date_trunc('hour', %s::timestamptz - interval '1 microsecond', 'UTC')"
            "              + interval '1 hour'"
            "   AND hour < date_trunc('hour', %s::timestamptz - interval '1 microsecond', 'UTC')"
            "              + interval '1 hour'",
            (who.tenant_id, start, end),
        ).fetchone()
        got = usage[(who.tenant_id, day)]
        assert active > 0
        assert (got.messages, got.readings, got.active_devices) == (messages, readings, active)
