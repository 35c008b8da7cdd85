"""Mount a remote's branch, tag or commit lazily: ``mstore mount origin/exp1 /mnt/exp1``.

The glue between :mod:`mstore.mount` (which serves any object source with a verified
``get(kind, id)``) and :mod:`mstore.remote` (the remote's catalog and its verified record
reader). It sits in its own layer above both, so neither imports the other.

What a remote mount does (docs/mount.md, "Mounting from a remote"):

1. The remote's ref is read once, when the mount is made: the mount serves that commit id for
   its whole life, whatever the remote branch does meanwhile.
2. The commit's metadata closure (the commit, its trees, its file manifests; not its parents,
   not its chunks) is read through the remote module's verified reader, local copies first,
   and all of it (local copies too) held in memory: a local gc meanwhile cannot take it from
   the mount. A missing or malformed object fails the mount before anything is mounted.
3. A chunk is read from the local store if it is there (and reads back verified), else with one
   ranged GET of its record from the remote, checked against the pack index and its id before
   a byte of it is returned. A delta chunk needs its base: the chain is followed (through the
   remote's pack index, down to a base the store has or one stored whole) and every level is
   verified; the decoded chunk's hash must be its id. Wrong bytes are an error (the mount
   answers EIO), never data.
4. With ``keep`` the verified chunks (and the delta bases read for them) are also indexed into
   the local store, in the background, so the next read, the next mount and a later
   ``mstore fetch`` take them locally. Nothing else is indexed and no ref moves: file manifests
   cannot be checked against their id (the hash of the whole content) until every chunk is
   read, and trees and commits without their chunks would give the store a commit whose
   closure is incomplete. Unreferenced chunks are ordinary gc candidates. Keeping needs a
   store of the current format version; a failed write ends it, indexing nothing unwritten.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import codecs
from .errors import (
    IntegrityError,
    MstoreError,
    ObjectNotFound,
    RefNotFound,
    RemoteIntegrityError,
    RemoteNotFound,
    StorageError,
    UserError,
)
from .format import FORMAT_VERSION
from .hashing import ObjectId, is_full_id
from .mount import DEFAULT_CACHE_BYTES, DEFAULT_READAHEAD_BYTES, READY_TIMEOUT, Mount, mount_commit
from .objects import FileObject
from .reachability import walk
from .refs import HEADS, REMOTES, TAGS
from .remote import (
    MAX_OBJECT,
    Catalog,
    Location,
    Received,
    RemoteSource,
    append_received,
    check_layout,
    decode_delta_checked,
    load_catalog,
    read_ref,
    verify_record,
)
from .storage.backends import Backend, BackendNotFound, open_backend
from .storage.index import KINDS
from .storage.packs import RECORD
from .storage.store import MAX_DELTA_CHAIN, DeltaBaseMissing, Scratch

log = logging.getLogger("mstore.mount")

#: A remote mount downloads ahead of a sequential reader on this many threads: a GET waits on
#: the network far more than on the CPU, so more of them overlap than local decodes do.
REMOTE_WORKERS = 6
#: Threads that download the deeper levels of delta chains, for all readers together.
CHAIN_WORKERS = 4
#: Verified chunks waiting to be indexed locally (``keep``) hold at most this many bytes; past
#: it a reader waits for the indexer (memory stays bounded if the disk is slower than the wire).
KEEP_QUEUE_BYTES = 48 << 20
#: The background indexer makes what it appended durable and indexed this often (seconds).
KEEP_FLUSH_SECONDS = 2.0

# Characters that make a revision an expression the local store resolves (reflog, ancestry,
# paths): such revisions are never remote.
_EXPRESSION = set("@~^:")


# -- naming the remote ---------------------------------------------------------------------------


def remote_target(repo: Any, rev: str, remote: str | None = None) -> tuple[str, str] | None:
    """``(remote, remote_rev)`` if ``rev`` is to be mounted from a remote, else None (local).

    With ``remote`` given, ``rev`` is that remote's branch, tag or full commit id. Otherwise
    ``NAME/REST`` names remote ``NAME``'s branch (or tag) ``REST`` when ``NAME`` is a configured
    remote and no local branch or tag is called ``NAME/REST`` (a local name wins, as git's
    rules have it). A full ref name (``refs/remotes/origin/exp1``) and any expression with
    ``@``, ``~``, ``^`` or ``:`` are local revisions.

    Raises:
        RemoteNotFound: ``remote`` is given and not configured.
    """
    remotes = repo.remotes()
    if remote is not None:
        if remote not in remotes:
            known = ", ".join(remotes) or "none configured"
            raise RemoteNotFound(f"no remote {remote!r} (remotes: {known}; add one with mstore remote add)")
        return remote, rev
    rev = str(rev)
    if rev.startswith("refs/") or _EXPRESSION & set(rev):
        return None
    name, sep, rest = rev.partition("/")
    if not sep or not rest or name not in remotes:
        return None
    with repo.store.index.read() as txn:
        if txn.get_ref(HEADS + rev) is not None or txn.get_ref(TAGS + rev) is not None:
            return None
    return name, rest


def open_remote(repo: Any, name: str) -> Backend:
    """The backend of configured remote ``name``.

    Raises:
        RemoteNotFound: no such remote.
        InvalidName, BackendError: its settings cannot make a backend.
    """
    settings = repo.remotes().get(name)
    if settings is None:
        known = ", ".join(repo.remotes()) or "none configured"
        raise RemoteNotFound(f"no remote {name!r} (remotes: {known}; add one with mstore remote add)")
    return open_backend(settings["url"], **{k: v for k, v in settings.items() if k != "url"})


def _cache_dir(repo: Any, name: str) -> Path | None:
    """Where the remote's pack indexes are cached (the place fetch and push keep them), if known."""
    cache = getattr(repo, "_remote_cache", None)
    return cache(name) if cache is not None else None


