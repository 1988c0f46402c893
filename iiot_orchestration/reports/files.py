"""Where report files live, and writing them so that a reader never sees half a file."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from iiot_orchestration.reports.data import ReportError, check_slug

FORMATS = ("pdf", "xlsx")
FILE_STEM = "consumption"


def report_path(root: Path, slug: str, period_label: str, fmt: str) -> Path:
    """``<root>/<tenant>/<period>/consumption.<ext>``: a stable name per tenant and period."""
    if fmt not in FORMATS:
        raise ReportError(f"unknown report format {fmt!r}: expected one of {', '.join(FORMATS)}")
    check_slug(slug)
    if period_label in {"", ".", ".."} or "/" in period_label or "\\" in period_label:
        raise ReportError(f"bad period folder {period_label!r}")
    return Path(root) / slug / period_label / f"{FILE_STEM}.{fmt}"


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path``; renamed over it when the block succeeds, removed
    when it fails, so the stable name always holds a complete file (or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
