-- Backups and restore drills (docs/backups.md). The files under IIOT_BACKUP_ROOT are the backups;
-- these tables are their history: every backup run (also the failed ones, and when rotation
-- deleted a backup) and every restore drill with its measured RPO and RTO. Neither is
-- tenant-owned: they describe the whole database, so no tenant-scoped role reads them.
CREATE TABLE backups (
    backup_id       text        NOT NULL CHECK (backup_id ~ '^[0-9]{8}T[0-9]{6}Z(-[0-9]{1,3})?$'),
    database_name   text        NOT NULL,
    status          text        NOT NULL CHECK (status IN ('complete', 'failed', 'deleted')),
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz NOT NULL CHECK (finished_at >= started_at),
    location        text        NOT NULL,
    bytes           bigint      CHECK (bytes >= 0),
    sha256          text        CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    schema_version  integer,
    client_version  text,
    error           text,
    deleted_at      timestamptz,
    PRIMARY KEY (database_name, backup_id),
    CHECK ((status = 'failed') = (error IS NOT NULL)),
    CHECK ((status = 'deleted') = (deleted_at IS NOT NULL)),
    CHECK (status = 'failed' OR (bytes IS NOT NULL AND sha256 IS NOT NULL))
);
CREATE INDEX backups_database_started ON backups (database_name, started_at);

CREATE TABLE backup_drills (
    drill_id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    database_name       text          NOT NULL,
    backup_id           text,
    scratch_database    text          NOT NULL CHECK (scratch_database ~ '^iiot_drill_[a-z0-9_]+$'),
    status              text          NOT NULL CHECK (status IN ('passed', 'failed')),
    started_at          timestamptz   NOT NULL,
    finished_at         timestamptz   NOT NULL CHECK (finished_at >= started_at),
    backup_taken_at     timestamptz,
    -- RPO: age of the backup's snapshot when the drill needed it; RTO: checksum + restore +
    -- verification, the time to a verified copy of the database
    rpo_seconds         numeric(14,3) CHECK (rpo_seconds >= 0),
    rto_seconds         numeric(14,3) CHECK (rto_seconds >= 0),
    checksum_seconds    numeric(14,3),
    restore_seconds     numeric(14,3),
    verify_seconds      numeric(14,3),
    rpo_target_seconds  integer       NOT NULL CHECK (rpo_target_seconds > 0),
    rto_target_seconds  integer       NOT NULL CHECK (rto_target_seconds > 0),
    tables_checked      integer       NOT NULL DEFAULT 0 CHECK (tables_checked >= 0),
    mismatches          jsonb         NOT NULL DEFAULT '[]',
    error               text,
    CHECK ((status = 'failed') = (error IS NOT NULL))
);
CREATE INDEX backup_drills_database_started ON backup_drills (database_name, started_at);

-- platform_rw runs the backup and drill assets; readonly_audit reads the history
-- (docs/security.md); app_rw, tenant-scoped, has no use for it.
GRANT SELECT, INSERT, UPDATE ON backups TO platform_rw;
GRANT SELECT, INSERT ON backup_drills TO platform_rw;
GRANT SELECT ON backups, backup_drills TO readonly_audit;
