"""Ingest on two hosts: slot 0 and slot 1 of one group, each in a network namespace of its own
(a veth pair to this one), against one broker and one database; host A's link is cut while
readings flow and brought back: every reading lands exactly once, and both hosts landed some.

The broker (a Mosquitto of the test's own) listens on 127.0.0.1 for the publisher and on the
root side of each veth pair for the slots; PostgreSQL listens on 127.0.0.1 only, so the hosts
reach it through a TCP forwarder of the test on the same addresses. The broker's
``max_keepalive 10`` (the least Mosquitto takes) makes the slots' keepalive 10 s through MQTT 5's
server keep alive, so the broker notices the cut-off slot after 15 s instead of 90 s; the test
waits for it to say so, publishes more into the slot's session while the link is down, then
brings the link back.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest

from iiot_orchestration.services import free_port, start_mosquitto
from iiot_orchestration.settings import to_url
from tests.ingest_helpers import MAC, count, provision, wait_for
from tests.test_ingest_process import stream

# readings published before the cut (the cut comes while they flow), while the broker holds the
# cut-off slot's session, and after the link is back
BEFORE_CUT, DURING_CUT, AFTER_CUT = 4_000, 3_000, 2_000
TOTAL = BEFORE_CUT + DURING_CUT + AFTER_CUT
PACE = 100  # messages between 0.05 s pauses: about 2,000 a second, so the cut lands mid-stream
METRICS_PORT = 9108  # each host has its own ports: the documented default, plus the slot


@dataclass
class Host:
    """A network namespace with a veth pair to the root namespace: ``address`` inside it,
    ``gateway`` on the root side (where the broker and the database forwarder listen)."""

    name: str
    namespace: str
    outer: str  # the root side's interface
    inner: str  # the namespace's interface
    gateway: str
    address: str
    process: subprocess.Popen | None = None
    output: str = ""

    def run(self, *command: str) -> subprocess.CompletedProcess:
        return _ip("netns", "exec", self.namespace, *command)

    def link(self, state: str) -> None:
        self.run("ip", "link", "set", self.inner, state)


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=True)


def _free_subnets(count_: int) -> list[ipaddress.IPv4Network]:
    """/30 subnets of 10.213.0.0/16 unused on this machine, starting at one picked from the pid
    so that concurrent runs (xdist workers) start apart."""
    used = _ip("-4", "-o", "addr", "show").stdout
    blocks = list(ipaddress.ip_network("10.213.0.0/16").subnets(new_prefix=30))
    start = (os.getpid() * count_) % len(blocks)
    found = []
    for block in blocks[start:] + blocks[:start]:
        if not any(str(address) in used for address in block):
            found.append(block)
            if len(found) == count_:
                return found
    raise RuntimeError("no free /30 left in 10.213.0.0/16")


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    """Two "hosts", A and B, removed at the end (their processes first) even after a failure."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2's ip is not installed: the test makes network namespaces with it")
    if os.geteuid() != 0:
        pytest.skip("ip netns needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)")
    tag = f"{os.getpid() % 100000}{uuid.uuid4().hex[:2]}"
    made: list[Host] = []
    try:
        for name, subnet in zip("ab", _free_subnets(2), strict=True):
            gateway, address = (str(a) for a in subnet.hosts())
            host = Host(
                name,
                f"iiot-mh-{tag}-{name}",
                f"mho{tag}{name}",
                f"mhi{tag}{name}",
                gateway,
                address,
            )
            try:
                _ip("netns", "add", host.namespace)
            except subprocess.CalledProcessError as exc:
                if not made:
                    pytest.skip(f"ip netns add is not permitted here: {exc.stderr.strip()}")
                raise
            made.append(host)
            _ip("link", "add", host.outer, "type", "veth", "peer", "name", host.inner)
            _ip("link", "set", host.inner, "netns", host.namespace)
            _ip("addr", "add", f"{gateway}/30", "dev", host.outer)
            _ip("link", "set", host.outer, "up")
            host.run("ip", "addr", "add", f"{address}/30", "dev", host.inner)
            host.link("up")
            host.run("ip", "link", "set", "lo", "up")
        yield made
    finally:
        for host in made:
            if host.process is not None and host.process.poll() is None:
                host.process.kill()
                host.process.wait(30)
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("link", "del", host.outer)  # also removes the namespace's end
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", host.namespace)


