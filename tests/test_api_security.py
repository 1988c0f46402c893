"""The tenant API's tables and functions (migration 0028) from the attacker's side, at the
database level (docs/security.md, "The tenant API").

The API connects as a login in app_rw and scopes each transaction to the tenant of the request's
key. What is tried here is what a bug in the API (or a request that reached raw SQL) could do
with such a session scoped to tenant A: read key digests, reach tenant B's keys, alerts, rules,
devices and claim codes, or mint a platform key. Then the trusted path itself:
iiot_api_authenticate() for revoked, expired and suspended tenants' keys and platform keys, and
a tenant login that tries the API's SECURITY DEFINER functions."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import sql

from iiot_orchestration import alerts, registry, tenant_logins
from iiot_orchestration.api import keys
from iiot_orchestration.db import query
from tests.conftest import create_database, drop_database

SLUGS = ("apisec-a", "apisec-b", "apisec-c")  # C is suspended
MACS = {
    "apisec-a": ["02:00:00:00:6a:01"],
    "apisec-b": ["02:00:00:00:6b:01", "02:00:00:00:6b:02"],
    "apisec-c": ["02:00:00:00:6c:01"],
}
OPEN_MAC, EXPIRED_MAC = "02:00:00:00:6d:01", "02:00:00:00:6d:02"
# What the API's functions are called with by a tenant login (it may execute none of them)
API_FUNCTIONS = {
    "iiot_api_authenticate": "(%s, NULL)",
    "iiot_api_tenants": "(%s)",
    "iiot_api_claim_take": "(%s)",
    "iiot_api_claim_complete": "(1, 1)",
}
KEY_COLUMNS = (
    "key_id",
    "tenant_id",
    "prefix",
    "key_sha256",
    "role",
    "name",
    "created_by",
    "created_at",
    "expires_at",
    "last_used_at",
    "revoked_at",
    "replaced_by",
)
ALERT_COLUMNS = {
    "tenant_id": "tenant_id",
    "state": "'resolved'",
    "resolved_at": "now()",
    "severity": "'CRITICAL'",
    "title": "'changed'",
    "detail": "'{}'",
    "rule_id": "NULL",
    "device_id": "device_id",
    "last_seen_at": "now()",
}


def digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


@dataclass(frozen=True)
class World:
    url: str
    tenants: dict[str, int]  # slug -> tenant_id
    devices: dict[str, list[int]]  # slug -> device ids
    keys: dict[str, keys.NewKey]  # what -> the key, shown once
    alerts: dict[str, int]  # slug -> alert_id
    rules: dict[str, int]  # slug -> rule_id
    codes: dict[str, bytes]  # what -> digest of a claim code

    @property
    def a(self) -> int:
        return self.tenants["apisec-a"]

    @property
    def b(self) -> int:
        return self.tenants["apisec-b"]

    def key_digest(self, what: str) -> bytes:
        return keys.digest(self.keys[what].key)


def build(url: str) -> World:
    """Three tenants (C suspended) with devices, keys of every kind and state, an alert and a
    rule each, a device secret of B's, and claim codes: open, expired, claimed by B."""
    with psycopg.connect(url, autocommit=True) as conn:
        tenants, devices = {}, {}
        for slug in SLUGS:
            tenant = registry.create_tenant(conn, slug=slug, name=slug, plan="pro", timezone="UTC")
            tenants[slug] = tenant.tenant_id
            provisioned = registry.provision_devices(
                conn, slug, [registry.DeviceRequest(mac, "energy") for mac in MACS[slug]]
            )
            devices[slug] = [p.device_id for p in provisioned]
        made = {
            "a": keys.create(conn, tenant="apisec-a", role="admin", name="a", actor="t"),
            "b": keys.create(conn, tenant="apisec-b", role="admin", name="b", actor="t"),
            "c": keys.create(conn, tenant="apisec-c", role="viewer", name="c", actor="t"),
            "platform": keys.create(conn, tenant=None, role=keys.PLATFORM, name="p", actor="t"),
            "revoked": keys.create(conn, tenant="apisec-a", role="admin", name="r", actor="t"),
            "expired": keys.create(conn, tenant="apisec-a", role="admin", name="e", actor="t"),
            "platform revoked": keys.create(
                conn, tenant=None, role=keys.PLATFORM, name="pr", actor="t"
            ),
        }
        for what in ("revoked", "platform revoked"):
            keys.revoke(conn, str(made[what].key_id), actor="t")
        conn.execute(
            "UPDATE api_keys SET created_at = now() - interval '2 days',"
            " expires_at = now() - interval '1 day' WHERE key_id = %s",
            (made["expired"].key_id,),
        )
        conn.execute("UPDATE tenants SET status = 'suspended' WHERE slug = 'apisec-c'")
        alert_ids, rule_ids = {}, {}
        for slug in SLUGS[:2]:
            rule_ids[slug] = alerts.add_rule(
                conn,
                tenant=slug,
                name="hot",
                kind="above",
                severity="WARNING",
                metric="energy_kwh",
                device_mac=MACS[slug][0],
                threshold=1e9,
            )
            alerts.raise_alert(
                conn,
                alerts.Alert(
                    key=f"apisec:{slug}",
                    severity="WARNING",
                    title="probe",
                    source="test",
                    tenant_id=tenants[slug],
                    device_id=devices[slug][0],
                ),
            )
            alert_ids[slug] = conn.execute(
                "SELECT alert_id FROM alerts WHERE alert_key = %s", (f"apisec:{slug}",)
            ).fetchone()[0]
        codes = {what: digest(f"claim code {what}") for what in ("open", "expired", "b")}
        conn.execute(
            "INSERT INTO device_claim_codes (code_sha256, mac, meter_kind, created_by, created_at,"
            " expires_at) VALUES (%s, %s, 'energy', 't', now(), NULL),"
            " (%s, %s, 'energy', 't', now() - interval '2 days', now() - interval '1 day')",
            (codes["open"], OPEN_MAC, codes["expired"], EXPIRED_MAC),
        )
        b, device_b = tenants["apisec-b"], devices["apisec-b"][0]
        conn.execute(
            "INSERT INTO device_claim_codes (code_sha256, mac, meter_kind, created_by, claimed_at,"
            " tenant_id, device_id) VALUES (%s, %s, 'energy', 't', now(), %s, %s)",
            (codes["b"], MACS["apisec-b"][0], b, device_b),
        )
        conn.execute(
            "INSERT INTO device_secrets (device_id, tenant_id, secret_sha256) VALUES (%s, %s, %s)",
            (device_b, b, digest("secret of b")),
        )
    return World(url, tenants, devices, made, alert_ids, rule_ids, codes)


