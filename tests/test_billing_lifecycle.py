"""Billing that finance can leave unattended (issue 20): no charge before a tenant existed, usage
neither lost nor rewritten, versioned prices, quota notices. Each case is worked out by hand in
its comment, to the cent, against a real PostgreSQL."""

import json
from datetime import date, timedelta
from decimal import Decimal
from fractions import Fraction

import psycopg
import pytest
from click.testing import CliRunner
from openpyxl import load_workbook

from iiot_orchestration import alerts, billing, billing_alerts, billing_exports, registry
from iiot_orchestration.billing import BillingError
from iiot_orchestration.cli import main
from iiot_orchestration.reports.verify import pdf_text
from iiot_orchestration.storage import storage_for
from tests.test_billing import GIB, START, lines, make_tenant, usage_rows, utc

OCT = date(2026, 10, 1)
SEP = date(2026, 9, 1)


def stored_rows(conn, tenant_id: int) -> tuple[int, int, int]:
    """Daily usage rows, invoices and billing events (other than plan changes) of a tenant."""
    return conn.execute(
        "SELECT (SELECT count(*) FROM billing_daily_usage WHERE tenant_id = %(t)s),"
        "       (SELECT count(*) FROM invoices WHERE tenant_id = %(t)s),"
        "       (SELECT count(*) FROM billing_events WHERE tenant_id = %(t)s"
        "           AND kind <> 'plan_changed')",
        {"t": tenant_id},
    ).fetchone()


# Created at 2026-10-20 16:00 UTC on pro, billing cycle day 15: period 2026-10 runs Oct 15 to
# Nov 14 (31 days).
# - Tokyo (UTC+9): created Oct 21 01:00 local, billed Oct 21 to Nov 14 = 25 days:
#   790 x 25 / 31 = 637.0968 -> 637.10
# - Sao Paulo (UTC-3): created Oct 20 13:00 local, billed Oct 20 to Nov 14 = 26 days:
#   790 x 26 / 31 = 662.5806 -> 662.58
@pytest.mark.parametrize(
    ("timezone", "first_day", "days", "amount"),
    [
        ("Asia/Tokyo", date(2026, 10, 21), 25, Decimal("637.10")),
        ("America/Sao_Paulo", date(2026, 10, 20), 26, Decimal("662.58")),
    ],
)
def test_billing_starts_on_the_local_day_the_tenant_was_created(
    conn, timezone, first_day, days, amount
):
    who = make_tenant(
        conn, "late", [("pro", utc(2026, 10, 20, 16))], timezone=timezone, cycle_day=15
    )
    assert who.created == first_day
    outcome = billing.bill(conn, who, OCT, today=date(2026, 11, 20))
    assert outcome.action == "finalised"
    assert lines(outcome.invoice) == [("base", days, amount)]
    assert outcome.invoice.days_billed == days
    assert outcome.invoice.lines[0].description.startswith(
        f"Pro plan, {first_day} to 2026-11-14 ({days} of 31 days)"
    )
    first_stored = conn.execute(
        "SELECT min(day) FROM billing_daily_usage WHERE tenant_id = %s", (who.tenant_id,)
    ).fetchone()[0]
    assert first_stored == first_day


def test_periods_and_days_before_the_tenant_existed_are_refused_writing_nothing(conn):
    """Created 2026-10-15 12:00 UTC in Sao Paulo (its local Oct 15), cycle day 1: September
    and a 2020 period are refused, and so are its usage days before Oct 15 and today's."""
    who = make_tenant(conn, "new-tenant", [("pro", utc(2026, 10, 15, 12))])
    before = stored_rows(conn, who.tenant_id)
    for label in (SEP, date(2020, 1, 1)):
        with pytest.raises(BillingError, match="ended before the tenant was created"):
            billing.bill(conn, who, label, today=date(2026, 11, 20))
    with pytest.raises(BillingError, match="has not started yet"):
        billing.bill(conn, who, date(2026, 12, 1), today=date(2026, 11, 20))
    with pytest.raises(BillingError, match="before the tenant was created"):
        billing.record_usage(conn, who, [date(2026, 10, 14), date(2026, 10, 15)])
    with pytest.raises(BillingError, match="has not ended yet"):
        billing.record_usage(conn, who, [date(2026, 11, 20)], today=date(2026, 11, 20))
    assert stored_rows(conn, who.tenant_id) == before == (0, 0, 0)
    # October bills 17 of 31 days: 790 x 17 / 31 = 433.2258 -> 433.23
    invoice = billing.compute_invoice(conn, who, OCT, today=date(2026, 11, 20))
    assert lines(invoice) == [("base", 17, Decimal("433.23"))]


