-- Billing events are labelled with the tenant's billing period, whatever their kind
-- (docs/billing.md): the triggers of migration 0012 labelled plan changes and quota blocks with
-- the calendar month, so with a billing cycle day of 15 the trail of a period missed the plan
-- change of its first days. Events recorded before this migration keep their label (the trail
-- is append-only).

-- The label of the period holding a local day: its cycle day's month, or the month before.
-- billing.period_containing in Python is the same rule.
CREATE FUNCTION iiot_billing_period(local_day date, cycle_day integer) RETURNS date
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN date_trunc('month', local_day - (cycle_day - 1))::date;

-- The label of the period holding an instant for a tenant (its time zone and cycle day).
CREATE FUNCTION iiot_billing_period_at(tenant integer, at timestamptz) RETURNS date
    LANGUAGE sql STABLE
    RETURN (SELECT iiot_billing_period((at AT TIME ZONE t.timezone)::date, t.billing_cycle_day)
              FROM tenants t WHERE t.tenant_id = tenant);

CREATE OR REPLACE FUNCTION iiot_billing_plan_event() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    INSERT INTO billing_events (occurred_at, tenant_id, period, kind, actor, detail)
    VALUES (NEW.valid_from, NEW.tenant_id, iiot_billing_period_at(NEW.tenant_id, NEW.valid_from),
            'plan_changed', NEW.changed_by,
            jsonb_build_object('plan', NEW.plan_id, 'previous_plan', (
                SELECT h.plan_id FROM tenant_plan_history h
                 WHERE h.tenant_id = NEW.tenant_id AND h.valid_to = NEW.valid_from LIMIT 1)));
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION iiot_billing_quota_event() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF NEW.action LIKE 'quota.%' AND NEW.tenant_id IS NOT NULL THEN
        INSERT INTO billing_events (occurred_at, tenant_id, period, kind, actor, detail)
        VALUES (NEW.occurred_at, NEW.tenant_id,
                iiot_billing_period_at(NEW.tenant_id, NEW.occurred_at), 'quota_blocked',
                NEW.actor,
                NEW.detail || jsonb_build_object('action', NEW.action, 'entity', NEW.entity,
                                                 'entity_id', NEW.entity_id));
    END IF;
    RETURN NEW;
END
$$;
