"""`iiot archive ...` and `iiot tenants delete` against the real PostgreSQL: the nightly run by
hand, list, verify, a restore round trip, a corrupted archive refused, tenant removal in
dependency order with its audit trail, and malformed, hostile and repeated input."""

import json
from datetime import timedelta

import psycopg
import pytest
from click.testing import CliRunner

from iiot_orchestration import archive, retention
from iiot_orchestration.cli import main
from tests.test_retention import RUN_DAY, TODAY, ago, left, make_fleet, midnight, raw


@pytest.fixture
def fleet(conn):
    return make_fleet(conn)


@pytest.fixture
def iiot(database_url, tmp_path, monkeypatch):
    """Run `iiot ...` against the test's database, archives under tmp_path."""
    monkeypatch.setenv("IIOT_DATABASE_URL", database_url)
    monkeypatch.setenv("IIOT_ARCHIVE_ROOT", str(tmp_path / "archive"))
    monkeypatch.setenv("IIOT_RETENTION_BATCH_ROWS", "100")

    def invoke(*args):
        return CliRunner().invoke(main, list(args))

    invoke.root = tmp_path / "archive"
    return invoke


def one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_archive_and_tenant_deletion_have_help():
    result = CliRunner().invoke(main, ["archive", "--help"])
    assert result.exit_code == 0
    for command in ("run", "list", "verify", "restore"):
        assert command in result.output
    assert "delete" in CliRunner().invoke(main, ["tenants", "--help"]).output


def test_run_list_verify_and_a_restore_round_trip(iiot, conn, fleet):
    run = iiot("archive", "run")
    assert run.exit_code == 0, run.output
    assert "11 tenant-days" in run.output
    assert left(conn, fleet) == fleet.expected_left()

    listed = json.loads(iiot("archive", "list", "--tenant", "short", "--json").output)
    assert [r["day"] for r in listed] == [str(ago(n)) for n in range(10, 3, -1)]
    assert all(r["rows"] == r["removed"] == 9 for r in listed)
    table = iiot("archive", "list", "--from", str(ago(6)), "--to", str(ago(5)))
    assert table.exit_code == 0
    assert "2 archives under" in table.output  # short's of 6 and 5 days ago
    verified = iiot("archive", "verify")
    assert verified.exit_code == 0
    assert "11 archives verified" in verified.output

    restored = iiot(
        "archive", "restore", "--tenant", "short", "--from", str(ago(10)), "--to", str(ago(4))
    )
    assert restored.exit_code == 0, restored.output
    assert "Restored 7 days of short: 63 readings put back" in restored.output
    for n in range(4, 11):
        assert raw(conn, fleet.tenants["short"], ago(n)) == fleet.readings[("short", ago(n))]
    again = iiot(
        "archive", "restore", "--tenant", "short", "--from", str(ago(10)), "--to", str(ago(4))
    )
    assert again.exit_code == 0
    assert "0 readings put back" in again.output
    [detail] = conn.execute(
        "SELECT detail FROM audit_log WHERE action = 'archive.restored' ORDER BY audit_id LIMIT 1"
    ).fetchone()
    assert (detail["inserted"], detail["hold_until"]) == (63, str(TODAY + timedelta(days=7)))
    held = json.loads(iiot("archive", "list", "--tenant", "short", "--json").output)
    assert {r["hold_until"] for r in held} == {str(TODAY + timedelta(days=7))}
    assert iiot("archive", "run").exit_code == 0  # held: the restored days stay
    assert raw(conn, fleet.tenants["short"], ago(4)) == fleet.readings[("short", ago(4))]


