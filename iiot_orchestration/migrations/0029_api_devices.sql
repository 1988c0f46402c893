-- Device provisioning through the tenant API (docs/api.md).
--
-- Provisioning counts a tenant's devices against its plan's quota; two provisionings of one
-- tenant at once must not both see room for the last device. registry.provision_devices (the
-- CLI, as platform_rw) serialises on the tenant's row (SELECT ... FOR UPDATE), which app_rw may
-- not lock since 0022 took its UPDATE right on tenants. This locks the row for it: the calling
-- transaction's own tenant only, and nothing else (the plan, status and quota columns stay
-- read-only to app_rw). Returns false when the transaction has no tenant.
CREATE FUNCTION iiot_api_lock_tenant() RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = public, pg_catalog, pg_temp AS $$
BEGIN
    PERFORM 1 FROM tenants t WHERE t.tenant_id = (SELECT iiot_current_tenant()) FOR UPDATE;
    RETURN FOUND;
END
$$;
REVOKE EXECUTE ON FUNCTION iiot_api_lock_tenant() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION iiot_api_lock_tenant() TO app_rw;
