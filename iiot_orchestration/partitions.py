"""Partitions shared by the per-tenant assets (billing, reports).

Tenants are a dynamic partition dimension keyed by slug: `tenant_partitions_sensor` adds a
partition when a tenant is created and removes it when the tenant is deleted, so new tenants
appear in the Dagster UI without a code change.
"""

import dagster as dg

TENANTS = "tenants"
TENANT_PARTITIONS = dg.DynamicPartitionsDefinition(name=TENANTS)
# Months and days are labels: each per-tenant asset reads a key in the tenant's own time zone
# (and, for invoices, billing cycle), so the key "2026-10-01" is October 2026 for everyone.
PARTITIONS_START = "2026-01-01"
DAYS = dg.DailyPartitionsDefinition(start_date=PARTITIONS_START, end_offset=1)
MONTHS = dg.MonthlyPartitionsDefinition(start_date=PARTITIONS_START, end_offset=1)
TENANT_DAYS = dg.MultiPartitionsDefinition({"day": DAYS, "tenant": TENANT_PARTITIONS})
TENANT_MONTHS = dg.MultiPartitionsDefinition({"month": MONTHS, "tenant": TENANT_PARTITIONS})


def tenant_key(month_or_day: str, slug: str, dimension: str = "month") -> dg.MultiPartitionKey:
    """The partition key of one tenant and one month ("2026-10-01") or day."""
    return dg.MultiPartitionKey({dimension: month_or_day, "tenant": slug})
