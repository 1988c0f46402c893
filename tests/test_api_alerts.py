"""Alerts and threshold rules over the tenant API: reading, acknowledging, managing rules, the
role matrix, other tenants' ids, and hostile input, against a real `iiot api` and PostgreSQL."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import psycopg
import pytest
from psycopg.rows import dict_row

from iiot_orchestration import alerts
from tests.api_helpers import (
    ApiServer,
    Tenant,
    assert_envelope,
    platform_key,
    running_api,
    seed_tenant,
)

RULE = {"name": "Overload", "kind": "above", "metric": "energy_kwh", "threshold": 5000}


@dataclass
class Seeded:
    server: ApiServer
    acme: Tenant
    globex: Tenant
    platform: str
    alert_ids: dict[str, int]  # acme's: open, resolved, tenant_wide; globex's: globex
    globex_rule: int


def _alert(conn, key: str, tenant: Tenant, severity: str, device: int | None = None) -> int:
    alerts.raise_alert(
        conn,
        alerts.Alert(
            key=key,
            severity=severity,
            title=f"{tenant.slug} {key}",
            source="test",
            tenant_id=tenant.tenant_id,
            device_id=device,
            detail={"value": 42},
        ),
    )
    return conn.execute("SELECT alert_id FROM alerts WHERE alert_key = %s", (key,)).fetchone()[0]


@pytest.fixture
def api(database_url, tmp_path):
    with psycopg.connect(database_url) as conn:
        acme = seed_tenant(conn, "acme", octet=1)
        globex = seed_tenant(conn, "globex", octet=2)
        platform = platform_key(conn)
        ids = {
            "open": _alert(conn, "acme-open", acme, "WARNING", acme.devices[0]),
            "resolved": _alert(conn, "acme-resolved", acme, "CRITICAL", acme.devices[1]),
            "tenant_wide": _alert(conn, "acme-tenant", acme, "INFO"),
            "globex": _alert(conn, "globex-secret", globex, "CRITICAL", globex.devices[0]),
        }
        alerts.resolve_alert(conn, "acme-resolved")
        alerts.raise_alert(
            conn, alerts.Alert(key="platform-wide", severity="CRITICAL", title="x", source="test")
        )
        globex_rule = alerts.add_rule(
            conn,
            tenant="globex",
            name="globex secret rule",
            kind="below",
            severity="CRITICAL",
            metric="power_w",
            threshold=1.5,
        )
        conn.commit()
    with running_api(database_url, tmp_path) as server:
        yield Seeded(server, acme, globex, platform, ids, globex_rule)


def _audit(database_url: str, action: str) -> list[dict]:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT actor, tenant_id, entity, entity_id, detail FROM audit_log"
            " WHERE action = %s ORDER BY audit_id",
            (action,),
        ).fetchall()


def _ids(response) -> list[int]:
    assert response.status_code == 200, response.text
    return [a["alert_id"] for a in response.json()["items"]]


# --- alerts -------------------------------------------------------------------------------------


def test_alerts_are_listed_newest_first_filtered_and_paged(api):
    ids, acme = api.alert_ids, api.acme
    with api.server.client(acme.keys["viewer"]) as client:
        everything = client.get("/api/v1/alerts")
        assert _ids(everything) == [ids["tenant_wide"], ids["resolved"], ids["open"]]
        assert "globex" not in everything.text  # nor the platform-wide alert
        first = everything.json()["items"][-1]
        assert first["device_mac"] == "02:00:00:00:01:01"
        assert first["detail"] == {"value": 42}
        assert first["acknowledged_at"] is None

        page1 = client.get("/api/v1/alerts", params={"limit": 2}).json()
        page2 = client.get("/api/v1/alerts", params={"limit": 2, "cursor": page1["next_cursor"]})
        assert [a["alert_id"] for a in page1["items"]] + _ids(page2) == _ids(everything)
        assert page2.json()["next_cursor"] is None

        def only(**params) -> list[int]:
            return _ids(client.get("/api/v1/alerts", params=params))

        assert only(state="open") == [ids["tenant_wide"], ids["open"]]
        assert only(state="resolved") == [ids["resolved"]]
        assert only(severity="CRITICAL") == [ids["resolved"]]
        assert only(device_id=acme.devices[0]) == [ids["open"]]
        assert only(device_id=api.globex.devices[0]) == []
        assert only(acknowledged="false") == _ids(everything)
        assert only(acknowledged="true") == []

        one = client.get(f"/api/v1/alerts/{ids['open']}")
        assert one.status_code == 200
        assert one.json() == everything.json()["items"][-1]

        for params in (
            {"severity": "'; DROP TABLE alerts; --"},
            {"state": "all"},
            {"acknowledged": "maybe"},
            {"device_id": "1 OR 1=1"},
            {"device_id": 2**40},
            {"limit": 0},
        ):
            assert_envelope(client.get("/api/v1/alerts", params=params), 422, "validation_error")
        assert_envelope(
            client.get("/api/v1/alerts", params={"cursor": "not-a-cursor"}), 400, "bad_cursor"
        )


def test_another_tenants_alert_is_not_found_like_a_missing_one(api, database_url):
    globex_alert = api.alert_ids["globex"]
    with api.server.client(api.acme.keys["admin"]) as client:
        for alert_id in (globex_alert, 999_999_999):
            for response in (
                client.get(f"/api/v1/alerts/{alert_id}"),
                client.post(f"/api/v1/alerts/{alert_id}/acknowledge"),
            ):
                error = assert_envelope(response, 404, "not_found")
                assert error["message"] == "alert not found"
                assert "globex" not in response.text
        for bad in ("abc", "0", str(2**63), "1;DROP TABLE alerts"):
            response = client.post(f"/api/v1/alerts/{bad}/acknowledge")
            assert_envelope(response, 422, "validation_error")
    with psycopg.connect(database_url) as conn:
        assert conn.execute(
            "SELECT acknowledged_at FROM alerts WHERE alert_id = %s", (globex_alert,)
        ).fetchone() == (None,)
    assert _audit(database_url, "alert.acknowledged") == []


def test_an_editor_acknowledges_once_and_again_changes_nothing(api, database_url):
    acme, alert_id = api.acme, api.alert_ids["open"]
    with api.server.client(acme.keys["viewer"]) as client:
        response = client.post(f"/api/v1/alerts/{alert_id}/acknowledge")
        assert_envelope(response, 403, "forbidden")
    with api.server.client(acme.keys["editor"]) as client:
        first = client.post(f"/api/v1/alerts/{alert_id}/acknowledge")
    assert first.status_code == 200, first.text
    acknowledged = first.json()
    assert acknowledged["acknowledged_by"] == f"api-key:{acme.key_ids['editor']}"
    assert acknowledged["acknowledged_at"]
    assert acknowledged["state"] == "open"  # acknowledging does not resolve
    with api.server.client(acme.keys["admin"]) as client:
        again = client.post(f"/api/v1/alerts/{alert_id}/acknowledge")
        assert again.status_code == 200
        assert again.json() == acknowledged  # the first acknowledgement stands
        resolved = client.post(f"/api/v1/alerts/{api.alert_ids['resolved']}/acknowledge")
        assert resolved.status_code == 200
        assert resolved.json()["state"] == "resolved"
        listed = client.get("/api/v1/alerts", params={"acknowledged": "true"})
        assert _ids(listed) == [api.alert_ids["resolved"], alert_id]
    [first_audit, second_audit] = _audit(database_url, "alert.acknowledged")
    assert first_audit["actor"] == f"api-key:{acme.key_ids['editor']}"
    assert (first_audit["tenant_id"], first_audit["entity"]) == (acme.tenant_id, "alert")
    assert first_audit["entity_id"] == str(alert_id)
    assert first_audit["detail"]["request_id"] == first.headers["x-request-id"]
    assert second_audit["entity_id"] == str(api.alert_ids["resolved"])


def test_concurrent_acknowledgements_record_one(api, database_url):
    alert_id = api.alert_ids["tenant_wide"]
    answers: list[dict] = []

    def acknowledge() -> None:
        with api.server.client(api.acme.keys["editor"]) as client:
            response = client.post(f"/api/v1/alerts/{alert_id}/acknowledge")
            answers.append({"status": response.status_code, **response.json()})

    threads = [threading.Thread(target=acknowledge) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {a["status"] for a in answers} == {200}
    assert len({a["acknowledged_at"] for a in answers}) == 1
    assert len(_audit(database_url, "alert.acknowledged")) == 1


def test_a_platform_key_names_the_tenant(api):
    with api.server.client(api.platform) as client:
        response = client.get("/api/v1/alerts")
        assert_envelope(response, 400, "tenant_required")
    with api.server.client(api.platform, **{"X-IIOT-Tenant": "globex"}) as client:
        assert _ids(client.get("/api/v1/alerts")) == [api.alert_ids["globex"]]


# --- threshold rules ----------------------------------------------------------------------------


def test_an_admin_creates_changes_and_deletes_a_rule(api, database_url):
    acme = api.acme
    actor = f"api-key:{acme.key_ids['admin']}"
    with api.server.client(acme.keys["admin"]) as client:
        created = client.post("/api/v1/rules", json={**RULE, "device_id": acme.devices[0]})
        assert created.status_code == 201, created.text
        rule = created.json()
        rule_id = rule["rule_id"]
        assert rule == {
            **rule,
            "name": "Overload",
            "kind": "above",
            "metric": "energy_kwh",
            "device_id": acme.devices[0],
            "device_mac": "02:00:00:00:01:01",
            "threshold": 5000.0,
            "window_minutes": 60,
            "severity": "WARNING",
            "enabled": True,
            "created_by": actor,
        }
        assert client.get(f"/api/v1/rules/{rule_id}").json() == rule

        changed = client.patch(
            f"/api/v1/rules/{rule_id}",
            json={"threshold": 7500, "severity": "CRITICAL", "device_id": None},
        )
        assert changed.status_code == 200, changed.text
        assert changed.json() == {
            **rule,
            "threshold": 7500.0,
            "severity": "CRITICAL",
            "device_id": None,
            "device_mac": None,
        }
        # nothing sent, or nothing different: no change, no audit row
        assert client.patch(f"/api/v1/rules/{rule_id}", json={}).json() == changed.json()
        same = client.patch(f"/api/v1/rules/{rule_id}", json={"threshold": 7500.0})
        assert same.json() == changed.json()
        # a rule becomes a no_data rule only without a threshold
        response = client.patch(f"/api/v1/rules/{rule_id}", json={"kind": "no_data"})
        assert assert_envelope(response, 422, "validation_error")["details"][0]["field"] == (
            "body.threshold"
        )
        silent = client.patch(
            f"/api/v1/rules/{rule_id}",
            json={"kind": "no_data", "threshold": None, "window_minutes": 30, "enabled": False},
        )
        assert silent.status_code == 200, silent.text
        assert silent.json()["enabled"] is False
        assert silent.json()["threshold"] is None

        assert client.delete(f"/api/v1/rules/{rule_id}").status_code == 204
        assert_envelope(client.get(f"/api/v1/rules/{rule_id}"), 404, "not_found")
        assert_envelope(client.delete(f"/api/v1/rules/{rule_id}"), 404, "not_found")

    created_audit = _audit(database_url, "alert_rule.created")
    changed_audit = _audit(database_url, "alert_rule.changed")
    deleted_audit = _audit(database_url, "alert_rule.deleted")
    assert [a["entity_id"] for a in created_audit + changed_audit + deleted_audit] == (
        [str(rule_id)] * 4
    )
    assert {a["actor"] for a in created_audit + changed_audit + deleted_audit} == {actor}
    assert created_audit[0]["detail"]["threshold"] == 5000.0
    assert changed_audit[0]["detail"]["changed"] == {
        "threshold": [5000.0, 7500.0],
        "severity": ["WARNING", "CRITICAL"],
        "device_id": [acme.devices[0], None],
    }
    assert changed_audit[1]["detail"]["changed"]["kind"] == ["above", "no_data"]
    assert deleted_audit[0]["detail"]["kind"] == "no_data"


def test_rules_are_listed_filtered_and_paged(api):
    with api.server.client(api.acme.keys["admin"]) as client:
        made = [
            client.post("/api/v1/rules", json={**RULE, "threshold": n}).json()["rule_id"]
            for n in (100, 200, 300)
        ]
        silent = client.post(
            "/api/v1/rules",
            json={"name": "Silent", "kind": "no_data", "enabled": False, "severity": "INFO"},
        )
        assert silent.status_code == 201, silent.text
        made.append(silent.json()["rule_id"])
    with api.server.client(api.acme.keys["viewer"]) as client:
        everything = client.get("/api/v1/rules")
        assert [r["rule_id"] for r in everything.json()["items"]] == made
        assert "globex" not in everything.text
        page1 = client.get("/api/v1/rules", params={"limit": 3}).json()
        page2 = client.get("/api/v1/rules", params={"limit": 3, "cursor": page1["next_cursor"]})
        assert [r["rule_id"] for r in page1["items"] + page2.json()["items"]] == made

        def only(**params) -> list[int]:
            response = client.get("/api/v1/rules", params=params)
            assert response.status_code == 200, response.text
            return [r["rule_id"] for r in response.json()["items"]]

        assert only(enabled="false") == made[3:]
        assert only(kind="above", metric="energy_kwh") == made[:3]
        assert only(severity="INFO") == made[3:]
        assert only(metric="power_w") == []
        assert only(device_id=api.acme.devices[0]) == []
        for params in ({"kind": "sideways"}, {"metric": "x' OR '1'='1"}, {"enabled": "2"}):
            response = client.get("/api/v1/rules", params=params)
            assert_envelope(response, 422, "validation_error")


def test_a_rule_made_through_the_api_is_evaluated(api, database_url):
    with api.server.client(api.acme.keys["admin"]) as client:
        response = client.post(
            "/api/v1/rules", json={"name": "Meter silent", "kind": "no_data", "window_minutes": 30}
        )
        rule_id = response.json()["rule_id"]
    with psycopg.connect(database_url) as conn:
        opened = alerts.evaluate_rules(conn).opened
    # the seeded meters never reported (last_seen is null): both are silent; globex's rule is
    # a below rule without readings in its hourly rollups, so it stays quiet
    assert sorted(a.device_id for a in opened) == sorted(api.acme.devices)
    with api.server.client(api.acme.keys["viewer"]) as client:
        listed = client.get("/api/v1/alerts", params={"rule_id": rule_id, "state": "open"})
    assert [a["title"].split(": ")[0] for a in listed.json()["items"]] == ["Meter silent"] * 2

    with api.server.client(api.acme.keys["admin"]) as client:
        assert client.delete(f"/api/v1/rules/{rule_id}").status_code == 204
    with psycopg.connect(database_url) as conn:
        # its alerts stay, as history, without the rule; the next evaluation resolves them
        assert alerts.evaluate_rules(conn).resolved == 2
        rows = conn.execute(
            "SELECT rule_id, state FROM alerts WHERE source = 'threshold_rule'"
        ).fetchall()
    assert rows == [(None, "resolved")] * 2


def test_only_an_admin_writes_rules(api, database_url):
    with psycopg.connect(database_url) as conn:
        rule_id = alerts.add_rule(conn, tenant="acme", severity="INFO", **RULE)
    for role in ("viewer", "editor"):
        with api.server.client(api.acme.keys[role]) as client:
            assert client.get(f"/api/v1/rules/{rule_id}").status_code == 200
            assert client.get("/api/v1/rules").status_code == 200
            for response in (
                client.post("/api/v1/rules", json={**RULE, "threshold": 1}),
                client.patch(f"/api/v1/rules/{rule_id}", json={"enabled": False}),
                client.delete(f"/api/v1/rules/{rule_id}"),
            ):
                assert_envelope(response, 403, "forbidden")
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*), bool_and(enabled) FROM alert_rules").fetchone() == (
            2,
            True,
        )
    assert _audit(database_url, "alert_rule.created") == []


def test_another_tenants_rule_and_device_are_unknown(api, database_url):
    globex_rule, globex_device = api.globex_rule, api.globex.devices[0]
    with api.server.client(api.acme.keys["admin"]) as client:
        for rule_id in (globex_rule, 999_999_999):
            for response in (
                client.get(f"/api/v1/rules/{rule_id}"),
                client.patch(f"/api/v1/rules/{rule_id}", json={"enabled": False}),
                client.delete(f"/api/v1/rules/{rule_id}"),
            ):
                assert assert_envelope(response, 404, "not_found")["message"] == "rule not found"
                assert "globex" not in response.text
        messages = []
        for device_id in (globex_device, 2_000_000_000):
            response = client.post("/api/v1/rules", json={**RULE, "device_id": device_id})
            error = assert_envelope(response, 422, "validation_error")
            assert error["details"][0]["field"] == "body.device_id"
            messages.append(error["message"].replace(str(device_id), "N"))
        assert messages == ["unknown device N"] * 2
        acme_rule = client.post("/api/v1/rules", json=RULE).json()["rule_id"]
        response = client.patch(f"/api/v1/rules/{acme_rule}", json={"device_id": globex_device})
        assert assert_envelope(response, 422, "validation_error")["message"] == (
            f"unknown device {globex_device}"
        )
    with psycopg.connect(database_url) as conn:
        assert conn.execute(
            "SELECT name, enabled FROM alert_rules WHERE rule_id = %s", (globex_rule,)
        ).fetchone() == ("globex secret rule", True)
        assert conn.execute(
            "SELECT count(*) FROM alert_rules WHERE device_id = %s", (globex_device,)
        ).fetchone() == (0,)


BAD_RULES = [
    ({"kind": "above", "metric": "energy_kwh"}, "body.threshold", "needs a finite threshold"),
    ({"kind": "no_data", "threshold": 1}, "body.threshold", "no_data rule has no threshold"),
    ({"kind": "above", "threshold": 1}, "body.metric", "needs a metric"),
    ({"kind": "below", "metric": "nope", "threshold": 1}, "body.metric", "unknown metric"),
    ({"kind": "sideways", "metric": "power_w", "threshold": 1}, "body.kind", ""),
    ({**RULE, "severity": "critical"}, "body.severity", ""),
    ({**RULE, "window_minutes": 0}, "body.window_minutes", ""),
    ({**RULE, "window_minutes": 10081}, "body.window_minutes", ""),
    ({**RULE, "treshold": 5}, "body.treshold", ""),
    ({**RULE, "name": "   "}, "body.name", "needs a name"),
    ({**RULE, "name": "x" * 10_000}, "body.name", ""),
    ({**RULE, "name": "bad\u0000name"}, "body.name", "control characters"),
    ({**RULE, "name": "=HYPERLINK(1)"}, "body.name", "formula"),
    ({**RULE, "metric": "energy_kwh'; DROP TABLE alert_rules; --"}, "body.metric", ""),
    ({**RULE, "metric": "a" * 10_000}, "body.metric", ""),
    ({**RULE, "threshold": "lots"}, "body.threshold", ""),
    ({**RULE, "threshold": [1]}, "body.threshold", ""),
    ({**RULE, "device_id": 2**40}, "body.device_id", ""),
    ({**RULE, "device_id": -1}, "body.device_id", ""),
    ({**RULE, "device_id": "1 OR 1=1"}, "body.device_id", ""),
    ({**RULE, "enabled": "sometimes"}, "body.enabled", ""),
]
BAD_JSON = [
    '{"name": "r", "kind": "above", "metric": "power_w", "threshold": NaN}',
    '{"name": "r", "kind": "above", "metric": "power_w", "threshold": Infinity}',
    '{"name": "r", "kind": "above", "metric": "power_w", "threshold": -Infinity}',
    '{"name": "r", "kind": "above", "metric": "power_w", "threshold": 1e999}',
    '{"name": "r", "kind": "above", "metric": "power_w", "threshold": 1' + "0" * 400 + "}",
    '{"name": "r", "kind": "above", "metric": "power_w", "threshold": 5',
    '["name", "r"]',
    "name=r&kind=above",
    "",
]


def test_bad_rules_are_refused_with_the_field_at_fault(api):
    with api.server.client(api.acme.keys["admin"]) as client:
        for body, field, message in BAD_RULES:
            response = client.post("/api/v1/rules", json={"name": "rule", **body})
            error = assert_envelope(response, 422, "validation_error")
            assert error["details"][0]["field"] == field, (body, error)
            assert message in error["message"], (body, error)
        # non-finite, huge beyond a double and malformed JSON
        for raw in BAD_JSON:
            response = client.post(
                "/api/v1/rules", content=raw, headers={"Content-Type": "application/json"}
            )
            assert_envelope(response, 422, "validation_error")
        assert client.get("/api/v1/rules").json()["items"] == []


def test_hostile_but_valid_values_are_stored_as_given(api):
    name = "x'); DROP TABLE alert_rules; -- <script>alert(1)</script> ☃"
    with api.server.client(api.acme.keys["admin"]) as client:
        for threshold in (1e308, -1e308, 5e-324, 0):
            response = client.post(
                "/api/v1/rules", json={**RULE, "name": name, "threshold": threshold}
            )
            assert response.status_code == 201, response.text
            assert response.json()["threshold"] == threshold
            assert response.json()["name"] == name
        assert len(client.get("/api/v1/rules").json()["items"]) == 4


def test_the_metric_fits_the_device_and_the_device_is_in_service(api, database_url):
    acme = api.acme
    with api.server.client(acme.keys["admin"]) as client:
        body = {**RULE, "metric": "water_m3", "device_id": acme.devices[0]}
        error = assert_envelope(client.post("/api/v1/rules", json=body), 422, "validation_error")
        assert error["message"] == (
            "metric water_m3 is for water meters, not energy meters like the device"
        )
        assert error["details"][0]["field"] == "body.metric"
        # a metric of every kind fits, and without a device any known metric does
        for body in (
            {**RULE, "metric": "temperature_c", "device_id": acme.devices[0]},
            {**RULE, "metric": "water_m3"},
        ):
            assert client.post("/api/v1/rules", json=body).status_code == 201
        with psycopg.connect(database_url) as conn:
            conn.execute(
                "UPDATE devices SET status = 'decommissioned' WHERE device_id = %s",
                (acme.devices[1],),
            )
        body = {**RULE, "device_id": acme.devices[1]}
        error = assert_envelope(client.post("/api/v1/rules", json=body), 422, "validation_error")
        assert error["message"] == (
            f"device {acme.devices[1]} is decommissioned: a rule on it never holds"
        )


def test_the_same_rule_twice_is_a_conflict(api, database_url):
    with api.server.client(api.acme.keys["admin"]) as client:
        first = client.post("/api/v1/rules", json=RULE).json()["rule_id"]
        # another name or window changes nothing an above rule does: the same condition
        again = client.post("/api/v1/rules", json={**RULE, "name": "Again", "window_minutes": 5})
        error = assert_envelope(again, 409, "conflict")
        assert error["details"] == {"rule_id": first}
        assert str(first) in error["message"]
        # another severity, threshold or device is another rule
        critical = client.post("/api/v1/rules", json={**RULE, "severity": "CRITICAL"})
        assert critical.status_code == 201
        other = client.post("/api/v1/rules", json={**RULE, "device_id": api.acme.devices[0]})
        assert other.status_code == 201
        # changing a rule into another one's condition conflicts too
        response = client.patch(
            f"/api/v1/rules/{critical.json()['rule_id']}", json={"severity": "WARNING"}
        )
        assert assert_envelope(response, 409, "conflict")["details"] == {"rule_id": first}
        # globex's rule is no conflict for acme
        globex_like = {"name": "b", "kind": "below", "metric": "power_w", "threshold": 1.5}
        assert (
            client.post("/api/v1/rules", json={**globex_like, "severity": "CRITICAL"}).status_code
            == 201
        )

    answers: list[int] = []

    def create() -> None:
        with api.server.client(api.acme.keys["admin"]) as client:
            answers.append(client.post("/api/v1/rules", json={**RULE, "threshold": 42}).status_code)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == [201] + [409] * 5
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM alert_rules WHERE threshold = 42").fetchone() == (
            1,
        )


def test_patch_refuses_nulls_for_required_fields_and_unknown_fields(api):
    with api.server.client(api.acme.keys["admin"]) as client:
        rule_id = client.post("/api/v1/rules", json=RULE).json()["rule_id"]
        for body in (
            {"name": None},
            {"kind": None},
            {"severity": None},
            {"window_minutes": None},
            {"enabled": None},
            {"metric": None},  # an above rule needs one
            {"rule_id": 5},
            {"created_by": "someone else"},
        ):
            response = client.patch(f"/api/v1/rules/{rule_id}", json=body)
            assert_envelope(response, 422, "validation_error")
        assert client.get(f"/api/v1/rules/{rule_id}").json()["name"] == "Overload"
