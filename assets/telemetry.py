"""Telemetry storage upkeep: daily partitions exist ahead of the data that will land in them."""

from datetime import UTC, datetime, timedelta

import dagster as dg

from assets.raw_telemetry import raw_telemetry
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.settings import load_settings
from iiot_orchestration.storage import storage_for

PARTITIONS_AHEAD_CHECK = "partitions_ahead"
PARTITIONS_BEHIND_DAYS = 1


@dg.asset(
    group_name="ingest",
    deps=[raw_telemetry],
    kinds={"postgres"},
    owners=["team:platform"],
    code_version="1",
    # created daily at 00:15 UTC; a missed day still leaves IIOT_PARTITIONS_AHEAD_DAYS of margin
    freshness_policy=dg.FreshnessPolicy.time_window(
        fail_window=timedelta(hours=49), warn_window=timedelta(hours=25)
    ),
    check_specs=[
        dg.AssetCheckSpec(
            PARTITIONS_AHEAD_CHECK,
            asset="telemetry_partitions",
            blocking=True,
            description="Every UTC day from yesterday to the configured horizon can take data.",
        )
    ],
)
def telemetry_partitions(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> dg.MaterializeResult:
    """Daily telemetry partitions, created ahead so that ingest never meets a missing day."""
    ahead = load_settings().partitions_ahead_days
    today = datetime.now(UTC).date()
    first, last = today - timedelta(days=PARTITIONS_BEHIND_DAYS), today + timedelta(days=ahead)
    with postgres.get_connection() as conn:
        storage = storage_for(conn)
        created = storage.ensure_partitions(conn, first, last)
        days = set(storage.partition_days(conn))
    context.log.info(
        "telemetry partitions ensured",
        extra={
            "partitions_created": created,
            "first_day": str(first),
            "last_day": str(last),
            "storage_mode": storage.mode,
        },
    )
    if storage.mode == "timescale":
        missing: list[str] = []  # TimescaleDB creates a chunk when the first row of a day lands
    else:
        wanted = {first + timedelta(days=n) for n in range((last - first).days + 1)}
        missing = sorted(str(d) for d in wanted - days)
    return dg.MaterializeResult(
        metadata={
            "storage_mode": storage.mode,
            "created": created,
            "horizon_days": ahead,
            "partitions": len(days),
            "newest_day": str(max(days)) if days else "none",
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=PARTITIONS_AHEAD_CHECK,
                passed=not missing,
                metadata={"missing_days": ", ".join(missing) or "none"},
            )
        ],
    )
