"""The tenant API's contract: the OpenAPI document a real `iiot api` serves is the committed
docs/api/openapi.json (`.venv/bin/python ops/api_openapi.py` regenerates it), its interactive
docs are served, and property-based tests generated from the document (schemathesis) find no
5xx and no response off its schema: every operation, with a key of exactly its least role, on a
database with two tenants' devices, readings, rollups and marts."""

from __future__ import annotations

import importlib.util
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, assume, settings

from tests.api_helpers import (
    SEED_START,
    ApiServer,
    Tenant,
    platform_key,
    running_api,
    seed_tenant,
)
from tests.conftest import REPO_ROOT, create_database, drop_database


def _load_generator():
    spec = importlib.util.spec_from_file_location("api_openapi", REPO_ROOT / "ops/api_openapi.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _load_generator()
COMMITTED: Path = GENERATOR.DOCUMENT
REGENERATE = f"run `{GENERATOR.COMMAND}` and commit docs/api/openapi.json"
DOCUMENT = GENERATOR.openapi_document()
BUILD_MARTS = True  # the consumption operations answer from the marts


@dataclass
class SeededApi:
    """A running `iiot api` on a database of its own: acme and globex with devices, readings
    and a key of each role, and a platform key."""

    server: ApiServer
    database_url: str
    data_dir: Path  # the server's IIOT_DATA_DIR (reports and invoices under reports/)
    acme: Tenant
    globex: Tenant
    platform: str


def build_marts(url: str) -> None:
    """The rollups of the seeded days and the marts (dbt), as the nightly jobs build them: the
    consumption operations answer from them (503 marts_not_built before)."""
    import dagster as dg

    from assets.marts import dbt_resource, marts
    from assets.rollups import telemetry_daily, telemetry_hourly
    from iiot_orchestration.resources import PostgresResource

    resources = {"postgres": PostgresResource(database_url=url)}
    days = {
        "dagster/asset_partition_range_start": f"{SEED_START - timedelta(days=1):%Y-%m-%d}",
        "dagster/asset_partition_range_end": f"{SEED_START + timedelta(days=1):%Y-%m-%d}",
    }
    assert dg.materialize([telemetry_hourly, telemetry_daily], tags=days, resources=resources)
    assert dg.materialize([marts], resources={**resources, "dbt": dbt_resource()})


@pytest.fixture(scope="module")
def seeded_api(request, pg_server, template_database, tmp_path_factory) -> Iterator[SeededApi]:
    """One server for a whole test module: the matrices and the property-based tests make
    hundreds of requests each, and none needs a pristine database. A module that sets
    ``BUILD_MARTS = True`` gets the marts built too (half a minute of dbt)."""
    name = f"iiot_t_{uuid.uuid4().hex[:12]}"
    url = create_database(pg_server, name, template=template_database)
    try:
        with psycopg.connect(url) as conn:
            acme = seed_tenant(conn, "acme", octet=1)
            globex = seed_tenant(conn, "globex", octet=2)
            platform = platform_key(conn)
        if getattr(request.module, "BUILD_MARTS", False):
            build_marts(url)
        home = tmp_path_factory.mktemp("api")
        with running_api(url, home) as server:
            yield SeededApi(server, url, home / "var", acme, globex, platform)
    finally:
        drop_database(pg_server, name)


def differences(committed: dict, served: dict) -> list[str]:
    """What changed, one line per operation, component or other top-level part."""
    lines: list[str] = []

    def compare(old: dict, new: dict, name_of) -> None:
        for key in sorted(old.keys() | new.keys(), key=str):
            if key not in new:
                lines.append(f"removed {name_of(key)}")
            elif key not in old:
                lines.append(f"added {name_of(key)}")
            elif old[key] != new[key]:
                lines.append(f"changed {name_of(key)}")

    old_paths, new_paths = committed.get("paths", {}), served.get("paths", {})
    for path in sorted(old_paths.keys() | new_paths.keys()):
        compare(
            old_paths.get(path, {}), new_paths.get(path, {}), lambda m, p=path: f"{m.upper()} {p}"
        )
    old_parts, new_parts = committed.get("components", {}), served.get("components", {})
    for part in sorted(old_parts.keys() | new_parts.keys()):
        compare(old_parts.get(part, {}), new_parts.get(part, {}), lambda n, p=part: f"{p} {n}")
    rest = (committed.keys() | served.keys()) - {"paths", "components"}
    compare({k: committed.get(k) for k in rest}, {k: served.get(k) for k in rest}, str)
    return lines


# --- the committed document ------------------------------------------------------------------


def test_the_served_document_is_the_committed_one(seeded_api):
    with seeded_api.server.client() as client:
        served = client.get("/api/v1/openapi.json")
    assert served.status_code == 200
    assert COMMITTED.is_file(), f"{COMMITTED} is missing: {REGENERATE}"
    committed = json.loads(COMMITTED.read_text(encoding="utf-8"))
    changes = differences(committed, served.json())
    assert not changes, (
        "the served OpenAPI document is not docs/api/openapi.json:\n  "
        + "\n  ".join(changes)
        + f"\n{REGENERATE}"
    )


def test_the_committed_file_is_the_generators_output():
    """Byte for byte, so that regenerating it leaves no diff of formatting alone."""
    assert COMMITTED.read_text(encoding="utf-8") == GENERATOR.render(DOCUMENT), REGENERATE


def test_the_generator_checks_and_writes(tmp_path, capsys):
    target = tmp_path / "openapi.json"
    assert GENERATOR.main(["--check", "-o", str(target)]) == 1
    assert GENERATOR.COMMAND in capsys.readouterr().out
    assert GENERATOR.main(["-o", str(target)]) == 0
    assert GENERATOR.main(["--check", "-o", str(target)]) == 0
    assert json.loads(target.read_text())["paths"]


def test_the_document_is_openapi_3_1_with_the_error_envelope_everywhere():
    assert DOCUMENT["openapi"].startswith("3.1.")
    assert DOCUMENT["info"]["version"]
    envelope = {"$ref": "#/components/schemas/ErrorEnvelope"}
    keyed = 0
    for path, operations in DOCUMENT["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            assert operation.get("summary"), f"{where} has no summary"
            if "x-iiot-role" not in operation:
                continue
            keyed += 1
            assert path.startswith("/api/v1/"), where
            assert operation["x-iiot-role"] in ("viewer", "editor", "admin", "platform"), where
            for status in ("401", "403", "404", "422", "429", "500"):
                response = operation["responses"].get(status)
                assert response, f"{where} does not document {status}"
                schema = response["content"]["application/json"]["schema"]
                assert schema == envelope, f"{where}: {status} is not the error envelope"
    assert keyed >= 5


def test_the_interactive_docs_are_served(seeded_api):
    with seeded_api.server.client() as client:
        docs = client.get("/api/v1/docs")
        redoc = client.get("/api/v1/redoc")
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]
    assert "swagger-ui" in docs.text
    assert "/api/v1/openapi.json" in docs.text
    assert redoc.status_code == 200
    assert "/api/v1/openapi.json" in redoc.text


# --- property-based tests --------------------------------------------------------------------

# A schema-valid request may still be refused by a rule a JSON schema cannot state (a cursor
# that decodes to nothing, a threshold that a rule's kind needs): 400 and 422 in the envelope.
# Everything else stays strict: no 5xx, every response's status, content type, headers and body
# as documented, 405 with an Allow header naming every method of the path.
CONFIG = schemathesis.Config.from_dict(
    {
        "checks": {
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "400", "401", "403", "404", "409", "422", "429"]
            }
        }
    }
)
SCHEMA = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)
# 15 examples of each operation (and the coverage phase's boundary cases), once, with a key of
# exactly the operation's least role: the whole file stays within a few minutes
PROPERTY_SETTINGS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    derandomize=True,
)


