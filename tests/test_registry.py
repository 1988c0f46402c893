import threading
import time

import psycopg
import pytest
from psycopg import sql

from iiot_orchestration import registry
from iiot_orchestration.db import set_tenant
from iiot_orchestration.registry import (
    MAX_CSV_BYTES,
    MAX_CSV_ROWS,
    DeviceRequest,
    RegistryError,
    normalise_mac,
    parse_device_csv,
)


@pytest.mark.parametrize(
    "raw",
    [
        "AA:BB:CC:00:11:22",
        "aa-bb-cc-00-11-22",
        "aabb.cc00.1122",
        "AABBCC001122",
        "  aa:bb:cc:00:11:22 ",
    ],
)
def test_mac_spellings_normalise_to_one_form(raw):
    assert normalise_mac(raw) == "aa:bb:cc:00:11:22"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "expected 12 hex digits"),
        ("zz:bb:cc:00:11:22", "expected 12 hex digits"),
        ("aa:bb:cc:00:11", "expected 12 hex digits"),
        ("aa:bb:cc:00:11:22:33", "expected 12 hex digits"),
        ("aa:bb-cc:00:11:22", "expected 12 hex digits"),
        ("'; DROP TABLE devices; --", "expected 12 hex digits"),
        ("\uff10\uff12" * 6, "expected 12 hex digits"),
        ("aa:bb:cc:00:11:22\x00", "expected 12 hex digits"),
        ("x" * 10_000, "expected 12 hex digits"),
        ("01:00:5e:00:00:01", "multicast"),
        ("ff:ff:ff:ff:ff:ff", "multicast"),
        ("00:00:00:00:00:00", "all-zero"),
    ],
)
def test_bad_macs_are_refused_with_a_reason(raw, reason):
    with pytest.raises(RegistryError, match=reason) as info:
        normalise_mac(raw)
    assert len(str(info.value)) < 250


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("x" * 101, "longer than 100"),
        ("bad\x1b[31mname", "control characters"),
        ("line\nbreak", "control characters"),
        ('=HYPERLINK("http://evil")', "formula"),
        ("@SUM(A1)", "formula"),
    ],
)
def test_hostile_names_are_refused(name, reason):
    with pytest.raises(RegistryError, match=reason):
        registry.clean_name(name)


def test_unicode_names_are_kept():
    assert registry.clean_name("  Caldeira São João ") == "Caldeira São João"


def make_tenant(conn, slug="acme", plan="starter"):
    return registry.create_tenant(
        conn, slug=slug, name=slug.title(), plan=plan, timezone="America/Sao_Paulo"
    )


def test_create_tenant_records_plan_history_and_audit(conn):
    tenant = make_tenant(conn, plan="pro")
    assert (tenant.plan_id, tenant.included_devices, tenant.retention_days) == ("pro", 100, 180)
    history = conn.execute(
        "SELECT plan_id, valid_to, changed_by FROM tenant_plan_history WHERE tenant_id = %s",
        (tenant.tenant_id,),
    ).fetchall()
    assert history == [("pro", None, "cli")]
    actions = [r[0] for r in conn.execute("SELECT action FROM audit_log")]
    assert actions == ["tenant.created"]


def test_plan_change_closes_the_previous_period(conn):
    tenant = make_tenant(conn)
    conn.execute("UPDATE tenants SET plan_id = 'pro' WHERE tenant_id = %s", (tenant.tenant_id,))
    conn.execute(
        "UPDATE tenants SET plan_id = 'enterprise' WHERE tenant_id = %s", (tenant.tenant_id,)
    )
    conn.execute(
        "UPDATE tenants SET name = 'no plan change' WHERE tenant_id = %s", (tenant.tenant_id,)
    )
    rows = conn.execute(
        "SELECT plan_id, valid_from, valid_to FROM tenant_plan_history"
        " WHERE tenant_id = %s ORDER BY valid_from",
        (tenant.tenant_id,),
    ).fetchall()
    assert [r[0] for r in rows] == ["starter", "pro", "enterprise"]
    assert rows[0][2] == rows[1][1]
    assert rows[1][2] == rows[2][1]
    assert rows[2][2] is None


