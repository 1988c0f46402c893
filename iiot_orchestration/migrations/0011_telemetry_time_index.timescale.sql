-- TimescaleDB mode: create_hypertable already made an index on ts (per chunk), which serves the
-- hourly and late-data runs; nothing to add. (PostgreSQL mode adds a BRIN index here.)
SELECT 1;
