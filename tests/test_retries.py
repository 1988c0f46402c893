"""Retries against a real PostgreSQL: an asset whose database connection is dropped mid-run is
retried and succeeds, a bad input is not retried, every nightly asset carries the retry, and the
instance retries runs whose worker died (iiot_orchestration/retries.py, docs/operations.md)."""

import threading
from datetime import date
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from dagster._core.instance.config import dagster_instance_config

from assets import backups, billing, certificates, marts, reports, retention
from assets.billing import billing_daily_usage
from iiot_orchestration import retries
from iiot_orchestration.partitions import TENANTS, tenant_key
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.settings import SettingsError, load_settings
from tests.test_billing_assets import acme  # noqa: F401 (fixture)

REPO_ROOT = Path(__file__).resolve().parent.parent
RETRIED_MODULES = (billing, reports, marts, backups, certificates, retention)
APPLICATION_NAME = "iiot-retry-test"


def _materialize(database_url: str, key: str) -> dg.ExecuteInProcessResult:
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(TENANTS, ["acme"])
        return dg.materialize(
            [billing_daily_usage],
            partition_key=key,
            instance=instance,
            resources={
                "postgres": PostgresResource(
                    database_url=database_url, application_name=APPLICATION_NAME
                )
            },
            raise_on_error=False,
        )


def _events(result: dg.ExecuteInProcessResult, event_type: dg.DagsterEventType) -> list:
    return [e for e in result.all_events if e.event_type == event_type]


def _waiting_backend(conn: psycopg.Connection) -> int | None:
    row = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
        (APPLICATION_NAME,),
    ).fetchone()
    return row[0] if row else None


def _wait_for(condition, what: str):
    """Polls until ``condition()`` returns something truthy; the deadline only ends a hang."""
    for _ in range(600):
        value = condition()
        if value:
            return value
        threading.Event().wait(0.05)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture
def no_retry_delay(monkeypatch):
    monkeypatch.setenv("IIOT_RETRY_DELAY_SECONDS", "0")


def test_a_dropped_connection_is_retried_and_the_retry_succeeds(
    database_url,
    acme,  # noqa: F811
    no_retry_delay,
):
    """The asset waits on its tenant's billing lock, held here; its backend is terminated from
    this connection (the first attempt meets a dropped connection), the lock released, and the
    retry records the day's usage."""
    with psycopg.connect(database_url, autocommit=True) as blocker:
        blocker.execute("SELECT pg_advisory_lock(hashtext('iiot.billing'), %s)", (acme.tenant_id,))
        outcome: dict[str, dg.ExecuteInProcessResult] = {}
        run = threading.Thread(
            target=lambda: outcome.update(
                result=_materialize(database_url, tenant_key("2026-10-10", "acme", "day"))
            )
        )
        run.start()
        try:
            pid = _wait_for(lambda: _waiting_backend(blocker), "the asset to wait on the lock")
            [[terminated]] = blocker.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchall()
            assert terminated
            _wait_for(
                lambda: (
                    not blocker.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
                    ).fetchone()
                ),
                "the terminated backend to exit",
            )
        finally:
            blocker.execute(
                "SELECT pg_advisory_unlock(hashtext('iiot.billing'), %s)", (acme.tenant_id,)
            )
            run.join()
    result = outcome["result"]

    assert result.success
    [retry] = _events(result, dg.DagsterEventType.STEP_UP_FOR_RETRY)
    assert retry.step_key == "billing_daily_usage"
    causes = []
    error = retry.event_specific_data.error
    while error is not None:
        causes.append(f"{error.cls_name}: {error.message}")
        error = error.cause
    assert any("AdminShutdown" in c and "administrator command" in c for c in causes), causes
    assert len(_events(result, dg.DagsterEventType.STEP_RESTARTED)) == 1
    [materialization] = result.asset_materializations_for_node("billing_daily_usage")
    assert materialization.metadata["messages"].value == 3
    with psycopg.connect(database_url) as conn:
        [[days]] = conn.execute(
            "SELECT count(*) FROM billing_daily_usage WHERE tenant_id = %s AND day = %s",
            (acme.tenant_id, date(2026, 10, 10)),
        ).fetchall()
    assert days == 1


def test_a_bad_input_is_not_retried(database_url, acme, no_retry_delay):  # noqa: F811
    """A day before the tenant existed is a BillingError: one attempt, no retry."""
    result = _materialize(database_url, tenant_key("2026-09-01", "acme", "day"))

    assert not result.success
    assert _events(result, dg.DagsterEventType.STEP_UP_FOR_RETRY) == []
    assert len(_events(result, dg.DagsterEventType.STEP_START)) == 1
    [failure] = _events(result, dg.DagsterEventType.STEP_FAILURE)
    assert "before the tenant was created" in failure.event_specific_data.error.message


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (psycopg.errors.AdminShutdown("terminating connection"), True),
        (psycopg.OperationalError("consuming input failed: server closed the connection"), True),
        (psycopg.errors.DeadlockDetected("deadlock detected"), True),
        (psycopg.errors.UniqueViolation("duplicate key"), False),
        (dg.Failure("day 2026-09-01 of acme is before the tenant was created"), False),
        (ValueError("bad partition key"), False),
        # dbt reports a lost connection in its own exception's message
        (RuntimeError("Database Error: server closed the connection unexpectedly"), True),
        (RuntimeError('Database Error: relation "x" does not exist'), False),
    ],
)
def test_only_transient_errors_are_transient(error, transient):
    assert retries.is_transient(error) is transient


def test_a_transient_error_wrapped_in_another_is_transient():
    wrapped = dg.Failure("backup failed")
    wrapped.__cause__ = psycopg.errors.AdminShutdown("terminating connection")
    assert retries.is_transient(wrapped)


def test_every_nightly_asset_retries_transient_errors():
    definitions = [
        value
        for module in RETRIED_MODULES
        for value in vars(module).values()
        if isinstance(value, dg.AssetsDefinition)
        and value.is_executable
        and value.keys  # not an asset check alone
        and value.op.compute_fn.decorated_fn.__module__ == module.__name__
    ]
    assert len(definitions) == 13  # 11, and the point-in-time backup and drill
    unwrapped = [
        d.node_def.name
        for d in definitions
        if not getattr(d.op.compute_fn.decorated_fn, retries.MARKER, False)
    ]
    assert unwrapped == []


def test_the_retry_settings_are_validated():
    settings = load_settings({"IIOT_RETRY_MAX": "5", "IIOT_RETRY_DELAY_SECONDS": "2"})
    assert (settings.retry_max, settings.retry_delay_seconds) == (5, 2)
    policy = retries.policy(settings)
    assert policy.max_retries == 5
    assert policy.delay == 2
    assert policy.backoff == dg.Backoff.EXPONENTIAL
    with pytest.raises(SettingsError, match="IIOT_RETRY_MAX"):
        load_settings({"IIOT_RETRY_MAX": "11"})


def test_the_instance_retries_runs_whose_worker_died(tmp_path):
    (tmp_path / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    config, _ = dagster_instance_config(str(tmp_path))  # Dagster's own schema validation
    assert config["run_retries"] == {
        "enabled": True,
        "max_retries": 1,
        "retry_on_asset_or_op_failure": False,
    }
    assert config["storage"]["custom"]["class"] == "IiotPostgresStorage"