class Forwarder:
    """TCP from ``addresses`` (one port for all) to ``target``, a thread pair per connection."""

    def __init__(self, addresses: list[str], target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port(addresses[0])
        self._closing = False
        self._sockets: list[socket.socket] = []
        self._listeners = []
        for address in addresses:
            listener = socket.create_server((address, self.port))
            self._listeners.append(listener)
            threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while not self._closing:
            try:
                inbound, _ = listener.accept()
                outbound = socket.create_connection(self.target, timeout=10)
            except OSError:
                continue  # closed (the loop ends), or the target refused: the client sees EOF
            outbound.settimeout(None)
            self._sockets += [inbound, outbound]
            for source, sink in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closing = True
        for sock in self._listeners + self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class Publisher:
    """A QoS 1 publisher at 127.0.0.1 that publishes lists of payloads in turn, paced, and
    counts the broker's refusals (PUBACK reason codes of 0x80 and up, or 0x10 no subscriber)."""

    def __init__(self, host: str, port: int) -> None:
        self.refused: list[int] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.max_queued_messages_set(0)
        self.client.on_publish = self._on_publish
        self.client.connect(host, port)
        self.client.loop_start()
        self.infos: list[mqtt.MQTTMessageInfo] = []
        self._thread: threading.Thread | None = None

    def _on_publish(self, _c, _u, _mid, reason, _p) -> None:
        if reason.value == 0x10 or reason.is_failure:
            self.refused.append(reason.value)

    def publish(self, payloads: list[bytes]) -> None:
        """Start publishing ``payloads`` after what was started before."""
        previous = self._thread

        def run():
            if previous is not None:
                previous.join()
            for i, payload in enumerate(payloads):
                topic = f"iiot/devices/{MAC}/telemetry"
                self.infos.append(self.client.publish(topic, payload, qos=1))
                if i % PACE == PACE - 1:
                    time.sleep(0.05)

        self._thread = threading.Thread(target=run, name="publisher")
        self._thread.start()

    def published(self) -> int:
        return len(self.infos)

    def wait(self) -> None:
        """Every payload given so far published and acknowledged by the broker."""
        self._thread.join(120)
        assert not self._thread.is_alive()
        for info in self.infos:
            info.wait_for_publish(60)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _start_slot(
    host: Host, slot: int, group: str, database_url: str, broker_port: int, tmp_path: Path
) -> None:
    """`iiot ingest --slot <slot> --slots 2` inside the host, with the env of the other ingest
    tests (IIOT_* of this process left out) and its metrics on the host's own address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(
        IIOT_DATABASE_URL=database_url,
        IIOT_MQTT_URL=f"mqtt://{host.gateway}:{broker_port}",
        IIOT_DATA_DIR=str(tmp_path / f"host-{host.name}"),
    )
    command = [sys.executable, "-m", "iiot_orchestration.cli", "ingest", "--batch-age-ms", "50"]
    options = ["--group", group, "--slot", str(slot), "--slots", "2"]
    options += ["--metrics-host", host.address, "--metrics-port", str(METRICS_PORT)]
    host.process = subprocess.Popen(
        ["ip", "netns", "exec", host.namespace, *command, *options],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _scrape(host: Host, slot: int) -> dict[str, float]:
    """The slot's /metrics at the host's address, as Prometheus would scrape it (samples
    without labels)."""
    url = f"http://{host.address}:{METRICS_PORT + slot}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        name: float(value)
        for name, value in re.findall(r"^(iiot_\w+) (\S+)$", text, flags=re.MULTILINE)
    }


def _stopped(host: Host) -> tuple[int, int]:
    """(readings landed, duplicates) of the slot's closing line, after a SIGTERM."""
    host.process.send_signal(signal.SIGTERM)
    host.output = host.process.communicate(timeout=90)[0]
    assert host.process.returncode == 0, host.output
    found = re.search(
        r"Stopped: [\d,]+ messages, ([\d,]+) readings landed, ([\d,]+) dup", host.output
    )
    assert found, host.output
    return int(found[1].replace(",", "")), int(found[2].replace(",", ""))


def test_a_host_cut_off_and_back_loses_and_doubles_nothing(
    hosts, conn, database_url, tmp_path, capsys
):
    a, b = hosts
    provision(conn, "enterprise")
    conn.execute("UPDATE plans SET messages_per_minute_per_device = 1000000")
    params = psycopg.conninfo.conninfo_to_dict(database_url)
    if str(params.get("host", "")).startswith("/"):
        pytest.skip("the test's PostgreSQL listens on a Unix socket only; the hosts need TCP")
    database = (params.get("host") or "127.0.0.1", int(params.get("port") or 5432))
    forwarder = Forwarder([a.gateway, b.gateway], database)
    port = free_port()
    listeners = "".join(f"listener {port} {host.gateway}\n" for host in hosts)
    broker = start_mosquitto(
        tmp_path / "mosquitto", port=port, extra_config=f"max_keepalive 10\n{listeners}"
    )
    log = tmp_path / "mosquitto" / "mosquitto.log"
    group = f"g{uuid.uuid4().hex[:6]}"
    publisher = None
    try:
        for slot, host in enumerate(hosts):
            host_url = to_url({**params, "host": host.gateway, "port": forwarder.port})
            _start_slot(host, slot, group, host_url, port, tmp_path)
        assert wait_for(
            lambda: count(conn, "ingest_sessions", "state = 'connected'") == 2, timeout=60
        ), [host.process.poll() for host in hosts]
        payloads = stream(TOTAL)
        publisher = Publisher("127.0.0.1", port)
        publisher.publish(payloads[:BEFORE_CUT])

        # mid-stream, host A loses its network: what the broker sent it is in flight, unacked
        assert wait_for(lambda: count(conn, "telemetry") >= BEFORE_CUT // 4, timeout=60)
        a.link("down")
        cut_at, published_at_cut = time.monotonic(), publisher.published()
        assert wait_for(
            lambda: f"Client {group}-0 has exceeded timeout" in log.read_text(), timeout=60
        ), "the broker never noticed that host A was gone"
        # the broker keeps A's session and queues A's share of the shared subscription there
        publisher.publish(payloads[BEFORE_CUT : BEFORE_CUT + DURING_CUT])
        publisher.wait()
        landed_while_cut = count(conn, "telemetry")
        a.link("up")
        cut_s = time.monotonic() - cut_at
        publisher.publish(payloads[BEFORE_CUT + DURING_CUT :])
        publisher.wait()

        assert wait_for(lambda: count(conn, "telemetry") >= TOTAL, timeout=180), count(
            conn, "telemetry"
        )
        # both hosts serve their metrics at their own address (what the file_sd targets name)
        assert wait_for(lambda: _scrape(a, 0)["iiot_ingest_broker_connected"] == 1, timeout=60)
        scraped = {host.name: _scrape(host, slot) for slot, host in enumerate(hosts)}
        assert scraped["a"]["iiot_ingest_broker_connection_lost_total"] >= 1
        assert scraped["b"]["iiot_ingest_broker_connection_lost_total"] == 0
        time.sleep(0.5)  # a message delivered twice after the count would show up as extra
        (landed_a, duplicates_a), (landed_b, duplicates_b) = _stopped(a), _stopped(b)
    finally:
        if publisher is not None:
            publisher.close()
        for host in hosts:
            if host.process is not None and host.process.poll() is None:
                host.process.send_signal(signal.SIGTERM)
                host.output = host.process.communicate(timeout=90)[0]
        broker.stop()
        forwarder.close()

    rows = conn.execute(
        "SELECT count(*), count(DISTINCT (device_id, metric, ts)), count(DISTINCT value)"
        " FROM telemetry"
    ).fetchone()
    assert rows == (TOTAL, TOTAL, TOTAL)
    assert count(conn, "dead_letters") == 0
    assert publisher.refused == []
    assert landed_a > 0, (landed_a, landed_b)
    assert landed_b > 0, (landed_a, landed_b)
    assert landed_a + landed_b == TOTAL
    assert "broker connection back after" in a.output, a.output
    assert "broker connection back after" not in b.output, b.output
    with capsys.disabled():
        print(
            f"\nmultihost: cut {cut_s:.1f} s at {published_at_cut:,} published;"
            f" {landed_while_cut:,} landed when the link came back;"
            f" host A landed {landed_a:,} ({duplicates_a:,} duplicates skipped),"
            f" host B {landed_b:,} ({duplicates_b:,})"
        )
