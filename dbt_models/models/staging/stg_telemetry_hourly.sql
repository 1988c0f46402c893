-- The hourly rollup as the marts read it: one row per tenant, device, metric and UTC hour.
select
    tenant_id,
    device_id,
    metric,
    bucket as hour_utc,
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
from {{ source('rollups', 'telemetry_hourly') }}
