-- Tenant isolation that holds for direct database logins (docs/security.md).
--
-- 1. Tenant-bound logins: a LOGIN in tenant_logins (written only by the schema owner, through
--    `iiot tenants logins`) is bound to one tenant. iiot_current_tenant() resolves that tenant
--    from the session's login and ignores iiot.tenant_id for it; the setting stays the trusted
--    way for a multi-tenant service (app_rw) to choose its tenant per transaction.
-- 2. Tenant logins (role tenant_reader) are read-only and read nothing but the security_barrier
--    views of the schema `tenant`. They hold no grant on any table, partition, chunk, continuous
--    aggregate or mart, so pg_stats shows them nothing either.
-- 3. Readings are keyed by tenant: the telemetry key includes tenant_id, the landing path keeps
--    (tenant_id, device_id) equal to the device's tenant, and a device never changes tenant.
-- 4. Raw telemetry has no row-level security any more (only the platform and the auditors read
--    the table; tenants read tenant.telemetry), so TimescaleDB compresses it.

-- 1. Logins and the tenant they are bound to --------------------------------------------------

CREATE TABLE tenant_logins (
    login        text        PRIMARY KEY CHECK (login ~ '^[a-z][a-z0-9_]{2,62}$'),
    tenant_id    integer     NOT NULL REFERENCES tenants,
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   text        NOT NULL DEFAULT session_user,
    valid_until  timestamptz,
    rotated_at   timestamptz,
    revoked_at   timestamptz,
    revoked_by   text,
    CHECK ((revoked_at IS NULL) = (revoked_by IS NULL))
);
CREATE INDEX tenant_logins_tenant ON tenant_logins (tenant_id);
COMMENT ON TABLE tenant_logins IS
    'Database logins bound to one tenant (iiot tenants logins); only the schema owner writes it.';
GRANT SELECT ON tenant_logins TO platform_rw, readonly_audit;

-- The tenant of this session. A tenant login gets its own tenant (NULL once revoked or past
-- valid_until) whatever iiot.tenant_id says; a member of tenant_reader that is not in
-- tenant_logins gets NULL (sees nothing); any other session (the multi-tenant service, app_rw)
-- gets iiot.tenant_id.
-- SECURITY DEFINER so that it reads tenant_logins, which tenant logins cannot; session_user,
-- because SET ROLE cannot change it. Callers wrap it in a scalar subquery
-- (`tenant_id = (SELECT iiot_current_tenant())`), so it runs once per statement, not per row.
CREATE OR REPLACE FUNCTION iiot_current_tenant() RETURNS integer
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = public, pg_catalog, pg_temp AS $$
DECLARE
    bound_tenant integer;
    revoked timestamptz;
    valid_to timestamptz;
BEGIN
    SELECT l.tenant_id, l.revoked_at, l.valid_until INTO bound_tenant, revoked, valid_to
      FROM tenant_logins l WHERE l.login = session_user;
    IF FOUND THEN
        -- revoked or expired: nothing (VALID UNTIL binds password sign-in only; this binds all)
        RETURN CASE WHEN revoked IS NULL AND (valid_to IS NULL OR valid_to > now())
                    THEN bound_tenant END;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_auth_members m
                WHERE m.roleid = 'tenant_reader'::regrole
                  AND m.member = (SELECT r.oid FROM pg_roles r WHERE r.rolname = session_user)) THEN
        RETURN NULL;
    END IF;
    RETURN nullif(current_setting('iiot.tenant_id', true), '')::integer;
END
$$;

-- Every policy of the service role evaluates the tenant once per statement.
DO $$
DECLARE
    p record;
BEGIN
    FOR p IN SELECT tablename, policyname, cmd, qual, with_check FROM pg_policies
              WHERE schemaname = 'public' AND policyname = 'tenant_isolation'
    LOOP
        IF p.with_check IS NULL THEN
            EXECUTE format('ALTER POLICY %I ON %I USING (tenant_id = (SELECT iiot_current_tenant()))',
                           p.policyname, p.tablename);
        ELSE
            EXECUTE format('ALTER POLICY %I ON %I USING (tenant_id = (SELECT iiot_current_tenant()))'
                           ' WITH CHECK (tenant_id = (SELECT iiot_current_tenant()))',
                           p.policyname, p.tablename);
        END IF;
    END LOOP;