def test_the_cli_refuses_a_period_before_the_tenant_existed(conn, cli_env, monkeypatch):
    for key in [k for k in cli_env if k.startswith("IIOT_")]:
        monkeypatch.setenv(key, cli_env[key])
    who = make_tenant(conn, "new-tenant", [("pro", utc(2026, 10, 15, 12))])
    result = CliRunner().invoke(
        main, ["billing", "invoice", "--tenant", "new-tenant", "--period", "2020-01"]
    )
    assert result.exit_code == 1
    assert "period 2020-01 of new-tenant ended before the tenant was created" in result.output
    assert "its first period is 2026-10" in result.output
    assert stored_rows(conn, who.tenant_id) == (0, 0, 0)


def test_a_bulk_night_refuses_a_tenant_created_after_the_night(conn):
    """Two tenants, one created Oct 1 and one Oct 20 (Sao Paulo): the night of Oct 10 bills
    the first (its October draft, Oct 1 to 10: 790 x 10 / 31 = 254.8387 -> 254.84) and refuses
    the second."""
    old = make_tenant(conn, "old", [("pro", START)])
    new = make_tenant(conn, "new", [("pro", utc(2026, 10, 20, 12))])
    night = billing.bill_night(conn, [old, new], date(2026, 10, 10), today=date(2026, 10, 11))
    assert [(who.slug, reason) for who, _, reason in night.billing.failures] == [
        ("new", "2026-10-10 is before new existed")
    ]
    [outcome] = night.billing.outcomes
    assert lines(outcome.invoice) == [("base", 10, Decimal("254.84"))]
    assert stored_rows(conn, new.tenant_id) == (0, 0, 0)


def over_quota_on(conn, who, day_utc_noon) -> None:
    """100 readings at noon UTC of a day (the same local day in UTC and in Kolkata)."""
    conn.execute(
        "INSERT INTO ingest_usage (tenant_id, device_id, hour, messages, readings)"
        " VALUES (%s, 1, %s, 100, 100)",
        (who.tenant_id, day_utc_noon),
    )


# Starter includes 1 GiB = 1,073,741,824 bytes. Nov 30: 100 readings x 20,000,000 bytes a reading
# = 2,000,000,000 bytes, over the quota: blocked. September has no readings (0 bytes, under the
# quota) and is invoiced afterwards, 30 of 30 days at 99.00 = 99.00: the block stays.
@pytest.mark.parametrize("timezone", ["UTC", "Asia/Kolkata"])
def test_an_old_period_computed_while_blocked_keeps_the_block(conn, timezone):
    who = make_tenant(conn, "small", [("starter", START)], timezone=timezone)
    over_quota_on(conn, who, utc(2026, 11, 30, 12))
    billing.record_usage_many(conn, [(who, date(2026, 11, 30))], per_reading=Decimal(20_000_000))
    [nov30] = billing.load_daily_usage(conn, who, [date(2026, 11, 30)])
    assert nov30.storage_bytes == 2_000_000_000
    outcome = billing.bill(conn, who, SEP, today=date(2026, 12, 5))
    assert lines(outcome.invoice) == [("base", 30, Decimal("99.00"))]
    blocked = conn.execute(
        "SELECT storage_blocked_at IS NOT NULL FROM tenants WHERE tenant_id = %s",
        (who.tenant_id,),
    ).fetchone()[0]
    assert blocked
    states = [
        e["detail"]["state"] for e in billing.events(conn, who) if e["kind"] == "quota_warning"
    ]
    assert states == ["blocked"]


def test_an_old_day_over_the_quota_does_not_block_today(conn):
    """Nov 30 is under the quota (no readings); Oct 5 is computed afterwards with 2,000,000,000
    bytes (over 1 GiB): the tenant stays unblocked, no event."""
    who = make_tenant(conn, "small", [("starter", START)], timezone="Asia/Kolkata")
    billing.record_usage_many(conn, [(who, date(2026, 11, 30))], per_reading=Decimal(100))
    over_quota_on(conn, who, utc(2026, 10, 5, 12))
    [oct5] = billing.record_usage_many(
        conn, [(who, date(2026, 10, 5))], per_reading=Decimal(20_000_000)
    )[who.tenant_id]
    assert oct5.storage_bytes == 2_000_000_000
    assert [e for e in billing.events(conn, who) if e["kind"] == "quota_warning"] == []
    blocked = conn.execute(
        "SELECT storage_blocked_at FROM tenants WHERE tenant_id = %s", (who.tenant_id,)
    ).fetchone()[0]
    assert blocked is None


