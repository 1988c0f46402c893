"""Consumption marts: the dbt project in ``dbt_models/``, built after the rollups.

dbt reads its connection from the variables in ``dbt_models/profiles.yml``, which the asset sets
from its ``postgres`` resource (``IIOT_DATABASE_URL``) for each dbt command, so dbt and every
other asset always reach the same database. ``python -m assets.marts`` prints the same variables
as shell exports, for running dbt by hand (docs/marts.md).
"""

import getpass
import json
import os
import shlex
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import dagster as dg
from filelock import FileLock
from psycopg.conninfo import conninfo_to_dict

from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.retries import retry_transient

with warnings.catch_warnings():
    # dagster-dbt requires sqlglot[rs], whose sqlglotrs module warns on import that it is
    # deprecated; the tests turn warnings into errors, and this one is not ours to fix
    warnings.filterwarnings("ignore", "sqlglotrs is deprecated", DeprecationWarning)
    from dagster_dbt import DagsterDbtTranslator, DbtCliResource, DbtProject, dbt_assets

DBT_PROJECT_DIR = Path(__file__).resolve().parents[1] / "dbt_models"
MARTS_GROUP = "marts"
REGISTRY_GROUP = "registry"  # the dbt sources no Dagster asset writes (external_sources)
MARTS_FRESHNESS = dg.FreshnessPolicy.time_window(
    fail_window=timedelta(hours=26), warn_window=timedelta(hours=25)
)
# dbt scrubs the values of DBT_ENV_SECRET_* variables from its logs
PASSWORD_VARIABLE = "DBT_ENV_SECRET_IIOT_PASSWORD"  # noqa: S105 - a name, not a password
# `dbt parse` renders the profile but never connects: values for the variables nobody set
PARSE_PLACEHOLDERS = {
    "DBT_IIOT_HOST": "localhost",
    "DBT_IIOT_PORT": "5432",
    "DBT_IIOT_USER": "iiot",
    "DBT_IIOT_DBNAME": "iiot",
}
_PROJECT_SOURCES = ("dbt_project.yml", "profiles.yml", "models", "macros", "tests")
PARSE_TIMEOUT_S = 300
_VENV_DBT = Path(sys.executable).with_name("dbt")
DBT_EXECUTABLE = str(_VENV_DBT) if _VENV_DBT.exists() else "dbt"


def dbt_connection_env(database_url: str, role: str | None = "platform_rw") -> dict[str, str]:
    """The variables dbt_models/profiles.yml reads, from a postgresql:// URL (libpq defaults)
    and the role dbt sets on connecting, as the ``postgres`` resource does (none when empty):
    the relations dbt creates belong to that role, not to whichever login ran the build."""
    params = conninfo_to_dict(database_url)
    return {
        "DBT_IIOT_HOST": params.get("host") or "localhost",
        "DBT_IIOT_PORT": str(params.get("port") or 5432),
        "DBT_IIOT_USER": params.get("user") or getpass.getuser(),
        PASSWORD_VARIABLE: params.get("password") or "",
        "DBT_IIOT_DBNAME": params.get("dbname") or params.get("user") or getpass.getuser(),
        "DBT_IIOT_SSLMODE": params.get("sslmode") or "prefer",
        "DBT_IIOT_ROLE": role or "",
    }


