"""`iiot tenants logins`: logins bound to one tenant, tried from the tenant's side of the boundary.

Logins are roles of the whole server, shared by the parallel test databases: every test names
its roles uniquely and drops them (after ending their sessions) when it is done.
"""

import base64
import hashlib
import hmac
import json
import re
import uuid
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from iiot_orchestration import registry, tenant_logins
from iiot_orchestration.cli import main
from iiot_orchestration.settings import to_url

PASSWORD_LINE = re.compile(r"^password: (\S+)$", re.MULTILINE)
LOGIN_LINE = re.compile(r"^login:    (\S+)$", re.MULTILINE)


def unique_name(prefix: str = "t_test") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def url_as(database_url: str, user: str, password: str | None = None) -> str:
    params = conninfo_to_dict(database_url)
    params.update(user=user, password=password)
    return to_url(params)


def connect_as(database_url: str, login: str, password: str) -> psycopg.Connection:
    return psycopg.connect(
        url_as(database_url, login, password), autocommit=True, connect_timeout=5
    )


def scram_matches(verifier: str, password: str) -> bool:
    """Whether ``password`` is the one behind a SCRAM-SHA-256 verifier (RFC 5802, RFC 7677).

    The test server trusts 127.0.0.1, so connecting proves nothing about the password."""
    method, iterations_salt, keys = verifier.split("$")
    iterations, salt = iterations_salt.split(":")
    stored_key, server_key = keys.split(":")
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(salt), int(iterations)
    )
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    return (
        method == "SCRAM-SHA-256"
        and hashlib.sha256(client_key).digest() == base64.b64decode(stored_key)
        and hmac.digest(salted, b"Server Key", "sha256") == base64.b64decode(server_key)
    )


@pytest.fixture
def roles(conn):
    """Names of server roles this test creates; they are dropped at its end, with every login
    the test's tenant_logins lists (defaults have random names)."""
    created: list[str] = []
    yield created
    listed = [r[0] for r in conn.execute("SELECT login FROM tenant_logins")]
    for name in [*listed, *reversed(created)]:
        assert name.startswith("t_"), f"refusing to drop {name!r}: not a role of this test"
        conn.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = %s",
            (name,),
        )
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def tenants(conn):
    """Two tenants with one device each: slug -> (tenant_id, device_id)."""
    ids = {}
    for slug, mac in (("acme", "02:00:00:00:1a:01"), ("globex", "02:00:00:00:1b:01")):
        tenant = registry.create_tenant(
            conn, slug=slug, name=slug, plan="pro", timezone="America/Sao_Paulo"
        )
        [result] = registry.provision_devices(conn, slug, [registry.DeviceRequest(mac, "energy")])
        ids[slug] = (tenant.tenant_id, result.device_id)
    return ids


@pytest.fixture
def run(cli_env, monkeypatch):
    """``run(*args, url=None)``: the CLI in-process, as the superuser or as ``url``'s user."""
    for key in [k for k in __import__("os").environ if k.startswith("IIOT_")]:
        monkeypatch.delenv(key)
    for key, value in cli_env.items():
        if key.startswith("IIOT_"):
            monkeypatch.setenv(key, value)

    def invoke(*args, url=None):
        if url is not None:
            monkeypatch.setenv("IIOT_DATABASE_URL", url)
        try:
            return CliRunner().invoke(main, ["tenants", "logins", *args], catch_exceptions=False)
        finally:
            monkeypatch.setenv("IIOT_DATABASE_URL", cli_env["IIOT_DATABASE_URL"])

    return invoke


@pytest.fixture
def operator(database_url, conn, roles):
    """``make(createrole, admin, signal)``: URL of a non-superuser operator with those rights."""

    def make(*, createrole=True, admin=True, signal=False):
        name = unique_name("t_operator")
        roles.append(name)
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN {}").format(
                sql.Identifier(name), sql.SQL("CREATEROLE" if createrole else "NOCREATEROLE")
            )
        )
        if admin:
            conn.execute(sql.SQL("GRANT migration_admin TO {}").format(sql.Identifier(name)))
        if signal:
            conn.execute(sql.SQL("GRANT pg_signal_backend TO {}").format(sql.Identifier(name)))
        return url_as(database_url, name)

    return make


