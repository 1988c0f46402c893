-- PostgreSQL mode has no continuous aggregates: the rollup assets compute the statistics from
-- the raw table themselves (see 0008_rollups.sql). Nothing to do; the version is kept in step
-- with TimescaleDB mode.
SELECT 1;
