"""The resolution of each unit's values, and the value-axis scales of charts that show them.

The meters' cumulative registers count thousandths (0.001 kWh, 0.001 m3: what the devices
send), so a consumption, a sum of register differences, is exact to that resolution; the float
noise of the sums (``0.5010000000002037``) is rounded away before a value reaches a file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RESOLUTION_DECIMALS = {"kWh": 3, "m3": 3}
DEFAULT_DECIMALS = 3
AXIS_INTERVALS = 5  # about this many steps between 0 and the top of a value axis


def decimals(unit: str) -> int:
    """Decimals of a unit's resolution (3 for kWh and m3)."""
    return RESOLUTION_DECIMALS.get(unit, DEFAULT_DECIMALS)


def to_resolution(value: float, unit: str) -> float:
    """``value`` rounded to the unit's resolution (never ``-0.0``)."""
    return round(value, decimals(unit)) + 0.0


@dataclass(frozen=True)
class AxisScale:
    """A value axis from 0 to ``top`` in steps of ``step``, labelled with ``decimals``."""

    step: float
    top: float
    decimals: int

    @property
    def excel_format(self) -> str:
        return "#,##0" + ("." + "0" * self.decimals if self.decimals else "")


def axis_scale(maximum: float, unit: str) -> AxisScale:
    """A step of 1, 2 or 5 times a power of ten (not finer than the unit's resolution) that
    divides 0..maximum into about AXIS_INTERVALS steps, the first step above the maximum as the
    top, and the decimals the labels need: a few hundredths of a cubic metre read 0,01 0,02 ...,
    not 0,0 five times."""
    if to_resolution(maximum, unit) <= 0:  # nothing consumed: a plain 0 to 1
        return AxisScale(step=1.0, top=1.0, decimals=0)
    finest = 10.0 ** -decimals(unit)
    raw = max(to_resolution(maximum, unit), finest) / AXIS_INTERVALS
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    step = max(step, finest)
    places = max(0, -math.floor(math.log10(step) + 1e-9))
    step = round(step, places)
    # the first step above the maximum: the largest bar keeps room for its label
    top = round((math.floor(to_resolution(maximum, unit) / step + 1e-9) + 1) * step, places)
    return AxisScale(step=step, top=top, decimals=places)
