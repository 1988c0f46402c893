-- The daily usage of a period with a final invoice is as immutable as the invoice
-- (docs/billing.md): an insert, update or delete of such a day (a UI backfill, a hand-made
-- correction) is refused, so a final invoice always recomputes to its stored total. A
-- correction is an adjustment to the open period (iiot billing adjust).
CREATE FUNCTION iiot_final_usage_is_immutable() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    tenant_ids integer[] := '{}';
    days date[] := '{}';
    hit record;
BEGIN
    -- the transition tables a statement has: new rows (INSERT, UPDATE), old rows (UPDATE, DELETE)
    IF TG_OP <> 'DELETE' THEN
        SELECT tenant_ids || array_agg(tenant_id), days || array_agg(day)
          INTO tenant_ids, days FROM new_rows;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        SELECT tenant_ids || array_agg(tenant_id), days || array_agg(day)
          INTO tenant_ids, days FROM old_rows;
    END IF;
    SELECT t.slug, r.day, i.period INTO hit
      FROM unnest(tenant_ids, days) AS r (tenant_id, day)
      JOIN invoices i ON i.tenant_id = r.tenant_id AND i.status = 'final'
       AND r.day >= i.period_start AND r.day < i.period_end
      JOIN tenants t ON t.tenant_id = r.tenant_id
     ORDER BY r.day
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'the usage of % on % belongs to its final invoice % and never changes',
            hit.slug, hit.day, to_char(hit.period, 'YYYY-MM')
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'to correct it, add an adjustment to the open period '
                         '(iiot billing adjust), naming the corrected period in the reason';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER billing_daily_usage_final_insert AFTER INSERT ON billing_daily_usage
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION iiot_final_usage_is_immutable();
CREATE TRIGGER billing_daily_usage_final_update AFTER UPDATE ON billing_daily_usage
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION iiot_final_usage_is_immutable();
CREATE TRIGGER billing_daily_usage_final_delete AFTER DELETE ON billing_daily_usage
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION iiot_final_usage_is_immutable();
