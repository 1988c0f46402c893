"""Raw telemetry, the root of the lineage: the readings the ingest daemon lands. Dagster does not
write them, so the asset is an external one that a sensor observes (docs/architecture.md)."""

from datetime import datetime, timedelta

import dagster as dg
import psycopg

from iiot_orchestration import rollups

RAW_TELEMETRY_KEY = dg.AssetKey("raw_telemetry")
OBSERVED_HOURS = 24

raw_telemetry = dg.AssetSpec(
    RAW_TELEMETRY_KEY,
    group_name="ingest",
    kinds={"postgres"},
    owners=["team:platform"],
    description="Every reading the ingest daemon landed, per tenant, device, metric and time "
    "(table telemetry): what the rollups, retention and the ingest upkeep start from. Observed "
    "every few minutes: when the newest reading landed, readings landed per hour, freshness.",
)


def freshness(age: timedelta | None, online_devices: int, threshold: timedelta) -> str:
    """`fresh`, `stale`, or `no device online` (nothing is expected, as on a new install)."""
    if not online_devices:
        return "no device online"
    return "fresh" if age is not None and age <= threshold else "stale"


def observe(conn: psycopg.Connection, now: datetime, freshness_minutes: int) -> dg.AssetObservation:
    """What the raw telemetry looks like at ``now``: read from the devices' landing times and the
    per-hour counts the writer keeps in the readings' transaction, never by scanning readings."""
    latest, online = conn.execute(
        "SELECT max(last_seen),"
        "       count(*) FILTER (WHERE status = 'active' AND last_seen > %s - interval '1 day')"
        "  FROM devices",
        (now,),
    ).fetchone()
    current = rollups.floor_hour(now)
    first = current - timedelta(hours=OBSERVED_HOURS - 1)
    landed = dict(
        conn.execute(
            "SELECT hour, sum(readings) FROM ingest_usage_tenant_hours"
            " WHERE hour >= %s AND hour <= %s GROUP BY hour",
            (first, current),
        ).fetchall()
    )
    rows = [
        f"| {hour:%Y-%m-%d %H:00} | {int(landed.get(hour, 0)):,} |"
        for hour in (current - timedelta(hours=n) for n in range(OBSERVED_HOURS))
    ]
    age = None if latest is None else now - latest
    threshold = timedelta(minutes=freshness_minutes)
    metadata: dict[str, dg.RawMetadataValue] = {
        "latest_reading": dg.MetadataValue.timestamp(latest) if latest else "none",
        "latest_reading_age_minutes": None if age is None else round(age.total_seconds() / 60, 1),
        "readings_this_hour": int(landed.get(current, 0)),
        "readings_last_hour": int(landed.get(current - rollups.HOUR, 0)),
        "readings_per_hour": dg.MetadataValue.md(
            "\n".join(["| hour (UTC) | readings landed |", "|---|---|", *rows])
        ),
        "online_devices": online,
        "freshness": freshness(age, online, threshold),
        "freshness_threshold_minutes": freshness_minutes,
    }
    if latest is not None:  # what Dagster's freshness tooling reads as the asset's last update
        metadata["dagster/last_updated_timestamp"] = dg.MetadataValue.timestamp(latest)
    return dg.AssetObservation(asset_key=RAW_TELEMETRY_KEY, metadata=metadata)
