#!/bin/sh
# Run once by the postgres image on a new data directory, as the superuser: the platform's and
# the API's logins and the two databases (docs/security.md). The five group roles are created as
# `iiot db migrate` creates them (iiot_orchestration/sql/bootstrap.sql), so the logins can join
# them before the first migration. Migrations and backups use the superuser (compose.yaml).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v platform_password="$PLATFORM_DB_PASSWORD" -v api_password="$API_DB_PASSWORD" <<'SQL'
CREATE ROLE migration_admin NOLOGIN;
CREATE ROLE app_rw NOLOGIN;
CREATE ROLE platform_rw NOLOGIN;
CREATE ROLE readonly_audit NOLOGIN;
CREATE ROLE tenant_reader NOLOGIN;
CREATE ROLE iiot_platform LOGIN PASSWORD :'platform_password' IN ROLE platform_rw;
CREATE ROLE iiot_api LOGIN PASSWORD :'api_password' IN ROLE app_rw;
CREATE DATABASE iiot;
CREATE DATABASE iiot_dagster OWNER iiot_platform;
SQL
