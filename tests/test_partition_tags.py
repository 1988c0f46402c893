"""Every partitioned job of the code location launched as GraphQL clients and the UI's launchpad
launch it: with the `dagster/partition` tag alone, its key a plain string ("2026-10-10|acme" for
the multi-partitioned ones), against a seeded database."""

import dagster as dg
import pytest

from iiot_orchestration.definitions import defs
from iiot_orchestration.partitions import TENANTS
from tests.test_billing_assets import acme  # noqa: F401 (a fixture)
from tests.test_reports import report_db  # noqa: F401 (a fixture)

PARTITION_TAG = "dagster/partition"
# a valid key of each partitioned job, as the string a client sends
KEYS = {
    "billing_usage_job": "2026-10-10|acme",
    "billing_invoice_job": "2026-10-01|acme",
    "billing_nightly_job": "2026-10-10",
    "telemetry_rollups_job": "2026-10-10",
    "telemetry_archive_job": "2026-10-10",
    "consumption_reports_job": "2026-10-01|acme",
}
# the report reads the marts, which the report tests' database has built
ON_REPORT_DATABASE = {"consumption_reports_job"}


def launch(name: str, database_url: str, monkeypatch, tmp_path) -> dg.ExecuteInProcessResult:
    """The job as the code location defines it, its resources read from the environment."""
    monkeypatch.setenv("IIOT_DATABASE_URL", database_url)
    monkeypatch.setenv("IIOT_REPORTS_ROOT", str(tmp_path / "reports"))
    monkeypatch.setenv("IIOT_ARCHIVE_ROOT", str(tmp_path / "archive"))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(TENANTS, ["acme", "beta"])
        return defs.resolve_job_def(name).execute_in_process(
            tags={PARTITION_TAG: KEYS[name]}, instance=instance, raise_on_error=False
        )


def failures(result: dg.ExecuteInProcessResult) -> list[str]:
    return [e.event_specific_data.error.message for e in result.get_step_failure_events()]


def materialized(result: dg.ExecuteInProcessResult) -> set[str]:
    return {e.partition for e in result.get_asset_materialization_events()}


def test_every_partitioned_job_has_a_key_here():
    partitioned = {j.name for j in defs.resolve_all_job_defs() if j.partitions_def is not None}
    assert partitioned == set(KEYS)


@pytest.mark.usefixtures("acme")  # a meter's readings of 2026-10-10, counted by ingest
@pytest.mark.parametrize("name", sorted(set(KEYS) - ON_REPORT_DATABASE))
def test_a_job_launched_with_the_partition_tag_alone_runs(
    name, database_url, monkeypatch, tmp_path
):
    result = launch(name, database_url, monkeypatch, tmp_path)
    assert failures(result) == []
    assert result.success
    assert KEYS[name] in materialized(result)


@pytest.mark.parametrize("name", sorted(ON_REPORT_DATABASE))
def test_a_report_job_launched_with_the_partition_tag_alone_runs(
    name,
    report_db,  # noqa: F811
    monkeypatch,
    tmp_path,
):
    result = launch(name, report_db.url, monkeypatch, tmp_path)
    assert failures(result) == []
    assert result.success
    assert KEYS[name] in materialized(result)
