-- The broker sessions of the ingest slots, as the slots report them (docs/ingest.md, "Sessions").
-- Mosquitto has no way to list its sessions, so each slot records its own: the subscription it
-- holds, where it runs and when it was last seen. `iiot ingest-sessions list` reads it; a slot
-- being retired is drained and its session ended with `iiot ingest-sessions drain`.
CREATE TABLE ingest_sessions (
    client_id        text        PRIMARY KEY,
    group_name       text        NOT NULL,
    slot             integer     NOT NULL CHECK (slot >= 0),
    subscription     text        NOT NULL,
    host             text        NOT NULL,
    pid              integer     NOT NULL,
    session_expiry_s integer     NOT NULL CHECK (session_expiry_s >= 0),
    state            text        NOT NULL
                     CHECK (state IN ('connected', 'disconnected', 'stopped', 'ended')),
    started_at       timestamptz NOT NULL DEFAULT now(),
    last_seen_at     timestamptz NOT NULL DEFAULT now(),
    ended_at         timestamptz
);
CREATE INDEX ingest_sessions_group ON ingest_sessions (group_name, slot);

GRANT SELECT, INSERT, UPDATE ON ingest_sessions TO platform_rw;
GRANT SELECT ON ingest_sessions TO readonly_audit;

ALTER TABLE ingest_sessions ENABLE ROW LEVEL SECURITY;
CREATE POLICY platform_access ON ingest_sessions TO platform_rw USING (true) WITH CHECK (true);
CREATE POLICY audit_read ON ingest_sessions FOR SELECT TO readonly_audit USING (true);
