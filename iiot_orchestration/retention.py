"""Per-tenant retention of raw telemetry, usable without Dagster (docs/retention.md).

- ``run_retention``: for the run's day, every tenant's readings of the UTC days that fell out of
  its retention (its ``retention_days``, else its plan's) are archived (``archive``), read back
  and verified, and only then removed: the whole day's partition or chunk when no tenant needs it
  any more (``iiot_drop_telemetry_day``, which checks the archives itself), otherwise the
  tenant's archived rows by their keys, in bounded batches.
- ``restore``: archived days back into the raw table, after checking every file's checksum.
- ``remove_tenant``: archive a tenant's readings, remove them, then its data in dependency order.

Rows are only ever removed by the keys read back from a verified archive, each batch in the same
transaction as the archive record's ``deleted_rows``, so a run killed at any point leaves every
row either in the raw table or in a verified archive, and a re-run completes the work.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from iiot_orchestration import archive
from iiot_orchestration.archive import ArchiveError, CorruptArchive, Store
from iiot_orchestration.db import query
from iiot_orchestration.errors import IiotError
from iiot_orchestration.storage import storage_for

log = logging.getLogger(__name__)

DAY = timedelta(days=1)
DEFAULT_BATCH_ROWS = 50_000
MAX_RESTORE_DAYS = 3661
LOCK_KEY = 0x110_7_0016  # one retention run, restore or tenant removal at a time

SELECT_ROWS = """
SELECT tenant_id, device_id, metric, ts, value, received_at
  FROM telemetry
 WHERE tenant_id = %s AND ts >= %s AND ts < %s
 ORDER BY device_id, metric COLLATE "C", ts
"""

DAY_COUNTS = """
SELECT tenant_id, count(*) FROM telemetry WHERE ts >= %s AND ts < %s GROUP BY tenant_id
"""

# Only rows whose key and value are in the archive go, and the archive record counts them in
# the same statement: the raw table and the record can never disagree, whenever a run stops.
# Keys travel as binary arrays, times as microseconds since the epoch (exact below 2^53 us,
# the year 2255).
DELETE_BATCH = """
WITH gone AS (
    DELETE FROM telemetry t
     USING unnest(%(devices)b::integer[], %(metrics)b::text[], %(ts)b::bigint[],
                  %(values)b::float8[]) AS k(device_id, metric, ts_us, value)
     WHERE t.tenant_id = %(tenant)s AND t.ts >= %(start)s AND t.ts < %(end)s
       AND t.device_id = k.device_id AND t.metric = k.metric
       AND t.ts = timestamptz 'epoch' + k.ts_us * interval '1 microsecond'
       AND t.value = k.value
    RETURNING 1
), removed AS (SELECT count(*) AS n FROM gone)
UPDATE telemetry_archives a
   SET deleted_rows = a.deleted_rows + removed.n,
       deleted_at = CASE WHEN a.deleted_rows + removed.n = a.rows THEN now() END,
       deleted_by = CASE WHEN a.deleted_rows + removed.n = a.rows THEN %(how)s END
  FROM removed
 WHERE a.tenant_id = %(tenant)s AND a.day = %(day)s
RETURNING removed.n
"""

RECORD_ARCHIVE = """
INSERT INTO telemetry_archives AS a
    (tenant_id, day, tenant_slug, location, rows, devices, min_ts, max_ts, bytes, sha256,
     content_sha256, schema_version, verified_at)
VALUES (%(tenant_id)s, %(day)s, %(tenant_slug)s, %(location)s, %(rows)s, %(devices)s,
        %(min_ts)s, %(max_ts)s, %(bytes)s, %(sha256)s, %(content_sha256)s, %(schema_version)s,
        now())
ON CONFLICT (tenant_id, day) DO UPDATE
   SET location = excluded.location, rows = excluded.rows, devices = excluded.devices,
       min_ts = excluded.min_ts, max_ts = excluded.max_ts, bytes = excluded.bytes,
       sha256 = excluded.sha256, content_sha256 = excluded.content_sha256,
       schema_version = excluded.schema_version, verified_at = now(),
       deleted_at = NULL, deleted_by = NULL
RETURNING *
"""


class RetentionError(IiotError):
    """A retention run, restore or tenant removal cannot go on; the message says why."""


def day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, datetime.min.time(), UTC)
    return start, start + DAY


# Policies


@dataclass(frozen=True)
class TenantPolicy:
    tenant_id: int
    slug: str
    retention_days: int
    status: str

    def cutoff(self, run_day: date) -> date:
        """The oldest UTC day still retained by the run for ``run_day`` (the run happens after
        that day ended): readings of earlier days have fallen out of retention."""
        return run_day + DAY - timedelta(days=self.retention_days)


def policies(conn: psycopg.Connection) -> list[TenantPolicy]:
    """Every tenant not deleted, with its retention: its own override, else its plan's."""
    rows = conn.execute(
        "SELECT t.tenant_id, t.slug, coalesce(t.retention_days, p.retention_days), t.status"
        "  FROM tenants t JOIN plans p USING (plan_id)"
        " WHERE t.status <> 'deleted' ORDER BY t.tenant_id"
    ).fetchall()
    return [TenantPolicy(*row) for row in rows]


# Archive records


