"""Tenant isolation from every role's side (docs/security.md): the docs' table of relations by
role is checked statement by statement against a database seeded with two tenants, and a real
tenant login tries each way across the boundary that the threat model names."""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import NamedTuple

import dagster as dg
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from assets.marts import dbt_resource, marts
from iiot_orchestration import alerts, billing, registry, rollups
from iiot_orchestration.api import keys
from iiot_orchestration.db import connect, set_tenant
from iiot_orchestration.resources import PostgresResource
from iiot_orchestration.storage import storage_for
from ingest_daemon.validation import Reading, Rejection
from ingest_daemon.writer import BatchWriter, DeadLetter, Delivery
from tests.conftest import REPO_ROOT, create_database, drop_database

SECURITY_DOC = REPO_ROOT / "docs" / "security.md"
TABLE_HEADER = "| relation | tenant login |"
ROLE_COLUMNS = ("tenant login", "service", "auditor", "platform")
SCHEMAS = ("public", "marts", "tenant", "iiot_aggregates")
OPERATIONS = ("select", "insert", "update", "delete")
WRITES = {"write": ("insert", "update", "delete"), "insert": ("insert",)}
WRITES |= {"update": ("update",), "delete": ("delete",)}
PARTITION = re.compile(r"^public\.telemetry_p\d{8}$")
PARTITION_ROW = "public.telemetry_pYYYYMMDD"
MODE_TAGS = {"TimescaleDB mode": "timescale", "PostgreSQL mode": "postgres"}
# The group role of each column of the table but the tenant login
ROLE_GRANTEES = {"service": "app_rw", "auditor": "readonly_audit", "platform": "platform_rw"}
# SQLSTATEs that mean the database refused the statement: no privilege, a row-security or
# append-only refusal (42501), a view or continuous aggregate that cannot be written (55000,
# 0A000). Integrity errors (class 23) mean privileges and policies let the statement through.
REFUSED = {"42501", "55000", "0A000"}

SEED_DAY = date(2026, 11, 2)
SEED_START = datetime(2026, 11, 2, tzinfo=UTC)
HOUR = timedelta(hours=1)
SLUGS = ("sec-acme", "sec-globex")
MACS = ("02:00:00:00:5a:01", "02:00:00:00:5b:01")
# What every login may read in _timescaledb_internal: sizes and job runs, no tenant's rows
TIMESCALE_STATISTICS = (
    "bgw_job_stat",
    "bgw_policy_chunk_stats",
    "compressed_chunk_stats",
    "hypertable_chunk_local_size",
)
# Where the statistics of tenant data live (not schema probe, which the matrix opens to all)
STATISTICS_SCHEMAS = [*SCHEMAS, "_timescaledb_internal"]

# The attacker's leaky function: a notice with every value it is shown, and cheaper than
# anything, so that the planner would run it before the view's own filter if it could
LEAK = """
CREATE OR REPLACE FUNCTION pg_temp.leak(value integer) RETURNS boolean
LANGUAGE plpgsql COST 0.0000001 AS $$
BEGIN
    RAISE NOTICE 'leak %', value;
    RETURN true;
END
$$
"""

# The SECURITY DEFINER functions of the schema and who may execute them (docs/security.md)
SECURITY_DEFINER = {
    "iiot_current_tenant()": "PUBLIC",
    "iiot_ensure_telemetry_partitions(date,date)": "platform_rw",
    "iiot_drop_telemetry_day(date)": "platform_rw",
    "iiot_compress_telemetry_chunks(timestamp with time zone,integer)": "platform_rw",
    "iiot_usage_device_days_recompute(jsonb)": "owner",
    "iiot_billing_plan_event()": "trigger",
    "iiot_billing_quota_event()": "trigger",
    "iiot_usage_summaries_insert()": "trigger",
    "iiot_usage_summaries_update()": "trigger",
    "iiot_usage_summaries_delete()": "trigger",
    "iiot_billing_mark_late_hours()": "trigger",
    "iiot_plan_price_is_valid()": "trigger",
    "iiot_api_authenticate(bytea,text)": "app_rw",
    "iiot_api_tenants(bytea)": "app_rw",
    "iiot_api_claim_take(bytea)": "app_rw",
    "iiot_api_claim_complete(bigint,integer)": "app_rw",
    "iiot_api_lock_tenant()": "app_rw",
    "iiot_mac_awaits_claim(macaddr,integer)": "app_rw",
}


@dataclass(frozen=True)
class Documented:
    relation: str  # schema.name, or PARTITION_ROW
    mode: str | None  # "timescale" or "postgres" when the relation exists in one mode only
    access: dict[str, dict[str, str]]  # role column -> operation -> "none" | "own" | "all"


def parse_cell(cell: str) -> dict[str, str]:
    """`none`, or `read[ own]` and write terms (`write`, `insert`, `update`, `delete`, each
    optionally ` own`) separated by commas: each operation's reach."""
    reach = dict.fromkeys(OPERATIONS, "none")
    if cell == "none":
        return reach
    for term in (t.strip() for t in cell.split(",")):
        verb, _, scope = term.partition(" ")
        if scope not in ("", "own") or (verb != "read" and verb not in WRITES):
            raise ValueError(f"unknown access term {term!r} in {cell!r}")
        for operation in ("select",) if verb == "read" else WRITES[verb]:
            reach[operation] = "own" if scope else "all"
    return reach


def documented_relations() -> dict[str, Documented]:
    lines = SECURITY_DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(TABLE_HEADER))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        relation = re.search(r"`([^`]+)`", cells[0]).group(1)
        mode = next((m for tag, m in MODE_TAGS.items() if tag in cells[0]), None)
        access = {
            role: parse_cell(cell) for role, cell in zip(ROLE_COLUMNS, cells[1:], strict=True)
        }
        assert relation not in rows, f"{relation} is in the table twice"
        rows[relation] = Documented(relation, mode, access)
    return rows


def documented_for(mode: str) -> dict[str, Documented]:
    return {r: d for r, d in documented_relations().items() if d.mode in (None, mode)}


def login_url(database_url: str, login: str) -> str:
    return make_conninfo(**{**conninfo_to_dict(database_url), "user": login})


def drop_login(server_url: str, login: str) -> None:
    """End the login's sessions (their temp objects go with them), then drop it."""
    with psycopg.connect(server_url, autocommit=True) as server:
        deadline = time.monotonic() + 10
        while server.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = %s",
            (login,),
        ).fetchone()[0]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        server.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(login)))


