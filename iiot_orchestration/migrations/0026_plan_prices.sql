-- Versioned prices (docs/billing.md): every priced field of a plan has a history, and a tenant's
-- local day is billed at the prices valid on it. A change is scheduled for a day to come
-- (iiot billing schedule-price, audited), so the open period is prorated between the old and the
-- new prices by day and a closed invoice keeps recomputing to its stored total. The price
-- columns of plans stay as they were; billing reads plan_prices.
CREATE TABLE plan_prices (
    plan_id                        text          NOT NULL REFERENCES plans,
    valid_from                     date          NOT NULL,  -- first local day billed at these
    monthly_price                  numeric(12,2) NOT NULL CHECK (monthly_price >= 0),
    overage_device_price           numeric(12,4) CHECK (overage_device_price >= 0),
    overage_price_per_1k_messages  numeric(12,4) CHECK (overage_price_per_1k_messages >= 0),
    overage_storage_price_per_gib  numeric(12,4) CHECK (overage_storage_price_per_gib >= 0),
    scheduled_by                   text          NOT NULL,
    scheduled_at                   timestamptz   NOT NULL DEFAULT now(),
    PRIMARY KEY (plan_id, valid_from)
);
INSERT INTO plan_prices (plan_id, valid_from, monthly_price, overage_device_price,
                         overage_price_per_1k_messages, overage_storage_price_per_gib,
                         scheduled_by)
SELECT plan_id, date '0001-01-01', monthly_price, overage_device_price,
       overage_price_per_1k_messages, overage_storage_price_per_gib, 'migration 0026'
  FROM plans;  -- the prices so far, valid since always (a date Python can read)

CREATE TRIGGER plan_prices_append_only BEFORE UPDATE OR DELETE ON plan_prices
    FOR EACH ROW EXECUTE FUNCTION iiot_billing_append_only();

-- A price may not change a day of a final invoice, nor overage prices appear on a plan that
-- bills no overage (or go missing on one that does).
CREATE FUNCTION iiot_plan_price_is_valid() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    blocks boolean := (SELECT hard_block FROM plans WHERE plan_id = NEW.plan_id);
    hit record;
BEGIN
    IF blocks <> (NEW.overage_device_price IS NULL)
       OR blocks <> (NEW.overage_price_per_1k_messages IS NULL)
       OR blocks <> (NEW.overage_storage_price_per_gib IS NULL) THEN
        RAISE EXCEPTION 'plan % % overage prices', NEW.plan_id,
            CASE WHEN blocks THEN 'bills no overage: it takes no' ELSE 'needs all three' END
            USING ERRCODE = 'check_violation';
    END IF;
    SELECT t.slug, i.period INTO hit
      FROM billing_daily_usage u
      JOIN invoices i ON i.tenant_id = u.tenant_id AND i.status = 'final'
       AND u.day >= i.period_start AND u.day < i.period_end
      JOIN tenants t ON t.tenant_id = u.tenant_id
     WHERE u.plan_id = NEW.plan_id AND u.day >= NEW.valid_from
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'a price of % from % would change the final invoice % of %', NEW.plan_id,
            NEW.valid_from, to_char(hit.period, 'YYYY-MM'), hit.slug
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'schedule price changes for days to come';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER plan_prices_valid BEFORE INSERT ON plan_prices
    FOR EACH ROW EXECUTE FUNCTION iiot_plan_price_is_valid();

-- Prices change through plan_prices only: an edit of the price columns of plans would bill the
-- new price nowhere, so it is refused.
CREATE FUNCTION iiot_plan_prices_are_versioned() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the prices of plan % are versioned: schedule a change with '
        'iiot billing schedule-price', OLD.plan_id USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER plans_prices_versioned
    BEFORE UPDATE OF monthly_price, overage_device_price, overage_price_per_1k_messages,
                     overage_storage_price_per_gib ON plans
    FOR EACH ROW
    WHEN (OLD.monthly_price IS DISTINCT FROM NEW.monthly_price
          OR OLD.overage_device_price IS DISTINCT FROM NEW.overage_device_price
          OR OLD.overage_price_per_1k_messages IS DISTINCT FROM NEW.overage_price_per_1k_messages
          OR OLD.overage_storage_price_per_gib IS DISTINCT FROM NEW.overage_storage_price_per_gib)
    EXECUTE FUNCTION iiot_plan_prices_are_versioned();

GRANT SELECT ON plan_prices TO app_rw, readonly_audit;
GRANT SELECT, INSERT ON plan_prices TO platform_rw;
