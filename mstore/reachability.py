"""From roots to the live set: commit → parents → tree → files → chunks.

Shared by fsck (what does a damaged object affect?), gc (what must never be deleted?) and push
(what does the other side lack?). The walk never guesses: an object it cannot read is reported,
and callers that delete (gc) must treat any such report as "keep everything".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import MstoreError, StorageError
from .hashing import ObjectId
from .objects import TREE_KIND, load_commit, load_file, load_tree
from .storage.index import ENTRY_SIZE, KEY_SIZE, Entry
from .storage.index import KINDS as _KIND_NAMES


@dataclass
class LiveSet:
    """Everything reachable, by kind, plus what could not be read."""

    commits: set[ObjectId] = field(default_factory=set)
    trees: set[ObjectId] = field(default_factory=set)
    files: set[ObjectId] = field(default_factory=set)
    chunks: set[ObjectId] = field(default_factory=set)
    unreadable: dict[tuple[str, ObjectId], str] = field(default_factory=dict)

    def contains(self, kind: str, oid: ObjectId) -> bool:
        """True if the object is live."""
        return oid in {"m": self.commits, "t": self.trees, "f": self.files, "c": self.chunks}[kind]

    @property
    def complete(self) -> bool:
        """True if every reachable object could be read."""
        return not self.unreadable


def walk(
    store,
    roots: Iterable[ObjectId],
    follow_parents: bool = True,
    on_object: Callable[[str, ObjectId], None] | None = None,
    tree_roots: Iterable[ObjectId] = (),
    file_roots: Iterable[ObjectId] = (),
) -> LiveSet:
    """Mark everything reachable from the commit ids ``roots`` (and from extra trees and files)."""
    live = LiveSet()
    stack = [ObjectId(r) for r in roots]
    trees: list[ObjectId] = [ObjectId(t) for t in tree_roots]
    for fid in file_roots:
        fid = ObjectId(fid)
        if fid in live.files:
            continue
        live.files.add(fid)
        try:
            fobj = load_file(store, fid)
        except MstoreError as exc:
            live.unreadable[("f", fid)] = str(exc)
            continue
        for chunk_id, _n in fobj.chunks:
            live.chunks.add(chunk_id)
    while stack:
        cid = stack.pop()
        if cid in live.commits:
            continue
        live.commits.add(cid)
        if on_object:
            on_object("m", cid)
        try:
            commit = load_commit(store, cid)
        except MstoreError as exc:
            live.unreadable[("m", cid)] = str(exc)
            continue
        trees.append(commit.tree)
        if follow_parents:
            stack.extend(p for p in commit.parents if p not in live.commits)
    while trees:
        tid = trees.pop()
        if tid in live.trees:
            continue
        live.trees.add(tid)
        if on_object:
            on_object("t", tid)
        try:
            tree = load_tree(store, tid)
        except MstoreError as exc:
            live.unreadable[("t", tid)] = str(exc)
            continue
        for e in tree.entries:
            if e.kind == TREE_KIND:
                if e.id not in live.trees:
                    trees.append(e.id)
            elif e.id not in live.files:
                live.files.add(e.id)
                if on_object:
                    on_object("f", e.id)
                try:
                    fobj = load_file(store, e.id)
                except MstoreError as exc:
                    live.unreadable[("f", e.id)] = str(exc)
                    continue
                for chunk_id, _n in fobj.chunks:
                    live.chunks.add(chunk_id)
    _follow_delta_bases(store, live)
    return live


def _follow_delta_bases(store, live: LiveSet) -> None:
    """Add the base of every live delta chunk (and its base, down the chain) to ``live``."""
    bases = store.delta_bases() if hasattr(store, "delta_bases") else {}
    frontier = [c for c in live.chunks if c.digest in bases]
    while frontier:
        nxt = []
        for c in frontier:
            b = ObjectId.from_digest(bases[c.digest])
            if b not in live.chunks:
                live.chunks.add(b)
                if b.digest in bases:
                    nxt.append(b)
        frontier = nxt


# -- the fast path: marking a million objects on raw digests (gc plan / verify / apply) ---------
# walk() above builds a Python str per chunk id and suits small walks (fsck's "what does this
# damage affect", tests). gc marks every object of the store, so it works on one read snapshot of
# the index held as numpy columns (about 73 bytes per object instead of a tuple, a str and a
# NamedTuple), follows the same edges on raw 32-byte digests, and marks index *rows*. Every
# commit, tree and file manifest it follows is read through ObjectStore.get, so verified
# against its id exactly as walk() does; it skips no check, only the objects.


class IndexSnapshot:
    """Every entry of the ``objects`` table of one read transaction, as columns in key order.

    Row ``i`` is the ``i``-th key in LMDB order (kind byte, then digest), so each kind is one
    contiguous, sorted run of rows: looking an object up is a binary search, and hashing the
    live set in key order needs no sort.
    """

    def __init__(self, keys: bytes | bytearray, values: bytes | bytearray):
        import numpy as np

        n = len(keys) // KEY_SIZE
        if len(keys) != n * KEY_SIZE or len(values) != n * ENTRY_SIZE:
            raise StorageError("the object index holds keys or values of unexpected size")
        self.n = n
        self._keys = keys
        self._values = values
        self.keys = np.frombuffer(keys, dtype=f"S{KEY_SIZE}")  # a view: no copy
        kinds = np.frombuffer(keys, dtype=np.uint8)[::KEY_SIZE]
        # LMDB keeps keys sorted and unique; a fixed-size layout that is not exactly that (a
        # damaged or foreign index) would make rows meaningless, so refuse it.
        if n > 1 and not bool(np.all(self.keys[1:] > self.keys[:-1])):
            raise StorageError("the object index is not in key order")
        if n and not bool(np.isin(kinds, np.frombuffer(b"cftm", dtype=np.uint8)).all()):
            raise StorageError("the object index holds an unknown object kind")
        self.ranges = {
            k: (int(np.searchsorted(kinds, ord(k), "left")), int(np.searchsorted(kinds, ord(k), "right")))
            for k in "cftm"
        }
        cols = np.frombuffer(values, dtype=entry_dtype())
        self.pack = cols["pack"]
        self.offset = cols["offset"]
        self.enc_len = cols["enc_len"]
        self.raw_len = cols["raw_len"]
        self.stored_at = cols["stored_at"]

    @classmethod
    def read(cls, txn) -> IndexSnapshot:
        """Read the whole ``objects`` table of ``txn`` (a storage.index.Txn).

        Raises:
            StorageError: the table is not a well-formed object index.
        """
        return cls(*txn.entries_raw())

    def kind(self, row: int) -> str:
        """The kind of the object at ``row``."""
        return chr(self._keys[row * KEY_SIZE])

    def digest(self, row: int) -> bytes:
        """The digest of the object at ``row``."""
        return bytes(self._keys[row * KEY_SIZE + 1 : (row + 1) * KEY_SIZE])

    def entry(self, row: int) -> Entry:
        """The index entry at ``row``."""
        return Entry.unpack(self._values[row * ENTRY_SIZE : (row + 1) * ENTRY_SIZE])

    def find_one(self, kind: str, digest: bytes) -> int:
        """The row of one object, or -1."""
        import numpy as np

        key = kind.encode("ascii") + digest
        lo, hi = self.ranges[kind]
        i = lo + int(np.searchsorted(self.keys[lo:hi], np.frombuffer(key, dtype=f"S{KEY_SIZE}")[0]))
        return i if i < hi and self._keys[i * KEY_SIZE : (i + 1) * KEY_SIZE] == key else -1

    def find(self, keys) -> Any:
        """Rows of many objects of one kind; -1 where not indexed.

        ``keys`` is a numpy ``S33`` array of index keys (kind byte + digest), fastest sorted.
        """
        import numpy as np

        if not len(keys):
            return np.empty(0, dtype=np.int64)
        lo, hi = self.ranges[chr(keys[:1].tobytes()[0])]
        if hi == lo:
            return np.full(len(keys), -1, dtype=np.int64)
        run = self.keys[lo:hi]
        pos = np.searchsorted(run, keys)
        np.minimum(pos, hi - lo - 1, out=pos)
        return np.where(run[pos] == keys, pos + lo, -1)

    def keys_of(self, kind: str, digests: Iterable[bytes]) -> Any:
        """A numpy ``S33`` array of the keys of ``digests`` (for :meth:`find`)."""
        import numpy as np

        prefix = kind.encode("ascii")
        return np.frombuffer(b"".join(prefix + d for d in digests), dtype=f"S{KEY_SIZE}")


def entry_dtype():
    """The numpy layout of one index value (storage/index.py ``<IQQQBBxxd``)."""
    import numpy as np

    return np.dtype(
        [("pack", "<u4"), ("offset", "<u8"), ("enc_len", "<u8"), ("raw_len", "<u8"), ("codec", "u1"),
         ("flags", "u1"), ("_pad", "V2"), ("stored_at", "<f8")]
    )


@dataclass
class Marks:
    """What :func:`mark` reached: index rows, and what it could not read or find."""

    live: Any  # numpy bool per snapshot row
    unreadable: dict[tuple[str, ObjectId], str] = field(default_factory=dict)
    absent: set[tuple[str, bytes]] = field(default_factory=set)  # reached commits/trees/files not indexed
    missing_chunks: list[bytes] = field(default_factory=list)  # reached chunks not indexed

    def doubt(self, absent_ok: str = "") -> dict[tuple[str, ObjectId], str]:
        """Unreadable objects, leaving out those of the kinds in ``absent_ok`` that are simply not stored."""
        return {
            k: v for k, v in self.unreadable.items() if not (k[0] in absent_ok and (k[0], k[1].digest) in self.absent)
        }


def mark(
    store,
    snap: IndexSnapshot,
    commits: Iterable[bytes] = (),
    trees: Iterable[bytes] = (),
    files: Iterable[bytes] = (),
    follow_parents: bool = True,
    live: Any = None,
) -> Marks:
    """Mark every index row reachable from the given digests (commit → parents → tree → file → chunk).

    The same edges as :func:`walk`; rows already true in ``live`` are taken as marked (and not
    followed again). An object that cannot be read or verified is recorded in ``unreadable``
    (keyed by kind and id) and marking goes on: callers that delete must treat any entry as
    "keep everything".
    """
    import numpy as np

    from .objects import Commit, manifests_chunk_digests, tree_child_digests

    out = Marks(np.zeros(snap.n, dtype=bool) if live is None else live)
    marked = out.live

    def read(kind: str, digest: bytes) -> bytes | None:
        """The verified bytes of a reached object; None (and recorded) if it has none."""
        row = snap.find_one(kind, digest)
        oid = ObjectId.from_digest(digest)
        if row < 0:
            out.absent.add((kind, digest))
            out.unreadable[(kind, oid)] = f"{_KIND_NAMES[kind]} {oid} is not in the store"
            return None
        if marked[row]:
            return None
        marked[row] = True
        try:
            return store.get(kind, oid, snap.entry(row))
        except MstoreError as exc:
            out.unreadable[(kind, oid)] = str(exc)
            return None

    seen: set[bytes] = set()
    stack = list(commits)
    tree_stack = list(trees)
    while stack:
        d = stack.pop()
        if d in seen:
            continue
        seen.add(d)
        raw = read("m", d)
        if raw is None:
            continue
        try:
            c = Commit.parse(raw)
        except MstoreError as exc:
            out.unreadable[("m", ObjectId.from_digest(d))] = str(exc)
            continue
        tree_stack.append(c.tree.digest)
        if follow_parents:
            stack.extend(p.digest for p in c.parents)
    seen.clear()
    file_set = set(files)
    while tree_stack:
        d = tree_stack.pop()
        if d in seen:
            continue
        seen.add(d)
        raw = read("t", d)
        if raw is None:
            continue
        try:
            subtrees, tree_files = tree_child_digests(raw)
        except MstoreError as exc:
            out.unreadable[("t", ObjectId.from_digest(d))] = str(exc)
            continue
        tree_stack.extend(subtrees)
        file_set.update(tree_files)
    # Chunk ids go straight into one buffer of index keys (b"c" + digest), sorted in place.
    chunk_keys = bytearray()
    batch: list[tuple[bytes, bytes]] = []
    batch_bytes = 0

    def parse_batch() -> None:
        # Manifests are parsed a few MB at a time: the chunk lists of many files are checked
        # together with bulk byte operations (objects.manifests_chunk_digests).
        for (d, _raw), got in zip(batch, manifests_chunk_digests([raw for _d, raw in batch]), strict=True):
            if isinstance(got, MstoreError):
                out.unreadable[("f", ObjectId.from_digest(d))] = str(got)
                continue
            n = len(got) // 32
            if n:
                part = np.empty((n, KEY_SIZE), dtype=np.uint8)
                part[:, 0] = ord("c")
                part[:, 1:] = np.frombuffer(got, dtype=np.uint8).reshape(n, 32)
                chunk_keys.extend(part.data)
        batch.clear()

    for d in file_set:
        raw = read("f", d)
        if raw is None:
            continue
        batch.append((d, raw))
        batch_bytes += len(raw)
        if batch_bytes >= 4 << 20:
            parse_batch()
            batch_bytes = 0
    parse_batch()
    keys = np.frombuffer(chunk_keys, dtype=f"S{KEY_SIZE}")
    keys.sort()  # in place; duplicates (chunks shared by files) are harmless below
    rows = snap.find(keys)
    marked[rows[rows >= 0]] = True
    missing = np.flatnonzero(rows < 0)
    missing_chunks = {keys[i : i + 1].tobytes()[1:] for i in missing}
    missing_chunks.update(_mark_delta_bases(store, snap, marked))
    if missing_chunks:
        out.missing_chunks = sorted(missing_chunks)
    return out


def _mark_delta_bases(store, snap: IndexSnapshot, marked: Any) -> set[bytes]:
    """Mark the base of every marked delta chunk, and theirs, until nothing changes.

    Returns the digests of bases that are not indexed (a live delta that cannot be decoded:
    callers that delete must keep everything). Works on the ``deltas`` table (chunk → base),
    which holds only delta chunks, so a store without deltas pays one empty read.
    """
    import numpy as np

    bases = store.delta_bases()
    if not bases:
        return set()
    delta_keys = snap.keys_of("c", bases.keys())
    base_keys = snap.keys_of("c", bases.values())
    delta_rows = snap.find(delta_keys)
    missing: set[bytes] = set()
    while True:  # one round per chain level; chains are bounded, so this ends
        live = delta_rows >= 0
        live[live] = marked[delta_rows[live]]
        base_rows = snap.find(base_keys[live])
        for i in np.flatnonzero(base_rows < 0):
            missing.add(base_keys[live][i : i + 1].tobytes()[1:])
        new = base_rows[base_rows >= 0]
        new = new[~marked[new]]
        if not len(new):
            return missing
        marked[new] = True
