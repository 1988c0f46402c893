"""Parquet archives of raw telemetry, one file per tenant and UTC day, usable without Dagster.

Under the archive root (a local directory, or an fsspec URL such as ``s3://bucket/prefix`` when
the ``archive-s3`` extra is installed) each archive is a directory in Hive style, so that query
engines read the tree as one partitioned data set::

    telemetry/tenant_id=<id>/day=<YYYY-MM-DD>/readings.parquet
    telemetry/tenant_id=<id>/day=<YYYY-MM-DD>/manifest.json

Files are written under a temporary name and renamed when complete. The manifest names the
file's sha256 and the sha256 of its rows in canonical order (``ContentDigest``), which is
computed the same way from the database, so "the file holds exactly these rows" is checked by
comparing two digests, never by trusting the writer.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from iiot_orchestration import filestore
from iiot_orchestration.errors import IiotError
from iiot_orchestration.manifests import strict_json_object

SCHEMA_VERSION = 1
MANIFEST_FORMAT = 1
PARQUET_FILE = "readings.parquet"
MANIFEST_FILE = "manifest.json"
MANIFEST_MAX_BYTES = 64 * 1024
COLUMNS = ("tenant_id", "device_id", "metric", "ts", "value", "received_at")
KEY_COLUMNS = ("device_id", "metric", "ts")
SCHEMA = pa.schema(
    [
        pa.field("tenant_id", pa.int32(), nullable=False),
        pa.field("device_id", pa.int32(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("received_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
ROW_GROUP_ROWS = 262_144
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DAY_DIR = re.compile(r"^telemetry/tenant_id=([1-9][0-9]{0,9})/day=([0-9]{4}-[0-9]{2}-[0-9]{2})$")


class ArchiveError(IiotError):
    """An archive cannot be written, found or read; the message names it."""


class CorruptArchive(ArchiveError):
    """An archive's file does not match its manifest or its database record."""


def day_dir(tenant_id: int, day: date) -> str:
    """The archive directory of one tenant and day, relative to the archive root."""
    return f"telemetry/tenant_id={int(tenant_id)}/day={day.isoformat()}"


def parquet_path(tenant_id: int, day: date) -> str:
    return f"{day_dir(tenant_id, day)}/{PARQUET_FILE}"


def manifest_path(tenant_id: int, day: date) -> str:
    return f"{day_dir(tenant_id, day)}/{MANIFEST_FILE}"


# Content digest


class ContentDigest:
    """sha256 of rows in canonical order, independent of how they are split into batches: each
    column is hashed on its own (fixed-width values little-endian, metrics NUL-terminated), and
    the digest is the sha256 of the six column digests."""

    def __init__(self) -> None:
        self._columns = {name: hashlib.sha256() for name in COLUMNS}
        self.rows = 0

    def update(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows == 0:
            return
        self.rows += batch.num_rows
        for name in ("tenant_id", "device_id"):
            self._columns[name].update(_numbers(batch, name, pa.int32(), "<i4"))
        for name in ("ts", "received_at"):
            self._columns[name].update(_numbers(batch, name, pa.int64(), "<i8"))
        self._columns["value"].update(_numbers(batch, "value", pa.float64(), "<f8"))
        metrics = batch.column("metric").to_pylist()
        self._columns["metric"].update(("\x00".join(metrics) + "\x00").encode())

    def hexdigest(self) -> str:
        combined = hashlib.sha256()
        for name in COLUMNS:
            combined.update(self._columns[name].digest())
        return combined.hexdigest()


def _numbers(batch: pa.RecordBatch | pa.Table, name: str, kind: pa.DataType, layout: str) -> bytes:
    column = batch.column(name)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.cast(kind).to_numpy(zero_copy_only=False).astype(layout).tobytes()


# Manifest


@dataclass(frozen=True)
class Manifest:
    tenant_id: int
    tenant_slug: str
    day: date
    rows: int
    devices: int
    min_ts: datetime
    max_ts: datetime
    bytes: int
    sha256: str
    content_sha256: str
    created_at: datetime
    schema_version: int = SCHEMA_VERSION

    @property
    def parquet(self) -> str:
        return parquet_path(self.tenant_id, self.day)

    @property
    def path(self) -> str:
        return manifest_path(self.tenant_id, self.day)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "schema_version": self.schema_version,
                "tenant_id": self.tenant_id,
                "tenant_slug": self.tenant_slug,
                "day": self.day.isoformat(),
                "file": PARQUET_FILE,
                "bytes": self.bytes,
                "sha256": self.sha256,
                "rows": self.rows,
                "devices": self.devices,
                "min_ts": self.min_ts.isoformat(),
                "max_ts": self.max_ts.isoformat(),
                "content_sha256": self.content_sha256,
                "columns": {f.name: str(f.type) for f in SCHEMA},
                "created_at": self.created_at.isoformat(),
            },
            indent=2,
        )

    @classmethod
    def parse(cls, text: str) -> Manifest:
        """Validate everything; an ArchiveError names the first problem."""
        data = strict_json_object(text, MANIFEST_FORMAT, ArchiveError)
        version = _count(data, "schema_version")
        if version != SCHEMA_VERSION:
            raise ArchiveError(f"schema_version {version} is not {SCHEMA_VERSION}")
        if data.get("file") != PARQUET_FILE:
            raise ArchiveError(f"file must be {PARQUET_FILE!r}")
        if data.get("columns") != {f.name: str(f.type) for f in SCHEMA}:
            raise ArchiveError("columns differ from the archive schema")
        tenant_id = _count(data, "tenant_id")
        slug = data.get("tenant_slug")
        if not isinstance(slug, str) or not re.fullmatch(r"[a-z0-9][a-z0-9-]{1,62}", slug):
            raise ArchiveError("tenant_slug is missing or not a tenant slug")
        try:
            day = date.fromisoformat(str(data.get("day")))
        except ValueError:
            raise ArchiveError("day is not a YYYY-MM-DD date") from None
        digests = {}
        for key in ("sha256", "content_sha256"):
            value = data.get(key)
            if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
                raise ArchiveError(f"{key} is not 64 lowercase hex digits")
            digests[key] = value
        rows, devices = _count(data, "rows"), _count(data, "devices")
        if tenant_id < 1 or rows < 1 or devices < 1 or devices > rows:
            raise ArchiveError("tenant_id, rows and devices must be positive, devices <= rows")
        min_ts, max_ts = _time(data, "min_ts"), _time(data, "max_ts")
        day_start = datetime.combine(day, datetime.min.time(), UTC)
        if not day_start <= min_ts <= max_ts < day_start + timedelta(days=1):
            raise ArchiveError(f"min_ts..max_ts is not inside the day {day}")
        return cls(
            tenant_id=tenant_id,
            tenant_slug=slug,
            day=day,
            rows=rows,
            devices=devices,
            min_ts=min_ts,
            max_ts=max_ts,
            bytes=_count(data, "bytes"),
            sha256=digests["sha256"],
            content_sha256=digests["content_sha256"],
            created_at=_time(data, "created_at"),
            schema_version=version,
        )