def test_retention_override_wins_over_plan(conn):
    tenant = registry.create_tenant(
        conn, slug="keep", name="Keep", plan="starter", timezone="UTC", retention_days=400
    )
    assert tenant.retention_days == 400


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"slug": "Bad Slug"}, "bad tenant slug"),
        ({"slug": "a"}, "bad tenant slug"),
        ({"slug": "x" * 100}, "bad tenant slug"),
        ({"slug": "acme'; drop table tenants;--"}, "bad tenant slug"),
        ({"plan": "platinum"}, "unknown plan 'platinum'"),
        ({"timezone": "Nowhere/City"}, "unknown time zone"),
        ({"locale": "fr"}, "unknown locale"),
        ({"retention_days": 0}, "retention days"),
        ({"billing_cycle_day": 31}, "billing cycle day"),
        ({"name": "=cmd|' /C calc'!A0"}, "formula"),
    ],
)
def test_bad_tenant_requests_are_refused(conn, kwargs, reason):
    request = {"slug": "fine", "name": "Fine", "plan": "starter", "timezone": "UTC", **kwargs}
    with pytest.raises(RegistryError, match=reason):
        registry.create_tenant(conn, **request)
    assert conn.execute("SELECT count(*) FROM tenants").fetchone()[0] == 0


def test_duplicate_tenant_is_refused(conn):
    make_tenant(conn)
    with pytest.raises(RegistryError, match="already exists"):
        make_tenant(conn)


def test_provision_uses_default_metrics_and_audits(conn):
    make_tenant(conn)
    [result] = registry.provision_devices(conn, "acme", [DeviceRequest("AABBCC000001", "water")])
    assert result.status == "provisioned"
    assert result.mac == "aa:bb:cc:00:00:01"
    [device] = registry.list_devices(conn, "acme")
    assert device["metrics"] == ["water_m3"]
    assert device["name"] == "water-000001"
    assert (
        conn.execute(
            "SELECT count(*) FROM audit_log WHERE action = 'device.provisioned'"
        ).fetchone()[0]
        == 1
    )


def test_provision_with_explicit_metrics(conn):
    make_tenant(conn)
    [result] = registry.provision_devices(
        conn,
        "acme",
        [
            DeviceRequest(
                "aa:bb:cc:00:00:02", "energy", "Panel", ("energy_kwh", "voltage_v", "temperature_c")
            )
        ],
    )
    assert result.status == "provisioned"
    [device] = registry.list_devices(conn)
    assert device["metrics"] == ["energy_kwh", "temperature_c", "voltage_v"]


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (DeviceRequest("aa:bb:cc:00:00:03", "energy", metrics=("co2_ppm",)), "unknown metric"),
        (DeviceRequest("aa:bb:cc:00:00:03", "energy", metrics=("water_m3",)), "belongs to water"),
        (DeviceRequest("aa:bb:cc:00:00:03", "steam"), "unknown meter kind"),
        (DeviceRequest("not-a-mac", "energy"), "bad MAC"),
    ],
)
def test_bad_device_requests_are_rejected_per_row(conn, request_, reason):
    make_tenant(conn)
    [result] = registry.provision_devices(conn, "acme", [request_])
    assert result.status == "rejected"
    assert reason in result.message
    assert registry.list_devices(conn) == []


def test_unknown_tenant_is_refused(conn):
    with pytest.raises(RegistryError, match="unknown tenant 'ghost'"):
        registry.provision_devices(conn, "ghost", [DeviceRequest("aa:bb:cc:00:00:04", "gas")])
    with pytest.raises(RegistryError, match="unknown tenant"):
        registry.list_devices(conn, "ghost")


