"""The tenant API's front door: keys, roles, the error envelope, limits, health and metrics,
against a real `iiot api` (uvicorn) and PostgreSQL."""

from __future__ import annotations

import time

import psycopg
import pytest

from iiot_orchestration.api import keys
from tests.api_helpers import assert_envelope, platform_key, running_api, seed_tenant


@pytest.fixture
def api(database_url, tmp_path):
    with psycopg.connect(database_url) as conn:
        acme = seed_tenant(conn, "acme", octet=1)
        globex = seed_tenant(conn, "globex", octet=2)
        platform = platform_key(conn)
    with running_api(database_url, tmp_path) as server:
        yield server, acme, globex, platform


def test_a_key_identifies_its_tenant_and_role(api):
    server, acme, _globex, _ = api
    with server.client(acme.keys["viewer"]) as client:
        me = client.get("/api/v1/me")
    assert me.status_code == 200
    assert me.json() == {
        "key_id": acme.key_ids["viewer"],
        "role": "viewer",
        "name": "acme viewer",
        "tenant": "acme",
    }


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer iiot_aaaaaaaa_" + "A" * 43},
        {"X-API-Key": "iiot_aaaaaaaa_" + "A" * 43},
        {"Authorization": "Bearer " + "x" * 10_000},
    ],
)
def test_requests_without_a_valid_key_get_401(api, headers):
    server, *_ = api
    with server.client(**headers) as client:
        response = client.get("/api/v1/me")
    error = assert_envelope(response, 401, "unauthenticated")
    assert "acme" not in response.text
    assert "globex" not in response.text
    assert error["details"] is None


def test_revoked_and_expired_keys_are_refused(api, database_url):
    server, acme, *_ = api
    with psycopg.connect(database_url) as conn:
        keys.revoke(conn, str(acme.key_ids["editor"]), actor="test")
        conn.execute(
            "UPDATE api_keys SET created_at = now() - interval '2 days',"
            " expires_at = now() - interval '1 second' WHERE key_id = %s",
            (acme.key_ids["admin"],),
        )
    for role in ("editor", "admin"):
        with server.client(acme.keys[role]) as client:
            assert_envelope(client.get("/api/v1/me"), 401, "unauthenticated")
    with server.client(acme.keys["viewer"]) as client:
        assert client.get("/api/v1/me").status_code == 200


def test_a_viewer_cannot_manage_keys(api):
    server, acme, *_ = api
    for role in ("viewer", "editor"):
        with server.client(acme.keys[role]) as client:
            assert_envelope(client.get("/api/v1/api-keys"), 403, "forbidden")
            response = client.post("/api/v1/api-keys", json={"name": "x", "role": "admin"})
            assert_envelope(response, 403, "forbidden")


def test_an_admin_creates_rotates_and_revokes_keys_of_its_tenant_only(api, database_url):
    server, acme, globex, _ = api
    with server.client(acme.keys["admin"]) as client:
        created = client.post("/api/v1/api-keys", json={"name": "grafana", "role": "viewer"})
        assert created.status_code == 201, created.text
        new_key = created.json()["key"]
        new_id = created.json()["api_key"]["key_id"]
        assert keys.well_formed(new_key)
        listed = client.get("/api/v1/api-keys", params={"limit": 2})
        page1 = listed.json()
        assert len(page1["items"]) == 2
        assert page1["next_cursor"]
        rest = client.get("/api/v1/api-keys", params={"cursor": page1["next_cursor"]}).json()
        ids = [k["key_id"] for k in page1["items"] + rest["items"]]
        assert sorted(ids) == sorted([*acme.key_ids.values(), new_id])
        assert "key_sha256" not in created.text

        rotated = client.post(f"/api/v1/api-keys/{new_id}/rotate")
        assert rotated.status_code == 201
        newer = rotated.json()["key"]
        # both valid during the grace period
        for key in (new_key, newer):
            with server.client(key) as other:
                assert other.get("/api/v1/me").status_code == 200
        revoked = client.post(f"/api/v1/api-keys/{new_id}/revoke")
        assert revoked.status_code == 200
        assert revoked.json()["revoked_at"]
        with server.client(new_key) as other:
            assert other.get("/api/v1/me").status_code == 401

        # another tenant's key id: 404, exactly as an id that does not exist
        for path in (
            f"/api/v1/api-keys/{globex.key_ids['viewer']}/revoke",
            "/api/v1/api-keys/999999/revoke",
            f"/api/v1/api-keys/{globex.key_ids['viewer']}/rotate",
        ):
            error = assert_envelope(client.post(path), 404, "not_found")
            assert "globex" not in error["message"]
    with server.client(globex.keys["viewer"]) as client:
        assert client.get("/api/v1/me").status_code == 200
    with psycopg.connect(database_url) as conn:
        actions = conn.execute(
            "SELECT action, actor FROM audit_log"
            " WHERE entity = 'api_key' AND actor LIKE 'api-key:%' ORDER BY audit_id"
        ).fetchall()
    actor = f"api-key:{acme.key_ids['admin']}"
    assert actions == [
        ("api_key.created", actor),
        ("api_key.created", actor),
        ("api_key.rotated", actor),
        ("api_key.revoked", actor),
    ]