@contextmanager
def tenant_login(
    database_url: str, tenant_id: int | None, *, revoked: bool = False
) -> Iterator[str]:
    """A LOGIN in tenant_reader bound to ``tenant_id`` (no tenant_logins row when None), as
    `iiot tenants logins create` makes one; dropped afterwards."""
    login = f"iiot_sec_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE tenant_reader").format(sql.Identifier(login))
        )
        if tenant_id is not None:
            conn.execute(
                "INSERT INTO tenant_logins (login, tenant_id, revoked_at, revoked_by)"
                " VALUES (%s, %s, %s, %s)",
                (login, tenant_id, *((datetime.now(UTC), "test") if revoked else (None, None))),
            )
    try:
        yield login
    finally:
        drop_login(database_url, login)


@dataclass(frozen=True)
class Seeded:
    url: str
    mode: str
    tenants: tuple[int, int]  # A, B
    devices: tuple[int, int]
    logins: tuple[str, str]  # bound to A, to B

    def connect_as(self, login: str, **options) -> psycopg.Connection:
        return psycopg.connect(login_url(self.url, login), **options)


def two_tenants(conn: psycopg.Connection) -> list[tuple[int, int]]:
    """Tenants A and B with an energy meter each: [(tenant_id, device_id)] through the registry."""
    ids = []
    for slug, mac in zip(SLUGS, MACS, strict=True):
        tenant = registry.create_tenant(conn, slug=slug, name=slug, plan="pro", timezone="UTC")
        [device] = registry.provision_devices(conn, slug, [registry.DeviceRequest(mac, "energy")])
        ids.append((tenant.tenant_id, device.device_id))
    return ids


def reading_batch(tenant_id, device_id, times, received_at):
    return [
        (
            Reading(tenant_id, device_id, "energy_kwh", ts, 100.0 + n),
            Delivery(received_at, n, topic="t"),
        )
        for n, ts in enumerate(times)
    ]


def seed(url: str, logins: tuple[str, str]) -> Seeded:
    """Both tenants' rows in every tenant-owned relation, through the product's code where that
    is cheap (registry, ingest writer, rollups, billing, alerts, dbt), plain INSERTs elsewhere."""
    with psycopg.connect(url, autocommit=True) as conn:
        mode = storage_for(conn).mode
        tenants, devices = zip(*two_tenants(conn), strict=True)
        # customers since before the seeded day, so that billing takes that day
        conn.execute("UPDATE tenants SET created_at = %s", (SEED_START - timedelta(days=30),))
        storage_for(conn).ensure_partitions(conn, SEED_DAY, SEED_DAY + timedelta(days=1))
        for login, tenant_id in zip(logins, tenants, strict=True):
            conn.execute(
                "INSERT INTO tenant_logins (login, tenant_id) VALUES (%s, %s)", (login, tenant_id)
            )

    with connect(url, role="platform_rw") as service:
        writer = BatchWriter(service)
        for tenant_id, device_id in zip(tenants, devices, strict=True):
            times = [SEED_START + n * HOUR for n in range(4)]
            letter = DeadLetter(
                SEED_START, "t", None, tenant_id, device_id, Rejection("schema", "x", b"{}")
            )
            writer.write(
                reading_batch(tenant_id, device_id, times, SEED_START + 5 * HOUR),
                [letter],
                now=SEED_START + 5 * HOUR,
            )
    with psycopg.connect(url) as conn:
        day = rollups.Window(SEED_START, SEED_START + timedelta(days=1))
        rollups.rollup_hours(conn, [day])
        conn.commit()
        rollups.rollup_days(conn, day)
        conn.commit()
    with connect(url, role="platform_rw") as service:
        writer = BatchWriter(service)  # late readings: dirty windows again, after the rollup
        for tenant_id, device_id in zip(tenants, devices, strict=True):
            late = [SEED_START + 90 * timedelta(minutes=1)]
            writer.write(
                reading_batch(tenant_id, device_id, late, SEED_START + 6 * HOUR),
                [],
                now=SEED_START + 6 * HOUR,
            )

    with psycopg.connect(url, autocommit=True) as conn:
        who = [billing.tenant(conn, slug) for slug in SLUGS]
        night = billing.bill_night(
            conn, who, SEED_DAY, today=SEED_DAY + timedelta(days=1), actor="t"
        )
        assert night.billing.failures == []
        for slug, tenant_id, device_id in zip(SLUGS, tenants, devices, strict=True):
            alerts.add_rule(
                conn,
                tenant=slug,
                name="hot",
                kind="above",
                severity="WARNING",
                metric="energy_kwh",
                threshold=1e9,
            )
            alerts.raise_alert(
                conn,
                alerts.Alert(
                    key=f"probe:{slug}",
                    severity="WARNING",
                    title="probe",
                    source="test",
                    tenant_id=tenant_id,
                    device_id=device_id,
                ),
            )
            plain_rows(conn, tenant_id, device_id)
        global_rows(conn)

    result = dg.materialize(
        [marts],
        resources={"dbt": dbt_resource(), "postgres": PostgresResource(database_url=url)},
    )
    assert result.success
    return Seeded(url, mode, tenants, devices, logins)


