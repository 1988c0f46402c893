-- Named queries of the consumption reports (iiot_orchestration/reports/data.py). Every query of a
-- tenant's data filters by %(tenant_id)s, on every table it reads.

-- name: tenant
SELECT tenant_id, slug, name, timezone, locale, status, created_at
  FROM tenants
 WHERE slug = %(slug)s

-- name: marts_missing
SELECT name
  FROM unnest(ARRAY['marts.consumption_daily', 'marts.consumption_monthly']) AS name
 WHERE to_regclass(name) IS NULL

-- name: device_lines
-- One line per device and unit: the period's consumption from the daily mart, the previous
-- period's, and the device's rank and share among the tenant's devices of its kind and unit.
-- Active devices without data are listed too (their completeness is 0).
WITH kind_units AS (
    SELECT DISTINCT ON (meter_kind) meter_kind, unit
      FROM metric_catalog
     WHERE cumulative AND meter_kind IS NOT NULL
     ORDER BY meter_kind, metric
),
current_period AS (
    SELECT device_id, unit, sum(consumption) AS consumption, sum(readings) AS readings,
           count(*) AS days_with_data, sum(hours_with_data) AS hours_with_data,
           sum(counter_resets) AS counter_resets
      FROM marts.consumption_daily
     WHERE tenant_id = %(tenant_id)s AND local_day BETWEEN %(first_day)s AND %(last_day)s
     GROUP BY device_id, unit
),
previous_period AS (
    SELECT device_id, unit, sum(consumption) AS consumption
      FROM marts.consumption_daily
     WHERE tenant_id = %(tenant_id)s
       AND local_day BETWEEN %(previous_first_day)s AND %(previous_last_day)s
     GROUP BY device_id, unit
),
lines AS (
    SELECT d.device_id, d.mac::text AS mac, d.name, d.meter_kind, d.status,
           coalesce(c.unit, k.unit) AS unit,
           coalesce(c.consumption, 0)::double precision AS consumption,
           coalesce(c.readings, 0)::bigint AS readings,
           coalesce(c.days_with_data, 0)::integer AS days_with_data,
           coalesce(c.hours_with_data, 0)::integer AS hours_with_data,
           coalesce(c.counter_resets, 0)::integer AS counter_resets
      FROM devices d
      LEFT JOIN current_period c ON c.device_id = d.device_id
      LEFT JOIN kind_units k ON k.meter_kind = d.meter_kind
     WHERE d.tenant_id = %(tenant_id)s
       AND (c.device_id IS NOT NULL OR (d.status = 'active' AND d.created_at < %(period_end)s))
)
SELECT l.*, p.consumption::double precision AS previous_consumption,
       rank() OVER kind_unit AS rank,
       l.consumption / nullif(sum(l.consumption) OVER kind_unit_all, 0) AS share
  FROM lines l
  LEFT JOIN previous_period p ON p.device_id = l.device_id AND p.unit = l.unit
WINDOW kind_unit AS (PARTITION BY l.meter_kind, l.unit ORDER BY l.consumption DESC),
       kind_unit_all AS (PARTITION BY l.meter_kind, l.unit)
 ORDER BY l.meter_kind, l.unit, l.consumption DESC, l.name, l.mac

-- name: device_days
SELECT c.local_day, c.device_id, c.unit, c.consumption::double precision AS consumption,
       c.readings::bigint AS readings, c.hours_with_data::integer AS hours_with_data
  FROM marts.consumption_daily c
  JOIN devices d ON d.device_id = c.device_id AND d.tenant_id = %(tenant_id)s
 WHERE c.tenant_id = %(tenant_id)s AND c.local_day BETWEEN %(first_day)s AND %(last_day)s
 ORDER BY c.local_day, array_position(ARRAY['energy', 'water', 'gas'], d.meter_kind), c.unit,
          d.name, d.mac

-- name: dead_letters
SELECT reason, count(*) AS messages
  FROM dead_letters
 WHERE tenant_id = %(tenant_id)s AND received_at >= %(period_start)s AND received_at < %(period_end)s
 GROUP BY reason
 ORDER BY count(*) DESC, reason

-- name: alert_columns
SELECT a.attname
  FROM pg_attribute a
 WHERE a.attrelid = to_regclass('alerts') AND a.attnum > 0 AND NOT a.attisdropped

-- name: mart_month_totals
-- The reconciliation's own reading of the marts (not the report's): a month from the monthly mart.
SELECT m.device_id, d.mac::text AS mac, d.meter_kind, m.unit,
       m.consumption::double precision AS consumption
  FROM marts.consumption_monthly m
  JOIN devices d ON d.device_id = m.device_id AND d.tenant_id = %(tenant_id)s
 WHERE m.tenant_id = %(tenant_id)s AND m.local_month = %(first_day)s

-- name: mart_day_totals
-- The same for a week or a range of days, from the daily mart.
SELECT c.device_id, d.mac::text AS mac, d.meter_kind, c.unit,
       sum(c.consumption)::double precision AS consumption
  FROM marts.consumption_daily c
  JOIN devices d ON d.device_id = c.device_id AND d.tenant_id = %(tenant_id)s
 WHERE c.tenant_id = %(tenant_id)s AND c.local_day BETWEEN %(first_day)s AND %(last_day)s
 GROUP BY c.device_id, d.mac, d.meter_kind, c.unit

-- name: active_tenants
SELECT slug, timezone, created_at
  FROM tenants
 WHERE status = 'active'
 ORDER BY slug