def test_an_admin_cannot_mint_a_platform_key(api):
    server, acme, *_ = api
    with server.client(acme.keys["admin"]) as client:
        response = client.post("/api/v1/api-keys", json={"name": "x", "role": "platform"})
    assert_envelope(response, 422, "validation_error")


def test_a_tenant_key_ignores_the_tenant_header(api):
    server, acme, *_ = api
    with server.client(acme.keys["viewer"], **{"X-IIOT-Tenant": "globex"}) as client:
        assert client.get("/api/v1/me").json()["tenant"] == "acme"


def test_a_platform_key_lists_tenants_and_acts_for_the_one_it_names(api):
    server, acme, globex, platform = api
    with server.client(platform) as client:
        tenants = client.get("/api/v1/tenants").json()["items"]
        assert [t["slug"] for t in tenants] == ["acme", "globex"]
        assert client.get("/api/v1/me").json()["tenant"] is None
        assert_envelope(client.get("/api/v1/api-keys"), 400, "tenant_required")
        named = client.get("/api/v1/api-keys", headers={"X-IIOT-Tenant": "globex"})
        assert {k["key_id"] for k in named.json()["items"]} == set(globex.key_ids.values())
        assert_envelope(
            client.get("/api/v1/me", headers={"X-IIOT-Tenant": "nobody"}), 404, "not_found"
        )
    with server.client(acme.keys["admin"]) as client:
        assert_envelope(client.get("/api/v1/tenants"), 403, "forbidden")


def test_every_error_has_the_envelope_and_a_request_id(api):
    server, acme, *_ = api
    with server.client(acme.keys["admin"]) as client:
        assert_envelope(client.get("/api/v1/nothing-here"), 404, "not_found")
        assert_envelope(client.delete("/api/v1/me"), 405, "method_not_allowed")
        bad = client.post("/api/v1/api-keys", json={"name": "", "role": "owner"})
        error = assert_envelope(bad, 422, "validation_error")
        assert {d["field"] for d in error["details"]} >= {"body.name", "body.role"}
        assert_envelope(
            client.post(
                "/api/v1/api-keys",
                content=b"{not json",
                headers={"Content-Type": "application/json"},
            ),
            422,
            "validation_error",
        )
        assert_envelope(client.get("/api/v1/api-keys", params={"cursor": "!!!"}), 400, "bad_cursor")
        assert_envelope(
            client.get("/api/v1/api-keys", params={"limit": 0}), 422, "validation_error"
        )
        mine = client.get("/api/v1/me", headers={"X-Request-ID": "trace-123"})
        assert mine.headers["x-request-id"] == "trace-123"
        hostile = client.get("/api/v1/me", headers={"X-Request-ID": "a\tb<script>"})
        assert hostile.headers["x-request-id"] != "a\tb<script>"
    assert "trace-123" in server.output()


