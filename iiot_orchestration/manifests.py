"""Strict reading of the JSON manifests that sit beside archives and backups."""

from __future__ import annotations

import json
from typing import Any


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"the key {key[:60]!r} appears twice")
        found[key] = value
    return found


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def strict_json_object(text: str, expected_format: str, error: type[Exception]) -> dict[str, Any]:
    """The manifest's JSON object, refused with ``error`` (naming the first problem) when it is
    not strict JSON (a key twice, NaN or Infinity, nesting too deep), not an object, or of
    another format than ``expected_format``."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise error(f"not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(data, dict):
        raise error("not a JSON object")
    if data.get("format") != expected_format:
        raise error(
            f"format {str(data.get('format'))[:20]!r} is not {expected_format}: written by "
            "another version of iiot"
        )
    return data