@dataclass(frozen=True)
class ArchiveRecord:
    tenant_id: int
    day: date
    tenant_slug: str
    location: str
    rows: int
    devices: int
    min_ts: datetime
    max_ts: datetime
    bytes: int
    sha256: str
    content_sha256: str
    schema_version: int
    archived_at: datetime
    verified_at: datetime
    deleted_rows: int
    deleted_at: datetime | None
    deleted_by: str | None
    restored_at: datetime | None
    hold_until: date | None

    @property
    def pending(self) -> int:
        """Archived rows that have not left the raw table yet."""
        return self.rows - self.deleted_rows


def records(
    conn: psycopg.Connection,
    tenant_id: int | None = None,
    first: date | None = None,
    last: date | None = None,
) -> list[ArchiveRecord]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT * FROM telemetry_archives"
            " WHERE (%(tenant)s::integer IS NULL OR tenant_id = %(tenant)s)"
            "   AND (%(first)s::date IS NULL OR day >= %(first)s)"
            "   AND (%(last)s::date IS NULL OR day <= %(last)s)"
            " ORDER BY tenant_id, day",
            {"tenant": tenant_id, "first": first, "last": last},
        ).fetchall()
    return [ArchiveRecord(**row) for row in rows]


def get_record(conn: psycopg.Connection, tenant_id: int, day: date) -> ArchiveRecord | None:
    found = records(conn, tenant_id, day, day)
    return found[0] if found else None


def _record(conn: psycopg.Connection, manifest: archive.Manifest) -> ArchiveRecord:
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            RECORD_ARCHIVE,
            {
                "tenant_id": manifest.tenant_id,
                "day": manifest.day,
                "tenant_slug": manifest.tenant_slug,
                "location": manifest.parquet,
                "rows": manifest.rows,
                "devices": manifest.devices,
                "min_ts": manifest.min_ts,
                "max_ts": manifest.max_ts,
                "bytes": manifest.bytes,
                "sha256": manifest.sha256,
                "content_sha256": manifest.content_sha256,
                "schema_version": manifest.schema_version,
            },
        ).fetchone()
    return ArchiveRecord(**row)


# Reading the raw rows


def raw_counts(conn: psycopg.Connection, day: date) -> dict[int, int]:
    """Raw readings of one UTC day per tenant (one pass over the day)."""
    return dict(conn.execute(DAY_COUNTS, day_bounds(day)).fetchall())


def _tenant_raw(conn: psycopg.Connection, tenant_id: int, day: date) -> int:
    start, end = day_bounds(day)
    return conn.execute(
        "SELECT count(*) FROM telemetry WHERE tenant_id = %s AND ts >= %s AND ts < %s",
        (tenant_id, start, end),
    ).fetchone()[0]


def _to_table(rows: list[tuple[Any, ...]]) -> pa.Table:
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in archive.COLUMNS]
    return pa.Table.from_arrays(
        [pa.array(values, type=f.type) for values, f in zip(columns, archive.SCHEMA, strict=True)],
        schema=archive.SCHEMA,
    )


def stream_rows(
    conn: psycopg.Connection, tenant_id: int, day: date, batch_rows: int
) -> Iterator[pa.Table]:
    """The tenant's readings of the day in canonical order, in batches, from one snapshot."""
    with conn.transaction(), conn.cursor(name=f"iiot_archive_{tenant_id}") as cur:
        cur.itersize = batch_rows
        cur.execute(SELECT_ROWS, (tenant_id, *day_bounds(day)))
        while rows := cur.fetchmany(batch_rows):
            yield _to_table(rows)


def _raw_table(conn: psycopg.Connection, tenant_id: int, day: date, batch_rows: int) -> pa.Table:
    tables = list(stream_rows(conn, tenant_id, day, batch_rows))
    return pa.concat_tables(tables) if tables else _to_table([])


def merge(existing: pa.Table, fresh: pa.Table) -> pa.Table:
    """The union of two sets of readings in canonical order; for a key in both, ``existing``."""
    combined = pa.concat_tables([existing.cast(archive.SCHEMA), fresh.cast(archive.SCHEMA)])
    combined = combined.append_column("_order", pa.array(np.arange(combined.num_rows)))
    ordered = combined.sort_by(
        [(name, "ascending") for name in (*archive.KEY_COLUMNS, "_order")]
    ).combine_chunks()
    if ordered.num_rows == 0:
        return ordered.drop_columns(["_order"])
    devices = ordered.column("device_id").to_numpy()
    metrics = np.asarray(ordered.column("metric").to_pylist(), dtype=object)
    ts = ordered.column("ts").cast(pa.int64()).to_numpy()
    keep = np.ones(ordered.num_rows, dtype=bool)
    keep[1:] = (devices[1:] != devices[:-1]) | (metrics[1:] != metrics[:-1]) | (ts[1:] != ts[:-1])
    return ordered.filter(pa.array(keep)).drop_columns(["_order"])


# Archiving one tenant's day


@dataclass(frozen=True)
class Ensured:
    """A verified archive of one tenant's day, recorded in the database."""

    record: ArchiveRecord
    action: str  # written, reused (it matched) or merged (late readings were added)
    raw: int  # the tenant's raw readings of the day when it was checked