def test_a_body_over_the_limit_gets_413(database_url, tmp_path):
    with psycopg.connect(database_url) as conn:
        acme = seed_tenant(conn, "acme", devices=1, hours=1)
    env = {"IIOT_API_MAX_BODY_BYTES": "2048"}
    with (
        running_api(database_url, tmp_path, **env) as server,
        server.client(acme.keys["admin"]) as client,
    ):
        big = client.post(
            "/api/v1/api-keys",
            content=b"x" * 4096,
            headers={"Content-Type": "application/json"},
        )
        assert_envelope(big, 413, "too_large")

        def chunks():
            for _ in range(8):
                yield b"y" * 1024

        streamed = client.post(
            "/api/v1/api-keys", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert_envelope(streamed, 413, "too_large")


def test_a_key_over_its_rate_gets_429_with_retry_after(database_url, tmp_path):
    with psycopg.connect(database_url) as conn:
        acme = seed_tenant(conn, "acme", devices=1, hours=1)
    env = {"IIOT_API_RATE_PER_SECOND": "1", "IIOT_API_RATE_BURST": "3"}
    with running_api(database_url, tmp_path, **env) as server:
        with server.client(acme.keys["viewer"]) as client:
            statuses = [client.get("/api/v1/me") for _ in range(5)]
        with server.client(acme.keys["admin"]) as other:
            assert other.get("/api/v1/me").status_code == 200  # buckets are per key
    assert [r.status_code for r in statuses[:3]] == [200, 200, 200]
    limited = statuses[-1]
    assert_envelope(limited, 429, "rate_limited")
    assert int(limited.headers["retry-after"]) >= 1


def test_health_and_metrics(api):
    server, acme, *_ = api
    with server.client() as client:
        assert client.get("/health/live").json() == {"status": "live"}
        assert client.get("/health/ready").json() == {"status": "ready"}
        with server.client(acme.keys["viewer"]) as keyed:
            keyed.get("/api/v1/me")
            keyed.get("/api/v1/api-keys")
        text = client.get("/metrics").text
    assert 'iiot_api_requests_total{method="GET",route="/api/v1/me",status="200"}' in text
    assert 'route="/api/v1/api-keys",status="403"' in text
    assert "iiot_api_request_duration_seconds_bucket" in text


def test_without_the_database_requests_get_503_and_the_connection_stays_usable(tmp_path):
    url = "postgresql://nobody@127.0.0.1:1/none"
    key = keys.generate()[1]
    with (
        running_api(url, tmp_path, IIOT_API_POOL_TIMEOUT_SECONDS="2") as server,
        server.client(key) as client,
    ):
        ready = client.get("/health/ready")
        keyed = client.get("/api/v1/me")
        latest = client.get("/api/v1/telemetry/latest")  # a route on the asyncio pool
        assert client.get("/health/live").status_code == 200  # same kept-alive connection
    assert_envelope(ready, 503, "unavailable")
    for response in (keyed, latest):
        assert_envelope(response, 503, "unavailable")
        assert response.headers["retry-after"] == "5"


def test_an_unexpected_error_is_a_500_envelope_and_the_connection_stays_usable():
    """A bug in a route: the client gets the envelope with a request id, the log the traceback,
    and a kept-alive connection survives (Starlette alone would re-raise to the server)."""
    import threading

    import httpx
    import uvicorn

    from iiot_orchestration.api.app import create_app
    from iiot_orchestration.services import free_port
    from iiot_orchestration.settings import load_settings

    app = create_app(load_settings({"IIOT_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x"}))

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(100):
                try:
                    client.get("/health/live")
                    break
                except httpx.TransportError:
                    threading.Event().wait(0.05)
            first = client.get("/boom")
            second = client.get("/boom")
            assert client.get("/health/live").status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
    for response in (first, second):
        error = assert_envelope(response, 500, "internal_error")
        assert "a bug" not in response.text
        assert error["request_id"]


def test_several_workers_share_the_rate_and_sum_their_metrics(database_url, tmp_path):
    """`iiot api --workers 2` (IIOT_API_WORKERS): both processes answer, each key's rate is
    shared between them, and /metrics counts every process's requests."""
    with psycopg.connect(database_url) as conn:
        acme = seed_tenant(conn, "acme", devices=1, hours=1)
    env = {"IIOT_API_WORKERS": "2", "IIOT_API_RATE_PER_SECOND": "1", "IIOT_API_RATE_BURST": "4"}
    with running_api(database_url, tmp_path, **env) as server:
        with server.client(acme.keys["viewer"]) as client:
            started = time.monotonic()
            statuses = [client.get("/api/v1/me").status_code for _ in range(12)]
            elapsed = time.monotonic() - started
        with server.client() as client:
            pages = [client.get("/metrics").text for _ in range(4)]
    # the key's burst of 4 and 1 a second, split over the two workers: at most 4 pass at once
    # and one more a second, whichever worker answers (unsplit, 8 and two a second would)
    assert statuses.count(200) <= 4 + int(elapsed), (statuses, elapsed)
    assert set(statuses) == {200, 429}
    for text in pages:  # whichever process answers counts both processes' requests
        counted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("iiot_api_requests_total{") and 'route="/api/v1/me"' in line
        )
        assert counted == 12, text
    assert "2 workers" in server.output()