@contextmanager
def environment(variables: Mapping[str, str]) -> Iterator[None]:
    """Set ``variables`` in this process's environment, which dbt inherits, then restore it."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _manifest_is_current(project: DbtProject) -> bool:
    if not project.manifest_path.exists():
        return False
    built = project.manifest_path.stat().st_mtime
    for name in _PROJECT_SOURCES:
        path = project.project_dir / name
        files = path.rglob("*") if path.is_dir() else [path]
        if any(f.stat().st_mtime > built for f in files if f.exists()):
            return False
    return True


def prepare_manifest(project: DbtProject) -> Path:
    """Run ``dbt parse`` (offline, no database) when the manifest is missing or older than a file
    of the project, so the code location loads in a fresh clone and right after an edit; under
    ``dagster dev`` always, as dagster-dbt's ``prepare_if_dev`` does. Processes that load the
    code at the same time parse once: the others wait for the lock, then find it current."""
    dev = project.preparer.using_dagster_dev()
    if _manifest_is_current(project) and not dev:
        return project.manifest_path
    project.manifest_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(project.manifest_path.with_suffix(".lock"), timeout=PARSE_TIMEOUT_S):
        if dev or not _manifest_is_current(project):
            unset = {k: v for k, v in PARSE_PLACEHOLDERS.items() if k not in os.environ}
            with environment(unset):
                dbt_resource(project).cli(
                    ["parse", "--quiet"], target_path=project.target_path
                ).wait()
    return project.manifest_path


def dbt_resource(project: DbtProject | None = None) -> DbtCliResource:
    """The dbt CLI over dbt_models/, as the `marts` asset expects it under the key ``dbt``: the
    ``dbt`` of this Python environment, which need not be on PATH."""
    return DbtCliResource(project_dir=project or DBT_PROJECT, dbt_executable=DBT_EXECUTABLE)


DBT_PROJECT = DbtProject(project_dir=DBT_PROJECT_DIR)
prepare_manifest(DBT_PROJECT)


class MartsTranslator(DagsterDbtTranslator):
    """Every dbt model in the `marts` group, owned by the data team."""

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        return MARTS_GROUP

    def get_owners(self, dbt_resource_props: Mapping[str, Any]) -> list[str] | None:
        return ["team:data"]

    def get_asset_spec(self, manifest: Mapping[str, Any], unique_id: str, project: Any) -> Any:
        """Each model's spec, with the marts' freshness policy: rebuilt daily at 00:45 UTC."""
        spec = super().get_asset_spec(manifest, unique_id, project)
        return dg.apply_freshness_policy(spec, MARTS_FRESHNESS)


def external_sources(
    manifest: Mapping[str, Any], translator: DagsterDbtTranslator
) -> list[dg.AssetSpec]:
    """The dbt sources a model reads that no Dagster asset writes (no ``meta.dagster.asset_key``
    in dbt_models' sources, unlike the rollups): external assets of the `registry` group, under
    the keys dagster-dbt gives the models' dependencies. Without them the UI's lineage shows those
    keys as stubs outside every group."""
    read = {
        parent
        for node, parents in manifest["parent_map"].items()
        if node.startswith("model.")
        for parent in parents
    }
    specs = []
    for unique_id in sorted(read & manifest["sources"].keys()):
        source = manifest["sources"][unique_id]
        if "asset_key" in (source.get("meta") or {}).get("dagster", {}):
            continue  # a Dagster asset's table: the dependency is that asset
        key = translator.get_asset_spec(manifest, unique_id, DBT_PROJECT).key
        specs.append(
            dg.AssetSpec(
                key,
                group_name=REGISTRY_GROUP,
                kinds={"postgres"},
                owners=["team:platform"],
                description=f"{source['description'].strip()} Table {source['schema']}."
                f"{source['name']}, written by the iiot CLI and API (docs/schema.md); read by the "
                f"marts as the dbt source {source['source_name']}.{source['name']}.",
            )
        )
    return specs


# an AssetsDefinition of the specs (external: nothing to execute), not the specs themselves,
# so that load_assets_from_modules finds it with the marts
registry_sources = dg.AssetsDefinition(
    specs=external_sources(json.loads(DBT_PROJECT.manifest_path.read_text()), MartsTranslator())
)


@dbt_assets(
    manifest=DBT_PROJECT.manifest_path,
    project=DBT_PROJECT,
    dagster_dbt_translator=MartsTranslator(),
    name="marts",
)
@retry_transient
def marts(
    context: dg.AssetExecutionContext, dbt: DbtCliResource, postgres: PostgresResource
) -> Iterator[Any]:
    """`dbt build`: the staging views, then the consumption marts per tenant-local day and month
    and the device comparison, each followed by its dbt tests (asset checks)."""
    with environment(dbt_connection_env(postgres.database_url, postgres.role)):
        invocation = dbt.cli(["build"], context=context)  # dbt starts here, with this environment
    yield from invocation.stream()


if __name__ == "__main__":
    from iiot_orchestration.settings import load_settings

    url = load_settings().require_database_url()
    for name, value in dbt_connection_env(url).items():
        print(f"export {name}={shlex.quote(value)}")
