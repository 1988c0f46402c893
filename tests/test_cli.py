import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from iiot_orchestration.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def run(cli_env, monkeypatch):
    for key in [k for k in list(__import__("os").environ) if k.startswith("IIOT_")]:
        monkeypatch.delenv(key)
    for key, value in cli_env.items():
        if key.startswith("IIOT_"):
            monkeypatch.setenv(key, value)

    def invoke(*args):
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    return invoke


def test_every_command_has_help():
    runner = CliRunner()
    for command in (
        ["db", "migrate"],
        ["db", "status"],
        ["tenants", "create"],
        ["tenants", "list"],
        ["devices", "provision"],
        ["devices", "list"],
        ["dev"],
        ["config"],
    ):
        result = runner.invoke(main, [*command, "--help"])
        assert result.exit_code == 0, command
        assert "Usage: main" in result.output or "Usage: iiot" in result.output


def _groups(group: click.Group, path: tuple[str, ...] = ()):
    yield path, group
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _groups(command, (*path, name))


def _first_sentence(text: str | None) -> str:
    words = (text or "").split("\n\n", 1)[0].split()
    ends = [i for i, word in enumerate(words) if word.endswith(".")]
    return " ".join(words[: ends[0] + 1] if ends else words)


def test_help_lists_each_command_with_its_whole_first_sentence():
    """click cuts a command's description at the end of one line, with '...' (issue 21)."""
    for path, group in _groups(main):
        result = CliRunner().invoke(main, [*path, "--help"], terminal_width=80)
        assert result.exit_code == 0, path
        listing = result.output.split("\nCommands:\n", 1)[1]
        assert "..." not in listing, (path, listing)
        flat = " ".join(listing.split())
        for name, command in group.commands.items():
            if command.hidden:
                continue
            described = command.short_help or _first_sentence(command.help)
            assert f"{name} {described}" in flat, (path, name, flat)


