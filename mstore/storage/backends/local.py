"""Directory backend (``file:///mnt/other-disk/store``): the backup on another disk.

Every object is written like restic's local backend (``fsutil.atomic_write``: temp file in the
target directory, fsync, rename, fsync the directory), so a reader or a crash sees the old
object or the whole new one. Compare-and-swap documents are changed under an exclusive
``flock`` on a sibling ``.lock`` file: the current content is re-read under the lock, compared
with the version the caller saw, and replaced by an atomic rename. ``flock(2)`` is advisory and
silently succeeds without locking on some network file systems (some NFS mounts, Lustre,
GPFS): use a local disk, or an S3 remote, for concurrent pushers.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import blake3

from ...errors import InvalidName
from ...fsutil import atomic_write, fsync_dir, unique_name
from .base import Backend, BackendError, BackendNotFound, Progress, check_key, check_prefix

_COPY_BLOCK = 8 << 20


def path_from_url(url: str) -> Path:
    """``file:///mnt/disk/store`` → ``/mnt/disk/store``.

    Raises:
        InvalidName: not a ``file://`` URL with an absolute path.
    """
    parsed = urlparse(url)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
        raise InvalidName(f"{url!r} is not a file:///ABSOLUTE/PATH URL")
    return Path(unquote(parsed.path))


class LocalBackend(Backend):
    """Objects as files under one directory."""

    def __init__(self, root: Path, url: str | None = None):
        self.root = Path(root)
        self.url = url or self.root.resolve().as_uri()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _err(self, what: str, key: str, exc: OSError) -> BackendError:
        return BackendError(f"{self.url}: cannot {what} {key}: {exc.strerror or exc}")

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise BackendNotFound(f"{self.url}: no {key}") from None
        except OSError as exc:
            raise self._err("read", key, exc) from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                f.seek(offset)
                return f.read(length)
        except FileNotFoundError:
            raise BackendNotFound(f"{self.url}: no {key}") from None
        except OSError as exc:
            raise self._err("read", key, exc) from None

    def get_file(self, key: str, dest: Path, progress: Progress | None = None) -> None:
        try:
            with open(self._path(key), "rb") as src, open(dest, "wb") as out:
                while block := src.read(_COPY_BLOCK):
                    out.write(block)
                    if progress:
                        progress(len(block))
        except FileNotFoundError:
            raise BackendNotFound(f"{self.url}: no {key}") from None
        except OSError as exc:
            raise self._err("read", key, exc) from None

    def stat(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._err("stat", key, exc) from None

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        check_prefix(prefix)
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return
        out: list[tuple[str, int]] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith(".") or name.endswith(".lock"):
                    continue  # temp files of writers in progress, lock files
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                try:
                    check_key(key)
                except InvalidName as exc:
                    raise BackendError(f"{self.url}: listing returned an invalid key: {exc}") from None
                try:
                    out.append((key, full.stat().st_size))
                except FileNotFoundError:
                    continue
        yield from sorted(out)

    def _mkdirs(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(f"{self.url}: cannot create {path.parent}: {exc.strerror}") from None

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        self._mkdirs(path)
        atomic_write(path, data)

    def put_file(self, key: str, path: Path, progress: Progress | None = None) -> None:
        dest = self._path(key)
        self._mkdirs(dest)
        tmp = dest.parent / unique_name(f".{dest.name}.", ".tmp")
        try:
            with open(path, "rb") as src, open(tmp, "xb") as out:
                while block := src.read(_COPY_BLOCK):
                    out.write(block)
                    if progress:
                        progress(len(block))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise self._err("write", key, exc) from None

    def put_if_absent(self, key: str, data: bytes) -> bool:
        # Write a temp file, then link(2) it to the key: atomic, and it fails if the key exists.
        path = self._path(key)
        self._mkdirs(path)
        tmp = path.parent / unique_name(f".{path.name}.", ".tmp")
        try:
            atomic_write(tmp, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            fsync_dir(path.parent)
            return True
        except OSError as exc:
            raise self._err("create", key, exc) from None
        finally:
            try:
                tmp.unlink()
            except OSError:
                pass

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._err("read", key, exc) from None
        return data, blake3.blake3(data).hexdigest()

    def put_if_version(self, key: str, data: bytes, version: str | None) -> bool:
        path = self._path(key)
        self._mkdirs(path)
        with self._locked(path):
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                current = None
            cur_version = None if current is None else blake3.blake3(current).hexdigest()
            if cur_version != version:
                return False
            atomic_write(path, data)
            return True

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._err("delete", key, exc) from None

    class _locked:
        """An exclusive flock on ``<path>.lock`` for the duration of a compare-and-swap."""

        def __init__(self, path: Path):
            self.lock_path = path.with_name(path.name + ".lock")
            self.fd = -1

        def __enter__(self) -> None:
            try:
                self.fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            except OSError as exc:
                if self.fd >= 0:
                    os.close(self.fd)
                raise BackendError(f"cannot lock {self.lock_path}: {exc.strerror}") from None

        def __exit__(self, *exc: object) -> None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
