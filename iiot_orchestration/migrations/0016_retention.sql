-- Retention and archival (docs/retention.md). Raw readings that fall out of their tenant's
-- retention (the tenant's retention_days, else its plan's) are written to Parquet archives, one
-- file per tenant and UTC day, read back and verified, and only then removed from telemetry.
-- Rollups, ingest_usage and billing are not touched: they keep their own, longer retention.
--
-- telemetry_archives records every archive: what the file holds (rows, devices, time span,
-- sha256 of the file and of its rows in canonical order) and how many of those rows have left
-- the raw table. Rows are removed only by their archived keys, each batch in the same
-- transaction as its deleted_rows update, so "raw rows of the day" + deleted_rows = rows holds
-- unless readings landed after the archive was written (the next run archives them too).
CREATE TABLE telemetry_archives (
    tenant_id       integer     NOT NULL,
    day             date        NOT NULL,
    tenant_slug     text        NOT NULL,
    location        text        NOT NULL CHECK (length(location) BETWEEN 1 AND 500),
    rows            bigint      NOT NULL CHECK (rows > 0),
    devices         integer     NOT NULL CHECK (devices > 0),
    min_ts          timestamptz NOT NULL,
    max_ts          timestamptz NOT NULL,
    bytes           bigint      NOT NULL CHECK (bytes > 0),
    sha256          text        NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    content_sha256  text        NOT NULL CHECK (content_sha256 ~ '^[0-9a-f]{64}$'),
    schema_version  integer     NOT NULL CHECK (schema_version > 0),
    archived_at     timestamptz NOT NULL DEFAULT now(),
    verified_at     timestamptz NOT NULL,
    deleted_rows    bigint      NOT NULL DEFAULT 0,
    deleted_at      timestamptz,
    deleted_by      text        CHECK (deleted_by IN ('partition', 'batches', 'tenant_removal')),
    restored_at     timestamptz,
    hold_until      date,
    PRIMARY KEY (tenant_id, day),
    CHECK (max_ts >= min_ts),
    CHECK (min_ts >= day::timestamp AT TIME ZONE 'UTC'
           AND max_ts < (day + 1)::timestamp AT TIME ZONE 'UTC'),
    CHECK (deleted_rows BETWEEN 0 AND rows),
    CHECK ((deleted_at IS NULL) OR (deleted_rows = rows AND deleted_by IS NOT NULL))
);
COMMENT ON COLUMN telemetry_archives.location IS
    'The Parquet file, relative to IIOT_ARCHIVE_ROOT; its manifest.json lies beside it.';
COMMENT ON COLUMN telemetry_archives.hold_until IS
    'Set by `iiot archive restore`: the restored day stays in the raw table until this day.';
CREATE INDEX telemetry_archives_day ON telemetry_archives (day);

-- Per tenant, the last UTC day whose expired readings were all archived and removed, so a daily
-- run looks at the one day that fell out of retention, not at the whole history.
CREATE TABLE retention_progress (
    tenant_id        integer     PRIMARY KEY,
    archived_through date        NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- A deleted tenant keeps its row (invoices, plan history and the audit log refer to it) with
-- status 'deleted', which is final (no reactivation, no plan change); its data is archived and
-- removed by `iiot tenants delete`.
ALTER TABLE tenants DROP CONSTRAINT tenants_status_check;
ALTER TABLE tenants ADD CONSTRAINT tenants_status_check
    CHECK (status IN ('active', 'suspended', 'deleted'));
ALTER TABLE tenants ADD COLUMN deleted_at timestamptz;
ALTER TABLE tenants ADD CHECK ((status = 'deleted') = (deleted_at IS NOT NULL));

CREATE FUNCTION iiot_tenant_deletion_is_final() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'deleted' AND (NEW.status <> 'deleted' OR NEW.plan_id <> OLD.plan_id) THEN
        RAISE EXCEPTION 'tenant % is deleted: it cannot be reactivated or change plan', OLD.slug
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER tenants_deletion_final BEFORE UPDATE ON tenants
    FOR EACH ROW EXECUTE FUNCTION iiot_tenant_deletion_is_final();

-- Removes one UTC day of raw telemetry as a whole: detach + drop of the day's partition in
-- PostgreSQL mode, drop_chunks of exactly that day in TimescaleDB mode. SECURITY DEFINER so the
-- service role may do it without DDL rights, and therefore it checks everything itself: no
-- tenant's retention (nor a restore hold) still covers the day, and every row in it is in a
-- verified archive (raw rows of each tenant = archived rows not yet removed). Returns the number
-- of partitions or chunks dropped (0 when the day had none).
CREATE FUNCTION iiot_drop_telemetry_day(p_day date) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp SET lock_timeout = '30s' AS $$
DECLARE
    storage_mode text := (SELECT mode FROM iiot_storage);
    today date := (now() AT TIME ZONE 'UTC')::date;
    day_start timestamptz := p_day::timestamp AT TIME ZONE 'UTC';
    day_end timestamptz := (p_day + 1)::timestamp AT TIME ZONE 'UTC';
    partition_name text := format('telemetry_p%s', to_char(p_day, 'YYYYMMDD'));
    needed record;
    gap record;
    dropped integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('iiot_telemetry_partitions'));
    SELECT t.slug, coalesce(t.retention_days, p.retention_days) AS days INTO needed
      FROM tenants t JOIN plans p USING (plan_id)
     WHERE t.status <> 'deleted' AND p_day >= today - coalesce(t.retention_days, p.retention_days)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'telemetry of % is still within the %-day retention of tenant %',
            p_day, needed.days, needed.slug USING ERRCODE = 'object_in_use';
    END IF;
    IF EXISTS (SELECT 1 FROM telemetry_archives WHERE day = p_day AND hold_until >= today) THEN
        RAISE EXCEPTION 'telemetry of % was restored and is held', p_day
            USING ERRCODE = 'object_in_use';
    END IF;
    SELECT coalesce(r.tenant_id, a.tenant_id) AS tenant_id, coalesce(r.n, 0) AS raw,
           a.rows - a.deleted_rows AS pending INTO gap
      FROM (SELECT tenant_id, count(*) AS n FROM telemetry
             WHERE ts >= day_start AND ts < day_end GROUP BY tenant_id) r
      FULL JOIN (SELECT * FROM telemetry_archives WHERE day = p_day) a USING (tenant_id)
     WHERE a.tenant_id IS NULL OR coalesce(r.n, 0) <> a.rows - a.deleted_rows
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'telemetry of % is not all archived: tenant % has % raw rows there, its '
            'archive % rows not yet removed', p_day, gap.tenant_id, gap.raw,
            coalesce(gap.pending::text, 'no')
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE telemetry_archives
       SET deleted_rows = rows, deleted_at = now(), deleted_by = 'partition'
     WHERE day = p_day AND deleted_at IS NULL;
    IF storage_mode = 'timescale' THEN
        SELECT count(*) INTO dropped
          FROM drop_chunks('telemetry', older_than => day_end, newer_than => day_start);
    ELSIF to_regclass(partition_name) IS NOT NULL THEN
        EXECUTE format('ALTER TABLE telemetry DETACH PARTITION %I', partition_name);
        EXECUTE format('DROP TABLE %I', partition_name);
        dropped := 1;
    END IF;
    IF EXISTS (SELECT 1 FROM telemetry WHERE ts >= day_start AND ts < day_end) THEN
        RAISE EXCEPTION 'telemetry of % is not one partition or chunk of its own', p_day;
    END IF;
    RETURN dropped;