END
$$;

-- Only triggers (running as the owner) call this one; nobody else may.
REVOKE EXECUTE ON FUNCTION iiot_usage_device_days_recompute(jsonb) FROM PUBLIC;

-- 2. What the service role may change -----------------------------------------------------------
-- Plan, retention and status changes stay with the platform (CLI, Dagster), audited; raw
-- readings, dead letters, late-data marks and certificates are the platform's to write.
REVOKE INSERT, UPDATE, DELETE ON tenants, tenant_plan_history, dead_letters, dirty_windows,
    device_certificates, ingest_usage, ingest_usage_tenant_hours, ingest_usage_device_days,
    telemetry_hourly, telemetry_daily
    FROM app_rw;
REVOKE ALL ON telemetry FROM app_rw;

-- 3. Readings keyed by tenant ---------------------------------------------------------------------
-- The key includes the tenant, so a reading stored under one tenant can never make another
-- tenant's reading a duplicate. tenant_id goes last so that every lookup by device, metric and
-- time keeps its index. land_telemetry_staging lands only readings whose (tenant_id, device_id)
-- is the device's, and a device never changes tenant.
DO $$
DECLARE
    compressed boolean;
BEGIN
    IF (SELECT mode FROM iiot_storage) = 'timescale' THEN
        EXECUTE 'SELECT coalesce(bool_or(compression_enabled), false)'
                '  FROM timescaledb_information.hypertables WHERE hypertable_name = ''telemetry'''
           INTO compressed;
        IF compressed THEN
            -- compressed by hand through the former iiot_enable_telemetry_compression(): the
            -- key cannot change under compressed chunks
            EXECUTE 'SELECT count(decompress_chunk(c, if_compressed => true))'
                    '  FROM show_chunks(''telemetry'') c';
            EXECUTE 'ALTER TABLE telemetry SET (timescaledb.compress = false)';
        END IF;
    END IF;
END
$$;
ALTER TABLE telemetry DROP CONSTRAINT telemetry_pkey;
ALTER TABLE telemetry ADD CONSTRAINT telemetry_pkey PRIMARY KEY (device_id, metric, ts, tenant_id);

ALTER TABLE devices ADD CONSTRAINT devices_tenant_device UNIQUE (tenant_id, device_id);

CREATE FUNCTION iiot_device_tenant_is_fixed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'device % belongs to tenant % and cannot move to tenant %',
        OLD.device_id, OLD.tenant_id, NEW.tenant_id
        USING ERRCODE = 'integrity_constraint_violation',
              HINT = 'its readings, usage and invoices stay with the tenant that had them';
END
$$;
CREATE TRIGGER devices_tenant_is_fixed
    BEFORE UPDATE OF tenant_id ON devices
    FOR EACH ROW WHEN (NEW.tenant_id IS DISTINCT FROM OLD.tenant_id)
    EXECUTE FUNCTION iiot_device_tenant_is_fixed();

-- 4. Raw telemetry without row-level security; compression in TimescaleDB mode -------------------
DROP POLICY tenant_isolation ON telemetry;
DROP POLICY platform_access ON telemetry;
DROP POLICY audit_read ON telemetry;
ALTER TABLE telemetry DISABLE ROW LEVEL SECURITY;

DROP FUNCTION iiot_enable_telemetry_compression();

DO $$
BEGIN
    IF (SELECT mode FROM iiot_storage) = 'timescale' THEN
        EXECUTE $sql$ALTER TABLE telemetry SET (timescaledb.compress,
                      timescaledb.compress_segmentby = 'tenant_id, device_id, metric',
                      timescaledb.compress_orderby = 'ts')$sql$;
    END IF;
END
$$;

