"""The slots' broker sessions: recorded, listed, drained and ended; changing the slot count or
the subscription mode strands and doubles nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.ingest_helpers import count, provision, start_ingest_process, wait_for
from tests.test_ingest_process import publish_in_background, stream

PART = 5_000


def _env(database_url, broker, tmp_path, mode):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(
        IIOT_DATABASE_URL=database_url,
        IIOT_MQTT_URL=broker.url,
        IIOT_DATA_DIR=str(tmp_path / "var"),
        IIOT_MQTT_SHARED_SUBSCRIPTION=mode,
    )
    return env


def start(env, group, processes=1) -> subprocess.Popen:
    """`iiot ingest` with the variables of ``env`` (see ``_env``)."""
    return start_ingest_process(
        env["IIOT_DATABASE_URL"],
        env["IIOT_MQTT_URL"],
        env["IIOT_DATA_DIR"],
        *("--group", group, "--processes", str(processes), "--metrics-port", "0"),
        IIOT_MQTT_SHARED_SUBSCRIPTION=env["IIOT_MQTT_SHARED_SUBSCRIPTION"],
    )


def stop(process) -> str:
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=90)[0]
    assert process.returncode == 0, output
    return output


def iiot(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "iiot_orchestration.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def connected(conn, slots: int) -> bool:
    return count(conn, "ingest_sessions", "state = 'connected'") == slots


def session_present(broker, client_id: str) -> bool:
    """Whether the broker still keeps ``client_id``'s session (it is resumed, then ended)."""
    flags = {}
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    client.on_connect = lambda _c, _u, f, _r, _p: flags.update(present=f.session_present)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 0  # ended on disconnect: the probe leaves nothing
    client.connect(broker.host, broker.port, clean_start=False, properties=properties)
    client.loop_start()
    assert wait_for(lambda: "present" in flags, timeout=15)
    client.disconnect()
    client.loop_stop()
    return flags["present"]


def stopped_counts(output: str) -> tuple[int, int]:
    """(messages, duplicates) of the daemon's closing line."""
    found = re.search(r"Stopped: ([\d,]+) messages, [\d,]+ readings landed, ([\d,]+) dup", output)
    assert found, output
    return int(found[1].replace(",", "")), int(found[2].replace(",", ""))


