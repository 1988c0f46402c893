{#- The model has at most one row per combination of `columns` (its grain). dbt_utils has
    unique_combination_of_columns, but the project installs no packages: it builds offline. -#}
{% test unique_combination(model, columns) %}
select {{ columns | join(', ') }}, count(*) as rows_with_key
from {{ model }}
group by {{ columns | join(', ') }}
having count(*) > 1
{% endtest %}
