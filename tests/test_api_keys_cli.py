"""`iiot api-keys`: create (shown once), list, revoke, rotate, and what it refuses."""

from __future__ import annotations

import json
import os

import psycopg
import pytest
from click.testing import CliRunner

from iiot_orchestration import registry
from iiot_orchestration.api import keys
from iiot_orchestration.cli import main


@pytest.fixture
def run(cli_env, monkeypatch):
    for key in [k for k in list(os.environ) if k.startswith("IIOT_")]:
        monkeypatch.delenv(key)
    for key, value in cli_env.items():
        if key.startswith("IIOT_"):
            monkeypatch.setenv(key, value)

    def invoke(*args):
        return CliRunner().invoke(main, ["api-keys", *args], catch_exceptions=False)

    return invoke


@pytest.fixture
def acme(database_url):
    with psycopg.connect(database_url) as conn:
        registry.create_tenant(conn, slug="acme", name="Acme", plan="pro", timezone="UTC")


def test_create_list_rotate_and_revoke(run, acme, database_url):
    created = run("create", "--tenant", "acme", "--role", "editor", "--name", "grafana", "--json")
    assert created.exit_code == 0, created.output
    new = json.loads(created.output[: created.output.rindex("}") + 1])
    assert keys.well_formed(new["key"])
    assert (new["tenant"], new["role"], new["name"]) == ("acme", "editor", "grafana")
    platform = run("create", "--platform", "--name", "operations")
    assert platform.exit_code == 0, platform.output
    assert "all (platform key)" in platform.output

    listed = run("list")
    assert listed.exit_code == 0, listed.output
    assert new["prefix"] in listed.output
    assert "grafana" in listed.output
    assert new["key"] not in listed.output  # never the key itself
    as_json = json.loads(run("list", "--tenant", "acme", "--json").output)
    assert [k["prefix"] for k in as_json] == [new["prefix"]]

    rotated = run("rotate", new["prefix"], "--grace-hours", "2", "--json")
    assert rotated.exit_code == 0, rotated.output
    assert "works until" in rotated.output
    revoked = run("revoke", str(new["key_id"]))
    assert revoked.exit_code == 0, revoked.output
    assert f"revoked key {new['key_id']}" in revoked.output
    again = run("revoke", str(new["key_id"]))  # revoking twice changes nothing
    assert again.exit_code == 0, again.output
    with psycopg.connect(database_url) as conn:
        actions = [
            r[0]
            for r in conn.execute(
                "SELECT action FROM audit_log WHERE entity = 'api_key' ORDER BY audit_id"
            )
        ]
    assert actions == [
        "api_key.created",
        "api_key.created",
        "api_key.created",
        "api_key.rotated",
        "api_key.revoked",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", "--name", "x"], "exactly one of --tenant SLUG and --platform"),
        (["create", "--tenant", "acme", "--platform", "--name", "x"], "exactly one of"),
        (["create", "--tenant", "nobody", "--name", "x"], "unknown tenant 'nobody'"),
        (["create", "--tenant", "acme", "--name", ""], "key name"),
        (["create", "--tenant", "acme", "--name", "x" * 101], "key name"),
        (["create", "--tenant", "acme", "--name", '=HYPERLINK("x")'], "key name"),
        (["create", "--tenant", "acme", "--role", "owner", "--name", "x"], "'owner' is not one"),
        (["create", "--tenant", "acme", "--name", "x", "--expires-in-days", "0"], "0 is not"),
        (["revoke", "zzzzzzzz"], "no API key 'zzzzzzzz'"),
        (["revoke", "'; DROP TABLE api_keys; --"], "no API key"),
        (["rotate", "99999"], "no API key '99999'"),
    ],
)
def test_bad_requests_are_refused_with_a_clear_error(run, acme, args, message):
    result = run(*args)
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