def operations_of(*roles: str | None) -> list[str]:
    """The operation ids whose least role is one of ``roles`` (None: no key needed)."""
    return [
        operation["operationId"]
        for operations in DOCUMENT["paths"].values()
        for operation in operations.values()
        if operation.get("x-iiot-role") in roles
    ] or ["(none)"]


def _call(case, seeded: SeededApi, key: str) -> None:
    case.call_and_validate(base_url=seeded.server.url, headers={"Authorization": f"Bearer {key}"})


@SCHEMA.include(operation_id=operations_of(None, "viewer")).parametrize()
@PROPERTY_SETTINGS
def test_every_viewer_operation_keeps_its_contract(case, seeded_api):
    _call(case, seeded_api, seeded_api.acme.keys["viewer"])


@SCHEMA.include(operation_id=operations_of("editor")).parametrize()
@PROPERTY_SETTINGS
def test_every_editor_operation_keeps_its_contract(case, seeded_api):
    _call(case, seeded_api, seeded_api.acme.keys["editor"])


@SCHEMA.include(operation_id=operations_of("admin")).parametrize()
@PROPERTY_SETTINGS
def test_every_admin_operation_keeps_its_contract(case, seeded_api):
    # the run's own key stays: revoking it would leave the rest of the run a row of 401s
    assume(
        case.path_parameters is None
        or seeded_api.acme.key_ids["admin"] not in {case.path_parameters.get("key_id")}
    )
    _call(case, seeded_api, seeded_api.acme.keys["admin"])


@SCHEMA.include(operation_id=operations_of("platform")).parametrize()
@PROPERTY_SETTINGS
def test_every_platform_operation_keeps_its_contract(case, seeded_api):
    _call(case, seeded_api, seeded_api.platform)
