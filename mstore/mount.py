"""A read-only FUSE view of a commit: lazy, verified, with bounded memory.

``serve`` exposes a commit's tree as a read-only file system: directories, files, sizes, and
every mtime set to the commit time. Nothing is copied up front. A read is served from the
chunks that cover it, each fetched from its pack, decoded and checked against its id by
:meth:`ObjectStore.get` *before* any of its bytes are returned; a damaged chunk turns the read
into ``EIO`` and is logged with the file, the offset and the chunk id. Decoded chunks live in a
bounded LRU cache (:class:`ChunkCache`); sequential readers get the next chunks decoded ahead on
a small thread pool, within the same bound.

Process model (docs/mount.md):

* the *foreground* mount is this process serving requests until it is unmounted
  (``mstore umount``, ``fusermount3 -u``, SIGTERM/SIGINT/SIGHUP) or the process it was tied to
  exits; it holds a gc lease on its commit and registers itself under ``<store>/mounts/``;
* a *background* mount is a child process running the foreground mount
  (``python -m mstore mount --foreground``), started in its own session; the parent returns
  once the child reports, through a pipe, that the file system answers.

The FUSE binding (``mfusepy``, ctypes over the system's libfuse3) is imported here and only
here, when a mount is actually served. This module takes an object store and ids; the few
functions that take a ``repo`` are the facade's glue and use only ``repo.resolve``,
``repo.store``, ``repo.root`` and ``repo.lease``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import Conflict, IntegrityError, MstoreError, NotFound, UserError
from .fsutil import atomic_write
from .hashing import ObjectId, hash_bytes
from .objects import MODE_EXEC, TREE_KIND, FileObject, Tree, TreeEntry, load_commit, load_file, load_tree
from .storage.store import Scratch

log = logging.getLogger("mstore.mount")

MOUNTS_DIR = "mounts"

DEFAULT_CACHE_BYTES = 256 << 20
# Safetensors tensors are stored in chunks of up to 16 MiB (config [chunking]; docs/format.md).
# A cache smaller than the copies two such loads hold decodes them one at a time.
MIN_CACHE_BYTES = 32 << 20
DEFAULT_READAHEAD_BYTES = 32 << 20
# A streaming reader re-tries read-ahead that found no free load every this many bytes.
READ_AHEAD_RETRY = 2 << 20
# Copies of a chunk a load holds at its peak (pack read, decoder's working buffer, result).
LOAD_COPIES = 3
# Beyond its cache, a serving process may use this much (threads, FUSE buffers, allocator).
MEMORY_SLACK = 32 << 20

# How long a background mount may take to answer before the parent gives up.
READY_TIMEOUT = 30.0
# The gc lease a mount holds is renewed at half its lifetime, so a killed mount process holds
# the commit at most this long (a plan made meanwhile is refused at apply and must be redone).
LEASE_TTL = 86400.0

FUSE_FSTYPE = "fuse.mstore"


def decode_workers() -> int:
    """Threads that decode chunks ahead of a sequential reader (a mount also decodes one on demand)."""
    return max(2, min(4, os.cpu_count() or 1))


class MountError(MstoreError):
    """FUSE is unavailable, or a mount could not be made or removed."""


# -- the chunk cache ---------------------------------------------------------------------------


class ChunkCache:
    """Decoded, verified chunks by id: an LRU bounded by bytes, with one loader per chunk.

    Concurrent requests for the same chunk wait for a single load. At most ``max_loads``
    chunks load at once, and room for each (``LOAD_COPIES`` times its size, for the copies a
    load holds) is made by evicting the least recently used before it loads, so cached plus
    loading chunks stay within ``capacity``. Failed loads are not cached: the next read of a
    damaged chunk fails again (and is logged again).
    """

    def __init__(self, load: Callable[[ObjectId], bytes], capacity: int, max_loads: int = 3):
        self._load = load
        self.capacity = capacity
        self._data: OrderedDict[ObjectId, bytes] = OrderedDict()
        self._pending: dict[ObjectId, Future] = {}
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self.max_loads = max_loads
        self.loading = 0
        self.used = 0
        self.reserved = 0
        self.hits = 0
        self.misses = 0

    def __contains__(self, cid: ObjectId) -> bool:
        with self._lock:
            return cid in self._data or cid in self._pending

    def _make_room(self, size: int) -> None:
        # Caller holds the lock.
        while self._data and self.used + self.reserved + size > self.capacity:
            _old, dropped = self._data.popitem(last=False)
            self.used -= len(dropped)

    def get(self, cid: ObjectId, size: int = 0) -> bytes:
        """The chunk's verified bytes (``size`` long, if known), loading it once if not cached.

        Raises:
            IntegrityError, ObjectNotFound: from the loader.
        """
        with self._lock:
            data = self._data.get(cid)
            if data is not None:
                self._data.move_to_end(cid)
                self.hits += 1
                return data
            fut = self._pending.get(cid)
            owner = fut is None
            if owner:
                fut = self._pending[cid] = Future()
                self.misses += 1
        if owner:
            self._fill(cid, size, fut)
        return fut.result()

    def schedule(self, cid: ObjectId, size: int, submit: Callable[..., Any]) -> bool:
        """Start loading a chunk that is not cached or loading, through ``submit(fn, *args)``.

        Refused (False) when ``max_loads - 1`` chunks are already loading or queued (one load
        always stays free for a reader that needs a chunk now), or when loading it would take
        room from more than half the cache (read-ahead must not evict what is being read).
        """
        with self._lock:
            if (
                cid in self._data
                or cid in self._pending
                or len(self._pending) >= self.max_loads - 1
                or self.reserved + LOAD_COPIES * size > self.capacity // 2
            ):
                return False
            fut = self._pending[cid] = Future()
            self.misses += 1
        submit(self._fill, cid, size, fut)
        return True

    def _fill(self, cid: ObjectId, size: int, fut: Future) -> None:
        # While it decodes, a load holds up to three copies of the chunk (what was read from
        # the pack, the decoder's working buffer, the result): room for them is made first.
        room = LOAD_COPIES * size
        try:
            with self._room:
                # Wait for a free load, and for room unless nothing else is loading (a chunk
                # larger than the whole cache still loads, alone).
                while self.loading >= self.max_loads or (self.loading and self.reserved + room > self.capacity):
                    self._room.wait()
                self._make_room(room)
                self.reserved += room
                self.loading += 1
            try:
                data = self._load(cid)
            finally:
                with self._room:
                    self.reserved -= room
                    self.loading -= 1
                    self._room.notify_all()
        except BaseException as exc:
            with self._lock:
                del self._pending[cid]
            fut.set_exception(exc)
            return
        with self._lock:
            del self._pending[cid]
            if len(data) <= self.capacity:
                self._make_room(len(data))
                self._data[cid] = data
                self.used += len(data)
        fut.set_result(data)


# Parsed trees and manifests kept, counted in entries (a tree entry or a chunk of a manifest
# costs about 200 bytes parsed): about 50 MB at most.
MAX_CACHED_ENTRIES = 250_000


class _WeightedLRU:
    """A thread-safe LRU bounded by the sum of its values' weights."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._data: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.weight = 0

    def get(self, key: Any) -> Any:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            self._data.move_to_end(key)
            return item[0]

    def put(self, key: Any, value: Any, weight: int) -> None:
        with self._lock:
            if key in self._data or weight > self.capacity:
                return
            self._data[key] = (value, weight)
            self.weight += weight
            while self.weight > self.capacity:
                _k, (_v, w) = self._data.popitem(last=False)
                self.weight -= w


