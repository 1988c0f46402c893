"""Device certificates over the tenant API: expiry and renewal state per device, each device's
history, another tenant's device, and no PEM, against a real `iiot api` and PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from iiot_orchestration import ota, pki
from tests.api_helpers import ApiServer, Tenant, assert_envelope, running_api, seed_tenant
from tests.certificate_helpers import PREFIX, copy_ca

NOW = datetime.now(UTC)


class Publisher:
    """Accepts every update, or refuses them all (a broker that says no)."""

    def __init__(self, accept: bool) -> None:
        self.accept = accept
        self.topics: list[str] = []

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        if not self.accept:
            raise ota.OtaError("not authorized")
        self.topics.append(topic)


@dataclass
class Seeded:
    server: ApiServer
    acme: Tenant
    globex: Tenant
    serials: dict[str, str]  # what -> hex serial


@pytest.fixture(scope="module")
def module_ca(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("api_ca")
    pki.init_ca(directory)
    return directory


@pytest.fixture
def api(database_url, tmp_path, module_ca):
    """acme: a device due for renewal with an update published, one whose first certificate
    was revoked and replaced, one expired, one without a certificate; globex: a device whose
    renewal failed."""
    ca = copy_ca(module_ca, tmp_path / "pki")
    serials: dict[str, str] = {}
    with psycopg.connect(database_url, autocommit=True) as conn:
        acme = seed_tenant(conn, "acme", devices=4, octet=1)
        globex = seed_tenant(conn, "globex", devices=1, octet=2)
        macs = [f"02:00:00:00:01:0{n}" for n in (1, 2, 3, 4)]

        def issue(mac: str, **options) -> str:
            issued = pki.issue_for_device(conn, ca, mac, actor="test", **options)
            return pki.serial_hex(issued.certificate.serial_number)

        serials["due"] = issue(macs[0], not_after=NOW + timedelta(days=100))
        serials["revoked"] = issue(macs[1])
        pki.revoke(conn, macs[1], code="keyCompromise", reason="stolen from site 7", actor="t")
        serials["replacement"] = issue(macs[1])
        serials["expired"] = issue(
            macs[2], now=NOW - timedelta(days=400), not_after=NOW - timedelta(days=3)
        )
        serials["globex"] = issue("02:00:00:00:02:01", not_after=NOW + timedelta(days=50))

        # the renewal batch picks devices that reported lately: globex's first, refused
        conn.execute(
            "UPDATE devices SET last_seen = %s WHERE tenant_id = %s", (NOW, globex.tenant_id)
        )
        policy = ota.RenewalPolicy()
        failed = ota.run_batch(conn, ca, Publisher(False), policy, prefix=PREFIX, now=NOW)
        assert list(failed.failed) == ["02:00:00:00:02:01"]
        conn.execute("UPDATE devices SET last_seen = %s WHERE mac = %s", (NOW, macs[0]))
        published = ota.run_batch(conn, ca, Publisher(True), policy, prefix=PREFIX, now=NOW)
        assert published.published == [macs[0]]
        (new_serial,) = conn.execute(
            "SELECT serial FROM device_certificates WHERE status = 'pending'"
        ).fetchone()
        serials["pending"] = pki.serial_hex(int(new_serial))
    with running_api(database_url, tmp_path) as server:
        yield Seeded(server, acme, globex, serials)


def _devices(response) -> list[int]:
    assert response.status_code == 200, response.text
    return [item["device_id"] for item in response.json()["items"]]


def test_each_device_has_its_expiry_and_renewal_state(api):
    acme, serials = api.acme, api.serials
    with api.server.client(acme.keys["viewer"]) as client:
        response = client.get("/api/v1/certificates")
    assert _devices(response) == acme.devices
    due, replaced, expired, bare = response.json()["items"]
    assert "CERTIFICATE" not in response.text  # no PEM
    assert "globex" not in response.text
    assert serials["globex"] not in response.text
    assert "stolen" not in response.text  # the operator's revocation note

    assert due["mac"] == "02:00:00:00:01:01"
    assert (due["device_name"], due["device_status"]) == ("acme-meter-1", "active")
    assert due["expiry"] == "renewal_due"
    assert due["certificate"]["serial"] == serials["due"]
    assert due["certificate"]["subject_cn"] == "02:00:00:00:01:01"
    assert len(due["certificate"]["fingerprint_sha256"]) == 64
    assert due["certificate"]["days_left"] in (99, 100)
    renewal = due["renewal"]
    assert renewal["status"] == "published"
    assert renewal["attempt"] == 1
    assert renewal["new_serial"] == serials["pending"]
    assert renewal["failure_reason"] is None
    assert renewal["published_at"]
    assert renewal["completed_at"] is None

    assert replaced["expiry"] == "ok"
    assert replaced["certificate"]["serial"] == serials["replacement"]
    assert replaced["certificate"]["days_left"] > 3600
    assert replaced["renewal"] is None

    assert expired["expiry"] == "expired"
    assert expired["certificate"]["days_left"] in (-4, -3)

    assert bare["expiry"] == "none"
    assert bare["certificate"] is None
    assert bare["renewal"] is None


def test_certificates_are_filtered_and_paged(api):
    acme = api.acme
    with api.server.client(acme.keys["viewer"]) as client:

        def only(**params) -> list[int]:
            return _devices(client.get("/api/v1/certificates", params=params))

        assert only(expiry="renewal_due") == acme.devices[:1]
        assert only(expiry="ok") == acme.devices[1:2]
        assert only(expiry="expired") == acme.devices[2:3]
        assert only(expiry="none") == acme.devices[3:]
        assert only(renewal_status="published") == acme.devices[:1]
        assert only(renewal_status="failed") == []  # globex's failure is not acme's
        assert only(device_id=acme.devices[1]) == acme.devices[1:2]
        assert only(device_id=api.globex.devices[0]) == []

        page1 = client.get("/api/v1/certificates", params={"limit": 3}).json()
        assert page1["next_cursor"]
        rest = client.get("/api/v1/certificates", params={"cursor": page1["next_cursor"]})
        assert [i["device_id"] for i in page1["items"]] + _devices(rest) == acme.devices
        assert rest.json()["next_cursor"] is None

        for params in (
            {"expiry": "soon"},
            {"renewal_status": "'; DROP TABLE device_certificates; --"},
            {"device_id": 2**40},
            {"limit": 1001},
        ):
            response = client.get("/api/v1/certificates", params=params)
            assert_envelope(response, 422, "validation_error")
        response = client.get("/api/v1/certificates", params={"cursor": "eyJ4IjoxfQ"})
        assert_envelope(response, 400, "bad_cursor")


def test_a_failed_renewal_says_why_and_when_it_is_tried_again(api):
    globex = api.globex
    with api.server.client(globex.keys["viewer"]) as client:
        [item] = client.get("/api/v1/certificates").json()["items"]
    assert item["expiry"] == "renewal_due"
    renewal = item["renewal"]
    assert renewal["status"] == "failed"
    assert renewal["failure_reason"].startswith("publish_failed")
    assert datetime.fromisoformat(renewal["next_attempt_after"]) > NOW
    assert renewal["completed_at"]


def test_a_devices_history_is_newest_first(api):
    acme, serials = api.acme, api.serials
    with api.server.client(acme.keys["viewer"]) as client:
        due = client.get(f"/api/v1/devices/{acme.devices[0]}/certificates")
        replaced = client.get(f"/api/v1/devices/{acme.devices[1]}/certificates")
        bare = client.get(f"/api/v1/devices/{acme.devices[3]}/certificates")
        page1 = client.get(f"/api/v1/devices/{acme.devices[1]}/certificates", params={"limit": 1})
        page2 = client.get(
            f"/api/v1/devices/{acme.devices[1]}/certificates",
            params={"limit": 1, "cursor": page1.json()["next_cursor"]},
        )
    assert due.status_code == 200, due.text
    assert "CERTIFICATE" not in due.text + replaced.text
    pending, active = due.json()["items"]
    assert (pending["status"], pending["serial"]) == ("pending", serials["pending"])
    assert pending["renewal"]["status"] == "published"
    assert pending["renewal"]["new_serial"] == serials["pending"]
    assert (active["status"], active["serial"], active["renewal"]) == (
        "active",
        serials["due"],
        None,
    )

    newer, revoked = replaced.json()["items"]
    assert (newer["status"], newer["serial"]) == ("active", serials["replacement"])
    assert (revoked["status"], revoked["serial"]) == ("revoked", serials["revoked"])
    assert revoked["revocation_code"] == "keyCompromise"
    assert revoked["revoked_at"]
    assert "stolen" not in replaced.text

    assert bare.json() == {"items": [], "next_cursor": None}
    assert page1.json()["items"] == [newer]
    assert page2.json() == {"items": [revoked], "next_cursor": None}


def test_another_tenants_device_is_not_found_like_a_missing_one(api):
    with api.server.client(api.acme.keys["viewer"]) as client:
        for device_id in (api.globex.devices[0], 2_000_000_000):
            response = client.get(f"/api/v1/devices/{device_id}/certificates")
            assert assert_envelope(response, 404, "not_found")["message"] == "device not found"
            assert api.serials["globex"] not in response.text
        for bad in ("abc", "0", str(2**31), "1 OR 1=1"):
            response = client.get(f"/api/v1/devices/{bad}/certificates")
            assert_envelope(response, 422, "validation_error")
    with api.server.client() as client:
        response = client.get(f"/api/v1/devices/{api.acme.devices[0]}/certificates")
        assert_envelope(response, 401, "unauthenticated")
        assert_envelope(client.get("/api/v1/certificates"), 401, "unauthenticated")