def _count(data: dict[str, Any], key: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ArchiveError(f"{key} is missing or not a whole number >= 0")
    return value


def _time(data: dict[str, Any], key: str) -> datetime:
    raw = data.get(key)
    try:
        value = datetime.fromisoformat(raw) if isinstance(raw, str) and len(raw) < 40 else None
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise ArchiveError(f"{key} is not an ISO 8601 time with a time zone")
    return value


# Stores


class Store(filestore.Store):
    """Where archives live: a local directory or an fsspec file system (filestore.py)."""

    error = ArchiveError

    def day_dirs(self, tenant_id: int | None = None) -> list[str]:
        """Archive directories (relative), of one tenant or all."""
        raise NotImplementedError


class LocalStore(filestore.LocalStore, Store):
    def day_dirs(self, tenant_id: int | None = None) -> list[str]:
        base = self._root / "telemetry"
        pattern = f"tenant_id={tenant_id}/day=*" if tenant_id else "tenant_id=*/day=*"
        found = []
        for path in sorted(base.glob(pattern)) if base.is_dir() else []:
            relative = path.relative_to(self._root).as_posix()
            if path.is_dir() and _is_day_dir(relative):
                found.append(relative)
        return found


class FsspecStore(filestore.FsspecStore, Store):
    def day_dirs(self, tenant_id: int | None = None) -> list[str]:
        pattern = f"tenant_id={tenant_id}/day=*" if tenant_id else "tenant_id=*/day=*"
        found = []
        for path in sorted(self.fs.glob(f"{self._base}/telemetry/{pattern}")):
            relative = path[len(self._base) + 1 :] if path.startswith(self._base) else path
            relative = relative.lstrip("/")
            if _is_day_dir(relative) and self.fs.isdir(path):
                found.append(relative)
        return found


def _is_day_dir(relative: str) -> bool:
    match = _DAY_DIR.match(relative)
    if not match:
        return False
    try:
        date.fromisoformat(match[2])
    except ValueError:
        return False
    return True


def open_store(root: str | Path) -> Store:
    """The store for IIOT_ARCHIVE_ROOT: a URL with a scheme goes to fsspec, anything else is a
    local directory."""
    text = str(root)
    if filestore.is_url(text):
        return FsspecStore(text, "IIOT_ARCHIVE_ROOT")
    return LocalStore(Path(text.removeprefix("file://")).expanduser())


# Writing and reading


@dataclass(frozen=True)
class Written:
    """An archive just published, with the digest of the rows it was written from."""

    manifest: Manifest
    source_digest: str


def write_archive(
    store: Store,
    tenant_id: int,
    tenant_slug: str,
    day: date,
    batches: Iterable[pa.RecordBatch | pa.Table],
) -> Written:
    """Write the rows (in canonical order) as the day's archive, then its manifest, both under
    temporary names renamed when complete; the manifest is written last, so a manifest always
    describes a complete file. Raises ArchiveError for an empty day."""
    digest = ContentDigest()
    devices: set[int] = set()
    min_ts: int | None = None
    max_ts: int | None = None
    relative = parquet_path(tenant_id, day)
    temporary, f = store.open_temporary(relative)
    try:
        with f, pq.ParquetWriter(f, SCHEMA, compression="zstd") as writer:
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                table = (
                    pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
                )
                table = table.cast(SCHEMA)
                digest.update(table)
                devices.update(table.column("device_id").unique().to_pylist())
                ts = table.column("ts").cast(pa.int64())
                low, high = pc.min(ts).as_py(), pc.max(ts).as_py()
                min_ts = low if min_ts is None else min(min_ts, low)
                max_ts = high if max_ts is None else max(max_ts, high)
                writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        if digest.rows == 0 or min_ts is None or max_ts is None:
            raise ArchiveError(f"tenant {tenant_id} has no readings on {day} to archive")
        store.publish(temporary, relative)
    except BaseException:
        store.discard(temporary)
        raise
    data = store.read_bytes(relative)
    manifest = Manifest(
        tenant_id=tenant_id,
        tenant_slug=tenant_slug,
        day=day,
        rows=digest.rows,
        devices=len(devices),
        min_ts=_from_micros(min_ts),
        max_ts=_from_micros(max_ts),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        content_sha256=digest.hexdigest(),
        created_at=datetime.now(UTC),
    )
    store.write_atomic(manifest.path, [manifest.to_json().encode()])
    return Written(manifest, digest.hexdigest())


def _from_micros(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


def load_manifest(store: Store, tenant_id: int, day: date) -> Manifest | None:
    """The day's manifest, None when there is none; ArchiveError when it is unreadable."""
    relative = manifest_path(tenant_id, day)
    if not store.exists(relative):
        return None
    text = store.read_bytes(relative, limit=MANIFEST_MAX_BYTES)
    try:
        manifest = Manifest.parse(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ArchiveError(f"{store.describe(relative)}: not UTF-8 text") from None
    except ArchiveError as exc:
        raise ArchiveError(f"{store.describe(relative)}: {exc}") from None
    if manifest.tenant_id != tenant_id or manifest.day != day:
        raise ArchiveError(
            f"{store.describe(relative)}: describes tenant {manifest.tenant_id} on "
            f"{manifest.day}, but lies in the directory of tenant {tenant_id} on {day}"
        )
    return manifest


@dataclass(frozen=True)
class ReadBack:
    """An archive read back and checked against its manifest."""

    manifest: Manifest
    table: pa.Table
    content_sha256: str


def read_archive(
    store: Store, manifest: Manifest, *, expected_sha256: str | None = None
) -> ReadBack:
    """Read the file, check its sha256 against the manifest (and the database record's
    ``expected_sha256``), its rows and their digest; CorruptArchive naming the file if not."""
    where = store.describe(manifest.parquet)
    data = store.read_bytes(manifest.parquet)
    actual = hashlib.sha256(data).hexdigest()
    if actual != manifest.sha256:
        raise CorruptArchive(
            f"{where} is corrupted: sha256 {actual[:12]}... ({len(data):,} bytes), its manifest "
            f"says {manifest.sha256[:12]}... ({manifest.bytes:,} bytes)"
        )
    if expected_sha256 is not None and expected_sha256 != manifest.sha256:
        raise CorruptArchive(
            f"{where}: its manifest says sha256 {manifest.sha256[:12]}..., the database recorded "
            f"{expected_sha256[:12]}... when it was archived"
        )
    try:
        table = pq.read_table(io.BytesIO(data), schema=SCHEMA)
    except (pa.ArrowException, OSError) as exc:
        raise CorruptArchive(f"{where} is not a readable Parquet file: {exc}") from None
    digest = ContentDigest()
    digest.update(table)
    if table.num_rows != manifest.rows or digest.hexdigest() != manifest.content_sha256:
        raise CorruptArchive(
            f"{where}: holds {table.num_rows:,} rows with content digest "
            f"{digest.hexdigest()[:12]}..., its manifest says {manifest.rows:,} rows, "
            f"{manifest.content_sha256[:12]}..."
        )
    return ReadBack(manifest, table, digest.hexdigest())


def iter_batches(table: pa.Table, size: int) -> Iterator[pa.Table]:
    for offset in range(0, table.num_rows, size):
        yield table.slice(offset, size)
