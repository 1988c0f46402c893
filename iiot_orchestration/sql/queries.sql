-- Named queries, loaded once by iiot_orchestration.db.queries(); each starts with "-- name: x".

-- name: tenant_summaries
SELECT t.tenant_id, t.slug, t.name, t.plan_id, t.timezone, t.locale,
       coalesce(t.retention_days, p.retention_days) AS retention_days,
       t.billing_cycle_day, t.status, t.created_at,
       count(d.device_id) FILTER (WHERE d.status <> 'decommissioned') AS device_count,
       p.included_devices
  FROM tenants t
  JOIN plans p USING (plan_id)
  LEFT JOIN devices d ON d.tenant_id = t.tenant_id
 WHERE (%(tenant)s::text IS NULL OR t.slug = %(tenant)s)
 GROUP BY t.tenant_id, p.plan_id
 ORDER BY t.slug

-- name: lock_tenant_for_provisioning
-- The platform's lock (a tenant session's is iiot_api_lock_tenant()). Not in the statement that
-- counts the devices: that statement's snapshot would be taken before it waited for the lock.
SELECT 1 FROM tenants WHERE slug = %(tenant)s FOR UPDATE

-- name: tenant_for_provisioning
-- After the lock, so that the count includes what the previous holder committed.
SELECT t.tenant_id, t.status, p.plan_id, p.included_devices, p.hard_block,
       t.storage_blocked_at,
       (SELECT count(*) FROM devices d
         WHERE d.tenant_id = t.tenant_id AND d.status <> 'decommissioned') AS device_count
  FROM tenants t
  JOIN plans p USING (plan_id)
 WHERE t.slug = %(tenant)s

-- name: device_summaries
SELECT d.device_id, t.slug AS tenant, d.mac::text AS mac, d.name, d.meter_kind, d.status,
       d.last_seen, d.created_at,
       coalesce(array_agg(m.metric ORDER BY m.metric) FILTER (WHERE m.metric IS NOT NULL),
                '{}') AS metrics
  FROM devices d
  JOIN tenants t USING (tenant_id)
  LEFT JOIN device_metrics m USING (device_id)
 WHERE (%(tenant)s::text IS NULL OR t.slug = %(tenant)s)
 GROUP BY d.device_id, t.slug
 ORDER BY t.slug, d.mac

-- name: insert_audit
INSERT INTO audit_log (actor, tenant_id, action, entity, entity_id, detail)
VALUES (%(actor)s, %(tenant_id)s, %(action)s, %(entity)s, %(entity_id)s, %(detail)s)

-- name: registered_macs
SELECT mac::text, device_id, meter_kind, tenant_id FROM devices WHERE mac = ANY(%(macs)s::macaddr[])

-- name: provision_device
-- One round trip per device: the device, its metrics and the audit row, or nothing if the MAC
-- was registered by someone else since registered_macs was read.
WITH device AS (
    INSERT INTO devices (tenant_id, mac, name, meter_kind)
    VALUES (%(tenant_id)s, %(mac)s, %(name)s, %(meter_kind)s)
    ON CONFLICT (mac) DO NOTHING
    RETURNING device_id
), metrics AS (
    INSERT INTO device_metrics (device_id, metric, tenant_id)
    SELECT device.device_id, metric, %(tenant_id)s FROM device, unnest(%(metrics)s::text[]) AS metric
), audit AS (
    INSERT INTO audit_log (actor, tenant_id, action, entity, entity_id, detail)
    SELECT %(actor)s, %(tenant_id)s, 'device.provisioned', 'device', %(mac)s,
           jsonb_build_object('device_id', device.device_id, 'meter_kind', %(meter_kind)s,
                              'metrics', to_jsonb(%(metrics)s::text[]))
      FROM device
)
SELECT device_id FROM device

-- name: create_telemetry_staging
CREATE TEMP TABLE IF NOT EXISTS telemetry_staging (
    tenant_id integer, device_id integer, metric text, ts timestamptz,
    value double precision, received_at timestamptz, message_no integer, overage boolean
) ON COMMIT DELETE ROWS

-- name: copy_telemetry_staging
COPY telemetry_staging (tenant_id, device_id, metric, ts, value, received_at, message_no, overage)
FROM STDIN (FORMAT BINARY)