# Tokyo, cycle day 15, local date 2026-11-20: the open period is 2026-11 (Nov 15 to Dec 14, 30
# days), the next 2026-12. Sao Paulo, cycle day 1, local date 2026-11-20: 2026-11 (Nov 1 to 30,
# 30 days) and 2026-12. A -10.00 credit on the open draft, Tokyo: Nov 15 to 19, 5 days pro
# 790 x 5 / 30 = 131.6667 -> 131.67, total 121.67; Sao Paulo: Nov 1 to 19, 19 days
# 790 x 19 / 30 = 500.3333 -> 500.33, total 490.33.
@pytest.mark.parametrize(
    ("timezone", "cycle_day", "days", "base"),
    [("Asia/Tokyo", 15, 5, Decimal("131.67")), ("America/Sao_Paulo", 1, 19, Decimal("500.33"))],
)
def test_adjustments_only_for_the_open_period_or_the_next(conn, timezone, cycle_day, days, base):
    who = make_tenant(conn, "acme", [("pro", START)], timezone=timezone, cycle_day=cycle_day)
    today = date(2026, 11, 20)
    for label in (date(2019, 1, 1), date(2031, 7, 1), OCT, date(2027, 1, 1)):
        with pytest.raises(BillingError, match="will not be invoiced again: an adjustment goes"):
            billing.add_adjustment(
                conn, who, label, Decimal("-10.00"), "outage", actor="ops", today=today
            )
    assert conn.execute("SELECT count(*) FROM billing_adjustments").fetchone() == (0,)
    nov, dec = date(2026, 11, 1), date(2026, 12, 1)
    billing.add_adjustment(conn, who, nov, Decimal("-10.00"), "outage", actor="ops", today=today)
    billing.add_adjustment(conn, who, dec, Decimal("5.00"), "setup fee", actor="ops", today=today)
    draft = billing.compute_invoice(conn, who, nov, today=today)
    assert lines(draft) == [("base", days, base), ("adjustment", 1, Decimal("-10.00"))]
    assert draft.total == base - Decimal("10.00")


# Cycle day 15: the period 2026-09 runs Sep 15 to Oct 14, 2026-10 from Oct 15.
# - Tokyo (UTC+9): a change at 2026-10-10 03:00 UTC is Oct 10 12:00 local -> period 2026-09
#   (the calendar month would say 2026-10); a change at 2026-10-14 16:00 UTC is Oct 15 01:00
#   local -> 2026-10.
# - Sao Paulo (UTC-3): 2026-10-15 02:59 UTC is Oct 14 23:59 local -> 2026-09 (the calendar
#   month: 2026-10); 2026-10-15 03:00 UTC is Oct 15 00:00 local -> 2026-10.
@pytest.mark.parametrize(
    ("timezone", "in_september", "in_october"),
    [
        ("Asia/Tokyo", utc(2026, 10, 10, 3), utc(2026, 10, 14, 16)),
        ("America/Sao_Paulo", utc(2026, 10, 15, 2, 59), utc(2026, 10, 15, 3)),
    ],
)
def test_every_event_kind_is_labelled_with_the_billing_period(
    conn, timezone, in_september, in_october
):
    who = make_tenant(
        conn,
        "acme",
        [("enterprise", START), ("pro", in_september), ("enterprise", in_october)],
        timezone=timezone,
        cycle_day=15,
    )
    for at in (in_september, in_october):
        conn.execute(
            "INSERT INTO audit_log (occurred_at, actor, tenant_id, action, entity, entity_id)"
            " VALUES (%s, 'test', %s, 'quota.device_blocked', 'device', 'x')",
            (at, who.tenant_id),
        )
    # the storage quota's warning on the local day Oct 14, on pro (period 2026-09)
    usage = billing.compute_daily_usage(conn, who, date(2026, 10, 14), Decimal(100))
    usage.storage_bytes = 30 * 1024**3  # pro includes 20 GiB
    assert billing.enforce_storage_quota(conn, who, usage, actor="test") is True
    labelled = [
        (e["kind"], e["period"])
        for e in billing.events(conn, who)
        if in_september <= e["occurred_at"] <= in_october or e["kind"] == "quota_warning"
    ]
    assert sorted(labelled) == sorted(
        [
            ("plan_changed", SEP),
            ("quota_blocked", SEP),
            ("plan_changed", OCT),
            ("quota_blocked", OCT),
            ("quota_warning", SEP),
        ]
    )
    september = {e["kind"] for e in billing.events(conn, who, SEP)}
    assert {"plan_changed", "quota_blocked", "quota_warning"} <= september


