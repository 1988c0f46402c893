-- What the ingest daemon accepted, per tenant, device and UTC hour, for billing: messages and
-- readings that landed for the first time (a redelivered message counts once), and the
-- messages an enterprise device sent over its plan's per-minute rate (overage).
-- Written in the same transaction as the readings, so the counts match the telemetry table.
-- Hours, not days: billing sums them into each tenant's local day.
CREATE TABLE ingest_usage (
    tenant_id         integer     NOT NULL,
    device_id         integer     NOT NULL,
    hour              timestamptz NOT NULL CHECK (extract(epoch FROM hour)::bigint % 3600 = 0),
    messages          bigint      NOT NULL DEFAULT 0 CHECK (messages >= 0),
    readings          bigint      NOT NULL DEFAULT 0 CHECK (readings >= 0),
    overage_messages  bigint      NOT NULL DEFAULT 0 CHECK (overage_messages >= 0),
    PRIMARY KEY (tenant_id, hour, device_id)
);

GRANT SELECT ON ingest_usage TO app_rw, readonly_audit;
GRANT SELECT, INSERT, UPDATE, DELETE ON ingest_usage TO platform_rw;

ALTER TABLE ingest_usage ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON ingest_usage TO app_rw
    USING (tenant_id = iiot_current_tenant()) WITH CHECK (tenant_id = iiot_current_tenant());
CREATE POLICY platform_access ON ingest_usage TO platform_rw USING (true) WITH CHECK (true);
CREATE POLICY audit_read ON ingest_usage FOR SELECT TO readonly_audit USING (true);
