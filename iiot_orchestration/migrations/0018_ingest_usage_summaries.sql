-- Two summaries of ingest_usage that billing's nightly run reads instead of every device-hour
-- (docs/billing.md): a tenant's day is 24 rows of ingest_usage_tenant_hours instead of one row
-- per device and hour, and its active devices come from one row per device and UTC day.
-- Statement-level triggers keep them exact in the transaction that writes ingest_usage (the
-- daemon's batch, or any other writer), from the rows the statement inserted, updated or
-- deleted (transition tables).

-- Per tenant and UTC hour: the sums of the tenant's device rows of that hour.
CREATE TABLE ingest_usage_tenant_hours (
    hour              timestamptz NOT NULL CHECK (extract(epoch FROM hour)::bigint % 3600 = 0),
    tenant_id         integer     NOT NULL,
    -- no CHECK >= 0 here: a trigger's difference may pass through a negative value on its
    -- way into an existing row (ingest_usage itself keeps its checks)
    messages          bigint      NOT NULL DEFAULT 0,
    readings          bigint      NOT NULL DEFAULT 0,
    overage_messages  bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, tenant_id)
);

-- Per device and UTC day: bit h (0 to 23) of `hours` is set when the device's row for hour h of
-- that day counts messages. A local day is a set of whole UTC hours (ingest_usage's rule), so a
-- device was active in it exactly when a day it overlaps has one of its hours' bits set.
CREATE TABLE ingest_usage_device_days (
    day        date    NOT NULL,
    tenant_id  integer NOT NULL,
    device_id  integer NOT NULL,
    hours      integer NOT NULL CHECK (hours <> 0 AND hours < (1 << 24)),
    -- hours included: billing's night reads a day's rows from the index alone
    PRIMARY KEY (day, tenant_id, device_id) INCLUDE (hours)
);

GRANT SELECT ON ingest_usage_tenant_hours, ingest_usage_device_days TO app_rw, readonly_audit;
GRANT SELECT, INSERT, UPDATE, DELETE ON ingest_usage_tenant_hours, ingest_usage_device_days
    TO platform_rw;

ALTER TABLE ingest_usage_tenant_hours ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON ingest_usage_tenant_hours TO app_rw
    USING (tenant_id = iiot_current_tenant()) WITH CHECK (tenant_id = iiot_current_tenant());
CREATE POLICY platform_access ON ingest_usage_tenant_hours TO platform_rw
    USING (true) WITH CHECK (true);
CREATE POLICY audit_read ON ingest_usage_tenant_hours FOR SELECT TO readonly_audit USING (true);

ALTER TABLE ingest_usage_device_days ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON ingest_usage_device_days TO app_rw
    USING (tenant_id = iiot_current_tenant()) WITH CHECK (tenant_id = iiot_current_tenant());
CREATE POLICY platform_access ON ingest_usage_device_days TO platform_rw
    USING (true) WITH CHECK (true);
CREATE POLICY audit_read ON ingest_usage_device_days FOR SELECT TO readonly_audit USING (true);

-- The bit of an hour within its UTC day.
CREATE FUNCTION iiot_hour_bit(hour timestamptz) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN 1 << extract(hour FROM hour AT TIME ZONE 'UTC')::integer;

-- INSERT (also the inserted rows of INSERT ... ON CONFLICT DO UPDATE): add the rows.
CREATE FUNCTION iiot_usage_summaries_insert() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    INSERT INTO ingest_usage_tenant_hours AS t
           (hour, tenant_id, messages, readings, overage_messages)
    SELECT hour, tenant_id, sum(messages), sum(readings), sum(overage_messages)
      FROM new_rows GROUP BY hour, tenant_id
    ON CONFLICT (hour, tenant_id) DO UPDATE
       SET messages = t.messages + excluded.messages,
           readings = t.readings + excluded.readings,
           overage_messages = t.overage_messages + excluded.overage_messages;
    INSERT INTO ingest_usage_device_days AS d (day, tenant_id, device_id, hours)
    SELECT (hour AT TIME ZONE 'UTC')::date, tenant_id, device_id, bit_or(iiot_hour_bit(hour))
      FROM new_rows WHERE messages > 0
     GROUP BY 1, 2, 3
    ON CONFLICT (day, tenant_id, device_id) DO UPDATE SET hours = d.hours | excluded.hours;
    RETURN NULL;
END $$;

-- Recompute the bits of some device-days from ingest_usage itself (rows whose messages went).
CREATE FUNCTION iiot_usage_device_days_recompute(keys jsonb) RETURNS void
    LANGUAGE sql SECURITY DEFINER SET search_path = public, pg_temp
BEGIN ATOMIC
    DELETE FROM ingest_usage_device_days d
     USING jsonb_to_recordset(keys) AS k (day date, tenant_id integer, device_id integer)
     WHERE d.day = k.day AND d.tenant_id = k.tenant_id AND d.device_id = k.device_id;
    INSERT INTO ingest_usage_device_days (day, tenant_id, device_id, hours)
    SELECT k.day, k.tenant_id, k.device_id, bit_or(iiot_hour_bit(u.hour))
      FROM (SELECT DISTINCT day, tenant_id, device_id
              FROM jsonb_to_recordset(keys) AS r (day date, tenant_id integer, device_id integer)
           ) k
      JOIN ingest_usage u
        ON u.tenant_id = k.tenant_id AND u.device_id = k.device_id AND u.messages > 0
       AND u.hour >= k.day::timestamp AT TIME ZONE 'UTC'
       AND u.hour < (k.day + 1)::timestamp AT TIME ZONE 'UTC'
     GROUP BY 1, 2, 3;
END;

-- UPDATE (also the updated rows of INSERT ... ON CONFLICT DO UPDATE): move the sums by the
-- difference, set the bits of the rows that count messages, recompute the device-days of rows
-- that no longer do (a row moved to another key, or its messages went to zero) and drop the
-- (hour, tenant) sums a move left without rows. The daemon's increments only take the first
-- two steps.
CREATE FUNCTION iiot_usage_summaries_update() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    lost jsonb;
BEGIN
    INSERT INTO ingest_usage_tenant_hours AS t
           (hour, tenant_id, messages, readings, overage_messages)
    SELECT hour, tenant_id, sum(messages), sum(readings), sum(overage_messages)
      FROM (SELECT hour, tenant_id, messages, readings, overage_messages FROM new_rows
             UNION ALL
            SELECT hour, tenant_id, -messages, -readings, -overage_messages FROM old_rows) d
     GROUP BY hour, tenant_id
    ON CONFLICT (hour, tenant_id) DO UPDATE
       SET messages = t.messages + excluded.messages,
           readings = t.readings + excluded.readings,
           overage_messages = t.overage_messages + excluded.overage_messages;
    INSERT INTO ingest_usage_device_days AS d (day, tenant_id, device_id, hours)
    SELECT (hour AT TIME ZONE 'UTC')::date, tenant_id, device_id, bit_or(iiot_hour_bit(hour))
      FROM new_rows WHERE messages > 0
     GROUP BY 1, 2, 3
    ON CONFLICT (day, tenant_id, device_id) DO UPDATE SET hours = d.hours | excluded.hours;
    SELECT jsonb_agg(jsonb_build_object('day', (o.hour AT TIME ZONE 'UTC')::date,
                                        'tenant_id', o.tenant_id, 'device_id', o.device_id))
      INTO lost
      FROM old_rows o
     WHERE o.messages > 0
       AND NOT EXISTS (SELECT FROM new_rows n
                        WHERE n.tenant_id = o.tenant_id AND n.device_id = o.device_id
                          AND n.hour = o.hour AND n.messages > 0);
    IF lost IS NOT NULL THEN
        PERFORM iiot_usage_device_days_recompute(lost);
    END IF;
    -- a row moved to another hour or tenant may leave its old (hour, tenant) with no rows
    IF EXISTS (SELECT FROM old_rows o
                WHERE NOT EXISTS (SELECT FROM new_rows n
                                   WHERE n.hour = o.hour AND n.tenant_id = o.tenant_id)) THEN
        DELETE FROM ingest_usage_tenant_hours t
         WHERE (t.hour, t.tenant_id) IN (SELECT hour, tenant_id FROM old_rows)
           AND NOT EXISTS (SELECT FROM ingest_usage u
                            WHERE u.hour = t.hour AND u.tenant_id = t.tenant_id);
    END IF;
    RETURN NULL;
END $$;

-- DELETE: take the rows' sums away and recompute their device-days.
CREATE FUNCTION iiot_usage_summaries_delete() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    lost jsonb;
BEGIN
    INSERT INTO ingest_usage_tenant_hours AS t
           (hour, tenant_id, messages, readings, overage_messages)
    SELECT hour, tenant_id, -sum(messages), -sum(readings), -sum(overage_messages)
      FROM old_rows GROUP BY hour, tenant_id
    ON CONFLICT (hour, tenant_id) DO UPDATE
       SET messages = t.messages + excluded.messages,
           readings = t.readings + excluded.readings,
           overage_messages = t.overage_messages + excluded.overage_messages;
    DELETE FROM ingest_usage_tenant_hours t
     WHERE (t.hour, t.tenant_id) IN (SELECT hour, tenant_id FROM old_rows)
       AND NOT EXISTS (SELECT FROM ingest_usage u
                        WHERE u.hour = t.hour AND u.tenant_id = t.tenant_id);
    SELECT jsonb_agg(DISTINCT jsonb_build_object('day', (o.hour AT TIME ZONE 'UTC')::date,
                                                 'tenant_id', o.tenant_id,
                                                 'device_id', o.device_id))
      INTO lost
      FROM old_rows o WHERE o.messages > 0;
    IF lost IS NOT NULL THEN
        PERFORM iiot_usage_device_days_recompute(lost);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER ingest_usage_summaries_insert AFTER INSERT ON ingest_usage
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION iiot_usage_summaries_insert();
CREATE TRIGGER ingest_usage_summaries_update AFTER UPDATE ON ingest_usage
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION iiot_usage_summaries_update();
CREATE TRIGGER ingest_usage_summaries_delete AFTER DELETE ON ingest_usage
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION iiot_usage_summaries_delete();

-- What ingest_usage already holds.
INSERT INTO ingest_usage_tenant_hours (hour, tenant_id, messages, readings, overage_messages)
SELECT hour, tenant_id, sum(messages), sum(readings), sum(overage_messages)
  FROM ingest_usage GROUP BY hour, tenant_id;
INSERT INTO ingest_usage_device_days (day, tenant_id, device_id, hours)
SELECT (hour AT TIME ZONE 'UTC')::date, tenant_id, device_id, bit_or(iiot_hour_bit(hour))
  FROM ingest_usage WHERE messages > 0
 GROUP BY 1, 2, 3;
