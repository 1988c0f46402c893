-- A block-range (BRIN) index on the readings' time, for work on a few hours of a day partition:
-- the hourly schedule and late-data runs read one hour, not the whole day. Readings land in
-- time order (late ones are few), so each range of 32 pages covers a short span and the index
-- stays tiny and nearly free for the ingest daemon to maintain. The primary key
-- (device_id, metric, ts) serves per-series lookups.
CREATE INDEX telemetry_ts_brin ON telemetry USING brin (ts) WITH (pages_per_range = 32);
