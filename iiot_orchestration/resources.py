"""Dagster resources: the one way assets, checks and sensors reach the database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg

from iiot_orchestration.db import connect


class PostgresResource(dg.ConfigurableResource):
    """The application database, entered as the cross-tenant service role ``platform_rw``."""

    database_url: str
    role: str | None = "platform_rw"
    application_name: str = "iiot-dagster"

    @contextmanager
    def get_connection(self) -> Iterator[psycopg.Connection]:
        with connect(
            self.database_url, role=self.role, application_name=self.application_name
        ) as conn:
            yield conn
