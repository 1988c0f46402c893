-- Hourly and daily rollups of raw telemetry per tenant, device and metric, written by the
-- telemetry_hourly and telemetry_daily assets (each run rewrites its window in one transaction).
-- Buckets are UTC hours and UTC days; tenant-local days are summed from hours by the dbt marts.
--
-- consumption (cumulative metrics only, NULL otherwise) is the sum of the increases between
-- consecutive readings whose later reading falls in the bucket; the first reading of a bucket is
-- compared with the last reading before it, however old, so consumption during a gap is
-- attributed to the bucket where the device reports again. A decrease is a counter reset: the
-- increase is the new value itself (the counter restarted from zero), counted in counter_resets.
CREATE TABLE telemetry_hourly (
    tenant_id       integer          NOT NULL,
    device_id       integer          NOT NULL,
    metric          text             NOT NULL,
    bucket          timestamptz      NOT NULL
                    CHECK (extract(epoch FROM bucket)::bigint % 3600 = 0),
    readings        bigint           NOT NULL CHECK (readings > 0),
    value_sum       double precision NOT NULL,
    value_min       double precision NOT NULL,
    value_max       double precision NOT NULL,
    value_avg       double precision NOT NULL,
    first_ts        timestamptz      NOT NULL,
    first_value     double precision NOT NULL,
    last_ts         timestamptz      NOT NULL,
    last_value      double precision NOT NULL,
    consumption     double precision,
    counter_resets  integer          NOT NULL DEFAULT 0,
    computed_at     timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, bucket, device_id, metric)
);
CREATE INDEX telemetry_hourly_bucket ON telemetry_hourly (bucket);

CREATE TABLE telemetry_daily (LIKE telemetry_hourly INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE telemetry_daily
    DROP CONSTRAINT telemetry_hourly_bucket_check,
    ADD CHECK (extract(epoch FROM bucket)::bigint % 86400 = 0),
    ADD PRIMARY KEY (tenant_id, bucket, device_id, metric);
CREATE INDEX telemetry_daily_bucket ON telemetry_daily (bucket);

GRANT SELECT ON telemetry_hourly, telemetry_daily TO app_rw, readonly_audit;
GRANT SELECT, INSERT, UPDATE, DELETE ON telemetry_hourly, telemetry_daily TO platform_rw;

DO $$
DECLARE
    table_name text;
BEGIN
    FOREACH table_name IN ARRAY ARRAY['telemetry_hourly', 'telemetry_daily'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', table_name);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I TO app_rw '
            'USING (tenant_id = iiot_current_tenant()) WITH CHECK (tenant_id = iiot_current_tenant())',
            table_name);
        EXECUTE format(
            'CREATE POLICY platform_access ON %I TO platform_rw USING (true) WITH CHECK (true)',
            table_name);
        EXECUTE format(
            'CREATE POLICY audit_read ON %I FOR SELECT TO readonly_audit USING (true)', table_name);
    END LOOP;
END
$$;

-- Late data: the hourly rollup stamps the dirty hours it recomputed (in the same repeatable-read
-- transaction); the daily rollup, the run's last step, then removes the marks that nothing
-- re-marked since. A mark is cleared only after the whole run succeeded.
ALTER TABLE dirty_windows ADD COLUMN rolled_up_at timestamptz;