-- 5. The tenant schema: what a tenant login reads ---------------------------------------------
-- security_barrier: a function or operator of the caller's query never sees a row before the
-- tenant filter has removed it (no leaking another tenant's values through errors or notices).
CREATE SCHEMA tenant;
COMMENT ON SCHEMA tenant IS
    'One tenant''s rows: tenant logins and the service role read these views (docs/security.md)';
GRANT USAGE ON SCHEMA tenant TO tenant_reader, app_rw;
-- dbt (platform_rw) creates the views over the marts after each build (dbt_models/macros)
GRANT USAGE, CREATE ON SCHEMA tenant TO platform_rw;

CREATE VIEW tenant.account WITH (security_barrier) AS
SELECT t.tenant_id, t.slug, t.name, t.plan_id, t.timezone, t.locale,
       coalesce(t.retention_days, p.retention_days) AS retention_days, t.billing_cycle_day,
       t.status, t.created_at
  FROM tenants t JOIN plans p USING (plan_id)
 WHERE t.tenant_id = (SELECT iiot_current_tenant());

CREATE VIEW tenant.metrics AS
SELECT metric, unit, meter_kind, cumulative, description FROM metric_catalog;

CREATE VIEW tenant.devices WITH (security_barrier) AS
SELECT device_id, tenant_id, mac, name, meter_kind, status, last_seen, created_at
  FROM devices WHERE tenant_id = (SELECT iiot_current_tenant());

CREATE VIEW tenant.telemetry WITH (security_barrier) AS
SELECT tenant_id, device_id, metric, ts, value, received_at
  FROM telemetry WHERE tenant_id = (SELECT iiot_current_tenant());

CREATE VIEW tenant.telemetry_hourly WITH (security_barrier) AS
SELECT * FROM telemetry_hourly WHERE tenant_id = (SELECT iiot_current_tenant());

CREATE VIEW tenant.telemetry_daily WITH (security_barrier) AS
SELECT * FROM telemetry_daily WHERE tenant_id = (SELECT iiot_current_tenant());

CREATE VIEW tenant.invoices WITH (security_barrier) AS
SELECT * FROM invoices WHERE tenant_id = (SELECT iiot_current_tenant());

CREATE VIEW tenant.invoice_lines WITH (security_barrier) AS
SELECT * FROM invoice_lines WHERE tenant_id = (SELECT iiot_current_tenant());

CREATE VIEW tenant.alerts WITH (security_barrier) AS
SELECT * FROM alerts WHERE tenant_id = (SELECT iiot_current_tenant());

GRANT SELECT ON ALL TABLES IN SCHEMA tenant TO tenant_reader, app_rw;

-- Late readings written into a compressed chunk leave it partially compressed (TimescaleDB chunk
-- status bit 8): those chunks are compressed again too, oldest first.
CREATE OR REPLACE FUNCTION iiot_compress_telemetry_chunks(p_older_than timestamptz,
                                                          p_limit integer)
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    chunk regclass;
BEGIN
    IF (SELECT mode FROM iiot_storage) <> 'timescale' THEN
        RAISE EXCEPTION 'chunk compression needs the timescale storage mode'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM timescaledb_information.hypertables
                    WHERE hypertable_name = 'telemetry' AND compression_enabled) THEN
        RAISE EXCEPTION 'columnstore is not enabled on telemetry (docs/retention.md)'
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    FOR chunk IN
        SELECT format('%I.%I', c.chunk_schema, c.chunk_name)::regclass
          FROM timescaledb_information.chunks c
          JOIN _timescaledb_catalog.chunk k
            ON k.schema_name = c.chunk_schema AND k.table_name = c.chunk_name
         WHERE c.hypertable_name = 'telemetry' AND c.range_end <= p_older_than
           AND (NOT c.is_compressed OR k.status & 8 = 8)
         ORDER BY c.range_start
         LIMIT p_limit
    LOOP
        PERFORM compress_chunk(chunk);
        RETURN NEXT chunk::text;
    END LOOP;
END
$$;
