"""The MQTT ingest daemon (`iiot ingest`): validation, tenant resolution, quotas and landing."""