def plain_rows(conn: psycopg.Connection, tenant_id: int, device_id: int) -> None:
    """Plausible rows of one tenant where the product's code needs a CA, files or a broker."""
    params = {"tenant": tenant_id, "device": device_id, "day": SEED_DAY, "at": SEED_START}
    certificates = conn.execute(
        "INSERT INTO device_certificates (tenant_id, device_id, serial, subject_cn,"
        " fingerprint_sha256, not_before, not_after, status, certificate_pem)"
        " SELECT %(tenant)s, %(device)s, %(device)s * 10 + n, 'probe', md5(n::text || %(device)s),"
        "        %(at)s, %(at)s + interval '1 year', s, 'PEM'"
        "   FROM (VALUES (1, 'active'), (2, 'pending')) v(n, s) RETURNING certificate_id",
        params,
    ).fetchall()
    conn.execute(
        "INSERT INTO certificate_renewals (renewal_id, tenant_id, device_id, old_certificate_id,"
        " new_certificate_id, batch_day, attempt, issued_at)"
        " VALUES (gen_random_uuid(), %(tenant)s, %(device)s, %(old)s, %(new)s, %(day)s, 1, %(at)s)",
        params | {"old": certificates[0][0], "new": certificates[1][0]},
    )
    conn.execute(
        "INSERT INTO certificate_acks (topic, tenant_id, payload, payload_size)"
        " VALUES ('t', %(tenant)s, '\\x00', 1)",
        params,
    )
    conn.execute(
        "INSERT INTO billing_adjustments (tenant_id, period, amount, reason, actor)"
        " VALUES (%(tenant)s, date_trunc('month', %(day)s)::date, -1.00, 'probe credit', 't')",
        params,
    )
    conn.execute(
        "INSERT INTO billing_late_hours (tenant_id, hour) VALUES (%(tenant)s, %(at)s)", params
    )
    conn.execute(
        "INSERT INTO billing_late_usage (tenant_id, day, source_period, period, plan_id, messages,"
        " readings, overage_messages, unit_price, amount)"
        " VALUES (%(tenant)s, %(day)s, date_trunc('month', %(day)s)::date,"
        "         (date_trunc('month', %(day)s) + interval '1 month')::date, 'pro', 1, 1, 0, 0, 0)",
        params,
    )
    conn.execute(
        "INSERT INTO rollup_stale_days (day, tenant_id, device_id, metric)"
        " VALUES (%(at)s, %(tenant)s, %(device)s, 'energy_kwh')",
        params,
    )
    conn.execute(
        "INSERT INTO telemetry_archives (tenant_id, day, tenant_slug, location, rows, devices,"
        " min_ts, max_ts, bytes, sha256, content_sha256, schema_version, verified_at)"
        " VALUES (%(tenant)s, %(day)s - 30, 'x', 'x.parquet', 1, 1, %(at)s - interval '30 days',"
        "         %(at)s - interval '30 days', 1, repeat('a', 64), repeat('b', 64), 1, %(at)s)",
        params,
    )
    conn.execute(
        "INSERT INTO retention_progress (tenant_id, archived_through) VALUES (%(tenant)s, %(day)s)",
        params,
    )
    api_rows(conn, tenant_id, device_id)


def api_rows(conn: psycopg.Connection, tenant_id: int, device_id: int) -> None:
    """The tenant API's rows of one tenant (migration 0028): an admin key made as `iiot api-keys
    create` makes it, and the claim flow as the API runs it (app_rw scoped to the tenant): the
    device's claim code taken and completed, its one-time secret stored."""
    keys.create(conn, tenant=None, tenant_id=tenant_id, role="admin", name="probe", actor="t")
    code = hashlib.sha256(f"claim code of {tenant_id}".encode()).digest()
    conn.execute(
        "INSERT INTO device_claim_codes (code_sha256, mac, meter_kind, metrics, created_by)"
        " SELECT %s, mac, 'energy', array(SELECT metric FROM device_metrics m"
        "                                  WHERE m.device_id = d.device_id), 't'"
        "   FROM devices d WHERE device_id = %s",
        (code, device_id),
    )
    with conn.transaction():
        conn.execute("SET LOCAL ROLE app_rw")
        set_tenant(conn, tenant_id)
        [(claim,)] = conn.execute("SELECT claim_id FROM iiot_api_claim_take(%s)", (code,))
        conn.execute("SELECT iiot_api_claim_complete(%s, %s)", (claim, device_id))
        conn.execute(
            "INSERT INTO device_secrets (device_id, tenant_id, secret_sha256) VALUES (%s, %s, %s)",
            (device_id, tenant_id, hashlib.sha256(f"secret of {device_id}".encode()).digest()),
        )


def global_rows(conn: psycopg.Connection) -> None:
    """A row in each table that belongs to no tenant, so that the matrix can probe it."""
    # rows of tenant-owned tables that belong to no tenant yet: a platform key, a claim code
    # not claimed (the matrix probes tenant A's and B's rows; these must stay out of reach)
    keys.create(conn, tenant=None, role=keys.PLATFORM, name="probe", actor="t")
    conn.execute(
        "INSERT INTO device_claim_codes (code_sha256, mac, meter_kind, created_by)"
        " VALUES (sha256('unclaimed'), '02:00:00:00:5c:01', 'water', 't')"
    )
    conn.execute(
        "INSERT INTO alert_deliveries (alert_key, channel, status, attempts)"
        " VALUES ('probe', 'log', 'sent', 1)"
    )
    conn.execute(
        "INSERT INTO certificate_crls (crl_number, generated_at, next_update, revoked, sha256,"
        " ca_fingerprint) VALUES (1, now(), now() + interval '1 day', 0, repeat('a', 64),"
        " repeat('b', 64))"
    )
    conn.execute(
        "INSERT INTO certificate_sweeps (swept_at, ok, renewal_due, expired, revoked, pending,"
        " superseded, devices_without_certificate) VALUES (now(), 1, 0, 0, 0, 0, 0, 0)"
    )
    conn.execute(
        "INSERT INTO backups (backup_id, database_name, status, started_at, finished_at,"
        " location, bytes, sha256) VALUES ('20261102T000000Z', 'iiot', 'complete', now(), now(),"
        " 'x', 1, repeat('a', 64))"
    )
    conn.execute(
        "INSERT INTO backup_drills (database_name, scratch_database, status, started_at,"
        " finished_at, rpo_target_seconds, rto_target_seconds)"
        " VALUES ('iiot', 'iiot_drill_x', 'passed', now(), now(), 1, 1)"
    )
    conn.execute(
        "INSERT INTO ingest_sessions (client_id, group_name, slot, subscription, host, pid,"
        " session_expiry_s, state) VALUES ('c', 'g', 0, 's', 'h', 1, 60, 'connected')"
    )


@pytest.fixture(scope="module")
def seeded(pg_server: str, template_database: str) -> Iterator[Seeded]:
    name = f"iiot_sec_{uuid.uuid4().hex[:12]}"
    url = create_database(pg_server, name, template=template_database)
    logins = tuple(f"iiot_sec_{uuid.uuid4().hex[:10]}" for _ in SLUGS)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            for login in logins:
                conn.execute(
                    sql.SQL("CREATE ROLE {} LOGIN IN ROLE tenant_reader").format(
                        sql.Identifier(login)
                    )
                )
        yield seed(url, logins)
    finally:
        drop_database(pg_server, name)
        for login in logins:
            drop_login(pg_server, login)


def has_tenant_column(conn: psycopg.Connection, relation: str) -> bool:
    return bool(
        conn.execute(
            "SELECT 1 FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'tenant_id'"
            " AND NOT attisdropped",
            (relation,),
        ).fetchone()
    )


