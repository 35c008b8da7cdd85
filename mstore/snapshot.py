"""Snapshot a path into objects, and materialize objects back into files, verifying every byte.

Ingest runs a small pipeline: the main thread reads and chunks each file; a thread pool hashes
each chunk and, when the index does not already hold it, compresses it (BLAKE3 and zstd release
the GIL, so this uses every core); the main thread appends results to the pack in file order.
At most ``workers + 2`` chunks are in flight, which bounds memory whatever the file size.

Checkout writes each file under a temporary name inside the destination, opened relative to
directory descriptors with ``O_NOFOLLOW`` (so a symlink planted in the destination can never
redirect a write outside it). Worker threads decode chunks straight into the file at their
offsets; the written file is then hashed as a whole against the file's id (every byte, once),
and only then renamed to its final name. When that check fails, each chunk is verified against
its own id to name the damaged object.
"""

from __future__ import annotations

import importlib
import io
import os
import stat
import sys
import threading
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from . import codecs
from .chunking import (
    CDC_NAME,
    SAFETENSORS_NAME,
    TORCHZIP_NAME,
    ChunkPlan,
    Extent,
    may_hold_tensors,
    plan_file,
    plan_keyed_pieces,
    plan_zip_pieces,
    read_header,
)
from .chunking.cdc import cdc_chunks
from .errors import (
    Conflict,
    FileChanged,
    FormatError,
    IntegrityError,
    InvalidName,
    MstoreError,
    PathNotFound,
    UserError,
)
from .format import DELTA_MIN_VERSION, FLOATPLANE_MIN_VERSION, LOWRANK_MIN_VERSION
from .fsutil import unique_name
from .guards import VOCAB_FILES, VersionSummary, pick_vocab, vocab_size_of
from .hashing import ObjectId, StreamHasher, hash_bytes, hash_file, hash_own_file_fd
from .objects import (
    FILE_KIND,
    MODE_DIR,
    MODE_EXEC,
    MODE_FILE,
    TREE_KIND,
    FileObject,
    Tree,
    TreeEntry,
    load_file,
    load_tree,
)
from .storage.index import FLAG_WHOLE_STREAK, Entry
from .storage.store import MAX_DELTA_CHAIN, DeltaBaseMissing, ObjectStore, Scratch, WriteBatch

Progress = Callable[[int], None]

# Files at least this large may be hashed whole before chunking (see Ingest._unchanged).
PREHASH_MIN = 1 << 20

# A delta is stored only if it is smaller than this fraction of the piece stored whole.
DELTA_MIN_GAIN = 0.95
# A delta below this fraction of the raw piece is taken without estimating the whole encoding.
DELTA_SURE = 0.25
# A float32 matrix piece whose XOR delta is above this fraction of the piece stored whole is
# also tried as a low-rank delta (full fine-tunes' XORs save 20-30 %: they are not tried).
LOWRANK_TRY = 0.9
# Bytes of a piece XORed and encoded first to see whether a delta can pay at all: this many,
# or a quarter of a smaller piece, but never under DELTA_PROBE_MIN (such pieces: no probe).
DELTA_PROBE = 1 << 18
DELTA_PROBE_MIN = 1 << 15
# _delta's answer when the probe says a delta would not pay.
DELTA_HOPELESS: Any = object()  # a sentinel, never bytes

# Pieces a file's ingest keeps in flight: at least workers + 2, and more while they hold less
# than IN_FLIGHT_BYTES (up to IN_FLIGHT_MAX); a checkout's decoded chunks waiting to be written
# are bounded by the same bytes (Checkout._room). A model's pieces are mostly small tensors (a full
# fine-tune's 245 MB are 379 pieces, 0.65 MB on average): with only workers + 2 of them in flight
# the workers waited for the caller's thread and it for them (two cores 1.3 busy in a commit);
# 64 MiB in flight kept them 1.6 busy and cut the in-process commit of a full fine-tune's
# version 0.68 -> 0.59 s (median of 6). The bound keeps a commit's memory flat in file size.
IN_FLIGHT_BYTES = 64 << 20
IN_FLIGHT_MAX = 64
# Pieces at least this large are read into buffers of a pool kept for the repository's life
# (ResultBuffers), smaller ones into new bytes. Reading every piece of a 245 MB version into
# new memory faulted in and zeroed 245 MB of pages per commit, and on these virtual machines
# the copy into fresh pages ran at ~2 GB/s: ~15 % of a full fine-tune commit's CPU was the
# kernel's, on reads.
POOLED_READ_MIN = 256 << 10

# Vocabulary files larger than this are not parsed for the vocabulary guard.
MAX_VOCAB_FILE = 64 << 20


def _no_progress(_n: int) -> None:
    pass


