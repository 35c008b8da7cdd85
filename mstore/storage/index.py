"""The LMDB index: objects, packs, refs, reflog and metadata in one environment.

One LMDB write transaction is mstore's unit of atomicity: a commit indexes its new objects,
compare-and-swaps its branch and appends the reflog entry in a single transaction, so no reader
and no crash can ever observe a ref that points at an object that is not indexed.

Named databases and their records (all integers little-endian unless stated):

``objects``  key ``kind (1 byte) + digest (32)`` →
             ``<IQQQBBxxd``: pack number, record offset, encoded length, raw length, codec,
             flags, last-stored time (unix seconds, refreshed when the object is stored again).
             Flags are hints for writers, never needed to read an object: bits 0-1 are
             FLAG_WHOLE_STREAK, the other bits are 0.
``packs``    key ``pack number (u32 big-endian)`` → JSON ``{"name": ..., "created": ...}``.
``refs``     key ``refs/heads/main`` (UTF-8) → 32-byte digest.
``reflog``   key ``sequence (u64 big-endian)`` → JSON reflog entry (see refs.py).
``reflog_by_ref`` key ``ref name + NUL + sequence (u64 big-endian)`` → empty.
``meta``     small counters (``next_pack``, ``reflog_seq``, ``gc_seq``).
``pins``     key digest → JSON ``{"time", "user", "note"}``: commits that gc keeps.
``leases``   key lease id (UTF-8) → JSON ``{"ids", "pid", "host", "created", "expires", "note"}``.
``trash``    key ``kind + digest`` → index entry value of an object a gc proof moved to trash,
             followed by the proof id (UTF-8).
``gc_log``   key sequence (u64 big-endian) → JSON audit entry (applied / undone / purged).
``collected`` key ``kind + digest`` → proof id that collected the object.
``deltas``   key chunk digest → base chunk digest (32) + chain depth (u8), for every chunk whose
             indexed record is a delta (codec 3). Rows of chunks re-stored whole are removed;
             rows of collected chunks may stay (they are only consulted for indexed chunks).

Kinds: ``c`` chunk, ``f`` file manifest, ``t`` tree, ``m`` commit. A one-chunk file's chunk and
its manifest share the same id (both are BLAKE3 of the content), so the kind is part of the key.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import lmdb

from ..errors import StorageError

KINDS = {"c": "chunk", "f": "file", "t": "tree", "m": "commit"}

_ENTRY = struct.Struct("<IQQQBBxxd")
ENTRY_SIZE = _ENTRY.size  # bytes of one ``objects`` value
KEY_SIZE = 33  # bytes of one ``objects`` key: kind + digest
# Entry.flags bits 0-1 of a tensor piece stored whole: in how many commits in a row (mod 4)
# the piece at its place was stored whole although its parent version's piece, stored whole,
# was there to delta against (snapshot.Ingest._delta). 0 where nothing is known (an object
# fetched from a remote): then a delta is tried.
FLAG_WHOLE_STREAK = 0x03
_U32BE = struct.Struct(">I")
_U64BE = struct.Struct(">Q")

# Address space only: LMDB files are sparse, so this costs nothing until used. 1M chunks index
# in about 100 MB; 256 GiB leaves room for stores far larger than any single machine holds.
DEFAULT_MAP_SIZE = 256 << 30

_DBS = (
    "objects", "packs", "refs", "reflog", "reflog_by_ref", "meta",
    # gc (gc.py): pinned commits, leases of running jobs, trashed objects, the audit log, and
    # which proof collected an object (so errors can say so).
    "pins", "leases", "trash", "gc_log", "collected",
    # codecs.DELTA chunks: chunk digest -> base digest + u8 chain depth, so reachability can
    # follow a delta to its base without reading packs (storage/store.py keeps it in step).
    "deltas",
)


class Entry(NamedTuple):
    """Where an object's record lives and how it is encoded.

    A NamedTuple, not a dataclass: gc unpacks one per indexed object (a million in a large
    store), and building a tuple is several times cheaper.
    """

    pack: int
    offset: int
    enc_len: int
    raw_len: int
    codec: int
    flags: int
    stored_at: float

    def pack_bytes(self) -> bytes:
        """The index value for this entry."""
        return _ENTRY.pack(*self)

    @classmethod
    def unpack(cls, raw: bytes) -> Entry:
        """Parse an index value."""
        return cls._make(_ENTRY.unpack(raw))


def object_key(kind: str, digest: bytes) -> bytes:
    """The ``objects`` key of an object."""
    return kind.encode("ascii") + digest


# LMDB forbids opening one environment twice in a process; every Repo on the same path shares
# one Environment, counted so the last close really closes it.
_envs: dict[str, tuple[lmdb.Environment, int]] = {}
_envs_lock = threading.Lock()
# Environments inherited through fork(): never closed or freed in the child (see below).
_inherited: list[lmdb.Environment] = []


def _after_fork_in_child() -> None:
    """Set aside the parent's environments in a forked child, for good.

    LMDB environments do not survive fork(), and closing one in the child does harm: it frees
    the reader-table slots of the pid it was opened by, the parent's, whose next read then
    fails with MDB_BAD_RSLOT. That happened even when the child never touched the repository
    and simply exited (freeing the Environment closes it). So each inherited environment gets
    a reference that is never dropped (the list alone would be freed at interpreter exit).

    A child that goes on using a Repo it inherited reads through the parent's environment:
    reads work (tested), but LMDB does not promise it, and py-lmdb refuses a second
    environment on the same path in one process. Open repositories after fork where possible.
    """
    global _envs_lock
    _envs_lock = threading.Lock()  # another thread of the parent may have held it at fork
    for env, _count in _envs.values():
        _inherited.append(env)
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(env))  # never freed, so never closed
    _envs.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Index:
    """The LMDB environment of one repository."""

    def __init__(self, path: Path, map_size: int = DEFAULT_MAP_SIZE, readonly: bool = False):
        self.path = str(Path(path).resolve())
        with _envs_lock:
            if self.path in _envs:
                env, count = _envs[self.path]
                _envs[self.path] = (env, count + 1)
            else:
                try:
                    env = lmdb.open(
                        self.path,
                        map_size=map_size,
                        max_dbs=len(_DBS) + 4,
                        subdir=True,
                        readonly=readonly,
                        lock=True,
                        max_readers=256,
                        max_spare_txns=4,
                    )
                except lmdb.Error as exc:
                    raise StorageError(f"cannot open index {self.path}: {exc}") from None
                # Readers killed with SIGKILL leave their slots taken until someone clears them;
                # without this, a long-lived process (a mount, a trainer) plus a few hundred
                # killed commands fill the table and nobody can open the store.
                env.reader_check()
                _envs[self.path] = (env, 1)
        self.env = env
        self._dbs = {name: env.open_db(name.encode()) for name in _DBS}
        self._closed = False
        self._pid = os.getpid()

    def close(self) -> None:
        """Release this handle; the environment closes with its last handle."""
        if self._closed:
            return
        self._closed = True
        if self._pid != os.getpid():
            return  # inherited through fork: the environment is the parent's (_after_fork_in_child)
        with _envs_lock:
            env, count = _envs[self.path]
            if count <= 1:
                del _envs[self.path]
                env.close()
            else:
                _envs[self.path] = (env, count - 1)

    def _begin(self, write: bool) -> lmdb.Transaction:
        try:
            return self.env.begin(write=write, buffers=False)
        except lmdb.ReadersFullError:
            self.env.reader_check()  # clear slots of dead processes, then try once more
            try:
                return self.env.begin(write=write, buffers=False)
            except lmdb.Error as exc:
                raise StorageError(f"index {self.path}: {exc}") from None
        except lmdb.Error as exc:
            raise StorageError(f"index {self.path}: {exc}") from None

    @contextmanager
    def read(self) -> Iterator[Txn]:
        """A consistent read-only snapshot.

        Raises:
            StorageError: LMDB could not start a transaction.
        """
        with self._begin(write=False) as txn:
            yield Txn(txn, self._dbs)

    @contextmanager
    def write(self) -> Iterator[Txn]:
        """The one write transaction; commits on normal exit, aborts on exception.

        Raises:
            StorageError: LMDB could not commit (disk full, map full).
        """
        try:
            with self._begin(write=True) as txn:
                yield Txn(txn, self._dbs)
        except lmdb.MapFullError:
            raise StorageError(f"index {self.path} is full; raise its map size") from None
        except lmdb.Error as exc:
            raise StorageError(f"index transaction failed: {exc}") from None


class Txn:
    """Typed access to the named databases inside one LMDB transaction."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, lmdb._Database]):
        self.txn = txn
        self.dbs = dbs

    # -- objects -------------------------------------------------------------------------
    def get_entry(self, kind: str, digest: bytes) -> Entry | None:
        """The index entry of an object, or None."""
        raw = self.txn.get(object_key(kind, digest), db=self.dbs["objects"])
        return Entry.unpack(raw) if raw is not None else None

    def put_entry(self, kind: str, digest: bytes, entry: Entry, overwrite: bool = False) -> bool:
        """Index an object; without ``overwrite`` the first stored copy wins. True if written."""
        return self.txn.put(object_key(kind, digest), entry.pack_bytes(), db=self.dbs["objects"], overwrite=overwrite)

    def delete_entry(self, kind: str, digest: bytes) -> bool:
        """Remove an object from the index."""
        return self.txn.delete(object_key(kind, digest), db=self.dbs["objects"])

    def iter_entries(self, kind: str | None = None, prefix: bytes = b"") -> Iterator[tuple[str, bytes, Entry]]:
        """Every indexed object (of one kind, with a digest prefix), in key order."""
        start = (kind.encode("ascii") if kind else b"") + prefix
        with self.txn.cursor(db=self.dbs["objects"]) as cur:
            if not cur.set_range(start):
                return
            for key, value in cur:
                if not key.startswith(start):
                    break
                yield key[:1].decode("ascii"), bytes(key[1:]), Entry.unpack(value)

    def count_entries(self) -> int:
        """How many objects are indexed."""
        return self.txn.stat(self.dbs["objects"])["entries"]

    def entries_raw(self) -> tuple[bytearray, bytearray]:
        """Every object's key and index value, each concatenated, in key order.

        For bulk readers (gc marks a million objects): row ``i``'s key (kind byte + digest) is
        ``keys[33 * i : 33 * (i + 1)]`` and its value ``values[ENTRY_SIZE * i : ...]``. Two
        cursor passes, joined a slice at a time, so no Python object per entry outlives it.
        """
        columns = []
        for want_keys in (True, False):
            buf = bytearray()
            with self.txn.cursor(db=self.dbs["objects"]) as cur:
                if cur.first():
                    it = cur.iternext(keys=want_keys, values=not want_keys)
                    while part := b"".join(itertools.islice(it, 16384)):
                        buf += part
            columns.append(buf)
        return columns[0], columns[1]

    # -- packs ---------------------------------------------------------------------------
    def register_pack(self, name: str, created: float) -> int:
        """Give a pack file its number (used by index entries)."""
        number = self.get_counter("next_pack")
        self.set_counter("next_pack", number + 1)
        self.txn.put(
            _U32BE.pack(number),
            json.dumps({"name": name, "created": created}, sort_keys=True).encode(),
            db=self.dbs["packs"],
        )
        return number

    def iter_packs(self) -> Iterator[tuple[int, dict]]:
        """(number, {"name", "created"}) of every registered pack."""
        with self.txn.cursor(db=self.dbs["packs"]) as cur:
            for key, value in cur:
                yield _U32BE.unpack(key)[0], json.loads(value)

    def get_pack(self, number: int) -> dict | None:
        """A registered pack's record."""
        raw = self.txn.get(_U32BE.pack(number), db=self.dbs["packs"])
        return json.loads(raw) if raw is not None else None

    # -- refs ----------------------------------------------------------------------------
    def get_ref(self, name: str) -> bytes | None:
        """A ref's target digest, or None."""
        raw = self.txn.get(name.encode("utf-8"), db=self.dbs["refs"])
        return bytes(raw) if raw is not None else None

    def put_ref(self, name: str, digest: bytes) -> None:
        """Point a ref at a digest (no checks: see refs.py)."""
        self.txn.put(name.encode("utf-8"), digest, db=self.dbs["refs"])

    def delete_ref(self, name: str) -> bool:
        """Remove a ref (its reflog stays)."""
        return self.txn.delete(name.encode("utf-8"), db=self.dbs["refs"])

    def iter_refs(self, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        """(name, digest) of every ref starting with ``prefix``, sorted by name."""
        start = prefix.encode("utf-8")
        with self.txn.cursor(db=self.dbs["refs"]) as cur:
            if not cur.set_range(start):
                return
            for key, value in cur:
                if not key.startswith(start):
                    break
                yield key.decode("utf-8"), bytes(value)

    # -- reflog --------------------------------------------------------------------------
    def append_reflog(self, ref: str, entry: dict) -> int:
        """Append an entry to the global reflog and the ref's own; returns its sequence."""
        seq = self.get_counter("reflog_seq") + 1
        self.set_counter("reflog_seq", seq)
        key = _U64BE.pack(seq)
        self.txn.put(key, json.dumps(entry, sort_keys=True).encode("utf-8"), db=self.dbs["reflog"])
        self.txn.put(ref.encode("utf-8") + b"\0" + key, b"", db=self.dbs["reflog_by_ref"])
        return seq

    def iter_reflog(self, newest_first: bool = True) -> Iterator[tuple[int, dict]]:
        """(sequence, entry) over every ref."""
        with self.txn.cursor(db=self.dbs["reflog"]) as cur:
            it = cur.iterprev() if newest_first and cur.last() else (cur if cur.first() else iter(()))
            for key, value in it:
                yield _U64BE.unpack(key)[0], json.loads(value)

    def iter_ref_reflog(self, ref: str, newest_first: bool = True) -> Iterator[tuple[int, dict]]:
        """(sequence, entry) of one ref, deleted refs included."""
        prefix = ref.encode("utf-8") + b"\0"
        seqs: list[int] = []
        with self.txn.cursor(db=self.dbs["reflog_by_ref"]) as cur:
            if cur.set_range(prefix):
                for key in cur.iternext(keys=True, values=False):
                    if not key.startswith(prefix):
                        break
                    seqs.append(_U64BE.unpack(key[len(prefix) :])[0])
        if newest_first:
            seqs.reverse()
        db = self.dbs["reflog"]
        for seq in seqs:
            raw = self.txn.get(_U64BE.pack(seq), db=db)
            if raw is not None:
                yield seq, json.loads(raw)

    def ref_reflog_bounds(self, ref: str) -> tuple[dict | None, dict | None]:
        """The first and the latest reflog entry of a ref (None, None without any), in O(log n)."""
        prefix = ref.encode("utf-8") + b"\0"
        first = last = None
        with self.txn.cursor(db=self.dbs["reflog_by_ref"]) as cur:
            if cur.set_range(prefix) and cur.key().startswith(prefix):
                first = cur.key()[len(prefix):]
                # The last key with this prefix: step back from the first key after it.
                after = ref.encode("utf-8") + b"\x01"
                if cur.set_range(after):
                    cur.prev()
                else:
                    cur.last()
                last = cur.key()[len(prefix):]
        db = self.dbs["reflog"]
        load = lambda k: json.loads(self.txn.get(bytes(k), db=db)) if k is not None else None  # noqa: E731
        return load(first), load(last)
    def put_pack(self, number: int, record: dict) -> None:
        """Replace a registered pack's record (gc marks packs retired or trashed)."""
        self.txn.put(_U32BE.pack(number), json.dumps(record, sort_keys=True).encode(), db=self.dbs["packs"])

    def delete_pack(self, number: int) -> bool:
        """Forget a pack number (its file is gone)."""
        return self.txn.delete(_U32BE.pack(number), db=self.dbs["packs"])

    # -- generic access for gc's small tables -------------------------------------------
    def db_get(self, db: str, key: bytes) -> bytes | None:
        """A value of one of the small named databases."""
        raw = self.txn.get(key, db=self.dbs[db])
        return bytes(raw) if raw is not None else None

    def db_put(self, db: str, key: bytes, value: bytes) -> None:
        """Set a value in one of the small named databases."""
        self.txn.put(key, value, db=self.dbs[db])

    def db_delete(self, db: str, key: bytes) -> bool:
        """Delete a key from one of the small named databases."""
        return self.txn.delete(key, db=self.dbs[db])

    def db_items(self, db: str, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs of a named database, in key order."""
        with self.txn.cursor(db=self.dbs[db]) as cur:
            if not cur.set_range(prefix):
                return
            for key, value in cur:
                if not key.startswith(prefix):
                    break
                yield bytes(key), bytes(value)

    def db_count(self, db: str) -> int:
        """Number of entries in a named database."""
        return self.txn.stat(self.dbs[db])["entries"]

    def next_seq(self, counter: str) -> int:
        """Increment and return a counter."""
        seq = self.get_counter(counter) + 1
        self.set_counter(counter, seq)
        return seq

    # -- meta ----------------------------------------------------------------------------
    def get_counter(self, name: str) -> int:
        """A metadata counter (0 if never set)."""
        raw = self.txn.get(name.encode(), db=self.dbs["meta"])
        return _U64BE.unpack(raw)[0] if raw is not None else 0

    def set_counter(self, name: str, value: int) -> None:
        """Set a metadata counter."""
        self.txn.put(name.encode(), _U64BE.pack(value), db=self.dbs["meta"])


def index_exists(path: Path) -> bool:
    """True if an LMDB environment exists at ``path``."""
    return os.path.exists(os.path.join(path, "data.mdb"))
