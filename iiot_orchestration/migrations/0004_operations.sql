-- Dead letters, dirty windows for late data, and the append-only audit log.
CREATE TABLE dead_letters (
    dead_letter_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at        timestamptz NOT NULL DEFAULT now(),
    topic              text        NOT NULL,
    mac                macaddr,
    tenant_id          integer,
    device_id          integer,
    reason             text        NOT NULL CHECK (reason ~ '^[a-z][a-z_]{1,40}$'),
    detail             text        NOT NULL DEFAULT '',
    payload            bytea       NOT NULL,
    payload_size       integer     NOT NULL CHECK (payload_size >= 0),
    payload_truncated  boolean     NOT NULL DEFAULT false
);
CREATE INDEX dead_letters_tenant_received ON dead_letters (tenant_id, received_at);
CREATE INDEX dead_letters_reason_received ON dead_letters (reason, received_at);

CREATE TABLE dirty_windows (
    tenant_id        integer     NOT NULL,
    window_start     timestamptz NOT NULL CHECK (extract(epoch FROM window_start)::bigint % 3600 = 0),
    first_marked_at  timestamptz NOT NULL DEFAULT now(),
    last_marked_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, window_start)
);

CREATE TABLE audit_log (
    audit_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor        text        NOT NULL,
    tenant_id    integer,
    action       text        NOT NULL CHECK (action ~ '^[a-z][a-z_.]{1,60}$'),
    entity       text        NOT NULL,
    entity_id    text,
    detail       jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_tenant_occurred ON audit_log (tenant_id, occurred_at);

CREATE FUNCTION iiot_audit_log_is_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION iiot_audit_log_is_append_only();
CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION iiot_audit_log_is_append_only();
