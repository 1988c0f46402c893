-- Device registry: devices keyed by MAC, the metric catalog with units, device certificates.
CREATE TABLE metric_catalog (
    metric       text PRIMARY KEY CHECK (metric ~ '^[a-z][a-z0-9_]{0,62}$'),
    unit         text             NOT NULL,
    meter_kind   text             CHECK (meter_kind IN ('energy', 'water', 'gas')),
    cumulative   boolean          NOT NULL,
    is_default   boolean          NOT NULL DEFAULT false,
    min_value    double precision,
    max_value    double precision,
    description  text             NOT NULL
);
COMMENT ON COLUMN metric_catalog.meter_kind IS 'NULL: the metric fits devices of every kind.';

INSERT INTO metric_catalog VALUES
    ('energy_kwh', 'kWh', 'energy', true, true, 0, NULL, 'Cumulative active energy register'),
    ('power_w', 'W', 'energy', false, true, 0, 10000000, 'Instantaneous active power'),
    ('voltage_v', 'V', 'energy', false, false, 0, 100000, 'RMS voltage'),
    ('current_a', 'A', 'energy', false, false, 0, 100000, 'RMS current'),
    ('water_m3', 'm3', 'water', true, true, 0, NULL, 'Cumulative water volume register'),
    ('flow_lpm', 'L/min', 'water', false, false, 0, 1000000, 'Instantaneous water flow'),
    ('gas_m3', 'm3', 'gas', true, true, 0, NULL, 'Cumulative gas volume register'),
    ('temperature_c', 'degC', NULL, false, false, -60, 200, 'Device or ambient temperature'),
    ('battery_pct', '%', NULL, false, false, 0, 100, 'Battery charge');

CREATE TABLE devices (
    device_id   integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   integer     NOT NULL REFERENCES tenants,
    mac         macaddr     NOT NULL UNIQUE,
    name        text        NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    meter_kind  text        NOT NULL CHECK (meter_kind IN ('energy', 'water', 'gas')),
    status      text        NOT NULL DEFAULT 'active'
                            CHECK (status IN ('active', 'inactive', 'decommissioned')),
    last_seen   timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_tenant ON devices (tenant_id);

CREATE TABLE device_metrics (
    device_id  integer NOT NULL REFERENCES devices,
    metric     text    NOT NULL REFERENCES metric_catalog,
    tenant_id  integer NOT NULL REFERENCES tenants,
    PRIMARY KEY (device_id, metric)
);
CREATE INDEX device_metrics_tenant ON device_metrics (tenant_id);

CREATE TABLE device_certificates (
    certificate_id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id          integer     NOT NULL REFERENCES tenants,
    device_id          integer     NOT NULL REFERENCES devices,
    serial             numeric(50, 0) NOT NULL UNIQUE,
    subject_cn         text        NOT NULL,
    fingerprint_sha256 text        NOT NULL UNIQUE,
    not_before         timestamptz NOT NULL,
    not_after          timestamptz NOT NULL,
    status             text        NOT NULL DEFAULT 'active'
                                   CHECK (status IN ('pending', 'active', 'superseded', 'revoked')),
    certificate_pem    text        NOT NULL,
    issued_at          timestamptz NOT NULL DEFAULT now(),
    revoked_at         timestamptz,
    revocation_reason  text,
    CHECK (not_after > not_before),
    CHECK ((status = 'revoked') = (revoked_at IS NOT NULL))
);
CREATE UNIQUE INDEX device_certificates_one_active ON device_certificates (device_id)
    WHERE status = 'active';
CREATE INDEX device_certificates_tenant ON device_certificates (tenant_id);
