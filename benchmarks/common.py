"""Shared set-up for benchmarks: a scratch database on the same server the tests use."""

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

from iiot_orchestration import migrate
from iiot_orchestration.settings import to_url

SERVER_URL = os.environ.get(
    "IIOT_BENCH_SERVER_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@contextmanager
def scratch_database(prefix: str = "iiot_bench") -> Iterator[str]:
    """A freshly migrated database, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = psycopg.conninfo.conninfo_to_dict(SERVER_URL)
    params["dbname"] = name
    url = to_url(params)
    try:
        migrate.migrate(url, "auto", echo=lambda _: None)
        yield url
    finally:
        with psycopg.connect(SERVER_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def timed(func, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = func(*args, **kwargs)
    return time.perf_counter() - started, result
