"""One message judged into the open batch: readings to land, dead letters, quota overage.

Used by paho's thread in a single-process slot, or by the writer process of a slot that has one
(``ingest_daemon.worker``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from ingest_daemon.validation import Device, Limits, Reading, Rejection, validate
from ingest_daemon.writer import BatchResult, DeadLetter, Delivery


class TokenBuckets:
    """Messages per minute per device, refilled continuously."""

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[float, float]] = {}

    def take(self, device: Device, now: float) -> bool:
        capacity = float(device.messages_per_minute)
        tokens, last = self._buckets.get(device.device_id, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * capacity / 60.0)
        allowed = tokens >= 1.0
        self._buckets[device.device_id] = (tokens - 1.0 if allowed else tokens, now)
        return allowed


class UnknownSenders:
    """Dead letters of senders no device has (a MAC, or the topic when it names none) in the
    current minute: at most ``per_sender`` each, and at most ``senders`` distinct senders. The
    counts start afresh each minute, so they never hold more than ``senders`` entries."""

    def __init__(self, per_sender: int, senders: int) -> None:
        self.per_sender = per_sender
        self.senders = senders
        self._minute: int | None = None
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def allow(self, sender: str, at: datetime) -> bool:
        minute = int(at.timestamp() // 60)
        if minute != self._minute:
            self._minute, self._counts = minute, {}
        count = self._counts.get(sender)
        if count is None:
            if len(self._counts) >= self.senders:
                return False
            count = 0
        if count >= self.per_sender:
            return False
        self._counts[sender] = count + 1
        return True


@dataclass(frozen=True)
class Written:
    """What a committed batch held, for the counters and metrics of the receiving process."""

    result: BatchResult
    overage: int
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    newest: datetime | None = None
    unknown_device_throttled: int = 0  # messages of unknown devices counted, not stored


@dataclass
class Judged:
    """The judged messages of one batch."""

    messages: int = 0
    readings: list[tuple[Reading, Delivery]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    overage: int = 0
    throttled: int = 0

    def written(self, result: BatchResult) -> Written:
        reasons: dict[str, int] = {}
        for letter in self.dead_letters:
            reasons[letter.rejection.reason] = reasons.get(letter.rejection.reason, 0) + 1
        if result.conflicts:
            reasons["conflicting_duplicate"] = reasons.get("conflicting_duplicate", 0) + len(
                result.conflicts
            )
        newest = max((reading.ts for reading, _ in self.readings), default=None)
        return Written(result, self.overage, reasons, newest, self.throttled)


class Judge:
    def __init__(
        self,
        lookup: Callable[[str], Device | None],
        prefix: str,
        limits: Limits,
        *,
        quotas: bool = True,
    ) -> None:
        """``quotas`` off (a replay of dead letters): no plan rate, no unknown-device throttle;
        what arrived long ago cannot be judged by the rate it arrives at now."""
        self.lookup = lookup
        self.prefix = prefix
        self.limits = limits
        self.quotas = quotas
        self.buckets = TokenBuckets()
        self.unknown = UnknownSenders(
            limits.unknown_device_per_minute, limits.unknown_device_macs_per_minute
        )

    def judge(self, judged: Judged, topic: str, payload: bytes, received_at: datetime) -> bool:
        """Judge one message into ``judged``; True when it was counted as overage."""
        verdict = validate(
            topic, payload, self.lookup, prefix=self.prefix, now=received_at, limits=self.limits
        )
        device = verdict.device
        rejections = verdict.rejections
        readings = verdict.readings
        overage = False
        if device is None:
            if (
                rejections
                and self.quotas
                and not self.unknown.allow(verdict.mac or topic[:200], received_at)
            ):
                judged.throttled += 1
                rejections = []
        elif readings and self.quotas and not self.buckets.take(device, time.monotonic()):
            if device.hard_block:
                rejections = [
                    *rejections,
                    Rejection(
                        "rate_limited",
                        f"over the plan's {device.messages_per_minute} messages per minute",
                        payload,
                    ),
                ]
                readings = []
            else:
                overage = True
                judged.overage += 1
        delivery = Delivery(received_at, judged.messages, overage, topic)
        judged.messages += 1
        judged.readings.extend([(reading, delivery) for reading in readings])
        if rejections:
            judged.dead_letters.extend(
                DeadLetter(
                    received_at,
                    topic,
                    verdict.mac,
                    device.tenant_id if device else None,
                    device.device_id if device else None,
                    rejection,
                )
                for rejection in rejections
            )
        return overage
