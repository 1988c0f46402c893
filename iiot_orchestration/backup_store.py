"""Backups under a remote ``IIOT_BACKUP_ROOT`` (an fsspec URL such as ``s3://bucket/prefix``,
filestore.py); backups.py calls in here when its root is a URL and keeps its local code as is.

The layout is the local one, ``<root>/<database>/<backup id>/{database.dump,manifest.json}``:

- taking a backup: ``pg_dump`` writes to a local staging directory as it does under a local root
  (it needs a seekable file no more than the local code does, but a temporary directory of the
  dump's size), then the dump is uploaded and the manifest last, each through a temporary object;
  a folder without its manifest is not a backup (an upload under way, or interrupted);
- listing reads only the manifests; verifying a checksum streams the dump through sha256;
- restoring, the drill and ``pg_restore --list`` work on a downloaded copy of the backup in a
  temporary directory, removed when the Backup object is no longer used;
- rotation deletes a backup's manifest first (so it is never listed half-deleted), then the
  rest; folders without a manifest whose newest object is older than a day go too.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from iiot_orchestration import backups as b
from iiot_orchestration import filestore

ROOT_VARIABLE = "IIOT_BACKUP_ROOT"


def open_store(root: str | Path) -> filestore.Store:
    return filestore.open_root(root, ROOT_VARIABLE, b.BackupError)


def _folder(database: str) -> str:
    return str(b.database_dir(Path(), database))


def load(store: filestore.Store, database: str, backup_id: str) -> b.Backup:
    """The backup ``backup_id`` of ``database`` from its manifest; ManifestError when unsound."""
    relative = f"{_folder(database)}/{backup_id}/{b.MANIFEST_FILE}"
    try:
        text = store.read_bytes(relative, limit=b.MANIFEST_MAX_BYTES).decode("utf-8")
    except b.BackupError as exc:
        raise b.ManifestError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise b.ManifestError(f"{store.describe(relative)}: cannot be read: {exc}") from None
    manifest = b.checked_manifest(text, store.describe(relative), backup_id, database)
    return b.Backup(f"{store.root}/{_folder(database)}/{backup_id}", manifest)


def list_backups(root: str, database: str) -> tuple[list[b.Backup], list[str]]:
    store = open_store(root)
    folder = _folder(database)
    found, problems = [], []
    for name in store.listdir(folder):
        if name.startswith("."):
            continue
        if not b.BACKUP_ID.match(name) or not store.isdir(f"{folder}/{name}"):
            problems.append(
                f"{store.describe(f'{folder}/{name}')}: not a backup directory (ignored)"
            )
            continue
        try:
            found.append(load(store, database, name))
        except b.ManifestError as exc:
            problems.append(str(exc))
    found.sort(key=lambda x: (x.manifest.started_at, x.backup_id))
    return found, problems


def find_backup(root: str, database: str, backup_id: str | None) -> b.Backup:
    """The named (or newest) backup, downloaded to a local temporary directory."""
    store = open_store(root)
    if backup_id in (None, "latest"):
        found, _ = list_backups(root, database)
        if not found:
            raise b.BackupError(
                f"no backup of database {database} under {store.describe(_folder(database))}: "
                "run `iiot backup run` first"
            )
        remote = found[-1]
    else:
        if not b.BACKUP_ID.match(backup_id):
            raise b.BackupError(
                f"{backup_id[:40]!r} is not a backup id (YYYYMMDDTHHMMSSZ, see `iiot backup list`)"
            )
        if not store.isdir(f"{_folder(database)}/{backup_id}"):
            raise b.BackupError(
                f"no backup {backup_id} of database {database} under "
                f"{store.describe(_folder(database))}"
            )
        remote = load(store, database, backup_id)
    return download(store, remote)


def download(store: filestore.Store, remote: b.Backup) -> b.Backup:
    scratch = Path(tempfile.mkdtemp(prefix="iiot-backup-"))
    local = scratch / remote.backup_id
    local.mkdir()
    relative = f"{_folder(remote.manifest.database)}/{remote.backup_id}"
    try:
        for name in (b.DUMP_FILE, b.MANIFEST_FILE):
            with store.local_copy(f"{relative}/{name}") as copy:
                shutil.move(copy, local / name)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    backup = b.Backup(local, remote.manifest)
    weakref.finalize(backup, shutil.rmtree, scratch, True)
    return backup


def checksum(backup: b.Backup) -> tuple[str, int]:
    """(sha256, bytes) of a remote backup's dump, streamed."""
    return open_store(str(backup.path)).sha256(b.DUMP_FILE)


@contextmanager
def local_dump(backup: b.Backup) -> Iterator[Path]:
    """The dump as a local file: itself under a local root, a temporary download otherwise."""
    with filestore.local_file(backup.dump_path, ROOT_VARIABLE) as path:
        yield path


def take_backup(
    database_url: str,
    root: str,
    *,
    client: b.Client | None,
    clock: Callable[[], datetime],
) -> b.Backup:
    database = b.database_of(database_url)
    store = open_store(root)
    with tempfile.TemporaryDirectory(prefix="iiot-backup-") as stage:
        local = b.take_backup(database_url, Path(stage), client=client, clock=clock)
        relative = f"{_folder(database)}/{local.backup_id}"
        try:
            if store.exists(relative):
                raise b.BackupError(f"{store.describe(relative)} exists already")
            store.upload(local.dump_path, f"{relative}/{b.DUMP_FILE}")
            store.upload(local.path / b.MANIFEST_FILE, f"{relative}/{b.MANIFEST_FILE}")
        except (b.BackupError, OSError) as exc:
            store.remove(relative)
            raise b.BackupFailed(
                f"backup {local.backup_id} of {database} could not be uploaded to "
                f"{store.describe(relative)}: {exc}; earlier backups are untouched",
                local.backup_id,
                local.manifest.started_at,
            ) from exc
    return b.Backup(f"{store.root}/{relative}", local.manifest)


def delete(
    root: str, database: str, doomed: Sequence[str], clock: Callable[[], datetime]
) -> list[str]:
    """Delete backups (manifest first), then folders left without a manifest for a day."""
    store = open_store(root)
    folder = _folder(database)
    deleted = []
    for backup_id in doomed:
        try:
            store.remove(f"{folder}/{backup_id}/{b.MANIFEST_FILE}")  # never listed half-deleted
            store.remove(f"{folder}/{backup_id}")
        except OSError as exc:
            b.log.warning("rotation could not delete backup %s: %s", backup_id, exc)
            continue
        deleted.append(backup_id)
    limit = clock() - b.STALE_PARTIAL
    for name in store.listdir(folder):
        relative = f"{folder}/{name}"
        if not b.BACKUP_ID.match(name) or store.exists(f"{relative}/{b.MANIFEST_FILE}"):
            continue
        try:
            objects = store.fs.find(store._path(relative), detail=True).values()
            newest = max((_modified(o) for o in objects), default=None)
        except OSError:
            continue
        if newest is not None and newest < limit:
            store.remove(relative)
    return deleted


def _modified(info: dict) -> datetime:
    value = info.get("LastModified") or info.get("mtime") or info.get("created")
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromtimestamp(float(value or 0), UTC)
