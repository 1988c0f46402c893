-- The tenant API (`iiot api`, docs/api.md): API keys, device claim codes, device secrets,
-- acknowledged alerts and tenant-managed threshold rules.
--
-- The API connects as a login in app_rw, the multi-tenant service role of docs/security.md. A
-- request's tenant comes from its key only: iiot_api_authenticate() finds the key by the
-- SHA-256 of the whole key and sets iiot.tenant_id for the transaction, so row-level security
-- (not a WHERE clause of the API) confines every statement that follows.

-- 1. API keys -------------------------------------------------------------------------------------
-- A key reads `iiot_<prefix>_<secret>`; only the SHA-256 of the whole key is stored. The keys
-- are 256-bit random strings, not passwords: a fast hash is right (a slow one only makes every
-- request slower), and the lookup by hash is exact.
CREATE TABLE api_keys (
    key_id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id      integer     REFERENCES tenants,
    prefix         text        NOT NULL UNIQUE CHECK (prefix ~ '^[a-z0-9]{8}$'),
    key_sha256     bytea       NOT NULL UNIQUE CHECK (length(key_sha256) = 32),
    role           text        NOT NULL CHECK (role IN ('viewer', 'editor', 'admin', 'platform')),
    name           text        NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    created_by     text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz,
    last_used_at   timestamptz,
    revoked_at     timestamptz,
    replaced_by    bigint      REFERENCES api_keys,
    -- a platform key acts across tenants and belongs to none; a tenant key to exactly one
    CHECK ((role = 'platform') = (tenant_id IS NULL)),
    CHECK (expires_at IS NULL OR expires_at > created_at)
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id, key_id);
COMMENT ON TABLE api_keys IS 'Keys of the tenant API; only the SHA-256 of each key (docs/api.md)';