# Pro since January, 2026-10 final: Tokyo with cycle day 15 (Oct 15 to Nov 14, 31 days) and
# Sao Paulo with cycle day 1 (Oct 1 to 31): 790 x 31 / 31 = 790.00 either way, and it stays so.
@pytest.mark.parametrize(("timezone", "cycle_day"), [("Asia/Tokyo", 15), ("America/Sao_Paulo", 1)])
def test_a_backfill_of_a_closed_day_is_refused(conn, timezone, cycle_day):
    who = make_tenant(conn, "acme", [("pro", START)], timezone=timezone, cycle_day=cycle_day)
    today = date(2026, 12, 5)
    final = billing.bill(conn, who, OCT, today=today)
    assert (final.action, final.invoice.total) == ("finalised", Decimal("790.00"))
    day = date(2026, 10, 20)
    snapshot = conn.execute(
        "SELECT * FROM billing_daily_usage WHERE tenant_id = %s AND day = %s",
        (who.tenant_id, day),
    ).fetchone()
    current = "2026-11" if cycle_day == 15 else "2026-12"
    with pytest.raises(BillingError) as refused:
        billing.record_usage(conn, who, [day], today=today)
    assert str(refused.value).startswith(
        "day 2026-10-20 of acme belongs to the final invoice 2026-10: its usage is a snapshot"
    )
    assert f"iiot billing adjust --tenant acme --period {current} " in str(refused.value)
    for statement in (
        "UPDATE billing_daily_usage SET messages = messages + 1 WHERE tenant_id = %s AND day = %s",
        "DELETE FROM billing_daily_usage WHERE tenant_id = %s AND day = %s",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="final invoice 2026-10"):
            conn.execute(statement, (who.tenant_id, day))
    assert (
        conn.execute(
            "SELECT * FROM billing_daily_usage WHERE tenant_id = %s AND day = %s",
            (who.tenant_id, day),
        ).fetchone()
        == snapshot
    )
    assert billing.bill(conn, who, OCT, today=today).action == "unchanged"


def late_batch(conn, who, hour, messages, readings, overage) -> None:
    """A batch the daemon commits late (retried through an outage: it keeps its receive hour)."""
    conn.execute(
        "INSERT INTO ingest_usage (tenant_id, device_id, hour, messages, readings,"
        " overage_messages) VALUES (%s, 1, %s, %s, %s, %s)",
        (who.tenant_id, hour, messages, readings, overage),
    )


# Enterprise since January. A late batch of 2,000 messages, 6,000 readings, 12,345 of them over
# the rate, lands after the period holding its day was finalised: 12,345 x 0.05 / 1000 = 0.61725
# -> 0.62 on the open invoice (local date Nov 20).
# - Sao Paulo, cycle day 1: the hour 2026-10-05 15:00 UTC is Oct 5 (final 2026-10); the open
#   period 2026-11 (30 days) bills Nov 1 to 19: 4900 x 19 / 30 = 3103.3333 -> 3103.33, total
#   3103.33 + 0.62 = 3103.95.
# - Kolkata (UTC+5:30), cycle day 15: the hour 2026-10-10 18:00 UTC starts at 23:30 on Oct 10,
#   the day it belongs to (final 2026-09, Sep 15 to Oct 14); the open period 2026-11 (Nov 15 to
#   Dec 14, 30 days) bills Nov 15 to 19: 4900 x 5 / 30 = 816.6667 -> 816.67, total 817.29.
@pytest.mark.parametrize(
    ("timezone", "cycle_day", "hour", "day", "final", "base", "total"),
    [
        (
            "America/Sao_Paulo",
            1,
            utc(2026, 10, 5, 15),
            date(2026, 10, 5),
            OCT,
            ("base", 19, Decimal("3103.33")),
            Decimal("3103.95"),
        ),
        (
            "Asia/Kolkata",
            15,
            utc(2026, 10, 10, 18),
            date(2026, 10, 10),
            SEP,
            ("base", 5, Decimal("816.67")),
            Decimal("817.29"),
        ),
    ],
)
def test_a_late_batch_after_finalisation_is_billed_once_on_the_open_invoice(
    conn, timezone, cycle_day, hour, day, final, base, total
):
    who = make_tenant(conn, "acme", [("enterprise", START)], timezone=timezone, cycle_day=cycle_day)
    today, nov = date(2026, 11, 20), date(2026, 11, 1)
    closed = billing.bill(conn, who, final, today=today)
    assert closed.action == "finalised"
    late_batch(conn, who, hour, 2000, 6000, 12345)
    for _ in range(2):  # the second run finds nothing new: billed once
        draft = billing.bill(conn, who, nov, today=today)
        assert lines(draft.invoice) == [base, ("adjustment", 12345, Decimal("0.62"))]
        assert draft.invoice.total == total
    assert draft.invoice.lines[-1].description == (
        f"Late usage of {day} (final invoice {final:%Y-%m}): 2,000 messages, 6,000 readings"
    )
    [late] = [e for e in billing.events(conn, who) if e["kind"] == "late_usage"]
    assert (late["period"], late["after"]) == (nov, Decimal("0.62"))
    assert late["detail"] == {
        "day": f"{day}",
        "final_invoice": f"{final:%Y-%m}",
        "messages": 2000,
        "readings": 6000,
        "overage_messages": 12345,
        "amount": "0.62",
    }
    assert billing.bill(conn, who, final, today=today).action == "unchanged"
    # more of the same day later: only the difference, 1,000 x 0.05 / 1000 = 0.05
    late_batch(conn, who, hour + timedelta(hours=1), 10, 10, 1000)
    again = billing.bill(conn, who, nov, today=today)
    assert lines(again.invoice)[-1] == ("adjustment", 1000, Decimal("0.05"))
    assert again.invoice.total == total + Decimal("0.05")


