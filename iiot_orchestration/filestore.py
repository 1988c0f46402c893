"""Storage roots: a local directory or an fsspec URL (``s3://bucket/prefix``), behind one interface.

Every root that holds files the platform writes goes through here: telemetry archives
(``IIOT_ARCHIVE_ROOT``, archive.py), reports and invoice files (``IIOT_REPORTS_ROOT``), backups and
their manifests (``IIOT_BACKUP_ROOT``), and the PKI's CRL and broker files (``IIOT_PKI_DIR``).
A value with a URL scheme (other than ``file://``) is an fsspec file system; anything else is a
local directory, handled with plain file operations exactly as before. S3 needs the
``archive-s3`` extra (s3fs); its endpoint, region and credentials come from the usual AWS
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) read by botocore (docs/operations.md,
"Storage roots").

Files are written under a temporary name beside the final one and then renamed (a local
``os.replace``; on object storage a copy and delete of one object), so a reader never sees half
a file under its final name.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO

from iiot_orchestration.errors import IiotError

CHUNK = 1024 * 1024
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class StoreError(IiotError):
    """A file under a storage root cannot be written, found or read; the message names it."""


def is_url(root: str | Path) -> bool:
    """Whether ``root`` names an fsspec file system rather than a local directory."""
    text = str(root)
    return bool(_SCHEME.match(text)) and not text.startswith("file://")


def join(root: str | Path, *parts: str) -> str | Path:
    """``root/parts``: a Path for a local root (as the code always had), a URL string otherwise."""
    if is_url(root):
        return "/".join([str(root).rstrip("/"), *parts])
    return Path(str(root).removeprefix("file://")).joinpath(*parts)


class Store:
    """Where files live: a local directory or an fsspec file system, behind one interface."""

    root: str
    remote: bool = False
    error: type[Exception] = StoreError

    def describe(self, relative: str) -> str:
        return f"{self.root.rstrip('/')}/{relative}"

    def read_bytes(self, relative: str, limit: int | None = None) -> bytes:
        raise NotImplementedError

    def exists(self, relative: str) -> bool:
        raise NotImplementedError

    def isdir(self, relative: str) -> bool:
        raise NotImplementedError

    def size(self, relative: str) -> int:
        raise NotImplementedError

    def listdir(self, relative: str = "") -> list[str]:
        """Names in the folder ``relative`` (files and folders), sorted; [] when it is absent."""
        raise NotImplementedError

    def remove(self, relative: str) -> None:
        """Delete a file or a whole folder; nothing when it is absent."""
        raise NotImplementedError

    def open_read(self, relative: str) -> BinaryIO:
        raise NotImplementedError

    def stat(self, relative: str) -> tuple[int, datetime] | None:
        """(bytes, modification time in UTC) of a file; None when it is absent or a folder."""
        raise NotImplementedError

    def files(self, relative: str = "") -> dict[str, tuple[int, datetime]]:
        """Every file under the folder ``relative`` (at any depth), keyed by its name relative to
        the root, with what ``stat`` gives; {} when the folder is absent."""
        raise NotImplementedError

    def stream(self, relative: str, size: int = CHUNK) -> tuple[int, Iterator[bytes]]:
        """(bytes, the file's content in pieces of at most ``size``), for sending it on. The file
        is opened here: an absent one raises FileNotFoundError and an unreadable one this store's
        error before any piece is read, and the length is the opened file's."""
        f, length = self._open_sized(relative, size)

        def pieces() -> Iterator[bytes]:
            with f:
                while piece := f.read(size):
                    yield piece

        return length, pieces()

    def _open_sized(self, relative: str, size: int) -> tuple[BinaryIO, int]:
        raise NotImplementedError

    def open_temporary(self, relative: str) -> tuple[str, BinaryIO]:
        raise NotImplementedError

    def publish(self, temporary: str, relative: str) -> None:
        raise NotImplementedError

    def discard(self, temporary: str) -> None:
        raise NotImplementedError

    def write_atomic(self, relative: str, chunks: Iterable[bytes]) -> None:
        """Write ``chunks`` to a temporary name beside ``relative``, then rename it."""
        temporary, f = self.open_temporary(relative)
        try:
            with f:
                for chunk in chunks:
                    f.write(chunk)
            self.publish(temporary, relative)
        except BaseException:
            self.discard(temporary)
            raise

    def upload(self, local: Path, relative: str) -> None:
        """Copy a local file to ``relative``, atomically."""
        with open(local, "rb") as f:
            self.write_atomic(relative, iter(lambda: f.read(CHUNK), b""))

    def sha256(self, relative: str) -> tuple[str, int]:
        """(sha256 hex digest, bytes) of a file, read in chunks."""
        digest, size = hashlib.sha256(), 0
        try:
            with self.open_read(relative) as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            raise self.error(f"{self.describe(relative)}: missing") from None
        except OSError as exc:
            raise self.error(f"{self.describe(relative)} cannot be read: {exc}") from None
        return digest.hexdigest(), size

    @contextmanager
    def local_copy(self, relative: str) -> Iterator[Path]:
        """A local file with the content of ``relative``: the file itself under a local root, a
        downloaded temporary copy (removed afterwards) under a remote one."""
        raise NotImplementedError
        yield  # pragma: no cover


class LocalStore(Store):
    def __init__(self, root: Path, error: type[Exception] | None = None) -> None:
        if error is not None:
            self.error = error
        self.root = str(root)
        self._root = Path(root)

    def _path(self, relative: str) -> Path:
        return self._root / relative if relative else self._root

    def read_bytes(self, relative: str, limit: int | None = None) -> bytes:
        path = self._path(relative)
        try:
            if path.is_symlink():
                raise self.error(f"{path} is a symbolic link; these are plain files")
            if limit is not None and path.stat().st_size > limit:
                raise self.error(f"{path} is larger than {limit:,} bytes")
            return path.read_bytes()
        except FileNotFoundError:
            raise self.error(f"{path}: missing") from None
        except OSError as exc:
            raise self.error(f"{path} cannot be read: {exc.strerror or exc}") from None

    def exists(self, relative: str) -> bool:
        return self._path(relative).exists()

    def isdir(self, relative: str) -> bool:
        return self._path(relative).is_dir()

    def size(self, relative: str) -> int:
        return self._path(relative).stat().st_size

    def listdir(self, relative: str = "") -> list[str]:
        path = self._path(relative)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

    def remove(self, relative: str) -> None:
        path = self._path(relative)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def open_read(self, relative: str) -> BinaryIO:
        return self._path(relative).open("rb")

    def stat(self, relative: str) -> tuple[int, datetime] | None:
        path = self._path(relative)
        try:
            found = path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self.error(f"{path} cannot be read: {exc.strerror or exc}") from None
        if not S_ISREG(found.st_mode):
            return None
        return found.st_size, datetime.fromtimestamp(found.st_mtime, UTC)

    def files(self, relative: str = "") -> dict[str, tuple[int, datetime]]:
        found = {}
        for path in sorted(self._path(relative).rglob("*")):
            key = path.relative_to(self._root).as_posix()
            if (entry := self.stat(key)) is not None:
                found[key] = entry
        return found

    def _open_sized(self, relative: str, size: int) -> tuple[BinaryIO, int]:
        path = self._path(relative)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise self.error(f"{path} cannot be read: {exc.strerror or exc}") from None
        return f, os.fstat(f.fileno()).st_size

    def open_temporary(self, relative: str) -> tuple[str, BinaryIO]:
        target = self._path(relative)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
            return str(temporary), temporary.open("xb")
        except OSError as exc:
            raise self.error(f"cannot write {target}: {exc.strerror or exc}") from None

    def publish(self, temporary: str, relative: str) -> None:
        target = self._path(relative)
        try:
            with open(temporary, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(temporary, target)
            fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise self.error(f"cannot write {target}: {exc.strerror or exc}") from None

    def discard(self, temporary: str) -> None:
        Path(temporary).unlink(missing_ok=True)

    @contextmanager
    def local_copy(self, relative: str) -> Iterator[Path]:
        yield self._path(relative)


class FsspecStore(Store):
    remote = True

    def __init__(
        self, url: str, variable: str = "IIOT_ARCHIVE_ROOT", error: type[Exception] | None = None
    ) -> None:
        if error is not None:
            self.error = error
        try:
            import fsspec
        except ImportError:  # pragma: no cover - fsspec comes with dagster today
            raise self.error(
                f"{variable}={url} needs fsspec: pip install 'iiot-orchestration[archive-s3]'"
            ) from None
        try:
            self.fs, path = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise self.error(
                f"{variable}={url}: {str(exc).splitlines()[0][:200]} (install the "
                "archive-s3 extra for s3://)"
            ) from None
        self.root = url.rstrip("/")
        self._base = path.rstrip("/")

    def _path(self, relative: str) -> str:
        return f"{self._base}/{relative}" if relative else self._base

    def read_bytes(self, relative: str, limit: int | None = None) -> bytes:
        try:
            if limit is not None and self.fs.size(self._path(relative)) > limit:
                raise self.error(f"{self.describe(relative)} is larger than {limit:,} bytes")
            return self.fs.cat_file(self._path(relative))
        except FileNotFoundError:
            raise self.error(f"{self.describe(relative)}: missing") from None
        except OSError as exc:
            raise self.error(f"{self.describe(relative)} cannot be read: {exc}") from None

    def exists(self, relative: str) -> bool:
        return bool(self.fs.exists(self._path(relative)))

    def isdir(self, relative: str) -> bool:
        return bool(self.fs.isdir(self._path(relative)))

    def size(self, relative: str) -> int:
        return int(self.fs.size(self._path(relative)))

    def listdir(self, relative: str = "") -> list[str]:
        path = self._path(relative).rstrip("/")
        try:
            entries = self.fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        # some file systems list a folder that is only a prefix as an entry of itself
        names = {e.rstrip("/").rpartition("/")[2] for e in entries if e.rstrip("/") != path}
        return sorted(n for n in names if n)

    def remove(self, relative: str) -> None:
        path = self._path(relative)
        try:
            if self.fs.isdir(path):
                self.fs.rm(path, recursive=True)
            elif self.fs.exists(path):
                self.fs.rm(path)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()

    def open_read(self, relative: str) -> BinaryIO:
        return self.fs.open(self._path(relative), "rb")

    def stat(self, relative: str) -> tuple[int, datetime] | None:
        path = self._path(relative)
        try:
            self.fs.invalidate_cache(path)  # a listing cached earlier may be out of date
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        except Exception as exc:  # botocore's connection errors are no OSError
            raise self.error(f"{self.describe(relative)} cannot be read: {exc}") from None
        if info.get("type") != "file":
            return None
        return int(info["size"]), self._modified(path, info)

    def files(self, relative: str = "") -> dict[str, tuple[int, datetime]]:
        path = self._path(relative).rstrip("/")
        try:
            found = self.fs.find(path, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        except Exception as exc:  # botocore's connection errors are no OSError
            raise self.error(f"{self.describe(relative)} cannot be listed: {exc}") from None
        prefix = f"{self._base}/"
        return {
            name.removeprefix(prefix): (int(info["size"]), self._modified(name, info))
            for name, info in sorted(found.items())
            if info.get("type") == "file" and name.startswith(prefix)
        }

    def _modified(self, path: str, info: dict) -> datetime:
        """The modification time in an fsspec listing: S3's LastModified, a local mtime, Azure's
        last_modified, GCS's updated; asked for separately when the listing has none."""
        for field in ("LastModified", "mtime", "last_modified", "updated"):
            value = info.get(field)
            if isinstance(value, str):
                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if isinstance(value, int | float):
                return datetime.fromtimestamp(value, UTC)
            if isinstance(value, datetime):
                return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return self.fs.modified(path).astimezone(UTC)

    def _open_sized(self, relative: str, size: int) -> tuple[BinaryIO, int]:
        try:  # read ahead one piece at a time, not the file system's default block (50 MB on S3)
            f = self.fs.open(self._path(relative), "rb", block_size=size)
        except FileNotFoundError:
            raise
        except Exception as exc:  # botocore's connection errors are no OSError
            raise self.error(f"{self.describe(relative)} cannot be read: {exc}") from None
        return f, int(f.size)

    def open_temporary(self, relative: str) -> tuple[str, BinaryIO]:
        folder, _, name = self._path(relative).rpartition("/")
        temporary = f"{folder}/.{name}.{secrets.token_hex(4)}.tmp"
        try:
            self.fs.makedirs(folder, exist_ok=True)
            return temporary, self.fs.open(temporary, "wb")
        except OSError as exc:
            raise self.error(f"cannot write {self.describe(relative)}: {exc}") from None

    def publish(self, temporary: str, relative: str) -> None:
        try:
            self.fs.mv(temporary, self._path(relative))
        except OSError as exc:
            raise self.error(f"cannot write {self.describe(relative)}: {exc}") from None
        self.fs.invalidate_cache()

    def discard(self, temporary: str) -> None:
        if self.fs.exists(temporary):
            self.fs.rm(temporary)

    @contextmanager
    def local_copy(self, relative: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="iiot-fetch-") as scratch:
            target = Path(scratch) / (relative.rpartition("/")[2] or "file")
            try:
                self.fs.get_file(self._path(relative), str(target))
            except FileNotFoundError:
                raise self.error(f"{self.describe(relative)}: missing") from None
            except OSError as exc:
                raise self.error(f"{self.describe(relative)} cannot be read: {exc}") from None
            yield target


def open_root(
    root: str | Path, variable: str, error: type[Exception] = StoreError
) -> LocalStore | FsspecStore:
    """The store of a root setting: a URL with a scheme goes to fsspec, anything else is a local
    directory. Its errors are ``error``, and name ``variable`` when the URL cannot be used."""
    text = str(root)
    if is_url(text):
        return FsspecStore(text, variable, error)
    return LocalStore(Path(text.removeprefix("file://")).expanduser(), error)


@contextmanager
def local_file(location: str | Path, variable: str = "the file") -> Iterator[Path]:
    """A local path holding the file at ``location``: itself when local, a temporary download of
    the URL otherwise."""
    if not is_url(location):
        yield Path(str(location).removeprefix("file://"))
        return
    folder, _, name = str(location).rstrip("/").rpartition("/")
    with open_root(folder, variable).local_copy(name) as path:
        yield path