-- The key of a request and, for a tenant key, its tenant: set as iiot.tenant_id for the rest of
-- the transaction. A platform key names the tenant it acts for (by slug, or NULL for none).
-- Nothing is returned for an unknown, revoked or expired key, nor for a platform key naming an
-- unknown tenant (the caller answers 401 or 404 without learning which).
-- last_used_at moves at most once a minute, so that reads do not all write.
CREATE FUNCTION iiot_api_authenticate(digest bytea, acting_for text DEFAULT NULL)
RETURNS TABLE (key_id bigint, tenant_id integer, tenant_slug text, role text, key_name text,
               expires_at timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = public, pg_catalog, pg_temp AS $$
DECLARE
    k api_keys%ROWTYPE;
    chosen integer;
    slug_of text;
BEGIN
    SELECT * INTO k FROM api_keys a
     WHERE a.key_sha256 = digest AND a.revoked_at IS NULL
       AND (a.expires_at IS NULL OR a.expires_at > now());
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF k.role = 'platform' THEN
        IF acting_for IS NOT NULL THEN
            SELECT t.tenant_id, t.slug INTO chosen, slug_of FROM tenants t WHERE t.slug = acting_for;
            IF NOT FOUND THEN
                RETURN;
            END IF;
        END IF;
    ELSE
        SELECT t.tenant_id, t.slug INTO chosen, slug_of FROM tenants t
         WHERE t.tenant_id = k.tenant_id AND t.status = 'active';
        IF NOT FOUND THEN
            RETURN;  -- a suspended tenant's keys stop working
        END IF;
    END IF;
    PERFORM set_config('iiot.tenant_id', coalesce(chosen::text, ''), true);
    PERFORM set_config('iiot.actor', 'api-key:' || k.key_id, true);
    -- SKIP LOCKED: the row stays locked until the request's transaction ends, and another
    -- request of the same key (a long import, say) must not wait for it
    IF k.last_used_at IS NULL OR k.last_used_at < now() - interval '1 minute' THEN
        UPDATE api_keys a SET last_used_at = now()
         WHERE a.key_id = (SELECT b.key_id FROM api_keys b WHERE b.key_id = k.key_id
                              FOR UPDATE SKIP LOCKED);
    END IF;
    RETURN QUERY SELECT k.key_id, chosen, slug_of, k.role, k.name, k.expires_at;
END
$$;
REVOKE EXECUTE ON FUNCTION iiot_api_authenticate(bytea, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iiot_api_authenticate(bytea, text) TO app_rw;

-- The tenants a platform key may act for (GET /api/v1/tenants): checked against the key again,
-- because app_rw itself sees only the tenant it set.
CREATE FUNCTION iiot_api_tenants(digest bytea)
RETURNS TABLE (tenant_id integer, slug text, name text, plan_id text, status text,
               timezone text, created_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_catalog, pg_temp AS $$
    SELECT t.tenant_id, t.slug, t.name, t.plan_id, t.status, t.timezone, t.created_at
      FROM tenants t
     WHERE EXISTS (SELECT 1 FROM api_keys a
                    WHERE a.key_sha256 = digest AND a.role = 'platform' AND a.revoked_at IS NULL
                      AND (a.expires_at IS NULL OR a.expires_at > now()))
     ORDER BY t.tenant_id
$$;
REVOKE EXECUTE ON FUNCTION iiot_api_tenants(bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iiot_api_tenants(bytea) TO app_rw;

-- Tenant admins manage their tenant's keys through the API under row security; the digest
-- column is write-only for them.
GRANT SELECT (key_id, tenant_id, prefix, role, name, created_by, created_at, expires_at,
              last_used_at, revoked_at, replaced_by)
   ON api_keys TO app_rw;
GRANT INSERT (tenant_id, prefix, key_sha256, role, name, created_by, expires_at)
   ON api_keys TO app_rw;
GRANT UPDATE (expires_at, revoked_at, replaced_by) ON api_keys TO app_rw;
GRANT SELECT, INSERT, UPDATE ON api_keys TO platform_rw;
GRANT SELECT (key_id, tenant_id, prefix, role, name, created_by, created_at, expires_at,
              last_used_at, revoked_at, replaced_by)
   ON api_keys TO readonly_audit;
ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON api_keys TO app_rw
    USING (tenant_id = (SELECT iiot_current_tenant()))
    WITH CHECK (tenant_id = (SELECT iiot_current_tenant()) AND role <> 'platform');
CREATE POLICY platform_access ON api_keys TO platform_rw USING (true) WITH CHECK (true);
CREATE POLICY audit_read ON api_keys FOR SELECT TO readonly_audit USING (true);

-- 2. Device claim codes and device secrets -------------------------------------------------------
-- A claim code is printed at manufacturing (`iiot devices claim-codes create`) for one MAC and
-- meter kind, before any tenant owns the device; the tenant that presents it gets the device.
CREATE TABLE device_claim_codes (
    claim_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    code_sha256    bytea       NOT NULL UNIQUE CHECK (length(code_sha256) = 32),
    mac            macaddr     NOT NULL UNIQUE,
    meter_kind     text        NOT NULL CHECK (meter_kind IN ('energy', 'water', 'gas')),
    metrics        text[]      NOT NULL DEFAULT '{}',
    created_by     text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz,
    claimed_at     timestamptz,
    tenant_id      integer     REFERENCES tenants,
    device_id      integer     REFERENCES devices,
    CHECK ((claimed_at IS NULL) = (tenant_id IS NULL))
);
GRANT SELECT, INSERT, UPDATE ON device_claim_codes TO platform_rw;
GRANT SELECT (claim_id, mac, meter_kind, created_at, expires_at, claimed_at, tenant_id, device_id)
   ON device_claim_codes TO readonly_audit;
ALTER TABLE device_claim_codes ENABLE ROW LEVEL SECURITY;
CREATE POLICY platform_access ON device_claim_codes TO platform_rw USING (true) WITH CHECK (true);
CREATE POLICY audit_read ON device_claim_codes FOR SELECT TO readonly_audit USING (true);

-- Take a claim code for the transaction's tenant: the MAC, meter kind and metrics to provision,
-- or nothing when the code is unknown, expired or already claimed (one answer for all three).
-- The caller provisions the device in the same transaction and records it with
-- iiot_api_claim_complete(); a failed provisioning rolls the claim back.
CREATE FUNCTION iiot_api_claim_take(digest bytea)
RETURNS TABLE (claim_id bigint, mac macaddr, meter_kind text, metrics text[])
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = public, pg_catalog, pg_temp AS $$
DECLARE
    me integer := (SELECT iiot_current_tenant());
BEGIN
    IF me IS NULL THEN
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE device_claim_codes c SET claimed_at = now(), tenant_id = me
     WHERE c.code_sha256 = digest AND c.claimed_at IS NULL
       AND (c.expires_at IS NULL OR c.expires_at > now())
    RETURNING c.claim_id, c.mac, c.meter_kind, c.metrics;
END
$$;
CREATE FUNCTION iiot_api_claim_complete(claim bigint, device integer) RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = public, pg_catalog, pg_temp AS $$
    UPDATE device_claim_codes c SET device_id = d.device_id
      FROM devices d
     WHERE c.claim_id = claim AND d.device_id = device
       AND c.tenant_id = (SELECT iiot_current_tenant()) AND d.tenant_id = c.tenant_id
$$;
REVOKE EXECUTE ON FUNCTION iiot_api_claim_take(bytea), iiot_api_claim_complete(bigint, integer)
  FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iiot_api_claim_take(bytea), iiot_api_claim_complete(bigint, integer)
   TO app_rw;

-- The one-time secret handed out when a device is claimed: only its SHA-256 is kept.
CREATE TABLE device_secrets (
    device_id      integer     PRIMARY KEY REFERENCES devices,
    tenant_id      integer     NOT NULL REFERENCES tenants,
    secret_sha256  bytea       NOT NULL CHECK (length(secret_sha256) = 32),
    created_at     timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id)
);
GRANT INSERT ON device_secrets TO app_rw;
GRANT SELECT (device_id, tenant_id, created_at) ON device_secrets TO app_rw, readonly_audit;
GRANT SELECT, INSERT, UPDATE, DELETE ON device_secrets TO platform_rw;
ALTER TABLE device_secrets ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON device_secrets TO app_rw
    USING (tenant_id = (SELECT iiot_current_tenant()))
    WITH CHECK (tenant_id = (SELECT iiot_current_tenant()));
CREATE POLICY platform_access ON device_secrets TO platform_rw USING (true) WITH CHECK (true);
CREATE POLICY audit_read ON device_secrets FOR SELECT TO readonly_audit USING (true);

-- 3. Alerts a tenant acknowledges, threshold rules a tenant manages ------------------------------
ALTER TABLE alerts ADD COLUMN acknowledged_at timestamptz, ADD COLUMN acknowledged_by text,
    ADD CONSTRAINT alerts_acknowledged CHECK ((acknowledged_at IS NULL) = (acknowledged_by IS NULL));
GRANT UPDATE (acknowledged_at, acknowledged_by) ON alerts TO app_rw;
CREATE POLICY tenant_acknowledge ON alerts FOR UPDATE TO app_rw
    USING (tenant_id = (SELECT iiot_current_tenant()))
    WITH CHECK (tenant_id = (SELECT iiot_current_tenant()));

GRANT INSERT, UPDATE, DELETE ON alert_rules TO app_rw;
CREATE POLICY tenant_insert ON alert_rules FOR INSERT TO app_rw
    WITH CHECK (tenant_id = (SELECT iiot_current_tenant()));
CREATE POLICY tenant_update ON alert_rules FOR UPDATE TO app_rw
    USING (tenant_id = (SELECT iiot_current_tenant()))
    WITH CHECK (tenant_id = (SELECT iiot_current_tenant()));
CREATE POLICY tenant_delete ON alert_rules FOR DELETE TO app_rw
    USING (tenant_id = (SELECT iiot_current_tenant()));
-- A rule watches a device of its own tenant only (the foreign key alone ignores row security).
ALTER TABLE alert_rules ADD CONSTRAINT alert_rules_device_of_tenant
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id);

-- The tenant view of alerts gains the acknowledgement (views fix their columns when created).
CREATE OR REPLACE VIEW tenant.alerts WITH (security_barrier) AS
SELECT * FROM alerts WHERE tenant_id = (SELECT iiot_current_tenant());

-- 4. What tests/test_api_security.py found ----------------------------------------------------
-- 1. The auditor read the API's digests. 0005 gives readonly_audit SELECT on every new table of
--    public (ALTER DEFAULT PRIVILEGES), so 0028's column grants, which leave the digests out,
--    changed nothing for it. Revoking the table-level privilege revokes the column privileges
--    too; the columns are granted again.
REVOKE SELECT ON api_keys, device_claim_codes, device_secrets FROM readonly_audit;
GRANT SELECT (key_id, tenant_id, prefix, role, name, created_by, created_at, expires_at,
              last_used_at, revoked_at, replaced_by)
   ON api_keys TO readonly_audit;
GRANT SELECT (claim_id, mac, meter_kind, metrics, created_by, created_at, expires_at,
              claimed_at, tenant_id, device_id)
   ON device_claim_codes TO readonly_audit;
GRANT SELECT (device_id, tenant_id, created_at) ON device_secrets TO readonly_audit;

-- 2. A MAC waiting for its claim code could be registered by any tenant. app_rw inserts and
--    updates its tenant's devices, so a tenant could take the MAC printed on a device another
--    customer bought, before that customer claims it: the claim then failed as a duplicate MAC,
--    and readings under that MAC would land in the squatter's tenant. A MAC that has a claim
--    code is now registered only by the tenant that took the code (iiot_api_claim_take sets
--    its tenant_id first) or by the platform. A refused INSERT inserts nothing, the answer
--    the registry's statement (ON CONFLICT (mac) DO NOTHING) gives for a MAC another tenant
--    holds, so the API says "duplicate MAC" either way and no tenant learns which MACs have
--    codes; moving a device onto such a MAC is a unique violation, as for a taken MAC.
CREATE FUNCTION iiot_mac_awaits_claim(device_mac macaddr, device_tenant integer)
RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT 1 FROM device_claim_codes c
                    WHERE c.mac = device_mac AND c.tenant_id IS DISTINCT FROM device_tenant)
$$;
REVOKE EXECUTE ON FUNCTION iiot_mac_awaits_claim(macaddr, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iiot_mac_awaits_claim(macaddr, integer) TO app_rw;

-- The trigger runs as the writer (not SECURITY DEFINER), so that it can tell the platform
-- (and migration_admin, and superusers: members of platform_rw) from app_rw.
CREATE FUNCTION iiot_devices_claimed_mac() RETURNS trigger
LANGUAGE plpgsql SET search_path = public, pg_catalog, pg_temp AS $$
BEGIN
    IF pg_has_role(current_user, 'platform_rw', 'USAGE') THEN
        RETURN NEW;
    END IF;
    IF NOT iiot_mac_awaits_claim(NEW.mac, NEW.tenant_id) THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'INSERT' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'duplicate key value violates unique constraint "devices_mac_key"'
        USING ERRCODE = 'unique_violation', DETAIL = format('Key (mac)=(%s) already exists.', NEW.mac);
END
$$;
CREATE TRIGGER devices_claimed_mac BEFORE INSERT OR UPDATE OF mac ON devices
    FOR EACH ROW EXECUTE FUNCTION iiot_devices_claimed_mac();