-- name: land_telemetry_staging
-- Re-delivered readings hit the primary key and are skipped. Hours before the current one may
-- already be rolled up, so the readings that land there mark their (tenant, hour) dirty, and
-- the (tenant, hour, device).
WITH landed AS (
    -- only readings whose (tenant_id, device_id) is the device's (wrong_tenant_staged_readings)
    INSERT INTO telemetry (tenant_id, device_id, metric, ts, value, received_at)
    SELECT s.tenant_id, s.device_id, s.metric, s.ts, s.value, s.received_at
      FROM telemetry_staging s
      JOIN devices d ON d.device_id = s.device_id AND d.tenant_id = s.tenant_id
    ON CONFLICT DO NOTHING
    RETURNING tenant_id, device_id, metric, ts
), seen AS (
    UPDATE devices d SET last_seen = greatest(d.last_seen, s.received_at)
      FROM (SELECT tenant_id, device_id, max(received_at) AS received_at
              FROM telemetry_staging GROUP BY tenant_id, device_id) s
     WHERE d.device_id = s.device_id AND d.tenant_id = s.tenant_id
), dirty AS (
    INSERT INTO dirty_windows (tenant_id, window_start)
    SELECT DISTINCT tenant_id, date_trunc('hour', ts, 'UTC') FROM landed
     WHERE ts < date_trunc('hour', %(now)s::timestamptz, 'UTC')
    ON CONFLICT (tenant_id, window_start) DO UPDATE SET last_marked_at = now()
), dirty_devices AS (
    -- and the devices behind each, so a late-data run rewrites only their series
    INSERT INTO dirty_window_devices (window_start, tenant_id, device_id)
    SELECT DISTINCT date_trunc('hour', ts, 'UTC'), tenant_id, device_id FROM landed
     WHERE ts < date_trunc('hour', %(now)s::timestamptz, 'UTC')
    ON CONFLICT (window_start, tenant_id, device_id) DO UPDATE SET marked_at = now()
), staged AS (
    -- one row per reading even when a message was delivered twice within the batch
    SELECT device_id, metric, ts, min(message_no) AS message_no, bool_or(overage) AS overage,
           min(received_at) AS received_at
      FROM telemetry_staging GROUP BY device_id, metric, ts
), usage AS (
    INSERT INTO ingest_usage AS u (tenant_id, device_id, hour, messages, readings, overage_messages)
    SELECT l.tenant_id, l.device_id, date_trunc('hour', s.received_at, 'UTC'),
           count(DISTINCT s.message_no), count(*),
           count(DISTINCT s.message_no) FILTER (WHERE s.overage)
      FROM landed l JOIN staged s USING (device_id, metric, ts)
     GROUP BY 1, 2, 3
    ON CONFLICT (tenant_id, hour, device_id) DO UPDATE
       SET messages = u.messages + excluded.messages,
           readings = u.readings + excluded.readings,
           overage_messages = u.overage_messages + excluded.overage_messages
)
SELECT count(*) FROM landed

-- name: conflicting_staged_readings
-- Run only when land_telemetry_staging skipped readings: those whose key is stored with another
-- value (kept by the batch's first copy, or by an earlier batch), once per refused value. An
-- identical re-delivery is no conflict.
SELECT DISTINCT ON (s.device_id, s.metric, s.ts, s.value)
       s.device_id, s.metric, s.ts, s.value, t.value AS kept, s.message_no, d.mac::text,
       s.tenant_id, s.received_at
  FROM telemetry_staging s
  JOIN telemetry t USING (tenant_id, device_id, metric, ts)
  JOIN devices d ON d.device_id = s.device_id
 WHERE t.value <> s.value
 ORDER BY s.device_id, s.metric, s.ts, s.value, s.message_no

-- name: wrong_tenant_staged_readings
-- Run only when land_telemetry_staging skipped readings: those staged under a tenant that is not
-- their device's (the registry resolves the tenant and a device never moves, so only a writer
-- that bypasses it gets here), once per reading.
SELECT DISTINCT ON (s.device_id, s.metric, s.ts, s.value)
       s.device_id, s.metric, s.ts, s.value, s.message_no, d.mac::text, s.tenant_id,
       s.received_at
  FROM telemetry_staging s
  LEFT JOIN devices d ON d.device_id = s.device_id
 WHERE d.tenant_id IS DISTINCT FROM s.tenant_id
 ORDER BY s.device_id, s.metric, s.ts, s.value, s.message_no

-- name: staged_days
SELECT DISTINCT (ts AT TIME ZONE 'UTC')::date AS day FROM telemetry_staging ORDER BY day

-- name: create_dead_letter_staging
-- COPY cannot target a table under row-level security, so dead letters are staged too.
CREATE TEMP TABLE IF NOT EXISTS dead_letter_staging (
    received_at timestamptz, topic text, mac macaddr, tenant_id integer, device_id integer,
    reason text, detail text, payload bytea, payload_size integer, payload_truncated boolean
) ON COMMIT DELETE ROWS

-- name: copy_dead_letter_staging
COPY dead_letter_staging (received_at, topic, mac, tenant_id, device_id, reason, detail, payload,
                          payload_size, payload_truncated)
FROM STDIN

-- name: land_dead_letter_staging
INSERT INTO dead_letters (received_at, topic, mac, tenant_id, device_id, reason, detail, payload,
                          payload_size, payload_truncated)
