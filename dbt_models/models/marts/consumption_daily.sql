-- A local day is the calendar day in the tenant's time zone: each UTC hour is counted on the
-- day its start falls on there (a UTC 01:00 hour is the previous day in America/Sao_Paulo).
with cumulative_hours as (
    select
        hours.tenant_id,
        hours.device_id,
        metrics.unit,
        tenants.timezone,
        (hours.hour_utc at time zone tenants.timezone)::date as local_day,
        hours.hour_utc,
        hours.readings,
        hours.consumption,
        hours.counter_resets
    from {{ ref('stg_telemetry_hourly') }} as hours
    inner join {{ source('registry', 'metric_catalog') }} as metrics
        on metrics.metric = hours.metric
    inner join {{ source('registry', 'tenants') }} as tenants
        on tenants.tenant_id = hours.tenant_id
    where metrics.cumulative
)

select
    tenant_id,
    device_id,
    unit,
    local_day,
    timezone,
    sum(consumption) as consumption,
    sum(readings) as readings,
    count(distinct hour_utc) as hours_with_data,
    sum(counter_resets) as counter_resets
from cumulative_hours
group by tenant_id, device_id, unit, local_day, timezone