def _with_fetched_hint(repo: Any, remote: str, rev: str, exc: MstoreError) -> MstoreError:
    """``exc``, saying how to mount the copy fetched earlier if the store has one."""
    tracking = f"{REMOTES}{remote}/{rev}"
    try:
        with repo.store.index.read() as txn:
            fetched = txn.get_ref(tracking) is not None
    except (MstoreError, ValueError):
        fetched = False
    if not fetched or isinstance(exc, IntegrityError):
        return exc
    return type(exc)(f"{exc} (the copy fetched earlier mounts as {tracking})")


@dataclass(frozen=True)
class Resolved:
    """What a remote revision named when it was read."""

    remote: str
    rev: str
    ref: str | None  # the full remote ref, or None for a commit id
    commit: ObjectId


def _unreachable(name: str, backend: Backend, exc: MstoreError) -> MstoreError:
    if isinstance(exc, StorageError) and not isinstance(exc, IntegrityError):
        return type(exc)(f"cannot reach remote {name} ({backend.url}): {exc}")
    return exc


def resolve_remote(name: str, backend: Backend, rev: str) -> Resolved:
    """The commit remote ``name`` names by ``rev``: a branch, else a tag, or a full commit id.

    Raises:
        RefNotFound: the remote has no such branch or tag (or is empty), or no such commit.
        StorageError: the remote cannot be reached (the message names it).
        RemoteIntegrityError, UnsupportedFormat: it is not a readable mstore remote.
    """
    try:
        if check_layout(backend) is None:
            raise RefNotFound(f"remote {name} ({backend.url}) is empty: no {rev} there")
        if is_full_id(rev):  # whether the remote has it, its catalog says (see mount_remote)
            return Resolved(name, rev, None, ObjectId(rev))
        if rev.startswith("refs/"):
            candidates = [rev]
        else:
            candidates = [HEADS + rev, TAGS + rev]
        for full in candidates:
            if not full.startswith((HEADS, TAGS)):
                continue
            ref = read_ref(backend, full)
            if ref is not None and ref.id is not None:
                return Resolved(name, rev, full, ref.id)
    except MstoreError as exc:
        raise _unreachable(name, backend, exc) from None
    raise RefNotFound(f"remote {name} has no branch or tag {rev!r} (see mstore remote show {name})")


