-- Every reading is billed exactly once, however late it lands (docs/billing.md). Usage that
-- reaches ingest_usage for a local day whose billing usage is already stored (a batch retried
-- through a database outage keeps its receive time, a replayed dead letter lands in the hour it
-- came) marks that tenant-hour; the next invoice run of the tenant takes the marks: a day of an
-- open period is computed again, a day of a final period is billed as a late-usage line on the
-- open invoice (billing_late_usage) with a billing event naming the day and the counts.

-- Tenant-hours whose usage changed after their local day was computed, waiting for billing.
CREATE TABLE billing_late_hours (
    tenant_id  integer     NOT NULL,
    hour       timestamptz NOT NULL,
    marked_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, hour)
);

-- Usage of a final period's day that its invoice did not hold, billed once on an open invoice:
-- the difference between the day computed again and what was billed (its snapshot and the late
-- rows before this one).
CREATE TABLE billing_late_usage (
    late_id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id        integer       NOT NULL REFERENCES tenants,
    day              date          NOT NULL,
    source_period    date          NOT NULL,
    period           date          NOT NULL,
    plan_id          text          NOT NULL REFERENCES plans,
    messages         bigint        NOT NULL,
    readings         bigint        NOT NULL,
    overage_messages bigint        NOT NULL,
    unit_price       numeric(14,6) NOT NULL,
    amount           numeric(14,2) NOT NULL,
    recorded_at      timestamptz   NOT NULL DEFAULT now(),
    CHECK (period > source_period)
);
CREATE INDEX billing_late_usage_period ON billing_late_usage (tenant_id, period);
CREATE INDEX billing_late_usage_day ON billing_late_usage (tenant_id, day);
CREATE TRIGGER billing_late_usage_append_only BEFORE UPDATE OR DELETE ON billing_late_usage
    FOR EACH ROW EXECUTE FUNCTION iiot_billing_append_only();

ALTER TABLE billing_events DROP CONSTRAINT billing_events_kind_check;
ALTER TABLE billing_events ADD CONSTRAINT billing_events_kind_check
    CHECK (kind IN ('draft_computed', 'invoice_finalised', 'plan_changed', 'adjustment_added',
                    'quota_blocked', 'quota_warning', 'late_usage'));

-- Mark the tenant-hours of a statement on ingest_usage whose local day (the day the hour starts
-- in, billing's rule) has ended and is stored in billing_daily_usage. The shared advisory lock
-- per tenant (billing takes it exclusively while it computes and stores) closes the race with a
-- billing run: either the run sees these rows, or this statement sees the run's day and marks it.
-- Rows of hours whose day has not ended (the daemon's usual batches) cost one join to tenants.
CREATE FUNCTION iiot_billing_mark_late_hours() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('iiot.billing'), e.tenant_id)
       FROM (SELECT DISTINCT n.tenant_id
               FROM new_rows n JOIN tenants t ON t.tenant_id = n.tenant_id
              WHERE (n.hour AT TIME ZONE t.timezone)::date < (now() AT TIME ZONE t.timezone)::date
              ORDER BY n.tenant_id) e;
    IF FOUND THEN
        INSERT INTO billing_late_hours (tenant_id, hour)
        SELECT DISTINCT n.tenant_id, n.hour
          FROM new_rows n JOIN tenants t ON t.tenant_id = n.tenant_id
         WHERE (n.hour AT TIME ZONE t.timezone)::date < (now() AT TIME ZONE t.timezone)::date
           AND EXISTS (SELECT FROM billing_daily_usage b
                        WHERE b.tenant_id = n.tenant_id
                          AND b.day = (n.hour AT TIME ZONE t.timezone)::date)
        ON CONFLICT (tenant_id, hour) DO NOTHING;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER ingest_usage_billing_late_insert AFTER INSERT ON ingest_usage
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION iiot_billing_mark_late_hours();
CREATE TRIGGER ingest_usage_billing_late_update AFTER UPDATE ON ingest_usage
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION iiot_billing_mark_late_hours();

GRANT SELECT ON billing_late_usage TO app_rw, readonly_audit;
GRANT SELECT ON billing_late_hours TO readonly_audit;
GRANT SELECT, INSERT ON billing_late_usage TO platform_rw;
GRANT SELECT, INSERT, DELETE ON billing_late_hours TO platform_rw;

ALTER TABLE billing_late_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing_late_hours ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON billing_late_usage FOR SELECT TO app_rw
    USING (tenant_id = iiot_current_tenant());
CREATE POLICY platform_access ON billing_late_usage TO platform_rw USING (true) WITH CHECK (true);
CREATE POLICY platform_access ON billing_late_hours TO platform_rw USING (true) WITH CHECK (true);
CREATE POLICY audit_read ON billing_late_usage FOR SELECT TO readonly_audit USING (true);
CREATE POLICY audit_read ON billing_late_hours FOR SELECT TO readonly_audit USING (true);
