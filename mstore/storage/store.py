"""ObjectStore: put and get verified objects; the write order that makes crashes harmless.

Write order (docs/format.md, invariants I1–I3):

1. encoded records are appended to a pack owned by this process;
2. the pack is fsynced (and its directory, once) — *before* anything refers to its bytes;
3. one LMDB write transaction indexes the new objects, refreshes the age of re-used ones and,
   through ``on_commit``, moves refs. A crash before 3 leaves only unindexed pack bytes.

Every read is verified: the record header must name the requested kind and id, the payload
must decode to exactly the recorded length, and its hash must be the id (chunks, trees,
commits) or the record's check hash (file manifests, whose id is their *content's* hash and is
verified when that content is read).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3

from .. import codecs
from ..errors import IntegrityError, ObjectNotFound, StorageError, UnsupportedFormat
from ..format import FLOATPLANE_MIN_VERSION, INDEX_DIR, PACKS_DIR, Config, required_version
from ..hashing import ObjectId, hash_typed
from .index import KINDS, Entry, Index, Txn
from .packs import MAP_MIN, RECORD, PackReader, PackWriter

RECORD_SIZE = RECORD.size

TYPED_PREFIX = {"t": "tree", "m": "commit"}

# Re-storing an object refreshes its age so that a concurrent gc cannot collect it before a
# ref points at it; refreshing at most once an hour keeps re-commits from rewriting the index.
REFRESH_AFTER = 3600.0

# Reading refuses delta chains longer than this, whatever the records claim: writers bound
# chains far lower ([delta] max_depth, default 8), so a longer one is damage or an attack.
MAX_DELTA_CHAIN = 64


class ObjectStore:
    """The packs and index of one repository."""

    def __init__(self, root: Path, config: Config, clock: Callable[[], float] = time.time):
        self.root = root
        self.config = config
        self.packs_dir = root / PACKS_DIR
        self.index = Index(root / INDEX_DIR)
        self.reader = PackReader(self.packs_dir, self._delta_base_bytes)
        self.clock = clock
        self._pack_names: dict[int, str] = {}
        self._local = threading.local()  # a Scratch per thread for decoding delta chains

    def _scratch(self) -> Scratch:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = Scratch()
        return scratch

    def close(self) -> None:
        """Release file descriptors and the index handle."""
        self.reader.close()
        self.index.close()

    # -- reading ---------------------------------------------------------------------------
    def pack_name(self, number: int, txn: Txn | None = None) -> str:
        """The file name of pack ``number`` (relative to ``packs/``)."""
        name = self._pack_names.get(number)
        if name is None:
            if txn is None:
                with self.index.read() as t:
                    rec = t.get_pack(number)
            else:
                rec = txn.get_pack(number)
            if rec is None:
                raise IntegrityError(f"index names pack #{number}, which is not registered")
            name = rec["name"]
            if rec.get("dir"):  # a pack moved to trash by gc: packs/../trash/<proof>/<name>
                name = f"../{rec['dir']}/{name}"
            self._pack_names[number] = name
        return name

    def forget_pack_names(self) -> None:
        """Drop cached pack locations (after gc moved or rewrote packs)."""
        self._pack_names.clear()
        self.reader.close()

    def entry(self, kind: str, oid: ObjectId) -> Entry | None:
        """The index entry of an object, or None."""
        with self.index.read() as txn:
            return txn.get_entry(kind, oid.digest)

    def has(self, kind: str, oid: ObjectId) -> bool:
        """True if the object is indexed."""
        return self.entry(kind, oid) is not None

    def get(
        self, kind: str, oid: ObjectId, entry: Entry | None = None, _chain: int = 0, scratch: Scratch | None = None
    ) -> bytes:
        """The verified raw bytes of an object.

        A chunk is decoded through ``scratch`` (default: this thread's own, kept for the thread's
        life; a server with many threads passes buffers of a bounded pool instead).

        Raises:
            ObjectNotFound: not indexed.
            IntegrityError: the stored bytes are damaged (message names the object and pack;
                for a delta chunk whose base is damaged, the base too).
        """
        if entry is None:
            entry = self.entry(kind, oid)
            if entry is None:
                raise ObjectNotFound(f"{KINDS[kind]} {oid} is not in the store", oid)
        if kind == "c" and _chain == 0:
            # Decode through this thread's reusable buffers (a delta's whole chain) and hash the
            # result once; only if that fails is it decoded again below, a delta level by level
            # verifying each base, to name the damage. Fresh buffers for the record and the
            # result cost more than the decoding: get() of a checkpoint's 4 MiB pieces on one
            # thread ran at 0.36 GB/s through the path below, 2.5-2.9 through this one (hash
            # included); a mount reads every chunk through here.
            try:
                view = self.chunk_view(oid, entry, scratch if scratch is not None else self._scratch())
                if blake3.blake3(view).digest() == oid.digest:
                    return bytes(view)
            except IntegrityError:
                pass
        name = self.pack_name(entry.pack)
        try:
            rec, payload = self.reader.read(name, entry.offset, entry.enc_len)
            if rec.kind != kind or rec.id != oid.digest or rec.raw_len != entry.raw_len:
                raise IntegrityError("record header does not match the index")
            raw = self.reader.decode(rec, payload, _chain)  # checks BLAKE3(raw) == rec.check
            if kind != "c":  # a chunk's check is its id (compared above): no second hash
                verify_raw(kind, oid, raw)
            elif rec.check != oid.digest:
                raise IntegrityError("record check is not the chunk id")
        except IntegrityError as exc:
            raise IntegrityError(
                f"{KINDS[kind]} {oid} is damaged (pack {name}, offset {entry.offset}): {exc}"
            ) from None
        return raw

    def _delta_base_bytes(self, base_digest: bytes, raw_len: int, chain: int) -> bytes:
        """The verified raw bytes of a delta's base chunk (``chain``: its position in the chain)."""
        if chain >= MAX_DELTA_CHAIN:
            raise IntegrityError(f"delta chain longer than {MAX_DELTA_CHAIN} (a cycle?)")
        base_id = ObjectId.from_digest(base_digest)
        base_entry = self.entry("c", base_id)
        if base_entry is None:
            raise IntegrityError(f"its delta base chunk {base_id} is not in the store")
        if base_entry.raw_len != raw_len:
            raise IntegrityError(f"its delta base chunk {base_id} has {base_entry.raw_len} bytes, not {raw_len}")
        try:
            return self.get("c", base_id, base_entry, chain)
        except IntegrityError as exc:
            raise IntegrityError(f"its delta base is unreadable: {exc}") from None

    def _delta_base_entry(self, payload: bytes | memoryview, raw_len: int, chain: int) -> tuple[ObjectId, Entry]:
        base_digest, _depth = codecs.delta_base(payload)
        if chain >= MAX_DELTA_CHAIN:
            raise IntegrityError(f"delta chain longer than {MAX_DELTA_CHAIN} (a cycle?)")
        base_id = ObjectId.from_digest(base_digest)
        base_entry = self.entry("c", base_id)
        if base_entry is None or base_entry.raw_len != raw_len:
            raise IntegrityError(f"its delta base chunk {base_id} is missing or of another size")
        return base_id, base_entry

    def _chain(self, oid: ObjectId, entry: Entry) -> list[tuple[ObjectId, Entry]]:
        """A chunk and the bases its decoding needs, down to the one stored whole."""
        chain = [(oid, entry)]
        while entry.codec == codecs.DELTA:
            head = self.reader.read_head(self.pack_name(entry.pack), entry.offset, codecs.DELTA_HEAD.size)
            oid, entry = self._delta_base_entry(head, entry.raw_len, len(chain))
            chain.append((oid, entry))
        return chain

    def delta_bases(self) -> dict[bytes, bytes]:
        """Every delta chunk's base, as raw digests (chunk → base), from one read snapshot."""
        with self.index.read() as txn:
            return {k: v[:32] for k, v in txn.db_items("deltas")}

    def chunk_view(
        self, oid: ObjectId, entry: Entry, scratch: Scratch, into: bytearray | None = None
    ) -> memoryview:
        """A chunk's decoded bytes, read and decoded through ``scratch``: *not* hashed here.

        Only for callers that verify the content another way before anyone sees it: checkout
        hashes each whole file against its id (BLAKE3 of the content) before the file gets its
        name, so hashing every chunk as well would verify every byte twice; :meth:`get` hashes
        the result once. Record headers are still checked against the index and decoding is
        bounded by the recorded length. The view is valid until ``scratch`` is used again;
        with ``into`` (a buffer of at least the chunk's length) the result is either a view of
        ``into`` or of a memory map of the record, so it stays valid whatever ``scratch`` does
        next (until ``into`` is reused): another thread can write it out meanwhile.

        Records of at least ``MAP_MIN`` bytes are read through a memory map of the pack (decoded
        in place, no copy), smaller ones into ``scratch``. A delta chain is decoded from its
        whole base upwards through two alternating buffer pairs, so memory does not grow with
        the chain; while every level is byte planes, the XOR is taken plane by plane and the
        result interleaved once, with the last level's XOR.

        Raises:
            IntegrityError: a record is missing, damaged or does not decode (message names the
                chunk and pack, as :meth:`get` does).
        """
        name = self.pack_name(entry.pack)
        try:
            chain = self._chain(oid, entry)
            raw_len = entry.raw_len
            planes: list | None = None
            plane_codec = 0
            raw: memoryview | None = None
            for step, (cid, ent) in enumerate(reversed(chain)):
                slot = step % 2
                rec, payload = self._chunk_record(cid, ent, raw_len, scratch, slot)
                last = step == len(chain) - 1
                # The final result goes to ``into`` when given, except where it is the XOR's
                # temporary beside a separate plane output (finish_delta_planes below).
                out = into if into is not None and last and planes is None else scratch.output(raw_len, slot)
                if step == 0:
                    if rec.codec == codecs.DELTA:
                        raise IntegrityError(f"chunk {cid} changed while its chain was read")
                    if rec.codec in codecs.PLANE_CODECS and len(chain) > 1:
                        planes = codecs.byte_planes(payload, raw_len)[1]
                        plane_codec = rec.codec
                    else:
                        raw = codecs.decode_into(rec.codec, payload, raw_len, out)
                        if into is not None and last and ent.enc_len < MAP_MIN and rec.codec == codecs.RAW:
                            into[:raw_len] = raw  # a view of scratch's read buffer: copy it out
                            raw = memoryview(into)[:raw_len]
                    continue
                if rec.codec != codecs.DELTA:
                    raise IntegrityError(f"chunk {cid} changed while its chain was read")
                if planes is not None:
                    if last:  # the last level: XOR, interleave and rotate in one pass
                        final = into if into is not None else scratch.final(raw_len)
                        if codecs.finish_delta_planes(payload, raw_len, planes, out, final, plane_codec):
                            return memoryview(final)[:raw_len]
                        res = None  # not such planes (the same test as below): go bytewise
                    else:
                        res = codecs.xor_delta_planes(payload, raw_len, planes, out, plane_codec)
                    if res is not None:
                        planes = res
                        continue
                    final = scratch.final(raw_len)  # this level's XOR is not such planes: go bytewise
                    codecs.finish_planes(planes, raw_len, final, plane_codec)
                    raw, planes = memoryview(final)[:raw_len], None
                    if last and into is not None:
                        out = into
                assert raw is not None
                raw = codecs.decode_delta_into(payload, raw_len, raw, out)
            if planes is not None:
                final = into if into is not None else scratch.final(raw_len)
                codecs.finish_planes(planes, raw_len, final, plane_codec)
                return memoryview(final)[:raw_len]
            assert raw is not None
            return raw
        except IntegrityError as exc:
            raise IntegrityError(
                f"chunk {oid} is damaged (pack {name}, offset {entry.offset}): {exc}"
            ) from None

    def chunk_prefix(self, oid: ObjectId, entry: Entry, n: int, scratch: Scratch) -> bytes | memoryview | None:
        """The first ``n`` bytes of a chunk stored whole, decoding no more than they need.

        The result may be a view of ``scratch``, valid until it is used again.

        None for a delta chunk (its prefix needs its chain) or a prefix its codec cannot give
        alone (see :func:`codecs.decode_prefix`). Like :meth:`chunk_view` it is not hashed: the
        ingest uses it only to guess whether a delta against the chunk can pay before it decodes
        and verifies the chunk whole.

        Raises:
            IntegrityError: the record is missing, its header does not match the index, or it
                does not parse (message names the chunk and pack).
        """
        if entry.codec == codecs.DELTA:
            return None
        name = self.pack_name(entry.pack)
        try:
            rec, payload = self._chunk_record(oid, entry, entry.raw_len, scratch, 0)
            if rec.codec == codecs.DELTA:
                raise IntegrityError(f"record header of chunk {oid} does not match the index")
            return codecs.decode_prefix(rec.codec, payload, rec.raw_len, n, scratch.output(n))
        except IntegrityError as exc:
            raise IntegrityError(f"chunk {oid} is damaged (pack {name}, offset {entry.offset}): {exc}") from None

    def _chunk_record(self, cid: ObjectId, ent: Entry, raw_len: int, scratch: Scratch, slot: int) -> tuple[Any, Any]:
        """A chunk's record: mapped (MAP_MIN bytes or more) or read into ``scratch``, header checked.

        The header must name the chunk (as id and as check) and say ``raw_len``, as the index does.
        """
        if ent.enc_len >= MAP_MIN:
            rec, payload = self.reader.map_record(self.pack_name(ent.pack), ent.offset, ent.enc_len)
        else:
            buf = scratch.payload(ent.enc_len, slot)
            rec, payload = self.reader.read_into(self.pack_name(ent.pack), ent.offset, ent.enc_len, buf)
        if rec.kind != "c" or rec.id != cid.digest or rec.raw_len != raw_len or rec.check != cid.digest:
            raise IntegrityError(f"record header of chunk {cid} does not match the index")
        return rec, payload

    def iter_entries(self, kind: str | None = None) -> Iterator[tuple[str, ObjectId, Entry]]:
        """Every indexed object, from one read snapshot."""
        with self.index.read() as txn:
            for k, digest, entry in txn.iter_entries(kind):
                yield k, ObjectId.from_digest(digest), entry

    def find_prefix(self, kind: str, prefix: str, limit: int = 2) -> list[ObjectId]:
        """Ids of ``kind`` starting with the hex ``prefix`` (at most ``limit``)."""
        byte_prefix = bytes.fromhex(prefix[: len(prefix) // 2 * 2])
        out: list[ObjectId] = []
        with self.index.read() as txn:
            for _k, digest, _e in txn.iter_entries(kind, byte_prefix):
                if digest.hex().startswith(prefix):
                    out.append(ObjectId.from_digest(digest))
                    if len(out) >= limit:
                        break
        return out

    # -- writing ---------------------------------------------------------------------------
    def batch(self) -> WriteBatch:
        """Start a batch of writes that becomes visible in one (or a few) index transactions."""
        return WriteBatch(self)


class DeltaBaseMissing(StorageError):
    """A delta chunk was offered whose base is not stored (a concurrent gc took it)."""


class Scratch:
    """Two reusable buffers (encoded payload, decoded output) for :meth:`ObjectStore.chunk_view`.

    One per thread; they grow to the largest chunk seen (up to 8 MiB in a new store, 16 MiB
    in an older one) and are reused, so reading a file allocates nothing per chunk.
    """

    def __init__(self) -> None:
        # One pair per level of a delta chain being decoded (level 0: the chunk itself).
        self._payload: list[bytearray] = []
        self._output: list[bytearray] = []
        self._final = bytearray()

    @staticmethod
    def _get(bufs: list[bytearray], level: int, need: int) -> bytearray:
        while len(bufs) <= level:
            bufs.append(bytearray())
        have = len(bufs[level])
        if have < need:
            # Grown by half at least: records of one tensor shape differ by a few bytes, and
            # growing to each exact size reallocated (and faulted in) the buffer every time.
            bufs[level] = bytearray(max(need, have + have // 2))
        return bufs[level]

    def payload(self, enc_len: int, level: int = 0) -> bytearray:
        """A buffer for a record header and ``enc_len`` payload bytes."""
        return self._get(self._payload, level, enc_len + RECORD_SIZE)

    def output(self, raw_len: int, level: int = 0) -> bytearray:
        """A buffer for ``raw_len`` decoded bytes."""
        return self._get(self._output, level, raw_len)

    def final(self, raw_len: int) -> bytearray:
        """A buffer for the interleaved result of a chain decoded as byte planes."""
        if len(self._final) < raw_len:
            self._final = bytearray(raw_len)
        return self._final


def verify_raw(kind: str, oid: ObjectId, raw: bytes) -> None:
    """Check decoded bytes against their id.

    Raises:
        IntegrityError: the hash is not the id.
    """
    if kind == "c":
        got = blake3.blake3(raw).digest()
    elif kind in TYPED_PREFIX:
        got = hash_typed(TYPED_PREFIX[kind], raw).digest
    else:
        return  # file manifests: checked by the record's check hash; content checked on read
    if got != oid.digest:
        raise IntegrityError(f"hash mismatch: content hashes to {got.hex()}")


class WriteBatch:
    """Objects written by one operation; see the module docstring for the write order.

    Use as a context manager; :meth:`commit` makes everything visible, and leaving the block
    without committing abandons the batch (its pack bytes stay unindexed until compaction).
    """

    # Index what is durable whenever this much has been written, so a long commit keeps
    # bounded state in memory and a crash loses at most this much work.
    FLUSH_BYTES = 256 << 20

    def __init__(self, store: ObjectStore):
        self.store = store
        self._floatplanes = store.config.version >= FLOATPLANE_MIN_VERSION  # else BYTEPLANE (codec 2)
        self.level = int(store.config.get("codec", "zstd_level", codecs.DEFAULT_LEVEL))
        self.max_pack = int(store.config.get("packs", "max_size", 64 << 20))
        self.writer: PackWriter | None = None
        self._writer_number: int | None = None
        # (kind, digest) -> (writer, offset, enc_len, raw_len, codec, flags)
        self.pending: dict[tuple[str, bytes], tuple[PackWriter, int, int, int, int, int]] = {}
        self.reused: set[tuple[str, bytes]] = set()
        # chunk digest -> base digest + depth, for pending delta chunks (the ``deltas`` table)
        self.delta_rows: dict[bytes, bytes] = {}
        # Keys indexed by earlier (intermediate) flushes of this batch: unreachable until the
        # final transaction moves a ref, so that transaction re-checks they are still indexed.
        self.flushed: set[tuple[str, bytes]] = set()
        self._unflushed = 0
        self.new_bytes = 0  # raw bytes of new objects
        self.stored_bytes = 0  # encoded bytes written to packs
        self.done = False

    def __enter__(self) -> WriteBatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.writer is not None and not self.writer.sealed:
            if self.done:
                self.writer.seal()
            else:
                self.writer.abandon()
                if self.writer.number is None and not self._registered(self.writer.name):
                    # Never indexed, so nothing can refer to it: an aborted operation leaves
                    # no trace. (A pack that was partly indexed stays for gc to reclaim.) The
                    # index is asked too: an interrupt between the transaction's commit and
                    # the bookkeeping after it must never unlink a pack a ref now reaches.
                    try:
                        self.writer.path.unlink()
                    except OSError:
                        pass

    def _registered(self, name: str) -> bool:
        with self.store.index.read() as txn:
            return any(rec["name"] == name for _n, rec in txn.iter_packs())

    def contains(self, kind: str, oid: ObjectId, txn: Txn | None = None, unindexed: bool = False) -> bool:
        """True if the object is already pending here or indexed (and then marks it re-used).

        ``unindexed``: the caller has just found the object missing from the index, so only
        this batch is looked in (if another writer indexes it meanwhile, it is stored twice
        and the first copy indexed wins).
        """
        key = (kind, oid.digest)
        if key in self.pending or key in self.reused or key in self.flushed:
            return True
        if unindexed:
            return False
        if txn is not None:
            entry = txn.get_entry(kind, oid.digest)
        else:
            entry = self.store.entry(kind, oid)
        if entry is None:
            return False
        self.reused.add(key)
        if entry.codec == codecs.DELTA:
            self._reuse_bases(oid)
        return True

    def _reuse_bases(self, oid: ObjectId) -> None:
        """Mark the bases of a re-used delta chunk re-used too (refreshed, re-checked at commit).

        A delta is only readable with its whole chain: re-using the chunk alone would let a
        concurrent gc take an old base while the commit that needs it is still being written.
        """
        with self.store.index.read() as txn:
            digest = oid.digest
            for _ in range(MAX_DELTA_CHAIN):
                row = txn.db_get("deltas", digest)
                if row is None:
                    return
                digest = row[:32]
                key = ("c", digest)
                if key in self.reused or key in self.pending or key in self.flushed:
                    return  # its chain is re-used already
                if txn.get_entry("c", digest) is None:
                    return  # a missing base: the final re-check of the delta's users reports it
                self.reused.add(key)

    def add(
        self, kind: str, oid: ObjectId, raw: bytes | memoryview, check: bytes | None = None, item_size: int = 0
    ) -> bool:
        """Store an object unless it exists; True if it was new.

        ``check`` is BLAKE3 of ``raw``; pass it when already computed (it equals the id for
        chunks). ``item_size`` is the float element size of a tensor piece (byte planes).
        """
        if self.contains(kind, oid):
            return False
        if check is None:
            check = oid.digest if kind == "c" else blake3.blake3(raw).digest()
        codec, payload = codecs.encode(raw, self.level, item_size, rotate=self._floatplanes)
        self.add_encoded(kind, oid, check, codec, len(raw), payload)
        return True

    def add_encoded(
        self,
        kind: str,
        oid: ObjectId,
        check: bytes,
        codec: int,
        raw_len: int,
        payload: codecs.Payload,
        flags: int = 0,
    ) -> None:
        """Append an already encoded object (the caller has checked it is not stored).

        ``payload`` may be a list of buffers (codecs.Payload); they are written before this
        returns and not kept. ``flags``: the index entry's (see index.FLAG_WHOLE_STREAK).

        A delta chunk's base must be stored (or pending in this batch) already; it is then
        treated as re-used, so it is re-checked at commit time like any object a commit needs.

        Raises:
            UnsupportedFormat: an encoding this store's format version predates (nothing appended).
            DeltaBaseMissing: a delta whose base is not in the store (nothing was appended).
            StorageError: the pack could not be written or made durable.
        """
        head = codecs.payload_head(payload)
        need, what = required_version(codec, head)
        if self.store.config.version < need:
            raise UnsupportedFormat(
                f"{KINDS[kind]} {oid} is a {what} record (format version {need}); this store is version "
                f"{self.store.config.version} and must not hold it"
            )
        if codec == codecs.DELTA:
            if kind != "c":
                raise StorageError("only chunks can be stored as deltas")
            base, depth = codecs.delta_base(head)
            if not self.contains("c", ObjectId.from_digest(base)):
                raise DeltaBaseMissing(f"chunk {oid}: its delta base {base.hex()} is not in the store")
        if self.writer is None or self.writer.full:
            self._roll()  # flushes what is pending (and clears its delta rows): not this object
        assert self.writer is not None
        enc_len = codecs.payload_len(payload)
        offset = self.writer.add(kind, oid.digest, check, codec, raw_len, payload)
        self.pending[(kind, oid.digest)] = (self.writer, offset, enc_len, raw_len, codec, flags)
        if codec == codecs.DELTA:
            self.delta_rows[oid.digest] = base + bytes([depth])
        self.new_bytes += raw_len
        self.stored_bytes += enc_len
        self._unflushed += enc_len
        if self._unflushed >= self.FLUSH_BYTES:
            self.flush()

    def _roll(self) -> None:
        if self.writer is not None:
            self.flush()
            self.writer.seal()
        self.writer = PackWriter(self.store.packs_dir, self.max_pack)

    def flush(self, on_commit: Callable[[Txn], Any] | None = None, final: bool = False) -> Any:
        """Make pending objects durable and indexed; run ``on_commit`` in the same transaction.

        Raises:
            StorageError: a re-used object vanished (a concurrent gc took it); nothing that
                ``on_commit`` would have done has happened.
        """
        if self.writer is not None and self.pending:
            self.writer.sync()
        now = self.store.clock()
        result = None
        registered: list[PackWriter] = []
        try:
            result = self._flush_txn(now, on_commit, registered, final)
        except BaseException:
            for w in registered:  # the transaction was aborted: those numbers do not exist
                w.number = None
            raise
        self.flushed.update(self.pending)
        self.flushed.update(self.reused)
        self.pending.clear()
        self.reused.clear()
        self.delta_rows.clear()
        self._unflushed = 0
        return result

    def _flush_txn(
        self, now: float, on_commit: Callable[[Txn], Any] | None, registered: list[PackWriter], final: bool
    ) -> Any:
        result = None
        with self.store.index.write() as txn:
            for (kind, digest), (writer, offset, enc_len, raw_len, codec, flags) in self.pending.items():
                # The number lives on the writer itself: keying by id(writer) once let a new
                # writer inherit a sealed one's number after the old object was freed.
                number = writer.number
                if number is None:
                    number = txn.register_pack(writer.name, now)
                    registered.append(writer)
                    writer.number = number
                if not txn.put_entry(kind, digest, Entry(number, offset, enc_len, raw_len, codec, flags, now)):
                    continue  # another writer indexed it first; its encoding (and row) stand
                if codec == codecs.DELTA:
                    txn.db_put("deltas", digest, self.delta_rows[digest])
                elif kind == "c":
                    txn.db_delete("deltas", digest)  # re-stored whole after a collected delta
            recheck = (self.reused | self.flushed) if final else self.reused
            for kind, digest in recheck:
                entry = txn.get_entry(kind, digest)
                if entry is None:
                    raise StorageError(
                        f"{KINDS[kind]} {digest.hex()} disappeared while this operation used it "
                        "(a concurrent gc?); nothing was changed, run the command again"
                    )
                if (kind, digest) in self.reused and now - entry.stored_at > REFRESH_AFTER:
                    txn.put_entry(
                        kind,
                        digest,
                        Entry(entry.pack, entry.offset, entry.enc_len, entry.raw_len, entry.codec, entry.flags, now),
                        overwrite=True,
                    )
            if on_commit is not None:
                result = on_commit(txn)
        return result

    def commit(self, on_commit: Callable[[Txn], Any] | None = None) -> Any:
        """Final flush; seals the current pack. Returns what ``on_commit`` returned."""
        result = self.flush(on_commit, final=True)
        self.done = True
        if self.writer is not None:
            self.writer.seal()
        return result
