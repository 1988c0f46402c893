"""The `tenants` dynamic partitions follow the registry."""

import dagster as dg

from iiot_orchestration import registry
from iiot_orchestration.partitions import TENANT_MONTHS, TENANTS, tenant_key
from iiot_orchestration.resources import PostgresResource
from sensors.tenants import tenant_partitions_sensor


def evaluate(instance, database_url):
    context = dg.build_sensor_context(
        instance=instance, resources={"postgres": PostgresResource(database_url=database_url)}
    )
    result = tenant_partitions_sensor(context)
    for request in result.dynamic_partitions_requests:
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(TENANTS, request.partition_keys)
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(TENANTS, key)
    return result


def test_new_tenants_become_partitions_and_deleted_ones_go(conn, database_url):
    with dg.instance_for_test() as instance:
        assert evaluate(instance, database_url).dynamic_partitions_requests == []
        for slug in ("acme", "beta"):
            registry.create_tenant(conn, slug=slug, name=slug, plan="pro", timezone="UTC")
        evaluate(instance, database_url)
        assert sorted(instance.get_dynamic_partitions(TENANTS)) == ["acme", "beta"]
        assert evaluate(instance, database_url).dynamic_partitions_requests == []  # settled

        instance.add_dynamic_partitions(TENANTS, ["gone"])  # a tenant deleted since
        result = evaluate(instance, database_url)
        [request] = result.dynamic_partitions_requests
        assert isinstance(request, dg.DeleteDynamicPartitionsRequest)
        assert list(request.partition_keys) == ["gone"]
        assert sorted(instance.get_dynamic_partitions(TENANTS)) == ["acme", "beta"]

        keys = TENANT_MONTHS.get_partition_keys(dynamic_partitions_store=instance)
        assert tenant_key("2026-10-01", "acme") in keys
