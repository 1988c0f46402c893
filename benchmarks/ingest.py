"""Ingest throughput, every row against the same Mosquitto and database server in one run.

Each consumer's messages are queued in the broker while it is offline (persistent session), so
the rows measure how fast each consumer drains them, not how fast one publisher can publish.

- bare receive: a paho subscriber that only counts (the ceiling for a Python MQTT consumer);
- `iiot ingest`, one slot and `--processes 2` (two slots), each slot a receiving process and its
  writer process (the default), and one slot with `--no-writer-process` (receiving, judging and
  committing in one process): from the first row committed to the last, scaled to the stream;
- naive: insert and commit each message on its own (the seeds' first design).
Each row also checks that nothing was lost. The bare row is the fastest of three runs (before
and after the daemon's), so a noisy moment on the shared machine does not flatter the ratios.
Then the daemon runs live at half its measured rate and publish-to-commit latency is sampled.

Last, the key of issue 19 without the broker: the same batches (IIOT_BENCH_LANDING_READINGS,
300,000 by default: 100 energy meters, three metrics a message, IIOT_BENCH_LANDING_BATCH
readings a batch) landed the writer's way (binary COPY into the staging table, then the landing
statement, one transaction a batch, as platform_rw) into a telemetry table keyed (device_id,
metric, ts) with the landing statement that did not join devices (baseline), and into the
telemetry of migration 0022, keyed (device_id, metric, ts, tenant_id), with today's statement.
"""

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks.common import scratch_database
from iiot_orchestration import registry
from iiot_orchestration.db import query
from iiot_orchestration.services import start_mosquitto
from iiot_orchestration.storage import storage_for
from ingest_daemon.writer import _READING_TYPES

DEVICES = 100
MESSAGES = int(os.environ.get("IIOT_BENCH_MESSAGES", "40000"))
NAIVE_MESSAGES = MESSAGES // 8
POLL_S = 0.1
LATENCY_SHARES = (0.25, 0.4, 0.5)
LATENCY_SECONDS = float(os.environ.get("IIOT_BENCH_LATENCY_SECONDS", "10"))
TOPIC = "iiot/devices/+/telemetry"
LANDING_READINGS = int(os.environ.get("IIOT_BENCH_LANDING_READINGS", "300000"))
LANDING_BATCH = int(os.environ.get("IIOT_BENCH_LANDING_BATCH", "1500"))
LANDING_ROUNDS = int(os.environ.get("IIOT_BENCH_LANDING_ROUNDS", "3"))
LANDING_METRICS = ("energy_kwh", "power_w", "voltage_v")
DEVICE_JOIN = "JOIN devices d ON d.device_id = s.device_id AND d.tenant_id = s.tenant_id"
COMPRESSION_SETTINGS = (
    "ALTER TABLE telemetry SET (timescaledb.compress,"
    " timescaledb.compress_segmentby = 'tenant_id, device_id, metric',"
    " timescaledb.compress_orderby = 'ts')"
)


def macs() -> list[str]:
    return [f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}" for i in range(DEVICES)]


def payloads(total: int) -> list[tuple[str, bytes]]:
    start = datetime.now(UTC) - timedelta(hours=1)
    devices = macs()
    return [
        (
            f"iiot/devices/{devices[i % DEVICES]}/telemetry",
            orjson.dumps(
                {
                    "ts": (start + timedelta(milliseconds=i)).isoformat(),
                    "metrics": {"energy_kwh": float(i)},
                }
            ),
        )
        for i in range(total)
    ]


def prepare(url: str) -> None:
    with psycopg.connect(url) as conn:
        registry.create_tenant(conn, slug="bench", name="Bench", plan="enterprise", timezone="UTC")
        conn.execute("UPDATE plans SET messages_per_minute_per_device = 100000000")
        registry.provision_devices(
            conn, "bench", [registry.DeviceRequest(mac, "energy") for mac in macs()]
        )


def publish(broker, messages) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(1000)
    client.connect(broker.host, broker.port)
    client.loop_start()
    infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(120)
    client.loop_stop()
    client.disconnect()