# Pro, Sao Paulo, cycle day 1, local date Oct 20: Oct 1 to 19 are stored by the draft. A late
# batch for Oct 5 (400 messages, 1,200 readings) is picked up by the next draft: Oct 5 now holds
# them. Pro bills no per-message price: 790 x 19 / 31 = 484.1935 -> 484.19 before and after.
def test_late_usage_of_an_open_period_is_picked_up_by_the_draft(conn):
    who = make_tenant(conn, "acme", [("pro", START)])
    today = date(2026, 10, 20)
    first = billing.bill(conn, who, OCT, today=today)
    late_batch(conn, who, utc(2026, 10, 5, 15), 400, 1200, 0)
    second = billing.bill(conn, who, OCT, today=today)
    assert lines(first.invoice) == lines(second.invoice) == [("base", 19, Decimal("484.19"))]
    [oct5] = billing.load_daily_usage(conn, who, [date(2026, 10, 5)])
    assert (oct5.messages, oct5.readings) == (400, 1200)
    assert [e for e in billing.events(conn, who) if e["kind"] == "late_usage"] == []


# Pro goes from 790.00 to 890.00 on Oct 20 (scheduled on Oct 10).
# - Sao Paulo, cycle day 1 (Oct 1 to 31): Oct 1 to 19, 790 x 19 / 31 = 484.1935 -> 484.19;
#   Oct 20 to 31, 890 x 12 / 31 = 344.5161 -> 344.52; total 828.71.
# - Tokyo, cycle day 15 (Oct 15 to Nov 14): Oct 15 to 19, 790 x 5 / 31 = 127.4194 -> 127.42;
#   Oct 20 to Nov 14, 890 x 26 / 31 = 746.4516 -> 746.45; total 873.87.
@pytest.mark.parametrize(
    ("timezone", "cycle_day", "expected", "total"),
    [
        (
            "America/Sao_Paulo",
            1,
            [("base", 19, Decimal("484.19")), ("base", 12, Decimal("344.52"))],
            Decimal("828.71"),
        ),
        (
            "Asia/Tokyo",
            15,
            [("base", 5, Decimal("127.42")), ("base", 26, Decimal("746.45"))],
            Decimal("873.87"),
        ),
    ],
)
def test_a_price_change_scheduled_mid_period(conn, timezone, cycle_day, expected, total):
    who = make_tenant(conn, "acme", [("pro", START)], timezone=timezone, cycle_day=cycle_day)
    oct20 = date(2026, 10, 20)
    prices = billing.schedule_price(
        conn, "pro", oct20, {"monthly_price": Decimal("890.00")}, actor="finance", today=OCT
    )
    assert prices["monthly_price"] == Decimal("890.00")
    final = billing.bill(conn, who, OCT, today=date(2026, 11, 20))
    assert lines(final.invoice) == expected
    assert final.invoice.total == total
    audit = conn.execute(
        "SELECT actor, entity_id, detail FROM audit_log WHERE action = 'plan.price_scheduled'"
    ).fetchall()
    assert audit == [
        (
            "finance",
            "pro",
            {
                "valid_from": "2026-10-20",
                "before": {
                    "monthly_price": "790.00",
                    "overage_device_price": "None",
                    "overage_price_per_1k_messages": "None",
                    "overage_storage_price_per_gib": "None",
                },
                "after": {
                    "monthly_price": "890.00",
                    "overage_device_price": "None",
                    "overage_price_per_1k_messages": "None",
                    "overage_storage_price_per_gib": "None",
                },
            },
        )
    ]
    # October is final: a change inside it is refused and writes nothing; a later one leaves
    # October recomputing to its stored total
    with pytest.raises(BillingError, match="would change the final invoice 2026-10 of acme"):
        billing.schedule_price(
            conn, "pro", date(2026, 10, 25), {"monthly_price": Decimal(1)}, actor="x", today=OCT
        )
    billing.schedule_price(
        conn, "pro", date(2027, 1, 1), {"monthly_price": Decimal("990.00")}, actor="x", today=OCT
    )
    assert conn.execute("SELECT count(*) FROM plan_prices WHERE plan_id = 'pro'").fetchone() == (3,)
    again = billing.bill(conn, who, OCT, today=date(2026, 11, 20))
    assert (again.action, again.invoice.total) == ("unchanged", total)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="are versioned"):
        conn.execute("UPDATE plans SET monthly_price = 1 WHERE plan_id = 'pro'")