def test_two_slots_to_one_with_the_drain_strands_nothing(
    conn, database_url, ingest_broker, tmp_path
):
    """Shared subscription on: after the group shrinks, the retired slot's session goes on
    taking half the messages; the drain lands them and ends the session."""
    broker = ingest_broker
    provision(conn, "enterprise")
    conn.execute("UPDATE plans SET messages_per_minute_per_device = 1000000")
    group = f"g{uuid.uuid4().hex[:6]}"
    env = _env(database_url, broker, tmp_path, "on")
    payloads = stream(3 * PART)

    two = start(env, group, processes=2)
    try:
        assert wait_for(lambda: connected(conn, 2), timeout=60)
        publish_in_background(broker, payloads[:PART]).join(120)
        assert wait_for(lambda: count(conn, "telemetry") >= PART, timeout=120)
    finally:
        stop(two)

    one = start(env, group, processes=1)
    try:
        assert wait_for(lambda: connected(conn, 1), timeout=60)
        publish_in_background(broker, payloads[PART : 2 * PART]).join(120)
        # slot 1's session takes its share and keeps it: about half of the second part waits
        assert wait_for(lambda: count(conn, "telemetry") >= PART + PART // 4, timeout=60)
        assert not wait_for(lambda: count(conn, "telemetry") >= 2 * PART, timeout=3)
    finally:
        output = stop(one)
    assert "still hold a broker session" in output
    assert f"iiot ingest-sessions drain --group {group} --slot N" in output

    listed = iiot(env, "ingest-sessions", "list", "--group", group, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["slot"]: row for row in json.loads(listed.stdout)}
    assert set(rows) == {0, 1}
    assert rows[1]["status"] == "stopped: session kept"
    assert rows[1]["subscription"].startswith(f"$share/{group}/")

    drained = iiot(env, "ingest-sessions", "drain", "--group", group, "--slot", "1", "--idle", "2")
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert "its broker session is ended" in drained.stdout
    assert count(conn, "telemetry") == 2 * PART
    assert not session_present(broker, f"{group}-1")
    table = iiot(env, "ingest-sessions", "list", "--group", group)
    assert re.search(rf"{group}\s+1\s+{group}-1\s+\(ended\).*ended", table.stdout), table.stdout
    # the same drain again: nothing left to land, and no session left behind
    again = iiot(env, "ingest-sessions", "drain", "--group", group, "--slot", "1", "--idle", "1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"Drained {group}-1: 0 messages" in again.stdout
    assert not session_present(broker, f"{group}-1")

    # from now on slot 0 alone receives everything
    one = start(env, group, processes=1)
    try:
        assert wait_for(lambda: connected(conn, 1), timeout=60)
        publish_in_background(broker, payloads[2 * PART :]).join(120)
        assert wait_for(lambda: count(conn, "telemetry") >= 3 * PART, timeout=120)
    finally:
        output = stop(one)
    assert "still hold a broker session" not in output
    rows = conn.execute("SELECT count(*), count(DISTINCT value) FROM telemetry").fetchone()
    assert rows == (3 * PART, 3 * PART)
    assert count(conn, "dead_letters") == 0


def test_switching_the_subscription_mode_doubles_nothing(
    conn, database_url, ingest_broker, tmp_path
):
    """A slot that ran shared runs plain: what its session queued meanwhile arrives, and every
    later message arrives once (the shared form is removed from the session)."""
    broker = ingest_broker
    provision(conn, "enterprise")
    conn.execute("UPDATE plans SET messages_per_minute_per_device = 1000000")
    group = f"g{uuid.uuid4().hex[:6]}"
    payloads = stream(2 * PART)
    shared = start(_env(database_url, broker, tmp_path, "on"), group)
    assert wait_for(lambda: connected(conn, 1), timeout=60)
    stop(shared)
    # queued in the stopped slot's session under its shared subscription
    publish_in_background(broker, payloads[:PART]).join(120)

    plain = start(_env(database_url, broker, tmp_path, "off"), group)
    try:
        assert wait_for(lambda: connected(conn, 1), timeout=60)
        publish_in_background(broker, payloads[PART:]).join(120)
        assert wait_for(lambda: count(conn, "telemetry") >= 2 * PART, timeout=120)
    finally:
        output = stop(plain)
    assert stopped_counts(output) == (2 * PART, 0)
    rows = conn.execute("SELECT count(*), count(DISTINCT value) FROM telemetry").fetchone()
    assert rows == (2 * PART, 2 * PART)


def test_drain_refuses_a_running_slot_and_bad_arguments(
    conn, database_url, ingest_broker, tmp_path
):
    provision(conn)
    group = f"g{uuid.uuid4().hex[:6]}"
    env = _env(database_url, broker := ingest_broker, tmp_path, "auto")
    running = start(env, group)
    try:
        assert wait_for(lambda: connected(conn, 1), timeout=60)
        refused = iiot(env, "ingest-sessions", "drain", "--group", group, "--slot", "0")
        assert refused.returncode == 1
        assert f"slot 0 of group {group} is running" in refused.stderr
    finally:
        stop(running)
    assert session_present(broker, f"{group}-0")  # the refusal touched nothing
    for args, message in [
        (["--slot", "-1"], "-1"),
        (["--slot", "64"], "64"),
        (["--slot", "x"], "'x' is not a valid integer"),
        (["--slot", "0", "--idle", "0"], "0"),
        (["--group", group], "Missing option '--slot'"),
    ]:
        bad = iiot(env, "ingest-sessions", "drain", *args)
        assert bad.returncode == 2, bad.stderr
        assert message in bad.stderr
    listed = iiot(env, "ingest-sessions", "list", "--group", "'; DROP TABLE ingest_sessions; --")
    assert listed.returncode == 0
    assert "no ingest sessions recorded" in listed.stdout
    assert count(conn, "ingest_sessions") == 1


@pytest.mark.parametrize("processes", ["0", "65", "two"])
def test_ingest_refuses_bad_slot_counts(cli_env, processes):
    env = {**cli_env, "IIOT_MQTT_URL": "mqtt://127.0.0.1:1"}
    bad = iiot(env, "ingest", "--processes", processes)
    assert bad.returncode == 2
    bad = iiot(env, "ingest", "--slot", "3", "--slots", "2")
    assert bad.returncode == 2
    assert "--slots 2 is fewer than the group's slots 0..3" in bad.stderr
    bad = iiot({**env, "IIOT_MQTT_SHARED_SUBSCRIPTION": "off"}, "ingest", "--slots", "2")
    assert bad.returncode == 2
    assert "gives every slot every message" in bad.stderr


def test_only_kept_sessions_of_retired_slots_are_stale():
    from datetime import UTC, datetime, timedelta

    from ingest_daemon.sessions import SlotSession, stale_slots

    now = datetime.now(UTC)

    def session(slot, state, expires_in_h, group="g"):
        return SlotSession(
            f"{group}-{slot}",
            group,
            slot,
            "t",
            "h",
            1,
            state,
            now,
            now,
            now + timedelta(hours=expires_in_h),
            timedelta(0),
        )

    sessions = [
        session(0, "connected", 168),
        session(1, "stopped", 168),  # kept: stale
        session(2, "ended", 168),  # drained and ended
        session(3, "stopped", -1),  # the broker has forgotten it
        session(4, "stopped", 168, group="other"),
    ]
    assert [s.slot for s in stale_slots(sessions, "g", 1)] == [1]
    assert stale_slots(sessions, "g", 2) == []
