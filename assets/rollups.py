"""Hourly and daily telemetry rollups, partitioned by UTC day.

A run normally rewrites whole days (schedules of past days, backfills: a range runs as one run);
the hourly schedule and the late-data sensor tag a run with the hours to rewrite
(``iiot/hours``), so a late reading costs one hour of raw data, not a day.
"""

from datetime import UTC, datetime, timedelta

import dagster as dg

from assets.raw_telemetry import raw_telemetry
from iiot_orchestration import rollups
from iiot_orchestration.partitions import PARTITIONS_START
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.settings import load_settings

HOURS_TAG = "iiot/hours"
# the late-data sensor's runs: their hours were rolled up before, so only the devices the ingest
# daemon marked dirty in them are rewritten (a count check falls back to the whole hours)
LATE_DAY_TAG = "iiot/late_day"
ROLLUP_PARTITIONS = dg.DailyPartitionsDefinition(
    start_date=PARTITIONS_START, timezone="UTC", end_offset=1
)
COUNTS_MATCH = "readings_match_raw"
NO_NEGATIVE_CONSUMPTION = "consumption_not_negative"
ROWS_HAVE_TENANT = "rows_have_a_tenant"
DAILY_MATCHES_HOURLY = "readings_match_hourly"
RAW_FRESHNESS = "raw_telemetry_fresh"


ROLLUP_ASSET = {
    "partitions_def": ROLLUP_PARTITIONS,
    "backfill_policy": dg.BackfillPolicy.single_run(),  # a range runs as one run
    "group_name": "rollups",
    "kinds": {"postgres"},
    "owners": ["team:data"],
    "code_version": "1",
    # the hourly schedule runs a few minutes past every hour: two hours without a run is late
    "freshness_policy": dg.FreshnessPolicy.time_window(
        fail_window=timedelta(hours=2), warn_window=timedelta(minutes=75)
    ),
}


def blocking_check(name: str, asset: str, description: str) -> dg.AssetCheckSpec:
    """A check that stops the run, so downstream steps never see the bad rows."""
    return dg.AssetCheckSpec(name, asset=asset, blocking=True, description=description)


def hours_tag(hours: list[datetime]) -> str:
    return ",".join(hour.astimezone(UTC).strftime("%Y-%m-%dT%H") for hour in sorted(hours))


def parse_hours_tag(value: str, window: rollups.Window) -> list[datetime]:
    """The tagged hours, which must fall inside the run's partition window."""
    hours = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        try:
            hour = datetime.strptime(item, "%Y-%m-%dT%H").replace(tzinfo=UTC)
        except ValueError as exc:
            raise dg.Failure(f"bad {HOURS_TAG} tag item {item!r}: expected YYYY-MM-DDTHH") from exc
        if not window.start <= hour < window.end:
            raise dg.Failure(f"{HOURS_TAG} hour {item} is outside the run's partitions")
        hours.append(hour)
    return hours


def run_windows(context: dg.AssetExecutionContext) -> list[rollups.Window]:
    window = rollups.Window(*context.partition_time_window)
    tagged = context.run.tags.get(HOURS_TAG)
    return rollups.contiguous(parse_hours_tag(tagged, window)) if tagged else [window]


def _check_results(conn, table: str, windows: list[rollups.Window]) -> dict[str, int]:
    found = {"negative": 0, "orphans": 0}
    for window in windows:
        negative, orphans = conn.execute(
            f"SELECT count(*) FILTER (WHERE r.consumption < 0),"
            f"       count(*) FILTER (WHERE t.tenant_id IS NULL)"
            f"  FROM {table} r LEFT JOIN tenants t USING (tenant_id)"
            f" WHERE r.bucket >= %s AND r.bucket < %s",
            (window.start, window.end),
        ).fetchone()
        found["negative"] += negative
        found["orphans"] += orphans
    return found


def _describe(windows: list[rollups.Window]) -> str:
    return ", ".join(f"{w.start:%Y-%m-%d %H:%M}..{w.end:%Y-%m-%d %H:%M}" for w in windows)