def subscriber(broker, client_id: str, on_message, topic: str) -> mqtt.Client:
    """A persistent-session subscriber; connecting it once creates the session."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id=client_id
    )
    client.on_message = on_message
    subscribed = threading.Event()
    client.on_subscribe = lambda *_: subscribed.set()
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    client.connect(broker.host, broker.port, clean_start=False, properties=properties)
    client.subscribe(topic, qos=1)
    client.loop_start()
    subscribed.wait(10)
    return client


def close(client: mqtt.Client) -> None:
    client.loop_stop()
    client.disconnect()


def drain_with_paho(broker, messages, handle) -> tuple[float, int]:
    """Queue every message in the broker for an offline session, then time the drain."""
    client_id = f"bench-{uuid.uuid4().hex[:6]}"
    received = 0
    done = threading.Event()

    def on_message(_c, _u, message):
        nonlocal received
        handle(message)
        received += 1
        if received == len(messages):
            done.set()

    close(subscriber(broker, client_id, lambda *_: None, TOPIC))
    publish(broker, messages)
    started = time.perf_counter()
    client = subscriber(broker, client_id, on_message, TOPIC)
    done.wait(600)
    elapsed = time.perf_counter() - started
    close(client)
    return elapsed, received


def bare_receive(broker, messages) -> tuple[float, int]:
    return drain_with_paho(broker, messages, lambda _message: None)


def rows(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]


def daemon_process(url: str, broker, processes: int, group: str, *options: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IIOT_")}
    env.update(
        IIOT_DATABASE_URL=url,
        IIOT_MQTT_URL=broker.url,
        IIOT_DATA_DIR=tempfile.mkdtemp(),
        IIOT_LOG_LEVEL="WARNING",
    )
    command = [
        sys.executable,
        "-m",
        "iiot_orchestration.cli",
        "ingest",
        "--group",
        group,
        "--processes",
        str(processes),
        "--metrics-port",
        "0",
        *options,
    ]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(60)


def daemon(broker, messages, processes: int, *options: str) -> tuple[float, int]:
    """Queue every message for the daemon's offline sessions, start it, and time from its first
    committed row to its last (process start-up is not ingest)."""
    with scratch_database() as url:
        prepare(url)
        group = f"bench{uuid.uuid4().hex[:6]}"
        first = daemon_process(url, broker, processes, group, *options)
        time.sleep(3 + processes)  # the sessions and the shared subscription now exist
        stop(first)
        publish(broker, messages)
        process = daemon_process(url, broker, processes, group, *options)
        deadline = time.perf_counter() + 600
        while (landed := rows(url)) == 0 and time.perf_counter() < deadline:
            time.sleep(0.01)
        started, at_start = time.perf_counter(), landed
        while (landed := rows(url)) < len(messages) and time.perf_counter() < deadline:
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        stop(process)
        # rate over the rows committed after the first batch, scaled to the whole stream
        return elapsed * len(messages) / max(len(messages) - at_start, 1), landed


PUBLISHERS = 10  # devices publishing live
ONE_MICROSECOND = timedelta(microseconds=1)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (128 if value else 0))
        if not value:
            return bytes(out)


def publish_packet(topic: bytes, payload: bytes, mid: int) -> bytes:
    """An MQTT 5 PUBLISH at QoS 1 without properties."""
    body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", mid) + b"\x00"
    return b"\x32" + _varint(len(body) + len(payload)) + body + payload


class RawPublisher:
    """The live load: MQTT 5 QoS 1 PUBLISH packets written straight to one socket, a
    millisecond's worth per send, and the broker's PUBACKs counted by a reader thread.

    The latency rows measure the broker, the daemon and the database, and the publisher shares
    the two cores with them. paho, paced, tops out near 6,400 acknowledged messages a second by
    itself; ten ``mosquitto_pub -l`` processes (one per device, fed lines) spent about 38 us of
    CPU per message, as much as the daemon's receiving process, and at 14,000 msg/s the machine
    ran out of cores before the daemon did. This costs a few microseconds per message."""

    def __init__(self, broker) -> None:
        self.sock = socket.create_connection((broker.host, broker.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client_id = f"bench-pub-{uuid.uuid4().hex[:6]}".encode()
        # CONNECT: "MQTT", level 5, clean start, keepalive 600 s, no properties
        body = b"\x00\x04MQTT\x05\x02\x02\x58\x00" + struct.pack("!H", len(client_id))
        self.sock.sendall(b"\x10" + _varint(len(body + client_id)) + body + client_id)
        connack = self.sock.recv(64)
        if len(connack) < 4 or connack[0] != 0x20 or connack[3] != 0:
            raise RuntimeError(f"the broker refused the benchmark's publisher: {connack!r}")
        self.acknowledged = 0
        self.mid = 0
        self.reader = threading.Thread(target=self._read_acks, daemon=True)
        self.reader.start()

    def _read_acks(self) -> None:
        pending = b""
        while chunk := self.sock.recv(65536):
            pending += chunk
            count = position = 0
            # PUBACKs are short: one length byte; walk the chunk, then keep what is left
            while position + 2 <= len(pending):
                end = position + 2 + pending[position + 1]
                if end > len(pending):
                    break
                count += pending[position] == 0x40
                position = end
            pending = pending[position:]
            self.acknowledged += count

    def packet(self, topic: bytes, payload: bytes) -> bytes:
        self.mid = self.mid % 65535 + 1
        return publish_packet(topic, payload, self.mid)

    def send(self, packets: list[bytes]) -> None:
        self.sock.sendall(b"".join(packets))

    def close(self, sent: int, timeout: float = 60) -> None:
        """Wait until the broker acknowledged everything sent, then disconnect."""
        deadline = time.monotonic() + timeout
        while self.acknowledged < sent and time.monotonic() < deadline:
            time.sleep(0.01)
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        self.sock.close()


def latency(broker, rate: float, seconds: float) -> tuple[int, int, list[float]]:
    """Publish live at ``rate`` messages/s, each stamped with its publish time, to a running
    daemon; poll the table every POLL_S (each poll scans the day: kept rare, so that it does not
    compete with the daemon for the two cores) and take, for each new row, the poll time minus
    its stamp: publish-to-commit latency, overstated by at most one poll interval."""
    total = int(rate * seconds)
    topics = [f"iiot/devices/{mac}/telemetry".encode() for mac in macs()[:PUBLISHERS]]
    with scratch_database() as url:
        prepare(url)
        process = daemon_process(url, broker, 1, f"bench{uuid.uuid4().hex[:6]}")
        publisher = RawPublisher(broker)
        warm_up = datetime.now(UTC) - timedelta(hours=1)
        warm_ups = 0
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                while rows(url) == 0:  # the daemon is up and committing
                    payload = {"ts": warm_up.isoformat(), "metrics": {"energy_kwh": 0.0}}
                    publisher.send([publisher.packet(topics[0], orjson.dumps(payload))])
                    warm_ups += 1
                    time.sleep(0.5)
                started = datetime.now(UTC)

                def publish_paced() -> None:
                    begin = time.perf_counter()
                    sent = 0
                    stamp = datetime.now(UTC)
                    while sent < total:
                        due = min(total, int((time.perf_counter() - begin) * rate) + 1)
                        packets = []
                        for i in range(sent, due):
                            # strictly increasing stamps: a device's readings never share one
                            stamp = max(datetime.now(UTC), stamp + ONE_MICROSECOND)
                            body = {"ts": stamp.isoformat(), "metrics": {"energy_kwh": i}}
                            packets.append(
                                publisher.packet(topics[i % PUBLISHERS], orjson.dumps(body))
                            )
                        publisher.send(packets)
                        sent = due
                        time.sleep(0.001)

                thread = threading.Thread(target=publish_paced)
                thread.start()
                # each device's rows land in the order it published them, but the ten devices'
                # may interleave: poll from the device that is furthest behind, keyed by row so
                # that a row is never sampled twice
                first_seen: dict[tuple[int, datetime], float] = {}
                newest: dict[int, datetime] = {}
                deadline = time.perf_counter() + seconds + 60
                while len(first_seen) < total and time.perf_counter() < deadline:
                    time.sleep(POLL_S)
                    since = min(newest.values()) if len(newest) == PUBLISHERS else started
                    fresh = conn.execute(
                        "SELECT device_id, ts FROM telemetry WHERE ts > %s", (since,)
                    ).fetchall()
                    seen = datetime.now(UTC)
                    for device_id, ts in fresh:
                        first_seen.setdefault((device_id, ts), (seen - ts).total_seconds())
                        newest[device_id] = max(newest.get(device_id, ts), ts)
                thread.join()
        finally:
            publisher.close(total + warm_ups)
            stop(process)
        return total, len(first_seen), sorted(first_seen.values())


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def naive(broker, messages) -> tuple[float, int]:
    with scratch_database() as url:
        prepare(url)
        with psycopg.connect(url) as conn:
            devices = dict(conn.execute("SELECT mac::text, device_id FROM devices").fetchall())
        conn = psycopg.connect(url)

        def insert(message):
            mac = message.topic.split("/")[2]
            body = orjson.loads(message.payload)
            for metric, value in body["metrics"].items():
                conn.execute(
                    "INSERT INTO telemetry (tenant_id, device_id, metric, ts, value)"
                    " VALUES (1, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (devices[mac], metric, body["ts"], value),
                )
            conn.commit()

        elapsed, _ = drain_with_paho(broker, messages, insert)
        conn.close()
        return elapsed, rows(url)


def landing_batches(tenant_id: int, devices: list[int]) -> tuple[datetime, list[list[tuple]]]:
    """Readings of the current hour (nothing marks a rollup window dirty), in time order, one
    message per device and tick with its three metrics; and the time the batches land at."""
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    ticks = max(1, LANDING_READINGS // (len(LANDING_METRICS) * len(devices)))
    step = timedelta(seconds=3_000 / ticks)
    rows = []
    for tick in range(ticks):
        instant = start + tick * step
        received = instant + timedelta(milliseconds=250)
        for n, device in enumerate(devices):
            number = tick * len(devices) + n
            for metric in LANDING_METRICS:
                rows.append((tenant_id, device, metric, instant, float(number), received, number))
    batches = [
        [(*row, False) for row in rows[i : i + LANDING_BATCH]]
        for i in range(0, len(rows), LANDING_BATCH)
    ]
    return start + timedelta(minutes=59), batches


def use_old_key(url: str) -> None:
    """The telemetry key before migration 0022: (device_id, metric, ts), no tenant."""
    with psycopg.connect(url, autocommit=True) as conn:
        timescale = storage_for(conn).mode == "timescale"
        if timescale:  # the key cannot change while columnstore is enabled
            conn.execute("ALTER TABLE telemetry SET (timescaledb.compress = false)")
        conn.execute("ALTER TABLE telemetry DROP CONSTRAINT telemetry_pkey")
        conn.execute(
            "ALTER TABLE telemetry ADD CONSTRAINT telemetry_pkey"
            " PRIMARY KEY (device_id, metric, ts)"
        )
        if timescale:
            conn.execute(COMPRESSION_SETTINGS)


def land(
    url: str, statement: str, now: datetime, batches: list[list[tuple]]
) -> tuple[float, float]:
    """Land every batch into an emptied telemetry; seconds for the batches (COPY, landing
    statement, commit) and for the landing statements alone."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE telemetry, ingest_usage, ingest_usage_tenant_hours, ingest_usage_device_days,"
            " dirty_windows, dirty_window_devices"
        )
        conn.execute("VACUUM ANALYZE devices")
    with psycopg.connect(url) as conn:
        conn.execute("SET ROLE platform_rw")
        conn.execute(query("create_telemetry_staging"))
        conn.commit()
        landing = 0.0
        started = time.perf_counter()
        for batch in batches:
            with conn.transaction():
                with conn.cursor().copy(query("copy_telemetry_staging")) as copy:
                    copy.set_types(_READING_TYPES)
                    for row in batch:
                        copy.write_row(row)
                began = time.perf_counter()
                landed = conn.execute(statement, {"now": now}).fetchone()[0]
                landing += time.perf_counter() - began
            assert landed == len(batch), (landed, len(batch))
        return time.perf_counter() - started, landing


