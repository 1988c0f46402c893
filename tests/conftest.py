"""Real services for the tests: PostgreSQL and an MQTT broker at 127.0.0.1 when reachable,
embedded ones otherwise. A template database is migrated once per session and cloned per test."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from iiot_orchestration import migrate
from iiot_orchestration.services import (
    Broker,
    port_open,
    start_broker,
    start_embedded_postgres,
    start_mosquitto,
)
from iiot_orchestration.settings import to_url
from iiot_orchestration.storage import TIMESCALE_MISSING, timescale_support

LOCAL_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# The tests' partition keys are fixed days of 2026; without this the code location would start its
# partitions on the day the test database was migrated (tests/test_partitions.py tests that).
os.environ.setdefault("IIOT_PARTITIONS_START", "2026-01-01")
REPO_ROOT = Path(__file__).resolve().parents[1]


def _reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def database_url_for(server_url: str, name: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(server_url)
    params["dbname"] = name
    return to_url(params)


def create_database(server_url: str, name: str, template: str | None = None) -> str:
    with psycopg.connect(server_url, autocommit=True) as conn:
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        conn.execute(statement)
    return database_url_for(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def close_to_connections(server_url: str, name: str) -> None:
    """Make ``name`` usable as a template: TimescaleDB keeps a background worker connected."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(name))
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            others = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            ).fetchone()[0]
            if not others:
                return
            time.sleep(0.1)
        raise RuntimeError(f"sessions on template database {name} did not end")


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a PostgreSQL server's `postgres` database that the tests may create databases on."""
    url = os.environ.get("IIOT_TEST_SERVER_URL", LOCAL_SERVER_URL)
    if _reachable(url):
        yield url
        return
    server = start_embedded_postgres(tmp_path_factory.mktemp("embedded") / "pgdata")
    try:
        yield server.url("postgres")
    finally:
        server.stop()


@pytest.fixture(scope="session")
def template_database(pg_server: str) -> Iterator[str]:
    name = f"iiot_tmpl_{uuid.uuid4().hex[:10]}"
    url = create_database(pg_server, name)
    migrate.migrate(url, "auto", echo=lambda _: None)
    close_to_connections(pg_server, name)
    yield name
    drop_database(pg_server, name)


@pytest.fixture(scope="session")
def storage_mode(pg_server: str, template_database: str) -> str:
    """The mode the test databases run in: timescale when the server can, else postgres."""
    with psycopg.connect(pg_server) as conn:
        return "timescale" if timescale_support(conn).usable else "postgres"


@pytest.fixture
def postgres_mode(storage_mode: str) -> None:
    """For tests of PostgreSQL-mode mechanics (partitions that iiot creates itself)."""
    if storage_mode != "postgres":
        pytest.skip("TimescaleDB manages chunks itself; this tests PostgreSQL-mode partitions")


@pytest.fixture
def empty_database_url(pg_server: str) -> Iterator[str]:
    name = f"iiot_t_{uuid.uuid4().hex[:12]}"
    url = create_database(pg_server, name)
    yield url
    drop_database(pg_server, name)


@pytest.fixture
def database_url(pg_server: str, template_database: str) -> Iterator[str]:
    """A migrated database (PostgreSQL storage mode), private to the test."""
    name = f"iiot_t_{uuid.uuid4().hex[:12]}"
    url = create_database(pg_server, name, template=template_database)
    yield url
    drop_database(pg_server, name)


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url, autocommit=True) as connection:
        yield connection


@pytest.fixture(scope="session")
def timescale_server_url(pg_server: str) -> str:
    """A server that can run the timescale storage mode, or a skip naming what is missing."""
    url = os.environ.get("IIOT_TEST_TIMESCALE_URL", pg_server)
    if not _reachable(url):
        pytest.skip(f"{TIMESCALE_MISSING}: IIOT_TEST_TIMESCALE_URL server {url} is unreachable")
    with psycopg.connect(url) as connection:
        support = timescale_support(connection)
    if not support.usable:
        pytest.skip(support.reason)
    return url


@pytest.fixture(scope="session")
def mqtt_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """IIOT_TEST_MQTT_URL (default 127.0.0.1:1883) when reachable, else a broker of our own."""
    url = os.environ.get("IIOT_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
    parts = urlsplit(url)
    if port_open(parts.hostname or "127.0.0.1", parts.port or 1883):
        yield url
        return
    broker = start_broker(tmp_path_factory.mktemp("broker"))
    try:
        yield broker.url
    finally:
        broker.stop()


@pytest.fixture
def ingest_broker(tmp_path: Path) -> Iterator[Broker]:
    """A Mosquitto of the test's own, with the project's configuration, on a free port."""
    running = start_mosquitto(tmp_path / "mosquitto")
    yield running
    running.stop()


@pytest.fixture
def cli_env(database_url: str, tmp_path: Path) -> dict[str, str]:
    """Environment for running `iiot` against the test's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(IIOT_DATABASE_URL=database_url, IIOT_DATA_DIR=str(tmp_path / "var"))
    return env
