-- Device certificates and their over-the-air renewal (docs/certificates.md).
--
-- device_certificates (0002) keeps every certificate ever issued; a renewal adds a 'pending'
-- certificate that becomes 'active' only once the device has acknowledged it, so a device always
-- has the certificate it connects with. certificate_renewals records each attempt, one open
-- attempt per device at most; certificate_acks lands every acknowledgement the devices publish,
-- also the malformed ones; certificate_crls and certificate_sweeps are the history of the CRL
-- and of the daily expiry sweep.
ALTER TABLE device_certificates
    ADD COLUMN revocation_code text
        CHECK (revocation_code IN ('unspecified', 'keyCompromise', 'affiliationChanged',
                                   'superseded', 'cessationOfOperation', 'privilegeWithdrawn')),
    ADD COLUMN superseded_at timestamptz,
    ADD CHECK (revocation_code IS NULL OR status = 'revoked'),
    ADD CHECK (superseded_at IS NULL OR status IN ('superseded', 'revoked'));
CREATE INDEX device_certificates_active_expiry ON device_certificates (not_after)
    WHERE status = 'active';
CREATE INDEX device_certificates_device ON device_certificates (device_id);

CREATE TABLE certificate_renewals (
    renewal_id          uuid        PRIMARY KEY,
    tenant_id           integer     NOT NULL REFERENCES tenants,
    device_id           integer     NOT NULL REFERENCES devices,
    old_certificate_id  bigint      NOT NULL REFERENCES device_certificates,
    new_certificate_id  bigint      NOT NULL UNIQUE REFERENCES device_certificates,
    batch_day           date        NOT NULL,
    attempt             integer     NOT NULL CHECK (attempt >= 1),
    status              text        NOT NULL DEFAULT 'issued'
                        CHECK (status IN ('issued', 'published', 'succeeded', 'failed',
                                          'timed_out')),
    issued_at           timestamptz NOT NULL,
    published_at        timestamptz,
    completed_at        timestamptz,
    failure_reason      text        CHECK (length(failure_reason) <= 300),
    next_attempt_after  timestamptz,
    retained_cleared_at timestamptz,
    CHECK (old_certificate_id <> new_certificate_id),
    CHECK ((status IN ('succeeded', 'failed', 'timed_out')) = (completed_at IS NOT NULL)),
    CHECK ((status IN ('failed', 'timed_out')) = (failure_reason IS NOT NULL)),
    CHECK (status <> 'published' OR published_at IS NOT NULL)
);
COMMENT ON COLUMN certificate_renewals.batch_day IS
    'UTC day of the batch that issued it: at most IIOT_CERT_RENEWAL_BATCH_SIZE per day.';
COMMENT ON COLUMN certificate_renewals.next_attempt_after IS
    'Set when the attempt failed or timed out: no new attempt for the device before then.';
-- at most one attempt in flight per device: a second batch run cannot issue another
CREATE UNIQUE INDEX certificate_renewals_one_open ON certificate_renewals (device_id)
    WHERE status IN ('issued', 'published');
CREATE INDEX certificate_renewals_batch_day ON certificate_renewals (batch_day);
CREATE INDEX certificate_renewals_device ON certificate_renewals (device_id, issued_at);
CREATE INDEX certificate_renewals_tenant ON certificate_renewals (tenant_id);

CREATE TABLE certificate_acks (
    ack_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at   timestamptz NOT NULL DEFAULT now(),
    topic         text        NOT NULL,
    mac           macaddr,
    tenant_id     integer,
    renewal_id    uuid,
    status        text        CHECK (status IN ('success', 'failure')),
    reason        text        CHECK (length(reason) <= 300),
    serial        numeric(50, 0),
    payload       bytea       NOT NULL,
    payload_size  integer     NOT NULL CHECK (payload_size >= 0),
    processed_at  timestamptz,
    outcome       text        CHECK (outcome IN ('completed', 'failed', 'duplicate', 'late',
                                                 'unknown_renewal', 'wrong_device',
                                                 'malformed')),
    detail        text,
    CHECK ((processed_at IS NULL) = (outcome IS NULL))
);
COMMENT ON COLUMN certificate_acks.payload IS 'The first 4 KiB of the message as received.';
CREATE INDEX certificate_acks_unprocessed ON certificate_acks (ack_id) WHERE processed_at IS NULL;
CREATE INDEX certificate_acks_renewal ON certificate_acks (renewal_id);
CREATE INDEX certificate_acks_tenant ON certificate_acks (tenant_id);

CREATE TABLE certificate_crls (
    crl_number      bigint      PRIMARY KEY CHECK (crl_number > 0),
    generated_at    timestamptz NOT NULL,
    next_update     timestamptz NOT NULL CHECK (next_update > generated_at),
    revoked         integer     NOT NULL CHECK (revoked >= 0),
    sha256          text        NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    ca_fingerprint  text        NOT NULL CHECK (ca_fingerprint ~ '^[0-9a-f]{64}$')
);

CREATE TABLE certificate_sweeps (
    sweep_id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    swept_at                   timestamptz NOT NULL,
    ok                         integer     NOT NULL CHECK (ok >= 0),
    renewal_due                integer     NOT NULL CHECK (renewal_due >= 0),
    expired                    integer     NOT NULL CHECK (expired >= 0),
    revoked                    integer     NOT NULL CHECK (revoked >= 0),
    pending                    integer     NOT NULL CHECK (pending >= 0),
    superseded                 integer     NOT NULL CHECK (superseded >= 0),
    devices_without_certificate integer    NOT NULL CHECK (devices_without_certificate >= 0),
    first_expiry               timestamptz,
    crl_number                 bigint      REFERENCES certificate_crls
);

-- platform_rw runs the assets, the sensor and the CLI; renewals and acks are tenant-owned, so
-- a tenant session (app_rw) reads its own; readonly_audit reads everything.
GRANT SELECT, INSERT, UPDATE ON certificate_renewals, certificate_acks TO platform_rw;
GRANT SELECT, INSERT ON certificate_crls, certificate_sweeps TO platform_rw;
GRANT SELECT ON certificate_renewals, certificate_acks TO app_rw;
GRANT SELECT ON certificate_renewals, certificate_acks, certificate_crls, certificate_sweeps
    TO readonly_audit;

DO $$
DECLARE
    table_name text;
BEGIN
    FOREACH table_name IN ARRAY ARRAY['certificate_renewals', 'certificate_acks'] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', table_name);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I FOR SELECT TO app_rw '
            'USING (tenant_id = iiot_current_tenant())', table_name);
        EXECUTE format(
            'CREATE POLICY platform_access ON %I TO platform_rw USING (true) WITH CHECK (true)',
            table_name);
        EXECUTE format(
            'CREATE POLICY audit_read ON %I FOR SELECT TO readonly_audit USING (true)', table_name);
    END LOOP;
END
$$;
