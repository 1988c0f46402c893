-- Alerts: threshold rules on telemetry (data, per tenant, device or metric), the alerts they and
-- the operational sensors open and resolve, and the delivery log used for deduplication
-- (docs/alerts.md).
CREATE TABLE alert_rules (
    rule_id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       integer     NOT NULL REFERENCES tenants,
    device_id       integer     REFERENCES devices,
    metric          text        REFERENCES metric_catalog,
    name            text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    kind            text        NOT NULL CHECK (kind IN ('above', 'below', 'rate_of_change',
                                                         'no_data')),
    threshold       double precision,
    window_minutes  integer     NOT NULL DEFAULT 60 CHECK (window_minutes BETWEEN 1 AND 10080),
    severity        text        NOT NULL CHECK (severity IN ('INFO', 'WARNING', 'CRITICAL')),
    enabled         boolean     NOT NULL DEFAULT true,
    created_by      text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'no_data') = (threshold IS NULL)),
    CHECK (kind = 'no_data' OR metric IS NOT NULL)
);
CREATE INDEX alert_rules_tenant ON alert_rules (tenant_id);

CREATE TABLE alerts (
    alert_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    integer,
    rule_id      bigint      REFERENCES alert_rules ON DELETE SET NULL,
    device_id    integer,
    source       text        NOT NULL CHECK (source ~ '^[a-z][a-z0-9_]{1,40}$'),
    alert_key    text        NOT NULL,
    severity     text        NOT NULL CHECK (severity IN ('INFO', 'WARNING', 'CRITICAL')),
    state        text        NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'resolved')),
    title        text        NOT NULL,
    detail       jsonb       NOT NULL DEFAULT '{}',
    opened_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz,
    CHECK ((state = 'resolved') = (resolved_at IS NOT NULL))
);
-- at most one open alert per key: a condition that persists updates it, it never duplicates
CREATE UNIQUE INDEX alerts_one_open_per_key ON alerts (alert_key) WHERE state = 'open';
CREATE INDEX alerts_tenant_opened ON alerts (tenant_id, opened_at);

CREATE TABLE alert_deliveries (
    delivery_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_key    text        NOT NULL,
    channel      text        NOT NULL CHECK (channel IN ('webhook', 'telegram', 'log')),
    status       text        NOT NULL CHECK (status IN ('sent', 'failed', 'suppressed')),
    attempts     integer     NOT NULL CHECK (attempts >= 0),
    error        text,
    sent_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alert_deliveries_key_sent ON alert_deliveries (alert_key, sent_at);

GRANT SELECT ON alert_rules, alerts TO app_rw;
GRANT SELECT ON alert_rules, alerts, alert_deliveries TO readonly_audit;
GRANT SELECT, INSERT, UPDATE, DELETE ON alert_rules, alerts, alert_deliveries TO platform_rw;

ALTER TABLE alert_rules ENABLE ROW LEVEL SECURITY;
ALTER TABLE alerts ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON alert_rules FOR SELECT TO app_rw
    USING (tenant_id = iiot_current_tenant());
CREATE POLICY tenant_isolation ON alerts FOR SELECT TO app_rw
    USING (tenant_id = iiot_current_tenant());
CREATE POLICY platform_access ON alert_rules TO platform_rw USING (true) WITH CHECK (true);
CREATE POLICY platform_access ON alerts TO platform_rw USING (true) WITH CHECK (true);
CREATE POLICY audit_read ON alert_rules FOR SELECT TO readonly_audit USING (true);
CREATE POLICY audit_read ON alerts FOR SELECT TO readonly_audit USING (true);