def test_suspended_tenant_gets_no_devices(conn):
    make_tenant(conn)
    conn.execute("UPDATE tenants SET status = 'suspended'")
    with pytest.raises(RegistryError, match="suspended"):
        registry.provision_devices(conn, "acme", [DeviceRequest("aa:bb:cc:00:00:05", "gas")])


def test_duplicate_mac_same_tenant_is_skipped_other_tenant_is_rejected(conn):
    make_tenant(conn, "acme")
    make_tenant(conn, "other")
    request = DeviceRequest("aa:bb:cc:00:00:06", "gas")
    assert registry.provision_devices(conn, "acme", [request])[0].status == "provisioned"
    again = registry.provision_devices(conn, "acme", [DeviceRequest("AA-BB-CC-00-00-06", "gas")])
    assert (again[0].status, again[0].message) == ("skipped", "already provisioned")
    kind = registry.provision_devices(conn, "acme", [DeviceRequest("aa:bb:cc:00:00:06", "water")])
    assert kind[0].status == "rejected"
    assert "as a gas meter" in kind[0].message
    stolen = registry.provision_devices(conn, "other", [request])
    assert stolen[0].status == "rejected"
    assert "another tenant" in stolen[0].message
    assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == 1


def _macs(count, prefix="02:00:00:00"):
    return [DeviceRequest(f"{prefix}:{i // 256:02x}:{i % 256:02x}", "energy") for i in range(count)]


@pytest.mark.parametrize("plan", ["starter", "pro"])
def test_hard_blocked_plans_refuse_devices_over_quota(conn, plan):
    tenant = make_tenant(conn, plan=plan)
    results = registry.provision_devices(conn, "acme", _macs(tenant.included_devices + 2))
    statuses = [r.status for r in results]
    assert statuses.count("provisioned") == tenant.included_devices
    assert statuses[-2:] == ["rejected", "rejected"]
    assert "device quota reached" in results[-1].message
    blocks = conn.execute(
        "SELECT count(*) FROM audit_log WHERE action = 'quota.device_blocked'"
    ).fetchone()[0]
    assert blocks == 2


def test_enterprise_goes_over_quota_for_overage(conn):
    make_tenant(conn, plan="enterprise")
    conn.execute("UPDATE plans SET included_devices = 3 WHERE plan_id = 'enterprise'")
    results = registry.provision_devices(conn, "acme", _macs(5))
    assert [r.status for r in results] == ["provisioned"] * 5


def test_decommissioned_devices_free_quota(conn):
    make_tenant(conn)
    registry.provision_devices(conn, "acme", _macs(10))
    conn.execute("UPDATE devices SET status = 'decommissioned' WHERE mac = '02:00:00:00:00:00'")
    [result] = registry.provision_devices(conn, "acme", _macs(1, prefix="02:00:00:01"))
    assert result.status == "provisioned"


def _provision_as(conn, role, tenant, requests):
    """provision_devices in the transaction of ``conn`` (not autocommit; the caller commits) as
    ``role`` (None: the login itself), app_rw scoped to the tenant as the API scopes it."""
    assert not conn.autocommit
    conn.execute("SELECT 1")  # the transaction begins: provision_devices' is a savepoint in it
    if role is not None:
        conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
    if role == "app_rw":
        set_tenant(conn, tenant.tenant_id)
    return registry.provision_devices(conn, tenant.slug, requests, actor="test")


