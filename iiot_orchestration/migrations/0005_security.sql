-- Least-privilege grants and row-level security keyed on the session setting iiot.tenant_id.
--   app_rw          tenant-scoped reads and writes (analyst-facing); no DDL
--   platform_rw     the ingest daemon and Dagster: every tenant's rows; no DDL
--   readonly_audit  reads everything, writes nothing
--   migration_admin owns the schema and runs migrations
CREATE FUNCTION iiot_current_tenant() RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT nullif(current_setting('iiot.tenant_id', true), '')::integer
$$;

GRANT USAGE ON SCHEMA public TO app_rw, platform_rw, readonly_audit;
GRANT SELECT ON plans, metric_catalog TO app_rw, platform_rw;
GRANT SELECT ON telemetry_partitions TO platform_rw;
GRANT SELECT
   ON plans, metric_catalog, tenants, tenant_plan_history, devices, device_metrics,
      device_certificates, telemetry, telemetry_partitions, dead_letters, dirty_windows, audit_log
   TO readonly_audit;
GRANT SELECT, INSERT, UPDATE, DELETE
   ON tenants, devices, device_metrics, device_certificates, telemetry, dead_letters,
      dirty_windows
   TO app_rw, platform_rw;
GRANT SELECT ON tenant_plan_history TO app_rw;
GRANT SELECT, INSERT, UPDATE ON tenant_plan_history TO platform_rw;
GRANT SELECT, INSERT ON audit_log TO app_rw, platform_rw;
GRANT EXECUTE ON FUNCTION iiot_ensure_telemetry_partitions(date, date) TO platform_rw;
REVOKE EXECUTE ON FUNCTION iiot_ensure_telemetry_partitions(date, date) FROM PUBLIC;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO readonly_audit;

DO $$
DECLARE
    table_name text;
    key text;
BEGIN
    FOR table_name, key IN VALUES
        ('tenants', 'tenant_id'), ('tenant_plan_history', 'tenant_id'), ('devices', 'tenant_id'),
        ('device_metrics', 'tenant_id'), ('device_certificates', 'tenant_id'),
        ('telemetry', 'tenant_id'), ('dead_letters', 'tenant_id'),
        ('dirty_windows', 'tenant_id'), ('audit_log', 'tenant_id')
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', table_name);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I TO app_rw '
            'USING (%I = iiot_current_tenant()) WITH CHECK (%I = iiot_current_tenant())',
            table_name, key, key);
        EXECUTE format(
            'CREATE POLICY platform_access ON %I TO platform_rw USING (true) WITH CHECK (true)',
            table_name);
        EXECUTE format(
            'CREATE POLICY audit_read ON %I FOR SELECT TO readonly_audit USING (true)',
            table_name);
    END LOOP;
END
$$;
