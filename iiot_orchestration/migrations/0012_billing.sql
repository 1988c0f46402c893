-- Billing: daily usage per tenant-local day, monthly invoices with their lines, adjustments and
-- the append-only billing event trail (docs/billing.md). Money is numeric, never float.

-- What a tenant used on one local day, computed nightly from ingest_usage, dead_letters, the
-- rollups and the marts. Invoices are computed from these rows only, so an invoice can be
-- recomputed and compared with itself.
CREATE TABLE billing_daily_usage (
    tenant_id            integer     NOT NULL REFERENCES tenants,
    day                  date        NOT NULL,
    plan_id              text        NOT NULL REFERENCES plans,
    messages             bigint      NOT NULL CHECK (messages >= 0),
    readings             bigint      NOT NULL CHECK (readings >= 0),
    overage_messages     bigint      NOT NULL CHECK (overage_messages >= 0),
    dead_letters         jsonb       NOT NULL DEFAULT '{}',
    rate_limited         bigint      NOT NULL CHECK (rate_limited >= 0),
    active_devices       integer     NOT NULL CHECK (active_devices >= 0),
    provisioned_devices  integer     NOT NULL CHECK (provisioned_devices >= 0),
    stored_readings      bigint      NOT NULL CHECK (stored_readings >= 0),
    bytes_per_reading    numeric(10,2) NOT NULL CHECK (bytes_per_reading > 0),
    storage_bytes        bigint      NOT NULL CHECK (storage_bytes >= 0),
    consumption          jsonb       NOT NULL DEFAULT '{}',
    computed_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, day)
);
COMMENT ON COLUMN billing_daily_usage.plan_id IS
    'The plan in effect at the end of the local day: the day of a change bills the new plan.';
COMMENT ON COLUMN billing_daily_usage.consumption IS 'Consumption per unit, e.g. {"kWh": 12.5}.';

CREATE TABLE invoices (
    invoice_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id     integer       NOT NULL REFERENCES tenants,
    period        date          NOT NULL,
    period_start  date          NOT NULL,
    period_end    date          NOT NULL,
    status        text          NOT NULL CHECK (status IN ('draft', 'final')),
    currency      char(3)       NOT NULL,
    total         numeric(14,2) NOT NULL,
    inputs_sha256 text          NOT NULL,
    days_billed   integer       NOT NULL CHECK (days_billed >= 0),
    computed_at   timestamptz   NOT NULL DEFAULT now(),
    finalised_at  timestamptz,
    UNIQUE (tenant_id, period),
    CHECK (period_end > period_start),
    CHECK ((status = 'final') = (finalised_at IS NOT NULL))
);
COMMENT ON COLUMN invoices.period IS 'The month label of the billing cycle (its first month).';

CREATE TABLE invoice_lines (
    invoice_id  bigint        NOT NULL REFERENCES invoices ON DELETE CASCADE,
    line_no     integer       NOT NULL CHECK (line_no > 0),
    tenant_id   integer       NOT NULL,
    kind        text          NOT NULL CHECK (kind IN ('base', 'overage_devices', 'overage_messages',
                                                       'overage_storage', 'tax', 'adjustment')),
    description text          NOT NULL,
    quantity    numeric(20,6) NOT NULL,
    unit        text          NOT NULL,
    unit_price  numeric(14,6) NOT NULL,
    amount      numeric(14,2) NOT NULL,
    reason      text,
    PRIMARY KEY (invoice_id, line_no),
    CHECK (amount >= 0 OR reason IS NOT NULL)
);

-- Corrections to any period, final or not: explicit credit (negative) or debit lines with a reason.
CREATE TABLE billing_adjustments (
    adjustment_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id     integer       NOT NULL REFERENCES tenants,
    period        date          NOT NULL,
    amount        numeric(14,2) NOT NULL CHECK (amount <> 0),
    reason        text          NOT NULL CHECK (length(reason) BETWEEN 3 AND 500),
    actor         text          NOT NULL,
    created_at    timestamptz   NOT NULL DEFAULT now()
);

CREATE TABLE billing_events (
    event_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at   timestamptz   NOT NULL DEFAULT clock_timestamp(),
    tenant_id     integer       NOT NULL,
    period        date,
    kind          text          NOT NULL CHECK (kind IN ('draft_computed', 'invoice_finalised',
                                                         'plan_changed', 'adjustment_added',
                                                         'quota_blocked', 'quota_warning')),
    actor         text          NOT NULL,
    before_amount numeric(14,2),
    after_amount  numeric(14,2),
    detail        jsonb         NOT NULL DEFAULT '{}'
);
CREATE INDEX billing_events_tenant_period ON billing_events (tenant_id, period, occurred_at);

-- Starter and pro tenants over their storage quota may not add devices (docs/billing.md).
ALTER TABLE tenants ADD COLUMN storage_blocked_at timestamptz;

-- A final invoice and its lines never change; billing_events and billing_adjustments are
-- append-only.
CREATE FUNCTION iiot_final_invoice_is_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'final' THEN
        RAISE EXCEPTION 'invoice % of % is final: add an adjustment instead', OLD.invoice_id,
            OLD.period USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
END
$$;
CREATE TRIGGER invoices_final_immutable BEFORE UPDATE OR DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION iiot_final_invoice_is_immutable();

