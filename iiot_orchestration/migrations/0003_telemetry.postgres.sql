-- Raw telemetry in native daily range partitions (UTC days), created ahead of time.
-- The primary key makes a re-delivered reading a no-op (INSERT ... ON CONFLICT DO NOTHING).
CREATE TABLE telemetry (
    tenant_id    integer          NOT NULL,
    device_id    integer          NOT NULL,
    metric       text             NOT NULL,
    ts           timestamptz      NOT NULL,
    value        double precision NOT NULL,
    received_at  timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, metric, ts)
) PARTITION BY RANGE (ts);

-- SECURITY DEFINER so that the application roles can add partitions without holding DDL rights.
CREATE FUNCTION iiot_ensure_telemetry_partitions(p_from date, p_to date) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    day date;
    created integer := 0;
    partition_name text;
BEGIN
    IF p_to < p_from THEN
        RAISE EXCEPTION 'partition range ends (%) before it starts (%)', p_to, p_from;
    END IF;
    IF p_to - p_from > 3660 THEN
        RAISE EXCEPTION 'refusing to create % partitions at once (limit 3661)', p_to - p_from + 1;
    END IF;
    -- one creator at a time: concurrent callers would race on the same names
    PERFORM pg_advisory_xact_lock(hashtext('iiot_telemetry_partitions'));
    FOR day IN SELECT generate_series(p_from, p_to, interval '1 day')::date LOOP
        partition_name := format('telemetry_p%s', to_char(day, 'YYYYMMDD'));
        IF to_regclass(partition_name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF telemetry FOR VALUES FROM (%L) TO (%L)',
                partition_name,
                (day::timestamp AT TIME ZONE 'UTC'),
                ((day + 1)::timestamp AT TIME ZONE 'UTC'));
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END
$$;

CREATE VIEW telemetry_partitions AS
SELECT child.relname AS partition_name,
       pg_get_expr(child.relpartbound, child.oid) AS bounds,
       to_date(substring(child.relname FROM 'telemetry_p(\d{8})'), 'YYYYMMDD') AS day
  FROM pg_inherits i
  JOIN pg_class parent ON parent.oid = i.inhparent
  JOIN pg_class child ON child.oid = i.inhrelid
 WHERE parent.relname = 'telemetry';

SELECT iiot_ensure_telemetry_partitions((now() AT TIME ZONE 'UTC')::date - 1,
                                        (now() AT TIME ZONE 'UTC')::date + 7);