@dg.asset(
    **ROLLUP_ASSET,
    deps=[raw_telemetry],
    check_specs=[
        blocking_check(
            COUNTS_MATCH,
            "telemetry_hourly",
            "The rewritten hours count exactly the raw readings of those hours.",
        ),
        blocking_check(
            NO_NEGATIVE_CONSUMPTION,
            "telemetry_hourly",
            "Consumption is never negative (a counter reset adds the new value).",
        ),
        blocking_check(
            ROWS_HAVE_TENANT, "telemetry_hourly", "Every rollup row belongs to an existing tenant."
        ),
    ],
)
def telemetry_hourly(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> dg.MaterializeResult:
    """Per tenant, device, metric and UTC hour: count, sum, min, max, avg, first and last value,
    and consumption with counter resets for cumulative meters (definitions: docs/rollups.md)."""
    windows = run_windows(context)
    settings = load_settings()
    late = HOURS_TAG in context.run.tags  # the daily step re-sums only the series that changed
    with postgres.get_connection() as conn:
        result = rollups.rollup_hours(
            conn,
            windows,
            work_mem=settings.rollup_work_mem,
            side=postgres.get_connection,
            mark_changes=late,
            dirty_devices_only=LATE_DAY_TAG in context.run.tags,
        )
        found = _check_results(conn, "telemetry_hourly", windows)
        preview = conn.execute(
            "SELECT bucket, tenant_id, device_id, metric, readings, value_avg, consumption"
            "  FROM telemetry_hourly WHERE bucket >= %s AND bucket < %s"
            " ORDER BY consumption DESC NULLS LAST, bucket LIMIT 10",
            (windows[0].start, windows[-1].end),
        ).fetchall()
    return dg.MaterializeResult(
        metadata={
            "windows": _describe(windows),
            "hours": sum(len(w.hours()) for w in windows),
            "rows": result.rows,
            "readings": result.readings,
            "series_changed": result.series if late else result.rows,
            "dirty_devices": "all" if result.devices is None else str(result.devices),
            "next_buckets_corrected": result.follow_ups[0],
            "next_buckets_marked_dirty": result.follow_ups[1],
            "preview": dg.MetadataValue.md(_markdown(preview)),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=COUNTS_MATCH,
                passed=result.readings == result.source_readings,
                metadata={"rolled_up": result.readings, "raw": result.source_readings},
            ),
            dg.AssetCheckResult(
                check_name=NO_NEGATIVE_CONSUMPTION,
                passed=found["negative"] == 0,
                metadata={"negative_rows": found["negative"]},
            ),
            dg.AssetCheckResult(
                check_name=ROWS_HAVE_TENANT,
                passed=found["orphans"] == 0,
                metadata={"rows_without_tenant": found["orphans"]},
            ),
        ],
    )


@dg.asset(
    **ROLLUP_ASSET,
    deps=[telemetry_hourly],
    check_specs=[
        blocking_check(
            DAILY_MATCHES_HOURLY,
            "telemetry_daily",
            "Each rewritten day counts exactly the readings of its hours.",
        )
    ],
)
def telemetry_daily(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> dg.MaterializeResult:
    """Per tenant, device, metric and UTC day, summed from the hours. The run's last step: it
    clears the late-data marks its hours covered, so a mark is cleared only after success. In a
    late-data run (tagged with hours) it re-sums only the series the hourly step found changed."""
    days = rollups.Window(*context.partition_time_window).days()
    with postgres.get_connection() as conn:
        result = rollups.rollup_days(conn, days, only_marked=HOURS_TAG in context.run.tags)
    return dg.MaterializeResult(
        metadata={
            "days": _describe([days]),
            "rows": result.rows,
            "series_resummed": result.series,
            "readings": result.readings,
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=DAILY_MATCHES_HOURLY,
                passed=result.readings == result.source_readings,
                metadata={"daily": result.readings, "hourly": result.source_readings},
            )
        ],
    )


@dg.asset_check(
    asset=telemetry_hourly,
    name=RAW_FRESHNESS,
    description="Raw telemetry keeps landing while devices are online: the newest reading of "
    "any device that reported in the last day is younger than IIOT_FRESHNESS_MINUTES.",
)
def raw_telemetry_fresh(postgres: PostgresResource) -> dg.AssetCheckResult:
    minutes = load_settings().freshness_minutes
    with postgres.get_connection() as conn:
        newest, online = conn.execute(
            "SELECT max(last_seen), count(*) FROM devices"
            " WHERE status = 'active' AND last_seen > now() - interval '1 day'"
        ).fetchone()
    if not online:
        return dg.AssetCheckResult(passed=True, metadata={"online_devices": 0})
    age = datetime.now(UTC) - newest
    return dg.AssetCheckResult(
        passed=age <= timedelta(minutes=minutes),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "online_devices": online,
            "newest_reading_age_minutes": round(age.total_seconds() / 60, 1),
            "threshold_minutes": minutes,
        },
    )


def _markdown(rows: list[tuple]) -> str:
    lines = [
        "| hour | tenant | device | metric | readings | avg | consumption |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {bucket:%Y-%m-%d %H:%M} | {tenant} | {device} | {metric} | {count} | {avg:.3f} | "
        f"{'' if consumption is None else f'{consumption:.3f}'} |"
        for bucket, tenant, device, metric, count, avg, consumption in rows
    ]
    return "\n".join(lines)
