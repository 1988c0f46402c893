"""One MQTT message in, readings to land and rejections to dead-letter out.

A message is refused whole when it cannot be trusted at all (too large, not JSON, wrong shape,
unknown or inactive device, another device's MAC). Otherwise every reading, and every value of a
reading, is judged on its own: the good ones land, the bad ones are dead-lettered.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple

import orjson

from iiot_orchestration.registry import RegistryError, normalise_mac

REASONS = (
    "malformed_json",
    "schema",
    "unknown_device",
    "inactive_device",
    "topic_mismatch",
    "unknown_metric",
    "bad_value",
    "bad_timestamp",
    "too_large",
    "rate_limited",
    "conflicting_duplicate",  # judged by the writer, against what is stored
)
MAX_ABS_VALUE = 1e15
_NUMBER = (int, float)
_SHOWN = 60


@dataclass(frozen=True, slots=True)
class Device:
    """What the daemon knows of a registered device (from the registry cache)."""

    device_id: int
    tenant_id: int
    mac: str
    status: str
    metrics: frozenset[str]
    retention_days: int
    messages_per_minute: int = 60
    hard_block: bool = True


class Reading(NamedTuple):
    """One value to land (a tuple: built once per value on the hot path)."""

    tenant_id: int
    device_id: int
    metric: str
    ts: datetime
    value: float


@dataclass(frozen=True, slots=True)
class Rejection:
    """A dead letter to be: ``payload`` is the whole message, or the refused reading alone."""

    reason: str
    detail: str
    payload: bytes


@dataclass(frozen=True)
class Limits:
    max_payload_bytes: int = 256 * 1024
    max_readings: int = 1_000
    max_metrics: int = 64
    max_future: timedelta = timedelta(minutes=5)
    # dead letters stored per unknown sender (a MAC no device has) per minute; the rest are
    # only counted (IIOT_UNKNOWN_DEVICE_DEAD_LETTERS_PER_MINUTE)
    unknown_device_per_minute: int = 10
    # distinct unknown senders a minute that get any: bounds a flood of made-up MACs, and memory
    unknown_device_macs_per_minute: int = 1_000


DEFAULT_LIMITS = Limits()


@dataclass
class Verdict:
    mac: str | None
    device: Device | None
    readings: list[Reading] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


@lru_cache(maxsize=65_536)  # a device always publishes on the same topic
def mac_from_topic(topic: str, prefix: str) -> str | None:
    """The canonical MAC of ``<prefix>/devices/{mac}/telemetry``, or None if it is not one."""
    head, tail = f"{prefix}/devices/", "/telemetry"
    if not (topic.startswith(head) and topic.endswith(tail)):
        return None
    try:
        return normalise_mac(topic[len(head) : -len(tail)])
    except RegistryError:
        return None


@lru_cache(maxsize=1024)
def _days(days: int) -> timedelta:
    return timedelta(days=days)


def parse_timestamp(raw: Any) -> datetime:
    if not isinstance(raw, str) or len(raw) > 40:
        raise ValueError(f"ts must be an ISO-8601 string, got {_shown(raw)}")
    try:
        ts = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"ts {_shown(raw)} is not ISO-8601") from None
    if ts.tzinfo is None:
        raise ValueError(f"ts {_shown(raw)} has no UTC offset")
    return ts


def validate(
    topic: str,
    payload: bytes,
    lookup: Callable[[str], Device | None],
    *,
    prefix: str,
    now: datetime,
    limits: Limits = DEFAULT_LIMITS,
) -> Verdict:
    """Judge one message; never raises on any payload."""
    mac = mac_from_topic(topic, prefix)
    verdict = Verdict(mac, None)

    def refuse(reason: str, detail: str) -> Verdict:
        verdict.rejections.append(Rejection(reason, detail, payload))
        return verdict

    if len(payload) > limits.max_payload_bytes:
        # not parsed, but the topic names the device: its tenant can see the refusal
        verdict.device = lookup(mac) if mac is not None else None
        return refuse(
            "too_large", f"{len(payload):,} bytes; the limit is {limits.max_payload_bytes:,}"
        )
    if mac is None:
        return refuse(
            "topic_mismatch", f"topic {_shown(topic)} is not {prefix}/devices/<mac>/telemetry"
        )
    device = lookup(mac)
    if device is None:
        return refuse("unknown_device", f"no registered device has MAC {mac}")
    verdict.device = device
    if device.status != "active":
        return refuse("inactive_device", f"device {mac} is {device.status}")
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        return refuse("malformed_json", str(exc)[:200])
    if not isinstance(document, dict):
        return refuse("schema", f"expected a JSON object, got {type(document).__name__}")
    claimed = document.get("mac")
    if claimed is not None:
        try:
            if normalise_mac(str(claimed)) != mac:
                return refuse(
                    "topic_mismatch", f"payload names device {_shown(claimed)}, topic {mac}"
                )
        except RegistryError:
            return refuse("topic_mismatch", f"payload names device {_shown(claimed)}, topic {mac}")
    if "readings" in document:
        readings = document["readings"]
        if not isinstance(readings, list) or not readings:
            return refuse("schema", "readings must be a non-empty list")
        if len(readings) > limits.max_readings:
            return refuse(
                "too_large", f"{len(readings):,} readings; the limit is {limits.max_readings:,}"
            )
    else:
        readings = [document]
    oldest = now - _days(device.retention_days)
    newest = now + limits.max_future
    for index, reading in enumerate(readings):
        _judge_reading(verdict, device, reading, index, len(readings) > 1, oldest, newest, limits)
    return verdict


def _judge_reading(
    verdict: Verdict,
    device: Device,
    reading: Any,
    index: int,
    in_batch: bool,
    oldest: datetime,
    newest: datetime,
    limits: Limits,
) -> None:
    def refuse(reason: str, detail: str, part: Any = reading) -> None:
        where = f"reading {index}: " if in_batch else ""
        verdict.rejections.append(Rejection(reason, where + detail, _fragment(part)))

    if not isinstance(reading, dict):
        return refuse("schema", f"a reading must be an object, got {type(reading).__name__}")
    metrics = reading.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        return refuse("schema", "metrics must be a non-empty object of name: number")
    if len(metrics) > limits.max_metrics:
        return refuse("schema", f"{len(metrics)} metrics; the limit is {limits.max_metrics}")
    try:
        ts = parse_timestamp(reading.get("ts"))
    except ValueError as exc:
        return refuse("bad_timestamp", str(exc))
    if ts > newest:
        return refuse("bad_timestamp", f"ts {ts.isoformat()} is in the future")
    if ts < oldest:
        return refuse(
            "bad_timestamp",
            f"ts {ts.isoformat()} is older than the tenant's {device.retention_days}-day retention",
        )
    registered, readings = device.metrics, verdict.readings
    for name, value in metrics.items():
        # the common case first, without building the fragment a refusal keeps
        if name in registered and type(value) is float and -MAX_ABS_VALUE <= value <= MAX_ABS_VALUE:
            readings.append(Reading(device.tenant_id, device.device_id, name, ts, value))
            continue
        part = {"ts": reading["ts"], "metrics": {name: value}}
        if name not in registered:
            refuse(
                "unknown_metric", f"metric {_shown(name)} is not registered for the device", part
            )
        elif isinstance(value, bool) or not isinstance(value, _NUMBER):
            refuse("bad_value", f"{name} must be a number, got {_shown(value)}", part)
        elif not math.isfinite(value) or abs(value) > MAX_ABS_VALUE:
            refuse("bad_value", f"{name}={_shown(value)} is out of range", part)
        else:
            readings.append(Reading(device.tenant_id, device.device_id, name, ts, float(value)))
    return None


def _fragment(part: Any) -> bytes:
    try:
        return orjson.dumps(part)
    except TypeError:
        return repr(part).encode()
