r"""Object ids: 32-byte BLAKE3 digests, shown as 64 lowercase hex characters.

A chunk's id and a file's id are ``blake3(raw bytes)``, exactly what ``b3sum`` prints. Trees and
commits are hashed with a type prefix (``b"tree 123\\0"`` + canonical JSON), like git, so that no
tree or commit can ever share an id with a file whose content happens to be the same JSON.
"""

from __future__ import annotations

import os
import re

import blake3

from .errors import FileChanged, InvalidRevision

DIGEST_SIZE = 32
HEX_LENGTH = 64
SHORT_LENGTH = 7
MIN_PREFIX = 7

_HEX_RE = re.compile(r"[0-9a-f]{64}")  # used with fullmatch: "$" would accept a trailing newline
_PREFIX_RE = re.compile(r"[0-9a-f]{7,64}")

class ObjectId(str):
    """A full object id (64 lowercase hex characters).

    It is a ``str`` so it serialises into JSON and compares with plain strings, but the
    constructor validates, so an ``ObjectId`` is always well formed.
    """

    __slots__ = ()

    def __new__(cls, value: str) -> ObjectId:
        if isinstance(value, ObjectId):
            return value
        if not isinstance(value, str) or not _HEX_RE.fullmatch(value):
            raise InvalidRevision(f"not an object id (want 64 lowercase hex characters): {value!r}")
        return super().__new__(cls, value)

    @classmethod
    def trusted(cls, value: str) -> ObjectId:
        """Wrap a string the caller has already validated (parsers of a million chunk ids)."""
        return str.__new__(cls, value)

    @classmethod
    def from_digest(cls, digest: bytes) -> ObjectId:
        """Build an id from a raw 32-byte digest."""
        if len(digest) != DIGEST_SIZE:
            raise InvalidRevision(f"digest must be {DIGEST_SIZE} bytes, got {len(digest)}")
        return super().__new__(cls, digest.hex())

    @property
    def digest(self) -> bytes:
        """The raw 32 bytes."""
        return bytes.fromhex(self)

    @property
    def short(self) -> str:
        """The abbreviated display form (first 7 hex characters)."""
        return self[:SHORT_LENGTH]


def is_full_id(text: str) -> bool:
    """True if ``text`` is a syntactically valid full id."""
    return bool(_HEX_RE.fullmatch(text))


def is_id_prefix(text: str) -> bool:
    """True if ``text`` could be an abbreviated id (7 to 64 lowercase hex characters)."""
    return bool(_PREFIX_RE.fullmatch(text))


_threads_pid = [0]  # the process in which blake3's multi-threaded hashing first ran


def _hash_threads() -> int:
    """``max_threads`` for big inputs: AUTO, except in a process forked after it was used.

    blake3 hashes with a thread pool (Rayon's) started on first use; a forked child inherits
    the pool's state but not its threads, and its first multi-threaded hash waits forever
    (a checkout in a child of a process that had checked out hung in hashing the file).
    """
    pid = os.getpid()
    if _threads_pid[0] == 0:
        _threads_pid[0] = pid
    return blake3.blake3.AUTO if _threads_pid[0] == pid else 1


def hash_bytes(data: bytes | bytearray | memoryview) -> ObjectId:
    """BLAKE3 of ``data`` as an :class:`ObjectId`, on the calling thread only.

    Its big callers are the ingest's and checkout's worker threads, one per core already: there
    blake3's own thread pool only adds hand-offs and Rayon's spinning. Measured in a full
    fine-tune's commit (2 cores): AUTO threads made the workers' hashing 0.11 s of wall for
    0.01 s of their own CPU, one thread 0.04 s for 0.035 s, and the commit 0.71 -> 0.66 s.
    Whole files on an otherwise idle process go through :func:`hash_file_fd`, which does use
    every core.
    """
    return ObjectId.from_digest(blake3.blake3(data).digest())


