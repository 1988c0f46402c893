"""Operational alerts: failed runs, dead-letter backlog, ingest freshness, certificate expiry.

Each sensor opens (or refreshes) an alert while its condition holds and resolves it when the
condition clears; the notifier deduplicates deliveries (docs/alerts.md)."""

from datetime import UTC, datetime, timedelta

import dagster as dg

from assets.alerts import threshold_alerts
from iiot_orchestration import alerts
from iiot_orchestration.backups import PITR_SCRATCH_PREFIX
from iiot_orchestration.db import connect
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.settings import load_settings

CERTIFICATE_WARNING_DAYS = 30

threshold_alerts_job = dg.define_asset_job(
    "threshold_alerts_job",
    selection=[threshold_alerts],
    description="Evaluate the telemetry threshold rules.",
)

threshold_alerts_schedule = dg.ScheduleDefinition(
    name="threshold_alerts_schedule",
    job=threshold_alerts_job,
    cron_schedule="*/5 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Threshold rules every five minutes (no-data rules need that resolution).",
)


def _notifier() -> alerts.Notifier:
    return alerts.Notifier.from_settings(load_settings())


def _apply(conn, notifier: alerts.Notifier, key: str, alert: alerts.Alert | None) -> str:
    """Raise and notify ``alert`` when given, else resolve the open alert with ``key``."""
    if alert is None:
        return "resolved" if alerts.resolve_alert(conn, key) else "ok"
    deliveries = alerts.report(conn, notifier, alert)
    return ",".join(f"{d.channel}:{d.status}" for d in deliveries)


@dg.run_failure_sensor(
    monitor_all_code_locations=False,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Alerts (CRITICAL) when any run of this code location fails.",
)
def run_failure_alert_sensor(context: dg.RunFailureSensorContext) -> None:
    run = context.dagster_run
    message = context.failure_event.message or "run failed"
    alert = alerts.Alert(
        key=f"run_failure:{run.job_name}:{run.run_id}",
        severity="CRITICAL",
        title=f"Dagster run of {run.job_name} failed",
        source="run_failure",
        detail={
            "run_id": run.run_id,
            "job": run.job_name,
            "error": message[:500],
            "partition": run.tags.get("dagster/partition"),
        },
    )
    with connect(load_settings().require_database_url(), role="platform_rw") as conn:
        alerts.report(conn, _notifier(), alert)


def dead_letter_alert(conn, threshold: int, now: datetime) -> alerts.Alert | None:
    (reasons,) = conn.execute(
        "SELECT coalesce(jsonb_object_agg(reason, n), '{}') FROM ("
        " SELECT reason, count(*) AS n FROM dead_letters WHERE received_at > %s"
        " GROUP BY reason) r",
        (now - timedelta(hours=1),),
    ).fetchone()
    total = sum(reasons.values())
    if total <= threshold:
        return None
    return alerts.Alert(
        key="dead_letter_backlog",
        severity="WARNING",
        title=f"{total} dead letters in the last hour (threshold {threshold})",
        source="dead_letters",
        detail={"dead_letters": total, "by_reason": reasons, "threshold": threshold},
        at=now,
    )


@dg.sensor(
    minimum_interval_seconds=120,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Alerts (WARNING) while the dead letters of the last hour exceed "
    "IIOT_ALERT_DEAD_LETTER_THRESHOLD.",
)
def dead_letter_backlog_sensor(
    context: dg.SensorEvaluationContext, postgres: PostgresResource
) -> dg.SkipReason:
    settings = load_settings()
    with postgres.get_connection() as conn:
        alert = dead_letter_alert(conn, settings.alert_dead_letter_threshold, datetime.now(UTC))
        state = _apply(conn, _notifier(), "dead_letter_backlog", alert)
    return dg.SkipReason(f"dead-letter backlog: {state}")


def freshness_alert(conn, minutes: int, now: datetime) -> alerts.Alert | None:
    newest, online = conn.execute(
        "SELECT max(last_seen), count(*) FROM devices"
        " WHERE status = 'active' AND last_seen > %s - interval '1 day'",
        (now,),
    ).fetchone()
    if not online or now - newest <= timedelta(minutes=minutes):
        return None
    age = round((now - newest).total_seconds() / 60, 1)
    return alerts.Alert(
        key="ingest_freshness",
        severity="CRITICAL",
        title=f"No telemetry landed for {age} min while {online} devices are online",
        source="ingest_freshness",
        detail={
            "newest_reading_age_minutes": age,
            "online_devices": online,
            "threshold_minutes": minutes,
        },
        at=now,
    )


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Alerts (CRITICAL) when nothing landed for IIOT_FRESHNESS_MINUTES while devices "
    "that reported in the last day are active.",
)
def ingest_freshness_sensor(
    context: dg.SensorEvaluationContext, postgres: PostgresResource
) -> dg.SkipReason:
    settings = load_settings()
    with postgres.get_connection() as conn:
        alert = freshness_alert(conn, settings.freshness_minutes, datetime.now(UTC))
        state = _apply(conn, _notifier(), "ingest_freshness", alert)
    return dg.SkipReason(f"ingest freshness: {state}")


