"""Fleet simulator: the registered, active devices publishing plausible meter readings over MQTT.

Each device of the fleet (read from the registry with :func:`load_fleet`) gets a
:class:`SimulatedMeter` that evolves like a real site: energy meters follow a household or small
commercial load with morning, midday and evening peaks and a slow random walk around it; water
meters see flow mostly at breakfast and dinner time and almost none at night; gas meters burn a
little at meal times. Cumulative registers (``energy_kwh``, ``water_m3``, ``gas_m3``) integrate
the instantaneous quantity and so never go down; gauges (voltage, current, temperature, battery)
stay in their physical ranges. A meter is deterministic for a given seed, MAC and sequence of
timestamps, so a run can be reproduced.

:func:`run_simulation` publishes the readings to ``{prefix}/devices/{mac}/telemetry`` in the
payload contract the ingest daemon reads (one reading, or a batch with ``batch_size`` readings per
message), paced by the monotonic clock so the fleet's aggregate rate holds, and waits for the
broker to acknowledge every QoS 1 message before it disconnects. With ``history`` it first
publishes that much of the past (batches of readings ``history_step`` apart, paced under the
plan's messages per minute) from the same meters, so the live readings continue the registers.
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

import orjson
import paho.mqtt.client as mqtt

from firmware.delivery import publish_outcome
from iiot_orchestration.db import connect
from iiot_orchestration.errors import IiotError
from iiot_orchestration.mqtt import MqttError, MqttOptions, connect_client, protocol_name

log = logging.getLogger(__name__)

DEFAULT_TIMEZONE = ZoneInfo("America/Sao_Paulo")
CUMULATIVE_METRICS = frozenset({"energy_kwh", "water_m3", "gas_m3"})
KNOWN_METRICS = CUMULATIVE_METRICS | {
    "power_w",
    "voltage_v",
    "current_a",
    "flow_lpm",
    "temperature_c",
    "battery_pct",
}
_ENERGY_METRICS = frozenset({"energy_kwh", "power_w", "voltage_v", "current_a"})
_WATER_METRICS = frozenset({"water_m3", "flow_lpm"})
_MAX_UNACKNOWLEDGED = 10_000
RESEND_AFTER_S = 0.5  # a message the broker did not deliver is sent again after this
DEFAULT_HISTORY_STEP_S = 300.0  # five minutes: every hour of a backfilled week has readings
HISTORY_BATCH = 500  # readings per history message (the ingest takes up to 1,000)
HISTORY_PACE = 1.1  # history messages at 1/1.1 of the plan's messages per minute, under its limit
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_DURATION = re.compile(r"([+-]?)([0-9]+)([dhm])", re.ASCII)
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}
_FLEET_SQL = """
SELECT d.mac::text, d.meter_kind, array_agg(m.metric ORDER BY m.metric), t.slug,
       coalesce(t.retention_days, p.retention_days), p.messages_per_minute_per_device
FROM devices d
JOIN tenants t ON t.tenant_id = d.tenant_id
JOIN plans p ON p.plan_id = t.plan_id
JOIN device_metrics m ON m.device_id = d.device_id
WHERE d.status = 'active' AND (%(tenant)s::text IS NULL OR t.slug = %(tenant)s::text)
GROUP BY d.device_id, d.mac, d.meter_kind, t.slug, t.retention_days, p.retention_days,
         p.messages_per_minute_per_device