def test_the_cli_schedules_a_price_change_only_for_days_to_come(conn, cli_env, monkeypatch):
    for key in [k for k in cli_env if k.startswith("IIOT_")]:
        monkeypatch.setenv(key, cli_env[key])
    latest = billing.latest_local_date(conn)
    command = ["billing", "schedule-price", "--plan", "enterprise", "--actor", "finance"]
    result = CliRunner().invoke(main, [*command, "--from", f"{latest}", "--monthly-price", "1"])
    assert result.exit_code == 1
    assert f"must start on a day that has not begun anywhere: after {latest}" in result.output
    for args, message in (
        (["--monthly-price", "ten"], "bad --monthly-price 'ten'"),
        (["--monthly-price", "1.001"], "bad monthly price 1.001"),
        ([], "give one or more prices"),
    ):
        later = f"{latest + timedelta(days=30)}"
        result = CliRunner().invoke(main, [*command, "--from", later, *args])
        assert result.exit_code == 1
        assert message in result.output
    later = latest + timedelta(days=30)
    result = CliRunner().invoke(
        main, [*command, "--from", f"{later}", "--overage-per-1k-messages", "0.0600"]
    )
    assert result.exit_code == 0, result.output
    assert f"enterprise from {later}: monthly_price 4900.00" in result.output
    assert "overage_price_per_1k_messages 0.0600" in result.output
    assert conn.execute("SELECT count(*) FROM plan_prices").fetchone() == (4,)


def received(conn, who, device_id, *times) -> None:
    """One raw reading received at each time, and the ingest counter of its UTC hour."""
    for n, at in enumerate(times):
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value, received_at)"
            " VALUES (%s, %s, 'energy_kwh', %s, %s, %s)",
            (who.tenant_id, device_id, at, n, at),
        )
        conn.execute(
            "INSERT INTO ingest_usage (tenant_id, device_id, hour, messages, readings)"
            " VALUES (%s, %s, date_trunc('hour', %s::timestamptz, 'UTC'), 1, 1)"
            " ON CONFLICT (tenant_id, hour, device_id) DO UPDATE"
            " SET messages = ingest_usage.messages + 1, readings = ingest_usage.readings + 1",
            (who.tenant_id, device_id, at),
        )


# Readings received around the local midnights that bound October 1 to 10 (today Oct 11), in two
# zones with half-hour offsets. Billing counts a UTC hour on the local day it starts in; the old
# check counted from exact local midnight and raised false alarms.
# - Kolkata (UTC+5:30): Oct 10 18:15 and 18:45 UTC (23:45 Oct 10 and 00:15 Oct 11 local) are in
#   the hour 18:00, which starts Oct 10 23:30 local: both billed on Oct 10. Billed 2, raw 2 (the
#   old check: received before Oct 11 00:00 local = 18:30 UTC, 1).
# - St John's (UTC-2:30 in October): Oct 1 02:45 UTC (00:15 Oct 1 local) is in the hour 02:00,
#   which starts Sep 30 23:30 local: billed on Sep 30, outside the span. Oct 11 02:15 UTC (23:45
#   Oct 10 local): billed on Oct 10. Billed 1, raw 1 (the old check, from Oct 1 02:30 UTC: 2).
@pytest.mark.parametrize(
    ("timezone", "times", "expected"),
    [
        ("Asia/Kolkata", [utc(2026, 10, 10, 18, 15), utc(2026, 10, 10, 18, 45)], (2, 2)),
        ("America/St_Johns", [utc(2026, 10, 1, 2, 45), utc(2026, 10, 11, 2, 15)], (1, 1)),
    ],
)
def test_reconciliation_assigns_readings_to_days_as_billing_does(conn, timezone, times, expected):
    who = make_tenant(conn, "acme", [("pro", START)], timezone=timezone)
    [device] = registry.provision_devices(
        conn, "acme", [registry.DeviceRequest("02:00:00:00:0b:01", "energy")]
    )
    storage_for(conn).ensure_partitions(conn, date(2026, 9, 29), date(2026, 10, 12))
    received(conn, who, device.device_id, *times)
    today = date(2026, 10, 11)
    billing.bill(conn, who, OCT, today=today)
    assert billing.reconcile(conn, who, billing.period_of(OCT, 1), today) == expected
    # the bulk check's form: one day, many tenants
    assert billing.reconcile_many(
        conn, [(who.tenant_id, date(2026, 10, 10), date(2026, 10, 10))]
    ) == {who.tenant_id: expected}