def updatable_column(conn: psycopg.Connection, relation: str) -> str:
    """The last column that is neither an identity nor a generated one."""
    return conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
        " AND NOT attisdropped AND attidentity = '' AND attgenerated = ''"
        " ORDER BY attnum DESC LIMIT 1",
        (relation,),
    ).fetchone()[0]


@dataclass(frozen=True)
class Probe:
    relation: str  # what the statements name
    documented: Documented
    tenant_owned: bool
    column: str  # one the UPDATE sets to itself
    rows: dict[int | None, str]  # tenant (None: a table of no tenant) -> probe table


def prepare_probes(seeded: Seeded) -> tuple[list[Probe], list[str]]:
    """One row of each tenant (or of the table) copied into schema probe, which every role may
    read; and the tenant-owned relations that lack a row of either tenant."""
    probes, unseeded = [], []
    with psycopg.connect(seeded.url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS probe")
        conn.execute("GRANT USAGE ON SCHEMA probe TO PUBLIC")
        for n, documented in enumerate(documented_for(seeded.mode).values()):
            relation = documented.relation
            if relation == PARTITION_ROW:
                relation = f"public.telemetry_p{SEED_DAY:%Y%m%d}"  # made by the writer
            tenant_owned = has_tenant_column(conn, relation)
            rows = {}
            for tenant_id in seeded.tenants if tenant_owned else (None,):
                # the tenant views filter on the setting for any session but a tenant login
                conn.execute("SELECT set_config('iiot.tenant_id', %s, false)", (str(tenant_id),))
                table = f"probe.p{n}_{tenant_id or 0}"
                where = "WHERE tenant_id = %s" if tenant_owned else ""
                conn.execute(
                    f"CREATE TABLE {table} AS SELECT * FROM {relation} {where} LIMIT 1",
                    (tenant_id,) if tenant_owned else (),
                )
                conn.execute(f"GRANT SELECT ON {table} TO PUBLIC")
                if conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]:
                    rows[tenant_id] = table
                else:
                    unseeded.append(f"{relation} (tenant {tenant_id})")
            conn.execute("SELECT set_config('iiot.tenant_id', '', false)")
            column = updatable_column(conn, relation)
            probes.append(Probe(relation, documented, tenant_owned, column, rows))
    return probes, unseeded


class Probes(NamedTuple):
    probes: list[Probe]
    unseeded: list[str]


@pytest.fixture(scope="module")
def probes(seeded: Seeded) -> Probes:
    return Probes(*prepare_probes(seeded))


def attempt(conn: psycopg.Connection, statement: str, params=()) -> tuple[bool | None, str]:
    """Run ``statement`` and roll it back: (allowed, what happened); allowed is None when the
    error says neither (the mismatch then shows it)."""
    try:
        with conn.transaction(force_rollback=True):
            cursor = conn.execute(statement, params)
            if statement.startswith("SELECT"):
                count = cursor.fetchone()[0]
                return count > 0, f"{count} rows"
            return cursor.rowcount > 0 or statement.startswith("INSERT"), f"{cursor.rowcount} rows"
    except psycopg.Error as exc:
        state = exc.sqlstate or ""
        summary = f"{state} {str(exc).splitlines()[0][:80]}"
        if state in REFUSED:
            return False, summary
        if state.startswith("23"):
            return True, summary
        return None, summary


def statements(
    probe: Probe, tenant_id: int | None, columns: list[str] | None = None
) -> dict[str, tuple[str, tuple]]:
    """The four statements on ``tenant_id``'s rows; the INSERT names ``columns`` only when the
    role may insert some columns and not others (api_keys: never key_id or last_used_at)."""
    where, params = ("WHERE tenant_id = %s", (tenant_id,)) if probe.tenant_owned else ("", ())
    column = probe.column
    listed = ", ".join(f'"{c}"' for c in columns) if columns else "*"
    into = f" ({listed})" if columns else ""
    return {
        "select": (f"SELECT count(*) FROM {probe.relation} {where}", params),
        "insert": (
            f"INSERT INTO {probe.relation}{into} OVERRIDING SYSTEM VALUE"
            f" SELECT {listed} FROM {probe.rows[tenant_id]}",
            (),
        ),
        "update": (f"UPDATE {probe.relation} SET {column} = {column} {where}", params),
        "delete": (f"DELETE FROM {probe.relation} {where}", params),
    }


def insertable_columns(seeded: Seeded, grantee: str, relation: str) -> list[str] | None:
    """The columns ``grantee`` may insert into ``relation`` when that is some but not all of
    them (a column-level grant); None when it may insert every column or none."""
    with psycopg.connect(seeded.url) as conn:
        rows = conn.execute(
            "SELECT attname, has_column_privilege(%s, attrelid, attnum, 'INSERT')"
            "  FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
            "   AND NOT attisdropped ORDER BY attnum",
            (grantee, relation),
        ).fetchall()
    granted = [name for name, allowed in rows if allowed]
    return granted if 0 < len(granted) < len(rows) else None


@contextmanager
def role_session(seeded: Seeded, role: str) -> Iterator[psycopg.Connection]:
    """A session as the matrix's role: a real tenant login bound to tenant A, or SET ROLE."""
    if role == "tenant login":
        with seeded.connect_as(seeded.logins[0], autocommit=True) as conn:
            yield conn
        return
    group = ROLE_GRANTEES[role]
    with psycopg.connect(seeded.url, autocommit=True) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(group)))
        if group == "app_rw":
            conn.execute(
                "SELECT set_config('iiot.tenant_id', %s, false)", (str(seeded.tenants[0]),)
            )
        yield conn


def expected_allowed(reach: str, own: bool) -> bool:
    return reach == "all" or (reach == "own" and own)


def mismatches_for(seeded: Seeded, probes: list[Probe], role: str) -> list[str]:
    found = []
    grantee = ROLE_GRANTEES.get(role, seeded.logins[0])
    with role_session(seeded, role) as conn:
        for probe in probes:
            reach = probe.documented.access[role]
            columns = insertable_columns(seeded, grantee, probe.relation)
            if not probe.tenant_owned and "own" in reach.values():
                found.append(f"{probe.relation:40} {role:12} belongs to no tenant: no 'own'")
            for tenant_id in sorted(probe.rows, key=lambda tenant: tenant or 0):
                own = tenant_id in (None, seeded.tenants[0])
                label = "-" if tenant_id is None else ("A" if own else "B")
                for operation, (statement, params) in statements(probe, tenant_id, columns).items():
                    allowed, outcome = attempt(conn, statement, params)
                    expected = expected_allowed(reach[operation], own)
                    if allowed is not expected:
                        found.append(
                            f"{probe.relation:40} {role:12} {operation:6} tenant {label}:"
                            f" expected {'allowed' if expected else 'refused'}, got {outcome}"
                        )
    return found


