"""Billing rules as reproducible cases: tenant, plan history and usage in, invoice lines out, to
the cent (worked out by hand in the comments), against a real PostgreSQL."""

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest

from iiot_orchestration import billing, registry
from iiot_orchestration.billing import BillingError, money, period_containing, period_of

OCT = date(2026, 10, 1)
AFTER_OCT = date(2026, 11, 20)  # the tenant's local "today": October is closed
MID_OCT = date(2026, 10, 16)  # October is open: a month-to-date draft
GIB = 1024**3


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def make_tenant(conn, slug, history, *, timezone="America/Sao_Paulo", cycle_day=1):
    """A tenant whose plan history is exactly ``history``: [(plan, valid_from UTC), ...],
    created when its first plan starts."""
    registry.create_tenant(
        conn,
        slug=slug,
        name=slug,
        plan=history[-1][0],
        timezone=timezone,
        billing_cycle_day=cycle_day,
    )
    conn.execute("UPDATE tenants SET created_at = %s WHERE slug = %s", (history[0][1], slug))
    who = billing.tenant(conn, slug)
    conn.execute("DELETE FROM tenant_plan_history WHERE tenant_id = %s", (who.tenant_id,))
    for n, (plan, since) in enumerate(history):
        until = history[n + 1][1] if n + 1 < len(history) else None
        conn.execute(
            "INSERT INTO tenant_plan_history (tenant_id, plan_id, valid_from, valid_to,"
            " changed_by) VALUES (%s, %s, %s, %s, 'test')",
            (who.tenant_id, plan, since, until),
        )
    return who


def usage_rows(conn, who, days, **values):
    """Stored daily usage for ``days``, as the nightly asset writes it (plan from history)."""
    for day in days:
        usage = billing.compute_daily_usage(conn, who, day, Decimal(100))
        for name, value in values.items():
            setattr(usage, name, value)
        billing.save_daily_usage(conn, who, usage)


def rewrite_final_usage(conn, statement, params):
    """Change the usage of a final period as only a superuser still can (migration 0024's
    triggers off): the way to test that a final invoice whose data changed fails loudly."""
    conn.execute("ALTER TABLE billing_daily_usage DISABLE TRIGGER USER")
    try:
        conn.execute(statement, params)
    finally:
        conn.execute("ALTER TABLE billing_daily_usage ENABLE TRIGGER USER")


def lines(invoice):
    return [(x.kind, x.quantity, x.amount) for x in invoice.lines]


