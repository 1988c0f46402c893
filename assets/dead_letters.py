"""Dead-letter upkeep: refusals are kept for IIOT_DEAD_LETTER_RETENTION_DAYS (to be looked at and
replayed with `iiot dead-letters`), then deleted (docs/ingest.md)."""

from datetime import UTC, datetime, timedelta

import dagster as dg

from assets.raw_telemetry import raw_telemetry
from iiot_orchestration import dead_letters
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.settings import load_settings

NO_EXPIRED_DEAD_LETTERS = "no_expired_dead_letters"


@dg.asset(
    group_name="ingest",
    deps=[raw_telemetry],
    kinds={"postgres"},
    owners=["team:platform"],
    code_version="1",
    # daily at 00:45 UTC; a missed day only keeps dead letters a day longer
    freshness_policy=dg.FreshnessPolicy.time_window(
        fail_window=timedelta(hours=49), warn_window=timedelta(hours=26)
    ),
    check_specs=[
        dg.AssetCheckSpec(
            NO_EXPIRED_DEAD_LETTERS,
            asset="dead_letter_retention",
            description="No dead letter older than IIOT_DEAD_LETTER_RETENTION_DAYS is left.",
        )
    ],
)
def dead_letter_retention(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> dg.MaterializeResult:
    """The dead letters of the last IIOT_DEAD_LETTER_RETENTION_DAYS days: older ones are deleted,
    a batch per transaction, so the table holds what someone may still read or replay."""
    days = load_settings().dead_letter_retention_days
    cutoff = datetime.now(UTC) - timedelta(days=days)
    with postgres.get_connection() as conn:
        conn.autocommit = True
        deleted = dead_letters.expire(conn, cutoff, batch_rows=dead_letters.EXPIRE_BATCH_ROWS)
        left = dead_letters.expired_left(conn, cutoff)
        kept, oldest = conn.execute(
            "SELECT count(*), min(received_at) FROM dead_letters"
        ).fetchone()
    context.log.info(
        "dead letters expired", extra={"deleted": deleted, "cutoff": cutoff.isoformat()}
    )
    return dg.MaterializeResult(
        metadata={
            "deleted": deleted,
            "retention_days": days,
            "cutoff": cutoff.isoformat(),
            "kept": kept,
            "oldest_kept": oldest.isoformat() if oldest else "none",
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=NO_EXPIRED_DEAD_LETTERS,
                passed=left == 0,
                # a replay holding old dead letters makes them wait for the next run
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"expired_left": left},
            )
        ],
    )