def test_a_restore_refuses_a_corrupted_archive_and_loads_nothing(iiot, conn, fleet):
    assert iiot("archive", "run").exit_code == 0
    path = iiot.root / archive.parquet_path(fleet.tenants["short"], ago(5))
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01
    path.write_bytes(bytes(data))
    result = iiot(
        "archive", "restore", "--tenant", "short", "--from", str(ago(7)), "--to", str(ago(4))
    )
    one_line_error(result, str(path), "corrupted")
    for n in range(4, 8):
        assert raw(conn, fleet.tenants["short"], ago(n)) == []
    checked = iiot("archive", "verify", "--tenant", "short")
    assert checked.exit_code == 1
    assert "1 of 7 archives failed verification" in checked.output
    assert iiot("archive", "verify", "--tenant", "long").exit_code == 0


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["--tenant", "short", "--from", "2026-13-01", "--to", "2026-12-01"], 2, "is not a day"),
        (["--tenant", "short", "--from", "20261101", "--to", "2026-12-01"], 2, "is not a day"),
        (["--tenant", "short", "--from", "2026-11-01'; DROP", "--to", "x"], 2, "is not a day"),
        (["--tenant", "short", "--from", "2026-11-10", "--to", "2026-11-01"], 2, "before --from"),
        (["--tenant", "short", "--from", "2026-11-01"], 2, "Missing option '--to'"),
        (
            [
                "--tenant",
                "short",
                "--from",
                "2026-01-01",
                "--to",
                "2026-01-02",
                "--hold-days",
                "-1",
            ],
            2,
            "-1",
        ),
        (
            ["--tenant", "nobody\x1b[31m", "--from", "2026-01-01", "--to", "2026-01-02"],
            1,
            "unknown tenant",
        ),
        (
            ["--tenant", "x" * 500, "--from", "2026-01-01", "--to", "2026-01-02"],
            1,
            "unknown tenant",
        ),
        (["--tenant", "short", "--from", "2000-01-01", "--to", "2026-01-02"], 1, "at most 3661"),
        (["--tenant", "short", "--from", "2026-01-01", "--to", "2026-01-02"], 1, "no archives"),
    ],
)
def test_restore_refuses_bad_input_clearly(iiot, fleet, args, code, expected):
    result = iiot("archive", "restore", *args)
    assert result.exit_code == code, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert len(result.output) < 600


def test_run_refuses_a_day_that_has_not_ended(iiot, fleet, conn):
    result = iiot("archive", "run", "--day", str(TODAY))
    assert result.exit_code == 2
    assert "has not ended yet" in result.output
    assert iiot("archive", "list", "--tenant", "ghost").exit_code == 1
    assert left(conn, fleet) == {k: len(v) for k, v in fleet.readings.items()}
    older = iiot("archive", "run", "--day", str(RUN_DAY - timedelta(days=2)))
    assert older.exit_code == 0  # a run for an older day removes less
    assert ("short", ago(4)) in left(conn, fleet)
    assert ("short", ago(6)) not in left(conn, fleet)


def add_tenant_data(conn, tenant_id, devices):
    """Rows that refer to the tenant and its devices, as the other domains write them."""
    energy, water = devices
    conn.execute(
        "INSERT INTO device_certificates (tenant_id, device_id, serial, subject_cn,"
        " fingerprint_sha256, not_before, not_after, certificate_pem)"
        " VALUES (%s, %s, 4242, 'cn', %s, now(), now() + interval '10 years', 'pem')",
        (tenant_id, energy, "f" * 64),
    )
    conn.execute(
        "INSERT INTO alert_rules (tenant_id, device_id, metric, name, kind, threshold, severity,"
        " created_by) VALUES (%s, %s, 'power_w', 'high', 'above', 10, 'WARNING', 'test')",
        (tenant_id, water),
    )
    conn.execute(
        "INSERT INTO dead_letters (topic, tenant_id, reason, payload, payload_size)"
        " VALUES ('t', %s, 'bad_payload', 'x', 1)",
        (tenant_id,),
    )
    conn.execute(
        "INSERT INTO telemetry_hourly (tenant_id, device_id, metric, bucket, readings, value_sum,"
        " value_min, value_max, value_avg, first_ts, first_value, last_ts, last_value)"
        " VALUES (%s, %s, 'power_w', %s, 1, 1, 1, 1, 1, %s, 1, %s, 1)",
        (tenant_id, energy, midnight(ago(1)), midnight(ago(1)), midnight(ago(1))),
    )
    conn.execute(
        "INSERT INTO invoices (tenant_id, period, period_start, period_end, status, currency,"
        " total, inputs_sha256, days_billed, finalised_at)"
        " VALUES (%s, '2026-10-01', '2026-10-01', '2026-11-01', 'final', 'BRL', 790, 'x', 31,"
        " now())",
        (tenant_id,),
    )