@pytest.mark.parametrize("role", ROLE_COLUMNS)
def test_each_role_gets_exactly_what_the_docs_table_says(seeded, probes, role):
    """SELECT, INSERT, UPDATE and DELETE of tenant A's rows and of tenant B's rows in every
    relation, as a real tenant login of A, as the service role scoped to A, as the auditor
    and as the platform: each allowed or refused as the docs' table says."""
    found = mismatches_for(seeded, probes.probes, role)
    if found:
        pytest.fail("docs/security.md disagrees with the database:\n" + "\n".join(found))


def test_every_tenant_owned_relation_has_rows_of_both_tenants(probes):
    """A new tenant-owned table must be seeded here, or the matrix would not probe it."""
    assert probes.unseeded == []


def actual_relations(conn: psycopg.Connection) -> set[str]:
    rows = conn.execute(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c"
        "  JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
        (list(SCHEMAS),),
    ).fetchall()
    return {PARTITION_ROW if PARTITION.match(name) else name for (name,) in rows}


def test_the_docs_table_lists_every_table_and_view(seeded):
    """Every table, view and materialized view of public, marts, tenant and iiot_aggregates
    (after a dbt build of the marts) is a row of the docs' table, and every row exists."""
    with psycopg.connect(seeded.url) as conn:
        actual = actual_relations(conn)
    documented = set(documented_for(seeded.mode))
    assert sorted(actual - documented) == [], "tables and views missing from docs/security.md"
    assert sorted(documented - actual) == [], "rows of docs/security.md that do not exist"


@pytest.fixture
def login_a(seeded: Seeded) -> Iterator[psycopg.Connection]:
    """A session of the tenant login bound to tenant A."""
    with seeded.connect_as(seeded.logins[0], autocommit=True) as conn:
        yield conn


def tenant_views(seeded: Seeded) -> list[str]:
    """The views of schema tenant that carry tenant_id (all but tenant.metrics)."""
    with psycopg.connect(seeded.url) as conn:
        return [
            name
            for (name,) in conn.execute(
                "SELECT 'tenant.' || c.relname FROM pg_class c"
                " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id'"
                " WHERE c.relnamespace = 'tenant'::regnamespace ORDER BY 1"
            )
        ]


def tenants_seen(conn: psycopg.Connection, views: list[str]) -> dict[str, set[int]]:
    return {
        view: {t for (t,) in conn.execute(f"SELECT DISTINCT tenant_id FROM {view}")}
        for view in views
    }


def refused(conn: psycopg.Connection, statement: str, params=()) -> str | None:
    """None when ``statement`` was refused with a permission error; else what happened."""
    try:
        with conn.transaction(force_rollback=True):
            cursor = conn.execute(statement, params)
            return f"ran: {cursor.rowcount} rows"
    except psycopg.errors.InsufficientPrivilege:
        return None
    except psycopg.Error as exc:
        return f"{exc.sqlstate} {exc}".splitlines()[0]


def test_a_tenant_login_reads_its_own_tenant_whatever_it_sets(seeded, login_a):
    a, b = seeded.tenants
    views = tenant_views(seeded)
    assert len(views) >= 11  # the migration's eight and the dbt build's three
    assert tenants_seen(login_a, views) == {view: {a} for view in views}
    login_a.execute("SELECT set_config('iiot.tenant_id', %s, false)", (str(b),))
    assert tenants_seen(login_a, views) == {view: {a} for view in views}
    login_a.execute(sql.SQL("SET iiot.tenant_id = {}").format(sql.Literal(str(b))))
    assert login_a.execute("SELECT iiot_current_tenant()").fetchone()[0] == a
    other = "SELECT count(*) FROM tenant.telemetry WHERE tenant_id = %s"
    assert login_a.execute(other, (b,)).fetchone()[0] == 0
    assert login_a.execute("SELECT count(*) FROM tenant.metrics").fetchone()[0] > 0
    with seeded.connect_as(seeded.logins[1], autocommit=True) as login_b:
        login_b.execute("SELECT set_config('iiot.tenant_id', %s, false)", (str(a),))
        assert tenants_seen(login_b, views) == {view: {b} for view in views}


def test_a_tenant_login_cannot_become_another_role(login_a):
    for role in ("app_rw", "platform_rw", "readonly_audit", "migration_admin", "postgres"):
        assert refused(login_a, f"SET ROLE {role}") is None, role
    assert refused(login_a, "SET SESSION AUTHORIZATION postgres") is None
    assert login_a.execute("SELECT current_user = session_user").fetchone()[0]


def test_a_tenant_login_reads_no_table_directly(seeded, login_a):
    """Every relation of public, marts and iiot_aggregates (tables, views, partitions,
    continuous aggregates, tenant_logins) refuses a plain SELECT."""
    with psycopg.connect(seeded.url) as conn:
        relations = [
            name
            for (name,) in conn.execute(
                "SELECT n.nspname || '.' || c.relname FROM pg_class c"
                "  JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname IN ('public', 'marts', 'iiot_aggregates')"
                "   AND c.relkind IN ('r', 'p', 'v', 'm', 'f') ORDER BY 1"
            )
        ]
    assert {"public.telemetry", "public.tenant_logins", "marts.consumption_daily"} <= set(relations)
    if seeded.mode == "postgres":
        assert f"public.telemetry_p{SEED_DAY:%Y%m%d}" in relations
    opened = {r: refused(login_a, f"SELECT count(*) FROM {r}") for r in relations}
    assert {r: what for r, what in opened.items() if what is not None} == {}


