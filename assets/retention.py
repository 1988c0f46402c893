"""Retention of raw telemetry: every night the readings that fell out of each tenant's retention
are archived to Parquet, read back and verified, and only then removed; in TimescaleDB mode old
chunks are compressed (docs/retention.md). Rollups, usage and invoices are not touched."""

from datetime import UTC, date, datetime, timedelta
from typing import Any

import dagster as dg

from assets.raw_telemetry import raw_telemetry
from iiot_orchestration import retention
from iiot_orchestration.archive import Store, open_store
from iiot_orchestration.partitions import PARTITIONS_START
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.retries import retry_transient
from iiot_orchestration.settings import load_settings

RETENTION_PARTITIONS = dg.DailyPartitionsDefinition(start_date=PARTITIONS_START, timezone="UTC")
ARCHIVES_VERIFIED = "archives_verified"
ARCHIVED_EQUALS_REMOVED = "archived_equals_removed"
EXPIRED_READINGS_REMOVED = "expired_readings_removed"
ARCHIVE_CHECKSUMS = "archive_checksums_verify"
NO_EXPIRED_READINGS = "no_expired_readings"
COMPRESSION_ENABLED = "compression_enabled"
COMPRESS_CHUNKS_PER_RUN = 100

RETENTION_ASSET: dict[str, Any] = {
    "group_name": "retention",
    "owners": ["team:platform"],
    "code_version": "1",
    # runs nightly for the day that ended; a missed night is caught up by the next run
    "freshness_policy": dg.FreshnessPolicy.time_window(
        fail_window=timedelta(hours=49), warn_window=timedelta(hours=26)
    ),
}


class ArchiveResource(dg.ConfigurableResource):
    """Where archives go (a directory or an fsspec URL) and how many readings one removal
    transaction holds. Unset fields come from IIOT_ARCHIVE_ROOT and IIOT_RETENTION_BATCH_ROWS."""

    root: str | None = None
    batch_rows: int | None = None

    def store(self) -> Store:
        return open_store(self.root or load_settings().archive_root)

    def rows_per_batch(self) -> int:
        return self.batch_rows or load_settings().retention_batch_rows


def _check(name: str, description: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        name, asset="telemetry_archive", blocking=True, description=description
    )


def _tenant_days_markdown(run: retention.RetentionRun) -> str:
    lines = ["| tenant | day | archive | rows | removed | error |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {t.slug} | {t.day} | {t.action} | {t.rows:,} | {t.removed:,} | "
        f"{(t.error or '')[:120]} |"
        for t in run.tenant_days[:200]
    ]
    return "\n".join(lines)


@dg.asset(
    **RETENTION_ASSET,
    partitions_def=RETENTION_PARTITIONS,
    deps=[raw_telemetry],
    # a run removes everything out of retention by the end of its day, so a range needs one run
    backfill_policy=dg.BackfillPolicy.single_run(),
    kinds={"postgres", "parquet"},
    check_specs=[
        _check(
            ARCHIVES_VERIFIED,
            "Every archive the run wrote or relied on read back with its manifest's sha256, row "
            "count and content digest; a day whose archive does not is left in place.",
        ),
        _check(
            ARCHIVED_EQUALS_REMOVED,
            "For every day the run touched, the raw readings removed equal the archived "
            "readings counted as removed.",
        ),
        _check(
            EXPIRED_READINGS_REMOVED,
            "No reading of a day the run handled is older than its tenant's retention "
            "(restored days on hold excepted).",
        ),
    ],
)
@retry_transient
def telemetry_archive(
    context: dg.AssetExecutionContext, postgres: PostgresResource, archive: ArchiveResource
) -> dg.MaterializeResult:
    """Parquet archives, one per tenant and UTC day, of the raw readings that fell out of each
    tenant's retention (its plan's, or its own override) by the end of the partition's day,
    each verified against the database before those readings left the raw table."""
    run_day = date.fromisoformat(context.partition_key_range.end)
    store = archive.store()
    with postgres.get_connection() as conn:
        conn.autocommit = True
        try:
            run = retention.run_retention(conn, store, run_day, batch_rows=archive.rows_per_batch())
        except retention.RetentionError as exc:
            raise dg.Failure(description=str(exc)) from exc
    for problem in run.problems:
        context.log.warning(problem)
    context.log.info(run.summary())
    expired_left = sum(d.expired_left for d in run.days)
    return dg.MaterializeResult(
        metadata={
            "run_day": str(run_day),
            "archive_root": store.root,
            "tenant_days": len(run.tenant_days),
            "archived_readings": run.archived_rows,
            "removed_readings": run.removed_rows,
            "partitions_dropped": ", ".join(map(str, run.partitions_dropped)) or "none",
            "cutoffs": dg.MetadataValue.json({k: str(v) for k, v in run.cutoffs.items()}),
            "archives": dg.MetadataValue.md(_tenant_days_markdown(run)),
            "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in run.problems) or "none"),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=ARCHIVES_VERIFIED,
                passed=not run.corrupt,
                metadata={
                    "verified": sum(1 for t in run.tenant_days if t.action != "failed"),
                    "failed": dg.MetadataValue.md(
                        "\n".join(f"- {t.slug} {t.day}: {t.error}" for t in run.corrupt) or "none"
                    ),
                },
            ),
            dg.AssetCheckResult(
                check_name=ARCHIVED_EQUALS_REMOVED,
                passed=not run.mismatched_days,
                metadata={
                    "days": len(run.days),
                    "mismatched": ", ".join(
                        f"{d.day} ({d.raw_before - d.raw_after} removed, "
                        f"{d.archived_removed} archived)"
                        for d in run.mismatched_days
                    )
                    or "none",
                },
            ),
            dg.AssetCheckResult(
                check_name=EXPIRED_READINGS_REMOVED,
                passed=expired_left == 0 and not run.corrupt,
                metadata={
                    "expired_readings_left": expired_left,
                    "tenant_days_not_archived": len(run.corrupt),
                },
            ),
        ],
    )


