"""The ingest slots' broker sessions, as the slots record them (table ``ingest_sessions``).

An MQTT broker keeps a stopped slot's persistent session, its subscription and its queue, until
the session expires (7 days): with a shared subscription the broker goes on routing the slot's
share of the messages to it, and they wait there. Mosquitto cannot list its sessions, so each
slot records its own (connected, disconnected, stopped, ended) and refreshes it every
``HEARTBEAT_S``; slot 0 warns when slots beyond the group's size still hold sessions, and
``iiot ingest-sessions drain`` lands what a retired slot holds and ends its session
(docs/ingest.md, "Sessions").
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from iiot_orchestration.db import DatabaseUnavailable, open_connection, query
from iiot_orchestration.mqtt import MqttOptions, connect_client

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0


@dataclass(frozen=True)
class SessionInfo:
    client_id: str
    group: str
    slot: int
    subscription: str
    session_expiry_s: int
    slots: int = 1
    check_stale: bool = False  # warn about the group's slots beyond ``slots``

    def row(self, state: str) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "group": self.group,
            "slot": self.slot,
            "subscription": self.subscription,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "session_expiry_s": self.session_expiry_s,
            "state": state,
        }


@dataclass(frozen=True)
class SlotSession:
    client_id: str
    group: str
    slot: int
    subscription: str
    host: str
    pid: int
    state: str
    started_at: datetime
    last_seen_at: datetime
    expires_at: datetime
    silent_for: timedelta

    @property
    def live(self) -> bool:
        """A running slot: connected (or reconnecting) and seen within two heartbeats."""
        return self.state in ("connected", "disconnected") and (
            self.silent_for.total_seconds() < 2 * HEARTBEAT_S
        )

    @property
    def status(self) -> str:
        if self.live:
            return self.state
        if self.state == "ended":
            return "ended"
        if self.state in ("connected", "disconnected"):
            return "silent (the process died?): session kept"
        return "stopped: session kept"

    def as_dict(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "group": self.group,
            "slot": self.slot,
            "subscription": self.subscription,
            "host": self.host,
            "pid": self.pid,
            "state": self.state,
            "status": self.status,
            "started_at": self.started_at.isoformat(),
            "last_seen_at": self.last_seen_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
        }


def list_sessions(conn: psycopg.Connection, group: str | None = None) -> list[SlotSession]:
    rows = conn.execute(query("ingest_sessions"), {"group": group}).fetchall()
    return [SlotSession(*row) for row in rows]


def record(conn: psycopg.Connection, info: SessionInfo, state: str) -> None:
    conn.execute(query("record_ingest_session"), info.row(state))
    conn.commit()


def stale_slots(sessions: list[SlotSession], group: str, slots: int) -> list[SlotSession]:
    """The group's slots numbered ``slots`` or more whose session the broker still keeps (not
    ended, not expired)."""
    now = datetime.now(UTC)
    return [
        s
        for s in sessions
        if s.group == group and s.slot >= slots and s.state != "ended" and s.expires_at > now
    ]


def stale_warning(stale: list[SlotSession]) -> str:
    slots = ", ".join(str(s.slot) for s in stale)
    first = stale[0]
    return (
        f"group {first.group} runs fewer slots than before: slot(s) {slots} still hold a broker "
        f"session (kept until {min(s.expires_at for s in stale):%Y-%m-%d %H:%M %Z}); a shared "
        f"subscription goes on routing their share of the messages there, where it waits. "
        f"Drain and end each: iiot ingest-sessions drain --group {first.group} --slot N"
    )


class SessionRecorder:
    """Writes the slot's state to ``ingest_sessions`` from a thread of its own, so that paho's
    thread never waits for the database; retries while the database is away."""

    def __init__(self, database_url: str, info: SessionInfo) -> None:
        self.database_url = database_url
        self.info = info
        self._state = "disconnected"  # until the daemon says it is subscribed
        self._pending = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection | None = None
        self._checked = not info.check_stale

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ingest-session", daemon=True)
        self._thread.start()

    def note(self, state: str) -> None:
        self._state = state
        self._pending.set()

    def close(self, state: str) -> None:
        """The last state, written once more if the database answers within a few seconds."""
        self._stop.set()
        self._pending.set()
        if self._thread is not None:
            self._thread.join(10)
        self._state = state
        self._write(connect_timeout=3)
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._pending.wait(HEARTBEAT_S)
            if self._stop.is_set():
                return
            self._pending.clear()
            if not self._write():
                self._stop.wait(2.0)
                self._pending.set()

    def _write(self, connect_timeout: int = 10) -> bool:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = open_connection(
                    self.database_url,
                    role="platform_rw",
                    application_name=f"iiot-ingest-{self.info.slot}-session",
                    connect_timeout=connect_timeout,
                )
            record(self._conn, self.info, self._state)
            if not self._checked:
                self._checked = True
                stale = stale_slots(
                    list_sessions(self._conn, self.info.group), self.info.group, self.info.slots
                )
                self._conn.commit()
                if stale:
                    log.warning(stale_warning(stale), extra={"group": self.info.group})
            return True
        except (psycopg.Error, DatabaseUnavailable) as exc:
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error):
                    self._conn.close()
            self._conn = None
            log.debug("cannot record the ingest session yet", extra={"error": str(exc)[:200]})
            return False


def end_broker_session(options: MqttOptions, client_id: str) -> None:
    """Connect once as ``client_id`` with a clean start and no session expiry, then disconnect:
    the broker discards the session, its subscriptions and anything still queued for it."""
    client, _ = connect_client(options, client_id, keepalive=10)
    client.disconnect()
    client.loop_stop()