def test_a_tenant_login_reads_no_timescaledb_internals(seeded, login_a):
    """Chunks, materialization hypertables and the aggregates' internal views refuse it; what it
    may read in _timescaledb_internal is TimescaleDB's size and job statistics only, and the
    hypertable API needs ownership."""
    if seeded.mode != "timescale":
        pytest.skip("PostgreSQL mode has no chunks; its partitions are checked above")
    with psycopg.connect(seeded.url) as conn:
        chunks = [str(c) for (c,) in conn.execute("SELECT show_chunks('telemetry')")]
        internal = dict(
            conn.execute(
                "SELECT '_timescaledb_internal.' || c.relname,"
                "       EXISTS (SELECT 1 FROM pg_attribute a"
                "                WHERE a.attrelid = c.oid AND a.attname = 'tenant_id')"
                "  FROM pg_class c WHERE c.relnamespace = '_timescaledb_internal'::regnamespace"
                "   AND c.relkind IN ('r', 'p', 'v', 'm', 'f')"
            ).fetchall()
        )
    assert chunks
    assert any("_materialized_hypertable_" in name for name in internal)
    readable = {n for n in internal if refused(login_a, f"SELECT count(*) FROM {n}") is not None}
    assert not any(internal[n] for n in readable), readable
    assert readable <= {f"_timescaledb_internal.{name}" for name in TIMESCALE_STATISTICS}
    for statement in (
        "SELECT drop_chunks('telemetry', now())",
        f"SELECT compress_chunk('{chunks[0]}')",
        f"SELECT decompress_chunk('{chunks[0]}')",
        "CALL refresh_continuous_aggregate('iiot_aggregates.telemetry_hourly_cagg', NULL, NULL)",
    ):
        assert refused(login_a, statement) is None, statement


def test_a_tenant_login_finds_no_statistics(seeded, login_a):
    with psycopg.connect(seeded.url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS probe")
        conn.execute(
            "CREATE STATISTICS IF NOT EXISTS probe.telemetry_series (dependencies)"
            " ON device_id, metric FROM public.telemetry"
        )
        conn.execute("ANALYZE")
        stats = "SELECT count(*) FROM {} WHERE schemaname = ANY(%s) AND tablename <> ALL(%s)"
        where = (STATISTICS_SCHEMAS, list(TIMESCALE_STATISTICS))
        for view in ("pg_stats", "pg_stats_ext"):
            assert conn.execute(stats.format(view), where).fetchone()[0] > 0
    for view in ("pg_stats", "pg_stats_ext"):
        assert login_a.execute(stats.format(view), where).fetchone()[0] == 0
    assert refused(login_a, "SELECT count(*) FROM pg_statistic") is None


def leaked_by(conn: psycopg.Connection, view: str, column: str) -> set[int]:
    """The values pg_temp.leak was shown, in notices, by a query of ``view``."""
    leaked = []

    def collect(notice: psycopg.errors.Diagnostic) -> None:
        leaked.append(int(notice.message_primary.removeprefix("leak ")))

    conn.add_notice_handler(collect)
    try:
        conn.execute(f"SELECT * FROM {view} WHERE pg_temp.leak({column})").fetchall()
    finally:
        conn.remove_notice_handler(collect)
    return set(leaked)


def test_a_leaky_function_sees_no_row_of_another_tenant(seeded, login_a):
    """A temporary leaky function in WHERE is shown tenant A's rows only, and an error meant
    for tenant B's rows never fires."""
    a, b = seeded.tenants
    login_a.execute(LEAK)
    for view in ("tenant.telemetry", "tenant.devices", "tenant.telemetry_hourly"):
        assert leaked_by(login_a, view, "tenant_id") == {a}, view
        assert leaked_by(login_a, view, "device_id") == {seeded.devices[0]}, view
        # division is not leakproof either: it would fail on the first row of tenant B
        rows = login_a.execute(
            f"SELECT count(*) FROM {view} WHERE 1 / (tenant_id - %s) <> 0", (b,)
        ).fetchone()[0]
        assert rows > 0, view


def test_a_tenant_login_writes_through_no_view(seeded, login_a):
    """Refused for lack of privilege, or because the view cannot be written at all."""
    writes = {}
    for view in [*tenant_views(seeded), "tenant.metrics"]:
        column = "unit" if view == "tenant.metrics" else "tenant_id"
        for statement in (
            f"INSERT INTO {view} OVERRIDING SYSTEM VALUE SELECT * FROM {view}",
            f"UPDATE {view} SET {column} = {column}",
            f"DELETE FROM {view}",
        ):
            allowed, outcome = attempt(login_a, statement)
            if allowed is not False or outcome[:5] not in REFUSED:
                writes[statement] = outcome
    assert writes == {}


def test_a_tenant_login_can_neither_shadow_nor_probe_another_tenants_readings(seeded, login_a):
    """The readings of the issue: tenant A's login writes B's device under A's tenant id. Every
    INSERT is refused alike, whether B has a reading at that key or not."""
    a, b = seeded.tenants
    with psycopg.connect(seeded.url) as conn:
        device_b, metric, ts = conn.execute(
            "SELECT device_id, metric, ts FROM telemetry WHERE tenant_id = %s LIMIT 1", (b,)
        ).fetchone()
    errors = set()
    for table in ("tenant.telemetry", "public.telemetry"):
        for tenant_id, at in ((a, ts), (b, ts), (a, ts + timedelta(seconds=1))):
            try:
                with login_a.transaction(force_rollback=True):
                    login_a.execute(
                        f"INSERT INTO {table} (tenant_id, device_id, metric, ts, value)"
                        " VALUES (%s, %s, %s, %s, 1)",
                        (tenant_id, device_b, metric, at),
                    )
            except psycopg.Error as exc:
                errors.add((table, exc.sqlstate, str(exc)))
            else:
                pytest.fail(f"{table} took a reading of another tenant's device")
    assert {(table, state) for table, state, _ in errors} == {
        ("tenant.telemetry", "42501"),
        ("public.telemetry", "42501"),
    }
    assert len(errors) == 2  # one message per table, the same for a taken and a free key


def test_a_device_never_changes_tenant(seeded):
    a, b = seeded.tenants
    device_a = seeded.devices[0]
    for role in ("platform_rw", "app_rw"):
        with connect(seeded.url, role=role) as conn:
            set_tenant(conn, a)
            with pytest.raises(psycopg.errors.IntegrityConstraintViolation, match="cannot move"):
                conn.execute(
                    "UPDATE devices SET tenant_id = %s WHERE device_id = %s", (b, device_a)
                )


def test_a_revoked_login_and_an_unbound_member_see_nothing(seeded):
    a, b = seeded.tenants
    views = tenant_views(seeded)
    for bound, revoked in ((a, True), (None, False)):
        with (
            tenant_login(seeded.url, bound, revoked=revoked) as login,
            seeded.connect_as(login, autocommit=True) as conn,
        ):
            for setting in ("", str(a), str(b)):
                conn.execute("SELECT set_config('iiot.tenant_id', %s, false)", (setting,))
                assert conn.execute("SELECT iiot_current_tenant()").fetchone()[0] is None
                assert tenants_seen(conn, views) == {view: set() for view in views}


def test_security_definer_functions_are_the_documented_ones(seeded, login_a):
    """Which exist, that each pins its search_path, and what a tenant login gets from each."""
    with psycopg.connect(seeded.url) as conn:
        found = {
            name: (config, executors)
            for name, config, executors in conn.execute(
                "SELECT p.oid::regprocedure::text, p.proconfig,"
                "       array(SELECT r FROM unnest(array['platform_rw', 'app_rw', 'readonly_audit',"
                "                                         'tenant_reader']) r"
                "              WHERE has_function_privilege(r, p.oid, 'EXECUTE'))"
                "  FROM pg_proc p WHERE p.prosecdef"
                "   AND p.pronamespace = ANY(array['public', 'tenant']::regnamespace[])"
            )
        }
    assert set(found) == set(SECURITY_DEFINER)
    for name, (config, executors) in found.items():
        assert any(c.startswith("search_path=") and c.endswith("pg_temp") for c in config), name
        expected = {
            "PUBLIC": ["platform_rw", "app_rw", "readonly_audit", "tenant_reader"],
            "platform_rw": ["platform_rw"],
            "app_rw": ["app_rw"],
            "owner": [],
            "trigger": ["platform_rw", "app_rw", "readonly_audit", "tenant_reader"],
        }[SECURITY_DEFINER[name]]
        assert executors == expected, name
    assert login_a.execute("SELECT iiot_current_tenant()").fetchone()[0] == seeded.tenants[0]
    calls = {
        "iiot_ensure_telemetry_partitions(date,date)": "('2030-01-01', '2030-01-02')",
        "iiot_drop_telemetry_day(date)": "('2026-11-02')",
        "iiot_compress_telemetry_chunks(timestamp with time zone,integer)": "(now(), 1)",
        "iiot_usage_device_days_recompute(jsonb)": "('[]')",
        "iiot_api_authenticate(bytea,text)": "('\\x00', NULL)",
        "iiot_api_tenants(bytea)": "('\\x00')",
        "iiot_api_claim_take(bytea)": "('\\x00')",
        "iiot_api_claim_complete(bigint,integer)": "(1, 1)",
        "iiot_api_lock_tenant()": "()",
        "iiot_mac_awaits_claim(macaddr,integer)": "('02:00:00:00:00:01', 1)",
    }
    for name, arguments in calls.items():
        assert refused(login_a, f"SELECT {name.split('(')[0]}{arguments}") is None, name
    for name in (n for n, who in SECURITY_DEFINER.items() if who == "trigger"):
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="called as triggers"):
            login_a.execute(f"SELECT {name}")