def created(result):
    assert result.exit_code == 0, result.output
    return LOGIN_LINE.search(result.stdout)[1], PASSWORD_LINE.search(result.stdout)[1]


def role(conn, login):
    return conn.execute(
        "SELECT rolcanlogin, rolpassword, rolconnlimit, rolvaliduntil, rolinherit, rolsuper"
        "  FROM pg_authid WHERE rolname = %s",
        (login,),
    ).fetchone()


def audit_rows(conn, login):
    return conn.execute(
        "SELECT action, tenant_id, actor, detail FROM audit_log"
        " WHERE entity = 'tenant_login' AND entity_id = %s ORDER BY audit_id",
        (login,),
    ).fetchall()


def password_stored_anywhere(conn, password):
    return conn.execute(
        "SELECT (SELECT count(*) FROM pg_authid a WHERE a::text LIKE %(p)s)"
        "     + (SELECT count(*) FROM pg_db_role_setting s WHERE s::text LIKE %(p)s)"
        "     + (SELECT count(*) FROM tenant_logins l WHERE l::text LIKE %(p)s)"
        "     + (SELECT count(*) FROM audit_log a WHERE a::text LIKE %(p)s)",
        {"p": f"%{password}%"},
    ).fetchone()[0]


def test_created_login_reads_only_its_tenant(run, conn, database_url, tenants, roles):
    result = run("create", "--tenant", "acme")
    login, password = created(result)
    assert re.fullmatch(r"t_acme_[a-z0-9]{6}", login)
    assert len(password) >= 32
    assert result.stdout.count(password) == 2  # the password line and the URL, nothing more
    host = conninfo_to_dict(database_url)
    assert f"postgresql://{login}:{password}@{host['host']}:{host['port']}/{host['dbname']}" in (
        result.stdout
    )
    assert "shown only now and is stored nowhere" in result.stderr

    can_login, verifier, limit, valid_until, inherit, superuser = role(conn, login)
    assert can_login
    assert inherit
    assert not superuser
    assert (limit, valid_until) == (5, None)
    assert verifier.startswith("SCRAM-SHA-256$")
    assert scram_matches(verifier, password)
    assert not scram_matches(verifier, password + "x")
    assert password_stored_anywhere(conn, password) == 0

    acme, globex = tenants["acme"], tenants["globex"]
    with connect_as(database_url, login, password) as tenant:
        assert tenant.execute("SHOW search_path").fetchone()[0] == "tenant, public"
        assert tenant.execute("SHOW statement_timeout").fetchone()[0] == "5min"
        assert tenant.execute("SELECT iiot_current_tenant()").fetchone()[0] == acme[0]
        tenant.execute("SELECT set_config('iiot.tenant_id', %s, false)", (str(globex[0]),))
        assert tenant.execute("SELECT iiot_current_tenant()").fetchone()[0] == acme[0]
        devices = tenant.execute("SELECT device_id, tenant_id FROM tenant.devices").fetchall()
        assert devices == [(acme[1], acme[0])]
        assert tenant.execute("SELECT count(*) FROM devices").fetchone()[0] == 1  # the view
        assert tenant.execute("SELECT slug FROM account").fetchall() == [("acme",)]
        for statement in (
            "SET ROLE app_rw",
            "SET ROLE platform_rw",
            "SET ROLE migration_admin",
            "SELECT count(*) FROM public.devices",
            "SELECT count(*) FROM public.telemetry",
            "SELECT count(*) FROM public.tenant_logins",
            "SELECT count(*) FROM public.audit_log",
            "UPDATE public.tenant_logins SET tenant_id = tenant_id",
            "CREATE TABLE tenant.mine (x int)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                tenant.execute(statement)

    [(action, tenant_id, actor, detail)] = audit_rows(conn, login)
    assert (action, tenant_id, actor) == ("tenant_login.created", acme[0], "cli")
    assert detail == {"valid_until": None, "connection_limit": 5}


def test_create_options_and_json(run, conn, tenants, roles):
    login = unique_name()
    until = date.today() + timedelta(days=30)
    result = run(
        "create",
        "--tenant",
        "globex",
        "--name",
        login,
        "--valid-until",
        until.isoformat(),
        "--connection-limit",
        "2",
        "--json",
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["login"] == login
    assert (shown["tenant"], shown["tenant_id"]) == ("globex", tenants["globex"][0])
    assert shown["connection_limit"] == 2
    assert shown["url"].startswith(f"postgresql://{login}:{shown['password']}@")
    expires = datetime(until.year, until.month, until.day, tzinfo=UTC)
    _, verifier, limit, valid_until, _, _ = role(conn, login)
    assert (limit, valid_until) == (2, expires)
    assert scram_matches(verifier, shown["password"])
    assert conn.execute(
        "SELECT tenant_id, valid_until, created_by FROM tenant_logins WHERE login = %s", (login,)
    ).fetchone() == (tenants["globex"][0], expires, "postgres")
    [(_, _, _, detail)] = audit_rows(conn, login)
    assert detail == {"valid_until": expires.isoformat(), "connection_limit": 2}


def test_list_shows_state(run, conn, tenants, roles):
    first, _ = created(run("create", "--tenant", "acme"))
    second, _ = created(run("create", "--tenant", "acme"))
    third, _ = created(run("create", "--tenant", "globex"))
    conn.execute(
        "UPDATE tenant_logins SET valid_until = now() - interval '1 day' WHERE login = %s",
        (second,),
    )
    assert run("revoke", third).exit_code == 0

    table = run("list")
    assert table.exit_code == 0, table.output
    assert table.stdout.splitlines()[0].split() == [
        "LOGIN",
        "TENANT",
        "CREATED_AT",
        "CREATED_BY",
        "VALID_UNTIL",
        "ROTATED_AT",
        "STATE",
    ]
    assert re.search(rf"^{first}\s+acme\s.*\sactive$", table.stdout, re.MULTILINE)
    assert re.search(rf"^{second}\s+acme\s.*\sexpired$", table.stdout, re.MULTILINE)
    assert third not in table.stdout

    every = {row["login"]: row for row in json.loads(run("list", "--all", "--json").stdout)}
    assert {login: row["state"] for login, row in every.items()} == {
        first: "active",
        second: "expired",
        third: "revoked",
    }
    assert every[third]["revoked_by"] == "postgres"
    assert every[first]["tenant_id"] == tenants["acme"][0]
    assert re.search(rf"^{third}\s+globex\s.*\srevoked$", run("list", "--all").stdout, re.M)

    only = json.loads(run("list", "--tenant", "globex", "--all", "--json").stdout)
    assert [row["login"] for row in only] == [third]
    assert json.loads(run("list", "--tenant", "globex", "--json").stdout) == []
    unknown = run("list", "--tenant", "initech")
    assert unknown.exit_code == 1
    assert "error: unknown tenant 'initech'" in unknown.output


def test_rotate_changes_the_password(run, conn, database_url, tenants, roles):
    login, old = created(run("create", "--tenant", "acme"))
    old_verifier = role(conn, login)[1]

    result = run("rotate", login)
    assert result.exit_code == 0, result.output
    new = PASSWORD_LINE.search(result.stdout)[1]
    assert new != old
    assert "shown only now" in result.stderr
    verifier = role(conn, login)[1]
    assert verifier != old_verifier
    assert scram_matches(verifier, new)
    assert not scram_matches(verifier, old)
    assert conn.execute(
        "SELECT rotated_at IS NOT NULL FROM tenant_logins WHERE login = %s", (login,)
    ).fetchone()[0]
    again = json.loads(run("rotate", login, "--json").stdout)
    assert scram_matches(role(conn, login)[1], again["password"])
    for password in (old, new, again["password"]):
        assert password_stored_anywhere(conn, password) == 0
    assert [(a, t) for a, t, _, _ in audit_rows(conn, login)] == [
        ("tenant_login.created", tenants["acme"][0]),
        ("tenant_login.rotated", tenants["acme"][0]),
        ("tenant_login.rotated", tenants["acme"][0]),
    ]
    with connect_as(database_url, login, again["password"]) as tenant:
        assert tenant.execute("SELECT iiot_current_tenant()").fetchone()[0] == tenants["acme"][0]


def test_revoke_ends_sessions_and_logins(run, conn, database_url, tenants, roles):
    login, password = created(run("create", "--tenant", "acme"))
    session = connect_as(database_url, login, password)
    assert session.execute("SELECT count(*) FROM tenant.devices").fetchone()[0] == 1

    result = run("revoke", login)
    assert result.exit_code == 0, result.output
    assert f"Revoked tenant login {login} of tenant acme" in result.stdout
    assert "1 open sessions terminated" in result.stdout
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")
    session.close()
    assert role(conn, login)[0] is False
    with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
        connect_as(database_url, login, password)
    assert conn.execute(
        "SELECT revoked_at IS NOT NULL, revoked_by FROM tenant_logins WHERE login = %s", (login,)
    ).fetchone() == (True, "postgres")

    again = run("revoke", login)
    assert again.exit_code == 0, again.output
    assert f"Tenant login {login} was already revoked at" in again.stdout
    assert [(a, t) for a, t, _, _ in audit_rows(conn, login)] == [
        ("tenant_login.created", tenants["acme"][0]),
        ("tenant_login.revoked", tenants["acme"][0]),
    ]
    rotate = run("rotate", login)
    assert rotate.exit_code == 1
    assert f"error: login '{login}' was revoked at" in rotate.output
    assert password_stored_anywhere(conn, password) == 0


def test_a_session_that_survives_revocation_sees_nothing(
    run, conn, database_url, tenants, roles, operator
):
    login, password = created(run("create", "--tenant", "acme"))
    with connect_as(database_url, login, password) as tenant:
        # an operator without pg_signal_backend cannot end the session
        result = run("revoke", login, "--json", url=operator(signal=False))
        assert result.exit_code == 0, result.output
        done = json.loads(result.stdout)
        assert (done["sessions_terminated"], done["sessions_left"]) == (0, 1)
        assert "1 sessions of" in result.stderr
        assert tenant.execute("SELECT iiot_current_tenant()").fetchone()[0] is None
        tenant.execute("SELECT set_config('iiot.tenant_id', %s, false)", (str(tenants["acme"][0]),))
        assert tenant.execute("SELECT iiot_current_tenant()").fetchone()[0] is None
        assert tenant.execute("SELECT count(*) FROM tenant.devices").fetchone()[0] == 0
        assert tenant.execute("SELECT count(*) FROM tenant.account").fetchone()[0] == 0


def test_an_expired_login_sees_nothing_whatever_it_signed_in_with(
    run, conn, database_url, tenants, roles
):
    """VALID UNTIL binds password sign-in only; trust or certificate sign-in gets past it, so
    the tenant itself expires too."""
    login, password = created(run("create", "--tenant", "acme"))
    with connect_as(database_url, login, password) as tenant:
        assert tenant.execute("SELECT count(*) FROM tenant.devices").fetchone()[0] == 1
        conn.execute(
            "UPDATE tenant_logins SET valid_until = now() - interval '1 second' WHERE login = %s",
            (login,),
        )
        assert tenant.execute("SELECT iiot_current_tenant()").fetchone()[0] is None
        tenant.execute("SELECT set_config('iiot.tenant_id', %s, false)", (str(tenants["acme"][0]),))
        assert tenant.execute("SELECT count(*) FROM tenant.devices").fetchone()[0] == 0


def test_a_non_superuser_operator_manages_logins(run, conn, database_url, tenants, roles, operator):
    url = operator(signal=True)
    result = run("create", "--tenant", "globex", url=url)
    login, password = created(result)
    assert (
        conn.execute("SELECT created_by FROM tenant_logins WHERE login = %s", (login,)).fetchone()[
            0
        ]
        == conninfo_to_dict(url)["user"]
    )
    with connect_as(database_url, login, password) as tenant:
        assert tenant.execute("SELECT count(*) FROM tenant.devices").fetchone()[0] == 1
    assert run("rotate", login, url=url).exit_code == 0
    assert run("list", url=url).exit_code == 0
    session = connect_as(database_url, login, password)
    revoked = run("revoke", login, url=url)
    assert revoked.exit_code == 0, revoked.output
    assert "1 open sessions terminated" in revoked.stdout
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")
    session.close()


@pytest.mark.parametrize(
    ("rights", "needed"),
    [
        ({"createrole": False, "admin": False}, "it needs CREATEROLE (ALTER ROLE"),
        ({"createrole": True, "admin": False}, "membership in migration_admin"),
        ({"createrole": False, "admin": True}, "it needs CREATEROLE (ALTER ROLE"),
    ],
)
def test_an_operator_without_the_rights_is_told_what_is_missing(
    run, conn, tenants, roles, operator, rights, needed
):
    url = operator(**rights)
    login = unique_name()
    roles.append(login)
    for args in (
        ("create", "--tenant", "acme", "--name", login),
        ("revoke", login),
        ("rotate", login),
    ):
        result = run(*args, url=url)
        assert result.exit_code == 1, args
        [line] = result.output.splitlines()
        assert line.startswith("error: database user ")
        assert needed in line
        assert "or connect as a superuser" in line
    assert role(conn, login) is None
    assert conn.execute("SELECT count(*) FROM tenant_logins").fetchone()[0] == 0


def test_listing_needs_read_access(run, roles, operator):
    result = run("list", url=operator(createrole=False, admin=False))
    assert result.exit_code == 1
    assert "cannot read tenant_logins" in result.output


@pytest.mark.parametrize(
    "name",
    [
        "Robert'); DROP TABLE devices;--",
        'x" SUPERUSER --',
        "Acme_reader",
        "t_acme\n",
        "ab",
        "_acme",
        "1acme",
        "t_" + "a" * 62,
        "pg_acme",
        "t-acme",
        "t_acme\u00e9",
    ],
)
def test_bad_login_names_are_refused(run, conn, tenants, roles, name):
    result = run("create", "--tenant", "acme", "--name", name)
    assert result.exit_code == 2, result.output
    assert "Invalid value for --name: bad login name" in result.output
    assert "Traceback" not in result.output
    assert conn.execute("SELECT count(*) FROM devices").fetchone()[0] == 2
    assert conn.execute("SELECT count(*) FROM tenant_logins").fetchone()[0] == 0


@pytest.mark.parametrize("name", ["postgres", "platform_rw", "tenant_reader", "migration_admin"])
def test_existing_roles_are_refused(run, conn, tenants, roles, name):
    before = role(conn, name)
    result = run("create", "--tenant", "acme", "--name", name)
    assert result.exit_code == 1
    assert f"error: a database role named '{name}' already exists" in result.output
    assert role(conn, name) == before
    assert conn.execute("SELECT count(*) FROM tenant_logins").fetchone()[0] == 0


def test_duplicate_unknown_tenant_and_out_of_range_are_refused(run, conn, tenants, roles):
    login = unique_name()
    roles.append(login)
    assert run("create", "--tenant", "acme", "--name", login).exit_code == 0
    verifier = role(conn, login)[1]
    duplicate = run("create", "--tenant", "globex", "--name", login)
    assert duplicate.exit_code == 1
    assert f"error: a database role named '{login}' already exists" in duplicate.output
    assert role(conn, login)[1] == verifier
    assert conn.execute("SELECT tenant_id FROM tenant_logins").fetchall() == [(tenants["acme"][0],)]

    other = unique_name()
    roles.append(other)
    unknown = run("create", "--tenant", "initech", "--name", other)
    assert unknown.exit_code == 1
    assert "error: unknown tenant 'initech'" in unknown.output
    assert role(conn, other) is None

    for limit in ("0", "-1", "101", "many"):
        result = run("create", "--tenant", "acme", "--name", other, "--connection-limit", limit)
        assert result.exit_code == 2, limit
        assert "--connection-limit" in result.output
    today = datetime.now(UTC).date()
    for day in (today, today - timedelta(days=1), "2020-01-01"):
        result = run("create", "--tenant", "acme", "--name", other, "--valid-until", str(day))
        assert result.exit_code == 2, day
        assert "is not in the future" in result.output
    for day in ("2026-02-30", "tomorrow", "2026-1-1"):
        result = run("create", "--tenant", "acme", "--name", other, "--valid-until", day)
        assert result.exit_code == 2, day
    assert role(conn, other) is None
    assert len(audit_rows(conn, login)) == 1


def test_the_library_checks_its_arguments_too(conn, tenants, roles):
    with pytest.raises(tenant_logins.TenantLoginError, match="between 1 and 100"):
        tenant_logins.create_login(conn, "acme", connection_limit=0)
    with pytest.raises(tenant_logins.TenantLoginError, match="not in the future"):
        tenant_logins.create_login(
            conn, "acme", valid_until=date(2030, 1, 1), today=date(2030, 1, 1)
        )
    with pytest.raises(tenant_logins.TenantLoginError, match="bad login name"):
        tenant_logins.create_login(conn, "acme", login="x; DROP ROLE postgres")
    assert tenant_logins.default_login_name("a-" + "b" * 61).startswith("t_a_bbb")
    assert len(tenant_logins.default_login_name("a-" + "b" * 61)) == 63
    assert conn.execute("SELECT count(*) FROM tenant_logins").fetchone()[0] == 0


@pytest.mark.parametrize("name", ["postgres", "platform_rw", "app_rw", "tenant_reader", "nobody_x"])
def test_revoke_and_rotate_refuse_roles_that_are_not_tenant_logins(run, conn, name):
    before = role(conn, name)
    for command in ("revoke", "rotate"):
        result = run(command, name)
        assert result.exit_code == 1
        assert f"error: '{name}' is not a tenant login" in result.output
        assert "nothing changed" in result.output
    assert role(conn, name) == before
    assert (
        conn.execute("SELECT count(*) FROM audit_log WHERE entity = 'tenant_login'").fetchone()[0]
        == 0
    )


def test_a_role_listed_by_mistake_is_never_changed(run, conn, database_url, tenants, roles):
    """A person's login put into tenant_logins by hand is not disabled nor given a password."""
    person = unique_name()
    roles.append(person)
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'secret'").format(sql.Identifier(person)))
    conn.execute(sql.SQL("GRANT platform_rw TO {}").format(sql.Identifier(person)))
    conn.execute(
        "INSERT INTO tenant_logins (login, tenant_id) VALUES (%s, %s)",
        (person, tenants["acme"][0]),
    )
    before = role(conn, person)
    with psycopg.connect(url_as(database_url, person)) as session:
        for command in ("revoke", "rotate"):
            result = run(command, person)
            assert result.exit_code == 1
            assert f"error: refusing to change role '{person}'" in result.output
        session.execute("SELECT 1")
    assert role(conn, person) == before
    assert conn.execute(
        "SELECT revoked_at, rotated_at FROM tenant_logins WHERE login = %s", (person,)
    ).fetchone() == (None, None)


def test_commands_have_help():
    for command in ("create", "list", "revoke", "rotate"):
        result = CliRunner().invoke(main, ["tenants", "logins", command, "--help"])
        assert result.exit_code == 0, command