@pytest.fixture(scope="module")
def world(pg_server: str, template_database: str) -> Iterator[World]:
    name = f"iiot_apisec_{uuid.uuid4().hex[:12]}"
    url = create_database(pg_server, name, template=template_database)
    try:
        yield build(url)
    finally:
        drop_database(pg_server, name)


@contextmanager
def service(world: World, tenant_id: int | None) -> Iterator[psycopg.Connection]:
    """app_rw as the API's pool makes it (SET ROLE on a superuser's connection), scoped to
    ``tenant_id`` for the whole session; every statement runs in its own transaction."""
    with psycopg.connect(world.url, autocommit=True) as conn:
        conn.execute("SET ROLE app_rw")
        conn.execute(
            "SELECT set_config('iiot.tenant_id', %s, false)",
            ("" if tenant_id is None else str(tenant_id),),
        )
        yield conn


@contextmanager
def as_role(world: World, role: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(world.url, autocommit=True) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        yield conn


def outcome(conn: psycopg.Connection, statement: str, params=()) -> str:
    """What ``statement`` did, rolled back: its SQLSTATE when refused, else `N rows`."""
    try:
        with conn.transaction(force_rollback=True):
            cursor = conn.execute(statement, params)
            if cursor.description is not None:
                return f"{len(cursor.fetchall())} rows"
            return f"{cursor.rowcount} rows"
    except psycopg.Error as exc:
        return exc.sqlstate or type(exc).__name__


def superuser_value(world: World, statement: str, params=()):
    with psycopg.connect(world.url) as conn:
        return conn.execute(statement, params).fetchone()


# --- API keys -------------------------------------------------------------------------------------


DIGESTS = {
    "api_keys": "key_sha256",
    "device_claim_codes": "code_sha256",
    "device_secrets": "secret_sha256",
}


def test_the_service_reads_no_digest(world):
    """app_rw reads every column of api_keys and device_secrets but the digest, and nothing of
    device_claim_codes, whatever tenant it sets."""
    for tenant_id in (world.a, world.b, None):
        with service(world, tenant_id) as conn:
            for table, column in DIGESTS.items():
                for statement in (
                    f"SELECT {column} FROM {table}",
                    f"SELECT * FROM {table}",
                    f"SELECT count(*) FROM {table} WHERE {column} = %s",
                    f"SELECT t FROM {table} t",  # the whole row as one value
                ):
                    params = (world.key_digest("a"),) if "%s" in statement else ()
                    assert outcome(conn, statement, params) == "42501", (tenant_id, statement)
            readable = ", ".join(c for c in KEY_COLUMNS if c != "key_sha256")
            assert outcome(conn, f"SELECT {readable} FROM api_keys") != "42501"
            assert outcome(conn, "SELECT device_id, tenant_id, created_at FROM device_secrets") != (
                "42501"
            )
    with as_role(world, "platform_rw") as conn:
        assert conn.execute("SELECT count(key_sha256) FROM api_keys").fetchone()[0] == 7


def test_the_auditor_reads_no_digest(world):
    with as_role(world, "readonly_audit") as conn:
        found = {
            table: outcome(conn, f"SELECT {column} FROM {table}")
            for table, column in DIGESTS.items()
        }
        assert found == dict.fromkeys(DIGESTS, "42501")


def test_the_service_sees_its_own_tenants_keys_only(world):
    with service(world, world.a) as conn:
        seen = conn.execute("SELECT key_id, tenant_id FROM api_keys").fetchall()
        assert {tenant for _, tenant in seen} == {world.a}
        assert {key for key, _ in seen} == {
            world.keys[w].key_id for w in ("a", "revoked", "expired")
        }
        for other in ("b", "platform"):
            key_id = world.keys[other].key_id
            found = "SELECT prefix FROM api_keys WHERE key_id = %s"
            assert conn.execute(found, (key_id,)).fetchone() is None
            # revoking or extending another tenant's key (or a platform key) finds no row
            for change in ("revoked_at = now()", "expires_at = NULL", "replaced_by = NULL"):
                statement = f"UPDATE api_keys SET {change} WHERE key_id = %s"
                assert outcome(conn, statement, (key_id,)) == "0 rows", (other, change)
    with service(world, None) as conn:
        assert conn.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 0


def test_the_service_mints_keys_of_its_own_tenant_only(world):
    """Neither a key of tenant B nor a platform key, however the INSERT is put; a key of its
    own tenant, as an admin's POST /api/v1/api-keys makes it."""
    insert = (
        "INSERT INTO api_keys (tenant_id, prefix, key_sha256, role, name, created_by)"
        " VALUES (%s, %s, %s, %s, 'sneaky', 'api-key:1')"
    )
    with service(world, world.a) as conn:
        for tenant_id, role in (
            (world.b, "admin"),
            (world.b, "viewer"),
            (None, "platform"),  # a platform key belongs to no tenant
            (world.a, "platform"),  # refused by the policy, or the table's own check
        ):
            prefix, key = keys.generate()
            state = outcome(conn, insert, (tenant_id, prefix, keys.digest(key), role))
            assert state in ("42501", "23514"), (tenant_id, role, state)
            assert state == "42501" or tenant_id == world.a, (tenant_id, role, state)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            keys.create(conn, tenant=None, tenant_id=world.b, role="admin", name="x", actor="t")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            keys.create(conn, tenant=None, role=keys.PLATFORM, name="x", actor="t")
        # the columns the platform alone sets
        prefix, key = keys.generate()
        for column, value in (("key_id", 10**9), ("last_used_at", datetime.now(UTC))):
            statement = (
                f"INSERT INTO api_keys (tenant_id, prefix, key_sha256, role, name, created_by,"
                f" {column}) OVERRIDING SYSTEM VALUE VALUES (%s, %s, %s, 'viewer', 'x', 't', %s)"
            )
            assert outcome(conn, statement, (world.a, prefix, keys.digest(key), value)) == "42501"
        with conn.transaction(force_rollback=True):
            new = keys.create(
                conn, tenant=None, tenant_id=world.a, role="admin", name="x", actor="t"
            )
            assert conn.execute(
                "SELECT tenant_id, role FROM iiot_api_authenticate(%s)", (keys.digest(new.key),)
            ).fetchone() == (world.a, "admin")
    with service(world, None) as conn:  # no tenant: no key at all
        prefix, key = keys.generate()
        assert outcome(conn, insert, (world.a, prefix, keys.digest(key), "viewer")) == "42501"


def test_the_service_changes_only_a_keys_expiry_revocation_and_successor(world):
    own = world.keys["a"].key_id
    with service(world, world.a) as conn:
        for column in ("expires_at", "revoked_at", "replaced_by"):
            statement = f"UPDATE api_keys SET {column} = {column} WHERE key_id = %s"
            assert outcome(conn, statement, (own,)) == "1 rows", column
        for column in set(KEY_COLUMNS) - {"expires_at", "revoked_at", "replaced_by", "key_id"}:
            statement = f"UPDATE api_keys SET {column} = {column} WHERE key_id = %s"
            assert outcome(conn, statement, (own,)) == "42501", column
        assert outcome(conn, "DELETE FROM api_keys WHERE key_id = %s", (own,)) == "42501"
        # the key's tenant and role stay: no UPDATE right on either, whatever the value
        assert outcome(conn, "UPDATE api_keys SET tenant_id = %s", (world.b,)) == "42501"
        assert outcome(conn, "UPDATE api_keys SET role = 'platform'") == "42501"


# --- claim codes and device secrets ---------------------------------------------------------


def test_the_service_reads_and_writes_no_claim_code(world):
    with service(world, world.b) as conn:
        for statement in (
            "SELECT count(*) FROM device_claim_codes",
            "SELECT claim_id FROM device_claim_codes WHERE tenant_id = %s",
            "UPDATE device_claim_codes SET claimed_at = now(), tenant_id = %s",
            "DELETE FROM device_claim_codes WHERE tenant_id = %s",
            "INSERT INTO device_claim_codes (code_sha256, mac, meter_kind, created_by)"
            " VALUES (sha256('x'), '02:00:00:00:6e:01', 'gas', %s::text)",
        ):
            params = (world.b,) if "%s" in statement else ()
            assert outcome(conn, statement, params) == "42501", statement
    with as_role(world, "readonly_audit") as conn:
        assert outcome(conn, "SELECT claim_id, mac, tenant_id FROM device_claim_codes") == (
            "3 rows"
        )


def claim_state(world: World, code: bytes) -> tuple:
    return superuser_value(
        world,
        "SELECT claimed_at IS NOT NULL, tenant_id, device_id FROM device_claim_codes"
        " WHERE code_sha256 = %s",
        (code,),
    )


def test_a_claim_needs_a_tenant_and_an_open_code(world):
    """iiot_api_claim_take: nothing without a tenant (and the code stays open); nothing for an
    expired code, for a code claimed by another tenant, or an unknown one; the open code for a
    tenant, once; iiot_api_claim_complete records only the caller's own claim and device."""
    take = "SELECT claim_id, mac::text FROM iiot_api_claim_take(%s)"
    with service(world, None) as conn:
        assert conn.execute(take, (world.codes["open"],)).fetchall() == []
    assert claim_state(world, world.codes["open"]) == (False, None, None)
    with service(world, world.a) as conn:
        for what in ("expired", "b"):
            assert conn.execute(take, (world.codes[what],)).fetchall() == [], what
        assert conn.execute(take, (digest("no such code"),)).fetchall() == []
        assert conn.execute(take, (None,)).fetchall() == []
        assert claim_state(world, world.codes["b"])[1:] == (world.b, world.devices["apisec-b"][0])
        with conn.transaction(force_rollback=True):
            [(claim, mac)] = conn.execute(take, (world.codes["open"],)).fetchall()
            assert mac == OPEN_MAC
            assert conn.execute(take, (world.codes["open"],)).fetchall() == []  # once only
            complete = "SELECT iiot_api_claim_complete(%s, %s)"
            conn.execute(complete, (claim, world.devices["apisec-b"][1]))  # B's device: no
            assert claim_seen(conn, claim) == (world.a, None)
            conn.execute(complete, (claim, world.devices["apisec-a"][0]))
            assert claim_seen(conn, claim) == (world.a, world.devices["apisec-a"][0])
        # B's claimed code recorded for A's device: the claim is not A's
        conn.execute(
            "SELECT iiot_api_claim_complete(%s, %s)",
            (claim_id_of(world, "b"), world.devices["apisec-a"][0]),
        )
    assert claim_state(world, world.codes["open"]) == (False, None, None)
    assert claim_state(world, world.codes["b"])[1:] == (world.b, world.devices["apisec-b"][0])


def claim_seen(conn: psycopg.Connection, claim: int) -> tuple:
    """A claim's tenant and device as the superuser behind the service's SET ROLE sees them,
    inside the service's transaction."""
    conn.execute("RESET ROLE")
    try:
        return conn.execute(
            "SELECT tenant_id, device_id FROM device_claim_codes WHERE claim_id = %s", (claim,)
        ).fetchone()
    finally:
        conn.execute("SET ROLE app_rw")


def claim_id_of(world: World, what: str) -> int:
    return superuser_value(
        world,
        "SELECT claim_id FROM device_claim_codes WHERE code_sha256 = %s",
        (world.codes[what],),
    )[0]


def test_a_mac_waiting_for_its_claim_code_is_registered_by_claiming_it_only(world):
    """Tenant A registers the MAC of the open claim code (as the API's POST /devices does, with
    the registry's statement), or moves its own device onto it: refused as for a MAC another
    tenant holds (migration 0032), or the customer holding the code could no longer claim it."""
    device_a = world.devices["apisec-a"][0]
    provision = query("provision_device")
    values = {"tenant_id": world.a, "mac": OPEN_MAC, "name": "mine", "meter_kind": "energy"}
    with service(world, world.a) as conn:
        with conn.transaction(force_rollback=True):
            taken = conn.execute(
                provision, values | {"metrics": ["energy_kwh"], "actor": "api-key:1"}
            ).fetchall()
        moved = outcome(
            conn, "UPDATE devices SET mac = %s WHERE device_id = %s", (OPEN_MAC, device_a)
        )
    assert (taken, moved) == ([], "23505")


def test_the_tenant_that_takes_a_claim_code_registers_its_mac(world):
    """The claim flow as the API runs it: the code taken, the device provisioned with the
    registry's statement, the claim completed and the secret stored, in one transaction."""
    values = {"tenant_id": world.b, "mac": OPEN_MAC, "name": "claimed", "meter_kind": "energy"}
    with service(world, world.b) as conn, conn.transaction(force_rollback=True):
        [(claim, mac)] = conn.execute(
            "SELECT claim_id, mac::text FROM iiot_api_claim_take(%s)", (world.codes["open"],)
        ).fetchall()
        [(device,)] = conn.execute(
            query("provision_device"), values | {"metrics": ["energy_kwh"], "actor": "api-key:1"}
        ).fetchall()
        conn.execute("SELECT iiot_api_claim_complete(%s, %s)", (claim, device))
        conn.execute(
            "INSERT INTO device_secrets (device_id, tenant_id, secret_sha256) VALUES (%s, %s, %s)",
            (device, world.b, digest("secret")),
        )
        assert claim_seen(conn, claim) == (world.b, device)
        assert mac == OPEN_MAC
    assert claim_state(world, world.codes["open"]) == (False, None, None)


def test_the_service_stores_secrets_of_its_own_devices_only(world):
    device_a = world.devices["apisec-a"][0]
    with_secret, without = world.devices["apisec-b"]
    insert = "INSERT INTO device_secrets (device_id, tenant_id, secret_sha256) VALUES (%s, %s, %s)"
    secret = digest("attacker's secret")
    with service(world, world.a) as conn:
        # B's devices under B's tenant id: the policy; under A's: the composite foreign key
        # (or, for a device that has a secret, its primary key: at the database level app_rw
        # learns which of B's devices were claimed; the API never sends such an INSERT)
        assert outcome(conn, insert, (with_secret, world.b, secret)) == "42501"
        assert outcome(conn, insert, (without, world.b, secret)) == "42501"
        assert outcome(conn, insert, (without, world.a, secret)) == "23503"
        assert outcome(conn, insert, (with_secret, world.a, secret)) in ("23503", "23505")
        assert outcome(conn, insert, (device_a, world.a, secret)) == "1 rows"
        assert outcome(conn, "SELECT secret_sha256 FROM device_secrets") == "42501"
        assert outcome(conn, "SELECT device_id FROM device_secrets") == "0 rows"
        for statement in (
            "UPDATE device_secrets SET secret_sha256 = %s",
            "DELETE FROM device_secrets WHERE octet_length(%s) > 0",
        ):
            assert outcome(conn, statement, (secret,)) == "42501", statement
    assert superuser_value(
        world, "SELECT secret_sha256 FROM device_secrets WHERE device_id = %s", (with_secret,)
    ) == (digest("secret of b"),)


# --- alerts and threshold rules --------------------------------------------------------------


def test_the_service_acknowledges_its_own_alerts_and_changes_nothing_else(world):
    acknowledge = (
        "UPDATE alerts SET acknowledged_at = now(), acknowledged_by = 'api-key:1'"
        " WHERE alert_id = %s"
    )
    own, other = world.alerts["apisec-a"], world.alerts["apisec-b"]
    with service(world, world.a) as conn:
        assert outcome(conn, acknowledge, (own,)) == "1 rows"
        assert outcome(conn, acknowledge, (other,)) == "0 rows"
        for column, value in ALERT_COLUMNS.items():
            statement = f"UPDATE alerts SET {column} = {value} WHERE alert_id = %s"
            assert outcome(conn, statement, (own,)) == "42501", column
        for statement in (
            "DELETE FROM alerts WHERE alert_id = %s",
            "INSERT INTO alerts (tenant_id, source, alert_key, severity, title)"
            " VALUES (%s, 'test', 'x', 'INFO', 'x')",
        ):
            assert outcome(conn, statement, (own,)) == "42501", statement
    with service(world, None) as conn:
        assert outcome(conn, acknowledge, (own,)) == "0 rows"
    assert superuser_value(
        world, "SELECT count(*) FROM alerts WHERE acknowledged_at IS NOT NULL"
    ) == (0,)


def test_the_service_writes_rules_of_its_own_tenant_on_its_own_devices_only(world):
    insert = (
        "INSERT INTO alert_rules (tenant_id, device_id, metric, name, kind, threshold,"
        " severity, created_by) VALUES (%s, %s, 'energy_kwh', 'x', 'above', 1, 'INFO', 't')"
    )
    device_a, device_b = world.devices["apisec-a"][0], world.devices["apisec-b"][0]
    own, other = world.rules["apisec-a"], world.rules["apisec-b"]
    with service(world, world.a) as conn:
        assert outcome(conn, insert, (world.a, device_a)) == "1 rows"
        assert outcome(conn, insert, (world.a, None)) == "1 rows"  # every device of A
        assert outcome(conn, insert, (world.b, device_b)) == "42501"
        assert outcome(conn, insert, (world.b, None)) == "42501"
        # A's rule on B's device: the composite foreign key (the plain one ignores tenants)
        with (
            pytest.raises(psycopg.errors.ForeignKeyViolation, match="device_of_tenant"),
            conn.transaction(force_rollback=True),
        ):
            conn.execute(insert, (world.a, device_b))
        changes = {
            "device_id = %s": ((device_b,), "23503"),
            "tenant_id = %s": ((world.b,), "42501"),
        }
        for change, (params, refused) in changes.items():
            statement = f"UPDATE alert_rules SET {change} WHERE rule_id = %s"
            assert outcome(conn, statement, (*params, own)) == refused, change
        for statement in (
            "UPDATE alert_rules SET threshold = 0 WHERE rule_id = %s",
            "DELETE FROM alert_rules WHERE rule_id = %s",
        ):
            assert outcome(conn, statement, (own,)) == "1 rows", statement
            assert outcome(conn, statement, (other,)) == "0 rows", statement
    with service(world, None) as conn:
        assert outcome(conn, insert, (world.a, device_a)) == "42501"
    assert superuser_value(world, "SELECT count(*) FROM alert_rules") == (2,)


# --- the trusted path: iiot_api_authenticate, iiot_api_tenants ---------------------------------


def authenticate(conn: psycopg.Connection, key_digest: bytes, acting_for: str | None = None):
    """(key_id, tenant_id, role) and the transaction's tenant, rolled back."""
    with conn.transaction(force_rollback=True):
        row = conn.execute(
            "SELECT key_id, tenant_id, role FROM iiot_api_authenticate(%s, %s)",
            (key_digest, acting_for),
        ).fetchone()
        return row, conn.execute("SELECT iiot_current_tenant()").fetchone()[0]


def test_authenticate_refuses_revoked_expired_and_suspended_tenants_keys(world):
    with service(world, None) as conn:
        for what in ("revoked", "expired", "c", "platform revoked"):
            for acting_for in (None, "apisec-a", "apisec-c"):
                found = authenticate(conn, world.key_digest(what), acting_for)
                assert found == (None, None), (what, acting_for)
        for wrong in (digest("iiot_aaaaaaaa_guess"), b"", None, world.codes["open"]):
            assert authenticate(conn, wrong) == (None, None), wrong
    used = "SELECT last_used_at FROM api_keys WHERE key_id = %s"
    for what in ("revoked", "expired", "c"):
        assert superuser_value(world, used, (world.keys[what].key_id,)) == (None,), what


def test_authenticate_sets_the_keys_tenant_for_the_transaction_only(world):
    key = world.keys["a"]
    with psycopg.connect(world.url) as conn:  # a transaction per request, as the API's pool
        conn.execute("SET ROLE app_rw")
        conn.commit()
        row = conn.execute(
            "SELECT key_id, tenant_id, tenant_slug, role FROM iiot_api_authenticate(%s, %s)",
            (keys.digest(key.key), "apisec-b"),  # the header is ignored for a tenant key
        ).fetchone()
        assert row == (key.key_id, world.a, "apisec-a", "admin")
        assert conn.execute("SELECT iiot_current_tenant()").fetchone()[0] == world.a
        assert conn.execute("SELECT current_setting('iiot.actor')").fetchone()[0] == (
            f"api-key:{key.key_id}"
        )
        assert {t for (t,) in conn.execute("SELECT tenant_id FROM devices")} == {world.a}
        conn.commit()  # the next request's transaction has no tenant
        assert conn.execute("SELECT iiot_current_tenant()").fetchone()[0] is None
        assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == 0
        conn.rollback()
        conn.execute("SELECT * FROM iiot_api_authenticate(%s)", (keys.digest(key.key),))
        conn.rollback()  # nor after a request that failed
        assert conn.execute("SELECT iiot_current_tenant()").fetchone()[0] is None
    assert superuser_value(
        world, "SELECT last_used_at IS NOT NULL FROM api_keys WHERE key_id = %s", (key.key_id,)
    ) == (True,)


def test_a_platform_key_acts_for_an_existing_tenant_only(world):
    platform = world.key_digest("platform")
    with service(world, None) as conn:
        assert authenticate(conn, platform, "no-such-tenant") == (None, None)
        assert authenticate(conn, platform, "") == (None, None)
        assert authenticate(conn, platform, "apisec-b") == (
            (world.keys["platform"].key_id, world.b, "platform"),
            world.b,
        )
        # no tenant named: the key, and no tenant's rows
        assert authenticate(conn, platform) == (
            (world.keys["platform"].key_id, None, "platform"),
            None,
        )
        listed = "SELECT slug FROM iiot_api_tenants(%s)"
        assert set(SLUGS) <= {s for (s,) in conn.execute(listed, (platform,))}
        for what in ("a", "platform revoked", "revoked"):
            assert conn.execute(listed, (world.key_digest(what),)).fetchall() == [], what


# --- tenant logins -------------------------------------------------------------------------------


@contextmanager
def tenant_login_session(world: World, slug: str) -> Iterator[psycopg.Connection]:
    """A tenant login made by `iiot tenants logins create` (the test server trusts 127.0.0.1,
    so it connects without its password); dropped afterwards."""
    with psycopg.connect(world.url, autocommit=True) as admin:
        made = tenant_logins.create_login(admin, slug, actor="test")
    try:
        with psycopg.connect(
            tenant_logins.connection_url(world.url, made.login, made.password), autocommit=True
        ) as conn:
            yield conn
    finally:
        with psycopg.connect(world.url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = %s",
                (made.login,),
            )
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(made.login)))


def test_a_tenant_login_executes_none_of_the_api_functions(world):
    with tenant_login_session(world, "apisec-a") as login:
        assert login.execute("SELECT iiot_current_tenant()").fetchone()[0] == world.a
        found = {
            name: outcome(login, f"SELECT * FROM {name}{arguments}", (world.key_digest("a"),))
            if "%s" in arguments
            else outcome(login, f"SELECT * FROM {name}{arguments}")
            for name, arguments in API_FUNCTIONS.items()
        }
        assert found == dict.fromkeys(API_FUNCTIONS, "42501")
        for table in ("api_keys", "device_claim_codes", "device_secrets"):
            assert outcome(login, f"SELECT count(*) FROM public.{table}") == "42501", table
        # its view of alerts shows the acknowledgement, of its own tenant's alerts only
        rows = login.execute("SELECT tenant_id, acknowledged_at FROM tenant.alerts").fetchall()
        assert rows == [(world.a, None)]
        # and it cannot acknowledge one
        assert outcome(login, "UPDATE tenant.alerts SET acknowledged_by = 'x'") == "42501"
    assert superuser_value(
        world,
        "SELECT last_used_at IS NULL FROM api_keys WHERE key_id = %s",
        (world.keys["b"].key_id,),
    ) == (True,)
