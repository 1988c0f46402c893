"""Cursor pagination: ``?limit=&cursor=`` on every list, ``next_cursor`` in every page.

A cursor is the opaque, URL-safe encoding of the last item's sort key; a page never skips or
repeats an item when rows are added meanwhile (keyset pagination, not OFFSET).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel

from iiot_orchestration.api.errors import ApiError

T = TypeVar("T")
MAX_LIMIT = 1000

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page (1 to 1000).")]
Cursor = Annotated[
    str | None,
    Query(max_length=512, description="`next_cursor` of the previous page; omit for the first."),
]


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


def encode(value: Any) -> str:
    raw = json.dumps(value, separators=(",", ":"), default=str).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str | None, *shape: type) -> Any:
    """The sort key a cursor carries (None for the first page), checked against ``shape``: one
    type for a single key, several for a list key (str stands for timestamps and text). A
    damaged or foreign cursor is a 400."""
    if cursor is None or cursor == "":
        return None
    bad = ApiError(
        400, "invalid cursor: pass next_cursor of the previous page unchanged", code="bad_cursor"
    )
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    parts = [value] if len(shape) == 1 else value
    if not isinstance(parts, list) or len(parts) != len(shape):
        raise bad
    for part, kind in zip(parts, shape, strict=True):
        if isinstance(part, bool) or not isinstance(part, kind):
            raise bad
        if kind is int and not -(2**63) <= part < 2**63:
            raise bad
        if kind is str and len(part) > 200:
            raise bad
    return value


def page(rows: list[dict[str, Any]], limit: int, key: str | tuple[str, ...]) -> dict[str, Any]:
    """A page from ``limit + 1`` fetched rows; the cursor is the last kept row's ``key``."""
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = None
    if more and rows:
        last = rows[-1]
        cursor = encode(last[key] if isinstance(key, str) else [last[k] for k in key])
    return {"items": rows, "next_cursor": cursor}
