"""Data quality of the daily rollup: a Great Expectations suite, run as a Dagster asset check.

The check is partitioned like ``telemetry_daily`` and validates exactly the days of the run (one
day, or the whole range of a single-run backfill). Great Expectations and pandas take seconds to
import, so they are imported inside the check, never when Dagster loads the definitions.
"""

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import dagster as dg

from assets.rollups import ROLLUP_PARTITIONS
from iiot_orchestration.resources import PostgresResource

if TYPE_CHECKING:
    import pandas as pd
    import psycopg
    from great_expectations.core import ExpectationValidationResult
    from great_expectations.expectations import Expectation

DAILY_EXPECTATIONS = "daily_rollup_expectations"
ROW_KEY = ["tenant_id", "device_id", "metric", "bucket"]
NOT_NULL = ("readings", "value_avg", "first_value", "last_value")
EXAMPLES = 5  # offending rows named per failed expectation
# LEFT JOIN: a metric missing from the catalog keeps its rows, with NULL catalog columns
DAILY_ROWS = (
    "SELECT d.tenant_id, d.device_id, d.metric, d.bucket, d.readings, d.value_min, d.value_max,"
    "       d.value_avg, d.first_value, d.last_value, d.consumption, d.counter_resets,"
    "       c.cumulative, c.min_value, c.max_value"
    "  FROM telemetry_daily d LEFT JOIN metric_catalog c USING (metric)"
    " WHERE d.bucket >= %s AND d.bucket < %s"
)


def load_daily_rows(conn: "psycopg.Connection", start: datetime, end: datetime) -> "pd.DataFrame":
    """The daily rollup rows of [start, end) with their metric's catalog entry."""
    import pandas as pd

    cursor = conn.execute(DAILY_ROWS, (start, end))
    return pd.DataFrame(cursor.fetchall(), columns=[column.name for column in cursor.description])


def build_expectations(rows: "pd.DataFrame") -> list["Expectation"]:
    """The suite for ``rows``: completeness, counts, and per metric the catalog's value bounds.

    Each expectation carries a stable name in ``meta["name"]``, which the check reports."""
    import pandas as pd
    from great_expectations import expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    def named(expectation_type: type["Expectation"], name: str, description: str, **kwargs):
        return expectation_type(meta={"name": name}, description=description, **kwargs)

    catalog = (
        rows.dropna(subset=["cumulative"])
        .drop_duplicates("metric")
        .sort_values("metric")[["metric", "cumulative", "min_value", "max_value"]]
    )
    cumulative = [str(m) for m in catalog.loc[catalog["cumulative"].astype(bool), "metric"]]
    expectations = [
        named(
            gxe.ExpectColumnValuesToNotBeNull,
            f"{column}_not_null",
            f"{column} is never NULL",
            column=column,
        )
        for column in NOT_NULL
    ]
    expectations += [
        named(
            gxe.ExpectColumnValuesToNotBeNull,
            "metric_in_catalog",
            "every metric has a metric_catalog entry",
            column="cumulative",
        ),
        named(
            gxe.ExpectColumnValuesToBeBetween,
            "readings_positive",
            "readings > 0: a row exists only for a bucket with readings",
            column="readings",
            min_value=0,
            strict_min=True,
        ),
        named(
            gxe.ExpectColumnValuesToBeBetween,
            "counter_resets_not_negative",
            "counter_resets >= 0",
            column="counter_resets",
            min_value=0,
        ),
        named(
            gxe.ExpectColumnValuesToNotBeNull,
            "consumption_set_for_cumulative_metrics",
            f"consumption is not NULL for cumulative metrics ({', '.join(cumulative)})",
            column="consumption",
            row_condition=Column("metric").is_in(cumulative),
        ),
        named(
            gxe.ExpectColumnValuesToBeNull,
            "consumption_null_for_other_metrics",
            "consumption is NULL for metrics that are not cumulative",
            column="consumption",
            row_condition=Column("metric").is_not_in(cumulative),
        ),
    ]
    for metric, low, high in catalog[["metric", "min_value", "max_value"]].itertuples(index=False):
        if pd.notna(low):  # NULL in the catalog: unbounded
            expectations.append(
                named(
                    gxe.ExpectColumnValuesToBeBetween,
                    f"{metric}_value_min_in_range",
                    f"{metric}: value_min >= {low:.15g} (metric_catalog.min_value)",
                    column="value_min",
                    min_value=float(low),
                    row_condition=Column("metric") == metric,
                )
            )
        if pd.notna(high):
            expectations.append(
                named(
                    gxe.ExpectColumnValuesToBeBetween,
                    f"{metric}_value_max_in_range",
                    f"{metric}: value_max <= {high:.15g} (metric_catalog.max_value)",
                    column="value_max",
                    max_value=float(high),
                    row_condition=Column("metric") == metric,
                )
            )
    return expectations