# Starter includes 10 devices, 1 GiB (1,073,741,824 bytes) and, at 6 messages a minute per
# included device over a 31-day period, 10 x 6 x 1440 x 31 = 2,678,400 messages. Four days of
# 535,680 messages = 2,142,720 = 80 % of them; 8 devices = 80 %; 858,993,460 bytes = 80.0 % of
# 1 GiB (80 % is 858,993,459.2). The fifth day: 2,678,400 messages, 10 devices, 1 GiB, all 100 %.
# The sixth day adds nothing: once per threshold and period. Sao Paulo (cycle day 1, Oct 1 to 31)
# and Tokyo (cycle day 15, Oct 15 to Nov 14) both have 31-day periods.
@pytest.mark.parametrize(("timezone", "cycle_day"), [("America/Sao_Paulo", 1), ("Asia/Tokyo", 15)])
def test_quota_notices_at_80_and_100_percent_once_per_period(conn, timezone, cycle_day):
    who = make_tenant(conn, "small", [("starter", START)], timezone=timezone, cycle_day=cycle_day)
    first = date(2026, 10, cycle_day)
    days = [first + timedelta(days=n) for n in range(6)]
    usage_rows(conn, who, days, messages=535_680)

    def notices(day, devices, storage):
        [usage] = billing.load_daily_usage(conn, who, [day])
        usage.provisioned_devices, usage.storage_bytes = devices, storage
        return {
            (n.detail["quota"], n.detail["threshold"], n.detail["percent"])
            for n in billing.quota_notices(conn, [(who, usage)], actor="test")
        }

    assert notices(days[3], 8, 858_993_460) == {
        ("devices", 80, 80.0),
        ("messages", 80, 80.0),
        ("storage", 80, 80.0),
    }
    assert notices(days[4], 10, GIB) == {
        ("devices", 100, 100.0),
        ("messages", 100, 100.0),
        ("storage", 100, 100.0),
    }
    assert notices(days[5], 10, GIB) == set()
    trail = [e for e in billing.events(conn, who) if e["kind"] == "quota_notice"]
    assert len(trail) == 6
    assert {e["period"] for e in trail} == {OCT}

    posted = []
    notifier = alerts.Notifier(
        webhook_url="http://hooks.example/billing",
        post=lambda url, body, timeout: posted.append(json.loads(body)) or 200,
    )
    sent = billing_alerts.send_quota_notices(conn, notifier, [who.tenant_id])
    assert [(a.severity, a.title) for a in sent][:2] == [
        (
            "WARNING",
            "small: devices at 80.0% of the starter plan's 10 devices (8 devices, period 2026-10)",
        ),
        (
            "WARNING",
            "small: messages at 80.0% of the starter plan's 2,678,400 messages (2,142,720"
            " messages, period 2026-10)",
        ),
    ]
    assert sorted(p["key"] for p in posted) == sorted(
        f"billing:quota:small:2026-10:{q}:{t}"
        for q in ("devices", "messages", "storage")
        for t in (80, 100)
    )
    assert billing_alerts.send_quota_notices(conn, notifier, [who.tenant_id]) == []
    assert len(posted) == 6


