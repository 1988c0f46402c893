-- Series-days whose hourly rows a late-data run changed, waiting for the daily step to re-sum
-- them (docs/rollups.md). A run tagged with hours (iiot/hours) compares the rewritten hours with
-- what they held and marks the series that differ; its daily step re-sums only the marked
-- series-days and removes their marks in the same transaction, so a daily step that fails leaves
-- them for the next run. A run of whole days re-sums every series and clears the day's marks.
CREATE TABLE rollup_stale_days (
    day        timestamptz NOT NULL CHECK (extract(epoch FROM day)::bigint % 86400 = 0),
    tenant_id  integer     NOT NULL,
    device_id  integer     NOT NULL,
    metric     text        NOT NULL,
    marked_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (day, tenant_id, device_id, metric)
);

GRANT SELECT, INSERT, DELETE ON rollup_stale_days TO platform_rw;
GRANT SELECT ON rollup_stale_days TO readonly_audit;

ALTER TABLE rollup_stale_days ENABLE ROW LEVEL SECURITY;
CREATE POLICY platform_access ON rollup_stale_days TO platform_rw USING (true) WITH CHECK (true);
CREATE POLICY audit_read ON rollup_stale_days FOR SELECT TO readonly_audit USING (true);