SELECT received_at, topic, mac, tenant_id, device_id, reason, detail, payload, payload_size,
       payload_truncated
  FROM dead_letter_staging

-- name: expire_dead_letters
-- One batch of the dead letters received before the cutoff (the dead_letter_retention asset);
-- those a replay holds are left for the next run.
DELETE FROM dead_letters
 WHERE dead_letter_id IN (SELECT dead_letter_id FROM dead_letters
                           WHERE received_at < %(cutoff)s
                           ORDER BY received_at
                           LIMIT %(batch_rows)s
                             FOR UPDATE SKIP LOCKED)

-- name: find_dead_letters
-- `iiot dead-letters list`. A tenant's dead letters include those that came with no tenant from
-- a MAC it owns now (sent before the device was registered).
SELECT l.dead_letter_id, l.received_at, t.slug AS tenant, l.mac::text AS mac, l.device_id,
       l.reason, l.detail, l.topic, l.payload, l.payload_size, l.payload_truncated
  FROM dead_letters l
  LEFT JOIN tenants t ON t.tenant_id = l.tenant_id
 WHERE (%(tenant_id)s::integer IS NULL OR l.tenant_id = %(tenant_id)s
        OR (l.tenant_id IS NULL
            AND l.mac IN (SELECT mac FROM devices WHERE tenant_id = %(tenant_id)s)))
   AND (%(reasons)s::text[] IS NULL OR l.reason = ANY(%(reasons)s::text[]))
   AND (%(since)s::timestamptz IS NULL OR l.received_at >= %(since)s)
   AND (%(until)s::timestamptz IS NULL OR l.received_at < %(until)s)
 ORDER BY l.received_at, l.dead_letter_id
 LIMIT %(limit)s