def certificate_alert(conn, now: datetime, days: int = CERTIFICATE_WARNING_DAYS):
    expired, expiring, first = conn.execute(
        "SELECT count(*) FILTER (WHERE c.not_after <= %(now)s),"
        "       count(*) FILTER (WHERE c.not_after > %(now)s),"
        "       min(c.not_after)"
        "  FROM device_certificates c JOIN devices d USING (device_id)"
        " WHERE c.status = 'active' AND d.status = 'active'"
        "   AND c.not_after < %(now)s + make_interval(days => %(days)s)",
        {"now": now, "days": days},
    ).fetchone()
    if not expired and not expiring:
        return None
    return alerts.Alert(
        key="certificate_expiry",
        severity="CRITICAL" if expired else "WARNING",
        title=f"{expired} active device certificates expired, {expiring} expire within {days} days",
        source="certificate_expiry",
        detail={
            "expired": expired,
            "expiring": expiring,
            "first_expiry": first and first.isoformat(),
        },
        at=now,
    )


@dg.sensor(
    minimum_interval_seconds=3600,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Alerts when active devices' certificates have expired (CRITICAL) or expire "
    "within 30 days (WARNING): the OTA renewal is not keeping up.",
)
def certificate_expiry_sensor(
    context: dg.SensorEvaluationContext, postgres: PostgresResource
) -> dg.SkipReason:
    with postgres.get_connection() as conn:
        alert = certificate_alert(conn, datetime.now(UTC))
        state = _apply(conn, _notifier(), "certificate_expiry", alert)
    return dg.SkipReason(f"certificate expiry: {state}")


DRILL_MAX_AGE_DAYS = 8


def drill_alerts(conn, now: datetime) -> dict[str, alerts.Alert | None]:
    """Per database and kind of drill (logical, point-in-time: pitr.py) with drills: the latest
    drill failed (CRITICAL), or no passed drill in the last 8 days (WARNING); None where all is
    well. Empty before backup_drills exists."""
    if conn.execute("SELECT to_regclass('backup_drills')").fetchone()[0] is None:
        return {}
    found: dict[str, alerts.Alert | None] = {}
    rows = conn.execute(
        "WITH d AS (SELECT *, scratch_database LIKE %s AS pitr FROM backup_drills)"
        " SELECT DISTINCT ON (database_name, pitr) database_name, pitr, status, finished_at,"
        "       error, (SELECT max(p.finished_at) FROM d p WHERE p.database_name = d.database_name"
        "                  AND p.pitr = d.pitr AND p.status = 'passed')"
        "  FROM d ORDER BY database_name, pitr, finished_at DESC",
        (PITR_SCRATCH_PREFIX.replace("_", "\\_") + "%",),
    ).fetchall()
    for database, pitr, status, finished, error, last_passed in rows:
        source = "pitr_drill" if pitr else "restore_drill"
        key = f"{source}:{database}"
        what = "Point-in-time recovery drill" if pitr else "Restore drill"
        if status == "failed":
            found[key] = alerts.Alert(
                key=key,
                severity="CRITICAL",
                title=f"{what} of {database} failed",
                source=source,
                detail={"error": (error or "")[:500], "finished_at": finished.isoformat()},
                at=now,
            )
        elif last_passed is None or now - last_passed > timedelta(days=DRILL_MAX_AGE_DAYS):
            found[key] = alerts.Alert(
                key=key,
                severity="WARNING",
                title=f"No passed {what.lower()} of {database} in {DRILL_MAX_AGE_DAYS} days",
                source=source,
                detail={"last_passed": last_passed and last_passed.isoformat()},
                at=now,
            )
        else:
            found[key] = None
    return found


@dg.sensor(
    minimum_interval_seconds=600,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Alerts when the latest restore drill failed (CRITICAL) or none passed in the "
    "last 8 days (WARNING).",
)
def restore_drill_sensor(
    context: dg.SensorEvaluationContext, postgres: PostgresResource
) -> dg.SkipReason:
    with postgres.get_connection() as conn:
        states = [
            f"{key}: {_apply(conn, _notifier(), key, alert)}"
            for key, alert in drill_alerts(conn, datetime.now(UTC)).items()
        ]
    return dg.SkipReason("; ".join(states) or "no restore drills recorded yet")