@pytest.mark.parametrize("role", [None, "platform_rw", "app_rw"])
def test_concurrent_provisionings_never_pass_the_quota(conn, database_url, role):
    """The second provisioning waits for the first's tenant lock and then counts the device the
    first committed: one of two devices for the last place is refused."""
    tenant = make_tenant(conn)
    registry.provision_devices(conn, "acme", _macs(tenant.included_devices - 1))
    results = {}
    with psycopg.connect(database_url) as first, psycopg.connect(database_url) as second:
        # the first holds the tenant's lock until it commits (its connection's transaction)
        results["first"] = _provision_as(first, role, tenant, _macs(1, prefix="02:00:00:01"))

        def provision_second():
            try:
                results["second"] = _provision_as(
                    second, role, tenant, _macs(1, prefix="02:00:00:02")
                )
                second.commit()
            except BaseException as exc:  # shown by the assertions below
                results["second"] = exc

        thread = threading.Thread(target=provision_second)
        thread.start()
        deadline = time.monotonic() + 30
        while conn.execute(
            "SELECT wait_event_type IS DISTINCT FROM 'Lock' FROM pg_stat_activity WHERE pid = %s",
            (second.info.backend_pid,),
        ).fetchone()[0]:
            assert time.monotonic() < deadline, "the second provisioning never waited"
            assert thread.is_alive(), results
            time.sleep(0.02)
        first.commit()
        thread.join(30)
    assert [r.status for r in results["first"]] == ["provisioned"]
    [refused] = results["second"]
    assert (refused.status, refused.message) == (
        "rejected",
        f"device quota reached: plan starter includes {tenant.included_devices} devices and the "
        f"tenant has {tenant.included_devices}",
    )
    devices = conn.execute("SELECT count(*) FROM devices").fetchone()[0]
    assert devices == tenant.included_devices


def test_a_tenant_session_is_never_told_whose_mac_it_is(conn, database_url):
    """As the tenant API provisions (app_rw under row security): one message for a MAC of
    another tenant and for one of its own as another meter kind."""
    acme, other = make_tenant(conn, "acme"), make_tenant(conn, "other")
    registry.provision_devices(conn, "acme", [DeviceRequest("aa:bb:cc:00:00:07", "gas")])
    registry.provision_devices(conn, "other", [DeviceRequest("aa:bb:cc:00:00:08", "gas")])
    with psycopg.connect(database_url) as session:
        results = _provision_as(
            session,
            "app_rw",
            acme,
            [
                DeviceRequest("aa:bb:cc:00:00:07", "gas", line=1),
                DeviceRequest("aa:bb:cc:00:00:07", "water", line=2),
                DeviceRequest("aa:bb:cc:00:00:08", "gas", line=3),
                DeviceRequest("aa:bb:cc:00:00:09", "gas", line=4),
            ],
        )
        with pytest.raises(RegistryError, match="unknown tenant 'other'"):  # not its own
            registry.provision_devices(
                session, other.slug, [DeviceRequest("02:00:00:00:00:0a", "gas")]
            )
    assert [(r.status, r.message, r.reason) for r in results[:3]] == [
        ("skipped", "already provisioned", None),
        ("rejected", "duplicate MAC: already registered", registry.DUPLICATE),
        ("rejected", "duplicate MAC: already registered", registry.DUPLICATE),
    ]
    assert results[3].status == "provisioned"


GOOD_CSV = b"""mac,meter_kind,name,metrics
aa:bb:cc:00:01:01,energy,Main board,energy_kwh|power_w
AABBCC000102,water,,
aabb.cc00.0103,gas,Boiler,
"""


def test_parse_good_csv():
    parsed = parse_device_csv(GOOD_CSV)
    assert parsed.rejected == []
    assert [(r.line, r.mac, r.meter_kind) for r in parsed.requests] == [
        (2, "aa:bb:cc:00:01:01", "energy"),
        (3, "aa:bb:cc:00:01:02", "water"),
        (4, "aa:bb:cc:00:01:03", "gas"),
    ]
    assert parsed.requests[0].metrics == ("energy_kwh", "power_w")
    assert parsed.requests[1].name is None


def test_parse_excel_style_csv_with_bom_and_semicolons():
    data = "\ufeffMAC;Meter_Kind;Name\r\naa:bb:cc:00:01:01;energy;Caldeira São João\r\n"
    parsed = parse_device_csv(data.encode("utf-8"))
    assert parsed.rejected == []
    assert parsed.requests[0].name == "Caldeira São João"


