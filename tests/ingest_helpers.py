"""Shared by the ingest tests."""

import time

from iiot_orchestration import registry

MAC = "aa:bb:cc:00:00:01"


def provision(conn, plan: str = "pro") -> None:
    registry.create_tenant(conn, slug="acme", name="Acme", plan=plan, timezone="UTC")
    registry.provision_devices(conn, "acme", [registry.DeviceRequest(MAC, "energy")])


def count(conn, table: str, where: str = "true") -> int:
    return conn.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchone()[0]


def wait_for(condition, timeout: float = 30.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes (a wait, not a timing check)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False
