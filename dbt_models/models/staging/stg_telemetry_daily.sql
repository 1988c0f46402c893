-- The daily rollup: one row per tenant, device, metric and UTC day. The marts count local days
-- from the hours; this view reconciles their totals (tests/consumption_matches_daily_rollup.sql).
select
    tenant_id,
    device_id,
    metric,
    bucket as day_utc,
    readings,
    value_sum,
    value_min,
    value_max,
    value_avg,
    first_ts,
    first_value,
    last_ts,
    last_value,
    consumption,
    counter_resets
from {{ source('rollups', 'telemetry_daily') }}