START = utc(2026, 1, 1)
CASES = {
    # pro all month, messages within its rate: the base price only
    "within quota": (
        [("pro", START)],
        {"messages": 50_000, "provisioned_devices": 80},
        [("base", 31, Decimal("790.00"))],
    ),
    # 1,010 devices every day: 310 device-days x 4.90 / 31 = 49.00; 12,345 messages over the
    # rate x 0.05 / 1000 = 0.61725 -> 0.62
    "enterprise overage": (
        [("enterprise", START)],
        {"provisioned_devices": 1010, "overage_messages": 12345 // 31 + 1},
        [
            ("base", 31, Decimal("4900.00")),
            ("overage_devices", 310, Decimal("49.00")),
            ("overage_messages", (12345 // 31 + 1) * 31, Decimal("0.62")),
        ],
    ),
    # starter never pays overage, whatever the usage says
    "starter blocked": (
        [("starter", START)],
        {"provisioned_devices": 10, "overage_messages": 999},
        [("base", 31, Decimal("99.00"))],
    ),
    # pro to enterprise at 10:00 local on Oct 11: 10 days pro 790 x 10/31 = 254.8387 -> 254.84,
    # 21 days enterprise 4900 x 21/31 = 3319.3548 -> 3319.35
    "mid-month upgrade": (
        [("pro", START), ("enterprise", utc(2026, 10, 11, 13))],
        {"provisioned_devices": 90},
        [("base", 10, Decimal("254.84")), ("base", 21, Decimal("3319.35"))],
    ),
    # enterprise to pro on Oct 16: 15 days 4900 x 15/31 = 2370.9677 -> 2370.97, 16 days pro
    # 790 x 16/31 = 407.7419 -> 407.74; 1,005 devices: overage only on the enterprise days,
    # 5 x 15 = 75 device-days x 4.90 / 31 = 11.8548 -> 11.85
    "mid-month downgrade": (
        [("enterprise", START), ("pro", utc(2026, 10, 16, 12))],
        {"provisioned_devices": 1005},
        [
            ("base", 15, Decimal("2370.97")),
            ("base", 16, Decimal("407.74")),
            ("overage_devices", 75, Decimal("11.85")),
        ],
    ),
    # starter 5 days 99 x 5/31 = 15.9677 -> 15.97; pro 15 days 790 x 15/31 = 382.2581 ->
    # 382.26; enterprise 11 days 4900 x 11/31 = 1738.7097 -> 1738.71
    "two changes in a month": (
        [("starter", START), ("pro", utc(2026, 10, 6, 15)), ("enterprise", utc(2026, 10, 21, 9))],
        {},
        [
            ("base", 5, Decimal("15.97")),
            ("base", 15, Decimal("382.26")),
            ("base", 11, Decimal("1738.71")),
        ],
    ),
    # nothing received all month: the plan's price
    "month with no usage": ([("pro", START)], None, [("base", 31, Decimal("790.00"))]),
}


@pytest.mark.parametrize("case", CASES)
def test_invoice_lines_to_the_cent(conn, case):
    history, usage, expected = CASES[case]
    who = make_tenant(conn, "acme", history)
    days = period_of(OCT, 1).dates()
    if usage is not None:
        usage_rows(conn, who, days, **usage)
    outcome = billing.bill(conn, who, OCT, today=AFTER_OCT)
    assert outcome.action == "finalised"
    assert lines(outcome.invoice) == expected
    assert outcome.invoice.total == sum(amount for _, _, amount in expected)
    stored = conn.execute(
        "SELECT status, total, (SELECT sum(amount) FROM invoice_lines l"
        "  WHERE l.invoice_id = i.invoice_id) FROM invoices i WHERE tenant_id = %s",
        (who.tenant_id,),
    ).fetchone()
    assert stored == ("final", outcome.invoice.total, outcome.invoice.total)


def test_storage_overage_in_gib_days(conn):
    """510 GiB stored on 10 days, 500 included: 100 GiB-days x 0.90 / 31 = 2.9032 -> 2.90."""
    who = make_tenant(conn, "acme", [("enterprise", START)])
    days = period_of(OCT, 1).dates()
    usage_rows(conn, who, days[:10], storage_bytes=510 * GIB)
    usage_rows(conn, who, days[10:], storage_bytes=400 * GIB)
    invoice = billing.compute_invoice(conn, who, OCT, today=AFTER_OCT)
    assert lines(invoice) == [
        ("base", 31, Decimal("4900.00")),
        ("overage_storage", Decimal("100.000000"), Decimal("2.90")),
    ]


def test_leap_february_has_29_days(conn):
    """Pro then enterprise from Feb 15 2028: 790 x 14/29 = 381.3793 -> 381.38 and
    4900 x 15/29 = 2534.4828 -> 2534.48."""
    who = make_tenant(conn, "acme", [("pro", START), ("enterprise", utc(2028, 2, 15, 12))])
    feb = date(2028, 2, 1)
    assert period_of(feb, 1).days == 29
    invoice = billing.compute_invoice(conn, who, feb, today=date(2028, 3, 5))
    assert lines(invoice) == [("base", 14, Decimal("381.38")), ("base", 15, Decimal("2534.48"))]
    assert invoice.total == Decimal("2915.86")


def test_a_tenant_in_another_time_zone_and_cycle(conn):
    """Asia/Tokyo (UTC+9), cycle day 15: the period 2026-10 runs Oct 15 to Nov 14. The change
    at 2026-10-20 16:00 UTC is Oct 21 01:00 in Tokyo, so Oct 21 bills the new plan: 6 days pro
    790 x 6/31 = 152.9032 -> 152.90, 25 days enterprise 4900 x 25/31 = 3951.6129 -> 3951.61.
    Usage is counted by local day: the UTC hour 15:00 of Oct 20 is Oct 21 in Tokyo."""
    who = make_tenant(
        conn,
        "tokyo",
        [("pro", START), ("enterprise", utc(2026, 10, 20, 16))],
        timezone="Asia/Tokyo",
        cycle_day=15,
    )
    [device] = registry.provision_devices(
        conn, "tokyo", [registry.DeviceRequest("02:00:00:00:0c:01", "energy")]
    )
    for hour, messages in ((14, 3), (15, 5)):
        conn.execute(
            "INSERT INTO ingest_usage (tenant_id, device_id, hour, messages, readings)"
            " VALUES (%s, %s, %s, %s, %s)",
            (who.tenant_id, device.device_id, utc(2026, 10, 20, hour), messages, messages * 2),
        )
    oct20, oct21 = (billing.compute_daily_usage(conn, who, date(2026, 10, d)) for d in (20, 21))
    assert (oct20.messages, oct20.readings, oct20.plan_id) == (3, 6, "pro")
    assert (oct21.messages, oct21.readings, oct21.plan_id) == (5, 10, "enterprise")
    assert oct21.active_devices == 1
    invoice = billing.compute_invoice(conn, who, OCT, today=date(2026, 11, 20))
    assert (invoice.period.start, invoice.period.end) == (date(2026, 10, 15), date(2026, 11, 15))
    assert lines(invoice) == [("base", 6, Decimal("152.90")), ("base", 25, Decimal("3951.61"))]


def test_a_draft_bills_the_month_to_date_and_is_replaced(conn):
    who = make_tenant(conn, "acme", [("pro", START)])
    first = billing.bill(conn, who, OCT, today=MID_OCT)
    assert (first.action, first.invoice.status, first.invoice.days_billed) == ("draft", "draft", 15)
    assert lines(first.invoice) == [("base", 15, money(Decimal(790) * 15 / 31))]
    second = billing.bill(conn, who, OCT, today=date(2026, 10, 17))
    assert second.invoice_id == first.invoice_id
    assert second.previous_total == first.invoice.total
    assert second.invoice.days_billed == 16
    kinds = [e["kind"] for e in billing.events(conn, who, OCT)]
    assert kinds.count("draft_computed") == 2


def test_rerunning_a_final_month_changes_nothing_or_fails_loudly(conn):
    who = make_tenant(conn, "acme", [("enterprise", START)])
    usage_rows(conn, who, period_of(OCT, 1).dates(), provisioned_devices=1010)
    final = billing.bill(conn, who, OCT, today=AFTER_OCT)
    again = billing.bill(conn, who, OCT, today=AFTER_OCT)
    assert again.action == "unchanged"
    assert again.invoice.total == final.invoice.total
    change = (
        "UPDATE billing_daily_usage SET provisioned_devices = 1020 WHERE tenant_id = %s"
        " AND day = '2026-10-05'"
    )
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="final invoice 2026-10"):
        conn.execute(change, (who.tenant_id,))
    rewrite_final_usage(conn, change, (who.tenant_id,))
    with pytest.raises(BillingError, match=r"no longer matches its data: total 4949\.00 stored"):
        billing.bill(conn, who, OCT, today=AFTER_OCT)
    stored = billing.stored_invoice(conn, who.tenant_id, OCT)
    assert stored.total == final.invoice.total
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="is final"):
        conn.execute("UPDATE invoices SET total = 0 WHERE tenant_id = %s", (who.tenant_id,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="never change"):
        conn.execute("DELETE FROM invoice_lines WHERE tenant_id = %s", (who.tenant_id,))


def test_adjustments_are_explicit_lines_and_never_touch_a_final_invoice(conn):
    who = make_tenant(conn, "acme", [("pro", START)])
    billing.bill(conn, who, OCT, today=AFTER_OCT)
    with pytest.raises(BillingError, match="is final: put the correction in an open period"):
        billing.add_adjustment(
            conn, who, OCT, Decimal("-10.00"), "meter fault", actor="ops", today=AFTER_OCT
        )
    nov = date(2026, 11, 1)
    billing.add_adjustment(
        conn,
        who,
        nov,
        Decimal("-10.00"),
        "credit for 2026-10 meter fault",
        actor="ops",
        today=AFTER_OCT,
    )
    draft = billing.bill(conn, who, nov, today=AFTER_OCT)
    adjustment = [x for x in draft.invoice.lines if x.kind == "adjustment"]
    assert [(x.amount, x.reason) for x in adjustment] == [
        (Decimal("-10.00"), "credit for 2026-10 meter fault")
    ]
    assert draft.invoice.total == money(Decimal(790) * 19 / 30) - Decimal("10.00")
    for amount, reason, message in (
        (Decimal("0"), "zero", "non-zero amount in cents"),
        (Decimal("1.005"), "fraction of a cent", "non-zero amount in cents"),
        (Decimal("5"), " x ", "reason of 3 to 500"),
    ):
        with pytest.raises(BillingError, match=message):
            billing.add_adjustment(conn, who, nov, amount, reason, actor="ops", today=AFTER_OCT)
    kinds = [e["kind"] for e in billing.events(conn, who, nov)]
    assert "adjustment_added" in kinds


def test_a_tenant_invoice_never_includes_another_tenants_usage(conn):
    acme = make_tenant(conn, "acme", [("enterprise", START)])
    other = make_tenant(conn, "other", [("enterprise", START)])
    usage_rows(conn, acme, period_of(OCT, 1).dates(), provisioned_devices=2000)
    usage_rows(conn, other, period_of(OCT, 1).dates())
    assert billing.compute_invoice(conn, other, OCT, today=AFTER_OCT).total == Decimal("4900.00")
    assert billing.compute_invoice(conn, acme, OCT, today=AFTER_OCT).total > Decimal("4900.00")


def test_plan_changes_and_quota_blocks_reach_the_billing_trail(conn):
    registry.create_tenant(conn, slug="small", name="Small", plan="starter", timezone="UTC")
    who = billing.tenant(conn, "small")
    requests = [registry.DeviceRequest(f"02:00:00:00:0d:{n:02x}", "energy") for n in range(11)]
    results = registry.provision_devices(conn, "small", requests)
    assert [r.status for r in results].count("rejected") == 1
    conn.execute("UPDATE tenants SET plan_id = 'pro' WHERE tenant_id = %s", (who.tenant_id,))
    trail = billing.events(conn, who)
    kinds = [e["kind"] for e in trail]
    assert kinds.count("plan_changed") == 2  # created on starter, then pro
    assert kinds.count("quota_blocked") == 1
    change = next(e for e in reversed(trail) if e["kind"] == "plan_changed")
    assert change["detail"] == {"plan": "pro", "previous_plan": "starter"}
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        conn.execute("DELETE FROM billing_events")


def test_storage_over_quota_warns_and_blocks_new_devices_until_under(conn):
    who = make_tenant(conn, "acme", [("starter", START)])
    day = date(2026, 10, 5)
    usage = billing.compute_daily_usage(conn, who, day, Decimal(100))
    usage.storage_bytes = 2 * GIB  # starter includes 1 GiB
    assert billing.enforce_storage_quota(conn, who, usage, actor="test") is True
    assert billing.enforce_storage_quota(conn, who, usage, actor="test") is None  # already
    [result] = registry.provision_devices(
        conn, "acme", [registry.DeviceRequest("02:00:00:00:0e:01", "energy")]
    )
    assert result.status == "rejected"
    assert "storage quota" in result.message
    usage.storage_bytes = GIB // 2
    assert billing.enforce_storage_quota(conn, who, usage, actor="test") is False
    [result] = registry.provision_devices(
        conn, "acme", [registry.DeviceRequest("02:00:00:00:0e:01", "energy")]
    )
    assert result.status == "provisioned"
    warnings = [
        e["detail"]["state"] for e in billing.events(conn, who) if e["kind"] == "quota_warning"
    ]
    assert warnings == ["blocked", "cleared"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-10", date(2026, 10, 1)),
        ("2026-10-01", date(2026, 10, 1)),
        (" 2028-02 ", date(2028, 2, 1)),
    ],
)
def test_period_labels(text, expected):
    assert billing.parse_period(text) == expected


@pytest.mark.parametrize("text", ["2026-13", "october", "", "2026/10", "2026-10-01T00", "9" * 50])
def test_bad_period_labels_are_refused(text):
    with pytest.raises(BillingError, match="bad period"):
        billing.parse_period(text)


def test_money_rounds_half_up_to_the_cent():
    assert money(Decimal("0.005")) == Decimal("0.01")
    assert money(Decimal("2.675")) == Decimal("2.68")
    assert money(Decimal("-0.005")) == Decimal("-0.01")
    assert money(Decimal("254.838709677")) == Decimal("254.84")


# ---------------------------------------------------------------------------------------------
# The bulk nightly path: the same rows as the per-tenant path, tenant by tenant

NIGHTS = [date(2026, 10, d) for d in range(13, 18)]  # local days 13 to 17 October
TWINS = [
    # (slug, time zone, cycle day, plan history, devices)
    ("sp", "America/Sao_Paulo", 1, [("starter", START)], 3),
    ("tokyo", "Asia/Tokyo", 15, [("pro", START), ("enterprise", utc(2026, 10, 15, 16))], 4),
    ("utc", "UTC", 1, [("enterprise", START), ("pro", utc(2026, 10, 16, 9))], 2),
    ("kolkata", "Asia/Kolkata", 10, [("pro", START)], 1),
]


def make_usage_tenant(conn, slug, timezone, cycle_day, history, devices, seed):
    """A tenant with meters, hourly ingest counters over the nights (and the day before), dead
    letters and an adjustment: the same data for every ``slug`` given the same ``seed``."""
    who = make_tenant(conn, slug, history, timezone=timezone, cycle_day=cycle_day)
    made = registry.provision_devices(
        conn,
        slug,
        [
            registry.DeviceRequest(f"02:00:00:{seed:02x}:{who.tenant_id:02x}:{n:02x}", "energy")
            for n in range(devices)
        ],
    )
    conn.execute(
        "UPDATE devices SET created_at = '2026-09-01 00:00Z' WHERE tenant_id = %s",
        (who.tenant_id,),
    )
    first = datetime(2026, 10, 11, tzinfo=UTC)
    for n, device in enumerate(made):
        for hour in range(0, 24 * 9, 5 + n):  # every few hours, a different rhythm per device
            messages = (hour * 7 + n * 3 + seed) % 11  # some hours with no accepted message
            conn.execute(
                "INSERT INTO ingest_usage (tenant_id, device_id, hour, messages, readings,"
                " overage_messages) VALUES (%s, %s, %s, %s, %s, %s)",
                (
                    who.tenant_id,
                    device.device_id,
                    first + timedelta(hours=hour),
                    messages,
                    messages * 3,
                    messages // 4,
                ),
            )
    for n, reason in enumerate(["rate_limited", "bad_payload", "rate_limited"]):
        conn.execute(
            "INSERT INTO dead_letters (received_at, topic, tenant_id, reason, payload,"
            " payload_size) VALUES (%s, 't', %s, %s, '', 0)",
            (first + timedelta(hours=40 + 30 * n), who.tenant_id, reason),
        )
    label = billing.period_containing(NIGHTS[-1], cycle_day).label
    billing.add_adjustment(
        conn, who, label, Decimal("-1.25"), "goodwill credit", actor="t", today=NIGHTS[-1]
    )
    return who


def snapshot(conn, tenant_id):
    """Everything billing stored for a tenant, without ids and clock times."""
    usage = conn.execute(
        "SELECT day, plan_id, messages, readings, overage_messages, dead_letters, rate_limited,"
        " active_devices, provisioned_devices, stored_readings, bytes_per_reading,"
        " storage_bytes, consumption FROM billing_daily_usage WHERE tenant_id = %s ORDER BY day",
        (tenant_id,),
    ).fetchall()
    invoices = conn.execute(
        "SELECT period, period_start, period_end, status, currency, total, inputs_sha256,"
        " days_billed, finalised_at IS NOT NULL FROM invoices WHERE tenant_id = %s"
        " ORDER BY period",
        (tenant_id,),
    ).fetchall()
    lines = conn.execute(
        "SELECT i.period, l.line_no, l.kind, l.description, l.quantity, l.unit, l.unit_price,"
        " l.amount, l.reason FROM invoice_lines l JOIN invoices i USING (invoice_id)"
        " WHERE l.tenant_id = %s ORDER BY i.period, l.line_no",
        (tenant_id,),
    ).fetchall()
    events = conn.execute(
        "SELECT period, kind, actor, before_amount, after_amount, detail FROM billing_events"
        " WHERE tenant_id = %s AND kind NOT IN ('plan_changed', 'quota_blocked')"
        " ORDER BY event_id",
        (tenant_id,),
    ).fetchall()
    events = [(*e[:5], {k: v for k, v in e[5].items() if k != "adjustment_id"}) for e in events]
    blocked = conn.execute(
        "SELECT storage_blocked_at IS NOT NULL FROM tenants WHERE tenant_id = %s", (tenant_id,)
    ).fetchone()
    return usage, invoices, lines, events, blocked


def test_the_bulk_night_writes_exactly_what_the_per_tenant_path_writes(conn):
    """Twin tenants (same zone, cycle, plan history and data): one twin billed tenant by tenant
    as the per-tenant assets do, the other in bulk; every stored row and event is the same,
    night after night, including a starter over its storage quota, a plan change, a period
    closing (Tokyo, cycle day 15: its 2026-09 period ends on Oct 14) and a re-run."""
    single = [make_usage_tenant(conn, s, tz, c, h, d, seed=7) for s, tz, c, h, d in TWINS]
    bulk = [make_usage_tenant(conn, f"{s}-bulk", tz, c, h, d, seed=7) for s, tz, c, h, d in TWINS]
    per_reading = Decimal("120.50")
    for night in NIGHTS:
        today = night + timedelta(days=1)
        if night == NIGHTS[2]:  # the starter twins go over their 1 GiB quota
            per_reading = Decimal(10_000_000)
        for who in single:
            billing.record_usage_many(conn, [(who, night)], per_reading=per_reading)
            billing.bill(conn, who, period_containing(night, who.cycle_day).label, today=today)
        billing.record_usage_many(conn, [(who, night) for who in bulk], per_reading=per_reading)
        result = billing.bill_many(
            conn,
            [(who, period_containing(night, who.cycle_day).label) for who in bulk],
            today=today,
        )
        assert result.failures == []
        assert len(result.outcomes) == len(bulk)
    # the Tokyo twins' 2026-09 period closed on Oct 14: finalise it, both ways, twice
    for _ in range(2):
        one = billing.bill(conn, single[1], date(2026, 9, 1), today=NIGHTS[-1])
        [other] = billing.bill_many(conn, [(bulk[1], date(2026, 9, 1))], today=NIGHTS[-1]).outcomes
        assert (one.action, one.invoice.total) == (other.action, other.invoice.total)
    assert one.action == "unchanged"
    for a, b in zip(single, bulk, strict=True):
        assert snapshot(conn, a.tenant_id) == snapshot(conn, b.tenant_id), a.slug
    sp = snapshot(conn, single[0].tenant_id)
    assert [e[5]["state"] for e in sp[3] if e[1] == "quota_warning"] == ["blocked"]
    assert sp[4] == (True,)
    kinds = {e[1] for a in single for e in snapshot(conn, a.tenant_id)[3]}
    assert kinds == {
        "quota_warning",
        "quota_notice",
        "draft_computed",
        "invoice_finalised",
        "adjustment_added",
    }
    notices = {(e[5]["quota"], e[5]["threshold"]) for e in sp[3] if e[1] == "quota_notice"}
    assert notices == {("storage", 80), ("storage", 100)}  # the starter over its 1 GiB


def test_bill_night_bills_every_tenant_of_the_night_as_the_assets_would(conn):
    """``bill_night`` (usage of the day, then each tenant's period holding it) against the
    per-tenant functions the nightly assets call, on twins in four time zones."""
    single = [make_usage_tenant(conn, s, tz, c, h, d, seed=3) for s, tz, c, h, d in TWINS]
    bulk = [make_usage_tenant(conn, f"{s}-bulk", tz, c, h, d, seed=3) for s, tz, c, h, d in TWINS]
    night, today = NIGHTS[-1], NIGHTS[-1] + timedelta(days=1)
    for who in single:
        billing.record_usage(conn, who, [night])
        billing.bill(conn, who, period_containing(night, who.cycle_day).label, today=today)
    done = billing.bill_night(
        conn, billing.tenants(conn, [b.slug for b in bulk]), night, today=today
    )
    assert sorted(done.usage) == [b.tenant_id for b in bulk]
    assert done.billing.failures == []
    for a, b in zip(single, bulk, strict=True):
        assert snapshot(conn, a.tenant_id) == snapshot(conn, b.tenant_id), a.slug
        # the earlier days of the period were computed by the invoice itself, both ways
        assert len(snapshot(conn, a.tenant_id)[0]) > 1


def test_bulk_billing_keeps_tenants_apart(conn):
    """A bulk run over some tenants reads and writes nothing of the others, and a changed final
    invoice fails its own request only."""
    mine = [make_usage_tenant(conn, s, tz, c, h, d, seed=5) for s, tz, c, h, d in TWINS]
    other = make_usage_tenant(conn, "other", "UTC", 1, [("enterprise", START)], 2, seed=9)
    billing.bill_night(conn, [other], NIGHTS[0], today=NIGHTS[1])
    before = snapshot(conn, other.tenant_id)
    night = billing.bill_night(conn, mine, NIGHTS[0], today=NIGHTS[1])
    assert snapshot(conn, other.tenant_id) == before
    for who in mine:
        assert snapshot(conn, who.tenant_id)[0]  # usage stored for each, from its own rows only
    alone = billing.compute_usage(conn, [(mine[0], NIGHTS[0])])[(mine[0].tenant_id, NIGHTS[0])]
    assert alone.readings == night.usage[mine[0].tenant_id][-1].readings
    # finalise Tokyo's 2026-09, then change a day of it: only that request fails
    tokyo = mine[1]
    billing.bill(conn, tokyo, date(2026, 9, 1), today=NIGHTS[-1])
    rewrite_final_usage(
        conn,
        "UPDATE billing_daily_usage SET plan_id = 'enterprise' WHERE tenant_id = %s"
        " AND day = '2026-10-10'",
        (tokyo.tenant_id,),
    )
    result = billing.bill_many(
        conn, [(tokyo, date(2026, 9, 1)), (other, OCT)], today=NIGHTS[-1], actor="t"
    )
    assert [(who.slug, label) for who, label, _ in result.failures] == [("tokyo", date(2026, 9, 1))]
    assert "no longer matches its data" in result.failures[0][2]
    assert [o.invoice.tenant_id for o in result.outcomes] == [other.tenant_id]


def test_stored_readings_are_the_readings_accepted_over_the_retention_window(conn):
    """The storage estimate counts the readings accepted on the retention_days local days
    ending with the day (stored daily usage for the earlier days), times bytes per reading."""
    who = make_usage_tenant(conn, "acme", "UTC", 1, [("pro", START)], 2, seed=1)
    conn.execute("UPDATE tenants SET retention_days = 3 WHERE tenant_id = %s", (who.tenant_id,))
    for night in NIGHTS:
        billing.record_usage_many(conn, [(who, night)], per_reading=Decimal("100.25"))
    rows = conn.execute(
        "SELECT day, readings, stored_readings, storage_bytes FROM billing_daily_usage"
        " WHERE tenant_id = %s ORDER BY day",
        (who.tenant_id,),
    ).fetchall()
    readings = {day: n for day, n, _, _ in rows}
    for day, _, stored, storage in rows:
        window = [day - timedelta(days=k) for k in range(3)]
        assert stored == sum(readings.get(d, 0) for d in window)
        assert storage == int(Decimal(stored) * Decimal("100.25"))
    # computing several days at once gives the same numbers as one night after another
    again = billing.compute_usage(conn, [(who, night) for night in NIGHTS], Decimal("100.25"))
    assert [again[(who.tenant_id, d)].stored_readings for d in NIGHTS] == [r[2] for r in rows]
