-- The schema of the dbt marts (dbt_models/, docs/marts.md). dbt runs as the Dagster service
-- (platform_rw), which has no DDL right in public: here it may create, replace and drop its own
-- views and tables, and only here. dbt sees the schema exists and never issues CREATE SCHEMA.
-- The marts hold every tenant's rows without row-level security, so tenant sessions (app_rw)
-- get no access; the audit role reads them.
CREATE SCHEMA marts;
COMMENT ON SCHEMA marts IS 'dbt consumption marts, rebuilt by the marts_job (docs/marts.md)';

GRANT USAGE, CREATE ON SCHEMA marts TO platform_rw;
GRANT USAGE ON SCHEMA marts TO readonly_audit;
ALTER DEFAULT PRIVILEGES FOR ROLE platform_rw IN SCHEMA marts
    GRANT SELECT ON TABLES TO readonly_audit;
