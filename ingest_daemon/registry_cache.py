"""The daemon's in-memory view of the device registry, kept fresh by LISTEN/NOTIFY and a timer."""

from __future__ import annotations

import logging
import threading
import time

import psycopg

from iiot_orchestration.db import DatabaseUnavailable, connect, query
from ingest_daemon.validation import Device

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "iiot_registry"


def load_devices(conn: psycopg.Connection) -> dict[str, Device]:
    """Every device by canonical MAC; a device of a suspended tenant counts as inactive."""
    devices = {}
    for row in conn.execute(query("ingest_registry")):
        mac, device_id, tenant_id, status, metrics, retention, rate, hard_block, tenant_status = row
        if tenant_status != "active" and status == "active":
            status = f"tenant {tenant_status}"
        devices[mac] = Device(
            device_id, tenant_id, mac, status, frozenset(metrics), retention, rate, hard_block
        )
    return devices


class RegistryCache:
    """``get(mac)`` answers from memory; a background thread reloads on change and on a timer."""

    def __init__(self, database_url: str, *, refresh_seconds: float = 60.0) -> None:
        self.database_url = database_url
        self.refresh_seconds = refresh_seconds
        self.reloads = 0
        self._devices: dict[str, Device] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reload()

    def get(self, mac: str) -> Device | None:
        return self._devices.get(mac)

    def __len__(self) -> int:
        return len(self._devices)

    def reload(self) -> None:
        with connect(self.database_url, application_name="iiot-ingest-registry") as conn:
            self._devices = load_devices(conn)  # one reference swap: readers never see half
        self.reloads += 1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._listen, name="registry-cache", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.database_url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self.reload()  # changes made while we were not listening
                    next_refresh = time.monotonic() + self.refresh_seconds
                    while not self._stop.is_set():
                        changed = any(True for _ in conn.notifies(timeout=1.0, stop_after=1))
                        if changed or time.monotonic() >= next_refresh:
                            self.reload()
                            next_refresh = time.monotonic() + self.refresh_seconds
            except (psycopg.Error, DatabaseUnavailable) as exc:
                log.warning(
                    "registry cache lost its database connection; retrying",
                    extra={"error": str(exc)[:200]},
                )
                self._stop.wait(2.0)
