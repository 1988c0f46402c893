-- Devices are compared only with the same tenant's devices of the same unit in the same local
-- month. The previous month is the calendar month before, so a month without data gives NULL.
with monthly as (
    select tenant_id, local_month, unit, device_id, consumption
    from {{ ref('consumption_monthly') }}
),

ranked as (
    select
        current_month.tenant_id,
        current_month.local_month,
        current_month.unit,
        current_month.device_id,
        current_month.consumption,
        rank() over (tenant_month_unit order by current_month.consumption desc) as rank_in_tenant,
        count(*) over tenant_month_unit as devices_in_tenant,
        sum(current_month.consumption) over tenant_month_unit as tenant_consumption,
        previous_month.consumption as previous_month_consumption
    from monthly as current_month
    left join monthly as previous_month
        on previous_month.tenant_id = current_month.tenant_id
        and previous_month.device_id = current_month.device_id
        and previous_month.unit = current_month.unit
        and previous_month.local_month = (current_month.local_month - interval '1 month')::date
    window tenant_month_unit as (
        partition by current_month.tenant_id, current_month.local_month, current_month.unit
    )
)

select
    tenant_id,
    local_month,
    unit,
    device_id,
    consumption,
    rank_in_tenant,
    devices_in_tenant,
    tenant_consumption,
    consumption / nullif(tenant_consumption, 0) as share_of_tenant,
    previous_month_consumption,
    consumption - previous_month_consumption as change_vs_previous_month,
    (consumption - previous_month_consumption)
        / nullif(previous_month_consumption, 0) as change_ratio_vs_previous_month
from ranked