CREATE FUNCTION iiot_final_invoice_lines_are_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM invoices WHERE invoice_id = OLD.invoice_id AND status = 'final') THEN
        RAISE EXCEPTION 'the lines of final invoice % never change', OLD.invoice_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
END
$$;
CREATE TRIGGER invoice_lines_final_immutable BEFORE UPDATE OR DELETE ON invoice_lines
    FOR EACH ROW EXECUTE FUNCTION iiot_final_invoice_lines_are_immutable();

CREATE FUNCTION iiot_billing_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER billing_events_append_only BEFORE UPDATE OR DELETE ON billing_events
    FOR EACH ROW EXECUTE FUNCTION iiot_billing_append_only();
CREATE TRIGGER billing_adjustments_append_only BEFORE UPDATE OR DELETE ON billing_adjustments
    FOR EACH ROW EXECUTE FUNCTION iiot_billing_append_only();

-- Plan changes and quota blocks reach the billing trail however they were made.
-- SECURITY DEFINER: whoever may change a plan or be refused a device records the event, though
-- only platform_rw may write billing_events directly.
CREATE FUNCTION iiot_billing_plan_event() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    INSERT INTO billing_events (occurred_at, tenant_id, period, kind, actor, detail)
    SELECT NEW.valid_from, NEW.tenant_id, date_trunc('month', NEW.valid_from AT TIME ZONE t.timezone)::date,
           'plan_changed', NEW.changed_by,
           jsonb_build_object('plan', NEW.plan_id, 'previous_plan', (
               SELECT h.plan_id FROM tenant_plan_history h
                WHERE h.tenant_id = NEW.tenant_id AND h.valid_to = NEW.valid_from LIMIT 1))
      FROM tenants t WHERE t.tenant_id = NEW.tenant_id;
    RETURN NEW;
END
$$;
CREATE TRIGGER tenant_plan_history_billing_event AFTER INSERT ON tenant_plan_history
    FOR EACH ROW EXECUTE FUNCTION iiot_billing_plan_event();

CREATE FUNCTION iiot_billing_quota_event() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF NEW.action LIKE 'quota.%' AND NEW.tenant_id IS NOT NULL THEN
        INSERT INTO billing_events (occurred_at, tenant_id, period, kind, actor, detail)
        SELECT NEW.occurred_at, NEW.tenant_id,
               date_trunc('month', NEW.occurred_at AT TIME ZONE t.timezone)::date,
               'quota_blocked', NEW.actor,
               NEW.detail || jsonb_build_object('action', NEW.action, 'entity', NEW.entity,
                                                'entity_id', NEW.entity_id)
          FROM tenants t WHERE t.tenant_id = NEW.tenant_id;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_log_billing_quota_event AFTER INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION iiot_billing_quota_event();

-- Privileges and row security, as for every tenant-owned table (docs/security.md).
GRANT SELECT ON billing_daily_usage, invoices, invoice_lines, billing_adjustments, billing_events
    TO app_rw, readonly_audit;
GRANT SELECT, INSERT, UPDATE, DELETE ON billing_daily_usage, invoices, invoice_lines
    TO platform_rw;
GRANT SELECT, INSERT ON billing_adjustments, billing_events TO platform_rw;

ALTER TABLE billing_daily_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE invoices ENABLE ROW LEVEL SECURITY;
ALTER TABLE invoice_lines ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing_adjustments ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing_events ENABLE ROW LEVEL SECURITY;

CREATE POLICY tenant_isolation ON billing_daily_usage FOR SELECT TO app_rw
    USING (tenant_id = iiot_current_tenant());
CREATE POLICY tenant_isolation ON invoices FOR SELECT TO app_rw
    USING (tenant_id = iiot_current_tenant());
CREATE POLICY tenant_isolation ON invoice_lines FOR SELECT TO app_rw
    USING (tenant_id = iiot_current_tenant());
CREATE POLICY tenant_isolation ON billing_adjustments FOR SELECT TO app_rw
    USING (tenant_id = iiot_current_tenant());
CREATE POLICY tenant_isolation ON billing_events FOR SELECT TO app_rw
    USING (tenant_id = iiot_current_tenant());

CREATE POLICY platform_access ON billing_daily_usage TO platform_rw USING (true) WITH CHECK (true);
CREATE POLICY platform_access ON invoices TO platform_rw USING (true) WITH CHECK (true);
CREATE POLICY platform_access ON invoice_lines TO platform_rw USING (true) WITH CHECK (true);
CREATE POLICY platform_access ON billing_adjustments TO platform_rw USING (true) WITH CHECK (true);
CREATE POLICY platform_access ON billing_events TO platform_rw USING (true) WITH CHECK (true);

CREATE POLICY audit_read ON billing_daily_usage FOR SELECT TO readonly_audit USING (true);
CREATE POLICY audit_read ON invoices FOR SELECT TO readonly_audit USING (true);
CREATE POLICY audit_read ON invoice_lines FOR SELECT TO readonly_audit USING (true);
CREATE POLICY audit_read ON billing_adjustments FOR SELECT TO readonly_audit USING (true);
CREATE POLICY audit_read ON billing_events FOR SELECT TO readonly_audit USING (true);