# -- the file system ---------------------------------------------------------------------------


@dataclass
class _Handle:
    path: str
    fid: ObjectId
    fobj: FileObject
    starts: list[int]
    last_chunk: int = -2
    ahead_chunk: int = -1
    ahead_at: int = 0


def _commit_time_ns(iso: str) -> int:
    try:
        dt = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return 0
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class MountFS:
    """The FUSE operations of one read-only commit (a path-based ``mfusepy`` operations object).

    Every method raises ``OSError`` with the errno to return; the binding turns it into the
    reply. Writes of any kind fail with ``EROFS``.
    """

    use_ns = True  # timestamps in nanoseconds (mfusepy)

    def __init__(
        self,
        store: Any,
        commit_id: ObjectId,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        readahead_bytes: int = DEFAULT_READAHEAD_BYTES,
        workers: int | None = None,
        on_ready: Callable[[], None] | None = None,
    ):
        if cache_bytes < MIN_CACHE_BYTES:
            raise UserError(f"cache size must be at least {MIN_CACHE_BYTES >> 20} MiB")
        self.store = store
        self.commit_id = commit_id
        commit = load_commit(store, commit_id)
        self.root_tree = commit.tree
        self.stats = commit.stats
        self.mtime_ns = _commit_time_ns(commit.time)
        self.uid, self.gid = os.getuid(), os.getgid()
        # Chunks decoded at once: by the pool ahead of a sequential reader, plus one on demand.
        loads = workers or decode_workers()
        self.cache = ChunkCache(self._load_chunk, cache_bytes, max_loads=loads + 1)
        # Ahead of a sequential reader, decode at most this much (and never more than half the
        # cache, so read-ahead cannot evict what is being read).
        self.readahead_bytes = max(0, min(readahead_bytes, cache_bytes // 2))
        self.pool = ThreadPoolExecutor(loads, "mstore-mount")
        self._on_ready = on_ready
        self._lock = threading.Lock()
        self._scratches: list[Scratch] = []  # decode buffers of finished loads (_load_chunk)
        # Parsed trees and manifests, bounded by their entries (a huge dataset directory or a
        # 100 GB file's chunk list must not grow without limit either).
        self._trees = _WeightedLRU(MAX_CACHED_ENTRIES)
        self._manifests = _WeightedLRU(MAX_CACHED_ENTRIES)
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self.errors = 0
        self.ready = False
        self.memory: _MemoryGuard | None = None
        self._largest_chunk = 0
        # Fail early (before mounting) if the root tree itself is unreadable.
        self._tree(self.root_tree)

    # -- lookups ---------------------------------------------------------------------------
    def _tree(self, tid: ObjectId) -> dict[str, TreeEntry]:
        entries = self._trees.get(tid)
        if entries is None:
            tree: Tree = load_tree(self.store, tid)
            entries = {e.name: e for e in tree.entries}
            self._trees.put(tid, entries, len(entries) + 1)
        return entries

    def _manifest(self, fid: ObjectId) -> FileObject:
        fobj = self._manifests.get(fid)
        if fobj is None:
            fobj = load_file(self.store, fid)
            self._manifests.put(fid, fobj, len(fobj.chunks) + 1)
        return fobj

    def _lookup(self, path: str) -> TreeEntry | None:
        """The entry at ``path`` (None for the root)."""
        parts = [p for p in path.split("/") if p]
        tid = self.root_tree
        entry = None
        for i, part in enumerate(parts):
            entry = self._guard(lambda tid=tid: self._tree(tid), path).get(part)
            if entry is None:
                raise _error(errno.ENOENT)
            if i < len(parts) - 1:
                if entry.kind != TREE_KIND:
                    raise _error(errno.ENOTDIR)
                tid = entry.id
        return entry

    def _guard(self, fn: Callable[[], Any], path: str) -> Any:
        """Run a store read for ``path``; damage becomes a logged EIO."""
        try:
            return fn()
        except MstoreError as exc:
            self.errors += 1
            log.error("cannot read metadata of %s: %s; returning EIO", path or "/", exc)
            raise _error(errno.EIO) from None

    # -- metadata --------------------------------------------------------------------------
    def _attrs(self, entry: TreeEntry | None) -> dict[str, int]:
        t = self.mtime_ns
        base = {"st_uid": self.uid, "st_gid": self.gid, "st_atime": t, "st_mtime": t, "st_ctime": t}
        if entry is None or entry.kind == TREE_KIND:
            return {**base, "st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2, "st_size": 0}
        perm = 0o555 if entry.mode == MODE_EXEC else 0o444
        return {
            **base,
            "st_mode": stat.S_IFREG | perm,
            "st_nlink": 1,
            "st_size": entry.size,
            "st_blocks": (entry.size + 511) // 512,
            "st_blksize": 1 << 20,
        }

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        return self._attrs(self._lookup(path))

    def readdir(self, path: str, fh: int) -> list[str]:
        entry = self._lookup(path)
        if entry is not None and entry.kind != TREE_KIND:
            raise _error(errno.ENOTDIR)
        tid = self.root_tree if entry is None else entry.id
        return [".", "..", *self._guard(lambda: self._tree(tid), path)]

    def statfs(self, path: str) -> dict[str, int]:
        total = int(self.stats.get("bytes", 0) or 0)
        bsize = 4096
        return {
            "f_bsize": bsize,
            "f_frsize": bsize,
            "f_blocks": (total + bsize - 1) // bsize,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": int(self.stats.get("files", 0) or 0),
            "f_ffree": 0,
            "f_favail": 0,
            "f_namemax": 255,
        }

    def access(self, path: str, amode: int) -> int:
        self._lookup(path)
        if amode & os.W_OK:
            raise _error(errno.EROFS)
        return 0

    # -- reading ---------------------------------------------------------------------------
    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise _error(errno.EROFS)
        entry = self._lookup(path)
        if entry is None or entry.kind == TREE_KIND:
            raise _error(errno.EISDIR)
        fobj = self._guard(lambda: self._manifest(entry.id), path)
        if fobj.size != entry.size:
            self.errors += 1
            log.error("%s: tree says %d bytes, manifest %d; returning EIO", path, entry.size, fobj.size)
            raise _error(errno.EIO)
        starts, pos = [], 0
        for _cid, n in fobj.chunks:
            starts.append(pos)
            pos += n
            self._largest_chunk = max(self._largest_chunk, n)
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = _Handle(path, entry.id, fobj, starts)
        return fh

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            self._handles.pop(fh, None)
        return 0

    def _load_chunk(self, cid: ObjectId) -> bytes:
        if self.memory is not None:
            self.memory.check(LOAD_COPIES * self._largest_chunk)
        # Decode buffers from a pool, not each thread's own: up to 16 FUSE threads and the
        # read-ahead workers load chunks, but the cache lets only max_loads at once, so the
        # pool holds at most that many (each as large as the largest chunk decoded).
        with self._lock:
            scratch = self._scratches.pop() if self._scratches else Scratch()
        try:
            data = self.store.get("c", cid, scratch=scratch)
        finally:
            with self._lock:
                self._scratches.append(scratch)
        if self.memory is not None:
            self.memory.check()
        return data

    def _chunk(self, h: _Handle, i: int) -> bytes:
        cid, n = h.fobj.chunks[i]
        try:
            data = self.cache.get(cid, n)
            if len(data) != n:
                raise IntegrityError(f"chunk {cid} has {len(data)} bytes, the manifest says {n}")
        except MstoreError as exc:
            self.errors += 1
            log.error(
                "damaged data in %s at offset %d-%d (chunk %d, %s): %s; returning EIO",
                h.path,
                h.starts[i],
                h.starts[i] + n,
                i,
                cid,
                exc,
            )
            raise _error(errno.EIO) from None
        return data

    def _read_ahead(self, h: _Handle, i: int, offset: int) -> None:
        """Start decoding the chunks after chunk ``i``, within the read-ahead budget."""
        h.ahead_chunk, h.ahead_at = i, offset
        budget = self.readahead_bytes
        chunks = h.fobj.chunks
        for j in range(i + 1, len(chunks)):
            if budget <= 0:
                break
            cid, n = chunks[j]
            budget -= n
            if cid not in self.cache and not self.cache.schedule(cid, n, self.pool.submit):
                break

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        h = self._handles.get(fh)
        if h is None:
            raise _error(errno.EBADF)
        total = h.fobj.size
        if offset >= total or size <= 0:
            return b""
        end = min(total, offset + size)
        i = bisect_right(h.starts, offset) - 1
        # A reader in the same or the next chunk as last time streams: decode ahead of it, before
        # waiting for this chunk, so the two decode at once. (Again on each new chunk, and every
        # few MiB in case the budget was full.)
        if (
            self.readahead_bytes
            and h.last_chunk in (i, i - 1)
            and (i != h.ahead_chunk or offset - h.ahead_at >= READ_AHEAD_RETRY)
        ):
            self._read_ahead(h, i, offset)
        parts = []
        pos = offset
        while pos < end:
            data = self._chunk(h, i)
            start = h.starts[i]
            parts.append(data[pos - start : min(end - start, len(data))])
            pos = start + len(data)
            i += 1
        h.last_chunk = i - 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- lifecycle -------------------------------------------------------------------------
    def init(self, path: str) -> None:
        self.ready = True
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self, path: str) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- writes: none ----------------------------------------------------------------------
    def _rofs(self, *args: Any) -> int:
        raise _error(errno.EROFS)

    chmod = chown = create = link = mkdir = mknod = rename = rmdir = symlink = _rofs
    truncate = unlink = utimens = write = setxattr = removexattr = _rofs


# -- serving -----------------------------------------------------------------------------------


def _binding() -> Any:
    try:
        import mfusepy
    except ImportError:
        raise MountError(
            "mounting needs the Python package 'mfusepy' (pip install mfusepy) and the system's FUSE 3 "
            "(Debian/Ubuntu: apt-get install fuse3)"
        ) from None
    except OSError as exc:  # the package is there, libfuse is not
        raise MountError(f"FUSE 3 is not installed (Debian/Ubuntu: apt-get install fuse3): {exc}") from None
    return mfusepy


def check_fuse() -> None:
    """Raise :class:`MountError` if this machine cannot mount (no binding, no /dev/fuse)."""
    _binding()
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: FUSE is not available here (in a container, pass --device /dev/fuse)")


class _MemoryGuard:
    """Keeps the serving process's RSS near its budget without paying for it on every chunk.

    Decoded chunks are big (up to 16 MiB) and come and go all the time. glibc serves them from
    per-thread heaps that keep freed memory, so RSS drifts well above what is live. Mapping
    each one separately (``M_MMAP_THRESHOLD``) returns memory at once but makes every chunk
    fault in fresh pages, which doubled the system time of a cold read. Instead: at most two
    heaps, big blocks from the heap (reused warm), and when RSS goes over the budget after a
    load, ``malloc_trim`` hands the free pages back.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.trims = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        try:
            import ctypes

            libc = ctypes.CDLL(None)
            libc.mallopt(-8, 2)  # M_ARENA_MAX
            libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: chunks stay on the heap
            self._trim = libc.malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to tune
            self._trim = None
        self.limit = self.rss() + budget if self._trim is not None else 0

    def rss(self) -> int:
        try:
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return 0

    def check(self, headroom: int = 0) -> None:
        """Trim if RSS (plus ``headroom`` about to be allocated) is over the budget."""
        if self.limit and self.rss() + headroom > self.limit:
            self._trim(0)
            self.trims += 1


def serve(
    store: Any,
    commit_id: ObjectId,
    mountpoint: str | os.PathLike,
    *,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    readahead_bytes: int = DEFAULT_READAHEAD_BYTES,
    allow_other: bool = False,
    on_ready: Callable[[], None] | None = None,
    label: str = "",
    workers: int | None = None,
) -> MountFS:
    """Mount the commit at ``mountpoint`` and serve it until unmounted (blocks).

    Unmounting (``fusermount3 -u``) or SIGTERM, SIGINT or SIGHUP ends it cleanly; the mount is
    gone when this returns. ``on_ready`` runs once the kernel has connected.

    ``store`` is anything with ``get(kind, id) -> verified bytes`` that raises
    :class:`MstoreError` on failure: the local :class:`ObjectStore`, or a lazy remote source
    (``mstore.remote_mount``). ``workers`` decode (or download) ahead of a sequential reader.

    Returns:
        The file system object (its ``errors`` counts EIO replies, ``cache`` its hit counters).

    Raises:
        MountError: FUSE is unavailable or the mount failed.
    """
    check_fuse()
    mfusepy = _binding()
    fs = MountFS(
        store,
        commit_id,
        cache_bytes=cache_bytes,
        readahead_bytes=readahead_bytes,
        on_ready=on_ready,
        workers=workers,
    )
    fs.memory = _MemoryGuard(cache_bytes + MEMORY_SLACK)
    options: dict[str, Any] = {
        "foreground": True,
        "ro": True,
        "default_permissions": True,
        "fsname": f"mstore:{label or commit_id.short}"[:100].replace(",", "_"),
        "subtype": "mstore",
        # A commit never changes: the kernel may keep names, attributes and pages for good.
        "kernel_cache": True,
        "entry_timeout": 86400,
        "attr_timeout": 86400,
        "negative_timeout": 86400,
    }
    version = (getattr(mfusepy, "fuse_version_major", 2), getattr(mfusepy, "fuse_version_minor", 0))
    if version >= (3, 0):
        options["max_idle_threads"] = 8
    if version >= (3, 12):
        options["max_threads"] = 16
    if allow_other:
        options["allow_other"] = True
    log.info("mounting %s at %s (cache %d MiB)", commit_id.short, mountpoint, cache_bytes >> 20)
    try:
        mfusepy.FUSE(fs, str(mountpoint), **options)
    except RuntimeError as exc:
        # libfuse's loop reports a signal-initiated exit as an error (mfusepy raises
        # RuntimeError(8)); by then it has unmounted. Anything else is a real failure.
        if is_mounted(mountpoint) or not fs.ready:
            raise MountError(f"FUSE failed to mount or serve {mountpoint}: error {exc}") from None
    finally:
        fs.pool.shutdown(wait=False, cancel_futures=True)
    log.info(
        "unmounted %s (%d chunks decoded, %d reads from cache, %d reads failed)",
        mountpoint,
        fs.cache.misses,
        fs.cache.hits,
        fs.errors,
    )
    return fs


# -- mount table and registry -------------------------------------------------------------------


def _unescape(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal.
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_table() -> dict[str, str]:
    """Mount point → file system type, from ``/proc/self/mounts`` (empty where there is none)."""
    try:
        text = Path("/proc/self/mounts").read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return {}
    table = {}
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) >= 3:
            table[_unescape(parts[1])] = parts[2]
    return table


def is_mounted(path: str | os.PathLike) -> bool:
    """True if something (alive or dead) is mounted at ``path``."""
    p = os.path.abspath(path)
    table = mount_table()
    if table:
        return p in table or os.path.realpath(p) in table
    try:
        return os.path.ismount(p)
    except OSError:
        return True


def _mounts_dir(root: Path) -> Path:
    return Path(root) / MOUNTS_DIR


def _key(mountpoint: str) -> str:
    return hash_bytes(mountpoint.encode("utf-8", "surrogateescape"))[:16]


def _proc_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[-1].split()


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (to tell a live mount from a re-used pid)."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None


def _pid_alive(pid: int, start: str | None = None) -> bool:
    """True if ``pid`` runs (and, given ``start``, is the same process); zombies are dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc: trust kill(0)
    if fields[0] in ("Z", "X"):
        return False
    return start is None or fields[19] == start


@dataclass
class MountInfo:
    """One mount as registered under ``<store>/mounts/``."""

    mountpoint: str
    commit: str
    rev: str
    pid: int
    host: str
    started: float
    cache_bytes: int
    lease: str | None = None
    log: str | None = None
    proc_start: str | None = None
    alive: bool = True
    mounted: bool = True
    # The remote whose objects the mount reads (lazily) where the store lacks them; None: local.
    remote: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        d = asdict(self)
        d.pop("proc_start")
        return d


def _write_entry(root: Path, info: MountInfo) -> Path:
    d = _mounts_dir(root)
    d.mkdir(exist_ok=True)
    path = d / f"{_key(info.mountpoint)}.json"
    atomic_write(path, json.dumps(asdict(info), sort_keys=True).encode())
    return path


def _read_entries(root: Path) -> list[tuple[Path, MountInfo]]:
    d = _mounts_dir(root)
    out = []
    if not d.is_dir():
        return out
    for path in sorted(d.glob("*.json")):
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            info = MountInfo(**{k: v for k, v in raw.items() if k in MountInfo.__dataclass_fields__})
        except (OSError, ValueError, TypeError):
            continue
        out.append((path, info))
    return out


def _remove_entry(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def list_mounts(root: str | os.PathLike) -> list[MountInfo]:
    """Every mount of this store, checked now.

    An entry whose process is gone has ``alive=False``. If the kernel still has its (dead)
    mount, ``mounted`` is True and the entry stays until ``umount`` clears it; otherwise the
    entry is removed now (and so listed this once).
    """
    host = socket.gethostname()
    table = mount_table()
    out = []
    for path, info in _read_entries(Path(root)):
        mp = info.mountpoint
        info.mounted = (mp in table) if table else os.path.ismount(mp)
        if info.host == host and not _pid_alive(info.pid, info.proc_start):
            info.alive = False
            if not info.mounted:
                _remove_entry(path)
        out.append(info)
    return out


def _find_entry(root: Path, mountpoint: str) -> tuple[Path, MountInfo] | None:
    for path, info in _read_entries(root):
        if info.mountpoint == mountpoint:
            return path, info
    return None


# -- unmounting --------------------------------------------------------------------------------


def _fusermount() -> str:
    for name in ("fusermount3", "fusermount"):
        exe = shutil.which(name)
        if exe:
            return exe
    raise MountError("fusermount3 is not installed (Debian/Ubuntu: apt-get install fuse3)")


def _unmount(mountpoint: str, lazy: bool) -> None:
    argv = [_fusermount(), "-u", *(["-z"] if lazy else []), mountpoint]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0 and is_mounted(mountpoint):
        msg = proc.stderr.strip() or f"exit status {proc.returncode}"
        if "busy" in msg.lower():
            raise MountError(
                f"{mountpoint} is busy: a process has a file or its working directory there; "
                f"close it, or unmount lazily (mstore umount --lazy {mountpoint})"
            )
        raise MountError(f"could not unmount {mountpoint}: {msg}")


# Background mounts started by this process, so their exit is reaped (no zombies).
_children: dict[int, subprocess.Popen] = {}


def _wait_exit(pid: int, timeout: float, start: str | None = None) -> bool:
    deadline = time.monotonic() + timeout
    child = _children.get(pid)
    while True:
        if child is not None:
            if child.poll() is not None:
                _children.pop(pid, None)
                return True
        elif not _pid_alive(pid, start):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def umount(root: str | os.PathLike, mountpoint: str | os.PathLike, *, lazy: bool = False, timeout: float = 10.0):
    """Unmount ``mountpoint`` (a live or dead mount of this store) and wait for its process.

    With ``lazy`` the mount is detached at once even if busy; its process serves the files still
    open and exits when the last one is closed.

    Returns:
        The registry entry that was removed, or None if the mount was not registered.

    Raises:
        NotFound: nothing is mounted there and no mount is registered for it.
        MountError: the mount is busy (use ``lazy``) or unmounting failed.
    """
    root = Path(root)
    mp = os.path.abspath(mountpoint)
    found = _find_entry(root, mp)
    if found is None and os.path.realpath(mp) != mp:
        found = _find_entry(root, os.path.realpath(mp))
    mounted = is_mounted(mp)
    if found is None and not mounted:
        raise NotFound(f"nothing is mounted at {mp}")
    if found is None and mount_table().get(mp, FUSE_FSTYPE) != FUSE_FSTYPE:
        raise UserError(f"{mp} is not an mstore mount ({mount_table().get(mp)}); not touching it")
    if mounted:
        _unmount(mp, lazy)
    if found is None:
        return None
    path, info = found
    if lazy and mounted:
        # Detached: files still open there keep working, and the server exits (removing its
        # entry and releasing its lease) when the last one is closed.
        return info
    if info.host == socket.gethostname() and not _wait_exit(info.pid, timeout, info.proc_start):
        # Unmounted, but the server did not notice: stop it (it releases its lease on the way out).
        try:
            os.kill(info.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        _wait_exit(info.pid, timeout, info.proc_start)
    _remove_entry(path)
    return info


# -- mounting (the facade's glue) ---------------------------------------------------------------


def _check_mountpoint(mountpoint: str) -> None:
    p = Path(mountpoint)
    if is_mounted(mountpoint):
        raise Conflict(f"something is already mounted at {mountpoint} (see mstore mounts; mstore umount {mountpoint})")
    if not p.exists():
        p.mkdir(parents=True)
    elif not p.is_dir():
        raise UserError(f"{mountpoint} is not a directory")
    elif any(p.iterdir()):
        raise UserError(f"{mountpoint} is not empty; mount on an empty directory")


class Mount(AbstractContextManager):
    """A mount made by :func:`mount_commit`: its registry entry, and ``umount()``.

    As a context manager it unmounts on exit (also on an exception); if files there are still
    open (a model loaded with ``mmap``), it detaches the mount and they keep working until
    closed::

        with mount_commit(repo, "models/base", "/mnt/base") as m:
            train(m.mountpoint)
    """

    def __init__(self, root: Path, info: MountInfo):
        self.root = root
        self.info = info

    @property
    def mountpoint(self) -> str:
        return self.info.mountpoint

    @property
    def commit(self) -> str:
        return self.info.commit

    @property
    def pid(self) -> int:
        return self.info.pid

    def umount(self, lazy: bool = False) -> None:
        """Unmount (idempotent) and wait for the serving process to exit."""
        if self.info.alive:
            try:
                umount(self.root, self.info.mountpoint, lazy=lazy)
            except NotFound:
                pass
            if self.info.host == socket.gethostname() and not lazy:
                _wait_exit(self.info.pid, 10, self.info.proc_start)
            self.info.alive = False

    def __exit__(self, *exc: Any) -> None:
        # Files may still be open there (a model loaded with mmap keeps its file): then the mount
        # is detached, they keep reading, and the server exits when the last one is closed.
        try:
            self.umount()
        except MountError:
            self.umount(lazy=True)

    def __repr__(self) -> str:
        return f"Mount({self.info.rev!r} {self.info.commit[:7]} at {self.info.mountpoint!r}, pid {self.info.pid})"


def _watch_owner(pid: int, mountpoint: str) -> None:
    """Unmount when process ``pid`` exits (``mstore run`` killed, a script gone)."""

    def watch() -> None:
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            fd = None
        if fd is not None:
            select.select([fd], [], [])
            os.close(fd)
        else:
            while _pid_alive(pid):
                time.sleep(0.5)
        log.warning("process %d that owned this mount exited; unmounting %s", pid, mountpoint)
        try:
            _unmount(mountpoint, lazy=True)
        except MstoreError as exc:
            log.error("%s", exc)

    threading.Thread(target=watch, name="mstore-mount-owner", daemon=True).start()


class _LeaseKeeper:
    """Holds a gc lease from ``take()`` and replaces it at half its lifetime."""

    def __init__(self, take: Callable[[], AbstractContextManager[str]], period: float, on_renew: Callable[[str], None]):
        self._take = take
        self._period = period
        self._on_renew = on_renew
        self._stop = threading.Event()
        self._cur: AbstractContextManager[str] | None = None
        self.lease: str | None = None

    def __enter__(self) -> _LeaseKeeper:
        self._cur = self._take()
        self.lease = self._cur.__enter__()
        self._thread = threading.Thread(target=self._loop, name="mstore-mount-lease", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self._period):
            try:
                new = self._take()
                lease = new.__enter__()
            except Exception as exc:  # noqa: BLE001 - keep serving on the old lease
                log.error("could not renew the gc lease: %s", exc)
                continue
            old, self._cur, self.lease = self._cur, new, lease
            if old is not None:
                old.__exit__(None, None, None)
            self._on_renew(lease)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._cur is not None:
            self._cur.__exit__(None, None, None)
            self._cur = None


def mount_commit(
    repo: Any,
    rev: str,
    mountpoint: str | os.PathLike,
    *,
    foreground: bool = False,
    detach: bool = False,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    readahead_bytes: int = DEFAULT_READAHEAD_BYTES,
    allow_other: bool = False,
    label: str | None = None,
    ready_fd: int | None = None,
    owner_pid: int | None = None,
    on_ready: Callable[[MountInfo], None] | None = None,
    timeout: float = READY_TIMEOUT,
    commit_id: ObjectId | None = None,
    objects: Any = None,
    remote: str | None = None,
    child_args: list[str] | None = None,
    workers: int | None = None,
) -> Mount:
    """Mount the commit ``rev`` names at ``mountpoint``, read-only (the facade's ``Repo.mount``).

    By default the mount is served by a child process and this returns once it answers; the
    returned :class:`Mount` unmounts on ``umount()`` or at the end of a ``with`` block, and the
    mount also ends when this process exits unless ``detach`` (the CLI's ``mstore mount``).
    With ``foreground`` this process serves it and returns only after it is unmounted.

    The serving process holds a gc lease on the commit (if the store has it) and registers the
    mount under ``<store>/mounts/`` while it is mounted.

    A mount of something other than a local revision (``mstore.remote_mount``) passes the
    resolved ``commit_id`` (``rev`` is then only its label), the ``objects`` to read from in
    the foreground (default: the store), the ``remote`` it reads from (recorded in the
    registry), and ``child_args``: what a background child needs on its command line to build
    the same ``objects`` itself.

    Raises:
        RefNotFound, InvalidRevision: ``rev`` names nothing.
        Conflict: something is already mounted there.
        UserError: ``mountpoint`` is a file or a non-empty directory; a bad cache size.
        MountError: FUSE is unavailable, or the mount failed (the message quotes why).
    """
    cid = commit_id if commit_id is not None else repo.resolve(rev)
    mp = os.path.abspath(mountpoint)
    label = label or str(rev)
    if cache_bytes < MIN_CACHE_BYTES:
        raise UserError(f"cache size must be at least {MIN_CACHE_BYTES >> 20} MiB")
    check_fuse()
    if not foreground:
        return _spawn(
            repo.root,
            cid,
            mp,
            label,
            cache_bytes=cache_bytes,
            readahead_bytes=readahead_bytes,
            allow_other=allow_other,
            owner_pid=None if detach else (owner_pid or os.getpid()),
            timeout=timeout,
            child_args=child_args or [],
            remote=remote,
        )
    _check_mountpoint(mp)
    root = Path(repo.root)
    _mounts_dir(root).mkdir(exist_ok=True)
    info = MountInfo(
        mountpoint=mp,
        commit=str(cid),
        rev=label,
        pid=os.getpid(),
        host=socket.gethostname(),
        started=time.time(),
        cache_bytes=cache_bytes,
        log=str(_mounts_dir(root) / f"{_key(mp)}.log"),
        proc_start=_proc_start(os.getpid()),
        remote=remote,
    )
    entry_path: list[Path] = []

    def renewed(lease: str) -> None:
        info.lease = lease
        if entry_path:
            _write_entry(root, info)

    def ready() -> None:
        try:
            entry_path.append(_write_entry(root, info))
        except MstoreError as exc:  # serve anyway: umount works by mount point too
            log.error("could not register the mount: %s", exc)
        if owner_pid:
            _watch_owner(owner_pid, mp)
        if ready_fd is not None:
            try:
                os.write(ready_fd, b"ready\n")
                os.close(ready_fd)
            except OSError:
                pass
        if on_ready is not None:
            on_ready(info)

    def take_lease() -> AbstractContextManager[str]:
        return repo.lease([str(cid)], note=f"mount {mp}", ttl=LEASE_TTL)

    with ExitStack() as stack:
        # A commit the store lacks (read from a remote) has nothing local to protect; a lease
        # on it would name a commit ``repo.lease`` cannot resolve.
        if repo.store.has("m", cid):
            keeper = stack.enter_context(_LeaseKeeper(take_lease, LEASE_TTL / 2, renewed))
            info.lease = keeper.lease
        try:
            serve(
                repo.store if objects is None else objects,
                cid,
                mp,
                cache_bytes=cache_bytes,
                readahead_bytes=readahead_bytes,
                allow_other=allow_other,
                on_ready=ready,
                label=label,
                workers=workers,
            )
        except MstoreError as exc:
            if ready_fd is not None and not entry_path:
                try:
                    os.write(ready_fd, f"error {exc}\n".encode())
                except OSError:
                    pass
            raise
        finally:
            for p in entry_path:
                _remove_entry(p)
    info.alive = False
    info.mounted = False
    return Mount(root, info)


# How a background mount starts its serving process: the mstore command line. Embedders and
# tests may point this elsewhere (a list of arguments to put before ``--store``).
CHILD_COMMAND: list[str] | None = None


def _child_argv(root: Path, cid: ObjectId, mp: str, label: str, ready_fd: int, **kw: Any) -> list[str]:
    argv = [
        *(CHILD_COMMAND or [sys.executable, "-m", "mstore"]),
        "--store",
        str(root),
        "mount",
        "--foreground",
        "--ready-fd",
        str(ready_fd),
        "--label",
        label,
        "--cache-size",
        str(kw["cache_bytes"]),
        "--readahead",
        str(kw["readahead_bytes"]),
    ]
    if kw["allow_other"]:
        argv.append("--allow-other")
    if kw["owner_pid"]:
        argv += ["--exit-with", str(kw["owner_pid"])]
    return [*argv, *kw["child_args"], str(cid), mp]


def _spawn(root: Path, cid: ObjectId, mp: str, label: str, *, timeout: float, **kw: Any) -> Mount:
    _check_mountpoint(mp)
    mdir = _mounts_dir(Path(root))
    mdir.mkdir(exist_ok=True)
    log_path = mdir / f"{_key(mp)}.log"
    r, w = os.pipe()
    try:
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(
                _child_argv(Path(root), cid, mp, label, w, **kw),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                pass_fds=(w,),
                start_new_session=True,
                cwd="/",
            )
    finally:
        os.close(w)
    _children[proc.pid] = proc
    try:
        line = _read_ready(r, proc, timeout)
    finally:
        os.close(r)
    if line != "ready":
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _children.pop(proc.pid, None)
        if is_mounted(mp) and mount_table().get(mp) == FUSE_FSTYPE:
            try:
                _unmount(mp, lazy=True)
            except MstoreError:
                pass
        why = line.removeprefix("error ").strip() if line.startswith("error ") else _log_tail(log_path)
        raise MountError(f"mounting {label} at {mp} failed: {why}")
    found = _find_entry(Path(root), mp)
    if found is not None:  # the child registers itself before it says ready
        return Mount(Path(root), found[1])
    info = MountInfo(
        mountpoint=mp,
        commit=str(cid),
        rev=label,
        pid=proc.pid,
        host=socket.gethostname(),
        started=time.time(),
        cache_bytes=kw["cache_bytes"],
        log=str(log_path),
        proc_start=_proc_start(proc.pid),
        remote=kw["remote"],
    )
    return Mount(Path(root), info)


def _read_ready(fd: int, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"error the mount did not answer within {timeout:.0f} s"
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    return buf.decode("utf-8", "replace").strip()


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "the mount process exited (no log)"
    tail = [ln for ln in text.splitlines() if ln.strip()][-lines:]
    errors = [ln.removeprefix("error: ") for ln in tail if ln.startswith("error: ")]
    return errors[-1] if errors else (" | ".join(tail) or "the mount process exited")


__all__ = [
    "ChunkCache",
    "DEFAULT_CACHE_BYTES",
    "Mount",
    "MountError",
    "MountFS",
    "MountInfo",
    "check_fuse",
    "is_mounted",
    "list_mounts",
    "mount_commit",
    "serve",
    "umount",
]
