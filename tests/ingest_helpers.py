"""Shared by the ingest tests."""

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from iiot_orchestration import registry

MAC = "aa:bb:cc:00:00:01"


def start_ingest_process(
    database_url: str,
    mqtt_url: str,
    data_dir: Path,
    *options: str,
    output=subprocess.PIPE,
    new_session: bool = False,
    **settings: str,
) -> subprocess.Popen:
    """`iiot ingest --batch-age-ms 50 <options>` against the test's database and broker, with
    ``settings`` as more IIOT_* variables (``IIOT_TOPIC_PREFIX=...``); its output, stderr
    included, to ``output`` (text); with ``new_session``, a process group of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(
        IIOT_DATABASE_URL=database_url,
        IIOT_MQTT_URL=mqtt_url,
        IIOT_DATA_DIR=str(data_dir),
        **settings,
    )
    command = [sys.executable, "-m", "iiot_orchestration.cli", "ingest", "--batch-age-ms", "50"]
    return subprocess.Popen(
        [*command, *options],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,
    )


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


@contextlib.contextmanager
def database_refusing_ingest(pg_server: str, database_url: str) -> Iterator[None]:
    """The database refuses new connections and the ingest daemon's sessions are cut (their
    application_name starts with iiot-ingest); connections are let in again on exit."""
    name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        try:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND application_name LIKE 'iiot-ingest%%'",
                (name,),
            )
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