def test_readme_lists_every_command():
    """The README's command list names every top-level command and group the CLI registers."""
    section = README.read_text().split("## The `iiot` command", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    listed = set(re.findall(r"^iiot ([a-z-]+)", block, flags=re.MULTILINE))
    registered = {name for name, command in main.commands.items() if not command.hidden}
    assert listed == registered


def test_db_commands(run, storage_mode):
    first = run("db", "migrate")
    assert first.exit_code == 0
    assert "Nothing to migrate" in first.output
    status = run("db", "status")
    assert f"storage mode: {storage_mode}" in status.output
    assert "0 pending" in status.output
    rows = json.loads(run("db", "status", "--json").output)
    assert {r["state"] for r in rows} == {"applied"}


def test_tenant_and_device_lifecycle(run, tmp_path):
    created = run("tenants", "create", "acme", "--name", "Acme Energia", "--plan", "pro")
    assert created.exit_code == 0
    assert "Created tenant acme" in created.output
    again = run("tenants", "create", "acme", "--name", "Acme")
    assert again.exit_code == 1
    assert "error: tenant 'acme' already exists" in again.output
    one = run(
        "devices",
        "provision",
        "--tenant",
        "acme",
        "--mac",
        "AA:BB:CC:00:00:01",
        "--kind",
        "energy",
        "--metrics",
        "energy_kwh,voltage_v",
    )
    assert one.exit_code == 0
    assert "1 provisioned" in one.output
    csv_file = tmp_path / "devices.csv"
    csv_file.write_text(
        "mac,meter_kind,name\n"
        "aa:bb:cc:00:00:01,energy,again\n"
        "aa:bb:cc:00:00:02,water,Inlet\n"
        "bogus,gas,Broken\n"
    )
    batch = run("devices", "provision", "--tenant", "acme", "--csv", str(csv_file))
    assert batch.exit_code == 1
    assert "1 provisioned, 1 skipped (already provisioned), 1 rejected" in batch.output
    assert "4     bogus" in batch.output
    listed = json.loads(run("devices", "list", "--tenant", "acme", "--json").output)
    assert sorted(d["mac"] for d in listed) == ["aa:bb:cc:00:00:01", "aa:bb:cc:00:00:02"]
    table = run("devices", "list").output
    assert "energy_kwh,voltage_v" in table
    tenants = run("tenants", "list").output
    assert "2/100" in tenants
    assert json.loads(run("tenants", "list", "--json").output)[0]["slug"] == "acme"


def test_dry_run_registers_nothing(run, tmp_path):
    run("tenants", "create", "acme", "--name", "Acme")
    csv_file = tmp_path / "devices.csv"
    csv_file.write_text("mac,meter_kind\naa:bb:cc:00:00:09,gas\n")
    result = run("devices", "provision", "--tenant", "acme", "--csv", str(csv_file), "--dry-run")
    assert result.exit_code == 0
    assert "dry run, nothing registered: would provision 1, 0 skipped" in result.output
    assert "would provision" in result.output.splitlines()[1]  # the row, not only the total
    assert "1 provisioned" not in result.output
    assert json.loads(run("devices", "list", "--json").output) == []


@pytest.mark.parametrize(
    "args",
    [
        ["devices", "provision", "--tenant", "acme"],
        ["devices", "provision", "--tenant", "acme", "--mac", "aa:bb:cc:00:00:01"],
        ["devices", "provision", "--tenant", "acme", "--csv", "README.md", "--mac", "x"],
        ["devices", "provision", "--tenant", "acme", "--mac", "x", "--kind", "steam"],
        ["devices", "provision", "--tenant", "acme", "--csv", "/no/such/file.csv"],
        ["tenants", "create", "acme", "--name", "A", "--billing-day", "31"],
        ["tenants", "create", "acme", "--name", "A", "--retention-days", "-5"],
    ],
)
def test_usage_errors_exit_2(run, args):
    assert run(*args).exit_code == 2


def test_unusable_csv_is_one_clear_error(run, tmp_path):
    run("tenants", "create", "acme", "--name", "Acme")
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\xff\xfe binary garbage \x00\x01")
    result = run("devices", "provision", "--tenant", "acme", "--csv", str(bad))
    assert result.exit_code == 1
    assert result.output.startswith("error: CSV file contains NUL bytes")


def test_an_unterminated_quote_names_its_line(run, tmp_path):
    run("tenants", "create", "acme", "--name", "Acme")
    bad = tmp_path / "bad.csv"
    bad.write_text('mac,meter_kind,name\naa:bb:cc:00:00:01,energy\naa:bb:cc:00:00:02,gas,"Boiler\n')
    result = run("devices", "provision", "--tenant", "acme", "--csv", str(bad))
    assert result.exit_code == 1
    assert result.output.startswith(
        "error: CSV file is malformed on line 3: a quote in this row is never closed"
    )
    assert json.loads(run("devices", "list", "--json").output) == []


def test_unreachable_database_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("IIOT_DATABASE_URL", "postgresql://nobody:pw@127.0.0.1:1/nowhere")
    result = CliRunner().invoke(main, ["tenants", "list"])
    assert result.exit_code == 1
    assert "error: cannot connect to postgresql://nobody:***@127.0.0.1:1/nowhere" in result.output
    assert "pw@" not in result.output


def test_missing_database_url_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("IIOT_DATABASE_URL", raising=False)
    result = CliRunner().invoke(main, ["db", "status"])
    assert result.exit_code == 1
    assert "IIOT_DATABASE_URL is not set" in result.output


def test_console_script_runs_as_a_process(cli_env):
    result = subprocess.run(
        [sys.executable, "-m", "iiot_orchestration.cli", "db", "migrate"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Nothing to migrate" in result.stdout


def test_simulate_publishes_for_provisioned_devices(run, mqtt_url, monkeypatch):
    import queue
    import uuid
    from urllib.parse import urlsplit

    import paho.mqtt.client as mqtt

    prefix = f"clisim{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("IIOT_MQTT_URL", mqtt_url)
    monkeypatch.setenv("IIOT_TOPIC_PREFIX", prefix)
    run("tenants", "create", "acme", "--name", "Acme")
    run("devices", "provision", "--tenant", "acme", "--mac", "aa:bb:cc:00:00:01", "--kind", "gas")
    received: queue.Queue = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    subscribed = threading.Event()
    client.on_message = lambda _c, _u, message: received.put(message.topic)
    client.on_subscribe = lambda *_: subscribed.set()
    parts = urlsplit(mqtt_url)
    client.connect(parts.hostname, parts.port)
    client.subscribe(f"{prefix}/devices/+/telemetry", qos=1)
    client.loop_start()
    try:
        assert subscribed.wait(10)
        result = run("simulate", "--count", "3", "--rate", "20")
        assert result.exit_code == 0, result.output
        assert "Done: 3 messages published, 3 acknowledged" in result.output
        topics = [received.get(timeout=10) for _ in range(3)]
        assert set(topics) == {f"{prefix}/devices/aa:bb:cc:00:00:01/telemetry"}
    finally:
        client.loop_stop()
        client.disconnect()


def test_simulate_needs_a_broker_and_devices(run, monkeypatch):
    monkeypatch.delenv("IIOT_MQTT_URL", raising=False)
    assert run("simulate", "--count", "1").exit_code == 2
    monkeypatch.setenv("IIOT_MQTT_URL", "mqtt://127.0.0.1:1883")
    result = run("simulate", "--count", "1")
    assert result.exit_code == 1
    assert "no active devices to simulate" in result.output
