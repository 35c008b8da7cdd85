"""Careful file system primitives, written once and used everywhere.

``atomic_write`` follows restic's local backend: temp file in the target directory, write,
check the byte count, fsync, close, rename, fsync the directory, and remove the temp on any
error. A reader therefore sees either the old file or the complete new one, even across a
power cut.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import StorageError


def unique_name(prefix: str = "", suffix: str = "") -> str:
    """A name no other process will pick: time, pid and 64 random bits."""
    import time

    return f"{prefix}{time.time_ns():x}-{os.getpid():x}-{os.urandom(8).hex()}{suffix}"


_sync_file_range: list = []  # [the libc function, or None where there is none]
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes at ``offset`` to disk, without waiting.

    Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which Python's ``os`` lacks (hence
    ctypes). It changes no durability promise (the later ``fsync`` still decides); it only lets
    the disk work while the writer goes on, so that ``fsync`` finds the bytes mostly written
    already, as RocksDB's ``bytes_per_sync`` does. Does nothing where unavailable or refused.
    """
    if not _sync_file_range:
        fn = None
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.sync_file_range
            fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _sync_file_range.append(fn)
    fn = _sync_file_range[0]
    if fn is not None and length > 0:
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # a failure only means no early start


def fsync_dir(path: str | os.PathLike) -> None:
    """Fsync a directory so a rename or create inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    Raises:
        StorageError: the write, fsync or rename failed; the old file (if any) is untouched.
    """
    path = Path(path)
    tmp = path.parent / unique_name(f".{path.name}.", ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            written = 0
            view = memoryview(data)
            while written < len(data):
                written += os.write(fd, view[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StorageError(f"could not write {path}: {exc.strerror or exc}") from exc


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """Read exactly ``length`` bytes at ``offset``; fewer means the file is truncated.

    Raises:
        StorageError: the file ends before ``offset + length``.
    """
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise StorageError(f"short read: wanted {length} bytes at offset {offset}, file ends")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def is_within(path: Path, root: Path) -> bool:
    """True if ``path`` (already resolved) lies inside ``root`` (already resolved)."""
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True
