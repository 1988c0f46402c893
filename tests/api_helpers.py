"""A real `iiot api` (uvicorn in a subprocess on a free port) against a test database, two
tenants with devices and readings, and keys of every role."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg

from iiot_orchestration import registry
from iiot_orchestration.api import keys
from iiot_orchestration.services import free_port

SEED_START = datetime(2026, 11, 2, tzinfo=UTC)
ROLES = ("viewer", "editor", "admin")


@dataclass
class ApiServer:
    url: str
    process: subprocess.Popen
    log: Path

    def client(self, key: str | None = None, **headers: str) -> httpx.Client:
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers={**auth, **headers}, timeout=60)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running_api(database_url: str, tmp_path: Path, **env: str) -> Iterator[ApiServer]:
    """`iiot api` on a free port; stopped with SIGTERM (and reaped) when the block ends."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    environ.update(
        {
            "IIOT_DATABASE_URL": database_url,
            "IIOT_DATA_DIR": str(tmp_path / "var"),
            "IIOT_API_RATE_PER_SECOND": "1000",
            "IIOT_API_RATE_BURST": "1000",
            **env,
        }
    )
    log = tmp_path / f"api-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "iiot_orchestration.cli", "api", "--port", str(port)],
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = ApiServer(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"iiot api exited with {process.returncode}:\n{server.output()}")
            try:
                if httpx.get(f"{server.url}/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"iiot api did not answer in 60 s:\n{server.output()}")
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Tenant:
    slug: str
    tenant_id: int
    devices: list[int] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # role -> key
    key_ids: dict[str, int] = field(default_factory=dict)


def seed_tenant(
    conn: psycopg.Connection, slug: str, *, devices: int = 2, hours: int = 6, octet: int = 1
) -> Tenant:
    """A tenant on the pro plan with energy meters, readings every 15 minutes from SEED_START,
    and one key of each role."""
    tenant = registry.create_tenant(
        conn, slug=slug, name=slug.title(), plan="pro", timezone="America/Sao_Paulo"
    )
    requests = [
        registry.DeviceRequest(
            mac=f"02:00:00:00:{octet:02x}:{n:02x}", meter_kind="energy", name=f"{slug}-meter-{n}"
        )
        for n in range(1, devices + 1)
    ]
    results = registry.provision_devices(conn, slug, requests, actor="test")
    ids = [r.device_id for r in results]
    assert all(ids), results
    conn.execute(
        "SELECT iiot_ensure_telemetry_partitions(%s::date, %s::date)",
        (SEED_START - timedelta(days=1), SEED_START + timedelta(days=2)),
    )
    conn.execute(
        "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
        " SELECT %s, d, 'energy_kwh', %s + make_interval(mins => 15 * n), n * 0.25 + d"
        "   FROM unnest(%s::int[]) d, generate_series(0, %s) n",
        (tenant.tenant_id, SEED_START, ids, hours * 4 - 1),
    )
    seeded = Tenant(slug, tenant.tenant_id, ids)
    for role in ROLES:
        new = keys.create(conn, tenant=slug, role=role, name=f"{slug} {role}", actor="test")
        seeded.keys[role], seeded.key_ids[role] = new.key, new.key_id
    conn.commit()
    return seeded


def platform_key(conn: psycopg.Connection) -> str:
    new = keys.create(conn, tenant=None, role=keys.PLATFORM, name="operations", actor="test")
    conn.commit()
    return new.key


def later(**delta: float) -> datetime:
    return datetime.now(UTC) + timedelta(**delta)


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict:
    """The response is an error of ``status`` and ``code`` in the one envelope; its error."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    return error