def validate(rows: "pd.DataFrame") -> tuple[int, list[dict[str, Any]]]:
    """Validates ``rows`` in an ephemeral Great Expectations context: (expectations evaluated,
    the failed ones with their description, unexpected count and a few offending rows)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    context = gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),  # tqdm bars would flood the run log
        ),
    )
    batch = (
        context.data_sources.add_pandas("iiot")
        .add_dataframe_asset("telemetry_daily")
        .add_batch_definition_whole_dataframe("run_days")
        .get_batch(batch_parameters={"dataframe": rows})
    )
    suite = context.suites.add(
        gx.ExpectationSuite(name=DAILY_EXPECTATIONS, expectations=build_expectations(rows))
    )
    result = batch.validate(
        suite,
        result_format={
            "result_format": "SUMMARY",
            "unexpected_index_column_names": ROW_KEY,
            "partial_unexpected_count": EXAMPLES,
        },
    )
    return len(result.results), [_failure(r) for r in result.results if not r.success]


def _failure(result: "ExpectationValidationResult") -> dict[str, Any]:
    config = result.expectation_config
    failure = {
        "expectation": config.meta["name"],
        "description": config.description,
        "unexpected_count": int(result.result.get("unexpected_count") or 0),
        "examples": [
            f"tenant {row['tenant_id']} device {row['device_id']} {row['metric']}"
            f" {row['bucket']:%Y-%m-%d}: {config.kwargs['column']}={row[config.kwargs['column']]}"
            for row in result.result.get("partial_unexpected_index_list", [])
        ],
    }
    # one exception record, or one per metric that raised
    infos = result.exception_info or {}
    infos = [infos] if "raised_exception" in infos else list(infos.values())
    errors = [info["exception_message"] for info in infos if info.get("raised_exception")]
    if errors:
        failure["error"] = "; ".join(errors)
    return failure


@dg.asset_check(
    asset="telemetry_daily",
    name=DAILY_EXPECTATIONS,
    partitions_def=ROLLUP_PARTITIONS,
    blocking=True,
    description="Great Expectations suite over the run's days of telemetry_daily: no NULL counts,"
    " averages or first/last values; readings > 0; counter_resets >= 0; consumption set exactly"
    " for cumulative metrics; value_min/value_max within each metric's metric_catalog bounds.",
)
def daily_rollup_expectations(
    context: dg.AssetCheckExecutionContext, postgres: PostgresResource
) -> dg.AssetCheckResult:
    start, end = context.partition_time_window
    with postgres.get_connection() as conn:
        rows = load_daily_rows(conn, start, end)
    last_day = end - timedelta(days=1)
    metadata: dict[str, Any] = {
        "days": f"{start:%Y-%m-%d}" + (f"..{last_day:%Y-%m-%d}" if last_day > start else ""),
        "rows": len(rows),
    }
    if rows.empty:
        # a day without telemetry is not a rollup error (readings_match_hourly covers losses)
        return dg.AssetCheckResult(
            passed=True,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={**metadata, "expectations": 0, "note": "no daily rows: nothing to validate"},
        )
    evaluated, failures = validate(rows)
    if failures:
        context.log.warning(
            "daily rollup expectations failed",
            extra={"expectations": [f["expectation"] for f in failures]},
        )
    return dg.AssetCheckResult(
        passed=not failures,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            **metadata,
            "expectations": evaluated,
            "failed": len(failures),
            "failed_expectations": dg.MetadataValue.json(failures),
        },
    )