# -- the object source ---------------------------------------------------------------------------


def check_keep(store: Any) -> None:
    """Refuse ``keep`` for a store of an older format version than this mstore writes.

    A remote may hold chunks in encodings (deltas, byte planes, low-rank deltas) such a store's
    version lacks (an older mstore would read them as damage); one of them would end keeping
    for the whole mount, after part of what was read had been kept and the rest not.

    Raises:
        UserError: the store's format version is below :data:`mstore.format.FORMAT_VERSION`.
    """
    version = store.config.version
    if version < FORMAT_VERSION:
        raise UserError(
            f"--keep-chunks needs a store of format version {FORMAT_VERSION}; this one is version {version}, "
            "which cannot hold every encoding a remote's chunks may use: mount without --keep-chunks "
            "(nothing is kept), or clone the remote into a new store"
        )


class _Keeper:
    """Indexes verified chunks into the local store from one background thread.

    Chunks arrive as chains, bases first, so a delta is appended only after its base. The
    queue is bounded by bytes: a reader that finds it full waits for the indexer.
    Nothing here moves a ref: the chunks are unreferenced until a fetch or commit names them.

    ``kept`` counts chunks appended *and* indexed (their flush succeeded); ``dropped`` every
    chunk offered that will not be: a chain skipped because its base is gone, what a failed
    write or flush abandoned, and what arrived after the indexer stopped. A failure other than
    a missing base (the disk is full, an I/O error, an encoding the store's format lacks)
    stops keeping for the rest of the mount: the batch is abandoned, so nothing of it that was
    not yet indexed ever is, and reads go on without keeping.
    """

    def __init__(self, store: Any):
        self.store = store
        self._q: queue.Queue = queue.Queue()
        self._bytes = 0
        self._room = threading.Condition()
        self._alive = True
        self.kept = 0
        self.dropped = 0
        self.failed = 0
        self.error: str | None = None  # why keeping stopped, if it did
        self._unindexed: list[tuple[str, bytes]] = []  # appended to the batch, not yet indexed
        self._thread = threading.Thread(target=self._run, name="mstore-mount-keep", daemon=True)
        self._thread.start()

    def offer(self, records: list[Received]) -> None:
        """Queue a chain (bases first) for the store; waits while the queue is full.

        Waiting slows the reader to the speed of the local disk rather than dropping what the
        user asked to keep, and keeps memory bounded. One chain larger than the whole bound
        still goes through, alone.
        """
        size = sum(len(r.payload) for r in records)
        with self._room:
            while self._bytes and self._bytes + size > KEEP_QUEUE_BYTES and self._alive:
                self._room.wait(1.0)
            if not self._alive:  # the indexer stopped: serve without keeping
                self.dropped += len(records)
                return
            self._bytes += size
            self._q.put((records, size))  # under the lock: a stopping indexer counts it as dropped

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        try:
            self._index()
        except Exception as exc:  # noqa: BLE001 - say why nothing more is kept; reads go on regardless
            self._stop(exc)
            log.exception("stopped keeping fetched chunks in the local store")
        finally:
            with self._room:
                self._alive = False
                self._room.notify_all()
            self._drain()

    def _stop(self, exc: BaseException) -> None:
        with self._room:
            self.failed += 1
            self.error = str(exc) or type(exc).__name__
            self.dropped += len(self._unindexed)
            self._unindexed.clear()
            self._alive = False
            self._room.notify_all()

    def _drain(self) -> None:
        """Count what is still queued as dropped (the indexer has stopped)."""
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return
            if item is None:
                continue
            records, size = item
            with self._room:
                self.dropped += len(records)
                self._bytes -= size
                self._room.notify_all()

    def _indexed(self, batch: Any) -> None:
        """Count as kept what the batch has indexed (it is no longer pending)."""
        still = [key for key in self._unindexed if key in batch.pending]
        with self._room:
            self.kept += len(self._unindexed) - len(still)
        self._unindexed = still

    def _index(self) -> None:
        # One batch (so one pack, rolled when full) for the life of the mount, indexed every
        # few seconds. Any failure ends keeping: leaving the block without commit abandons the
        # batch, and what it had not indexed yet never is (a failed write can leave a pack
        # that does not hold what was appended to it).
        try:
            with self.store.batch() as batch:
                done = False
                while not done:
                    done = self._fill(batch)
                    if batch.pending or batch.reused:
                        batch.flush()
                    self._indexed(batch)
                batch.commit()
                self._indexed(batch)
        except MstoreError as exc:  # the disk is full, an I/O error, a concurrent gc, ...
            self._stop(exc)
            log.error(
                "stopped keeping fetched chunks in the local store (%d kept, %d dropped; reads go on "
                "from the remote): %s",
                self.kept,
                self.dropped,
                exc,
            )

    def _fill(self, batch: Any) -> bool:
        """Append queued chains until told to stop (True) or it is time to index (False)."""
        deadline = time.monotonic() + KEEP_FLUSH_SECONDS
        while True:
            try:
                item = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if item is None:
                return True
            records, size = item
            i = 0
            try:
                for i, r in enumerate(records):
                    if batch.contains(r.kind, r.oid):
                        continue
                    try:
                        append_received(batch, r)
                    except DeltaBaseMissing as exc:  # its base is gone (a gc): skip the rest of the chain
                        log.warning("not keeping chunk %s: %s", records[-1].oid, exc)
                        with self._room:
                            self.dropped += len(records) - i
                        break
                    self._unindexed.append((r.kind, r.oid.digest))
                    self._indexed(batch)  # an append may have flushed (a pack rolled)
            except BaseException:
                with self._room:
                    self.dropped += len(records) - i  # this one and the rest of its chain
                raise
            finally:
                with self._room:
                    self._bytes -= size
                    self._room.notify_all()
            if time.monotonic() >= deadline:
                return False