@dg.asset_check(
    asset=telemetry_archive,
    name=ARCHIVE_CHECKSUMS,
    description="Every recorded archive reads back: the file's sha256 matches its manifest and "
    "the database record, its rows and their digest match the manifest.",
)
def archive_checksums_verify(
    postgres: PostgresResource, archive: ArchiveResource
) -> dg.AssetCheckResult:
    store = archive.store()
    with postgres.get_connection() as conn:
        found = retention.verify_archives(conn, store)
    return dg.AssetCheckResult(
        passed=not found.problems,
        metadata={
            "archives": found.checked,
            "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in found.problems) or "none"),
        },
    )


@dg.asset_check(
    asset=telemetry_archive,
    name=NO_EXPIRED_READINGS,
    description="No raw reading anywhere is older than its tenant's retention as of the last "
    "completed day (restored days on hold excepted); one pass over the old readings.",
)
def no_expired_readings(postgres: PostgresResource) -> dg.AssetCheckResult:
    day = datetime.now(UTC).date() - timedelta(days=1)
    with postgres.get_connection() as conn:
        found = retention.expired_readings(conn, day)
    return dg.AssetCheckResult(
        passed=not found,
        metadata={"as_of": str(day), "expired_by_tenant": dg.MetadataValue.json(found)},
    )


@dg.asset(
    **RETENTION_ASSET,
    deps=[telemetry_archive],
    kinds={"timescaledb"},
    check_specs=[
        dg.AssetCheckSpec(
            COMPRESSION_ENABLED,
            asset="telemetry_compression",
            description="TimescaleDB mode: columnstore is enabled on telemetry, so old chunks "
            "are compressed (PostgreSQL mode passes: nothing to compress).",
        )
    ],
)
@retry_transient
def telemetry_compression(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> dg.MaterializeResult:
    """Raw telemetry chunks older than IIOT_COMPRESS_AFTER_DAYS, compressed by TimescaleDB
    (columnstore); in PostgreSQL mode there is nothing to compress."""
    days = load_settings().compress_after_days
    older_than = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(
        days=days
    )
    with postgres.get_connection() as conn:
        conn.autocommit = True
        status = retention.compression_status(conn)
        compressed = (
            retention.compress_chunks(conn, older_than, COMPRESS_CHUNKS_PER_RUN)
            if status.enabled
            else []
        )
        after = retention.compression_status(conn) if compressed else status
    if status.reason:
        context.log.warning(status.reason)
    context.log.info(f"compressed {len(compressed)} chunks ended before {older_than:%Y-%m-%d}")
    return dg.MaterializeResult(
        metadata={
            "storage_mode": status.mode,
            "older_than": str(older_than.date()),
            "compressed_now": len(compressed),
            "compressed_chunks": after.compressed_chunks,
            "uncompressed_chunks": after.uncompressed_chunks,
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=COMPRESSION_ENABLED,
                passed=status.mode == "postgres" or status.enabled,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"reason": status.reason or "none"},
            )
        ],
    )