ORDER BY d.mac
LIMIT %(limit)s
"""


class SimulatorError(IiotError):
    """The simulation could not start: unknown tenant, unusable broker URL, broker refusal."""


@dataclass(frozen=True)
class DeviceSpec:
    mac: str
    meter_kind: str
    metrics: tuple[str, ...]
    # the tenant's, from the registry: how far back history may go, how fast it may be sent
    tenant: str = field(default="", compare=False)
    retention_days: int | None = field(default=None, compare=False)
    messages_per_minute: int | None = field(default=None, compare=False)


def load_fleet(
    database_url: str, tenant: str | None = None, limit: int | None = None
) -> list[DeviceSpec]:
    """Active devices that have metrics registered, ordered by MAC, of one tenant or all."""
    if limit is not None and limit < 0:
        raise ValueError("limit must not be negative")
    with connect(database_url, application_name="iiot-simulator") as conn:
        if tenant is not None:
            found = conn.execute("SELECT 1 FROM tenants WHERE slug = %s", (tenant,)).fetchone()
            if found is None:
                raise SimulatorError(
                    f"unknown tenant {tenant[:70]!r}: `iiot tenants list` shows the tenants"
                )
        rows = conn.execute(_FLEET_SQL, {"tenant": tenant, "limit": limit}).fetchall()
    return [
        DeviceSpec(mac, kind, tuple(metrics), slug, retention, per_minute)
        for mac, kind, metrics, slug, retention, per_minute in rows
    ]


def parse_history(text: str) -> timedelta:
    """``7d``, ``36h`` or ``90m``: how far back ``--history`` reaches; ValueError saying what
    is wrong with anything else."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"bad duration {text[:40]!r}: expected a whole number and a unit d, h or m, "
            "such as 7d, 36h or 90m"
        )
    sign, amount, unit = match.groups()
    if sign == "-":
        raise ValueError(f"bad duration {text!r}: history reaches back, so it is positive (7d)")
    if int(amount) == 0:
        raise ValueError(f"bad duration {text!r}: it must be longer than zero")
    try:
        return timedelta(**{_UNITS[unit]: int(amount)})
    except OverflowError:
        raise ValueError(f"bad duration {text[:40]!r}: far too long") from None


def check_history(fleet: Sequence[DeviceSpec], history: timedelta) -> None:
    """SimulatorError when ``history`` reaches further back than the retention of a tenant of
    the fleet: the ingest refuses such readings (bad_timestamp), so none would be stored."""
    limited = [d for d in fleet if d.retention_days is not None]
    if not limited:
        return
    shortest = min(limited, key=lambda d: d.retention_days or 0)
    days = shortest.retention_days or 0
    if history > timedelta(days=days):
        raise SimulatorError(
            f"a history of {_shown_duration(history)} reaches further back than the {days}-day "
            f"retention of tenant {shortest.tenant!r}, whose readings older than that the "
            f"ingest refuses: at most {days}d"
        )