class _Closed:
    """A closed keeper's counts (for the summary)."""

    def __init__(self, keeper: _Keeper):
        self.kept, self.dropped, self.failed = keeper.kept, keeper.dropped, keeper.failed
        self.error = keeper.error

    def offer(self, records: list[Received]) -> None:
        pass

    def close(self) -> None:
        pass


class _Holding:
    """The walk's object source, remembering what it read from the local store (metadata)."""

    def __init__(self, src: RemoteSource):
        self.src = src
        self.local: dict[tuple[str, bytes], bytes] = {}

    def get(self, kind: str, oid: ObjectId) -> bytes:
        raw = self.src.get(kind, oid)
        key = (kind, oid.digest)
        if kind != "c" and key not in self.src.received:
            self.local[key] = bytes(raw)
        return raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self.src, name)


class RemoteObjects:
    """The objects of one commit, from the local store where it has them, else from a remote.

    ``get(kind, id)`` returns verified bytes or raises :class:`MstoreError`, like
    :meth:`ObjectStore.get`, so :func:`mstore.mount.serve` can read from it. Safe to call from
    many threads at once. Use as a context manager (or call :meth:`close`): with ``keep`` the
    chunks still queued for the local store are indexed at the end.

    Raises (constructor):
        UserError: ``keep`` for a store of an older format version (:func:`check_keep`).
        RemoteIntegrityError: the commit, a tree or a manifest is missing on the remote, or its
            bytes are wrong or hostile (nothing is mounted).
        StorageError: the remote cannot be reached.
    """

    def __init__(
        self,
        store: Any,
        backend: Backend,
        remote: str,
        commit_id: ObjectId,
        *,
        keep: bool = False,
        cache_dir: Path | None = None,
        max_object: int = MAX_OBJECT,
        catalog: Catalog | None = None,
    ):
        self.store = store
        self.backend = backend
        self.remote = remote
        self.commit_id = commit_id
        self.max_object = max_object
        self._lock = threading.Lock()
        self.gets = 0  # ranged GETs of chunk records
        self.bytes = 0  # bytes those GETs returned
        self.remote_chunks = 0  # chunks served from the remote (delta bases not counted)
        self.local_chunks = 0  # chunks served from the local store
        self.fallbacks = 0  # local copies that failed to read back, then read from the remote
        if keep:
            check_keep(store)
        try:
            cat = catalog if catalog is not None else load_catalog(backend, cache_dir, max_object)
            self.meta, chunks = self._metadata(cat, commit_id)
        except MstoreError as exc:
            raise _unreachable(remote, backend, exc) from None
        # Only the locations of this commit's chunks and of their delta bases are kept: the
        # whole remote's catalog (every version ever pushed) would grow with the remote.
        self._locations: dict[bytes, Location] = {}
        self._damaged: dict[bytes, str] = {}
        self._gone: set[str] = set()  # remote packs found missing (logged once each)
        stack = [c.digest for c in chunks]
        while stack:
            digest = stack.pop()
            if digest in self._locations or digest in self._damaged:
                continue
            loc = cat.objects.get(("c", digest))
            if loc is None:
                pack = cat.damaged_keys.get(("c", digest))
                if pack is not None:
                    self._damaged[digest] = f"remote pack {pack}, which is {cat.damaged[pack]}"
                continue
            self._locations[digest] = loc
            if loc.base is not None:
                stack.append(loc.base)
        self._keeper = _Keeper(store) if keep else None
        # Downloads the deeper levels of delta chains (the caller's thread takes the first).
        self._pool = ThreadPoolExecutor(CHAIN_WORKERS, thread_name_prefix="mstore-mount-chain")

    # -- metadata: read once, verified, held ----------------------------------------------------
    def _metadata(self, cat: Catalog, commit_id: ObjectId) -> tuple[dict[tuple[str, bytes], bytes], set[ObjectId]]:
        """The commit's metadata objects read from the remote (raw), and its chunks."""
        src = RemoteSource(self.store, self.backend, cat, self.max_object)
        holding = _Holding(src)
        live = walk(holding, [commit_id], follow_parents=False)
        if src.errors:
            raise src.errors[0]
        if not live.complete:
            (kind, oid), err = next(iter(live.unreadable.items()))
            raise RemoteIntegrityError(f"cannot mount: {KINDS[kind]} {oid}: {err}")
        meta: dict[tuple[str, bytes], bytes] = {}
        for (kind, digest), r in src.received.items():
            if kind == "f":
                # A manifest's id is the hash of the file's content, which only reading every
                # chunk could confirm; what can be checked now is: a one-chunk file is that chunk.
                fobj = FileObject.parse(r.raw)
                if len(fobj.chunks) == 1 and fobj.chunks[0][0].digest != digest:
                    raise RemoteIntegrityError(
                        f"remote file manifest {r.oid}: its one chunk {fobj.chunks[0][0]} is another content"
                    )
            meta[(kind, digest)] = bytes(r.raw)
        # What the walk read from the local store is held too: a gc of the store while the
        # commit is mounted (it need not be reachable there) must not take a directory or file.
        for key, raw in holding.local.items():
            meta.setdefault(key, raw)
        return meta, live.chunks  # the source (and whole metadata packs it downloaded) is dropped

    def get(self, kind: str, oid: ObjectId, scratch: Scratch | None = None) -> bytes:
        """The verified raw bytes of an object of the mounted commit (``scratch``: see ObjectStore.get)."""
        try:
            if kind == "c":
                return self._chunk(oid, scratch)
            raw = self.meta.get((kind, oid.digest))
            if raw is not None:
                return raw
            # Every metadata object of the commit is held: this one is not part of it.
            raise ObjectNotFound(f"{KINDS.get(kind, kind)} {oid} is not part of the mounted commit", oid)
        except MstoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - a backend's own error must not leave FUSE without a reply
            raise StorageError(f"reading {KINDS.get(kind, kind)} {oid} from remote {self.remote}: {exc!r}") from None

    # -- chunks ----------------------------------------------------------------------------------
    def _local(self, oid: ObjectId, scratch: Scratch | None = None) -> bytes | None:
        if not self.store.has("c", oid):
            return None
        try:
            return self.store.get("c", oid, scratch=scratch)
        except MstoreError as exc:  # damaged, or collected by a gc since: the remote has it
            with self._lock:
                self.fallbacks += 1
            log.warning("local copy of chunk %s unreadable (%s); reading it from remote %s", oid, exc, self.remote)
            return None

    def _chunk(self, oid: ObjectId, scratch: Scratch | None = None) -> bytes:
        raw = self._local(oid, scratch)
        if raw is not None:
            with self._lock:
                self.local_chunks += 1
            return raw
        raw = self._remote_chunk(oid)
        with self._lock:
            self.remote_chunks += 1
        return raw

    def _locate(self, oid: ObjectId) -> Location:
        loc = self._locations.get(oid.digest)
        if loc is None:
            problem = self._damaged.get(oid.digest)
            if problem is not None:
                raise RemoteIntegrityError(f"chunk {oid} is only in {problem}")
            raise ObjectNotFound(f"chunk {oid} is neither in the store nor on remote {self.remote}", oid)
        if loc.raw_len > self.max_object:
            raise RemoteIntegrityError(f"remote chunk {oid} is {loc.raw_len:,} bytes, above {self.max_object:,}")
        return loc

    def location(self, oid: ObjectId) -> Location | None:
        """Where the remote holds chunk ``oid`` of this commit (or a delta base of one)."""
        return self._locations.get(oid.digest)

    def _fetch(self, oid: ObjectId, loc: Location, into: Any = None) -> Received:
        n = RECORD.size + loc.enc_len
        key = f"packs/{loc.pack}.pack"
        try:
            buf = self.backend.get_range(key, loc.offset, n)
        except BackendNotFound:
            # The pack index was read when the mount was made; a gc on the remote since then
            # can move a pack away once no ref (or reflog entry in retention) reaches it.
            with self._lock:
                first = loc.pack not in self._gone
                self._gone.add(loc.pack)
            if first:
                log.error(
                    "remote %s no longer has pack %s (a gc on the remote since this mount was made? "
                    "it may take what no remote ref reaches); chunks from it answer EIO: unmount and mount again",
                    self.remote,
                    loc.pack,
                )
            raise StorageError(
                f"chunk {oid}: remote {self.remote} no longer has pack {loc.pack} (a gc on the remote?); "
                "unmount and mount again"
            ) from None
        with self._lock:
            self.gets += 1
            self.bytes += len(buf)
        return verify_record(buf, "c", oid, loc, keep_raw=True, into=into)

    def _remote_chunk(self, oid: ObjectId) -> bytes:
        # The chain from this chunk down to a base the store has, or one stored whole.
        chain: list[tuple[ObjectId, Location]] = []
        base_raw: bytes | None = None
        cur = oid
        while True:
            loc = self._locate(cur)
            chain.append((cur, loc))
            if loc.base is None:
                break
            if len(chain) >= MAX_DELTA_CHAIN:
                raise RemoteIntegrityError(f"remote chunk {oid}: delta chain longer than {MAX_DELTA_CHAIN}")
            cur = ObjectId.from_digest(loc.base)
            if any(cur == c for c, _l in chain):
                raise RemoteIntegrityError(f"remote chunk {oid}: its delta chain is a cycle")
            base_raw = self._local(cur)
            if base_raw is not None:
                break
        levels = chain[::-1]  # the base first
        size = levels[0][1].raw_len  # every level of a chain has the chunk's length
        # Memory: the mount's cache reserves three raw lengths for a load. The chain is decoded
        # through two buffers (each level into the one its base is not in) and each level's
        # record is let go once decoded, so what is held is the records not yet decoded plus
        # two raw lengths; levels are downloaded at once in as few rounds as keep that within
        # the reservation (one round for a usual chain: a base and a delta or two).
        bufs: list[memoryview | None] = [None, None]

        def into(n: int) -> memoryview:  # the deepest level, stored whole: into buffer 0
            bufs[0] = memoryview(bytearray(n))
            return bufs[0]

        raw: Any = base_raw  # bytes or a view of one of the two buffers
        local_base = base_raw is not None
        base_raw = None
        side = 1  # the buffer the next level decodes into
        start = 0
        while start < len(levels):
            end = _round(levels, start, size, local_base)
            later = [self._pool.submit(self._fetch, c, loc) for c, loc in levels[start + 1 : end]]
            try:
                records: list[Received | None] = [self._fetch(*levels[start], into if start == 0 else None)]
                records += [f.result() for f in later]
            finally:
                for f in later:
                    f.cancel()
            later = []  # the futures would hold on to the records
            for j in range(len(records)):
                r = records[j]
                assert r is not None
                records[j] = None  # its bytes go once it is decoded (or to the keeper)
                if r.codec == codecs.DELTA:
                    if raw is None:
                        raise RemoteIntegrityError(f"remote delta chunk {r.oid}: its base is neither local nor remote")
                    out = bufs[side]
                    if out is None:
                        out = bufs[side] = memoryview(bytearray(size))
                    raw = decode_delta_checked(r, raw, lambda n, out=out: out)
                    del out
                    side = 1 - side
                else:
                    raw = r.raw
                r.raw = None  # only the encoded record is kept
                if self._keeper is not None:
                    self._keeper.offer([r])  # verified: bases reach the keeper before their deltas
                del r
            start = end
        assert raw is not None
        if isinstance(raw, bytes):
            return raw
        bufs[side] = None  # the last base's buffer: what is left is the result
        return bytes(raw)

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Index what is still queued (``keep``). The backend stays open: its opener closes it."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = _Closed(self._keeper)

    def summary(self) -> str:
        """What this source read, for the mount's log."""
        text = (
            f"remote {self.remote}: {self.remote_chunks} chunks fetched ({self.gets} ranged GETs, "
            f"{self.bytes:,} bytes), {self.local_chunks} read from the local store"
        )
        if self.fallbacks:
            text += f", {self.fallbacks} local copies unreadable (read from the remote)"
        if self._keeper is not None:
            k = self._keeper
            text += f"; {k.kept} chunks kept in the local store, {k.dropped} not kept"
            if k.error is not None:
                text += f" (keeping stopped: {k.error})"
        return text

    def __enter__(self) -> RemoteObjects:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _round(levels: list[tuple[ObjectId, Location]], start: int, size: int, local_base: bool) -> int:
    """Where the download round of chain ``levels`` (base first) starting at ``start`` ends.

    As many levels as keep a load within three raw lengths while they are decoded in turn:
    level ``j`` is decoded while the round's records from ``j`` on are held, with its base
    and its result (one raw length only for a base stored whole, which is the result itself).
    At least one level.
    """
    end = start + 1
    while end < len(levels):
        held = 0
        ok = True
        for j in range(end, start - 1, -1):
            held += levels[j][1].enc_len
            bufs = size if (j == 0 and not local_base) else 2 * size
            if held + bufs > 3 * size:
                ok = False
                break
        if not ok:
            break
        end += 1
    return end