def test_parse_reports_every_bad_row_with_its_line():
    data = (
        b"""mac,meter_kind,name
aa:bb:cc:00:01:01,energy,ok
not-a-mac,energy,bad mac
aa:bb:cc:00:01:02,plasma,bad kind
aa:bb:cc:00:01:03,energy,too,many,fields

aa:bb:cc:00:01:01,energy,duplicate
aa:bb:cc:00:01:04,energy,=cmd|' /C calc'!A0
aa:bb:cc:00:01:05,energy,"""
        + b"x" * 300
        + b"\n"
    )
    parsed = parse_device_csv(data)
    assert [r.line for r in parsed.requests] == [2]
    rejected = {r.line: r.message for r in parsed.rejected}
    assert sorted(rejected) == [3, 4, 5, 7, 8, 9]
    assert "bad MAC" in rejected[3]
    assert "unknown meter kind" in rejected[4]
    assert "expected 3 fields, found 5" in rejected[5]
    assert "first seen on line 2" in rejected[7]
    assert "formula" in rejected[8]
    assert "longer than" in rejected[9]


def test_a_row_without_the_optional_trailing_fields_gets_their_defaults():
    data = (
        b"mac,meter_kind,name,metrics\n"
        b"aa:bb:cc:00:01:01,energy\n"
        b"aa:bb:cc:00:01:02,water,Inlet\n"
        b"aa:bb:cc:00:01:03,gas,Boiler,gas_m3\n"
    )
    parsed = parse_device_csv(data)
    assert parsed.rejected == []
    assert [(r.line, r.name, r.metrics) for r in parsed.requests] == [
        (2, None, ()),
        (3, "Inlet", ()),
        (4, "Boiler", ("gas_m3",)),
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"mac,meter_kind,name\naa:bb:cc:00:01:01\n", "expected 3 fields, found 1"),
        (b"name,mac,meter_kind\nMain,aa:bb:cc:00:01:01\n", "expected 3 fields, found 2"),
    ],
)
def test_a_row_missing_a_required_field_is_rejected(data, message):
    parsed = parse_device_csv(data)
    assert parsed.requests == []
    assert [(r.line, r.message) for r in parsed.rejected] == [(2, message)]


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (b'mac,meter_kind\n"aa:bb:cc:00:01:01,energy\n', 2),
        (b'mac,meter_kind\naa:bb:cc:00:01:01,energy\n"aa:bb:cc:00:01:02,gas\nx,y\n', 3),
        (
            b'mac,meter_kind,name\r\n\r\naa:bb:cc:00:01:01,energy,"Main\r\nboard"\r\n'
            b'aa:bb:cc:00:01:02,gas,"Boiler\r\n',
            5,
        ),
        (b'mac;meter_kind\naa:bb:cc:00:01:01;"energy"x\n', 2),
    ],
)
def test_a_malformed_csv_names_the_line(data, line):
    with pytest.raises(RegistryError, match=rf"^CSV file is malformed on line {line}: "):
        parse_device_csv(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\n\n", "empty"),
        (b"serial,kind\n1,energy\n", "header"),
        (b"mac,name\naa:bb:cc:00:01:01,x\n", "header"),
        (b"mac,meter_kind,mac\n", "header"),
        (b"mac,meter_kind\n\xff\xfe\xfa,energy\n", "not UTF-8"),
        (b"mac,meter_kind\naa\x00bb,energy\n", "NUL bytes"),
        (b'mac,meter_kind\n"aa:bb:cc:00:01:01,energy\n', "malformed"),
        (b"mac,meter_kind\n" + b"a" * (MAX_CSV_BYTES + 1), "limit is"),
        (
            b"mac,meter_kind\n" + b"aa:bb:cc:00:00:01,energy\n" * (MAX_CSV_ROWS + 1),
            "rows; the limit",
        ),
    ],
)
def test_unusable_csv_files_are_refused_whole(data, reason):
    with pytest.raises(RegistryError, match=reason):
        parse_device_csv(data)
