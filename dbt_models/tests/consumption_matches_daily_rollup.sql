{{ config(severity='warn', meta={'dagster': {'ref': {'name': 'consumption_daily'}}}) }}
-- Local days regroup the same hours as the UTC days, so each device's total consumption per
-- unit must equal the daily rollup's. A warning, not an error: a late-data run between its
-- hourly and daily steps leaves the two briefly apart.
with from_local_days as (
    select tenant_id, device_id, unit, sum(consumption) as consumption
    from {{ ref('consumption_daily') }}
    group by tenant_id, device_id, unit
),

from_utc_days as (
    select days.tenant_id, days.device_id, metrics.unit, sum(days.consumption) as consumption
    from {{ ref('stg_telemetry_daily') }} as days
    inner join {{ source('registry', 'metric_catalog') }} as metrics
        on metrics.metric = days.metric
    inner join {{ source('registry', 'tenants') }} as tenants
        on tenants.tenant_id = days.tenant_id
    where metrics.cumulative
    group by days.tenant_id, days.device_id, metrics.unit
)

select
    coalesce(local_days.tenant_id, utc_days.tenant_id) as tenant_id,
    coalesce(local_days.device_id, utc_days.device_id) as device_id,
    coalesce(local_days.unit, utc_days.unit) as unit,
    local_days.consumption as local_days_consumption,
    utc_days.consumption as utc_days_consumption
from from_local_days as local_days
full join from_utc_days as utc_days
    on utc_days.tenant_id = local_days.tenant_id
    and utc_days.device_id = local_days.device_id
    and utc_days.unit = local_days.unit
where local_days.consumption is null
    or utc_days.consumption is null
    or abs(local_days.consumption - utc_days.consumption)
        > 1e-9 * greatest(1, abs(utc_days.consumption))
