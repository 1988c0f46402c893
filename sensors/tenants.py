"""Keeps the `tenants` dynamic partitions equal to the tenant registry."""

import dagster as dg

from iiot_orchestration.partitions import TENANT_PARTITIONS, TENANTS
from iiot_orchestration.resources import PostgresResource


def partition_changes(
    registered: set[str], partitions: set[str]
) -> list[dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest]:
    """Requests that make the partitions the registered slugs (added and removed, sorted)."""
    requests: list[dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest] = []
    if added := sorted(registered - partitions):
        requests.append(TENANT_PARTITIONS.build_add_request(added))
    if removed := sorted(partitions - registered):
        requests.append(TENANT_PARTITIONS.build_delete_request(removed))
    return requests


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a `tenants` partition for each new tenant and removes deleted tenants', "
    "so per-tenant assets (billing, reports) follow the registry without code changes.",
)
def tenant_partitions_sensor(
    context: dg.SensorEvaluationContext, postgres: PostgresResource
) -> dg.SensorResult:
    with postgres.get_connection() as conn:
        registered = {slug for (slug,) in conn.execute("SELECT slug FROM tenants")}
    partitions = set(context.instance.get_dynamic_partitions(TENANTS))
    requests = partition_changes(registered, partitions)
    if requests:
        context.log.info(f"tenant partitions: {len(registered)} registered, updating")
    return dg.SensorResult(dynamic_partitions_requests=requests)
