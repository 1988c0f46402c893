"""Devices over the tenant API: list, get, create, update, decommission, CSV import and the
claim flow (with `iiot devices claim-codes`), against a real `iiot api` and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from click.testing import CliRunner

from iiot_orchestration.api import keys
from iiot_orchestration.cli import main
from tests.api_helpers import assert_envelope, platform_key, running_api, seed_tenant

CSV = "text/csv"
GOOD_CSV = (
    "mac,meter_kind,name,metrics\n"
    "02:00:00:00:0a:01,energy,Hall,\n"
    "02-00-00-00-0a-02,water,Garden,water_m3\n"
    "not-a-mac,energy,Broken,\n"
)


@pytest.fixture
def api(database_url, tmp_path):
    with psycopg.connect(database_url) as conn:
        acme = seed_tenant(conn, "acme", octet=1)
        globex = seed_tenant(conn, "globex", octet=2)
    with running_api(database_url, tmp_path) as server:
        yield server, acme, globex


def audit_rows(database_url: str, action: str) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT actor, tenant_id, entity_id, detail FROM audit_log WHERE action = %s"
            " ORDER BY audit_id",
            (action,),
        ).fetchall()


def run_cli(cli_env: dict[str, str], *args: str):
    return CliRunner().invoke(main, ["devices", "claim-codes", *args], env=cli_env)


def new_claim_code(cli_env: dict[str, str], mac: str, *extra: str) -> dict:
    result = run_cli(cli_env, "create", "--mac", mac, "--meter-kind", "energy", "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def without_request_id(response) -> dict:
    error = response.json()["error"]
    return {k: v for k, v in error.items() if k != "request_id"}


def test_viewer_lists_and_gets_the_tenants_devices(api, database_url):
    server, acme, _globex = api
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE devices SET last_seen = '2026-11-02 05:45+00' WHERE device_id = %s",
            (acme.devices[0],),
        )
    with server.client(acme.keys["viewer"]) as client:
        listed = client.get("/api/v1/devices")
        one = client.get(f"/api/v1/devices/{acme.devices[0]}")
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert [d["device_id"] for d in body["items"]] == acme.devices
    assert body["next_cursor"] is None
    assert one.status_code == 200
    assert one.json() == {
        "device_id": acme.devices[0],
        "mac": "02:00:00:00:01:01",
        "name": "acme-meter-1",
        "meter_kind": "energy",
        "status": "active",
        "metrics": one.json()["metrics"],
        "last_seen": "2026-11-02T05:45:00Z",
        "created_at": one.json()["created_at"],
    }
    assert "energy_kwh" in one.json()["metrics"]
    assert body["items"][0] == one.json()


def test_filters_by_status_kind_and_name_or_mac(api):
    server, acme, _ = api
    with server.client(acme.keys["editor"]) as client:
        water = client.post(
            "/api/v1/devices",
            json={"mac": "02:00:00:00:0b:01", "meter_kind": "water", "name": "Pump 50%_off"},
        ).json()
        client.patch(f"/api/v1/devices/{acme.devices[1]}", json={"status": "inactive"})

        def ids(**params) -> list[int]:
            response = client.get("/api/v1/devices", params=params)
            assert response.status_code == 200, response.text
            return [d["device_id"] for d in response.json()["items"]]

        assert ids(meter_kind="water") == [water["device_id"]]
        assert ids(meter_kind="energy", status="active") == [acme.devices[0]]
        assert ids(status="inactive") == [acme.devices[1]]
        assert ids(status="decommissioned") == []
        assert ids(q="METER-2") == [acme.devices[1]]
        assert ids(q="00:0b") == [water["device_id"]]
        assert ids(q="00000b01") == [water["device_id"]]  # a MAC typed without separators
        assert ids(q="50%_") == [water["device_id"]]
        assert ids(q="%") == [water["device_id"]]  # a wildcard is a character, not a pattern
        assert ids(q="_") == [water["device_id"]]
        assert ids(q="'; DROP TABLE devices; --") == []
        assert_envelope(client.get("/api/v1/devices?status=lost"), 422, "validation_error")
        assert_envelope(client.get("/api/v1/devices?meter_kind=steam"), 422, "validation_error")
        assert_envelope(
            client.get("/api/v1/devices", params={"q": "x" * 101}), 422, "validation_error"
        )


def test_pages_neither_skip_nor_repeat_while_devices_are_added(api):
    server, acme, globex = api
    rows = "".join(f"02:00:00:00:0c:{n:02x},gas,Gas {n},\n" for n in range(1, 24))
    with server.client(acme.keys["editor"]) as client:
        imported = client.post(
            "/api/v1/devices/import",
            content="mac,meter_kind,name,metrics\n" + rows,
            headers={"Content-Type": CSV},
        )
        assert imported.json()["counts"]["provisioned"] == 23
        seen: list[int] = []
        cursor = None
        added = 0
        while True:
            params = {"limit": 7, **({"cursor": cursor} if cursor else {})}
            response = client.get("/api/v1/devices", params=params)
            assert response.status_code == 200, response.text
            page = response.json()
            assert len(page["items"]) <= 7
            seen += [d["device_id"] for d in page["items"]]
            if added < 2:  # a device added while paging comes on a later page, once
                client.post(
                    "/api/v1/devices",
                    json={"mac": f"02:00:00:00:0d:{added:02x}", "meter_kind": "gas"},
                )
                added += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        everything = client.get("/api/v1/devices", params={"limit": 1000}).json()["items"]
        assert_envelope(client.get("/api/v1/devices?cursor=garbage!"), 400, "bad_cursor")
    assert len(seen) == len(set(seen)) == 27
    assert seen == sorted(seen) == [d["device_id"] for d in everything]
    assert not set(seen) & set(globex.devices)


def test_an_editor_creates_a_device(api, database_url):
    server, acme, _ = api
    with server.client(acme.keys["editor"]) as client:
        response = client.post(
            "/api/v1/devices", json={"mac": "0200.0000.0e01", "meter_kind": "water"}
        )
        named = client.post(
            "/api/v1/devices",
            json={
                "mac": "02:00:00:00:0e:02",
                "meter_kind": "energy",
                "name": "Robert'); DROP TABLE devices;--",
                "metrics": ["energy_kwh"],
            },
        )
        fetched = client.get(f"/api/v1/devices/{response.json()['device_id']}")
    assert response.status_code == 201, response.text
    device = response.json()
    assert device["mac"] == "02:00:00:00:0e:01"
    assert device["name"] == "water-000e01"
    assert device["status"] == "active"
    assert device["metrics"]
    assert device["last_seen"] is None
    assert fetched.json() == device
    assert named.status_code == 201, named.text
    assert named.json()["name"] == "Robert'); DROP TABLE devices;--"
    assert named.json()["metrics"] == ["energy_kwh"]
    provisioned = audit_rows(database_url, "device.provisioned")[-2:]
    assert [row[0] for row in provisioned] == [f"api-key:{acme.key_ids['editor']}"] * 2
    assert {row[1] for row in provisioned} == {acme.tenant_id}


def test_a_duplicate_mac_is_one_conflict_whoever_has_it(api, database_url):
    server, acme, _globex = api
    with server.client(acme.keys["editor"]) as client:
        answers = [
            client.post("/api/v1/devices", json={"mac": mac, "meter_kind": kind})
            for mac, kind in (
                ("02:00:00:00:01:01", "energy"),  # acme's own, same kind
                ("02:00:00:00:01:02", "gas"),  # acme's own, another kind
                ("02:00:00:00:02:01", "energy"),  # globex's
                ("02:00:00:00:02:02", "gas"),  # globex's, another kind
            )
        ]
    messages = set()
    for response in answers:
        error = assert_envelope(response, 409, "conflict")
        messages.add(error["message"].split(": ", 1)[1])
        assert "globex" not in response.text
        assert "tenant" not in response.text
    assert messages == {"duplicate MAC: already registered"}
    with psycopg.connect(database_url) as conn:
        count = conn.execute("SELECT count(*) FROM devices").fetchone()[0]
    assert count == 4


INVALID_DEVICES = [
    ({"mac": "02:00:00:00:0f:01"}, "body.meter_kind"),
    ({"mac": "zz:00:00:00:0f:01", "meter_kind": "energy"}, "body"),
    ({"mac": "01:00:00:00:0f:01", "meter_kind": "energy"}, "body"),  # multicast
    ({"mac": "x" * 10_000, "meter_kind": "energy"}, "body.mac"),
    ({"mac": "02:00:00:00:0f:01", "meter_kind": "steam"}, "body.meter_kind"),
    ({"mac": "02:00:00:00:0f:01", "meter_kind": "energy", "name": "=HYPERLINK()"}, "body"),
    ({"mac": "02:00:00:00:0f:01", "meter_kind": "energy", "name": "a\x00b"}, "body"),
    ({"mac": "02:00:00:00:0f:01", "meter_kind": "energy", "name": "n" * 101}, "body"),
    ({"mac": "02:00:00:00:0f:01", "meter_kind": "energy", "name": "n" * 5000}, "body.name"),
    ({"mac": "02:00:00:00:0f:01", "meter_kind": "energy", "metrics": ["volts"]}, "body"),
    ({"mac": "02:00:00:00:0f:01", "meter_kind": "energy", "metrics": ["water_m3"]}, "body"),
    ({"mac": "02:00:00:00:0f:01", "meter_kind": "energy", "tenant_id": 2}, "body.tenant_id"),
]


def test_invalid_devices_are_refused(api, database_url):
    server, acme, _ = api
    with server.client(acme.keys["editor"]) as client:
        for body, field in INVALID_DEVICES:
            response = client.post("/api/v1/devices", json=body)
            error = assert_envelope(response, 422, "validation_error")
            assert error["details"][0]["field"] == field, body
            assert len(response.text) < 2000
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == 4


def test_the_device_quota_refuses_with_409_and_a_billing_event(api, database_url):
    server, acme, _ = api
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE plans SET included_devices = 3 WHERE plan_id = 'pro'")
    with server.client(acme.keys["editor"]) as client:
        first = client.post(
            "/api/v1/devices", json={"mac": "02:00:00:00:10:01", "meter_kind": "gas"}
        )
        refused = client.post(
            "/api/v1/devices", json={"mac": "02:00:00:00:10:02", "meter_kind": "gas"}
        )
        client.post(f"/api/v1/devices/{acme.devices[0]}/decommission")  # frees a place
        third = client.post(
            "/api/v1/devices", json={"mac": "02:00:00:00:10:02", "meter_kind": "gas"}
        )
    assert first.status_code == 201
    error = assert_envelope(refused, 409, "quota_exceeded")
    assert (
        error["message"] == "device quota reached: plan pro includes 3 devices and the tenant has 3"
    )
    assert third.status_code == 201
    blocked = audit_rows(database_url, "quota.device_blocked")
    assert [(actor, tenant) for actor, tenant, *_ in blocked] == [
        (f"api-key:{acme.key_ids['editor']}", acme.tenant_id)
    ]
    with psycopg.connect(database_url) as conn:
        events = conn.execute(
            "SELECT actor FROM billing_events WHERE kind = 'quota_blocked' AND tenant_id = %s",
            (acme.tenant_id,),
        ).fetchall()
    assert events == [(f"api-key:{acme.key_ids['editor']}",)]


def test_an_editor_renames_deactivates_and_decommissions(api, database_url):
    server, acme, _ = api
    device = acme.devices[0]
    with server.client(acme.keys["editor"]) as client:
        renamed = client.patch(f"/api/v1/devices/{device}", json={"name": " Boiler room "})
        inactive = client.patch(f"/api/v1/devices/{device}", json={"status": "inactive"})
        same = client.patch(f"/api/v1/devices/{device}", json={"status": "inactive"})
        first = client.post(f"/api/v1/devices/{device}/decommission")
        again = client.post(f"/api/v1/devices/{device}/decommission")
        revived = client.patch(f"/api/v1/devices/{device}", json={"status": "active"})
        assert_envelope(client.patch(f"/api/v1/devices/{device}", json={}), 422, "validation_error")
        for body in (
            {"status": "decommissioned"},
            {"name": "=1+1"},
            {"name": ""},
            {"name": "n" * 300},
            {"mac": "02:00:00:00:01:09"},
        ):
            response = client.patch(f"/api/v1/devices/{acme.devices[1]}", json=body)
            assert_envelope(response, 422, "validation_error")
        assert_envelope(
            client.patch(
                f"/api/v1/devices/{acme.devices[1]}",
                content=b"{",
                headers={"Content-Type": "application/json"},
            ),
            422,
            "validation_error",
        )
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["name"] == "Boiler room"
    assert inactive.json()["status"] == same.json()["status"] == "inactive"
    assert first.status_code == again.status_code == 200
    assert first.json()["status"] == again.json()["status"] == "decommissioned"
    assert_envelope(revived, 409, "conflict")
    actor = f"api-key:{acme.key_ids['editor']}"
    updated = audit_rows(database_url, "device.updated")
    assert [(a, t, e) for a, t, e, _ in updated] == [(actor, acme.tenant_id, str(device))] * 2
    assert updated[0][3]["changes"] == {"name": {"from": "acme-meter-1", "to": "Boiler room"}}
    assert updated[1][3]["changes"] == {"status": {"from": "active", "to": "inactive"}}
    assert updated[0][3]["request_id"] == renamed.headers["x-request-id"]
    decommissioned = audit_rows(database_url, "device.decommissioned")
    assert [(a, e) for a, _, e, _ in decommissioned] == [(actor, str(device))]


def test_another_tenants_device_is_not_found(api, database_url):
    server, acme, globex = api
    theirs = globex.devices[0]
    with server.client(acme.keys["editor"]) as client:
        answers = {
            "get": client.get(f"/api/v1/devices/{theirs}"),
            "patch": client.patch(f"/api/v1/devices/{theirs}", json={"name": "mine now"}),
            "decommission": client.post(f"/api/v1/devices/{theirs}/decommission"),
        }
        missing = client.get("/api/v1/devices/999999")
        huge = client.get(f"/api/v1/devices/{10**30}")
        negative = client.post("/api/v1/devices/-1/decommission")
        assert_envelope(client.patch("/api/v1/devices/claim", json={}), 405, "method_not_allowed")
    assert_envelope(negative, 404, "not_found")
    for response in (*answers.values(), missing, huge):
        error = assert_envelope(response, 404, "not_found")
        assert error["message"] == "device not found"
        assert str(theirs) not in error["message"]
        assert error["details"] is None
        assert "globex" not in response.text
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT name, status FROM devices WHERE device_id = %s", (theirs,)
        ).fetchone()
    assert row == ("globex-meter-1", "active")
    assert audit_rows(database_url, "device.updated") == []
    assert audit_rows(database_url, "device.decommissioned") == []


def test_a_viewer_cannot_write(api, database_url):
    server, acme, _ = api
    device = acme.devices[0]
    writes = [
        ("POST", "/api/v1/devices", {"json": {"mac": "02:00:00:00:11:01", "meter_kind": "gas"}}),
        ("PATCH", f"/api/v1/devices/{device}", {"json": {"name": "x"}}),
        ("POST", f"/api/v1/devices/{device}/decommission", {}),
        ("POST", "/api/v1/devices/import", {"content": GOOD_CSV, "headers": {"Content-Type": CSV}}),
        ("POST", "/api/v1/devices/claim", {"json": {"code": "0" * 25}}),
    ]
    with server.client(acme.keys["viewer"]) as client:
        for method, path, options in writes:
            assert_envelope(client.request(method, path, **options), 403, "forbidden")
        assert client.get("/api/v1/devices").status_code == 200
        assert client.get(f"/api/v1/devices/{device}").status_code == 200
    with server.client(acme.keys["admin"]) as client:  # roles rank: an admin is an editor too
        response = client.patch(f"/api/v1/devices/{device}", json={"name": "by admin"})
        assert response.status_code == 200
    with server.client() as client:
        assert_envelope(client.get("/api/v1/devices"), 401, "unauthenticated")
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == 4


def test_a_platform_key_names_the_tenant(api, database_url):
    server, _acme, globex = api
    with psycopg.connect(database_url) as conn:
        key = platform_key(conn)
    with server.client(key) as client:
        assert_envelope(client.get("/api/v1/devices"), 400, "tenant_required")
        listed = client.get("/api/v1/devices", headers={"X-IIOT-Tenant": "globex"})
    assert [d["device_id"] for d in listed.json()["items"]] == globex.devices


def test_csv_import_reports_each_row_and_skips_a_repeat(api, database_url):
    server, acme, _ = api
    with server.client(acme.keys["editor"]) as client:
        dry = client.post(
            "/api/v1/devices/import?dry_run=true", content=GOOD_CSV, headers={"Content-Type": CSV}
        )
        first = client.post(
            "/api/v1/devices/import",
            content=GOOD_CSV.encode(),
            headers={"Content-Type": "text/csv; charset=utf-8"},
        )
        second = client.post(
            "/api/v1/devices/import", content=GOOD_CSV, headers={"Content-Type": CSV}
        )
        listed = client.get("/api/v1/devices", params={"q": "02:00:00:00:0a"}).json()["items"]
    assert dry.status_code == 200, dry.text
    assert dry.json()["dry_run"] is True
    assert [r["outcome"] for r in dry.json()["rows"]] == [
        "would provision",
        "would provision",
        "rejected",
    ]
    assert dry.json()["counts"] == {"provisioned": 2, "skipped": 0, "rejected": 1}
    assert all(r["device_id"] is None for r in dry.json()["rows"])
    assert first.status_code == 200, first.text
    report = first.json()
    assert report["dry_run"] is False
    assert report["counts"] == {"provisioned": 2, "skipped": 0, "rejected": 1}
    hall, garden, broken = report["rows"]
    assert (hall["line"], hall["mac"], hall["outcome"]) == (2, "02:00:00:00:0a:01", "provisioned")
    assert (garden["line"], garden["mac"], garden["detail"]) == (3, "02:00:00:00:0a:02", "water_m3")
    assert (broken["line"], broken["mac"], broken["outcome"]) == (4, "not-a-mac", "rejected")
    assert broken["detail"].startswith("bad MAC 'not-a-mac'")
    assert broken["device_id"] is None
    assert sorted(d["device_id"] for d in listed) == [hall["device_id"], garden["device_id"]]
    again = second.json()
    assert again["counts"] == {"provisioned": 0, "skipped": 2, "rejected": 1}
    assert [r["outcome"] for r in again["rows"]] == ["skipped", "skipped", "rejected"]
    assert [r["device_id"] for r in again["rows"][:2]] == [hall["device_id"], garden["device_id"]]
    imported = audit_rows(database_url, "device.imported")
    assert [(a, t) for a, t, *_ in imported] == [
        (f"api-key:{acme.key_ids['editor']}", acme.tenant_id)
    ] * 2
    assert imported[0][3]["provisioned"] == 2
    assert imported[1][3]["skipped"] == 2


def test_csv_import_does_not_say_whose_mac_a_row_has(api):
    server, acme, _ = api
    csv = (
        "mac,meter_kind\n"
        "02:00:00:00:02:01,energy\n"  # globex's
        "02:00:00:00:01:01,water\n"  # acme's, as another kind
        "02:00:00:00:01:02,energy\n"  # acme's
    )
    with server.client(acme.keys["editor"]) as client:
        report = client.post("/api/v1/devices/import", content=csv, headers={"Content-Type": CSV})
    rows = report.json()["rows"]
    assert [(r["outcome"], r["detail"]) for r in rows] == [
        ("rejected", "duplicate MAC: already registered"),
        ("rejected", "duplicate MAC: already registered"),
        ("skipped", "already provisioned"),
    ]
    assert "globex" not in report.text
    assert "another tenant" not in report.text


NOT_CSV = [
    ("application/json", json.dumps({"mac": "02:00:00:00:12:01"})),
    ("text/plain", GOOD_CSV),
    ("multipart/form-data; boundary=x", GOOD_CSV),
    ("text/csv; charset=latin-1", GOOD_CSV),
    (None, GOOD_CSV),
]
MALFORMED_CSV = [
    (b'mac,meter_kind\n02:00:00:00:13:01,energy\n"02:00:00:00:13:02,gas\n', "never closed", 3),
    (b'mac,meter_kind\n02:00:00:00:13:01,"energy"x\n', "malformed on line 2", 2),
    (b"mac,meter_kind\n02:00:00:00:13:01,\xff\xfeenergy\n", "not UTF-8", None),
    (b"mac,meter_kind\n02:00:00:00:13:01,ener\x00gy\n", "NUL", None),
    (b"", "empty", None),
    (b"serial,kind\n1,energy\n", "header", None),
]


def test_csv_import_refuses_what_it_cannot_read(api, database_url):
    """Another media type is a 415; a body that is not a device CSV a 422 naming the line."""
    server, acme, _ = api
    with server.client(acme.keys["editor"]) as client:
        for content_type, body in NOT_CSV:
            headers = {"Content-Type": content_type} if content_type else {}
            request = client.build_request(
                "POST", "/api/v1/devices/import", content=body, headers=headers
            )
            if content_type is None:
                request.headers.pop("Content-Type", None)
            response = client.send(request)
            assert_envelope(response, 415, "unsupported_media_type")
        for body, says, line in MALFORMED_CSV:
            response = client.post(
                "/api/v1/devices/import", content=body, headers={"Content-Type": CSV}
            )
            error = assert_envelope(response, 422, "validation_error")
            assert says in error["message"]
            assert error["details"][0].get("line") == line
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == 4


def test_hostile_csv_rows_are_rejected_one_by_one(api):
    server, acme, _ = api
    csv = (
        "mac,meter_kind,name,metrics\n"
        '02:00:00:00:14:01,energy,"Robert\'); DROP TABLE devices;--",\n'
        "02:00:00:00:14:02,energy,=cmd|' /C calc'!A0,\n"
        f"02:00:00:00:14:03,energy,{'n' * 5000},\n"
        "02:00:00:00:14:04,energy,ok,volts\n"
        "02:00:00:00:14:01,gas,again,\n"
        "02:00:00:00:14:05,energy\n"
        "02:00:00:00:14:06,energy,a,b,c\n"
    )
    with server.client(acme.keys["editor"]) as client:
        response = client.post("/api/v1/devices/import", content=csv, headers={"Content-Type": CSV})
    assert response.status_code == 200, response.text
    rows = response.json()["rows"]
    assert [(r["line"], r["outcome"]) for r in rows] == [
        (2, "provisioned"),
        (3, "rejected"),
        (4, "rejected"),
        (5, "rejected"),
        (6, "rejected"),
        (7, "provisioned"),
        (8, "rejected"),
    ]
    assert "formula" in rows[1]["detail"]
    assert "longer than 200" in rows[2]["detail"]
    assert len(rows[2]["mac"]) <= 40
    assert "unknown metric" in rows[3]["detail"]
    assert "first seen on line 2" in rows[4]["detail"]
    assert "expected 4 fields" in rows[6]["detail"]


def test_a_csv_over_the_body_limit_is_413(database_url, tmp_path):
    with psycopg.connect(database_url) as conn:
        acme = seed_tenant(conn, "acme", octet=1)
    big = "mac,meter_kind\n" + "".join(
        f"02:00:00:01:{n // 256:02x}:{n % 256:02x},energy\n" for n in range(200)
    )
    assert len(big) > 4096
    with (
        running_api(database_url, tmp_path, IIOT_API_MAX_BODY_BYTES="4096") as server,
        server.client(acme.keys["editor"]) as client,
    ):
        response = client.post("/api/v1/devices/import", content=big, headers={"Content-Type": CSV})
        chunked = client.post(
            "/api/v1/devices/import",
            content=iter([big[:3000].encode(), big[3000:].encode()]),
            headers={"Content-Type": CSV},
        )
        small = client.post(
            "/api/v1/devices/import", content=big[:1000], headers={"Content-Type": CSV}
        )
    error = assert_envelope(response, 413, "too_large")
    assert "IIOT_API_MAX_BODY_BYTES" in error["message"]
    assert_envelope(chunked, 413, "too_large")
    assert small.status_code == 200, small.text
    with psycopg.connect(database_url) as conn:
        count = conn.execute(
            "SELECT count(*) FROM devices WHERE mac::text LIKE '02:00:00:01:%'"
        ).fetchone()[0]
    assert count == small.json()["counts"]["provisioned"] > 0


def test_a_claim_code_gives_the_device_and_a_secret_once(api, cli_env, database_url):
    server, acme, globex = api
    code = new_claim_code(cli_env, "02:00:00:00:15:01", "--metrics", "energy_kwh")
    assert len(code["code"]) == 29
    assert code["code"].count("-") == 4
    with server.client(acme.keys["editor"]) as client:
        # read off a label: lower case, spaces instead of dashes
        typed = code["code"].lower().replace("-", " ")
        claimed = client.post("/api/v1/devices/claim", json={"code": typed, "name": "Roof"})
        twice = client.post("/api/v1/devices/claim", json={"code": code["code"]})
        unknown = client.post("/api/v1/devices/claim", json={"code": "0" * 25})
        garbage = client.post("/api/v1/devices/claim", json={"code": "'; SELECT 1; --"})
    with server.client(globex.keys["editor"]) as client:
        stolen = client.post("/api/v1/devices/claim", json={"code": code["code"]})
    assert claimed.status_code == 201, claimed.text
    body = claimed.json()
    device = body["device"]
    assert (device["mac"], device["name"], device["metrics"]) == (
        "02:00:00:00:15:01",
        "Roof",
        ["energy_kwh"],
    )
    secret = body["device_secret"]
    assert secret.startswith("iiotdev_")
    assert len(secret) >= 40
    answers = [twice, unknown, garbage, stolen]
    for response in answers:
        assert_envelope(response, 404, "not_found")
    assert len({json.dumps(without_request_id(r)) for r in answers}) == 1
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            "SELECT secret_sha256, tenant_id FROM device_secrets WHERE device_id = %s",
            (device["device_id"],),
        ).fetchone()
        claim = conn.execute(
            "SELECT tenant_id, device_id, claimed_at IS NOT NULL FROM device_claim_codes"
            " WHERE claim_id = %s",
            (code["claim_id"],),
        ).fetchone()
        owner = conn.execute(
            "SELECT tenant_id FROM devices WHERE device_id = %s", (device["device_id"],)
        ).fetchone()[0]
    assert stored == (hashlib.sha256(secret.encode()).digest(), acme.tenant_id)
    assert claim == (acme.tenant_id, device["device_id"], True)
    assert owner == acme.tenant_id
    assert secret not in json.dumps(audit_rows(database_url, "device.claimed"), default=str)
    (row,) = audit_rows(database_url, "device.claimed")
    assert row[:3] == (
        f"api-key:{acme.key_ids['editor']}",
        acme.tenant_id,
        str(device["device_id"]),
    )
    assert row[3]["claim_id"] == code["claim_id"]


def test_expired_and_refused_claims_leave_the_code_unclaimed(api, cli_env, database_url):
    server, acme, _ = api
    expired = new_claim_code(cli_env, "02:00:00:00:16:01", "--expires-in-days", "1")
    fresh = new_claim_code(cli_env, "02:00:00:00:16:02")
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE device_claim_codes SET created_at = now() - interval '3 days',"
            " expires_at = now() - interval '1 second' WHERE claim_id = %s",
            (expired["claim_id"],),
        )
        conn.execute("UPDATE plans SET included_devices = 2 WHERE plan_id = 'pro'")
    with server.client(acme.keys["editor"]) as client:
        gone = client.post("/api/v1/devices/claim", json={"code": expired["code"]})
        over = client.post("/api/v1/devices/claim", json={"code": fresh["code"]})
        bad_name = client.post("/api/v1/devices/claim", json={"code": fresh["code"], "name": "@x"})
        with psycopg.connect(database_url) as conn:
            state = conn.execute(
                "SELECT claimed_at, tenant_id FROM device_claim_codes WHERE claim_id = %s",
                (fresh["claim_id"],),
            ).fetchone()
            conn.execute("UPDATE plans SET included_devices = 100 WHERE plan_id = 'pro'")
        later = client.post("/api/v1/devices/claim", json={"code": fresh["code"]})
    assert_envelope(gone, 404, "not_found")
    error = assert_envelope(over, 409, "quota_exceeded")
    assert "device quota reached" in error["message"]
    assert_envelope(bad_name, 422, "validation_error")
    assert state == (None, None)
    assert later.status_code == 201, later.text
    blocked = audit_rows(database_url, "quota.device_blocked")
    assert [(a, t, e) for a, t, e, _ in blocked] == [
        (f"api-key:{acme.key_ids['editor']}", acme.tenant_id, "02:00:00:00:16:02")
    ]
    listed = json.loads(run_cli(cli_env, "list", "--json").stdout)
    states = {row["claim_id"]: (row["state"], row["tenant"]) for row in listed}
    assert states == {
        expired["claim_id"]: ("expired", None),
        fresh["claim_id"]: ("claimed", "acme"),
    }


def test_claim_codes_cli(cli_env, database_url):
    with psycopg.connect(database_url) as conn:
        seed_tenant(conn, "acme", octet=1)
    result = run_cli(cli_env, "create", "--mac", "0200.0000.1701", "--meter-kind", "gas")
    assert result.exit_code == 0, result.output
    assert "claim code: " in result.stdout
    assert "shown only now" in result.stderr
    code = result.stdout.split("claim code: ", 1)[1].split()[0]
    for refused, says in (
        (("--mac", "02:00:00:00:17:01", "--meter-kind", "gas"), "already has claim code"),
        (
            ("--mac", "02:00:00:00:01:01", "--meter-kind", "energy"),
            "already registered to tenant 'acme'",
        ),
        (("--mac", "ff:ff:ff:ff:ff:ff", "--meter-kind", "gas"), "multicast"),
        (
            ("--mac", "02:00:00:00:17:02", "--meter-kind", "gas", "--metrics", "energy_kwh"),
            "belongs to energy",
        ),
    ):
        failed = run_cli(cli_env, "create", *refused)
        assert failed.exit_code == 1, failed.output
        assert says in failed.output
    table = run_cli(cli_env, "list")
    assert table.exit_code == 0
    assert "02:00:00:00:17:01" in table.stdout
    assert "open" in table.stdout
    assert code not in table.stdout
    unclaimed = json.loads(run_cli(cli_env, "list", "--unclaimed", "--json").stdout)
    assert [row["mac"] for row in unclaimed] == ["02:00:00:00:17:01"]
    with psycopg.connect(database_url) as conn:
        digest = conn.execute("SELECT code_sha256 FROM device_claim_codes").fetchone()[0]
        created = conn.execute(
            "SELECT actor, entity_id FROM audit_log WHERE action = 'claim_code.created'"
        ).fetchall()
    assert bytes(digest) == hashlib.sha256(code.replace("-", "").encode()).digest()
    assert created == [("cli", str(unclaimed[0]["claim_id"]))]
    assert CliRunner().invoke(main, ["devices", "claim-codes", "--help"]).exit_code == 0


def test_concurrent_imports_never_pass_the_quota(api, database_url):
    """Each import locks its tenant (iiot_api_lock_tenant) before it counts the devices."""
    server, acme, _ = api
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE plans SET included_devices = 6 WHERE plan_id = 'pro'")
        # a key of its own for each import: requests of one key wait for each other anyway
        # (authentication updates the key's last_used_at)
        second = keys.create(conn, tenant="acme", role="editor", name="second", actor="test")
    editors = {1: acme.keys["editor"], 2: second.key}

    def send(batch: int) -> dict:
        rows = "".join(f"02:00:00:00:18:{batch}{n},gas\n" for n in range(3))
        with server.client(editors[batch]) as client:
            response = client.post(
                "/api/v1/devices/import",
                content="mac,meter_kind\n" + rows,
                headers={"Content-Type": CSV},
            )
        assert response.status_code == 200, response.text
        return response.json()["counts"]

    with ThreadPoolExecutor(2) as pool:
        counts = list(pool.map(send, (1, 2)))
    assert sum(c["provisioned"] for c in counts) == 4
    assert sum(c["rejected"] for c in counts) == 2
    with psycopg.connect(database_url) as conn:
        conn.execute("SET ROLE app_rw")
        assert conn.execute("SELECT iiot_api_lock_tenant()").fetchone()[0] is False  # no tenant
