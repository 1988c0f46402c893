"""Authorization of the tenant API, generically over its OpenAPI document: every operation that
needs a key (``x-iiot-role``) refuses lesser roles with 403 and every key without one with 401,
lets its role and those above it through, wants X-IIOT-Tenant from a platform key; and with
another tenant's ids, any operation answers 404 exactly as for an id that does not exist.

A new route is covered as soon as it is in the document. A new kind of path parameter needs a
way to get a tenant's real id of it: one line in PATH_IDS (the tests fail naming it until then).
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from iiot_orchestration import registry
from iiot_orchestration.api import keys
from iiot_orchestration.api.context import RANKS, TENANT_HEADER
from tests.api_helpers import Tenant, assert_envelope
from tests.test_api_contract import DOCUMENT, SeededApi, seeded_api  # noqa: F401 - fixture

KEY_ROLES = ("viewer", "editor", "admin", "platform")
# operations a platform key may call without naming a tenant, besides those of role platform
TENANT_FREE = {"GET /api/v1/me"}


# --- a tenant's real ids, by path parameter ----------------------------------------------------


@dataclass
class World:
    """What the id makers need: a superuser connection (autocommit) and the server's files."""

    conn: psycopg.Connection
    data_dir: Path
    serial: Iterator[int]


def _new_key(world: World, tenant: Tenant) -> int:
    return keys.create(
        world.conn, tenant=tenant.slug, role="viewer", name="authz probe", actor="test"
    ).key_id


def _new_device(world: World, tenant: Tenant) -> int:
    n = next(world.serial)
    mac = f"02:aa:{tenant.tenant_id % 256:02x}:00:{n // 256 % 256:02x}:{n % 256:02x}"
    request = registry.DeviceRequest(mac=mac, meter_kind="energy", name=f"{tenant.slug}-probe-{n}")
    (result,) = registry.provision_devices(world.conn, tenant.slug, [request], actor="test")
    assert result.device_id, result
    return result.device_id


def _new_rule(world: World, tenant: Tenant) -> int:
    return world.conn.execute(
        "INSERT INTO alert_rules (tenant_id, metric, name, kind, threshold, severity, created_by)"
        " VALUES (%s, 'energy_kwh', %s, 'above', 100, 'WARNING', 'test') RETURNING rule_id",
        (tenant.tenant_id, f"{tenant.slug} probe rule"),
    ).fetchone()[0]


def _new_alert(world: World, tenant: Tenant) -> int:
    return world.conn.execute(
        "INSERT INTO alerts (tenant_id, device_id, source, alert_key, severity, title)"
        " VALUES (%s, %s, 'threshold', %s, 'WARNING', %s) RETURNING alert_id",
        (tenant.tenant_id, tenant.devices[0], uuid.uuid4().hex, f"{tenant.slug} probe alert"),
    ).fetchone()[0]


def _files(world: World, tenant: Tenant, period: str, stem: str) -> None:
    """The PDF and XLSX of a period under the server's IIOT_REPORTS_ROOT (its default)."""
    folder = world.data_dir / "reports" / tenant.slug / period
    folder.mkdir(parents=True, exist_ok=True)
    for ext in ("pdf", "xlsx"):
        (folder / f"{stem}.{ext}").write_bytes(b"probe\n")


