"""The Dagster instance classes `dagster.yaml` names: they take their settings from the same
``IIOT_*`` variables, with the same defaults, as the rest of the project.

Dagster's ``env:`` source has no default (an unset variable is a ``PostProcessingError``), so a
variable the README calls optional cannot be named there; these classes read it through
``iiot_orchestration.settings`` instead."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagster import Field, QueuedRunCoordinator, StringSource
from dagster._serdes import ConfigurableClassData
from dagster_postgres import DagsterPostgresStorage

from iiot_orchestration.settings import SettingsError, load_settings


class IiotRunCoordinator(QueuedRunCoordinator):
    """Dagster's queued run coordinator; ``max_concurrent_runs``, unless `dagster.yaml` sets
    it, is IIOT_MAX_CONCURRENT_RUNS (default 4)."""

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]
    ) -> IiotRunCoordinator:
        if config_value.get("max_concurrent_runs") is None:
            limit = load_settings().max_concurrent_runs
            config_value = {**config_value, "max_concurrent_runs": limit}
        return super().from_config_value(inst_data, config_value)


class IiotPostgresStorage(DagsterPostgresStorage):
    """Dagster's PostgreSQL storage on ``postgres_url`` if `dagster.yaml` gives one, else on
    IIOT_DAGSTER_DATABASE_URL, whose default is the database of IIOT_DATABASE_URL with
    ``_dagster`` appended to its name."""

    @classmethod
    def config_type(cls) -> dict[str, Field]:
        return {
            "postgres_url": Field(StringSource, is_required=False),
            "should_autocreate_tables": Field(bool, is_required=False, default_value=True),
        }

    @classmethod
    def from_config_value(  # type: ignore[override]
        cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
    ) -> IiotPostgresStorage:
        url = config_value.get("postgres_url") or load_settings().dagster_database_url
        if not url:
            raise SettingsError(
                "Dagster's storage needs IIOT_DAGSTER_DATABASE_URL, or IIOT_DATABASE_URL (then "
                "it is that database's name + `_dagster`); neither is set"
            )
        return cls(
            postgres_url=url,
            should_autocreate_tables=config_value.get("should_autocreate_tables", True),
            inst_data=inst_data,
        )