@dataclass
class Stats:
    """What a snapshot holds; stored in the commit as ``stats``."""

    files: int = 0
    bytes: int = 0
    tensors: int = 0
    parameters: int = 0
    safetensors_files: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    vocab_size: int | None = None
    invalid_safetensors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the commit (store-dependent counters excluded: they are not identity)."""
        d: dict[str, Any] = {"files": self.files, "bytes": self.bytes}
        if self.safetensors_files:
            d.update(
                tensors=self.tensors,
                parameters=self.parameters,
                safetensors_files=self.safetensors_files,
                dtypes=dict(sorted(self.dtypes.items())),
            )
        if self.vocab_size is not None:
            d["vocab_size"] = self.vocab_size
        if self.invalid_safetensors:
            d["invalid_safetensors"] = self.invalid_safetensors
        return d


def _matrix_columns(key: Any, length: int) -> int:
    """Width of the float32 matrix whose whole rows piece ``key`` holds (``length`` bytes), else 0."""
    try:
        _name, dtype, shape, offset = key
    except (TypeError, ValueError):
        return 0
    if dtype != "F32" or not isinstance(shape, (tuple, list)) or len(shape) != 2:
        return 0
    row = int(shape[1]) * 4
    return int(shape[1]) if row and offset % row == 0 and length % row == 0 else 0


class _Lineage:
    """One file's float pieces in its parent and earlier first-parent versions: delta bases.

    Bases follow the skip-delta rule (Subversion's, for the same reason): the piece ``v``
    distinct versions after the last one stored whole is a delta against the version
    ``v & (v - 1)``, i.e. ``lowbit(v)`` distinct versions back, not against its parent. A chain then has at most
    popcount(v) links (at most 3 for v <= 8) instead of v, so reading any version decodes
    at most 4 chunks per piece instead of 9, and a commit decodes its base that much faster,
    for deltas over 1, 2, 4 or 8 versions of drift (full fine-tune series: 0.691 instead of
    0.682 stored/logical; partial fine-tune: 0.239 instead of 0.221). After ``max_depth``
    versions (default 8) the piece is stored whole again, as before.

    Earlier versions are read lazily (most pieces stop at their parent or grandparent).
    """

    def __init__(self, ingest: Ingest, rel: str, parent: dict):
        self.ingest = ingest
        self.rel = rel
        self.gens: list[dict] = [parent]  # gens[j - 1]: pieces of the version j back
        # Beyond the parent only along a line where the parent has this file itself (a piece
        # found in an older ancestor, because the parent lacks the file, has no history here).
        self.done = rel not in ingest.previous

    def _gen(self, j: int) -> dict | None:
        while len(self.gens) < j and not self.done:
            k = len(self.gens) - 1  # ingest.ancestors[0] is the grandparent (two back)
            if k >= len(self.ingest.ancestors):
                self.done = True
                break
            try:
                entry = resolve_path(self.ingest.store, self.ingest.ancestors[k], self.rel)
            except MstoreError:
                entry = None
            pieces = self.ingest._pieces_of(entry.id, self.rel) if entry is not None and entry.kind == FILE_KIND else {}
            if not pieces:
                self.done = True
                break
            self.gens.append(pieces)
        return self.gens[j - 1] if j <= len(self.gens) else None

    def bases(self, key: Any) -> tuple[ObjectId, ...]:
        """Delta bases for the piece ``key``, best first; empty: store it whole (a keyframe).

        Versions in which the piece did not change are not counted (an unchanged tensor keeps
        its chunk, whose chain did not grow). When the parent's piece does not chain down to
        the whole piece found (its chunk came from another line: a revert, a copied
        checkpoint), the history says nothing about it and the base is the parent's piece.
        """
        max_depth = self.ingest.max_depth
        distinct: list[ObjectId] = []  # the piece's versions, nearest first, repeats collapsed
        j = 0
        while True:
            j += 1
            gen = self._gen(j)
            cid = gen.get(key) if gen is not None else None
            entry = self.ingest.entry(cid) if cid is not None else None
            if entry is None:  # the history runs out before a whole piece: plain chain
                return (distinct[0],) if distinct else ()
            if not distinct or distinct[-1] != cid:
                distinct.append(cid)
            if entry.codec != codecs.DELTA:  # the last whole piece, v distinct versions back
                v = len(distinct)
                if v > 1 and cid not in self._chain_of(distinct[0]):
                    return (distinct[0],)
                skip = distinct[(v & -v) - 1]
                return (skip,) if skip == cid else (skip, cid)
            if len(distinct) >= max_depth:
                return ()  # max_depth versions since the last whole piece: this one is stored whole

    def _chain_of(self, cid: ObjectId) -> set[ObjectId]:
        """``cid`` and the bases its decoding goes through (the ``deltas`` table's edges)."""
        return {cid, *_delta_bases(self.ingest.store, cid, MAX_DELTA_CHAIN)}


def _delta_bases(store: ObjectStore, oid: ObjectId, limit: int) -> list[ObjectId]:
    """The bases a delta chunk's decoding goes through, nearest first, at most ``limit``.

    Read from the ``deltas`` table's edges, never from a depth byte a remote could forge.
    """
    out: list[ObjectId] = []
    digest = oid.digest
    with store.index.read() as txn:
        while len(out) < limit:
            row = txn.db_get("deltas", digest)
            if row is None:
                break
            digest = bytes(row[:32])
            out.append(ObjectId.from_digest(digest))
    return out


_worker_local = threading.local()


def settle(futures: Iterable[Future]) -> None:
    """Cancel the tasks not started yet and wait for the others.

    After a failure no task of the failed operation may still run: the workers are the
    repository's and outlive it, and a task left running would still be using its thread's
    buffers (and, for a checkout, a result buffer the repository hands out again) when the
    next operation starts.
    """
    futures = list(futures)
    for f in futures:
        f.cancel()
    for f in futures:
        if not f.cancelled():
            try:
                f.exception()  # waits; the failure already being raised is the one that counts
            except BaseException:  # a cancelled or interrupted wait: keep settling the rest
                pass


def worker_scratch(use: str) -> Scratch:
    """This thread's decode buffers for ``use``, kept for as long as the thread lives.

    ``use`` is "checkout" (chunks written out) or "base" (delta bases decoded while
    committing). A repository keeps its worker threads across commits and checkouts (Repo._worker_pool), so
    these buffers are allocated once: a fresh pool per checkout made every checkout fault in
    and zero its buffers anew (~80 MiB per worker), and on this kind of virtual machine new
    memory is slow to touch (in one process, six checkouts of a series took 1.07-4.3 s with a
    new pool each, 0.83-0.93 s with one kept).
    """
    scratch = getattr(_worker_local, use, None)
    if scratch is None:
        scratch = Scratch()
        setattr(_worker_local, use, scratch)
    return scratch


class _Whole:
    """What storing one piece whole costs, each part computed at most once.

    A delta is judged against it up to three times (the prefix probe, the low-rank threshold,
    the final choice): one encoding of the piece's first ``cut`` bytes (DELTA_PROBE, or a
    quarter of a smaller piece) serves all of them, and a piece of at most 2 x DELTA_PROBE is
    encoded whole once, for the estimate and the result.
    """

    def __init__(self, data: bytes, level: int, item_size: int, rotate: bool):
        self.data = data
        self.level = level
        self.item_size = item_size
        self.rotate = rotate
        cut = min(DELTA_PROBE, len(data) // 4)
        self.cut = cut - cut % max(1, item_size)
        # Encoded / raw size of this piece's chain root (the same tensor stored whole, one to
        # max_depth versions ago), when there is one: weights' statistics drift slowly, so it
        # predicts this version's ratio without encoding anything (see estimate()).
        self.ratio: float | None = None
        # The index flags (FLAG_WHOLE_STREAK) this piece gets if it is stored whole; set by
        # Ingest._delta when the parent's own piece, stored whole, was there to delta against.
        self.streak = 0
        self._prefix: int | None = None
        self._encoded: tuple[int, codecs.Payload] | None = None

    def _encode(self, view: bytes | memoryview, parts: int | None = None) -> tuple[int, codecs.Payload]:
        return codecs.encode(view, self.level, self.item_size, rotate=self.rotate, parts=parts)

    def prefix_size(self) -> int:
        """Encoded size of the first ``cut`` bytes (predicted from ``ratio`` when known)."""
        if self.ratio is not None and len(self.data) > self.cut:
            return int(self.ratio * self.cut)
        if self._prefix is None:
            if len(self.data) <= self.cut:
                self._prefix = codecs.payload_len(self.encoded()[1])
            else:
                self._prefix = len(self._encode(memoryview(self.data)[: self.cut])[1])
        return self._prefix

    def estimate(self) -> int:
        """About how many bytes the piece takes stored whole (exact for small pieces).

        From the chain root's ratio when known, else from a prefix: weights are statistically
        uniform across a tensor, so a 256 KiB prefix predicts the whole piece's ratio within a
        few percent (a full fine-tune's largest fp32 pieces: 0.832 estimated, 0.831 encoded).
        Either only decides whether a delta is clearly smaller; a close call encodes both.
        """
        if self._encoded is not None:
            return codecs.payload_len(self._encoded[1])
        if self.ratio is not None:
            return int(self.ratio * len(self.data))
        if len(self.data) <= 2 * DELTA_PROBE:
            return codecs.payload_len(self.encoded()[1])
        return int(self.prefix_size() * len(self.data) / self.cut)

    def encoded(self) -> tuple[int, codecs.Payload]:
        """``(codec, payload)`` of the piece stored whole.

        The payload may be parts (codecs.Payload) in this thread's WHOLE_PARTS scratch, which
        only this encoding uses: valid until the thread encodes its next piece whole.
        """
        if self._encoded is None:
            self._encoded = self._encode(self.data, codecs.WHOLE_PARTS)
        return self._encoded


class Ingest:
    """Turns files and directories into stored (or, with ``batch=None``, only hashed) objects."""

    def __init__(
        self,
        store: ObjectStore,
        batch: WriteBatch | None,
        progress: Progress = _no_progress,
        workers: int | None = None,
        previous: dict[str, tuple[int, ObjectId]] | None = None,
        ancestors: list[ObjectId] | None = None,
        pool: ThreadPoolExecutor | None = None,
        buffers: ResultBuffers | None = None,
    ):
        self.store = store
        self.batch = batch
        self.progress = progress
        # path -> (size, file id) in the parent version: a file of the same size is hashed
        # whole first, and if it is unchanged it is neither chunked nor hashed again.
        self.previous = previous or {}
        # Root trees of earlier first-parent ancestors: where a file the parent lacks is looked
        # for as a delta source (nearest first).
        self.ancestors = ancestors or []
        self.cdc_avg = int(store.config.get("chunking", "cdc_avg_size", 64 * 1024))
        self.tensor_max = int(store.config.get("chunking", "tensor_max_chunk", 16 << 20))
        self.matrix_rows = int(store.config.get("chunking", "matrix_rows", 0))
        self.level = int(store.config.get("codec", "zstd_level", codecs.DEFAULT_LEVEL))
        # ``pool``: the repository's long-lived workers (see worker_scratch); else threads of
        # this ingest's own, stopped by close().
        self._own_pool = pool is None
        self.workers = workers or (pool._max_workers if pool is not None else max(1, os.cpu_count() or 1))
        self.pool = pool if pool is not None else ThreadPoolExecutor(self.workers, thread_name_prefix="mstore-ingest")
        self.deltas = (
            batch is not None
            and store.config.version >= DELTA_MIN_VERSION
            and bool(store.config.get("delta", "enabled", True))
        )
        self.floatplanes = store.config.version >= FLOATPLANE_MIN_VERSION  # else BYTEPLANE (codec 2)
        self.lowrank = (
            self.deltas
            and store.config.version >= LOWRANK_MIN_VERSION
            and bool(store.config.get("delta", "lowrank", True))
        )
        # Readers refuse chains of MAX_DELTA_CHAIN links; writers stay below that whatever the config.
        self.max_depth = max(1, min(MAX_DELTA_CHAIN - 1, int(store.config.get("delta", "max_depth", 8))))
        self.delta_chunks = 0  # pieces stored as deltas against the parent
        self.stats = Stats()
        # path inside the snapshot -> FileObject, for status/diff without re-reading
        self.files: dict[str, tuple[ObjectId, FileObject]] = {}
        # Dry runs (batch None) count what a real commit would add.
        self.new_bytes = 0
        self._seen_new: set[ObjectId] = set()
        # Index entries of chunks found stored (the parent's pieces and their chain roots),
        # which the lineage, the delta and its chain look up again: each lookup is an LMDB
        # transaction that releases the GIL twice, and a commit made ~1600 of them. An entry
        # may go stale while a long commit runs (a gc or a compaction). Its record may then
        # still be readable through a descriptor the pack reader holds, but a delta against it
        # is only stored once the batch finds the base in the index or among what it re-uses
        # (else DeltaBaseMissing: the piece is stored whole), and everything re-used is
        # re-checked when the commit lands. Staleness costs ratio (or fails the commit with a
        # clear error), never a delta whose base is gone.
        self._entries: dict[ObjectId, Entry] = {}
        # What the workers read pieces into (the repository's, kept across operations).
        self.buffers = buffers if buffers is not None else ResultBuffers()
        # The batch is written by the workers (each stores the piece it encoded) and, while no
        # piece is in flight, by the caller's thread (file manifests, trees).
        self._batch_lock = threading.Lock()

    def close(self) -> None:
        """Stop the worker threads (unless they are the repository's)."""
        if self._own_pool:
            self.pool.shutdown(wait=True)

    def __enter__(self) -> Ingest:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- chunks ---------------------------------------------------------------------------
    def _work(
        self,
        piece: bytes | Extent,
        item_size: int,
        bases: tuple[ObjectId, ...] = (),
        cols: int = 0,
        probe: bool = True,
    ) -> tuple[bytes | memoryview, ObjectId, bool, bytearray | None]:
        """One piece, on a worker thread: read it (if an extent), hash, encode, store.

        Returns ``(bytes, id, already stored, buffer)``; the caller only feeds the file hash,
        in order, then gives the buffer the bytes were read into (if any) back to the pool.
        Storing here rather than on the caller's thread keeps both cores busy whatever the
        version: a file's first version (whole planes, ~1 GB/s per core) left the workers
        waiting for the one thread that read, hashed and wrote every piece, and a delta
        version (~0.35 GB/s) the other way round.
        """
        buf = None
        if not isinstance(piece, Extent):
            data: bytes | memoryview = piece
        elif piece.length >= POOLED_READ_MIN:
            buf = self.buffers.take(piece.length)
            data = piece.read(buf)
        else:
            data = piece.read()
        oid = hash_bytes(data)
        if self.store.has("c", oid):
            if self.batch is not None:
                with self._batch_lock:
                    if not self.batch.contains("c", oid):  # marks it re-used (age refresh) ...
                        # ... unless a concurrent gc took it since: store it again.
                        self.batch.add("c", oid, data, item_size=item_size)
            return data, oid, True, buf
        if self.batch is None:
            return data, oid, False, buf
        codec, payload, flags = self._encode(data, oid, item_size, bases, cols, probe)
        with self._batch_lock:
            # The same bytes twice in this commit are stored once; the index lacked them above.
            if not self.batch.contains("c", oid, unindexed=True):
                try:
                    self.batch.add_encoded("c", oid, oid.digest, codec, len(data), payload, flags)
                except DeltaBaseMissing:  # a concurrent gc took the base: store it whole
                    self.batch.add("c", oid, data, item_size=item_size)
                else:
                    self.delta_chunks += codec == codecs.DELTA
        return data, oid, False, buf

    def _encode(
        self, data: bytes, oid: ObjectId, item_size: int, bases: tuple[ObjectId, ...], cols: int, probe: bool = True
    ) -> tuple[int, codecs.Payload, int]:
        """The piece's codec, payload and index flags: whole, or a delta against one of ``bases``.

        The payload may be parts in this thread's scratch (codecs.Payload): the caller writes
        it before the thread encodes another piece.
        """
        whole = _Whole(data, self.level, item_size, self.floatplanes)
        delta = self._delta(data, item_size, tuple(b for b in bases if b != oid), cols, whole, probe) if bases else None
        if delta is DELTA_HOPELESS:
            delta = None
        # A delta clearly smaller than the whole piece would be (estimated from its chain
        # root's ratio, or from a prefix) wins
        # without encoding the piece whole as well; a close call encodes both and compares. A
        # delta under a quarter of the raw bytes needs no estimate: float tensors stored whole
        # do not get near that (bf16 weights ~0.66, fp32 ~0.82).
        elif delta is not None and (
            (size := codecs.payload_len(delta)) <= DELTA_SURE * len(data) or size <= 0.9 * whole.estimate()
        ):
            return codecs.DELTA, delta, 0
        codec, payload = whole.encoded()
        # Every read of a delta decodes its chain, so a delta must save at least 5 % of the
        # piece stored whole to be worth that (Adam's first moment, say, barely does).
        if delta is not None and codecs.payload_len(delta) < DELTA_MIN_GAIN * codecs.payload_len(payload):
            return codecs.DELTA, delta, 0
        return codec, payload, whole.streak

    def _delta(
        self, data: bytes, item_size: int, bases: tuple[ObjectId, ...], cols: int, whole: _Whole, probe: bool = True
    ) -> Any:
        """``data`` as a DELTA payload against the first of ``bases`` whose chain may grow.

        None if it cannot be one (chains too deep, bases unusable); DELTA_HOPELESS if a prefix
        shows it would not pay. ``cols``: the piece is rows of a float32 matrix that wide
        (0: it is not), which makes a low-rank delta possible. ``whole``: what storing the
        piece whole costs, estimated once for every comparison made here and by the caller.
        ``probe``: the first base is the parent's piece, so a base stored whole may mean its
        last delta did not pay (see below); False: deltas paid since that base, no probe. An
        older base, taken because the parent's chain is too deep, is not probed either.
        """
        for base in bases:
            entry = self.entry(base)
            if entry is None or entry.raw_len != len(data):
                continue
            # Counting stops past max_depth, which is all that is compared.
            chain = _delta_bases(self.store, base, self.max_depth + 1) if entry.codec == codecs.DELTA else []
            depth = 1 + len(chain)
            if depth <= self.max_depth:
                break
        else:
            return None  # a keyframe: the chain restarts with this piece stored whole
        probe = probe and base == bases[0]
        root = self.entry(chain[-1]) if chain else entry
        if root is not None and root.codec != codecs.DELTA and root.raw_len == len(data) and root.raw_len:
            whole.ratio = root.enc_len / root.raw_len  # the same piece, stored whole at most a chain ago
        # This piece's index flags if it ends up stored whole after the tries below.
        tried = 0
        if probe and entry.codec != codecs.DELTA:
            # The parent's own piece, stored whole. If it was stored whole although its own
            # parent's piece was there to delta against (its streak), deltas of this tensor did
            # not pay: Adam's moments move as much as they are, every step (a full fine-tune:
            # 124 pieces, 164 MB of its 245 MB version). Their probe alone cost half of what
            # storing them whole does, for nothing. So after a failed try the next three
            # versions are stored whole without one and the fourth tries again: a tensor whose
            # deltas start to pay (a learning rate decaying) waits at most three versions.
            streak = entry.flags & FLAG_WHOLE_STREAK
            tried = (streak + 1) & FLAG_WHOLE_STREAK
            if streak:
                whole.streak = tried
                return DELTA_HOPELESS
        scratch = worker_scratch("base")
        lowrank = bool(cols) and self.lowrank
        # A parent's piece stored whole means its last delta did not pay (optimizer moments that
        # move as much as they are) or its chain restarted. Then XOR a prefix first, against the
        # base's prefix decoded alone: where it does not pay, the base is neither decoded nor
        # hashed whole and the whole XOR is not encoded (a full fine-tune's Adam first moments:
        # 100 MB of its 245 MB version). A base that is itself a delta paid last time, and a
        # whole base some versions back (skip-delta) has had deltas that paid since: no probe.
        hopeless = False
        if probe and whole.cut >= DELTA_PROBE_MIN and entry.codec != codecs.DELTA:
            cut = whole.cut
            try:
                head = self.store.chunk_prefix(base, entry, cut, scratch)
            except MstoreError:
                return None  # a damaged base is fsck's to report; this piece is stored whole
            if head is not None:
                trial = codecs.encode_delta(memoryview(data)[:cut], head, base.digest, depth, self.level, item_size)
                hopeless = len(trial) > DELTA_MIN_GAIN * whole.prefix_size()
                if hopeless and not lowrank:
                    whole.streak = tried
                    return DELTA_HOPELESS
        try:
            raw = self.store.chunk_view(base, entry, scratch)
            if hash_bytes(raw) != base:  # the chain is decoded unhashed: check the result once
                return None
        except MstoreError:
            return None  # a damaged base is fsck's to report; this piece is stored whole
        xor = (
            DELTA_HOPELESS
            if hopeless
            else codecs.encode_delta(data, raw, base.digest, depth, self.level, item_size, parts=codecs.DELTA_PARTS)
        )
        whole.streak = tried  # (0 if the delta returned is stored: _encode decides)
        # A float32 matrix whose XOR barely pays may differ from its base by a low-rank update
        # (a merged LoRA adapter): try base + U @ V plus a residual (format >= 3).
        if lowrank and (xor is DELTA_HOPELESS or codecs.payload_len(xor) > LOWRANK_TRY * whole.estimate()):
            low = codecs.encode_lowrank_delta(data, raw, base.digest, depth, cols, self.level)
            if low is not None and (xor is DELTA_HOPELESS or len(low) < codecs.payload_len(xor)):
                return low
        return xor

    def entry(self, oid: ObjectId) -> Entry | None:
        """The index entry of stored chunk ``oid`` (remembered once found), or None."""
        entry = self._entries.get(oid)
        if entry is None:
            entry = self.store.entry("c", oid)
            if entry is not None:
                self._entries[oid] = entry
        return entry

    def _ancestor_file(self, rel: str) -> ObjectId | None:
        """The id of the file at ``rel`` in the nearest earlier ancestor that has one."""
        for tid in self.ancestors:
            try:
                entry = resolve_path(self.store, tid, rel)
            except MstoreError:
                continue
            if entry.kind == FILE_KIND:
                return entry.id
        return None

    def _parent_pieces(self, rel: str) -> dict:
        """The parent version's float pieces of the file at ``rel``, by what they are.

        Keys name a tensor of a safetensors file or a storage entry of a torch archive (see
        ChunkPlan.piece_keys); empty if there is nothing to compute deltas against (no parent
        file there, chunked by content, unreadable). A file the parent lacks is looked for in
        the nearest earlier ancestor (a merged model beside its base, say).
        """
        if not self.deltas:
            return {}
        prev = self.previous.get(rel)
        source = prev[1] if prev is not None else self._ancestor_file(rel)
        if source is None:
            return {}
        return self._pieces_of(source, rel)

    def _pieces_of(self, source: ObjectId, rel: str) -> dict:
        """Float pieces of stored file ``source`` by key (see :meth:`_parent_pieces`)."""
        try:
            pfobj = load_file(self.store, source)
            if pfobj.chunker not in (SAFETENSORS_NAME, TORCHZIP_NAME):
                return {}
            with FileReader(self.store, source, pfobj, rel) as f:
                if pfobj.chunker == SAFETENSORS_NAME:
                    keyed = plan_keyed_pieces(
                        read_header(f, pfobj.size), pfobj.size, self.tensor_max, self.matrix_rows
                    )
                else:
                    keyed = plan_zip_pieces(f, pfobj.size, self.tensor_max)
        except MstoreError:
            return {}
        if len(keyed) != len(pfobj.chunks):
            return {}
        pos = 0
        for (off, n, _hint, _key), (_cid, cn) in zip(keyed, pfobj.chunks, strict=True):
            if off != pos or n != cn:
                return {}  # cut otherwise (other chunking settings then): no piece is known to match
            pos += cn
        return {key: cid for (_off, _n, hint, key), (cid, _cn) in zip(keyed, pfobj.chunks, strict=True) if key and hint}

    def _unchanged(self, f: BinaryIO, size: int, rel: str, plan: ChunkPlan) -> tuple[ObjectId, FileObject] | None:
        # Hash the whole file first (one fast multi-threaded pass, about 5 % of what storing new
        # data costs) where the store may hold it already: the parent had a file of this size
        # here and a couple of its chunks do not prove it changed (unchanged, or an earlier
        # version committed again), or it is large and new here but its first chunk is stored
        # (a copy). Then it is neither chunked nor hashed again.
        prev = self.previous.get(rel)
        likely = prev is not None and prev[0] == size
        if size == 0 or not (likely or size >= PREHASH_MIN):
            return None
        if likely and size >= PREHASH_MIN and self._differs_from(f, size, prev[1]):
            return None
        if not likely and not self._first_piece_stored(f, size, plan):
            return None
        fid = hash_file(f, size)
        if not self.store.has("f", fid):
            return None
        try:
            fobj = load_file(self.store, fid)
        except MstoreError:
            return None  # damaged manifest: store the file afresh
        if self.batch is not None:
            # Re-used: refresh the ages of the manifest and of every chunk it names, and re-check
            # them all at commit time. A young manifest over old chunks would otherwise let gc
            # take the chunks and keep the manifest.
            if not self.batch.contains("f", fid):
                return None
            for cid, _n in fobj.chunks:
                if not self.batch.contains("c", cid):
                    return None  # a chunk is gone (damage or a concurrent gc): store the file afresh
        return fid, fobj

    def _first_piece_stored(self, f: BinaryIO, size: int, plan: ChunkPlan) -> bool:
        """False if the file's first piece is stored under neither chunker: nor is the file.

        A file new at its path (a first checkpoint, a new shard) is stored already only if it
        is a copy of one stored elsewhere, and then that copy's first chunk is stored: its first
        tensor-plan piece (a safetensors header, an archive's first entry), or, where the copy
        was cut by content (stored under another name: a download cache's blob), its first
        FastCDC chunk, which depends only on the first ``4 * cdc_avg`` bytes. Hashing those two
        instead of the whole file saves a pass over every new file, which on a first version
        kept the workers waiting. Files cut by content have no tensor plan: True (hash them
        whole, as before).
        """
        if plan.chunker == CDC_NAME:
            return True  # (its sources() would read the file from where it stands)
        for piece, n, _hint in plan.sources():
            if n:  # empty pieces are never stored
                assert isinstance(piece, Extent)
                if self.store.has("c", hash_bytes(piece.read())):
                    return True
                break
        head = os.pread(f.fileno(), min(size, 4 * self.cdc_avg), 0)
        first = next(cdc_chunks(io.BytesIO(head), self.cdc_avg), b"")
        return bool(first) and self.store.has("c", hash_bytes(first))

    def _differs_from(self, f: BinaryIO, size: int, fid: ObjectId) -> bool:
        """True if a few of file ``fid``'s chunks are provably not where they were in ``f``.

        A checkpoint saved over the parent's has the parent's size and different bytes, and
        hashing it whole first would only cost a pass for nothing. Hashing the byte ranges of
        up to two of the parent's chunks (the last one and a middle one, none above 1/8 of the
        file) settles most such cases: a range that no longer hashes to its chunk's id proves
        the file changed, unless the store already holds those bytes as a chunk (an older
        version committed again). False means "cannot tell" (the caller then hashes the whole
        file).
        """
        try:
            chunks = load_file(self.store, fid).chunks
        except MstoreError:
            return False
        starts = [0]
        for _cid, n in chunks:
            starts.append(starts[-1] + n)
        if starts[-1] != size:
            return False
        fd = f.fileno()
        for i in sorted({len(chunks) - 1, len(chunks) // 2}, reverse=True):
            cid, n = chunks[i]
            if i == 0 or n > max(size // 8, 1 << 16):
                continue
            data = os.pread(fd, n, starts[i])
            if len(data) != n:
                return False
            got = hash_bytes(data)
            if got != cid:
                # Changed since the parent; but bytes the store already holds there suggest an
                # older version committed again (a restore): then the whole-file hash pays.
                return not self.store.has("c", got)
        return False

    def ingest_file(self, path: Path, rel: str) -> tuple[ObjectId, int]:
        """Store one regular file; returns (file id, size)."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            plan = plan_file(f, size, path.name, self.cdc_avg, self.tensor_max, self.matrix_rows)
            try:
                same = self._unchanged(f, size, rel, plan)
            except FileChanged:  # the file was cut while being hashed
                raise FileChanged(f"{path} changed size while it was being committed") from None
            if same is not None:
                self.progress(size)
                self._account(rel, size, same[0], same[1], plan)
                return same[0], size
            hasher = StreamHasher()
            chunks: list[tuple[ObjectId, int]] = []
            inflight: deque[Future] = deque()
            least = self.workers + 2
            held = 0  # raw bytes of the pieces in flight
            total = 0

            def drain_one() -> None:
                nonlocal total, held
                data, oid, exists, buf = inflight[0].result()
                inflight.popleft()
                held -= len(data)
                hasher.update(data)
                if buf is not None:
                    self.buffers.give(buf)
                chunks.append((oid, len(data)))
                total += len(data)
                if self.batch is None and not exists and oid not in self._seen_new:
                    self._seen_new.add(oid)
                    self.new_bytes += len(data)
                self.progress(len(data))

            parent = self._parent_pieces(rel) if plan.chunker != CDC_NAME else {}
            lineage = _Lineage(self, rel, parent) if parent else None
            keys = plan.piece_keys() if parent else []
            try:
                for i, (piece, length, item_size) in enumerate(plan.sources()):
                    if not length:
                        continue
                    bases: tuple[ObjectId, ...] = ()
                    cols = 0
                    probe = True
                    if lineage is not None and item_size and i < len(keys) and keys[i] is not None:
                        bases = lineage.bases(keys[i])
                        cols = _matrix_columns(keys[i], length)
                        probe = bool(bases) and bases[0] == parent.get(keys[i])
                    inflight.append(self.pool.submit(self._work, piece, item_size, bases, cols, probe))
                    held += length
                    while len(inflight) >= IN_FLIGHT_MAX or (len(inflight) >= least and held >= IN_FLIGHT_BYTES):
                        drain_one()
                while inflight:
                    drain_one()
            except FileChanged:  # a piece read short: the file was cut while being committed
                settle(inflight)
                raise FileChanged(f"{path} changed size while it was being committed") from None
            except BaseException:
                settle(inflight)  # none of this commit's tasks may outlive it
                raise
        if total != size:
            raise FileChanged(f"{path} changed size while it was being committed")
        fid = hasher.id()
        fobj = FileObject(size, plan.chunker, tuple(chunks))
        if self.batch is not None:
            self.batch.add("f", fid, fobj.to_bytes())
        self._account(rel, size, fid, fobj, plan)
        return fid, size

    def _account(self, rel: str, size: int, fid: ObjectId, fobj: FileObject, plan: ChunkPlan) -> None:
        self.files[rel] = (fid, fobj)
        st = self.stats
        st.files += 1
        st.bytes += size
        if plan.header is not None:
            st.safetensors_files += 1
            st.tensors += len(plan.header.tensors)
            st.parameters += plan.header.parameters
            for t in plan.header.tensors:
                st.dtypes[t.dtype] = st.dtypes.get(t.dtype, 0) + 1
        elif plan.header_error is not None:
            st.invalid_safetensors.append(f"{rel}: {plan.header_error}")

    # -- trees ----------------------------------------------------------------------------
    def _entry_for(self, path: Path, name: str, rel: str, st: os.stat_result) -> TreeEntry:
        if stat.S_ISLNK(st.st_mode):
            try:
                target = path.stat()
            except OSError:
                raise UserError(f"{path}: dangling symlink") from None
            if not stat.S_ISREG(target.st_mode):
                raise UserError(f"{path}: symlinks are followed only to regular files")
            st = target
        if stat.S_ISREG(st.st_mode):
            fid, size = self.ingest_file(path, rel)
            mode = MODE_EXEC if st.st_mode & 0o111 else MODE_FILE
            return TreeEntry(name, FILE_KIND, mode, fid, size)
        if stat.S_ISDIR(st.st_mode):
            tid, size = self.ingest_dir(path, rel)
            return TreeEntry(name, TREE_KIND, MODE_DIR, tid, size)
        raise UserError(f"{path}: not a regular file or directory")

    def ingest_dir(self, path: Path, rel: str = "") -> tuple[ObjectId, int]:
        """Store a directory recursively; returns (tree id, total bytes)."""
        entries = []
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            raise UserError(f"cannot read directory {path}: {exc.strerror}") from None
        for name in names:
            _check_fs_name(name, path)
            child = path / name
            entries.append(self._entry_for(child, name, f"{rel}{name}" if not rel else f"{rel}/{name}", child.lstat()))
        tree = Tree.build(entries)
        raw = tree.to_bytes()
        tid = tree.id
        if self.batch is not None:
            self.batch.add("t", tid, raw)
        return tid, sum(e.size for e in entries)

    def ingest_root(self, path: Path) -> ObjectId:
        """Snapshot ``path``: a directory becomes the root tree; a file, a tree of one entry.

        Raises:
            PathNotFound: ``path`` does not exist.
            UserError: unreadable or special files, bad names.
        """
        try:
            st = path.lstat()
        except FileNotFoundError:
            raise PathNotFound(f"{path} does not exist") from None
        if stat.S_ISDIR(st.st_mode):
            tid, _ = self.ingest_dir(path)
            return tid
        name = path.name
        _check_fs_name(name, path.parent)
        entry = self._entry_for(path, name, name, st)
        tree = Tree.build([entry])
        if self.batch is not None:
            self.batch.add("t", tree.id, tree.to_bytes())
        return tree.id


def import_numpy_meanwhile() -> None:
    """Start importing numpy on a thread, if no one has: the codecs need it for float pieces.

    The import costs ~60 ms of a ~240 ms command-line commit of a 41 MB checkpoint; begun as
    soon as a commit or checkout knows it holds a tensor file, it overlaps with the guards,
    provenance and the first hashes, or with reading the tree and the first records (and a
    JSONL-only version does not pay for it at all).
    The import lock makes a second importer wait for this one, never run it twice.
    """
    if "numpy" in sys.modules:
        return
    threading.Thread(target=importlib.import_module, args=("numpy",), name="mstore-import", daemon=True).start()


def scan(path: Path) -> VersionSummary:
    """The guards' view of a path, without reading any tensor data.

    Sizes come from ``stat``, tensors from safetensors headers, the vocabulary from small
    tokenizer/config files: cheap enough to run before a single byte is stored, so a refused
    commit leaves nothing behind.

    Raises:
        PathNotFound: ``path`` does not exist.
    """
    if not path.exists():
        raise PathNotFound(f"{path} does not exist")
    summary = VersionSummary()
    vocab: dict[str, int] = {}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        rel = f.name if f == path else f.relative_to(path).as_posix()
        size = f.stat().st_size
        summary.bytes += size
        summary.files += 1
        summary.tensor_files += may_hold_tensors(f.name)
        if f.name.endswith(".safetensors"):
            try:
                with open(f, "rb") as fh:
                    h = read_header(fh, size)
                summary.tensors[rel] = {t.name: (t.dtype, t.shape) for t in h.tensors}
            except FormatError:
                pass
        if f.name in VOCAB_FILES and size <= MAX_VOCAB_FILE:
            vs = vocab_size_of(f.name, f.read_bytes())
            if vs is not None:
                vocab[rel] = vs
    summary.vocab_size = pick_vocab(vocab)
    return summary


def _check_fs_name(name: str, parent: Path) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidName(f"{parent / name!r}: file name is not valid UTF-8") from None


# -- reading ------------------------------------------------------------------------------


class FileReader(io.RawIOBase):
    """A seekable, read-only, verified stream over a stored file.

    Every chunk is verified against its id when it is read; a sequential read from the start to
    the end also verifies the whole file against its id.
    """

    def __init__(self, store: ObjectStore, fid: ObjectId, fobj: FileObject, name: str = ""):
        super().__init__()
        self.store = store
        self.fid = fid
        self.fobj = fobj
        self.name = name or str(fid)
        self._starts = []
        pos = 0
        for _cid, n in fobj.chunks:
            self._starts.append(pos)
            pos += n
        self._pos = 0
        self._cache_index = -1
        self._cache = b""
        self._hasher: StreamHasher | None = StreamHasher()
        self._hashed_to = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.fobj.size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def _chunk(self, i: int) -> bytes:
        if i != self._cache_index:
            cid, n = self.fobj.chunks[i]
            try:
                data = self.store.get("c", cid)
            except IntegrityError as exc:
                raise IntegrityError(f"{self.name} (bytes {self._starts[i]}-{self._starts[i] + n}): {exc}") from None
            if len(data) != n:
                raise IntegrityError(f"chunk {cid} of {self.name} has {len(data)} bytes, manifest says {n}")
            self._cache, self._cache_index = data, i
        return self._cache

    def readinto(self, buf: Any) -> int:
        """Fill ``buf`` as far as the file allows (across chunk boundaries, like a regular file)."""
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view) and self._pos < self.fobj.size:
            i = bisect_right(self._starts, self._pos) - 1
            data = self._chunk(i)
            off = self._pos - self._starts[i]
            n = min(len(view) - done, len(data) - off)
            view[done : done + n] = data[off : off + n]
            if self._hasher is not None and self._pos == self._hashed_to:
                self._hasher.update(view[done : done + n])
                self._hashed_to += n
                if self._hashed_to == self.fobj.size:
                    got = self._hasher.id()
                    self._hasher = None
                    if got != self.fid:
                        raise IntegrityError(f"{self.name}: content hashes to {got}, expected {self.fid}")
            self._pos += n
            done += n
        return done

    def read(self, size: int = -1) -> bytes:
        """Read ``size`` bytes (all remaining if negative); fewer only at the end of the file."""
        if size is None or size < 0:
            size = max(0, self.fobj.size - self._pos)
        buf = bytearray(min(size, max(0, self.fobj.size - self._pos)))
        n = self.readinto(buf)
        return bytes(buf[:n])

    def iter_chunks(self, pool: ThreadPoolExecutor | None = None, window: int = 4) -> Iterator[bytes]:
        """Every chunk in order, verified (decoded ahead in ``pool`` when given)."""
        hasher = StreamHasher()
        if pool is None:
            for i in range(len(self.fobj.chunks)):
                data = self._chunk(i)
                hasher.update(data)
                yield data
        else:
            chunks = self.fobj.chunks
            futs: deque[Future] = deque()
            nxt = 0
            while nxt < len(chunks) or futs:
                while nxt < len(chunks) and len(futs) < window:
                    futs.append(pool.submit(self.store.get, "c", chunks[nxt][0]))
                    nxt += 1
                try:
                    data = futs.popleft().result()
                except IntegrityError as exc:
                    raise IntegrityError(f"{self.name}: {exc}") from None
                hasher.update(data)
                yield data
        got = hasher.id()
        if got != self.fid:
            raise IntegrityError(f"{self.name}: content hashes to {got}, expected {self.fid}")


def resolve_path(store: ObjectStore, root: ObjectId, path: str) -> TreeEntry:
    """The entry at ``path`` (``a/b/c``) inside the tree ``root``.

    Raises:
        PathNotFound: no such entry.
    """
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts:
        return TreeEntry("", TREE_KIND, MODE_DIR, root, 0)
    tree = load_tree(store, root)
    for i, part in enumerate(parts):
        entry = tree.get(part)
        if entry is None:
            raise PathNotFound(f"{'/'.join(parts[: i + 1])} is not in this commit")
        if i == len(parts) - 1:
            return entry
        if entry.kind != TREE_KIND:
            raise PathNotFound(f"{'/'.join(parts[: i + 1])} is a file, not a directory")
        tree = load_tree(store, entry.id)
    raise AssertionError("unreachable")


def walk_files(store: ObjectStore, root: ObjectId, prefix: str = "") -> Iterator[tuple[str, TreeEntry]]:
    """(path, entry) of every file under a tree, in sorted path order."""
    tree = load_tree(store, root)
    for e in tree.entries:
        path = f"{prefix}{e.name}"
        if e.kind == TREE_KIND:
            yield from walk_files(store, e.id, path + "/")
        else:
            yield path, e


# -- checkout -----------------------------------------------------------------------------


class ResultBuffers:
    """Buffers that checkout workers decode into and commit workers read pieces into.

    A checkout's writing thread writes from them, a commit's hashing thread hashes from them.
    A repository keeps one set beside its workers, for all its checkouts and commits: fresh
    memory costs a page fault per 4 KiB, and a fresh set per checkout made checkouts 25-35 %
    slower. A chunk gets the smallest free buffer that holds it; new ones are sized in whole
    MiB, so chunks of similar sizes share them. What a checkout holds at once is bounded by
    ``Checkout._room`` (counted in buffer sizes), what a commit holds by IN_FLIGHT_BYTES
    (counted in piece sizes: a small piece may hold a larger buffer); at most ``keep`` free
    buffers are kept, the smallest let go.
    """

    def __init__(self, keep: int = 16):
        self._free: list[bytearray] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self, n: int) -> bytearray:
        """A buffer of at least ``n`` bytes."""
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if len(b) >= n]
            if fits:
                return self._free.pop(min(fits, key=lambda i: len(self._free[i])))
        return bytearray(-(-n // _BUFFER_UNIT) * _BUFFER_UNIT if n > _BUFFER_UNIT else n)

    def give(self, buf: bytearray) -> None:
        """Return a buffer taken with :meth:`take`."""
        with self._lock:
            self._free.append(buf)
            if len(self._free) > self._keep:
                self._free.remove(min(self._free, key=len))


# New result buffers above this size are rounded up to a multiple of it.
_BUFFER_UNIT = 1 << 20



class Checkout:
    """Materialize a tree under a destination directory, verifying every byte."""

    def __init__(
        self,
        store: ObjectStore,
        progress: Progress = _no_progress,
        workers: int | None = None,
        pool: ThreadPoolExecutor | None = None,
        buffers: ResultBuffers | None = None,
    ):
        self.store = store
        self.buffers = buffers if buffers is not None else ResultBuffers()
        self.progress = progress
        # ``pool``: the repository's long-lived workers (see worker_scratch); else our own.
        self._own_pool = pool is None
        self._workers = workers or (pool._max_workers if pool is not None else max(1, os.cpu_count() or 1))
        self.pool = pool if pool is not None else ThreadPoolExecutor(self._workers, thread_name_prefix="mstore-co")
        self.files = 0
        self.bytes = 0

    def close(self) -> None:
        """Stop worker threads (unless they are the repository's, which are only let go)."""
        if self._own_pool and self.pool is not None:
            self.pool.shutdown(wait=True)
        self.pool = None  # a Checkout kept by the caller must not keep the repository's workers

    def run(self, entry: TreeEntry, dest: Path, force: bool = False) -> None:
        """Write a tree's contents (or one file, under its own name) into ``dest``.

        Raises:
            Conflict: ``dest`` is not empty and ``force`` is False, or a path is in the way.
            IntegrityError: stored bytes do not match their ids (the file is not created).
        """
        if dest.exists() and not dest.is_dir():
            raise Conflict(f"{dest} exists and is not a directory")
        if dest.exists() and any(dest.iterdir()) and not force:
            raise Conflict(f"{dest} is not empty; use --force to write into it")
        dest.mkdir(parents=True, exist_ok=True)
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if entry.kind == TREE_KIND:
                self._tree(entry.id, fd, str(dest))
            else:
                self._file(entry, fd, str(dest))
        finally:
            os.close(fd)

    def _tree(self, tid: ObjectId, dir_fd: int, shown: str) -> None:
        tree = load_tree(self.store, tid)
        for e in tree.entries:
            if e.kind == TREE_KIND:
                try:
                    os.mkdir(e.name, MODE_DIR, dir_fd=dir_fd)
                except FileExistsError:
                    pass
                try:
                    sub = os.open(e.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                except OSError:
                    raise Conflict(f"{shown}/{e.name} exists and is not a directory (or is a symlink)") from None
                try:
                    self._tree(e.id, sub, f"{shown}/{e.name}")
                finally:
                    os.close(sub)
            else:
                self._file(e, dir_fd, shown)

    def _file(self, e: TreeEntry, dir_fd: int, shown: str) -> None:
        fobj = load_file(self.store, e.id)
        if fobj.size != e.size:
            raise IntegrityError(f"{shown}/{e.name}: tree says {e.size} bytes, manifest says {fobj.size}")
        tmp = unique_name(".mstore-", ".tmp")
        # Read-write: the finished file is hashed through a memory map of itself.
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
        ok = False
        try:
            self._write_content(fd, e.id, fobj, f"{shown}/{e.name}")
            os.fchmod(fd, e.mode)
            os.close(fd)
            fd = -1
            try:
                st = os.stat(e.name, dir_fd=dir_fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    raise Conflict(f"{shown}/{e.name} exists and is a directory")
            except FileNotFoundError:
                pass
            os.replace(tmp, e.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            ok = True
            self.files += 1
            self.bytes += e.size
        finally:
            if fd >= 0:
                os.close(fd)
            if not ok:
                try:
                    os.unlink(tmp, dir_fd=dir_fd)
                except OSError:
                    pass

    def _write_content(self, fd: int, fid: ObjectId, fobj: FileObject, name: str) -> None:
        """Decode a file's chunks in parallel, write each here as it completes, verify the file.

        Workers read and decode each chunk into a buffer of its own (``self.buffers``, the
        repository's, reused across checkouts); this thread ``pwrite``s the results. Writes to
        one file take its inode lock, so workers that wrote themselves queued behind each
        other, the waiting one spinning: two threads writing one file took as long as one, with
        50 % more CPU; decoding there and writing in one thread costs 7-10 % less CPU. Chunks
        are not hashed one by one: the file's id is BLAKE3 of its whole content, and hashing the
        written file (multi-threaded, from the page cache) proves every byte at once. Only when
        that fails is each chunk hashed, to name the damaged object. (Hashing each finished
        stretch in this thread while the workers decode the rest was measured 5-10 % slower on
        2 cores: three busy threads on two cores.)

        Raises:
            IntegrityError: a chunk is missing or damaged, or the content is not the file's id.
        """
        chunks = fobj.chunks
        with self.store.index.read() as txn:
            entries = [txn.get_entry("c", cid.digest) for cid, _n in chunks]
        if any(entry is None or entry.raw_len != n for entry, (_cid, n) in zip(entries, chunks, strict=True)):
            self._diagnose(fid, fobj, name)  # raises, naming the missing chunk or the wrong length
        starts = []
        pos = 0
        for _cid, n in chunks:
            starts.append(pos)
            pos += n
        pending: dict[Future, tuple[int, bytearray]] = {}
        in_flight = 0  # buffer bytes handed to tasks whose result is not written yet
        nxt = 0
        try:
            while nxt < len(chunks) or pending:
                while nxt < len(chunks) and self._room(len(pending), in_flight):
                    cid, n = chunks[nxt]
                    buf = self.buffers.take(n)
                    pending[self.pool.submit(self._decode, cid, entries[nxt], n, buf)] = (starts[nxt], buf)
                    in_flight += len(buf)
                    nxt += 1
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    view = fut.result()  # stays in pending until it succeeded: settled on failure
                    at, buf = pending.pop(fut)
                    n = len(view)
                    done = 0
                    while done < n:
                        done += os.pwrite(fd, view[done:], at + done)
                    self.buffers.give(buf)
                    in_flight -= len(buf)
                    self.progress(n)
        except BaseException as exc:
            settle(pending)  # no worker may still be decoding into a buffer we hand out again
            if isinstance(exc, IntegrityError):
                self._diagnose(fid, fobj, name)
            raise
        try:
            written = hash_own_file_fd(fd, fobj.size)
        except FileChanged as exc:  # the written file is shorter than its chunks: cut by someone
            raise IntegrityError(f"{name}: {exc}") from None
        if written != fid:
            self._diagnose(fid, fobj, name)

    def _room(self, tasks: int, in_flight: int) -> bool:
        """Whether another chunk may be handed to the workers.

        Enough that a worker never waits for this thread to write (a measured 3-5 % faster
        than 2 per worker on 2 cores), bounded in bytes so memory does not grow with the
        number of workers times the largest chunk.
        """
        if tasks < self._workers + 2:
            return True
        return tasks < 4 * self._workers and in_flight < IN_FLIGHT_BYTES

    def _decode(self, cid: ObjectId, entry: Any, n: int, buf: bytearray) -> memoryview:
        view = self.store.chunk_view(cid, entry, worker_scratch("checkout"), buf)
        if len(view) != n:
            raise IntegrityError(f"chunk {cid} has {len(view)} bytes, manifest says {n}")
        return view

    def _diagnose(self, fid: ObjectId, fobj: FileObject, name: str) -> None:
        """Verify chunk by chunk to say which object is damaged; raises IntegrityError."""
        reader = FileReader(self.store, fid, fobj, name)
        for i in range(len(fobj.chunks)):
            reader._chunk(i)  # verifies the chunk against its id; raises naming it and the bytes
        raise IntegrityError(f"{name}: every chunk verifies but the content does not hash to {fid}")


def stored_summary(store: ObjectStore, tree_id: ObjectId, stats: dict[str, Any]) -> VersionSummary:
    """The guards' view of a stored version (safetensors headers are read from the store)."""
    tensors = {}
    for path, e in walk_files(store, tree_id):
        fobj = load_file(store, e.id)
        if fobj.chunker == SAFETENSORS_NAME:
            with FileReader(store, e.id, fobj, path) as f:
                h = read_header(f, fobj.size)
            tensors[path] = {t.name: (t.dtype, t.shape) for t in h.tensors}
    return VersionSummary(
        bytes=int(stats.get("bytes", 0)), files=int(stats.get("files", 0)),
        vocab_size=stats.get("vocab_size"), tensors=tensors,
    )