def test_a_downgrade_below_current_usage_is_refused_unless_forced(conn, cli_env, monkeypatch):
    """1,012 devices onto starter (10 included), and a pro tenant storing 2 GiB on its latest day
    onto starter (1 GiB): refused with the numbers, nothing changed; --force changes it."""
    for key in [k for k in cli_env if k.startswith("IIOT_")]:
        monkeypatch.setenv(key, cli_env[key])
    big = make_tenant(conn, "big", [("enterprise", START)])
    conn.execute(
        "INSERT INTO devices (tenant_id, mac, name, meter_kind)"
        " SELECT %s, ('02:00:00:01:' || lpad(to_hex(n / 256), 2, '0') || ':'"
        "             || lpad(to_hex(n %% 256), 2, '0'))::macaddr, 'm', 'energy'"
        "   FROM generate_series(0, 1011) n",
        (big.tenant_id,),
    )
    mid = make_tenant(conn, "mid", [("pro", START)])
    usage_rows(conn, mid, [date(2026, 10, 10)], storage_bytes=2 * GIB)
    for slug, message in (
        ("big", "big uses more than starter includes (1,012 devices, starter includes 10)"),
        (
            "mid",
            "mid uses more than starter includes (2.00 GiB stored on 2026-10-10, starter"
            " includes 1.00 GiB)",
        ),
    ):
        result = CliRunner().invoke(main, ["tenants", "set-plan", slug, "starter"])
        assert result.exit_code == 1
        assert message in result.output
        assert "--force" in result.output
    plans = dict(conn.execute("SELECT slug, plan_id FROM tenants").fetchall())
    assert plans == {"big": "enterprise", "mid": "pro"}
    forced = CliRunner().invoke(main, ["tenants", "set-plan", "big", "starter", "--force"])
    assert forced.exit_code == 0, forced.output
    assert "over starter's quotas, forced: 1,012 devices, starter includes 10" in forced.output
    assert billing.tenant(conn, "big").plan_id == "starter"


# Enterprise with 1,060 devices (60 over the 1,000 included) every day of a 30-day period, and
# 12,345 messages over the rate on one day:
# - device-days: 60 x 30 = 1,800 x 4.90 x 1/30 = 294.00 (not 1,800 x 4.90 = 8,820.00);
# - base: 30 days x 4,900.00 x 1/30 = 4,900.00; messages: 12,345 x 0.05 x 1/1000 = 0.61725
#   -> 0.62; total 5,194.62.
# Sao Paulo, cycle day 1: November (Nov 1 to 30); Tokyo, cycle day 15: Nov 15 to Dec 14.
@pytest.mark.parametrize(("timezone", "cycle_day"), [("America/Sao_Paulo", 1), ("Asia/Tokyo", 15)])
def test_prorated_lines_state_their_fraction(conn, tmp_path, timezone, cycle_day):
    who = make_tenant(conn, "acme", [("enterprise", START)], timezone=timezone, cycle_day=cycle_day)
    nov = date(2026, 11, 1)
    period = billing.period_of(nov, cycle_day)
    assert period.days == 30
    days = period.dates()
    usage_rows(conn, who, days[:1], provisioned_devices=1060, overage_messages=12_345)
    usage_rows(conn, who, days[1:], provisioned_devices=1060)
    invoice = billing.compute_invoice(conn, who, nov, today=period.end)
    assert [(x.kind, x.quantity, x.unit_price, x.fraction, x.amount) for x in invoice.lines] == [
        ("base", 30, Decimal("4900.00"), Fraction(1, 30), Decimal("4900.00")),
        ("overage_devices", 1800, Decimal("4.9000"), Fraction(1, 30), Decimal("294.00")),
        ("overage_messages", 12345, Decimal("0.0500"), Fraction(1, 1000), Decimal("0.62")),
    ]
    for x in invoice.lines:  # on the invoice's face
        exact = x.quantity * x.unit_price * x.fraction.numerator / x.fraction.denominator
        assert billing.money(exact) == x.amount
    assert invoice.total == Decimal("5194.62")
    files = billing_exports.export(tmp_path, who, invoice)
    sheet = list(load_workbook(files.xlsx).active.iter_rows(values_only=True))
    last = f"{period.end - timedelta(days=1)}"
    assert sheet[1][:3] == ("Period", f"{period.start}", f"{period.end} (exclusive)")
    assert f"(end exclusive: the last day is {last})" in sheet[1][3]
    assert sheet[4][5:8] == ("Unit price", "Fraction", "Amount")
    assert [row[5:8] for row in sheet[5:8]] == [
        (4900, "1/30", 4900),
        (4.9, "1/30", 294),
        (0.05, "1/1000", 0.62),
    ]
    text = " ".join(pdf_text(files.pdf).split())
    assert f"{period.end} (end exclusive: the last day is {last})" in text
    assert "Fraction" in text
    assert "1/30" in text