def test_tenant_delete_archives_then_removes_in_dependency_order(iiot, conn, fleet):
    short = fleet.tenants["short"]
    devices = [
        r[0]
        for r in conn.execute(
            "SELECT device_id FROM devices WHERE tenant_id = %s ORDER BY device_id", (short,)
        )
    ]
    add_tenant_data(conn, short, devices)

    unconfirmed = iiot("tenants", "delete", "short")
    assert unconfirmed.exit_code == 2
    assert "add --yes" in unconfirmed.output
    dry = iiot("tenants", "delete", "short", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    [plan] = json.loads(dry.output)
    assert plan["steps"]["telemetry"] == 90
    assert (plan["steps"]["alert_rules"], plan["steps"]["devices"]) == (1, 2)
    assert (
        conn.execute("SELECT status FROM tenants WHERE tenant_id = %s", (short,)).fetchone()[0]
        == "active"
    )
    assert sum(n for (slug, _), n in left(conn, fleet).items() if slug == "short") == 90

    done = iiot("tenants", "delete", "short", "--yes")
    assert done.exit_code == 0, done.output
    assert "90 readings of 10 days archived" in done.output
    assert not [k for k in left(conn, fleet) if k[0] == "short"]
    assert {k: v for k, v in left(conn, fleet).items() if k[0] == "long"} == {
        k: len(v) for k, v in fleet.readings.items() if k[0] == "long"
    }
    records = retention.records(conn, short)
    assert len(records) == 10
    assert {(r.deleted_by, r.rows, r.deleted_rows) for r in records} == {("tenant_removal", 9, 9)}
    status, deleted_at = conn.execute(
        "SELECT status, deleted_at FROM tenants WHERE tenant_id = %s", (short,)
    ).fetchone()
    assert status == "deleted"
    assert deleted_at is not None
    # the metered device kept its (now revoked) certificate for the CRL; the other is gone
    assert conn.execute(
        "SELECT device_id, status FROM devices WHERE tenant_id = %s", (short,)
    ).fetchall() == [(devices[0], "decommissioned")]
    assert conn.execute(
        "SELECT status FROM device_certificates WHERE tenant_id = %s", (short,)
    ).fetchall() == [("revoked",)]
    for table in ("alert_rules", "dead_letters", "telemetry_hourly", "device_metrics"):
        assert (
            conn.execute(f"SELECT count(*) FROM {table} WHERE tenant_id = %s", (short,)).fetchone()[
                0
            ]
            == 0
        ), table
    assert (
        conn.execute("SELECT count(*) FROM invoices WHERE tenant_id = %s", (short,)).fetchone()[0]
        == 1
    )
    actions = [
        a
        for (a,) in conn.execute(
            "SELECT action FROM audit_log WHERE tenant_id = %s AND action LIKE 'tenant.%%'"
            " ORDER BY audit_id",
            (short,),
        )
    ]
    assert actions == ["tenant.created", "tenant.deletion_started", "tenant.deleted"]

    one_line_error(iiot("tenants", "delete", "short", "--yes"), "already deleted")
    one_line_error(
        iiot("archive", "restore", "--tenant", "short", "--from", str(ago(9)), "--to", str(ago(1))),
        "deleted",
    )
    one_line_error(iiot("tenants", "delete", "nobody", "--yes"), "unknown tenant")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="cannot be reactivated"):
        conn.execute("UPDATE tenants SET status = 'active' WHERE tenant_id = %s", (short,))
    assert iiot("archive", "verify", "--tenant", "short").exit_code == 0


def test_a_tenant_deletion_stopped_by_a_bad_archive_resumes(iiot, conn, fleet, database_url):
    short = fleet.tenants["short"]
    store = archive.open_store(iiot.root)
    with psycopg.connect(database_url, autocommit=True) as service:
        retention.ensure_archive(service, store, short, "short", ago(2))
    path = iiot.root / archive.parquet_path(short, ago(2))
    good = path.read_bytes()
    path.write_bytes(good[:-1])
    one_line_error(iiot("tenants", "delete", "short", "--yes"), str(path))
    # suspended (ingest refuses it) and its earlier days gone, the rest untouched
    assert (
        conn.execute("SELECT status FROM tenants WHERE tenant_id = %s", (short,)).fetchone()[0]
        == "suspended"
    )
    assert raw(conn, short, ago(2)) == fleet.readings[("short", ago(2))]
    assert raw(conn, short, ago(1)) == fleet.readings[("short", ago(1))]
    assert (
        conn.execute("SELECT count(*) FROM devices WHERE tenant_id = %s", (short,)).fetchone()[0]
        == 2
    )
    path.write_bytes(good)
    assert iiot("tenants", "delete", "short", "--yes").exit_code == 0
    assert not [k for k in left(conn, fleet) if k[0] == "short"]
