-- Quota notices before a block (docs/billing.md): at 80 % and 100 % of a plan's included
-- devices, messages and storage, a quota_notice billing event, once per tenant, period, quota
-- and threshold (the unique index), and an alert through the notifier.
ALTER TABLE billing_events DROP CONSTRAINT billing_events_kind_check;
ALTER TABLE billing_events ADD CONSTRAINT billing_events_kind_check
    CHECK (kind IN ('draft_computed', 'invoice_finalised', 'plan_changed', 'adjustment_added',
                    'quota_blocked', 'quota_warning', 'late_usage', 'quota_notice'));
CREATE UNIQUE INDEX billing_events_quota_notice_once
    ON billing_events (tenant_id, period, (detail ->> 'quota'), (detail ->> 'threshold'))
    WHERE kind = 'quota_notice';
