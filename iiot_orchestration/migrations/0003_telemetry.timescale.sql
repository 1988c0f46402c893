-- Raw telemetry as a TimescaleDB hypertable with 1-day chunks (chunks are created on insert).
-- The primary key makes a re-delivered reading a no-op (INSERT ... ON CONFLICT DO NOTHING).
CREATE TABLE telemetry (
    tenant_id    integer          NOT NULL,
    device_id    integer          NOT NULL,
    metric       text             NOT NULL,
    ts           timestamptz      NOT NULL,
    value        double precision NOT NULL,
    received_at  timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, metric, ts)
);

SELECT create_hypertable('telemetry', by_range('ts', INTERVAL '1 day'));

-- Same signature as in PostgreSQL mode; TimescaleDB creates chunks itself, so nothing to do.
CREATE FUNCTION iiot_ensure_telemetry_partitions(p_from date, p_to date) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF p_to < p_from THEN
        RAISE EXCEPTION 'partition range ends (%) before it starts (%)', p_to, p_from;
    END IF;
    RETURN 0;
END
$$;

CREATE VIEW telemetry_partitions AS
SELECT c.chunk_name::text AS partition_name,
       format('FROM (%L) TO (%L)', c.range_start, c.range_end) AS bounds,
       (c.range_start AT TIME ZONE 'UTC')::date AS day
  FROM timescaledb_information.chunks c
 WHERE c.hypertable_name = 'telemetry';