def test_a_tenant_login_runs_no_ddl(login_a):
    for statement in (
        "CREATE TABLE sneaky (id int)",
        "CREATE TABLE public.sneaky (id int)",
        "CREATE VIEW tenant.sneaky AS SELECT 1",
        "ALTER VIEW tenant.telemetry RENAME TO t",
        "DROP VIEW tenant.telemetry",
        "TRUNCATE public.telemetry",
    ):
        assert refused(login_a, statement) is None, statement


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="known hole (docs/security.md)")
def test_planner_estimates_reveal_nothing_of_another_tenant(seeded, login_a):
    """EXPLAIN estimates the rows of another tenant's device from the table's statistics."""
    b, device_b = seeded.tenants[1], seeded.devices[1]
    busy = (
        "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
        " SELECT %s, %s, 'voltage_v', %s + n * interval '1 second', 230"
        "   FROM generate_series(1, 5000) n"
    )
    plan = "EXPLAIN (FORMAT JSON) SELECT * FROM tenant.telemetry WHERE device_id = %s"
    with psycopg.connect(seeded.url, autocommit=True) as conn:
        conn.execute(busy, (b, device_b, SEED_START))
        conn.execute("ANALYZE telemetry")
        try:
            estimates = {
                device: login_a.execute(plan, (device,)).fetchone()[0][0]["Plan"]["Plan Rows"]
                for device in (device_b, 10**6)
            }
        finally:
            conn.execute("DELETE FROM telemetry WHERE metric = 'voltage_v'")
            conn.execute("ANALYZE telemetry")
    assert estimates[device_b] == estimates[10**6], estimates


@pytest.mark.xfail(
    strict=True, raises=psycopg.errors.LockNotAvailable, reason="known hole (docs/security.md)"
)
def test_a_tenant_login_cannot_hold_up_another_tenants_billing(seeded, login_a):
    b = seeded.tenants[1]
    login_a.execute("SELECT pg_advisory_lock(hashtext('iiot.billing'), %s)", (b,))
    try:
        with connect(seeded.url, role="platform_rw") as conn:
            conn.execute("SET lock_timeout = '1s'")
            who = billing.tenant(conn, SLUGS[1])
            label = billing.period_containing(SEED_DAY, who.cycle_day).label
            billing.bill(conn, who, label, today=SEED_DAY + timedelta(days=1), actor="test")
            conn.rollback()
    finally:
        login_a.execute("SELECT pg_advisory_unlock_all()")


def test_shadow_readings_through_the_writer_land_nothing_and_are_dead_lettered(conn, database_url):
    """As the ingest daemon writes them (platform_rw, BatchWriter): a minute of readings under
    tenant A's id for tenant B's device, then B's own readings for that minute."""
    ids = two_tenants(conn)
    (a, _), (b, device_b) = ids
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    minute = [now + timedelta(seconds=s) for s in range(60)]
    with connect(database_url, role="platform_rw") as service:
        writer = BatchWriter(service)
        shadow = writer.write(reading_batch(a, device_b, minute, now), [], now=now)
        seen = conn.execute("SELECT last_seen FROM devices WHERE device_id = %s", (device_b,))
        assert seen.fetchone()[0] is None  # a refused reading is no sign of life
        real = writer.write(reading_batch(b, device_b, minute, now), [], now=now)
    assert (shadow.landed, shadow.dead_letters) == (0, 60)
    assert real.landed == 60
    stored = conn.execute(
        "SELECT tenant_id, count(*) FROM telemetry WHERE device_id = %s GROUP BY 1", (device_b,)
    ).fetchall()
    assert stored == [(b, 60)]
    letters = conn.execute(
        "SELECT reason, tenant_id, device_id, count(*) FROM dead_letters GROUP BY 1, 2, 3"
    ).fetchall()
    assert letters == [("wrong_tenant", None, device_b, 60)]


