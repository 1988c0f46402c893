-- Tell the ingest daemons' registry caches when devices, their metrics, tenants or plans change.
CREATE FUNCTION iiot_notify_registry_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('iiot_registry', TG_TABLE_NAME);
    RETURN NULL;
END
$$;

CREATE TRIGGER devices_notify AFTER INSERT OR UPDATE OR DELETE ON devices
    FOR EACH STATEMENT EXECUTE FUNCTION iiot_notify_registry_change();
CREATE TRIGGER device_metrics_notify AFTER INSERT OR UPDATE OR DELETE ON device_metrics
    FOR EACH STATEMENT EXECUTE FUNCTION iiot_notify_registry_change();
CREATE TRIGGER tenants_notify AFTER INSERT OR UPDATE OR DELETE ON tenants
    FOR EACH STATEMENT EXECUTE FUNCTION iiot_notify_registry_change();
CREATE TRIGGER plans_notify AFTER INSERT OR UPDATE OR DELETE ON plans
    FOR EACH STATEMENT EXECUTE FUNCTION iiot_notify_registry_change();
