"""The single Dagster entry point: domain modules plus the cross-cutting resources."""

import dagster as dg

from assets import telemetry
from iiot_orchestration.resources import PostgresResource
from sensors import schedules

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([telemetry]),
    asset_checks=dg.load_asset_checks_from_modules([telemetry]),
    jobs=[schedules.telemetry_partitions_job],
    schedules=[schedules.telemetry_partitions_schedule],
    resources={"postgres": PostgresResource(database_url=dg.EnvVar("IIOT_DATABASE_URL"))},
)