# -- mounting (the facade's glue: uses repo.remotes, repo.store, repo.root, repo.lease) -----------


@contextmanager
def _opened(repo: Any, name: str) -> Iterator[Backend]:
    backend = open_remote(repo, name)
    try:
        yield backend
    finally:
        backend.close()


def mount_remote(
    repo: Any,
    remote: str,
    rev: str,
    mountpoint: str | os.PathLike,
    *,
    keep: bool = False,
    foreground: bool = False,
    detach: bool = False,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    readahead_bytes: int = DEFAULT_READAHEAD_BYTES,
    allow_other: bool = False,
    label: str | None = None,
    ready_fd: int | None = None,
    owner_pid: int | None = None,
    on_ready: Any = None,
    timeout: float = READY_TIMEOUT,
) -> Mount:
    """Mount what ``rev`` names on ``remote`` (a branch, a tag or a full commit id), lazily.

    The remote ref is read now and the mount serves that commit until it is unmounted. Objects
    the local store has are read from it; the rest from the remote, verified (module
    docstring). With ``keep`` the chunks read are also indexed locally (no ref moves). Other
    options as :func:`mstore.mount.mount_commit`.

    Raises:
        UserError: ``keep`` for a store of an older format version (:func:`check_keep`).
        RemoteNotFound: no such remote.
        RefNotFound: the remote has no such branch, tag or commit.
        StorageError: the remote cannot be reached.
        RemoteIntegrityError: the commit's metadata on the remote is missing or wrong.
        MountError, Conflict, UserError: as :func:`mstore.mount.mount_commit`.
    """
    if keep:
        check_keep(repo.store)
    label = label or f"{remote}/{rev}"
    child_args = ["--remote", remote, *(["--keep-chunks"] if keep else [])]
    common = dict(
        cache_bytes=cache_bytes,
        readahead_bytes=readahead_bytes,
        allow_other=allow_other,
        label=label,
        timeout=timeout,
        remote=remote,
    )
    with _opened(repo, remote) as backend:
        try:
            target = resolve_remote(remote, backend, rev)
        except StorageError as exc:
            raise _with_fetched_hint(repo, remote, rev, exc) from None
        try:
            catalog = load_catalog(backend, _cache_dir(repo, remote))
        except MstoreError as exc:
            raise _unreachable(remote, backend, exc) from None
        if target.ref is None and not catalog.has("m", target.commit.digest) and not repo.store.has("m", target.commit):
            raise RefNotFound(f"remote {remote} has no commit {target.commit}")
        if not foreground:
            # Resolved (and pinned) here, and the metadata checked before a child is started;
            # the child serves this commit id whatever the remote ref does meanwhile.
            RemoteObjects(repo.store, backend, remote, target.commit, catalog=catalog).close()
            return mount_commit(
                repo,
                label,
                mountpoint,
                detach=detach,
                owner_pid=owner_pid,
                commit_id=target.commit,
                child_args=child_args,
                **common,
            )
        objects = RemoteObjects(repo.store, backend, remote, target.commit, keep=keep, catalog=catalog)
        try:
            log.info(
                "serving %s (%s) from remote %s%s",
                label,
                target.commit.short,
                remote,
                ", keeping the chunks read" if keep else "",
            )
            return mount_commit(
                repo,
                label,
                mountpoint,
                foreground=True,
                ready_fd=ready_fd,
                owner_pid=owner_pid,
                on_ready=on_ready,
                commit_id=target.commit,
                objects=objects,
                workers=REMOTE_WORKERS,
                **common,
            )
        finally:
            objects.close()
            log.info("%s", objects.summary())


__all__ = [
    "REMOTE_WORKERS",
    "RemoteObjects",
    "Resolved",
    "mount_remote",
    "open_remote",
    "remote_target",
    "resolve_remote",
]
