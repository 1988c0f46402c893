-- Run by `iiot db migrate` as the connecting user before any numbered migration.
-- Roles are cluster-wide, so they are created here (idempotently), not in a migration.
DO $$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY['migration_admin', 'app_rw', 'platform_rw', 'readonly_audit',
                                   'tenant_reader']
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role_name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', role_name);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another database's migration created it at the same moment
            END;
        END IF;
    END LOOP;
END
$$;

GRANT USAGE, CREATE ON SCHEMA public TO migration_admin;
-- so that migrations can hand platform_rw the objects it must own (TimescaleDB's continuous
-- aggregates are refreshed by their owner only)
GRANT platform_rw TO migration_admin;
-- migrations may create schemas of their own (iiot_aggregates in TimescaleDB mode)
DO $$
BEGIN
    EXECUTE format('GRANT CREATE ON DATABASE %I TO migration_admin', current_database());
END
$$;

CREATE TABLE IF NOT EXISTS iiot_schema_migrations (
    version      integer PRIMARY KEY,
    name         text        NOT NULL,
    variant      text,
    checksum     text        NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT now(),
    applied_by   text        NOT NULL DEFAULT session_user,
    duration_ms  integer     NOT NULL
);

CREATE TABLE IF NOT EXISTS iiot_storage (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    mode       text        NOT NULL CHECK (mode IN ('timescale', 'postgres')),
    chosen_at  timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT ON iiot_schema_migrations, iiot_storage
   TO migration_admin, app_rw, platform_rw, readonly_audit;