def hash_typed(kind: str, payload: bytes) -> ObjectId:
    """Id of a typed object (tree, commit): BLAKE3 of ``"<kind> <len>" NUL payload``."""
    h = blake3.blake3(f"{kind} {len(payload)}\0".encode("ascii"))
    h.update(payload)
    return ObjectId.from_digest(h.digest())


# Hash files by reading windows of this size into two buffers, one read by a helper thread
# while the other is hashed (by blake3's threads). Not through a memory map: a file cut short
# while it is mapped kills the process with SIGBUS, and what mstore hashes whole is often a
# checkpoint a training process may be rewriting right then; a short read is an error that can
# be reported. Measured on a 164 MB file in the page cache (2 cores): mapped 5.7 GB/s, read
# then hashed 4.0-5.0, read beside the hashing 6.4-6.6 (4 MiB windows fit the CPU caches best).
_HASH_WINDOW = 4 << 20


def hash_file(f, size: int) -> ObjectId:
    """BLAKE3 of an open file's first ``size`` bytes (multi-threaded; see :func:`hash_file_fd`)."""
    return hash_file_fd(f.fileno(), size)


def hash_file_fd(fd: int, size: int) -> ObjectId:
    """BLAKE3 of the first ``size`` bytes of a readable descriptor, read window by window.

    Raises:
        FileChanged: the file holds fewer than ``size`` bytes (it was cut meanwhile).
    """
    from concurrent.futures import ThreadPoolExecutor

    h = blake3.blake3(max_threads=_hash_threads())
    win = min(_HASH_WINDOW, size)
    if size <= win:
        buf = bytearray(size)
        if size and os.preadv(fd, [buf], 0) != size:
            raise FileChanged(f"file is shorter than {size} bytes: it changed size while being read")
        h.update(buf)
        return ObjectId.from_digest(h.digest())
    bufs = (memoryview(bytearray(win)), memoryview(bytearray(win)))

    def read(i: int, off: int) -> int:
        return os.preadv(fd, [bufs[i % 2][: min(win, size - off)]], off)

    with ThreadPoolExecutor(1, thread_name_prefix="mstore-hash-read") as reader:
        off, i = 0, 0
        pending = reader.submit(read, 0, 0)
        while off < size:
            got = pending.result()
            if got <= 0:
                raise FileChanged(f"file ended at byte {off} of {size}: it changed size while being read")
            if off + got < size:
                pending = reader.submit(read, i + 1, off + got)
            h.update(bufs[i % 2][:got])
            off += got
            i += 1
    return ObjectId.from_digest(h.digest())


def hash_own_file_fd(fd: int, size: int) -> ObjectId:
    """BLAKE3 of a file this process has just written under a name no one else uses (mapped).

    A checkout verifies every file it wrote, under its temporary name, before renaming it: no
    one else is writing it, so the memory map's SIGBUS risk (see _HASH_WINDOW) is not there,
    and hashing the written pages in place is ~9 % faster than reading them back (a 245 MB
    checkout: 0.201 vs 0.219 s, medians of 8).
    """
    import mmap

    h = blake3.blake3(max_threads=_hash_threads())
    off = 0
    try:
        while off < size:
            n = min(64 << 20, size - off)
            with mmap.mmap(fd, n, offset=off, access=mmap.ACCESS_READ) as m:
                h.update(m)
            off += n
    except (OSError, ValueError):  # a file system that cannot map files, or a file cut short
        return hash_file_fd(fd, size)  # (which then says so: FileChanged)
    return ObjectId.from_digest(h.digest())


class StreamHasher:
    """Incremental BLAKE3 for content that arrives in pieces (a file read chunk by chunk).

    Single-threaded: it runs beside worker threads that already keep every core busy
    (hashing and encoding the same pieces), where a multi-threaded hasher only adds thread
    hand-offs; on pieces of a few hundred KB it was measured 2x slower than one thread.
    """

    def __init__(self) -> None:
        self._h = blake3.blake3()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Feed the next piece."""
        self._h.update(data)

    def id(self) -> ObjectId:
        """The id of everything fed so far."""
        return ObjectId.from_digest(self._h.digest())
