"""The raw telemetry observation: every few minutes, what landed and how fresh it is."""

from datetime import UTC, datetime

import dagster as dg

from assets.raw_telemetry import observe
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.settings import load_settings

OBSERVE_EVERY_SECONDS = 300


@dg.sensor(
    minimum_interval_seconds=OBSERVE_EVERY_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Observes raw_telemetry every 5 minutes (newest reading, readings landed per "
    "hour, freshness against IIOT_FRESHNESS_MINUTES) without launching a run.",
)
def raw_telemetry_sensor(
    context: dg.SensorEvaluationContext, postgres: PostgresResource
) -> dg.SensorResult:
    with postgres.get_connection() as conn:
        observation = observe(conn, datetime.now(UTC), load_settings().freshness_minutes)
    return dg.SensorResult(asset_events=[observation])