def test_compressed_chunks_are_read_through_the_tenant_views_only(conn, database_url):
    if storage_for(conn).mode != "timescale":
        pytest.skip("compression exists in TimescaleDB mode only")
    ids = two_tenants(conn)
    for n, (tenant_id, device_id) in enumerate(ids, start=1):
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
            " SELECT %s, %s, 'energy_kwh', %s + s * interval '1 minute', s"
            "   FROM generate_series(1, %s) s",
            (tenant_id, device_id, SEED_START, 100 * n),
        )
    compressed = conn.execute("SELECT compress_chunk(c) FROM show_chunks('telemetry') c").fetchall()
    assert compressed
    assert conn.execute(
        "SELECT bool_and(is_compressed) FROM timescaledb_information.chunks"
        " WHERE hypertable_name = 'telemetry'"
    ).fetchone()[0]
    compressed_tables = [
        name
        for (name,) in conn.execute(
            "SELECT '_timescaledb_internal.' || relname FROM pg_class"
            " WHERE relnamespace = '_timescaledb_internal'::regnamespace AND relkind = 'r'"
            "   AND (relname LIKE 'compress\\_hyper\\_%' OR relname LIKE '\\_compressed\\_%')"
        )
    ]
    assert len(compressed_tables) >= 2  # the compressed hypertable and a chunk of it
    for (tenant_id, device_id), expected in zip(ids, (100, 200), strict=True):
        with (
            tenant_login(database_url, tenant_id) as login,
            psycopg.connect(login_url(database_url, login), autocommit=True) as reader,
        ):
            seen = reader.execute(
                "SELECT tenant_id, device_id, count(*) FROM tenant.telemetry GROUP BY 1, 2"
            ).fetchall()
            assert seen == [(tenant_id, device_id, expected)]
            reader.execute(LEAK)
            assert leaked_by(reader, "tenant.telemetry", "tenant_id") == {tenant_id}
            for table in compressed_tables:
                privilege = "SELECT has_table_privilege(%s, 'SELECT')"
                assert not reader.execute(privilege, (table,)).fetchone()[0], table
                # the chunks refuse; the compressed hypertable itself fails for anyone, even a
                # superuser ("chunk ... has no dimension slices"): TimescaleDB plans it first
                outcome = refused(reader, f"SELECT count(*) FROM {table}")
                assert outcome is None or outcome.startswith("XX001"), table
    with connect(database_url, role="app_rw") as service:
        set_tenant(service, ids[1][0])
        assert service.execute("SELECT count(*) FROM tenant.telemetry").fetchone()[0] == 200


def test_the_service_role_reads_the_tenant_it_sets_and_nothing_without(seeded):
    a, _ = seeded.tenants
    views = tenant_views(seeded)
    tables = ["tenants", "devices", "telemetry_hourly", "invoices", "dead_letters", "audit_log"]
    with connect(seeded.url, role="app_rw") as conn:
        set_tenant(conn, a)
        assert tenants_seen(conn, views + tables) == {r: {a} for r in views + tables}
        conn.commit()
        assert tenants_seen(conn, views + tables) == {r: set() for r in views + tables}
        set_tenant(conn, None)
        assert tenants_seen(conn, views + tables) == {r: set() for r in views + tables}


def test_the_service_role_cannot_write_tenants_or_readings(seeded):
    a, _ = seeded.tenants
    with connect(seeded.url, role="app_rw") as conn:
        set_tenant(conn, a)
        device = seeded.devices[0]
        for statement, params in (
            ("UPDATE tenants SET retention_days = 3650 WHERE tenant_id = %s", (a,)),
            ("UPDATE tenants SET plan_id = 'enterprise' WHERE tenant_id = %s", (a,)),
            (
                "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
                " VALUES (%s, %s, 'energy_kwh', now(), 1)",
                (a, device),
            ),
            ("DELETE FROM telemetry_hourly WHERE tenant_id = %s", (a,)),
            ("DELETE FROM dead_letters WHERE tenant_id = %s", (a,)),
        ):
            assert refused(conn, statement, params) is None, statement


def test_tenant_setting_cannot_be_smuggled(seeded):
    with connect(seeded.url, role="app_rw") as conn:
        conn.execute("SELECT set_config('iiot.tenant_id', '1 OR true', true)")
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            conn.execute("SELECT count(*) FROM devices")


def test_app_role_cannot_run_ddl(seeded):
    with connect(seeded.url, role="app_rw", autocommit=True) as conn:
        for statement in (
            "CREATE TABLE sneaky (id int)",
            "DROP TABLE devices",
            "ALTER TABLE devices ADD COLUMN x int",
            "TRUNCATE telemetry",
            "CREATE TABLE telemetry_p29990101 PARTITION OF telemetry"
            " FOR VALUES FROM ('2999-01-01') TO ('2999-01-02')",
            "SELECT iiot_ensure_telemetry_partitions(current_date, current_date + 1)",
        ):
            outcome = refused(conn, statement)
            # a hypertable refuses PARTITION OF even before the privilege check
            assert outcome is None or outcome.startswith("0A000"), statement


def test_platform_role_sees_every_tenant_and_can_extend_storage(seeded):
    a, b = seeded.tenants
    with connect(seeded.url, role="platform_rw") as conn:
        assert tenants_seen(conn, ["telemetry"]) == {"telemetry": {a, b}}
        conn.execute("SELECT iiot_ensure_telemetry_partitions('2030-01-01', '2030-01-02')")
        conn.execute(
            "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
            " VALUES (%s, %s, 'energy_kwh', '2030-01-02T12:00:00Z', 1)",
            (a, seeded.devices[0]),
        )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP TABLE telemetry")
        conn.rollback()


def test_readonly_audit_reads_everything_and_writes_nothing(seeded):
    with connect(seeded.url, role="readonly_audit") as conn:
        assert tenants_seen(conn, ["devices"]) == {"devices": set(seeded.tenants)}
        assert conn.execute("SELECT count(*) FROM iiot_schema_migrations").fetchone()[0] >= 5
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO audit_log (actor, action, entity) VALUES ('x', 'y.z', 'e')")


def test_audit_log_is_append_only_even_for_its_owner(seeded):
    with psycopg.connect(seeded.url, autocommit=True) as conn:
        for statement in (
            "UPDATE audit_log SET actor = 'someone else'",
            "DELETE FROM audit_log",
            "TRUNCATE audit_log",
        ):
            with (
                pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"),
                conn.transaction(force_rollback=True),
            ):
                conn.execute(statement)


def test_unknown_role_is_refused(seeded):
    with pytest.raises(ValueError, match="unknown role"), connect(seeded.url, role="postgres"):
        pass
