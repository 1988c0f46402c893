{#
  tenant.<model>: the mart's rows of the session's tenant, for tenant logins and the service role
  (migration 0022, docs/marts.md), replaced inside the model's transaction so that no other
  session ever finds it missing or empty.

  The table materialization renames the old table to a backup and the new one into place, then
  COMMITs and drops the backup with CASCADE. A query of the view locks the view, then the table;
  so the pre-hook drops the view before the renames lock the table (in the other order the two
  deadlock), and the post-hook creates it over the new table. Meanwhile a query of the view
  waits for the COMMIT, then reads the new one; the CASCADE finds nothing of ours on the backup.
#}
{% macro tenant_view_relation() %}
  {{- return(api.Relation.create(schema='tenant', identifier=this.identifier, type='view')) -}}
{% endmacro %}

{% macro drop_tenant_view() %}
  drop view if exists {{ tenant_view_relation() }}
{% endmacro %}

{% macro create_tenant_view() %}
  {%- set view = tenant_view_relation() -%}
  create view {{ view }} with (security_barrier) as
  select * from {{ this }} where tenant_id = (select iiot_current_tenant());
  grant select on {{ view }} to tenant_reader, app_rw
{% endmacro %}