def key_change() -> tuple[int, list[tuple[str, float, float]]]:
    """Best of LANDING_ROUNDS for each key and statement, the two alternating; the readings."""
    new = query("land_telemetry_staging")
    if DEVICE_JOIN not in new:
        raise RuntimeError("land_telemetry_staging no longer joins devices: update the benchmark")
    old = new.replace(DEVICE_JOIN, "")
    with scratch_database() as old_url, scratch_database() as new_url:
        found = []
        for url in (old_url, new_url):
            prepare(url)
            with psycopg.connect(url, autocommit=True) as conn:
                found.append(
                    conn.execute(
                        "SELECT tenant_id, array_agg(device_id ORDER BY device_id) FROM devices"
                        " GROUP BY tenant_id"
                    ).fetchall()
                )
        [(tenant_id, devices)] = found[0]
        assert found[1] == found[0], "the two databases must hold the same devices"
        now, batches = landing_batches(tenant_id, devices)
        for url in (old_url, new_url):
            with psycopg.connect(url, autocommit=True) as conn:
                storage_for(conn).ensure_partitions(conn, now.date(), now.date())
        use_old_key(old_url)
        runs: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
        for _ in range(LANDING_ROUNDS):
            runs["old"].append(land(old_url, old, now, batches))
            runs["new"].append(land(new_url, new, now, batches))
    return sum(len(b) for b in batches), [
        ("key (device, metric, ts), no devices join (baseline)", *min(runs["old"])),
        ("key (device, metric, ts, tenant), devices join", *min(runs["new"])),
    ]