def ensure_archive(
    conn: psycopg.Connection,
    store: Store,
    tenant_id: int,
    slug: str,
    day: date,
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Ensured | None:
    """Make sure every raw reading of the tenant's day is in a verified, recorded archive;
    None when the day has neither readings nor an archive. An archive that already matches is
    left alone; one that misses readings that landed later is rewritten with them (the union,
    so that rows already removed from the raw table stay archived). CorruptArchive when an
    existing file does not match its manifest or record: then nothing is touched."""
    record = get_record(conn, tenant_id, day)
    manifest = archive.load_manifest(store, tenant_id, day)
    raw = _tenant_raw(conn, tenant_id, day)
    if record is not None:
        if manifest is None:
            raise CorruptArchive(
                f"{store.describe(archive.manifest_path(tenant_id, day))}: missing, but the "
                f"database recorded an archive of {slug} on {day} (sha256 {record.sha256[:12]}...)"
            )
        existing = archive.read_archive(store, manifest, expected_sha256=record.sha256)
        if raw == record.pending:
            return Ensured(record, "reused", raw)
        if raw < record.pending:
            raise RetentionError(
                f"{slug} has {raw:,} raw readings on {day}, but {record.pending:,} archived "
                "ones were not removed yet: readings were deleted outside retention; find out "
                "why before removing more"
            )
    elif manifest is not None:
        # published but not recorded (a run stopped in between): keep what the file holds
        existing = archive.read_archive(store, manifest)
        fresh = _raw_table(conn, tenant_id, day, batch_rows)
        digest = archive.ContentDigest()
        digest.update(fresh)
        if digest.hexdigest() == manifest.content_sha256:
            return Ensured(_record(conn, manifest), "reused", raw)
    elif raw == 0:
        return None
    else:
        written = archive.write_archive(
            store, tenant_id, slug, day, stream_rows(conn, tenant_id, day, batch_rows)
        )
        _read_back(store, written)
        return Ensured(_record(conn, written.manifest), "written", raw)
    if record is not None:
        fresh = _raw_table(conn, tenant_id, day, batch_rows)
    union = merge(existing.table, fresh)
    written = archive.write_archive(store, tenant_id, slug, day, [union])
    _read_back(store, written)
    return Ensured(_record(conn, written.manifest), "merged", raw)


def _read_back(store: Store, written: archive.Written) -> None:
    back = archive.read_archive(store, written.manifest)
    if back.content_sha256 != written.source_digest or back.table.num_rows != written.manifest.rows:
        raise CorruptArchive(
            f"{store.describe(written.manifest.parquet)} does not read back the rows it was "
            "written from"
        )


def remove_archived(
    conn: psycopg.Connection,
    store: Store,
    record: ArchiveRecord,
    *,
    how: str,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> int:
    """Delete the raw rows of ``record``'s archive by their keys, ``batch_rows`` per
    transaction; returns how many were deleted now."""
    manifest = archive.load_manifest(store, record.tenant_id, record.day)
    if manifest is None:
        raise CorruptArchive(
            f"{store.describe(archive.manifest_path(record.tenant_id, record.day))}: missing"
        )
    table = archive.read_archive(store, manifest, expected_sha256=record.sha256).table
    start, end = day_bounds(record.day)
    removed = 0
    for batch in archive.iter_batches(table, batch_rows):
        with conn.transaction():
            # each key is a primary-key probe; a hash join would read the whole day per batch
            conn.execute("SET LOCAL enable_hashjoin = off")
            conn.execute("SET LOCAL enable_mergejoin = off")
            (n,) = conn.execute(
                DELETE_BATCH,
                {
                    "devices": batch.column("device_id").to_numpy().tolist(),
                    "metrics": batch.column("metric").to_pylist(),
                    "ts": batch.column("ts").cast(pa.int64()).to_numpy().tolist(),
                    "values": batch.column("value").to_numpy().tolist(),
                    "tenant": record.tenant_id,
                    "day": record.day,
                    "start": start,
                    "end": end,
                    "how": how,
                },
            ).fetchone()
        removed += n
    return removed


# The daily run


@dataclass
class TenantDay:
    tenant_id: int
    slug: str
    day: date
    action: str  # written, reused, merged, held, failed
    rows: int = 0  # rows in the archive
    removed: int = 0  # raw rows removed by this run
    error: str | None = None


@dataclass
class DayResult:
    day: date
    method: str  # partition, batches or none
    raw_before: int
    raw_after: int
    archived_removed: int  # growth of deleted_rows over the day's archives
    expired_left: int  # raw rows of tenants past their cutoff still there after the run


@dataclass
class RetentionRun:
    run_day: date
    cutoffs: dict[str, date]
    tenant_days: list[TenantDay] = field(default_factory=list)
    days: list[DayResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def corrupt(self) -> list[TenantDay]:
        return [t for t in self.tenant_days if t.action == "failed"]

    @property
    def archived_rows(self) -> int:
        return sum(t.rows for t in self.tenant_days if t.action in ("written", "merged"))

    @property
    def removed_rows(self) -> int:
        return sum(d.raw_before - d.raw_after for d in self.days)

    @property
    def partitions_dropped(self) -> list[date]:
        return [d.day for d in self.days if d.method == "partition"]

    @property
    def mismatched_days(self) -> list[DayResult]:
        """Days where the raw rows removed differ from the archived rows counted as removed."""
        return [d for d in self.days if d.raw_before - d.raw_after != d.archived_removed]

    def summary(self) -> str:
        return (
            f"retention for {self.run_day}: {len(self.tenant_days)} tenant-days, "
            f"{self.archived_rows:,} readings archived, {self.removed_rows:,} removed, "
            f"{len(self.partitions_dropped)} partitions dropped, "
            f"{len(self.corrupt)} failed, {len(self.problems)} problems"
        )


def _progress(conn: psycopg.Connection) -> dict[int, date]:
    return dict(conn.execute("SELECT tenant_id, archived_through FROM retention_progress"))


def _save_progress(conn: psycopg.Connection, tenant_id: int, through: date) -> None:
    conn.execute(
        "INSERT INTO retention_progress AS p (tenant_id, archived_through) VALUES (%s, %s)"
        " ON CONFLICT (tenant_id) DO UPDATE"
        " SET archived_through = excluded.archived_through, updated_at = now()",
        (tenant_id, through),
    )


def _deleted_rows(conn: psycopg.Connection, day: date) -> int:
    return conn.execute(
        "SELECT coalesce(sum(deleted_rows), 0)::bigint FROM telemetry_archives WHERE day = %s",
        (day,),
    ).fetchone()[0]


def plan_days(
    partition_days: list[date],
    tenants: list[TenantPolicy],
    progress: dict[int, date],
    pending: dict[int, set[date]],
    run_day: date,
) -> list[date]:
    """The UTC days a run must look at: for each tenant, the days from past its progress mark
    up to its cutoff, days whose archived readings are back in the raw table, and the days no
    tenant retains any more (their partition can go)."""
    if not partition_days:
        return sorted({d for days in pending.values() for d in days})
    oldest = partition_days[0]
    days: set[date] = set()
    for tenant in tenants:
        cutoff = tenant.cutoff(run_day)
        start = progress.get(tenant.tenant_id, oldest - DAY) + DAY
        days.update(d for d in partition_days if start <= d < cutoff)
        days.update(d for d in pending.get(tenant.tenant_id, ()) if d < cutoff)
    if tenants:
        everyone = min(t.cutoff(run_day) for t in tenants)
        days.update(d for d in partition_days if d < everyone)
    return sorted(days)


def run_retention(
    conn: psycopg.Connection,
    store: Store,
    run_day: date,
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> RetentionRun:
    """Archive, verify and remove every tenant's readings that fell out of retention by the
    end of ``run_day``. ``conn`` must be in autocommit mode (each step commits on its own).
    Problems with one tenant's day (a corrupted archive, rows of an unknown tenant) are
    reported and leave that day's rows in place; the rest goes on."""
    _require_autocommit(conn)
    with _exclusive(conn):
        tenants = policies(conn)
        by_id = {t.tenant_id: t for t in tenants}
        run = RetentionRun(run_day, {t.slug: t.cutoff(run_day) for t in tenants})
        progress = _progress(conn)
        held: set[tuple[int, date]] = set()
        pending: dict[int, set[date]] = {}
        for record in records(conn):
            if record.hold_until is not None and record.hold_until > run_day:
                held.add((record.tenant_id, record.day))
            elif record.deleted_at is None:
                pending.setdefault(record.tenant_id, set()).add(record.day)
        everyone = min((t.cutoff(run_day) for t in tenants), default=None)
        failed: dict[int, date] = {}
        storage = storage_for(conn)
        for day in plan_days(storage.partition_days(conn), tenants, progress, pending, run_day):
            _run_day(conn, store, run, day, by_id, held, pending, everyone, failed, batch_rows)
        for tenant in tenants:
            # everything before the cutoff is clean now; a longer retention moves the mark back,
            # since readings may land again in the days it covers
            cutoff = tenant.cutoff(run_day)
            _save_progress(conn, tenant.tenant_id, failed.get(tenant.tenant_id, cutoff) - DAY)
    log.info(run.summary())
    return run


def _run_day(
    conn: psycopg.Connection,
    store: Store,
    run: RetentionRun,
    day: date,
    by_id: dict[int, TenantPolicy],
    held: set[tuple[int, date]],
    pending: dict[int, set[date]],
    everyone: date | None,
    failed: dict[int, date],
    batch_rows: int,
) -> None:
    counts = raw_counts(conn, day)
    deleted_before = _deleted_rows(conn, day)
    candidates = set(counts) | {t for t, days in pending.items() if day in days}
    archived: list[ArchiveRecord] = []
    blocked = False
    for tenant_id in sorted(candidates):
        tenant = by_id.get(tenant_id)
        if tenant is None:
            run.problems.append(
                f"{counts.get(tenant_id, 0):,} readings of tenant id {tenant_id} on {day} have "
                "no retention policy (no such tenant, or deleted): kept"
            )
            blocked = True
            continue
        if day >= tenant.cutoff(run.run_day):
            blocked = True  # the tenant still retains the day: its rows stay
            continue
        if (tenant_id, day) in held:
            run.tenant_days.append(TenantDay(tenant_id, tenant.slug, day, "held"))
            blocked = True
            continue
        try:
            ensured = ensure_archive(
                conn, store, tenant_id, tenant.slug, day, batch_rows=batch_rows
            )
        except (ArchiveError, RetentionError) as exc:
            run.tenant_days.append(TenantDay(tenant_id, tenant.slug, day, "failed", error=str(exc)))
            run.problems.append(str(exc))
            failed.setdefault(tenant_id, day)
            blocked = True
            log.error("archive of %s on %s failed: %s", tenant.slug, day, exc)
            continue
        if ensured is None:
            continue
        archived.append(ensured.record)
        run.tenant_days.append(
            TenantDay(tenant_id, tenant.slug, day, ensured.action, ensured.record.rows)
        )
    method = "none"
    if not blocked and everyone is not None and day < everyone:
        try:
            drop_day(conn, day)
            method = "partition"
        except psycopg.Error as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            run.problems.append(f"{day}: whole-day removal refused ({reason}); removing by rows")
    if method == "none" and archived:
        method = "batches"
        for record in archived:
            try:
                remove_archived(conn, store, record, how="batches", batch_rows=batch_rows)
            except ArchiveError as exc:  # the file changed since it was verified
                run.problems.append(str(exc))
                failed.setdefault(record.tenant_id, day)
    after = raw_counts(conn, day) if method != "partition" else {}
    removed_now = {t: counts.get(t, 0) - after.get(t, 0) for t in counts}
    for item in run.tenant_days:
        if item.day == day:
            item.removed = removed_now.get(item.tenant_id, 0)
    expired_left = sum(
        n
        for t, n in after.items()
        if t in by_id and day < by_id[t].cutoff(run.run_day) and (t, day) not in held
    )
    run.days.append(
        DayResult(
            day,
            method,
            sum(counts.values()),
            sum(after.values()),
            _deleted_rows(conn, day) - deleted_before,
            expired_left,
        )
    )


def drop_day(conn: psycopg.Connection, day: date) -> int:
    """Remove the whole UTC day (its partition or chunk); the database function refuses unless
    every row in it is archived and no tenant retains the day. Partitions or chunks dropped."""
    with conn.transaction():
        return conn.execute("SELECT iiot_drop_telemetry_day(%s)", (day,)).fetchone()[0]


def _require_autocommit(conn: psycopg.Connection) -> None:
    if not conn.autocommit:
        raise ValueError("retention needs a connection in autocommit mode")


class _exclusive:
    """Session advisory lock: one retention run, restore or tenant removal at a time."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        (locked,) = self.conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
        if not locked:
            raise RetentionError(
                "another retention run, restore or tenant removal is working on this database; "
                "try again when it has finished"
            )

    def __exit__(self, *exc: object) -> None:
        self.conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


# Checks over everything recorded


def expired_readings(conn: psycopg.Connection, run_day: date) -> dict[str, int]:
    """Raw readings older than their tenant's retention after the run for ``run_day`` (held
    restored days excepted), per tenant slug; one pass over the days before the latest cutoff."""
    rows = conn.execute(
        "WITH cutoff AS ("
        "  SELECT t.tenant_id, t.slug,"
        "         %(day)s::date + 1 - coalesce(t.retention_days, p.retention_days) AS first_day"
        "    FROM tenants t JOIN plans p USING (plan_id) WHERE t.status <> 'deleted'),"
        " expired AS ("
        "  SELECT x.tenant_id, (x.ts AT TIME ZONE 'UTC')::date AS day, count(*) AS n"
        "    FROM telemetry x JOIN cutoff c USING (tenant_id)"
        "   WHERE x.ts < (SELECT max(first_day) FROM cutoff)::timestamp AT TIME ZONE 'UTC'"
        "     AND x.ts < c.first_day::timestamp AT TIME ZONE 'UTC'"
        "   GROUP BY 1, 2)"
        " SELECT c.slug, sum(e.n)::bigint FROM expired e JOIN cutoff c USING (tenant_id)"
        "  WHERE NOT EXISTS (SELECT 1 FROM telemetry_archives a WHERE a.tenant_id = e.tenant_id"
        "                       AND a.day = e.day AND a.hold_until > %(day)s)"
        "  GROUP BY c.slug ORDER BY c.slug",
        {"day": run_day},
    ).fetchall()
    return dict(rows)


@dataclass(frozen=True)
class Verification:
    checked: int
    problems: list[str]


def verify_archives(
    conn: psycopg.Connection,
    store: Store,
    tenant_id: int | None = None,
    first: date | None = None,
    last: date | None = None,
) -> Verification:
    """Read every recorded archive (of one tenant, between two days) back: the file's sha256
    against its manifest and the record, its rows and their digest against the manifest."""
    problems: list[str] = []
    found = records(conn, tenant_id, first, last)
    for record in found:
        try:
            manifest = archive.load_manifest(store, record.tenant_id, record.day)
            if manifest is None:
                raise CorruptArchive(
                    f"{store.describe(archive.manifest_path(record.tenant_id, record.day))}: "
                    "missing"
                )
            archive.read_archive(store, manifest, expected_sha256=record.sha256)
            if manifest.rows != record.rows or manifest.content_sha256 != record.content_sha256:
                raise CorruptArchive(
                    f"{store.describe(manifest.path)}: {manifest.rows:,} rows, the database "
                    f"recorded {record.rows:,}"
                )
        except ArchiveError as exc:
            problems.append(str(exc))
    return Verification(len(found), problems)


# Compression (TimescaleDB mode)

COMPRESSION_OFF = (
    "columnstore is not enabled on telemetry, so no chunk is compressed: migrations enable it "
    "in TimescaleDB mode and someone turned it off; the schema owner turns it on again "
    "(docs/retention.md, Compression)"
)


@dataclass(frozen=True)
class CompressionStatus:
    mode: str
    enabled: bool
    compressed_chunks: int = 0
    uncompressed_chunks: int = 0
    reason: str = ""


def compression_status(conn: psycopg.Connection) -> CompressionStatus:
    """Whether raw telemetry is compressed here (columnstore enabled), and how many chunks are."""
    mode = storage_for(conn).mode
    if mode != "timescale":
        return CompressionStatus(mode, False, reason="PostgreSQL mode has no chunk compression")
    (enabled,) = conn.execute(
        "SELECT coalesce(bool_or(compression_enabled), false)"
        "  FROM timescaledb_information.hypertables WHERE hypertable_name = 'telemetry'"
    ).fetchone()
    compressed, uncompressed = conn.execute(
        "SELECT count(*) FILTER (WHERE is_compressed), count(*) FILTER (WHERE NOT is_compressed)"
        "  FROM timescaledb_information.chunks WHERE hypertable_name = 'telemetry'"
    ).fetchone()
    return CompressionStatus(
        mode, enabled, compressed, uncompressed, "" if enabled else COMPRESSION_OFF
    )


def compress_chunks(conn: psycopg.Connection, older_than: datetime, limit: int) -> list[str]:
    """Compress up to ``limit`` telemetry chunks that ended before ``older_than``, oldest
    first; the chunks compressed."""
    with conn.transaction():
        rows = conn.execute(
            "SELECT iiot_compress_telemetry_chunks(%s, %s)", (older_than, limit)
        ).fetchall()
    return [r[0] for r in rows]


# Restore


@dataclass(frozen=True)
class RestoredDay:
    day: date
    rows: int  # rows in the archive
    inserted: int  # rows that were not in the raw table and were put back


def _tenant(conn: psycopg.Connection, slug: str) -> tuple[int, str, str]:
    row = conn.execute(
        "SELECT tenant_id, slug, status FROM tenants WHERE slug = %s", (slug,)
    ).fetchone()
    if row is None:
        raise RetentionError(f"unknown tenant {slug[:70]!r}: `iiot tenants list` shows the tenants")
    return row


def restore(
    conn: psycopg.Connection,
    store: Store,
    slug: str,
    first: date,
    last: date,
    *,
    hold_days: int = 7,
    actor: str = "cli",
    today: date | None = None,
) -> list[RestoredDay]:
    """Load the tenant's archived days from ``first`` to ``last`` back into the raw table.
    Every archive is checked first (file sha256 against its manifest and the database record,
    rows against the manifest); any mismatch refuses the whole restore before anything is
    loaded. Idempotent: rows already there are skipped. Restored days are held: retention
    leaves them in the raw table until ``hold_days`` after today."""
    _require_autocommit(conn)
    if last < first:
        raise RetentionError(f"the range ends ({last}) before it starts ({first})")
    if (last - first).days + 1 > MAX_RESTORE_DAYS:
        raise RetentionError(f"a restore covers at most {MAX_RESTORE_DAYS} days")
    today = today or datetime.now(UTC).date()
    with _exclusive(conn):
        tenant_id, slug, status = _tenant(conn, slug)
        if status == "deleted":
            raise RetentionError(
                f"tenant {slug} is deleted: read its archives with a Parquet reader instead "
                "(docs/retention.md)"
            )
        known = {r.day: r for r in records(conn, tenant_id, first, last)}
        days = sorted(
            set(known)
            | {
                date.fromisoformat(d.rsplit("=", 1)[1])
                for d in store.day_dirs(tenant_id)
                if first.isoformat() <= d.rsplit("=", 1)[1] <= last.isoformat()
            }
        )
        if not days:
            raise RetentionError(f"no archives of {slug} from {first} to {last} under {store.root}")
        loaded: list[tuple[date, archive.ReadBack]] = []
        for day in days:
            manifest = archive.load_manifest(store, tenant_id, day)
            if manifest is None:
                raise CorruptArchive(
                    f"{store.describe(archive.manifest_path(tenant_id, day))}: missing, but the "
                    f"database recorded an archive of {slug} on {day}"
                )
            record = known.get(day)
            loaded.append(
                (
                    day,
                    archive.read_archive(store, manifest, expected_sha256=record and record.sha256),
                )
            )
        storage = storage_for(conn)
        hold = today + timedelta(days=hold_days)
        restored = []
        for day, back in loaded:
            with conn.transaction():
                storage.ensure_partitions(conn, day, day)
                inserted = _insert(conn, tenant_id, back.table)
                if day not in known:
                    _record_restored(conn, back.manifest)
                conn.execute(
                    "UPDATE telemetry_archives SET deleted_rows = 0, deleted_at = NULL,"
                    " deleted_by = NULL, restored_at = now(),"
                    " hold_until = greatest(hold_until, %s)"
                    " WHERE tenant_id = %s AND day = %s",
                    (hold, tenant_id, day),
                )
            restored.append(RestoredDay(day, back.manifest.rows, inserted))
        with conn.transaction():
            _audit(
                conn,
                actor=actor,
                action="archive.restored",
                entity="tenant",
                entity_id=slug,
                tenant_id=tenant_id,
                detail={
                    "from": first.isoformat(),
                    "to": last.isoformat(),
                    "days": [r.day.isoformat() for r in restored],
                    "rows": sum(r.rows for r in restored),
                    "inserted": sum(r.inserted for r in restored),
                    "hold_until": hold.isoformat(),
                },
            )
    return restored


def _record_restored(conn: psycopg.Connection, manifest: archive.Manifest) -> None:
    """An archive found on disk whose record the database lost (restored from an old backup)."""
    conn.execute(
        RECORD_ARCHIVE,
        {
            "tenant_id": manifest.tenant_id,
            "day": manifest.day,
            "tenant_slug": manifest.tenant_slug,
            "location": manifest.parquet,
            "rows": manifest.rows,
            "devices": manifest.devices,
            "min_ts": manifest.min_ts,
            "max_ts": manifest.max_ts,
            "bytes": manifest.bytes,
            "sha256": manifest.sha256,
            "content_sha256": manifest.content_sha256,
            "schema_version": manifest.schema_version,
        },
    )


RESTORE_BATCH = """
INSERT INTO telemetry (tenant_id, device_id, metric, ts, value, received_at)
SELECT %(tenant)s, k.device_id, k.metric, timestamptz 'epoch' + k.ts_us * interval '1 microsecond',
       k.value, timestamptz 'epoch' + k.received_us * interval '1 microsecond'
  FROM unnest(%(devices)b::integer[], %(metrics)b::text[], %(ts)b::bigint[], %(values)b::float8[],
              %(received)b::bigint[]) AS k(device_id, metric, ts_us, value, received_us)
ON CONFLICT DO NOTHING
"""


def _insert(conn: psycopg.Connection, tenant_id: int, table: pa.Table) -> int:
    """Put archived rows back; rows already in the raw table are skipped."""
    inserted = 0
    for batch in archive.iter_batches(table, DEFAULT_BATCH_ROWS):
        inserted += conn.execute(
            RESTORE_BATCH,
            {
                "tenant": tenant_id,
                "devices": batch.column("device_id").to_numpy().tolist(),
                "metrics": batch.column("metric").to_pylist(),
                "ts": batch.column("ts").cast(pa.int64()).to_numpy().tolist(),
                "values": batch.column("value").to_numpy().tolist(),
                "received": batch.column("received_at").cast(pa.int64()).to_numpy().tolist(),
            },
        ).rowcount
    return inserted


def _audit(conn: psycopg.Connection, **entry: Any) -> None:
    entry["detail"] = Jsonb(entry.get("detail") or {})
    entry["entity_id"] = None if entry.get("entity_id") is None else str(entry["entity_id"])
    conn.execute(query("insert_audit"), entry)


# Tenant removal


# The tenant's rows, in the order they can go: what refers to something comes before it.
# Kept on purpose: tenants (status 'deleted'; invoices and the plan history refer to it),
# invoices, invoice lines, billing usage, adjustments and events (fiscal records),
# tenant_plan_history, ingest_usage and its summaries, the audit log, telemetry_archives (the
# archive is the tenant's data now), and devices that have certificates (decommissioned, their
# certificates revoked: the CRL is built from them).
REMOVAL_STEPS: tuple[tuple[str, str], ...] = (
    ("alerts", "DELETE FROM alerts WHERE tenant_id = %(tenant)s"),
    ("alert_rules", "DELETE FROM alert_rules WHERE tenant_id = %(tenant)s"),
    ("dead_letters", "DELETE FROM dead_letters WHERE tenant_id = %(tenant)s"),
    ("dirty_windows", "DELETE FROM dirty_windows WHERE tenant_id = %(tenant)s"),
    ("dirty_window_devices", "DELETE FROM dirty_window_devices WHERE tenant_id = %(tenant)s"),
    ("rollup_stale_days", "DELETE FROM rollup_stale_days WHERE tenant_id = %(tenant)s"),
    ("telemetry_hourly", "DELETE FROM telemetry_hourly WHERE tenant_id = %(tenant)s"),
    ("telemetry_daily", "DELETE FROM telemetry_daily WHERE tenant_id = %(tenant)s"),
    ("device_metrics", "DELETE FROM device_metrics WHERE tenant_id = %(tenant)s"),
    (
        "device_certificates",
        "UPDATE device_certificates SET status = 'revoked', revoked_at = now(),"
        " revocation_reason = 'cessationOfOperation: tenant deleted'"
        " WHERE tenant_id = %(tenant)s AND status IN ('active', 'pending')",
    ),
    (
        "devices",
        "DELETE FROM devices d WHERE d.tenant_id = %(tenant)s AND NOT EXISTS"
        " (SELECT 1 FROM device_certificates c WHERE c.device_id = d.device_id)",
    ),
    (
        "devices_decommissioned",
        "UPDATE devices SET status = 'decommissioned'"
        " WHERE tenant_id = %(tenant)s AND status <> 'decommissioned'",
    ),
    (
        "tenants",
        "UPDATE tenants SET status = 'deleted', deleted_at = now() WHERE tenant_id = %(tenant)s",
    ),
)
KEPT_TABLES = (
    "tenants",
    "tenant_plan_history",
    "invoices",
    "invoice_lines",
    "billing_daily_usage",
    "billing_adjustments",
    "billing_events",
    "ingest_usage",
    "ingest_usage_tenant_hours",
    "ingest_usage_device_days",
    "audit_log",
    "telemetry_archives",
    "retention_progress",
    "device_certificates",
    "devices",
    "certificate_renewals",
    "certificate_acks",
)


@dataclass
class Removal:
    slug: str
    tenant_id: int
    days: list[Ensured] = field(default_factory=list)
    removed_readings: int = 0
    steps: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False


def _existing(conn: psycopg.Connection, table: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]


def _step_sql(conn: psycopg.Connection, name: str, statement: str) -> str | None:
    table = name.split("_decommissioned")[0]
    if not _existing(conn, table):
        return None
    if (
        name == "device_certificates"
        and conn.execute(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns"
            " WHERE table_name = 'device_certificates' AND column_name = 'revocation_code')"
        ).fetchone()[0]
    ):
        statement = statement.replace(
            "revoked_at = now(),", "revoked_at = now(), revocation_code = 'cessationOfOperation',"
        )
    return statement


def tenant_days(conn: psycopg.Connection, tenant_id: int) -> list[date]:
    """UTC days with raw readings of the tenant, or archived readings not yet removed."""
    rows = conn.execute(
        "SELECT DISTINCT (ts AT TIME ZONE 'UTC')::date FROM telemetry WHERE tenant_id = %(t)s"
        " UNION SELECT day FROM telemetry_archives WHERE tenant_id = %(t)s AND deleted_at IS NULL"
        " ORDER BY 1",
        {"t": tenant_id},
    ).fetchall()
    return [r[0] for r in rows]


def remove_tenant(
    conn: psycopg.Connection,
    store: Store,
    slug: str,
    *,
    actor: str = "cli",
    batch_rows: int = DEFAULT_BATCH_ROWS,
    dry_run: bool = False,
) -> Removal:
    """Delete tenant ``slug``: suspend it (ingest refuses its readings from then on), archive
    and verify all its raw readings, remove them, then remove its data in dependency order in
    one transaction, and mark it deleted. Every step is in the audit log. A run that stops
    half-way can be run again; it goes on where it stopped."""
    _require_autocommit(conn)
    with _exclusive(conn):
        tenant_id, slug, status = _tenant(conn, slug)
        if status == "deleted":
            raise RetentionError(f"tenant {slug} is already deleted")
        removal = Removal(slug, tenant_id, dry_run=dry_run)
        days = tenant_days(conn, tenant_id)
        if dry_run:
            removal.steps = _dry_run_counts(conn, tenant_id)
            removal.steps["telemetry"] = conn.execute(
                "SELECT count(*) FROM telemetry WHERE tenant_id = %s", (tenant_id,)
            ).fetchone()[0]
            return removal
        with conn.transaction():
            conn.execute(
                "UPDATE tenants SET status = 'suspended' WHERE tenant_id = %s", (tenant_id,)
            )
            _audit(
                conn,
                actor=actor,
                action="tenant.deletion_started",
                entity="tenant",
                entity_id=slug,
                tenant_id=tenant_id,
                detail={"days": len(days), "previous_status": status},
            )
        for day in days:
            ensured = ensure_archive(conn, store, tenant_id, slug, day, batch_rows=batch_rows)
            if ensured is None:
                continue
            removal.days.append(ensured)
            removal.removed_readings += remove_archived(
                conn, store, ensured.record, how="tenant_removal", batch_rows=batch_rows
            )
        left = conn.execute(
            "SELECT count(*) FROM telemetry WHERE tenant_id = %s", (tenant_id,)
        ).fetchone()[0]
        if left:
            raise RetentionError(
                f"{left:,} readings of {slug} landed while it was being removed; run the "
                "command again"
            )
        with conn.transaction():
            for name, statement in REMOVAL_STEPS:
                sql = _step_sql(conn, name, statement)
                if sql is not None:
                    removal.steps[name] = conn.execute(sql, {"tenant": tenant_id}).rowcount
            _audit(
                conn,
                actor=actor,
                action="tenant.deleted",
                entity="tenant",
                entity_id=slug,
                tenant_id=tenant_id,
                detail={
                    "archived_days": len(removal.days),
                    "archived_readings": sum(e.record.rows for e in removal.days),
                    "removed_readings": removal.removed_readings,
                    "steps": removal.steps,
                    "kept": list(KEPT_TABLES),
                },
            )
    return removal


def _dry_run_counts(conn: psycopg.Connection, tenant_id: int) -> dict[str, int]:
    """Rows of the tenant in each table the removal touches."""
    counts: dict[str, int] = {}
    for name, _ in REMOVAL_STEPS:
        table = name.split("_decommissioned")[0]
        if table in counts or not _existing(conn, table):
            continue
        counts[table] = conn.execute(
            f"SELECT count(*) FROM {table} WHERE tenant_id = %s", (tenant_id,)
        ).fetchone()[0]
    return counts