END
$$;

-- TimescaleDB mode: compress the chunks that ended before p_older_than (at most p_limit at a
-- time); returns the chunks compressed. The hypertable must have columnstore enabled, which
-- TimescaleDB allows only without row-level security (see iiot_enable_telemetry_compression).
CREATE FUNCTION iiot_compress_telemetry_chunks(p_older_than timestamptz, p_limit integer)
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
         WHERE c.hypertable_name = 'telemetry' AND NOT c.is_compressed
           AND c.range_end <= p_older_than
         ORDER BY c.range_start
         LIMIT p_limit
    LOOP
        PERFORM compress_chunk(chunk, if_not_compressed => true);
        RETURN NEXT chunk::text;
    END LOOP;
END
$$;

-- TimescaleDB refuses columnstore on a table with row-level security, and telemetry has it for
-- the tenant-scoped role. Compression is therefore an explicit decision of whoever owns the
-- schema (migration_admin): this takes raw telemetry away from app_rw (tenant sessions keep
-- the rollups, which have row security), then turns row security off on the hypertable and
-- enables columnstore. platform_rw and readonly_audit see every tenant's readings either way.
CREATE FUNCTION iiot_enable_telemetry_compression() RETURNS void
LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
BEGIN
    IF (SELECT mode FROM iiot_storage) <> 'timescale' THEN
        RAISE EXCEPTION 'chunk compression needs the timescale storage mode'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    REVOKE ALL ON telemetry FROM app_rw;
    ALTER TABLE telemetry DISABLE ROW LEVEL SECURITY;
    ALTER TABLE telemetry SET (timescaledb.compress,
                               timescaledb.compress_segmentby = 'tenant_id, device_id, metric',
                               timescaledb.compress_orderby = 'ts');
END
$$;

REVOKE EXECUTE ON FUNCTION iiot_drop_telemetry_day(date) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION iiot_compress_telemetry_chunks(timestamptz, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION iiot_enable_telemetry_compression() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iiot_drop_telemetry_day(date) TO platform_rw;
GRANT EXECUTE ON FUNCTION iiot_compress_telemetry_chunks(timestamptz, integer) TO platform_rw;

-- The archive records are tenant-owned: a tenant session reads its own, the service writes them
-- (they are never deleted), the auditors read everything.
GRANT SELECT ON telemetry_archives TO app_rw;
GRANT SELECT, INSERT, UPDATE ON telemetry_archives, retention_progress TO platform_rw;
GRANT SELECT ON telemetry_archives, retention_progress TO readonly_audit;

DO $$
DECLARE
    table_name text;
BEGIN
    FOREACH table_name IN ARRAY ARRAY['telemetry_archives', 'retention_progress'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', table_name);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I FOR SELECT TO app_rw '
            'USING (tenant_id = iiot_current_tenant())', table_name);
        EXECUTE format(
            'CREATE POLICY platform_access ON %I TO platform_rw USING (true) WITH CHECK (true)',
            table_name);
        EXECUTE format(
            'CREATE POLICY audit_read ON %I FOR SELECT TO readonly_audit USING (true)', table_name);
    END LOOP;
END
$$;