def _shown_duration(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def history_times(now: datetime, history: timedelta, step_s: float) -> list[datetime]:
    """Sample times on multiples of ``step_s`` (from 2000-01-01 UTC), from the first after
    ``now - history`` (so the oldest is inside a retention of that length) to the last before
    ``now`` (so the live run continues after it)."""
    step = timedelta(seconds=step_s)
    start = now - history
    at = _EPOCH + ((start - _EPOCH) // step + 1) * step
    times = []
    while at < now:
        times.append(at)
        at += step
    return times


def _bump(hour: float, centre: float, width: float) -> float:
    """A daily peak: a Gaussian around ``centre`` o'clock that wraps around midnight."""
    distance = (hour - centre + 12.0) % 24.0 - 12.0
    return math.exp(-0.5 * (distance / width) ** 2)


# base level, then each daily peak as (height, o'clock, width in hours)
DAILY_SHAPES = {
    "energy": (0.45, ((0.35, 7.5, 1.5), (0.30, 13.0, 3.0), (0.90, 19.5, 2.0))),
    "water": (0.01, ((0.90, 7.0, 1.0), (0.35, 12.5, 1.5), (0.80, 19.5, 1.5))),
    "gas": (0.02, ((0.60, 7.0, 1.0), (0.90, 12.0, 1.0), (0.80, 19.0, 1.5))),
}


def _daily_shape(kind: str, hour: float) -> float:
    base, peaks = DAILY_SHAPES[kind]
    return base + sum(height * _bump(hour, centre, width) for height, centre, width in peaks)


class _Wander:
    """An Ornstein-Uhlenbeck process around 0: exact for any step, so batches of readings taken
    far apart stay as plausible as readings a second apart."""

    def __init__(self, rng: random.Random, spread: float, correlation_s: float) -> None:
        self._rng = rng
        self._spread = spread
        self._theta = 1.0 / correlation_s
        self.value = rng.gauss(0.0, spread)

    def step(self, dt: float) -> float:
        if dt > 0:
            decay = math.exp(-self._theta * dt)
            noise = self._spread * math.sqrt(1.0 - decay * decay)
            self.value = self.value * decay + noise * self._rng.gauss(0.0, 1.0)
        return self.value


class SimulatedMeter:
    """One device's meter; :meth:`reading` advances it to ``at`` and returns its metrics."""

    def __init__(self, spec: DeviceSpec, seed: int = 0, *, tz: tzinfo = DEFAULT_TIMEZONE) -> None:
        self.spec = spec
        self._tz = tz
        # a str seed is hashed with SHA-512, so runs repeat across processes (unlike hash())
        rng = random.Random(f"{seed}/{spec.mac}")  # noqa: S311 - simulation, not secrets
        self._last: datetime | None = None
        unknown = [m for m in spec.metrics if m not in KNOWN_METRICS]
        if unknown:
            log.warning("device %s: no model for metrics %s; not sent", spec.mac, unknown)
        self._metrics = tuple(m for m in spec.metrics if m in KNOWN_METRICS)
        wanted = set(self._metrics)
        self._has_energy = bool(wanted & _ENERGY_METRICS)
        self._has_water = bool(wanted & _WATER_METRICS)
        self._has_gas = "gas_m3" in wanted

        self._mean_power_w = rng.uniform(300.0, 4000.0)
        self._nominal_v = rng.choice((220.0, 230.0))
        self._peak_flow_lpm = rng.uniform(6.0, 20.0)
        self._peak_gas_m3h = rng.uniform(0.2, 1.2)
        self._energy_kwh = rng.uniform(1_000.0, 50_000.0)
        self._water_m3 = rng.uniform(50.0, 3_000.0)
        self._gas_m3 = rng.uniform(20.0, 2_000.0)
        self._battery_pct = rng.uniform(60.0, 100.0)
        self._drain_pct_per_s = rng.uniform(0.05, 0.5) / 86_400.0
        self._mean_temp_c = rng.uniform(22.0, 30.0)

        self._load = _Wander(rng, 0.25, 600.0)
        self._flow = _Wander(rng, 0.5, 120.0)
        self._gas = _Wander(rng, 0.3, 300.0)
        self._volts = _Wander(rng, 0.01, 60.0)
        self._temp = _Wander(rng, 1.5, 1_800.0)
        self._power_w = 0.0
        self._flow_lpm = 0.0
        self._gas_m3h = 0.0

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics this meter reports (those of the spec it has a model for)."""
        return self._metrics

    def reading(self, at: datetime) -> dict[str, float]:
        if at.tzinfo is None:
            raise ValueError("reading times must be timezone-aware")
        # a clock stepping back (NTP) must not run the registers backwards
        dt = 0.0 if self._last is None else max(0.0, (at - self._last).total_seconds())
        first = self._last is None
        self._last = at if first else max(at, self._last)
        local = at.astimezone(self._tz)
        hour = local.hour + local.minute / 60.0 + local.second / 3600.0
        values: dict[str, float] = {}

        if self._has_energy:
            power = (
                self._mean_power_w * _daily_shape("energy", hour) * math.exp(self._load.step(dt))
            )
            previous = power if first else self._power_w
            self._energy_kwh += (previous + power) / 2.0 * dt / 3.6e6
            self._power_w = power
            # a heavier load sags the supply a little
            sag = 0.01 * min(power / (self._mean_power_w * 2.0), 1.0)
            volts = self._nominal_v * (1.0 + self._volts.step(dt) - sag)
            volts = min(max(volts, self._nominal_v * 0.95), self._nominal_v * 1.05)
            values |= {
                "energy_kwh": round(self._energy_kwh, 3),
                "power_w": round(power, 1),
                "voltage_v": round(volts, 1),
                "current_a": round(power / volts, 3),
            }
        if self._has_water:
            flow = self._peak_flow_lpm * _daily_shape("water", hour) * math.exp(self._flow.step(dt))
            previous = flow if first else self._flow_lpm
            self._water_m3 += (previous + flow) / 2.0 * dt / 60_000.0
            self._flow_lpm = flow
            values |= {"water_m3": round(self._water_m3, 3), "flow_lpm": round(flow, 2)}
        if self._has_gas:
            gas = self._peak_gas_m3h * _daily_shape("gas", hour) * math.exp(self._gas.step(dt))
            previous = gas if first else self._gas_m3h
            self._gas_m3 += (previous + gas) / 2.0 * dt / 3_600.0
            self._gas_m3h = gas
            values["gas_m3"] = round(self._gas_m3, 3)
        if "temperature_c" in self._metrics:
            daily = 5.0 * math.sin(2.0 * math.pi * (hour - 9.0) / 24.0)
            temp = self._mean_temp_c + daily + self._temp.step(dt)
            values["temperature_c"] = round(min(max(temp, 15.0), 40.0), 1)
        if "battery_pct" in self._metrics:
            self._battery_pct = max(0.0, self._battery_pct - self._drain_pct_per_s * dt)
            values["battery_pct"] = round(self._battery_pct, 1)
        return {m: values[m] for m in self._metrics}


def format_ts(at: datetime) -> str:
    """``2026-11-22T20:31:07.123Z``: UTC, milliseconds (truncated), trailing Z."""
    if at.tzinfo is None:
        raise ValueError("reading times must be timezone-aware")
    at = at.astimezone(UTC)
    return f"{at:%Y-%m-%dT%H:%M:%S}.{at.microsecond // 1000:03d}Z"


def _reading_object(at: datetime, values: Mapping[str, float]) -> dict[str, object]:
    return {"ts": format_ts(at), "metrics": dict(values)}


def encode_reading(at: datetime, values: Mapping[str, float]) -> bytes:
    return orjson.dumps(_reading_object(at, values))


def encode_batch(readings: Sequence[tuple[datetime, Mapping[str, float]]]) -> bytes:
    if not readings:
        raise ValueError("a batch needs at least one reading")
    return orjson.dumps({"readings": [_reading_object(at, values) for at, values in readings]})


def telemetry_topic(prefix: str, mac: str) -> str:
    return f"{prefix}/devices/{mac}/telemetry"


@dataclass(frozen=True)
class SimulationStats:
    """``acknowledged`` counts messages the broker accepted (PUBACK for QoS 1, PUBCOMP for QoS 2,
    sent for QoS 0); ``rejected`` those it answered with an error reason code; ``seconds`` is
    the time spent publishing, not waiting for the last acknowledgements; ``resent`` counts
    messages sent again because the broker answered "no matching subscribers" or a transient
    failure (store and forward: such a message is kept until it is delivered)."""

    published: int
    acknowledged: int
    devices: int
    seconds: float
    rejected: int = 0
    resent: int = 0
    history_messages: int = 0  # of ``published``, how many carry history (all planned)


class _Delivery:
    """Counts published and settled messages, and keeps each message until the broker has
    delivered it: one answered "no matching subscribers" or a transient failure goes back to
    ``retry`` to be sent again. paho reports settlements on its own thread, sometimes before
    ``publish()`` has returned the message id."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.published = 0
        self.acknowledged = 0
        self.rejected = 0
        self.resent = 0
        self._sent: dict[int, tuple[str, bytes] | None] = {}  # mid -> message (QoS 0: None)
        self._early: dict[int, mqtt.ReasonCode] = {}  # settled before publish() returned
        self.retry: list[tuple[float, str, bytes]] = []  # (when, topic, payload)

    def on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: mqtt.ReasonCode,
        properties: mqtt.Properties,
    ) -> None:
        with self.changed:
            if mid not in self._sent:
                self._early[mid] = reason_code
                return
            self._settle(mid, self._sent.pop(mid), reason_code)

    def sent(self, mid: int, topic: str, payload: bytes, qos: int) -> None:
        """Remember the message behind ``mid`` until the broker settles it (a QoS 0 message is
        settled once written: it has no acknowledgement to wait for, nor a second chance)."""
        with self.changed:
            reason = self._early.pop(mid, None)
            message = (topic, payload) if qos else None
            if reason is None:
                self._sent[mid] = message
            else:
                self._settle(mid, message, reason)

    def _settle(self, mid: int, message: tuple[str, bytes] | None, reason: mqtt.ReasonCode) -> None:
        outcome = "delivered" if message is None else publish_outcome(reason)
        if outcome == "retry":
            self.retry.append((time.monotonic() + RESEND_AFTER_S, *message))
            if len(self.retry) == 1:
                log.warning("broker did not deliver message %d (%s): sending it again", mid, reason)
        elif outcome == "refused":
            self.rejected += 1
            log.warning("broker refused message %d: %s", mid, reason)
        else:
            self.acknowledged += 1
        self.changed.notify_all()

    def due(self) -> list[tuple[str, bytes]]:
        """The messages to send again now."""
        now = time.monotonic()
        with self.changed:
            if not self.retry or self.retry[0][0] > now:
                return []
            ready = [(topic, payload) for when, topic, payload in self.retry if when <= now]
            self.retry = [entry for entry in self.retry if entry[0] > now]
            self.resent += len(ready)
            return ready

    @property
    def unsettled(self) -> int:
        return self.published - self.acknowledged - self.rejected

    def stats(self, devices: int, seconds: float, history: int = 0) -> SimulationStats:
        with self.changed:
            return SimulationStats(
                self.published,
                self.acknowledged,
                devices,
                seconds,
                self.rejected,
                self.resent,
                history,
            )


def _close(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()


def _open_client(options: MqttOptions, delivery: _Delivery) -> tuple[mqtt.Client, int]:
    """A connected client with its network thread running, and its MQTT version."""

    def on_connect(
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: mqtt.ReasonCode,
        properties: mqtt.Properties,
    ) -> None:
        receive_maximum = getattr(properties, "ReceiveMaximum", None)
        # paho does not apply the broker's Receive Maximum itself; exceeding it is a protocol error
        if receive_maximum and receive_maximum < client.max_inflight_messages:
            client.max_inflight_messages = receive_maximum
        if reason_code.is_failure:
            log.warning("reconnect to %s refused: %s", options.shown_url, reason_code)

    def on_disconnect(
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: mqtt.ReasonCode,
        properties: mqtt.Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.warning("disconnected from %s: %s; paho reconnects", options.shown_url, reason_code)

    def setup(client: mqtt.Client) -> None:
        client.reconnect_delay_set(min_delay=1, max_delay=5)  # back soon after a broker restart
        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = delivery.on_publish

    try:
        return connect_client(
            options, f"iiot-sim-{uuid.uuid4().hex[:12]}", setup=setup, keepalive=30
        )
    except MqttError as exc:
        raise SimulatorError(str(exc)) from exc


def _publish(
    client: mqtt.Client, delivery: _Delivery, topic: str, payload: bytes, qos: int
) -> bool:
    # counted first: paho may settle the message on its thread before publish() returns, and
    # holding our lock across publish() would invert the order with paho's own locks
    with delivery.changed:
        delivery.published += 1
    info = client.publish(topic, payload, qos=qos)
    # a QoS 1 or 2 message published while paho reconnects is queued and sent after it
    if info.rc == mqtt.MQTT_ERR_SUCCESS or (qos > 0 and info.rc == mqtt.MQTT_ERR_NO_CONN):
        delivery.sent(info.mid, topic, payload, qos)
        return True
    with delivery.changed:
        delivery.published -= 1
        delivery.changed.notify_all()
    return False


def _resend(client: mqtt.Client, delivery: _Delivery, qos: int) -> None:
    """Send again what the broker did not deliver (already counted as published)."""
    for topic, payload in delivery.due():
        info = client.publish(topic, payload, qos=qos)
        delivery.sent(info.mid, topic, payload, qos)


def _message_times(
    now: datetime, period_s: float, size: int, last: datetime | None
) -> list[datetime]:
    """``size`` sample times spread over the last period, ending now, in whole milliseconds and
    strictly after the device's previous reading (the ingest key is device, metric, ts)."""
    times = []
    for i in range(size):
        at = now - timedelta(seconds=period_s * (size - 1 - i) / size)
        at = at.replace(microsecond=at.microsecond // 1000 * 1000)
        if last is not None and at <= last:
            at = last + timedelta(milliseconds=1)
        times.append(at)
        last = at
    return times


def _wait_for_room(
    client: mqtt.Client, delivery: _Delivery, qos: int, stop: threading.Event
) -> None:
    """Block while the broker has _MAX_UNACKNOWLEDGED messages to settle (gone, or slow)."""
    while delivery.unsettled >= _MAX_UNACKNOWLEDGED and not stop.is_set():
        _resend(client, delivery, qos)
        with delivery.changed:
            delivery.changed.wait_for(lambda: delivery.unsettled < _MAX_UNACKNOWLEDGED, timeout=0.5)


def _publish_history(
    client: mqtt.Client,
    delivery: _Delivery,
    fleet: Sequence[DeviceSpec],
    meters: Sequence[SimulatedMeter],
    topics: Sequence[str],
    times: Sequence[datetime],
    qos: int,
    stop: threading.Event,
    report: Callable[[int], None],
) -> int:
    """Publish every device's readings at ``times`` in batches of HISTORY_BATCH, the fleet a
    batch at a time, paced under the slowest plan's messages per minute (the ingest refuses a
    device's messages over it as rate_limited); ``report(planned)`` about once a second.
    Messages not written (QoS 0 while disconnected) are returned."""
    chunks = [times[i : i + HISTORY_BATCH] for i in range(0, len(times), HISTORY_BATCH)]
    planned = len(chunks) * len(fleet)
    limits = [d.messages_per_minute for d in fleet if d.messages_per_minute]
    interval = 60.0 / min(limits) * HISTORY_PACE if limits else 0.0
    log.info(
        "publishing history from %s to %s: %d readings a device in %d messages, one every %.1f s",
        format_ts(times[0]),
        format_ts(times[-1]),
        len(times),
        len(chunks),
        interval,
    )
    begun = time.monotonic()
    next_report = begun
    dropped = 0
    for number, chunk in enumerate(chunks):
        due = begun + number * interval
        while (now := time.monotonic()) < due and not stop.is_set():
            _resend(client, delivery, qos)
            if now >= next_report:
                report(planned)
                next_report = now + 1.0
            stop.wait(min(due, next_report) - now)
        for meter, topic in zip(meters, topics, strict=True):
            if stop.is_set():
                return dropped
            _wait_for_room(client, delivery, qos, stop)
            payload = encode_batch([(at, meter.reading(at)) for at in chunk])
            if not _publish(client, delivery, topic, payload, qos):
                dropped += 1
            if time.monotonic() >= next_report:
                report(planned)
                next_report = time.monotonic() + 1.0
    report(planned)
    return dropped


def run_simulation(
    fleet: Sequence[DeviceSpec],
    broker: MqttOptions | str,
    *,
    prefix: str = "iiot",
    rate: float = 1.0,
    duration: float | None = None,
    count: int | None = None,
    batch_size: int = 1,
    qos: int = 1,
    seed: int = 0,
    stop: threading.Event | None = None,
    progress: Callable[[SimulationStats], None] | None = None,
    drain_timeout: float = 30.0,
    history: timedelta | None = None,
    history_step: float = DEFAULT_HISTORY_STEP_S,
) -> SimulationStats:
    """Publish ``rate`` messages per second per device until ``count`` messages per device,
    ``duration`` seconds or ``stop``, whichever comes first; then wait up to ``drain_timeout``
    seconds for the broker to acknowledge everything published. Each message carries one reading,
    or a batch of ``batch_size`` readings sampled over the interval since the device's previous
    message. ``broker`` is the broker's settings, or just its URL (MQTT 5 or 3.1.1, no TLS
    files). With ``history``, readings ``history_step`` seconds apart over that much of the past
    are published first (see _publish_history), by the meters the live run then continues."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if qos not in (0, 1, 2):
        raise ValueError("qos must be 0, 1 or 2")
    if count is not None and count < 0:
        raise ValueError("count must not be negative")
    if history is not None and history <= timedelta(0):
        raise ValueError("history must be positive")
    if history_step <= 0:
        raise ValueError("history_step must be positive")
    stop = stop or threading.Event()
    delivery = _Delivery()
    devices = len(fleet)
    total = None if count is None else count * devices
    if devices == 0 or total == 0:
        log.warning("nothing to simulate: %d devices, count %s", devices, count)
        return delivery.stats(devices, 0.0)

    meters = [SimulatedMeter(spec, seed) for spec in fleet]
    topics = [telemetry_topic(prefix, spec.mac) for spec in fleet]
    last_sample: list[datetime | None] = [None] * devices
    period = 1.0 / rate
    spacing = period / devices
    options = MqttOptions(broker) if isinstance(broker, str) else broker
    client, protocol = _open_client(options, delivery)
    log.info(
        "simulating %d devices at %g messages/s each (%g/s in all) to %s over MQTT %s under %s/",
        devices,
        rate,
        rate * devices,
        options.shown_url,
        protocol_name(protocol),
        prefix,
    )
    begun = time.monotonic()
    planned = 0
    dropped = 0

    def report(history_messages: int) -> None:
        nonlocal planned
        planned = history_messages
        if progress is not None:
            progress(delivery.stats(devices, time.monotonic() - begun, planned))

    try:
        times = [] if history is None else history_times(datetime.now(UTC), history, history_step)
        if times:
            dropped += _publish_history(
                client, delivery, fleet, meters, topics, times, qos, stop, report
            )
            last_sample = [times[-1]] * devices
        started = time.monotonic()
        deadline = None if duration is None else started + duration
        next_progress = started + 1.0
        slot = 0
        while not stop.is_set() and (total is None or slot < total):
            _resend(client, delivery, qos)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if progress is not None and now >= next_progress:
                progress(delivery.stats(devices, now - begun, planned))
                next_progress = now + 1.0
            due = started + slot * spacing
            if due > now:
                wake = min(due, next_progress if progress is not None else due)
                if deadline is not None:
                    wake = min(wake, deadline)
                stop.wait(max(wake - now, 0.0))
                continue
            if delivery.unsettled >= _MAX_UNACKNOWLEDGED:
                # the broker is gone or slow; queueing more in paho would only grow memory
                _wait_for_room(client, delivery, qos, stop)
                continue
            # devices take turns, so the fleet's messages are spread evenly over each period
            index = slot % devices
            wall = datetime.now(UTC)
            times = _message_times(wall, period, batch_size, last_sample[index])
            last_sample[index] = times[-1]
            meter = meters[index]
            readings = [(at, meter.reading(at)) for at in times]
            payload = encode_reading(*readings[0]) if batch_size == 1 else encode_batch(readings)
            if not _publish(client, delivery, topics[index], payload, qos):
                dropped += 1
            slot += 1
        generated = time.monotonic()
        drain_until = time.monotonic() + drain_timeout
        while (left := drain_until - time.monotonic()) > 0:
            _resend(client, delivery, qos)
            if progress is not None and time.monotonic() >= next_progress:
                progress(delivery.stats(devices, generated - begun, planned))  # waiting for acks
                next_progress = time.monotonic() + 1.0
            with delivery.changed:
                if delivery.changed.wait_for(
                    lambda: delivery.unsettled <= 0, timeout=min(left, RESEND_AFTER_S / 2)
                ):
                    break
        settled = delivery.unsettled <= 0
        if not settled:
            log.warning(
                "%d of %d messages were not acknowledged within %g s",
                delivery.unsettled,
                delivery.published,
                drain_timeout,
            )
    finally:
        _close(client)
    if dropped:
        log.warning("%d QoS 0 messages were dropped while disconnected", dropped)
    stats = delivery.stats(devices, generated - begun, planned)
    log.info(
        "published %d messages (%d acknowledged) from %d devices in %.1f s",
        stats.published,
        stats.acknowledged,
        devices,
        stats.seconds,
    )
    if progress is not None:
        progress(stats)
    return stats
