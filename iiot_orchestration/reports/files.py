"""Where report files live, and writing them so that a reader never sees half a file.

The reports root is a local directory or an fsspec URL (``s3://bucket/prefix``, filestore.py):
under a local root a report is rendered to a temporary name beside its final one and renamed;
under a remote one it is rendered to a local temporary file and then uploaded (to a temporary
object, copied to its final name), so the stable name still always holds a complete file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from iiot_orchestration import filestore
from iiot_orchestration.reports.data import ReportError, check_slug

FORMATS = ("pdf", "xlsx")
FILE_STEM = "consumption"
ROOT_VARIABLE = "IIOT_REPORTS_ROOT"


def report_key(slug: str, period_label: str, fmt: str) -> str:
    """``<tenant>/<period>/consumption.<ext>``, relative to the reports root."""
    if fmt not in FORMATS:
        raise ReportError(f"unknown report format {fmt!r}: expected one of {', '.join(FORMATS)}")
    check_slug(slug)
    if period_label in {"", ".", ".."} or "/" in period_label or "\\" in period_label:
        raise ReportError(f"bad period folder {period_label!r}")
    return f"{slug}/{period_label}/{FILE_STEM}.{fmt}"


def report_path(root: Path | str, slug: str, period_label: str, fmt: str) -> Path | str:
    """``<root>/<tenant>/<period>/consumption.<ext>``: a stable name per tenant and period; a
    Path under a local root, a URL under a remote one."""
    return filestore.join(root, *report_key(slug, period_label, fmt).split("/"))


def report_exists(root: Path | str, slug: str, period_label: str, fmt: str) -> bool:
    path = report_path(root, slug, period_label, fmt)
    if isinstance(path, Path):
        return path.is_file()
    store = filestore.open_root(root, ROOT_VARIABLE, ReportError)
    return store.exists(report_key(slug, period_label, fmt))


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


@contextmanager
def staged_file(
    path: Path | str, variable: str = ROOT_VARIABLE, error: type[Exception] = ReportError
) -> Iterator[Path]:
    """A local path to render into, published at ``path`` when the block succeeds: atomic_file
    for a local path, an upload (through a temporary object) for a URL."""
    if isinstance(path, Path):
        with atomic_file(path) as temporary:
            yield temporary
        return
    folder, _, name = path.rpartition("/")
    store = filestore.open_root(folder, variable, error)
    with tempfile.TemporaryDirectory(prefix="iiot-stage-") as scratch:
        temporary = Path(scratch) / name
        yield temporary
        store.upload(temporary, name)


@contextmanager
def local_report(path: Path | str) -> Iterator[Path]:
    """A local file to read a report from: itself, or a download of it from a remote root."""
    with filestore.local_file(path, ROOT_VARIABLE) as local:
        yield local
