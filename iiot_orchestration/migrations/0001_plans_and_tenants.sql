-- Plans catalog, tenants and the plan history used for proration.
CREATE TABLE plans (
    plan_id                        text PRIMARY KEY CHECK (plan_id ~ '^[a-z][a-z0-9_]{1,30}$'),
    name                           text          NOT NULL,
    included_devices               integer       NOT NULL CHECK (included_devices >= 0),
    messages_per_minute_per_device integer       NOT NULL CHECK (messages_per_minute_per_device > 0),
    storage_bytes                  bigint        NOT NULL CHECK (storage_bytes > 0),
    retention_days                 integer       NOT NULL CHECK (retention_days > 0),
    monthly_price                  numeric(12,2) NOT NULL CHECK (monthly_price >= 0),
    overage_device_price           numeric(12,4) CHECK (overage_device_price >= 0),
    overage_price_per_1k_messages  numeric(12,4) CHECK (overage_price_per_1k_messages >= 0),
    overage_storage_price_per_gib  numeric(12,4) CHECK (overage_storage_price_per_gib >= 0),
    hard_block                     boolean       NOT NULL,
    currency                       char(3)       NOT NULL DEFAULT 'BRL',
    -- a plan that bills overage must price every kind of overage
    CHECK (hard_block OR (overage_device_price IS NOT NULL
                          AND overage_price_per_1k_messages IS NOT NULL
                          AND overage_storage_price_per_gib IS NOT NULL))
);

INSERT INTO plans VALUES
    ('starter', 'Starter', 10, 6, 1073741824, 30, 99.00, NULL, NULL, NULL, true, 'BRL'),
    ('pro', 'Pro', 100, 60, 21474836480, 180, 790.00, NULL, NULL, NULL, true, 'BRL'),
    ('enterprise', 'Enterprise', 1000, 600, 536870912000, 730, 4900.00,
     4.9000, 0.0500, 0.9000, false, 'BRL');

CREATE TABLE tenants (
    tenant_id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slug               text        NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{1,62}$'),
    name               text        NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    plan_id            text        NOT NULL REFERENCES plans,
    timezone           text        NOT NULL DEFAULT 'America/Sao_Paulo',
    locale             text        NOT NULL DEFAULT 'pt_BR' CHECK (locale IN ('pt_BR', 'en')),
    retention_days     integer     CHECK (retention_days > 0),
    billing_cycle_day  smallint    NOT NULL DEFAULT 1 CHECK (billing_cycle_day BETWEEN 1 AND 28),
    status             text        NOT NULL DEFAULT 'active'
                                   CHECK (status IN ('active', 'suspended')),
    created_at         timestamptz NOT NULL DEFAULT now()
);
COMMENT ON COLUMN tenants.retention_days IS 'Per-tenant override; NULL means the plan''s retention.';

CREATE TABLE tenant_plan_history (
    history_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   integer     NOT NULL REFERENCES tenants,
    plan_id     text        NOT NULL REFERENCES plans,
    valid_from  timestamptz NOT NULL,
    valid_to    timestamptz,
    changed_by  text        NOT NULL,
    UNIQUE (tenant_id, valid_from),
    CHECK (valid_to IS NULL OR valid_to > valid_from)
);
CREATE UNIQUE INDEX tenant_plan_history_one_open ON tenant_plan_history (tenant_id)
    WHERE valid_to IS NULL;

-- The history is written by the database itself so that it can never disagree with tenants.plan_id.
CREATE FUNCTION iiot_record_plan_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    actor text := coalesce(nullif(current_setting('iiot.actor', true), ''), session_user);
    changed_at timestamptz := clock_timestamp();
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.plan_id IS NOT DISTINCT FROM OLD.plan_id THEN
            RETURN NEW;
        END IF;
        UPDATE tenant_plan_history SET valid_to = changed_at
         WHERE tenant_id = NEW.tenant_id AND valid_to IS NULL;
    END IF;
    INSERT INTO tenant_plan_history (tenant_id, plan_id, valid_from, changed_by)
    VALUES (NEW.tenant_id, NEW.plan_id, changed_at, actor);
    RETURN NEW;
END
$$;

CREATE TRIGGER tenants_plan_history
    AFTER INSERT OR UPDATE OF plan_id ON tenants
    FOR EACH ROW EXECUTE FUNCTION iiot_record_plan_change();