def _month(world: World) -> date:
    """A month of its own for each call (2000-02 onwards: reports know years 2000 to 2100)."""
    n = next(world.serial)
    return date(2000 + n // 12, n % 12 + 1, 1)


def _new_invoice(world: World, tenant: Tenant) -> int:
    start = _month(world)
    end = date(start.year + start.month // 12, start.month % 12 + 1, 1)
    _files(world, tenant, f"{start:%Y-%m}", "invoice")
    return world.conn.execute(
        "INSERT INTO invoices (tenant_id, period, period_start, period_end, status, currency,"
        " total, inputs_sha256, days_billed) VALUES (%s, %s, %s, %s, 'draft', 'BRL', 1, 'x', 1)"
        " RETURNING invoice_id",
        (tenant.tenant_id, start, start, end),
    ).fetchone()[0]


def _new_report_run(world: World, tenant: Tenant) -> str:
    run_id = str(uuid.uuid4())
    registry.audit(
        world.conn,
        actor="test",
        action="report.requested",
        entity="report_run",
        entity_id=run_id,
        tenant_id=tenant.tenant_id,
        detail={"period": "2026-10"},
    )
    return run_id


def _new_report_period(world: World, tenant: Tenant) -> str:
    """A month whose report files the tenant has, and no other tenant."""
    period = f"{_month(world):%Y-%m}"
    _files(world, tenant, period, "consumption")
    return period


@dataclass(frozen=True)
class Ids:
    """How to get a path parameter's value: ``real`` makes (or picks) an object of the tenant
    and returns its id; ``missing`` is an id no tenant has."""

    real: Callable[[World, Tenant], Any]
    missing: Any = 2_000_000_000


# one line per kind of path parameter; a parameter with an enum needs none (its first value)
PATH_IDS: dict[str, Ids] = {
    "key_id": Ids(_new_key),
    "device_id": Ids(_new_device),
    "rule_id": Ids(_new_rule),
    "alert_id": Ids(_new_alert),
    "invoice_id": Ids(_new_invoice),
    "run_id": Ids(_new_report_run, missing="00000000-0000-4000-8000-000000000000"),
    "period": Ids(_new_report_period, missing="2000-01"),
}


def _schema(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = DOCUMENT
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


# Bodies of the cross-tenant requests where the least valid one (required properties only) is
# refused before the id is looked up; one line per such operation.
BODIES: dict[str, Any] = {
    "PATCH /api/v1/devices/{device_id}": {"name": "renamed"},
}


# --- the document's operations -----------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    spec: dict[str, Any]

    @property
    def role(self) -> str | None:
        return self.spec.get("x-iiot-role")

    @property
    def name(self) -> str:
        return f"{self.method} {self.path}"

    def parameters(self, where: str) -> list[dict[str, Any]]:
        return [p for p in self.spec.get("parameters", []) if p["in"] == where]

    def id_parameters(self) -> list[str]:
        return [p["name"] for p in self.parameters("path") if "enum" not in _schema(p["schema"])]


def _operations() -> list[Operation]:
    return [
        Operation(method.upper(), path, spec)
        for path, methods in DOCUMENT["paths"].items()
        for method, spec in methods.items()
    ]


OPERATIONS = _operations()
KEYED = [op for op in OPERATIONS if op.role]
WITH_IDS = [op for op in KEYED if op.id_parameters()]


def minimal(schema: dict[str, Any]) -> Any:
    """The least value a JSON schema accepts, as far as the API's schemas need: required
    properties only, the first enum value or option, the lower bound."""
    schema = _schema(schema)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if "examples" in schema:
        return schema["examples"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = [o for o in schema[key] if _schema(o).get("type") != "null"]
            return minimal(options[0])
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next(k for k in kind if k != "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {name: minimal(props.get(name, {})) for name in schema.get("required", [])}
    if kind == "array":
        return [minimal(schema.get("items", {}))] * schema.get("minItems", 0)
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0) + 1)
        return max(low, 1) if "maximum" not in schema else min(max(low, 1), schema["maximum"])
    if kind == "boolean":
        return False
    formats = {
        "date-time": "2026-11-02T00:00:00Z",
        "date": "2026-11-02",
        "uuid": "00000000-0000-4000-8000-000000000000",
    }
    if schema.get("format") in formats:
        return formats[schema["format"]]
    return "x" * max(schema.get("minLength", 1), 1)


def _body(op: Operation) -> Any:
    if op.name in BODIES:
        return BODIES[op.name]
    content = op.spec.get("requestBody", {}).get("content", {})
    if "application/json" not in content:
        return None
    return minimal(content["application/json"].get("schema", {}))


def _query(op: Operation) -> dict[str, Any]:
    return {p["name"]: minimal(p["schema"]) for p in op.parameters("query") if p.get("required")}


def _path(op: Operation, values: dict[str, Any]) -> str:
    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name in values:
            return str(values[name])
        (param,) = [p for p in op.parameters("path") if p["name"] == name]
        return str(minimal(param["schema"]))

    return re.sub(r"\{([^}:]+)\}", fill, op.path)


def _missing_entries(op: Operation) -> list[str]:
    return [name for name in op.id_parameters() if name not in PATH_IDS]


def _require_entries(op: Operation) -> None:
    missing = _missing_entries(op)
    if missing:
        pytest.fail(
            f"{op.name}: no way to get a tenant's real {', '.join(missing)}: add "
            f"{', '.join(repr(m) for m in missing)} to PATH_IDS in tests/test_api_authz.py "
            "(a function that makes or picks an object of a tenant and returns its id)"
        )


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(seeded_api: SeededApi) -> Iterator[World]:  # noqa: F811 - the fixture imported above
    with psycopg.connect(seeded_api.database_url, autocommit=True) as conn:
        yield World(conn, seeded_api.data_dir, itertools.count(1))


def _ids(world: World, tenant: Tenant, op: Operation) -> dict[str, Any]:
    _require_entries(op)
    return {name: PATH_IDS[name].real(world, tenant) for name in op.id_parameters()}


def _send(
    server_url: str,
    op: Operation,
    *,
    key: str | None,
    ids: dict[str, Any],
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    sent = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=server_url, timeout=60) as client:
        return client.request(
            op.method,
            _path(op, ids),
            params=_query(op),
            json=body if op.spec.get("requestBody") else None,
            headers={**sent, **(headers or {})},
        )


def _key_of(seeded: SeededApi, role: str) -> tuple[str, dict[str, str]]:
    """The key of ``role`` (acme's, or the platform key acting for acme) and its headers."""
    if role == "platform":
        return seeded.platform, {TENANT_HEADER: "acme"}
    return seeded.acme.keys[role], {}


# --- the tests ---------------------------------------------------------------------------------


def test_the_document_names_a_least_role_for_every_api_operation():
    unkeyed = [op.name for op in OPERATIONS if not op.role and op.path.startswith("/api/v1/")]
    documents = {"/api/v1/openapi.json", "/api/v1/docs", "/api/v1/redoc"}
    assert [n for n in unkeyed if n.split()[1] not in documents] == []
    assert {op.role for op in KEYED} <= set(RANKS)
    assert len(KEYED) >= 5


def test_every_kind_of_path_parameter_has_a_way_to_get_a_tenants_id():
    """A new path parameter fails here until PATH_IDS says how to get a tenant's real one."""
    missing = sorted({name for op in KEYED for name in _missing_entries(op)})
    assert not missing, (
        f"path parameters without an entry in PATH_IDS (tests/test_api_authz.py): {missing}: "
        "add one line each, so that the role matrix and the cross-tenant test cover them"
    )


@pytest.mark.parametrize("op", KEYED, ids=lambda op: op.name)
def test_without_a_key_every_operation_answers_401(seeded_api, op):  # noqa: F811
    response = _send(seeded_api.server.url, op, key=None, ids={}, body={})
    error = assert_envelope(response, 401, "unauthenticated")
    assert response.headers.get("www-authenticate", "").startswith("Bearer"), op.name
    assert error["details"] is None


@pytest.mark.parametrize("op", KEYED, ids=lambda op: op.name)
@pytest.mark.parametrize("role", KEY_ROLES)
def test_a_role_below_the_operations_gets_403_and_at_or_above_gets_through(
    seeded_api,  # noqa: F811
    world,
    op,
    role,
):
    key, headers = _key_of(seeded_api, role)
    if op.role == "platform":
        headers = {}  # a platform operation acts for no tenant
    ids = _ids(world, seeded_api.acme, op)  # the caller's own objects
    response = _send(seeded_api.server.url, op, key=key, ids=ids, body={}, headers=headers)
    if RANKS[role] < RANKS[op.role]:
        error = assert_envelope(response, 403, "forbidden")
        assert op.role in error["message"], error
    else:
        assert response.status_code not in (401, 403), (op.name, role, response.text)


@pytest.mark.parametrize(
    "op", [op for op in KEYED if op.role != "platform"], ids=lambda op: op.name
)
def test_a_platform_key_must_name_the_tenant_it_acts_for(seeded_api, world, op):  # noqa: F811
    ids = _ids(world, seeded_api.acme, op)
    response = _send(seeded_api.server.url, op, key=seeded_api.platform, ids=ids, body={})
    if op.name in TENANT_FREE:
        assert response.status_code == 200, response.text
    else:
        error = assert_envelope(response, 400, "tenant_required")
        assert TENANT_HEADER in error["message"]


def _mask(text: str, values: dict[str, Any]) -> str:
    for value in sorted((str(v) for v in values.values()), key=len, reverse=True):
        text = text.replace(value, "<id>")
    return text


def _audit_rows(world: World, tenant: Tenant) -> int:
    return world.conn.execute(
        "SELECT count(*) FROM audit_log WHERE tenant_id = %s", (tenant.tenant_id,)
    ).fetchone()[0]


@pytest.mark.parametrize("op", WITH_IDS, ids=lambda op: op.name)
def test_another_tenants_ids_are_404_as_ids_that_do_not_exist(
    seeded_api,  # noqa: F811
    world,
    op,
):
    """acme's admin (at or above every tenant operation) with globex's real ids: the answer is
    the one for ids nobody has, with the ids masked; nothing of globex shows, and globex gains
    no audit row (every write leaves one). globex's admin, with the same request, is not told
    they do not exist."""
    _require_entries(op)
    if op.role == "platform":
        pytest.skip("a platform operation has no tenant to cross")
    globex = seeded_api.globex
    theirs = _ids(world, globex, op)
    nobody = {name: PATH_IDS[name].missing for name in op.id_parameters()}
    key = seeded_api.acme.keys["admin"]
    before = _audit_rows(world, globex)
    crossed = _send(seeded_api.server.url, op, key=key, ids=theirs, body=_body(op))
    absent = _send(seeded_api.server.url, op, key=key, ids=nobody, body=_body(op))
    assert absent.status_code == 404, (op.name, absent.text)
    error = assert_envelope(crossed, 404, absent.json()["error"]["code"])
    assert _mask(error["message"], theirs) == _mask(absent.json()["error"]["message"], nobody)
    assert error["details"] == absent.json()["error"]["details"]
    assert globex.slug not in crossed.text.lower(), op.name  # its name, devices, rules...
    assert _audit_rows(world, globex) == before, f"{op.name} wrote to globex"
    # and the ids are real: globex's own admin is not told they do not exist
    own = _send(seeded_api.server.url, op, key=globex.keys["admin"], ids=theirs, body=_body(op))
    assert own.status_code != 404, (op.name, own.text)