def print_key_change(readings: int, rows: list[tuple[str, float, float]]) -> None:
    print(
        f"landing {readings:,} readings in batches of {LANDING_BATCH:,}, best of "
        f"{LANDING_ROUNDS}, the two alternating:"
    )
    print(
        f"{'case':<56}{'batches s':>10}{'readings/s':>12}{'ratio':>7}{'landing s':>10}{'ratio':>7}"
    )
    base_total, base_landing = rows[0][1], rows[0][2]
    for case, total, landing in rows:
        print(
            f"{case:<56}{total:>10.2f}{readings / total:>12,.0f}{total / base_total:>7.3f}"
            f"{landing:>10.2f}{landing / base_landing:>7.3f}"
        )


def main() -> None:
    messages = payloads(MESSAGES)
    with tempfile.TemporaryDirectory() as tmp:
        broker = start_mosquitto(Path(tmp) / "mosquitto")
        try:
            bare = [bare_receive(broker, messages) for _ in range(2)]
            single = daemon(broker, messages, 1)
            bare.append(bare_receive(broker, messages))
            results = [
                # the fastest of three bare runs: the ratios are against the best ceiling seen
                ("bare paho receive (baseline)", *min(bare), len(messages)),
                ("iiot ingest, 1 slot", *single, len(messages)),
                ("iiot ingest, 2 slots", *daemon(broker, messages, 2), len(messages)),
                (
                    "ingest --no-writer-process",
                    *daemon(broker, messages, 1, "--no-writer-process"),
                    len(messages),
                ),
                (
                    "naive insert per message",
                    *naive(broker, messages[:NAIVE_MESSAGES]),
                    NAIVE_MESSAGES,
                ),
            ]
            drain_rate = len(messages) / single[0]
            live = [
                (share, drain_rate * share, *latency(broker, drain_rate * share, LATENCY_SECONDS))
                for share in LATENCY_SHARES
            ]
        finally:
            broker.stop()
    baseline = results[0][3] / results[0][1]
    print(f"{'case':<32}{'messages':>10}{'seconds':>9}{'msg/s':>9}{'x bare':>8}{'lost':>6}")
    for case, seconds, landed, sent in results:
        rate = sent / seconds
        print(
            f"{case:<32}{sent:>10,}{seconds:>9.2f}{rate:>9,.0f}{rate / baseline:>8.2f}"
            f"{sent - landed:>6}"
        )
    naive_rate = results[4][3] / results[4][1]
    for index, case in ((1, "1 slot"), (2, "2 slots")):
        rate = results[index][3] / results[index][1]
        print(f"iiot ingest ({case}) / naive: {rate / naive_rate:.1f} x")
    print(
        f"publish-to-commit latency, live for {LATENCY_SECONDS:g} s at a share of the 1-slot "
        "drain rate, publisher on the same machine:"
    )
    for share, rate, published, committed, latencies in live:
        print(
            f"  {share:.0%} = {rate:,.0f} msg/s: p50 {percentile(latencies, 0.5) * 1000:.0f} ms,"
            f" p99 {percentile(latencies, 0.99) * 1000:.0f} ms,"
            f" max {latencies[-1] * 1000 if latencies else float('nan'):.0f} ms,"
            f" lost {published - committed}"
        )
    print_key_change(*key_change())
