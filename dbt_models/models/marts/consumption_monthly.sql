-- Local months are summed from local days, so both follow the tenant's time zone.
select
    tenant_id,
    device_id,
    unit,
    date_trunc('month', local_day)::date as local_month,
    timezone,
    sum(consumption) as consumption,
    sum(readings) as readings,
    count(*) as days_with_data,
    sum(hours_with_data) as hours_with_data,
    sum(counter_resets) as counter_resets
from {{ ref('consumption_daily') }}
group by tenant_id, device_id, unit, date_trunc('month', local_day)::date, timezone