-- name: count_dead_letters
-- What a replay will look at (find_dead_letters' filters), up to the newest at its start.
SELECT count(*)
  FROM dead_letters l
 WHERE l.dead_letter_id <= %(last)s
   AND (%(tenant_id)s::integer IS NULL OR l.tenant_id = %(tenant_id)s
        OR (l.tenant_id IS NULL
            AND l.mac IN (SELECT mac FROM devices WHERE tenant_id = %(tenant_id)s)))
   AND (%(reasons)s::text[] IS NULL OR l.reason = ANY(%(reasons)s::text[]))
   AND (%(since)s::timestamptz IS NULL OR l.received_at >= %(since)s)
   AND (%(until)s::timestamptz IS NULL OR l.received_at < %(until)s)

-- name: replay_dead_letters
-- The next chunk of a replay, locked until its transaction ends; another replay skips it.
SELECT l.dead_letter_id, l.received_at, l.topic, l.mac::text, l.reason, l.payload,
       l.payload_truncated
  FROM dead_letters l
 WHERE l.dead_letter_id > %(after)s AND l.dead_letter_id <= %(last)s
   AND (%(tenant_id)s::integer IS NULL OR l.tenant_id = %(tenant_id)s
        OR (l.tenant_id IS NULL
            AND l.mac IN (SELECT mac FROM devices WHERE tenant_id = %(tenant_id)s)))
   AND (%(reasons)s::text[] IS NULL OR l.reason = ANY(%(reasons)s::text[]))
   AND (%(since)s::timestamptz IS NULL OR l.received_at >= %(since)s)
   AND (%(until)s::timestamptz IS NULL OR l.received_at < %(until)s)
 ORDER BY l.dead_letter_id
 LIMIT %(rows)s
   FOR UPDATE OF l SKIP LOCKED

-- name: delete_replayed_dead_letters
DELETE FROM dead_letters WHERE dead_letter_id = ANY(%(ids)s::bigint[])

-- name: ingest_registry
SELECT d.mac::text, d.device_id, d.tenant_id, d.status,
       coalesce(array_agg(m.metric) FILTER (WHERE m.metric IS NOT NULL), '{}') AS metrics,
       coalesce(t.retention_days, p.retention_days) AS retention_days,
       p.messages_per_minute_per_device, p.hard_block, t.status AS tenant_status
  FROM devices d
  JOIN tenants t USING (tenant_id)
  JOIN plans p USING (plan_id)
  LEFT JOIN device_metrics m USING (device_id)
 GROUP BY d.device_id, t.tenant_id, p.plan_id

-- name: rollup_hours_delete
-- (devices: NULL for every series, or a late-data run's dirty devices)
DELETE FROM telemetry_hourly WHERE bucket >= %(start)s AND bucket < %(end)s
   AND (%(devices)s::integer[] IS NULL OR device_id = ANY (%(devices)s))

-- name: rollup_hour_stats_raw
-- PostgreSQL mode, and a late-data run of the dirty devices in either mode (their readings by
-- device: cheaper than refreshing a continuous aggregate for every device of the hour), the
-- metrics that are not cumulative (the cumulative ones come whole from
-- rollup_cumulative_stats, on the side connection): one hash GROUP BY over the window's raw
-- readings, buckets by date_bin (plain arithmetic, unlike a time-zone-aware date_trunc); then the
-- first and last values of each bucket by primary key, one index probe each, which costs less
-- than carrying (ts, value) pairs through the aggregate for every reading (the window bounds
-- repeated in the probes let the planner prune the partitions once, not at every probe).
SELECT g.*,
       (SELECT t.value FROM telemetry t
         WHERE t.device_id = g.device_id AND t.metric = g.metric AND t.ts = g.first_ts
           AND t.ts >= %(start)s AND t.ts < %(end)s)
           AS first_value,
       (SELECT t.value FROM telemetry t
         WHERE t.device_id = g.device_id AND t.metric = g.metric AND t.ts = g.last_ts
           AND t.ts >= %(start)s AND t.ts < %(end)s)
           AS last_value
  FROM (SELECT tenant_id, device_id, metric,
               date_bin('1 hour', ts, TIMESTAMPTZ '2000-01-01 00:00+00') AS bucket,
               count(*) AS readings, sum(value) AS value_sum, min(value) AS value_min,
               max(value) AS value_max, min(ts) AS first_ts, max(ts) AS last_ts
          FROM telemetry
         WHERE ts >= %(start)s AND ts < %(end)s AND metric <> ALL (%(cumulative)s)
           AND (%(devices)s::integer[] IS NULL OR device_id = ANY (%(devices)s))
         GROUP BY 1, 2, 3, 4) g

-- name: rollup_hour_stats_devices
-- A late-data run of the dirty devices (%(devices)s), in either mode: rollup_hour_stats_raw for
-- those devices only, each of their series of the metrics that are not cumulative read over the
-- window by primary key (given the window alone, TimescaleDB's planner scans it by its time
-- index, every device's readings: 0.08 s for an hour of the benchmark, against a few ms).
SELECT s.tenant_id, d.device_id, m.metric, s.bucket, s.readings, s.value_sum, s.value_min,
       s.value_max, s.first_ts, s.last_ts, s.first_value, s.last_value
  FROM unnest(%(devices)s::integer[]) d(device_id)
 CROSS JOIN metric_catalog m
 CROSS JOIN LATERAL (
       SELECT t.tenant_id, date_bin('1 hour', t.ts, TIMESTAMPTZ '2000-01-01 00:00+00') AS bucket,
              count(*) AS readings, sum(t.value) AS value_sum, min(t.value) AS value_min,
              max(t.value) AS value_max, min(t.ts) AS first_ts, max(t.ts) AS last_ts,
              (array_agg(t.value ORDER BY t.ts))[1] AS first_value,
              (array_agg(t.value ORDER BY t.ts DESC))[1] AS last_value
         FROM telemetry t
        WHERE t.device_id = d.device_id AND t.metric = m.metric
          AND t.ts >= %(start)s AND t.ts < %(end)s
        GROUP BY 1, 2) s
 WHERE m.metric <> ALL (%(cumulative)s)

-- name: rollup_hour_stats_cagg
-- TimescaleDB mode: the hourly continuous aggregate, refreshed for the window just before.
SELECT tenant_id, device_id, metric, bucket, readings, value_sum, value_min, value_max,
       first_ts, first_value, last_ts, last_value
  FROM iiot_aggregates.telemetry_hourly_cagg
 WHERE bucket >= %(start)s AND bucket < %(end)s

-- name: rollup_consumption
-- Consumption of the cumulative metrics (%(cumulative)s, from metric_catalog) per device, metric
-- and hour: each reading's step from the previous one in one ordered pass; the first reading of a
-- series in the window steps from the last reading before the window, however old: an index
-- probe per series, only for those first readings, into the day before the window (partitions
-- pruned when the query is planned), and only when that finds nothing into every older one.
-- A negative step is a counter reset, whose increase is the new value itself. Definitions:
-- migration 0008.
SELECT device_id, metric, date_bin('1 hour', ts, TIMESTAMPTZ '2000-01-01 00:00+00') AS bucket,
       coalesce(sum(CASE WHEN step < 0 THEN value ELSE step END), 0) AS consumption,
       count(*) FILTER (WHERE step < 0) AS counter_resets
  FROM (SELECT r.device_id, r.metric, r.ts, r.value,
               r.value - coalesce(
                   lag(r.value) OVER (PARTITION BY r.device_id, r.metric ORDER BY r.ts),
                   (SELECT p.value FROM telemetry p
                     WHERE p.device_id = r.device_id AND p.metric = r.metric
                       AND p.ts < %(start)s AND p.ts >= %(start)s - interval '1 day'
                     ORDER BY p.ts DESC LIMIT 1),
                   (SELECT p.value FROM telemetry p
                     WHERE p.device_id = r.device_id AND p.metric = r.metric
                       AND p.ts < %(start)s - interval '1 day'
                     ORDER BY p.ts DESC LIMIT 1)) AS step
          FROM telemetry r
         WHERE r.ts >= %(start)s AND r.ts < %(end)s AND r.metric = ANY (%(cumulative)s)
           AND (%(devices)s::integer[] IS NULL OR r.device_id = ANY (%(devices)s))) steps
 GROUP BY 1, 2, 3

-- name: rollup_cumulative_stats
-- PostgreSQL mode, and a late-data run of the dirty devices in either mode, the cumulative
-- metrics: every statistic of rollup_hour_stats_raw and the
-- consumption of rollup_consumption from the one ordered pass the consumption needs anyway (the
-- first and last readings of a bucket are those whose neighbour in the series lies in another
-- bucket), so that these series need no probes and the two passes share the work of a window.
SELECT tenant_id, device_id, metric, bucket,
       count(*) AS readings, sum(value) AS value_sum, min(value) AS value_min,
       max(value) AS value_max, min(ts) AS first_ts,
       min(value) FILTER (WHERE opens) AS first_value, max(ts) AS last_ts,
       min(value) FILTER (WHERE closes) AS last_value,
       coalesce(sum(CASE WHEN step < 0 THEN value ELSE step END), 0) AS consumption,
       count(*) FILTER (WHERE step < 0) AS counter_resets
  FROM (SELECT r.tenant_id, r.device_id, r.metric, r.ts, r.value, b.bucket,
               r.value - coalesce(
                   lag(r.value) OVER w,
                   (SELECT p.value FROM telemetry p
                     WHERE p.device_id = r.device_id AND p.metric = r.metric
                       AND p.ts < %(start)s AND p.ts >= %(start)s - interval '1 day'
                     ORDER BY p.ts DESC LIMIT 1),
                   (SELECT p.value FROM telemetry p
                     WHERE p.device_id = r.device_id AND p.metric = r.metric
                       AND p.ts < %(start)s - interval '1 day'
                     ORDER BY p.ts DESC LIMIT 1)) AS step,
               b.bucket IS DISTINCT FROM
                   date_bin('1 hour', lag(r.ts) OVER w, TIMESTAMPTZ '2000-01-01 00:00+00') AS opens,
               b.bucket IS DISTINCT FROM
                   date_bin('1 hour', lead(r.ts) OVER w, TIMESTAMPTZ '2000-01-01 00:00+00') AS closes
          FROM telemetry r,
               LATERAL (SELECT date_bin('1 hour', r.ts, TIMESTAMPTZ '2000-01-01 00:00+00')
                          AS bucket) b
         WHERE r.ts >= %(start)s AND r.ts < %(end)s AND r.metric = ANY (%(cumulative)s)
           AND (%(devices)s::integer[] IS NULL OR r.device_id = ANY (%(devices)s))
        WINDOW w AS (PARTITION BY r.device_id, r.metric ORDER BY r.ts)) steps
 GROUP BY 1, 2, 3, 4

-- name: rollup_hours_insert_raw
-- Statistics from the raw readings (PostgreSQL mode, and the dirty devices of a late-data run):
-- the other metrics' statistics (rollup_stats) and the cumulative series whole
-- (rollup_cumulative, copied from rollup_cumulative_stats' rows).
INSERT INTO telemetry_hourly (tenant_id, device_id, metric, bucket, readings, value_sum,
                              value_min, value_max, value_avg, first_ts, first_value, last_ts,
                              last_value, consumption, counter_resets)
SELECT s.tenant_id, s.device_id, s.metric, s.bucket, s.readings, s.value_sum, s.value_min,
       s.value_max, s.value_sum / s.readings, s.first_ts, s.first_value, s.last_ts, s.last_value,
       NULL, 0
  FROM rollup_stats s
 UNION ALL
SELECT c.tenant_id, c.device_id, c.metric, c.bucket, c.readings, c.value_sum, c.value_min,
       c.value_max, c.value_sum / c.readings, c.first_ts, c.first_value, c.last_ts, c.last_value,
       c.consumption, c.counter_resets
  FROM rollup_cumulative c

-- name: rollup_hours_insert
-- TimescaleDB mode, whole hours: the window's statistics (rollup_stats, from
-- rollup_hour_stats_cagg) with the consumption computed beside them (rollup_consumption, copied
-- from rollup_consumption's rows).
INSERT INTO telemetry_hourly (tenant_id, device_id, metric, bucket, readings, value_sum,
                              value_min, value_max, value_avg, first_ts, first_value, last_ts,
                              last_value, consumption, counter_resets)
SELECT s.tenant_id, s.device_id, s.metric, s.bucket, s.readings, s.value_sum, s.value_min,
       s.value_max, s.value_sum / s.readings, s.first_ts, s.first_value, s.last_ts, s.last_value,
       c.consumption, coalesce(c.counter_resets, 0)
  FROM rollup_stats s LEFT JOIN rollup_consumption c USING (device_id, metric, bucket)

-- name: rollup_hours_snapshot
-- A late-data run: the rows of the window before it is rewritten, to find what changed.
CREATE TEMP TABLE rollup_old ON COMMIT DROP AS
SELECT tenant_id, device_id, metric, bucket, readings, value_sum, value_min, value_max,
       first_ts, first_value, last_ts, last_value, consumption, counter_resets
  FROM telemetry_hourly
 WHERE bucket >= %(start)s AND bucket < %(end)s
   AND (%(devices)s::integer[] IS NULL OR device_id = ANY (%(devices)s))

-- name: rollup_hours_mark
-- A late-data run: the series whose rows in the window differ from what they were (changed,
-- new or gone), marked stale for the day holding them; the daily step re-sums those only.
INSERT INTO rollup_stale_days (day, tenant_id, device_id, metric)
SELECT DISTINCT date_bin('1 day', bucket, TIMESTAMPTZ '2000-01-01 00:00+00'), tenant_id,
       device_id, metric
  FROM ((SELECT * FROM rollup_old
         EXCEPT
         SELECT tenant_id, device_id, metric, bucket, readings, value_sum, value_min, value_max,
                first_ts, first_value, last_ts, last_value, consumption, counter_resets
           FROM telemetry_hourly WHERE bucket >= %(start)s AND bucket < %(end)s
            AND (%(devices)s::integer[] IS NULL OR device_id = ANY (%(devices)s)))
        UNION ALL
        (SELECT tenant_id, device_id, metric, bucket, readings, value_sum, value_min, value_max,
                first_ts, first_value, last_ts, last_value, consumption, counter_resets
           FROM telemetry_hourly WHERE bucket >= %(start)s AND bucket < %(end)s
            AND (%(devices)s::integer[] IS NULL OR device_id = ANY (%(devices)s))
         EXCEPT
         SELECT * FROM rollup_old)) changed
ON CONFLICT DO NOTHING

-- name: rollup_hours_follow_up
-- A late-data run: for each cumulative series it rewrote, the first bucket after the windows
-- that holds a reading and is rolled up already. That bucket's first increase starts from the
-- windows' last reading, which late data may have changed, so its consumption is computed
-- again; the rows whose consumption or resets differ are kept (rollup_follow).
CREATE TEMP TABLE rollup_follow ON COMMIT DROP AS
WITH series AS (
    SELECT DISTINCT tenant_id, device_id, metric FROM telemetry_hourly
     WHERE bucket >= %(start)s AND bucket < %(end)s AND metric = ANY (%(cumulative)s)
       AND (%(devices)s::integer[] IS NULL OR device_id = ANY (%(devices)s))
), follow AS (
    SELECT s.tenant_id, s.device_id, s.metric,
           date_bin('1 hour', n.ts, TIMESTAMPTZ '2000-01-01 00:00+00') AS bucket
      FROM series s
      CROSS JOIN LATERAL (
          SELECT t.ts FROM telemetry t
           WHERE t.device_id = s.device_id AND t.metric = s.metric AND t.ts >= %(end)s
             AND t.ts < (SELECT max(h.bucket) FROM telemetry_hourly h
                          WHERE h.tenant_id = s.tenant_id) + interval '1 hour'
           ORDER BY t.ts LIMIT 1) n
), recomputed AS (
    SELECT f.tenant_id, f.device_id, f.metric, f.bucket,
           coalesce(sum(CASE WHEN x.step < 0 THEN x.value ELSE x.step END), 0) AS consumption,
           count(*) FILTER (WHERE x.step < 0)::integer AS counter_resets
      FROM follow f
      CROSS JOIN LATERAL (
          SELECT r.value,
                 r.value - coalesce(
                     lag(r.value) OVER (ORDER BY r.ts),
                     (SELECT p.value FROM telemetry p
                       WHERE p.device_id = f.device_id AND p.metric = f.metric
                         AND p.ts >= %(start)s AND p.ts < %(end)s
                       ORDER BY p.ts DESC LIMIT 1)) AS step
            FROM telemetry r
           WHERE r.device_id = f.device_id AND r.metric = f.metric
             AND r.ts >= f.bucket AND r.ts < f.bucket + interval '1 hour') x
     GROUP BY 1, 2, 3, 4
)
SELECT c.* FROM recomputed c
  JOIN telemetry_hourly h USING (tenant_id, bucket, device_id, metric)
 WHERE (h.consumption, h.counter_resets) IS DISTINCT FROM (c.consumption, c.counter_resets)

-- name: rollup_hours_follow_up_apply
-- Within the run's days: the corrected rows, and their series-days marked for the daily step.
-- After them: marked dirty, so that the late-data sensor runs their days.
WITH fixed AS (
    UPDATE telemetry_hourly h SET consumption = f.consumption, counter_resets = f.counter_resets
      FROM rollup_follow f
     WHERE h.tenant_id = f.tenant_id AND h.bucket = f.bucket AND h.device_id = f.device_id
       AND h.metric = f.metric AND f.bucket < %(days_end)s
    RETURNING h.tenant_id, h.device_id, h.metric, h.bucket
), stale AS (
    INSERT INTO rollup_stale_days (day, tenant_id, device_id, metric)
    SELECT DISTINCT date_bin('1 day', bucket, TIMESTAMPTZ '2000-01-01 00:00+00'), tenant_id,
           device_id, metric
      FROM fixed
    ON CONFLICT DO NOTHING
), later AS (
    INSERT INTO dirty_windows (tenant_id, window_start)
    SELECT DISTINCT tenant_id, bucket FROM rollup_follow WHERE bucket >= %(days_end)s
    ON CONFLICT (tenant_id, window_start) DO UPDATE SET last_marked_at = now()
), later_devices AS (
    INSERT INTO dirty_window_devices (window_start, tenant_id, device_id)
    SELECT DISTINCT bucket, tenant_id, device_id FROM rollup_follow WHERE bucket >= %(days_end)s
    ON CONFLICT (window_start, tenant_id, device_id) DO UPDATE SET marked_at = now()
)
SELECT (SELECT count(*) FROM fixed), (SELECT count(*) FROM rollup_follow) - (SELECT count(*) FROM fixed)

-- name: rollup_days_take_marks
-- The stale series-days of the days, taken (their marks removed) for re-summing.
WITH taken AS (
    DELETE FROM rollup_stale_days WHERE day >= %(start)s AND day < %(end)s
    RETURNING day, tenant_id, device_id, metric
)
INSERT INTO rollup_days_todo SELECT day, tenant_id, device_id, metric FROM taken

-- name: rollup_days_todo_hours
-- Each stale series-day's 24 hours, so that its hourly rows are found by the whole primary key.
CREATE TEMP TABLE rollup_days_todo_hours ON COMMIT DROP AS
SELECT t.day, t.tenant_id, t.device_id, t.metric, b.hour
  FROM rollup_days_todo t,
       generate_series(t.day, t.day + interval '23 hours', interval '1 hour') AS b(hour)

-- name: rollup_days_delete_marked
DELETE FROM telemetry_daily d USING rollup_days_todo t
 WHERE d.bucket = t.day AND d.tenant_id = t.tenant_id AND d.device_id = t.device_id
   AND d.metric = t.metric

-- name: rollup_days_insert_marked
-- rollup_days_insert for the stale series-days only (rollup_days_todo_hours).
INSERT INTO telemetry_daily (tenant_id, device_id, metric, bucket, readings, value_sum,
                             value_min, value_max, value_avg, first_ts, first_value, last_ts,
                             last_value, consumption, counter_resets)
SELECT g.tenant_id, g.device_id, g.metric, g.bucket, g.readings, g.value_sum, g.value_min,
       g.value_max, g.value_sum / g.readings, g.first_ts,
       (SELECT h.first_value FROM telemetry_hourly h
         WHERE h.tenant_id = g.tenant_id AND h.device_id = g.device_id AND h.metric = g.metric
           AND h.bucket = date_bin('1 hour', g.first_ts, TIMESTAMPTZ '2000-01-01 00:00+00')),
       g.last_ts,
       (SELECT h.last_value FROM telemetry_hourly h
         WHERE h.tenant_id = g.tenant_id AND h.device_id = g.device_id AND h.metric = g.metric
           AND h.bucket = date_bin('1 hour', g.last_ts, TIMESTAMPTZ '2000-01-01 00:00+00')),
       g.consumption, g.counter_resets
  FROM (SELECT h.tenant_id, h.device_id, h.metric, t.day AS bucket,
               sum(h.readings) AS readings, sum(h.value_sum) AS value_sum,
               min(h.value_min) AS value_min, max(h.value_max) AS value_max,
               min(h.first_ts) AS first_ts, max(h.last_ts) AS last_ts,
               sum(h.consumption) AS consumption, sum(h.counter_resets) AS counter_resets
          FROM rollup_days_todo_hours t
          JOIN telemetry_hourly h
            ON h.tenant_id = t.tenant_id AND h.bucket = t.hour AND h.device_id = t.device_id
           AND h.metric = t.metric
         GROUP BY 1, 2, 3, 4) g

-- name: rollup_days_delete
DELETE FROM telemetry_daily WHERE bucket >= %(start)s AND bucket < %(end)s

-- name: rollup_days_insert
-- Days from the hours: counts, sums, consumption and resets add up; the first and last values
-- are those of the hours holding the day's first and last readings (a primary-key probe each).
INSERT INTO telemetry_daily (tenant_id, device_id, metric, bucket, readings, value_sum,
                             value_min, value_max, value_avg, first_ts, first_value, last_ts,
                             last_value, consumption, counter_resets)
SELECT g.tenant_id, g.device_id, g.metric, g.bucket, g.readings, g.value_sum, g.value_min,
       g.value_max, g.value_sum / g.readings, g.first_ts,
       (SELECT h.first_value FROM telemetry_hourly h
         WHERE h.tenant_id = g.tenant_id AND h.device_id = g.device_id AND h.metric = g.metric
           AND h.bucket = date_bin('1 hour', g.first_ts, TIMESTAMPTZ '2000-01-01 00:00+00')),
       g.last_ts,
       (SELECT h.last_value FROM telemetry_hourly h
         WHERE h.tenant_id = g.tenant_id AND h.device_id = g.device_id AND h.metric = g.metric
           AND h.bucket = date_bin('1 hour', g.last_ts, TIMESTAMPTZ '2000-01-01 00:00+00')),
       g.consumption, g.counter_resets
  FROM (SELECT tenant_id, device_id, metric,
               date_bin('1 day', bucket, TIMESTAMPTZ '2000-01-01 00:00+00') AS bucket,
               sum(readings) AS readings, sum(value_sum) AS value_sum,
               min(value_min) AS value_min, max(value_max) AS value_max,
               min(first_ts) AS first_ts, max(last_ts) AS last_ts,
               sum(consumption) AS consumption, sum(counter_resets) AS counter_resets
          FROM telemetry_hourly
         WHERE bucket >= %(start)s AND bucket < %(end)s
         GROUP BY 1, 2, 3, 4) g

-- name: rollup_days_insert_cagg
-- TimescaleDB mode: statistics from the daily continuous aggregate (refreshed just before),
-- consumption and resets summed from the hours.
INSERT INTO telemetry_daily (tenant_id, device_id, metric, bucket, readings, value_sum,
                             value_min, value_max, value_avg, first_ts, first_value, last_ts,
                             last_value, consumption, counter_resets)
SELECT c.tenant_id, c.device_id, c.metric, c.bucket, c.readings, c.value_sum, c.value_min,
       c.value_max, c.value_sum / c.readings, c.first_ts, c.first_value, c.last_ts, c.last_value,
       h.consumption, h.counter_resets
  FROM iiot_aggregates.telemetry_daily_cagg c
  JOIN (SELECT tenant_id, device_id, metric, date_trunc('day', bucket, 'UTC') AS bucket,
               sum(consumption) AS consumption, sum(counter_resets) AS counter_resets
          FROM telemetry_hourly
         WHERE bucket >= %(start)s AND bucket < %(end)s
         GROUP BY tenant_id, device_id, metric, date_trunc('day', bucket, 'UTC')) h
    USING (tenant_id, device_id, metric, bucket)
 WHERE c.bucket >= %(start)s AND c.bucket < %(end)s

-- name: record_ingest_session
INSERT INTO ingest_sessions AS s (client_id, group_name, slot, subscription, host, pid,
                                  session_expiry_s, state, started_at, last_seen_at, ended_at)
VALUES (%(client_id)s, %(group)s, %(slot)s, %(subscription)s, %(host)s, %(pid)s,
        %(session_expiry_s)s, %(state)s, now(), now(), NULL)
ON CONFLICT (client_id) DO UPDATE
   SET group_name = EXCLUDED.group_name, slot = EXCLUDED.slot,
       subscription = EXCLUDED.subscription, host = EXCLUDED.host, pid = EXCLUDED.pid,
       session_expiry_s = EXCLUDED.session_expiry_s, state = EXCLUDED.state,
       started_at = CASE WHEN s.pid = EXCLUDED.pid AND s.host = EXCLUDED.host
                         THEN s.started_at ELSE now() END,
       last_seen_at = now(),
       ended_at = CASE WHEN EXCLUDED.state = 'ended' THEN now() END

-- name: ingest_sessions
-- (group: NULL for every group) each slot's session, with when the broker forgets it
SELECT client_id, group_name, slot, subscription, host, pid, state, started_at, last_seen_at,
       CASE WHEN state = 'ended' THEN ended_at
            ELSE last_seen_at + make_interval(secs => session_expiry_s) END AS expires_at,
       now() - last_seen_at AS silent_for
  FROM ingest_sessions
 WHERE %(group)s::text IS NULL OR group_name = %(group)s
 ORDER BY group_name, slot
