-- The devices behind each dirty (tenant, hour) window (docs/rollups.md): the ingest daemon marks
-- them beside dirty_windows, in the same transaction as the late readings. A late-data run of the
-- sensor rewrites only these devices' series in a window that was rolled up before, instead of
-- every series of the hour, and deletes the marks it covered in its repeatable-read
-- transaction (a mark the daemon renews meanwhile makes that transaction retry).
CREATE TABLE dirty_window_devices (
    window_start  timestamptz NOT NULL CHECK (extract(epoch FROM window_start)::bigint % 3600 = 0),
    tenant_id     integer     NOT NULL,
    device_id     integer     NOT NULL,
    marked_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (window_start, tenant_id, device_id)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON dirty_window_devices TO platform_rw;
GRANT SELECT ON dirty_window_devices TO readonly_audit;

ALTER TABLE dirty_window_devices ENABLE ROW LEVEL SECURITY;
CREATE POLICY platform_access ON dirty_window_devices TO platform_rw USING (true) WITH CHECK (true);
CREATE POLICY audit_read ON dirty_window_devices FOR SELECT TO readonly_audit USING (true);
