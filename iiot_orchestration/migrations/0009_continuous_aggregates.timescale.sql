-- TimescaleDB mode: the rollup statistics come from real continuous aggregates, hourly over the
-- raw hypertable and daily on top of the hourly one. They are refreshed by the rollup assets
-- for exactly their window (refresh_continuous_aggregate); no background policy is created.
-- Consumption needs the previous reading across buckets (a window function, which continuous
-- aggregates cannot hold), so it is computed by the same SQL as in PostgreSQL mode, and the
-- assets still write telemetry_hourly and telemetry_daily: the tables every reader uses.
-- TimescaleDB refuses to create a continuous aggregate on a hypertable with row security, so it
-- is switched off for the creation only, inside this migration's transaction (no session ever
-- sees the table without it). Refreshing works with row security on; the aggregates belong to
-- platform_rw and are granted to no tenant-scoped role.
ALTER TABLE telemetry DISABLE ROW LEVEL SECURITY;

-- refresh_continuous_aggregate needs the aggregate's owner, and cannot run inside a function (it
-- commits as it goes), so the service role that runs the assets owns the two aggregates. Owning
-- needs CREATE on their schema: they get a schema of their own, and platform_rw has no DDL
-- right anywhere else.
CREATE SCHEMA iiot_aggregates;
GRANT USAGE, CREATE ON SCHEMA iiot_aggregates TO platform_rw;
GRANT USAGE ON SCHEMA iiot_aggregates TO readonly_audit;

CREATE MATERIALIZED VIEW iiot_aggregates.telemetry_hourly_cagg
WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS
SELECT tenant_id, device_id, metric, time_bucket(INTERVAL '1 hour', ts) AS bucket,
       count(*) AS readings, sum(value) AS value_sum, min(value) AS value_min,
       max(value) AS value_max, min(ts) AS first_ts, first(value, ts) AS first_value,
       max(ts) AS last_ts, last(value, ts) AS last_value
  FROM telemetry
 GROUP BY tenant_id, device_id, metric, time_bucket(INTERVAL '1 hour', ts)
WITH NO DATA;

CREATE MATERIALIZED VIEW iiot_aggregates.telemetry_daily_cagg
WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS
SELECT tenant_id, device_id, metric, time_bucket(INTERVAL '1 day', bucket) AS bucket,
       sum(readings) AS readings, sum(value_sum) AS value_sum, min(value_min) AS value_min,
       max(value_max) AS value_max, min(first_ts) AS first_ts,
       first(first_value, first_ts) AS first_value, max(last_ts) AS last_ts,
       last(last_value, last_ts) AS last_value
  FROM iiot_aggregates.telemetry_hourly_cagg
 GROUP BY tenant_id, device_id, metric, time_bucket(INTERVAL '1 day', bucket)
WITH NO DATA;

ALTER TABLE telemetry ENABLE ROW LEVEL SECURITY;

ALTER MATERIALIZED VIEW iiot_aggregates.telemetry_hourly_cagg OWNER TO platform_rw;
ALTER MATERIALIZED VIEW iiot_aggregates.telemetry_daily_cagg OWNER TO platform_rw;
GRANT SELECT ON iiot_aggregates.telemetry_hourly_cagg, iiot_aggregates.telemetry_daily_cagg
   TO readonly_audit;
