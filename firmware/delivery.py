"""What a PUBACK means to a publisher that keeps its messages until they are delivered: the
fleet simulator and the gateway agent. Standard library only: the agent runs on a gateway with
paho-mqtt and cryptography alone."""

from __future__ import annotations

from typing import Any

# "not delivered, send again later": no subscriber matched (0x10: Mosquitto just restarted, and
# the ingest slots have not subscribed again to their shared subscription) and the broker's
# transient failures (unspecified, implementation specific, server busy, quota exceeded); any
# other failure is a final refusal
NO_MATCHING_SUBSCRIBERS = 0x10
TRANSIENT_FAILURES = frozenset({0x80, 0x83, 0x89, 0x97})


def publish_outcome(reason: Any) -> str:
    """``delivered``, ``retry`` (keep the message and send it again) or ``refused``, for the
    reason code of a PUBACK (a paho ``ReasonCode``; None or a success: delivered; MQTT 3.1.1
    has no reason codes)."""
    if reason is None:
        return "delivered"
    value = reason.value
    if value == NO_MATCHING_SUBSCRIBERS or value in TRANSIENT_FAILURES:
        return "retry"
    return "refused" if reason.is_failure else "delivered"
