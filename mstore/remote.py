"""Remotes: push, fetch and repair between the local store and a :class:`Backend`.

Layout of a remote (see ``docs/remotes.md``)::

    mstore-remote.json                   {"format": "mstore-remote", "version": 1}
    packs/<name>.pack                    packs in the local pack format (storage/packs.py)
    packs/<name>.idx                     JSON list of the pack's records; written after its pack
    refs/heads/<branch>.ref              JSON ref document, changed only by compare-and-swap
    refs/tags/<tag>.ref
    logs/refs/heads/<branch>.ref/<seq>   the remote reflog: one immutable entry per ref change

Invariants (MUST, as in docs/format.md):

R1. A pack's ``.idx`` is written only after the whole pack is stored; what the remote *has* is
    the union of the records listed by the ``.idx`` documents whose pack is present at its
    recorded size. A pack without an index (a killed push) is invisible and re-sent.
R2. A remote ref moves only after every object its commit reaches is listed by R1; it moves by
    compare-and-swap from the document the pusher read, so of two racing pushers one wins and
    the other is rejected ("fetch first") with nothing lost.
R3. Ref document number ``seq`` is logged as ``logs/<ref>/<seq>``. Its author writes the entry
    right after winning the swap; any later pusher writes it (from the document itself, so the
    content is the same) before it moves the ref again. No change can go unlogged.
R4. Everything received is verified before it is indexed locally: record framing against the
    ``.idx``, decoded size, the hash against the id, trees and commits parsed (names with ``/``
    or ``..`` refused), and a file manifest's id against the hash of its content. A remote
    ref moves a local ref only in the transaction that indexes the last of its objects.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import blake3
import numpy as np

from . import codecs
from .errors import (
    FormatError,
    IntegrityError,
    InvalidName,
    MstoreError,
    ObjectNotFound,
    OversizedObject,
    RemoteIntegrityError,
    UnsupportedFormat,
)
from .format import LEGACY_CHUNKING, check_chunking, chunking_settings, required_version
from .fsutil import atomic_write, unique_name
from .hashing import ObjectId, is_full_id
from .objects import Commit, FileObject, Tree, load_commit, load_file
from .reachability import walk
from .refs import ANY, HEADS, REMOTES, TAGS, RefChange, check_ref_name, set_if_equals, short_name
from .remote_lock import push_lock
from .storage.backends import Backend, BackendNotFound
from .storage.index import KINDS, Entry
from .storage.packs import (
    FOOTER,
    FOOTER_MAGIC,
    HEADER,
    PACK_MAGIC,
    PACK_VERSION,
    RECORD,
    RECORD_MAGIC,
    PackWriter,
    parse_record_header,
)
from .storage.store import MAX_DELTA_CHAIN, ObjectStore, Scratch, verify_raw

REMOTE_FORMAT = "mstore-remote"
REMOTE_VERSION = 1
MARKER = "mstore-remote.json"

#: A remote pack is closed once it holds this much (a multipart upload of 16 MiB parts).
PACK_TARGET = 64 << 20
#: Refuse any single object larger than this from a remote (a chunk is at most 8 MiB in a new
#: store, 16 MiB in an older one, and the chunking settings a marker may carry keep it under
#: 128 MiB; a manifest of a 1 TB file is a few MB): a hostile remote cannot make us allocate more.
MAX_OBJECT = 256 << 20
#: Records closer than this in one remote pack are fetched with one ranged GET.
_COALESCE_GAP = 1 << 20
_RANGE_MAX = 16 << 20
#: A range's records decode to at most this much in all (always at least one record): 16 MiB of
#: small low-rank deltas could otherwise decode to gigabytes.
_RANGE_RAW_MAX = 64 << 20
_THREADS = 8
#: A fetch keeps at most this much downloaded and decoded in flight (bounded memory: a 1 GB
#: clone peaked at 830 MB of RSS with 16 ranges ahead of the writer, each with its raw copy;
#: 240-310 MB with this bound and the 64 MiB cache of _FileVerifier).
_AHEAD_BYTES = 112 << 20
#: Packs uploading at once during a push (each in parallel multipart parts).
_UPLOADS = 2

# Delta chunks (XOR with a base chunk) travel as they are stored, so an incremental push costs
# the stored delta bytes; their bases travel first. getattr: stores without the codec work too.
_DELTA = getattr(codecs, "DELTA", None)

Hook = Callable[[str], None]
Progress = Callable[[int], None]


def _noop(*_a: Any) -> None:
    return None


# -- keys ------------------------------------------------------------------------------------


def ref_key(full: str) -> str:
    """``refs/heads/runs/exp1`` → ``refs/heads/runs/exp1.ref`` (components percent-quoted)."""
    check_ref_name(full)
    return "/".join(quote(p, safe="-_.") for p in full.split("/")) + ".ref"


def ref_from_key(key: str) -> str:
    """The inverse of :func:`ref_key` (validated).

    Raises:
        InvalidName: not a ref key.
    """
    if not key.endswith(".ref"):
        raise InvalidName(f"{key!r} is not a remote ref key")
    full = "/".join(unquote(p) for p in key[: -len(".ref")].split("/"))
    check_ref_name(full)
    if not full.startswith((HEADS, TAGS)):
        raise InvalidName(f"remote ref {full!r} is neither a branch nor a tag")
    return full


def log_key(full: str, seq: int) -> str:
    """The key of a remote reflog entry."""
    return f"logs/{ref_key(full)}/{seq:012d}"


# -- the remote's catalog --------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """Where a record lives on the remote."""

    pack: str
    offset: int
    enc_len: int
    raw_len: int
    codec: int
    base: bytes | None = None  # a delta chunk's base chunk


@dataclass
class Catalog:
    """What a remote holds: (kind, digest) → location, plus packs that are damaged."""

    objects: dict[tuple[str, bytes], Location] = field(default_factory=dict)
    packs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"size", "meta"}
    damaged: dict[str, str] = field(default_factory=dict)  # pack name -> problem
    damaged_keys: dict[tuple[str, bytes], str] = field(default_factory=dict)  # key -> pack

    def has(self, kind: str, digest: bytes) -> bool:
        """True if the remote has the object in a healthy pack."""
        return (kind, digest) in self.objects


def parse_index(raw: bytes, name: str, max_object: int = MAX_OBJECT) -> dict[str, Any]:
    """Parse and validate a remote pack index.

    Raises:
        RemoteIntegrityError: malformed, or records outside the pack.
        OversizedObject: a record larger than ``max_object``.
    """
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise RemoteIntegrityError(f"remote pack index {name}.idx is not JSON") from None
    if not isinstance(doc, dict) or doc.get("v") != 1 or doc.get("pack") != name:
        raise RemoteIntegrityError(f"remote pack index {name}.idx has the wrong version or pack name")
    size = doc.get("size")
    records = doc.get("records")
    if not isinstance(size, int) or size < HEADER.size or not isinstance(records, list):
        raise RemoteIntegrityError(f"remote pack index {name}.idx is malformed")
    for r in records:
        if (
            not isinstance(r, list)
            or len(r) not in (6, 7)
            or (len(r) == 7 and not (r[0] == "c" and r[5] == _DELTA and isinstance(r[6], str) and is_full_id(r[6])))
            or r[0] not in KINDS
            or not isinstance(r[1], str)
            or not is_full_id(r[1])
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in r[2:6])
        ):
            raise RemoteIntegrityError(f"remote pack index {name}.idx has a malformed record {str(r)[:120]}")
        if r[2] < HEADER.size or r[2] + RECORD.size + r[3] > size:
            raise RemoteIntegrityError(f"remote pack index {name}.idx names a record outside its pack")
        if r[4] > max_object:
            raise OversizedObject(
                f"remote pack {name} holds a {KINDS[r[0]]} {r[1][:12]} of {r[4]:,} bytes, above the "
                f"limit of {max_object:,}: refusing it"
            )
    return doc


def check_layout(backend: Backend, create: bool = False, store: ObjectStore | None = None) -> dict[str, Any] | None:
    """Check the remote's marker (or create it). Returns the marker, or None for an empty, unmarked remote.

    A marker made by a push (``create``, with the pushing ``store``) records that store's
    chunking settings, which a clone adopts (:func:`marker_chunking`).

    Raises:
        UnsupportedFormat: the remote is of a version this mstore does not read, or not a remote.
    """
    try:
        raw = backend.get(MARKER)
    except BackendNotFound:
        if not create:
            return None
        doc = {"format": REMOTE_FORMAT, "version": REMOTE_VERSION}
        if store is not None:
            doc["chunking"] = chunking_settings(store.config)
        backend.put_if_absent(MARKER, json.dumps(doc, sort_keys=True).encode())
        raw = backend.get(MARKER)
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != REMOTE_FORMAT:
        raise UnsupportedFormat(f"{backend.url} has a {MARKER} that is not an mstore remote's")
    if doc.get("version") != REMOTE_VERSION:
        raise UnsupportedFormat(
            f"{backend.url} is an mstore remote of version {doc.get('version')!r}; this mstore reads "
            f"{REMOTE_VERSION}: upgrade mstore"
        )
    return doc


def marker_chunking(backend: Backend, marker: dict[str, Any]) -> dict[str, int]:
    """How a clone of this remote must cut files: as the store whose push made the remote.

    A marker without settings was made by an mstore that knew only one way to cut (16 MiB
    pieces at elements, ``LEGACY_CHUNKING``). A store that cut otherwise would share no
    pieces, and so no dedup and no deltas, with the history it fetched.

    Raises:
        UnsupportedFormat: a setting this mstore does not know (a newer mstore made the remote).
        RemoteIntegrityError: the marker's settings are malformed or out of bounds.
    """
    if "chunking" not in marker:
        return dict(LEGACY_CHUNKING)
    try:
        return check_chunking(marker["chunking"], f"{backend.url} {MARKER}")
    except UnsupportedFormat:
        raise
    except FormatError as exc:
        raise RemoteIntegrityError(str(exc)) from None


def load_catalog(backend: Backend, cache_dir: Path | None = None, max_object: int = MAX_OBJECT) -> Catalog:
    """List the remote's packs and read their indexes (cached locally: they never change).

    Raises:
        RemoteIntegrityError, OversizedObject: a malformed index.
    """
    cat = Catalog()
    sizes, indexes = list_packs(backend)
    docs: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    for name in indexes:
        cached = cache_dir / f"{name}.idx" if cache_dir is not None else None
        if cached is not None and cached.is_file():
            try:
                docs[name] = parse_index(cached.read_bytes(), name, max_object)
                continue
            except RemoteIntegrityError:
                pass  # a damaged cache: read the remote's copy
        missing.append(name)

    def get_index(name: str) -> bytes | None:
        try:
            return backend.get(f"packs/{name}.idx")
        except BackendNotFound:
            return None

    # The indexes not cached yet, several at once: one request each, and a clone reads them all.
    if len(missing) > 1:
        with ThreadPoolExecutor(min(_THREADS, len(missing)), thread_name_prefix="mstore-catalog") as pool:
            fetched = list(pool.map(get_index, missing))
    else:
        fetched = [get_index(n) for n in missing]
    for name, raw in zip(missing, fetched, strict=True):
        if raw is None:
            continue
        docs[name] = parse_index(raw, name, max_object)
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(cache_dir / f"{name}.idx", raw)
    for name in indexes:
        doc = docs.get(name)
        if doc is not None:
            catalog_pack(cat, name, doc, sizes.get(name))
    return cat


def list_packs(backend: Backend) -> tuple[dict[str, int], list[str]]:
    """``packs/`` of a remote: the size of each pack file, and the names that have an index."""
    sizes: dict[str, int] = {}
    indexes: list[str] = []
    for key, size in backend.list("packs/"):
        name = key[len("packs/") :]
        if "/" in name:
            continue
        if name.endswith(".pack"):
            sizes[name[: -len(".pack")]] = size
        elif name.endswith(".idx"):
            indexes.append(name[: -len(".idx")])
    return sizes, indexes


def catalog_pack(cat: Catalog, name: str, doc: dict[str, Any], actual: int | None) -> bool:
    """Add one pack's parsed index to ``cat``; False if the pack is missing or not its size.

    A damaged pack's objects go to ``damaged_keys`` (so a reader can say why it lacks them),
    never to ``objects``. The one rule for load_catalog and remote gc's survey.
    """
    keys = [(r[0], bytes.fromhex(r[1])) for r in doc["records"]]
    if actual != doc["size"]:
        cat.damaged[name] = "missing" if actual is None else f"truncated: {actual:,} of {doc['size']:,} bytes"
        for k in keys:
            cat.damaged_keys.setdefault(k, name)
        return False
    cat.packs[name] = {"size": doc["size"], "meta": bool(doc.get("meta"))}
    for k, r in zip(keys, doc["records"], strict=True):
        base = bytes.fromhex(r[6]) if len(r) == 7 else None
        cat.objects.setdefault(k, Location(name, r[2], r[3], r[4], r[5], base))
    return True


def lacks(backend: Backend, keys: Iterable[tuple[str, bytes | str]], cache_dir: Path | None = None) -> set:
    """Which of ``keys`` ((kind, digest bytes or hex id)) the remote does not hold intact.

    For gc's ``--require-remote``: a candidate may be deleted locally only if this returns
    nothing for it. Objects in a missing or truncated remote pack count as lacking. The answer
    comes from the remote's pack indexes; it does not download or re-verify the packs.

    Returns:
        The subset of ``keys`` (as given) that the remote lacks.
    """
    cat = load_catalog(backend, cache_dir)
    out = set()
    for kind, d in keys:
        digest = bytes.fromhex(d) if isinstance(d, str) else d
        if not _decodable(cat, kind, digest):
            out.add((kind, d))
    return out


def _decodable(cat: Catalog, kind: str, digest: bytes) -> bool:
    """True if the remote holds the object and, for a delta chunk, its whole base chain.

    The remote may hold a chunk as a delta even where the local copy is whole (another store
    pushed it): a remote copy whose base the remote lost is no copy at all.
    """
    seen: set[bytes] = set()
    while True:
        loc = cat.objects.get((kind, digest))
        if loc is None:
            return False
        if loc.base is None:
            return True
        if digest in seen or len(seen) >= MAX_DELTA_CHAIN:
            return False  # a cycle or a chain no reader would decode
        seen.add(digest)
        kind, digest = "c", loc.base


# -- remote refs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteRef:
    """A remote ref document and the version token its compare-and-swap needs."""

    name: str
    id: ObjectId | None
    seq: int
    doc: dict[str, Any]
    version: str


def _parse_ref_doc(raw: bytes, full: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise RemoteIntegrityError(f"remote ref {full} is not JSON") from None
    ok = (
        isinstance(doc, dict)
        and doc.get("v") == 1
        and doc.get("ref") == full
        and (doc.get("id") is None or (isinstance(doc.get("id"), str) and is_full_id(doc["id"])))
        and (doc.get("old") is None or (isinstance(doc.get("old"), str) and is_full_id(doc["old"])))
        and isinstance(doc.get("seq"), int)
        and doc["seq"] >= 1
    )
    if not ok:
        raise RemoteIntegrityError(f"remote ref {full} is malformed")
    return doc


def read_ref(backend: Backend, full: str) -> RemoteRef | None:
    """The remote ref ``full`` (None if it never existed)."""
    got = backend.read_versioned(ref_key(full))
    if got is None:
        return None
    raw, version = got
    doc = _parse_ref_doc(raw, full)
    return RemoteRef(full, ObjectId(doc["id"]) if doc["id"] else None, doc["seq"], doc, version)


def list_refs(backend: Backend) -> dict[str, RemoteRef]:
    """Every remote branch and tag that currently points at a commit."""
    out: dict[str, RemoteRef] = {}
    for key, _size in backend.list("refs/"):
        try:
            full = ref_from_key(key)
        except InvalidName as exc:
            raise RemoteIntegrityError(f"{backend.url}: {exc}") from None
        ref = read_ref(backend, full)
        if ref is not None and ref.id is not None:
            out[full] = ref
    return out


def _log_entry(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def ensure_logged(backend: Backend, ref: RemoteRef) -> None:
    """Write the reflog entry of the ref's current document if its author did not (R3)."""
    backend.put_if_absent(log_key(ref.name, ref.seq), _log_entry(ref.doc))


def remote_reflog(backend: Backend, full: str) -> list[dict[str, Any]]:
    """Every change of one remote ref, oldest first (the current one included even if unlogged)."""
    entries: dict[int, dict[str, Any]] = {}
    prefix = f"logs/{ref_key(full)}/"
    for key, _size in backend.list(prefix):
        try:
            seq = int(key[len(prefix) :])
        except ValueError:
            continue  # not an entry of this log
        try:
            raw = backend.get(key)
        except BackendNotFound:
            # Listed but unreadable: a lost entry is a lost gc root, so say so instead of skipping.
            raise RemoteIntegrityError(
                f"{backend.url}: remote reflog entry {key} is listed but cannot be read"
            ) from None
        entries[seq] = _parse_ref_doc(raw, full)
    cur = read_ref(backend, full)
    if cur is not None and cur.seq not in entries:
        entries[cur.seq] = cur.doc
    return [entries[s] for s in sorted(entries)]


# -- push --------------------------------------------------------------------------------------


@dataclass
class RefUpdate:
    """One ref a push moves (or was refused to move)."""

    local: str
    remote: str
    old: ObjectId | None
    new: ObjectId | None
    status: str = "pending"  # ok | up-to-date | rejected
    reason: str = ""
    full: str = ""  # the remote's full ref name

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "local": self.local,
            "remote": self.remote,
            "old": self.old,
            "new": self.new,
            "status": self.status,
            "reason": self.reason,
        }


@dataclass
class TransferResult:
    """What a push or fetch did."""

    refs: list[RefUpdate] = field(default_factory=list)
    objects: int = 0
    bytes: int = 0  # encoded bytes sent or received (what crossed the wire, framing excluded)
    raw_bytes: int = 0
    packs: int = 0
    seconds: float = 0.0

    @property
    def rejected(self) -> list[RefUpdate]:
        """The refs that did not move."""
        return [r for r in self.refs if r.status == "rejected"]

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "refs": [r.to_dict() for r in self.refs],
            "objects": self.objects,
            "bytes": self.bytes,
            "raw_bytes": self.raw_bytes,
            "packs": self.packs,
            "seconds": round(self.seconds, 3),
        }


def is_ancestor(store: Any, ancestor: ObjectId, descendant: ObjectId) -> bool:
    """True if ``ancestor`` is ``descendant`` or reachable through its parents."""
    stack, seen = [descendant], set()
    while stack:
        cid = stack.pop()
        if cid == ancestor:
            return True
        if cid in seen:
            continue
        seen.add(cid)
        stack.extend(load_commit(store, cid).parents)
    return False


class _LocalPackBuilder:
    """A remote pack assembled in one preallocated buffer, each local record read straight into it.

    A remote record is byte for byte a local one, so the local pack's record (header and
    payload) is read from disk into its place in the new pack, checked there, and decoded
    into a scratch buffer only to verify it: no copy into a growing buffer, none at the seal.
    """

    def __init__(self, meta: bool, capacity: int, mem: Any = None):
        self.meta = meta
        self.name = unique_name()
        self.records = []
        self.raw = 0
        # ``mem``: the buffer of a pack already uploaded. A fresh 80 MiB buffer per pack cost a
        # page fault and the kernel zeroing a page for every 4 KiB of it: 40 % of a push's CPU.
        self.mem = mem if mem is not None and len(mem) >= capacity else np.empty(capacity, dtype=np.uint8)
        self.view = memoryview(self.mem)
        HEADER.pack_into(self.view, 0, PACK_MAGIC, PACK_VERSION, 0)
        self._size = HEADER.size

    @property
    def size(self) -> int:
        return self._size

    def fits(self, enc_len: int) -> bool:
        return self._size + RECORD.size + enc_len + FOOTER.size <= len(self.view)

    def add_local(self, store: ObjectStore, kind: str, oid: ObjectId, entry: Entry, scratch: _Scratch) -> None:
        """Read, verify and append the local record of ``(kind, oid)``.

        Raises:
            IntegrityError: the local record is damaged (nothing was appended).
        """
        offset = self._size
        try:
            rec, payload = store.reader.read_into(
                store.pack_name(entry.pack), entry.offset, entry.enc_len, self.view[offset:]
            )
            if rec.kind != kind or rec.id != oid.digest:
                raise IntegrityError("record header does not match the index")
            base = None
            if _DELTA is not None and rec.codec == _DELTA:
                # Verify the payload that is sent, as it lies in this buffer: decoded against its
                # base's bytes into the scratch buffer, then hashed against the id. (The base is
                # decoded through reusable buffers and not hashed on its own: bytes that hash to
                # the id came from an intact payload on an intact base.)
                base = codecs.delta_base(payload)[0]
                if kind != "c" or rec.check != oid.digest:
                    raise IntegrityError("wrong bytes: the record's hash is another id")
                base_id = ObjectId.from_digest(base)
                base_entry = store.entry("c", base_id)
                if base_entry is None:
                    raise IntegrityError(f"its base chunk {base_id} is not in the store")
                base_raw = store.chunk_view(base_id, base_entry, scratch.chain())
                raw = codecs.decode_delta_into(payload, rec.raw_len, base_raw, scratch.get(rec.raw_len))
                if blake3.blake3(raw).digest() != oid.digest:
                    raise IntegrityError("payload hash does not match its id (wrong bytes)")
            else:
                raw = codecs.decode_into(rec.codec, payload, rec.raw_len, scratch.get(rec.raw_len))
                if blake3.blake3(raw).digest() != rec.check:
                    raise IntegrityError("payload hash does not match its record")
                if kind != "c":
                    verify_raw(kind, oid, raw)
                elif rec.check != oid.digest:
                    raise IntegrityError("wrong bytes: the record's hash is another id")
        except IntegrityError as exc:
            raise IntegrityError(
                f"local {KINDS[kind]} {oid} is damaged ({exc}); not pushing it (mstore fsck --repair-from REMOTE)"
            ) from None
        # The header as a push writes it (no local flags travel).
        RECORD.pack_into(
            self.view, offset, RECORD_MAGIC, ord(kind), rec.codec, 0, rec.raw_len, rec.enc_len, oid.digest, rec.check
        )
        self._size = offset + RECORD.size + rec.enc_len
        self.records.append(
            [kind, oid.digest.hex(), offset, rec.enc_len, rec.raw_len, rec.codec, *([base.hex()] if base else [])]
        )
        self.raw += rec.raw_len

    def seal(self) -> tuple[memoryview, bytes]:
        digest = blake3.blake3(self.view[: self._size]).digest()
        FOOTER.pack_into(self.view, self._size, FOOTER_MAGIC, 0, len(self.records), digest)
        self._size += FOOTER.size
        index = {"v": 1, "pack": self.name, "size": self._size, "meta": self.meta, "records": self.records}
        return self.view[: self._size], json.dumps(index, separators=(",", ":")).encode()


class _Scratch:
    """One reusable decode buffer (per thread): verifying a record needs its raw bytes only briefly."""

    def __init__(self) -> None:
        self.mem = np.empty(0, dtype=np.uint8)
        self._chain: Scratch | None = None

    def chain(self) -> Scratch:
        """The store's buffers for decoding a delta's base chain."""
        if self._chain is None:
            self._chain = Scratch()
        return self._chain

    def get(self, n: int) -> memoryview:
        if len(self.mem) < n:
            self.mem = np.empty(n, dtype=np.uint8)
        return memoryview(self.mem)[:n]


def _files_oldest_first(store: ObjectStore, live: Any) -> list[ObjectId]:
    """Live files in the order of their oldest commit, each tree in entry order.

    A delta's base is the same tensor in an older version, so sending older files first puts
    every base before its deltas and keeps a receiver's per-file hashing in step.
    """
    commits = sorted(live.commits, key=lambda c: (load_commit(store, c).time, c))
    out: dict[ObjectId, None] = {}
    seen_trees: set[ObjectId] = set()
    for cid in commits:
        stack = [load_commit(store, cid).tree]
        while stack:
            tid = stack.pop()
            if tid in seen_trees:
                continue
            seen_trees.add(tid)
            subtrees = []
            for e in Tree.parse(store.get("t", tid)).entries:
                if e.kind == "tree":
                    subtrees.append(e.id)
                elif e.id in live.files:
                    out.setdefault(e.id, None)
            stack.extend(reversed(subtrees))
    for fid in sorted(live.files):
        out.setdefault(fid, None)
    return list(out)


def _with_bases(store: ObjectStore, chunks: list[ObjectId], cat: Catalog) -> list[ObjectId]:
    """Add the delta bases the remote lacks, and order every base before the chunks built on it."""
    if _DELTA is None or not hasattr(store, "delta_bases"):
        return chunks
    bases = {ObjectId.from_digest(k): ObjectId.from_digest(v) for k, v in store.delta_bases().items()}
    if not bases:
        return chunks
    want = set(chunks)
    stack = list(chunks)
    while stack:
        base = bases.get(stack.pop())
        if base is not None and base not in want and not cat.has("c", base.digest):
            want.add(base)
            stack.append(base)

    out: list[ObjectId] = []
    emitted: set[ObjectId] = set()

    def emit(c: ObjectId, depth: int = 0) -> None:
        base = bases.get(c)
        if base is not None and base in want and base not in emitted and depth < 64:
            emit(base, depth + 1)
        if c not in emitted:
            emitted.add(c)
            out.append(c)

    for c in [*chunks, *sorted(want - set(chunks))]:
        emit(c)
    return out


def push(
    store: ObjectStore,
    backend: Backend,
    remote_name: str,
    updates: list[tuple[str, str, bool]],
    user: str,
    *,
    progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
    crash_hook: Hook | None = None,
    pack_target: int = PACK_TARGET,
    cache_dir: Path | None = None,
    now: Callable[[], float] = time.time,
) -> TransferResult:
    """Send what the remote lacks, then move remote refs by compare-and-swap.

    ``updates`` lists ``(local full ref, remote full ref, force)``. A branch moves only forward
    (its remote value must be an ancestor of the new one) unless forced; a tag never moves.
    Refused refs are reported with ``status == "rejected"``; the caller raises.

    Raises:
        IntegrityError: a local object to send is damaged (nothing moves).
        BackendError: the backend failed; re-running resumes (finished packs are not re-sent).
    """
    hook = crash_hook or _noop
    progress = progress or _noop
    t0 = time.monotonic()
    check_layout(backend, create=True, store=store)
    result = TransferResult()
    current: dict[str, RemoteRef | None] = {}
    wanted: list[RefUpdate] = []
    for local, remote, force in updates:
        with store.index.read() as txn:
            d = txn.get_ref(local)
        if d is None:
            raise InvalidName(f"no local ref {short_name(local)} to push")
        new = ObjectId.from_digest(d)
        cur = read_ref(backend, remote)
        current[remote] = cur
        old = cur.id if cur is not None else None
        upd = RefUpdate(short_name(local), short_name(remote), old, new, full=remote)
        result.refs.append(upd)
        if old == new:
            upd.status = "up-to-date"
            if store.has("m", new):
                _set_tracking(store, remote_name, remote, new, RefChange(user, "push", f"{remote_name} has it"))
            continue
        if old is not None and remote.startswith(TAGS):
            upd.status, upd.reason = "rejected", "tags never move (the remote tag points elsewhere)"
            continue
        if old is not None and not force:
            if not store.has("m", old):
                upd.status = "rejected"
                upd.reason = f"the remote is at {old.short}, which you do not have: fetch first"
                continue
            if not is_ancestor(store, old, new):
                upd.status = "rejected"
                upd.reason = f"not a fast-forward of the remote's {old.short}: fetch first, or force"
                continue
        wanted.append(upd)
    hook("refs-read")
    if not wanted:
        result.seconds = time.monotonic() - t0
        return result

    # Held from before reading what the remote has until the refs have swapped, so a remote gc
    # never deletes a pack this push counted on (mstore/remote_lock.py).
    with push_lock(backend, user):
        live = walk(store, [u.new for u in wanted if u.new is not None])
        if not live.complete:
            (kind, oid), err = next(iter(live.unreadable.items()))
            raise IntegrityError(f"cannot push: local {KINDS[kind]} {oid} is unreadable ({err})")
        cat = load_catalog(backend, cache_dir)
        hook("catalog-read")
        # Chunk i of every file (oldest version first), then chunk i+1 of every file, ...: a
        # receiver hashes each file's content as its chunks stream past (a file's id is that hash),
        # and across a checkpoint series, where chunk i is the same tensor in every version, the
        # versions advance in step, so it never has to hold one version's bytes for the next.
        # Then any other chunk the walk found (delta bases); each base before the deltas on it.
        order: dict[ObjectId, None] = {}
        lists = [load_file(store, fid).chunks for fid in _files_oldest_first(store, live)]
        for pos in range(max((len(c) for c in lists), default=0)):
            for chunks_of in lists:
                if pos < len(chunks_of):
                    order.setdefault(chunks_of[pos][0], None)
        for cid in sorted(live.chunks):
            order.setdefault(cid, None)
        data = [("c", o) for o in _with_bases(store, [o for o in order if not cat.has("c", o.digest)], cat)]
        meta = [(k, o) for k, s in (("f", live.files), ("t", live.trees), ("m", live.commits)) for o in sorted(s)]
        meta = [(k, o) for k, o in meta if not cat.has(k, o.digest)]
        total = 0
        for kind, oid in data + meta:
            e = store.entry(kind, oid)
            total += e.enc_len if e is not None else 0
        if on_total:
            on_total(total)

        # A builder thread reads and verifies local records while the caller's thread uploads the
        # previous pack (and the backend uploads its parts in parallel).
        packs: queue.Queue = queue.Queue(maxsize=2)
        failure: list[BaseException] = []
        stop = threading.Event()
        # Buffers of packs whose upload finished, for the next packs (deque: atomic append/pop).
        spare: deque = deque()

        def buffer_for(capacity: int) -> Any:
            while spare:
                try:
                    mem = spare.pop()
                except IndexError:
                    break
                if len(mem) >= capacity:
                    return mem
            return None

        def build() -> None:
            try:
                scratch = _Scratch()
                for objs, is_meta in ((data, False), (meta, True)):
                    builder: _LocalPackBuilder | None = None
                    for kind, oid in objs:
                        if stop.is_set():
                            return
                        entry = store.entry(kind, oid)
                        if entry is None:
                            raise IntegrityError(f"{KINDS[kind]} {oid} is not in the local store; cannot push it")
                        if builder is not None and not builder.fits(entry.enc_len):
                            packs.put(builder)
                            builder = None
                        if builder is None:
                            # Room for the target and one more chunk-sized record beyond it.
                            need = HEADER.size + RECORD.size + entry.enc_len + FOOTER.size
                            capacity = max(pack_target + (17 << 20), need)
                            builder = _LocalPackBuilder(is_meta, capacity, buffer_for(capacity))
                        builder.add_local(store, kind, oid, entry, scratch)
                        if builder.size >= pack_target:
                            packs.put(builder)
                            builder = None
                    if builder is not None and builder.records:
                        packs.put(builder)
            except BaseException as exc:  # handed to the uploading thread
                failure.append(exc)
            finally:
                packs.put(None)

        def upload(builder: _LocalPackBuilder, pack: bytes | memoryview, index: bytes) -> _LocalPackBuilder:
            backend.put(f"packs/{builder.name}.pack", pack)
            hook("pack-uploaded")
            backend.put(f"packs/{builder.name}.idx", index)  # R1: only after its pack
            hook("index-uploaded")
            return builder

        def done(builder: _LocalPackBuilder) -> None:
            mem = getattr(builder, "mem", None)
            if mem is not None and len(spare) < 2 * _UPLOADS:  # uploaded: its buffer is free
                spare.append(mem)
            sent = sum(r[3] for r in builder.records)
            result.packs += 1
            result.objects += len(builder.records)
            result.bytes += sent
            result.raw_bytes += builder.raw
            progress(sent)

        thread = threading.Thread(target=build, name="mstore-push-build", daemon=True)
        thread.start()
        # Two packs upload at once (each in parallel parts), so one pack's last parts never leave
        # the link idle.

        in_flight: deque = deque()
        try:
            with ThreadPoolExecutor(_UPLOADS, thread_name_prefix="mstore-push-upload") as uploads:
                while True:
                    builder = packs.get()
                    if builder is None:
                        break
                    pack, index = builder.seal()
                    hook("pack-built")
                    in_flight.append(uploads.submit(upload, builder, pack, index))
                    del pack, index
                    while len(in_flight) >= _UPLOADS:
                        done(in_flight.popleft().result())
                while in_flight:
                    done(in_flight.popleft().result())
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    packs.get(timeout=0.1)
                except queue.Empty:
                    pass
            thread.join()
        if failure:
            raise failure[0]
        hook("objects-sent")

        for upd in wanted:
            full = upd.full
            cur = current[full]
            if cur is not None:
                ensure_logged(backend, cur)  # R3: a predecessor's entry, if it was killed before logging
                hook("previous-logged")
            seq = cur.seq + 1 if cur is not None else 1
            doc = {
                "v": 1,
                "ref": full,
                "id": str(upd.new),
                "old": str(cur.id) if cur is not None and cur.id is not None else None,
                "seq": seq,
                "time": now(),
                "user": user,
                "command": "push",
                "message": f"push from {upd.local}",
            }
            won = backend.put_if_version(ref_key(full), _log_entry(doc), cur.version if cur is not None else None)
            hook("ref-swapped")
            if not won:
                upd.status = "rejected"
                upd.reason = "someone else pushed to it meanwhile: fetch first, then push again"
                continue
            backend.put_if_absent(log_key(full, seq), _log_entry(doc))
            hook("ref-logged")
            upd.status = "ok"
            _set_tracking(store, remote_name, full, upd.new, RefChange(user, "push", f"pushed to {remote_name}"))
    result.seconds = time.monotonic() - t0
    return result


def resolve_remote_ref(backend: Backend, name: str) -> str:
    """The full remote ref a user means by ``name`` (``exp1``, ``v1``, ``refs/heads/exp1``).

    A short name is a branch if the remote has that branch, else a tag if it has that tag.

    Raises:
        RefNotFound: the remote has neither (deleted refs count as absent).
        InvalidName: a bad name, or a short name that is both a branch and a tag there.
    """
    from .errors import RefNotFound

    if name.startswith("refs/"):
        check_ref_name(name)
        if not name.startswith((HEADS, TAGS)):
            raise InvalidName(f"{name!r} is neither a branch nor a tag")
        candidates = [name]
    else:
        candidates = [HEADS + name, TAGS + name]
    present = []
    for full in candidates:
        ref = read_ref(backend, full)
        if ref is not None and ref.id is not None:
            present.append(full)
    if not present:
        raise RefNotFound(f"{backend.url} has no {'ref' if name.startswith('refs/') else 'branch or tag'} {name}")
    if len(present) > 1:
        raise InvalidName(f"{name!r} is both a branch and a tag on {backend.url}: say {' or '.join(present)}")
    return present[0]


def delete_refs(
    store: ObjectStore,
    backend: Backend,
    remote_name: str,
    refs: list[str],
    user: str,
    *,
    force: bool = False,
    crash_hook: Hook | None = None,
    now: Callable[[], float] = time.time,
) -> TransferResult:
    """Delete remote branches (or, with ``force``, tags), like ``git push --delete``.

    A deletion is a ref change like any other (R2, R3): the ref document is replaced, by
    compare-and-swap from the document read, with a *tombstone* (``"id": null``, the next
    ``seq``), and the change is logged as ``logs/<ref>/<seq>``. The reflog therefore survives,
    a later push re-creates the ref as change ``seq + 1``, and readers (fetch, clone, ``remote
    show``) treat a tombstone as no ref. The local tracking ref ``refs/remotes/NAME/BRANCH``
    goes too.

    Without ``force``, a branch is deleted only if its tracking ref is at the commit the
    remote has now: a branch someone moved since you last fetched, or one you never fetched
    (no tracking ref), is rejected (you would delete work you never saw). So is a deletion
    whose swap loses to a concurrent push.

    ``refs`` are names as :func:`resolve_remote_ref` takes them; every one is resolved, then
    read and checked, before anything changes: if any is refused, none is deleted (all are
    reported rejected). The swaps are one per ref, so a push landing after the check can
    still make one lose: the refs swapped before it stay deleted, the later ones are not
    attempted (rejected), and each ref's status says which.

    Raises:
        RefNotFound: a named ref is not on the remote (nothing changed).
        InvalidName: an ambiguous or bad name.
    """
    hook = crash_hook or _noop
    t0 = time.monotonic()
    result = TransferResult()
    if check_layout(backend) is None:
        from .errors import RefNotFound

        raise RefNotFound(f"{backend.url} is empty: no {', '.join(refs)} there")
    fulls = list(dict.fromkeys(resolve_remote_ref(backend, name) for name in refs))
    # A deletion changes the refs a remote gc marks from: it holds the push lock like a push.
    with push_lock(backend, user):
        # Every ref is read and checked before any is swapped: one refused deletion refuses
        # them all, so a multi-ref delete never stops half-way over something it could check.
        checked: list[tuple[RefUpdate, RemoteRef]] = []
        refused = False
        for full in fulls:
            cur = read_ref(backend, full)
            upd = RefUpdate("(delete)", short_name(full), cur.id if cur is not None else None, None, full=full)
            result.refs.append(upd)
            why = _delete_refusal(store, remote_name, full, cur, force)
            if why or cur is None:
                upd.status, upd.reason, refused = "rejected", why, True
            else:
                checked.append((upd, cur))
        if refused:
            for upd, _cur in checked:
                upd.status, upd.reason = "rejected", "not deleted: another ref of this deletion was refused"
            checked = []
        # Then one swap per ref. A swap can still lose to a push landing after the check (swaps
        # of several refs are not one atomic change); the refs before it stay deleted, and the
        # ones after it are not attempted.
        for i, (upd, cur) in enumerate(checked):
            full = upd.full
            ensure_logged(backend, cur)  # R3: the change before this one, if its author was killed
            doc = {
                "v": 1,
                "ref": full,
                "id": None,
                "old": str(cur.id),
                "seq": cur.seq + 1,
                "time": now(),
                "user": user,
                "command": "delete",
                "message": f"push --delete {short_name(full)}",
            }
            hook("delete-read")
            won = backend.put_if_version(ref_key(full), _log_entry(doc), cur.version)
            hook("delete-swapped")
            if not won:
                upd.status = "rejected"
                upd.reason = "someone else pushed to it meanwhile: fetch first, then delete again"
                for later, _cur in checked[i + 1 :]:
                    later.status = "rejected"
                    later.reason = f"not deleted: the deletion of {short_name(full)} lost to a concurrent push"
                break
            backend.put_if_absent(log_key(full, doc["seq"]), _log_entry(doc))
            hook("delete-logged")
            upd.status = "ok"
            _set_tracking(store, remote_name, full, None, RefChange(user, "push", f"deleted on {remote_name}"))
    result.seconds = time.monotonic() - t0
    return result


def _delete_refusal(store: ObjectStore, remote_name: str, full: str, cur: RemoteRef | None, force: bool) -> str:
    """Why the deletion of remote ref ``full`` (now ``cur``) must not go ahead ('' if it may)."""
    if cur is None or cur.id is None:  # deleted since it was resolved
        return "someone else deleted it meanwhile"
    if force:
        return ""
    if full.startswith(TAGS):
        return "tags are not deleted unless forced (--force)"
    with store.index.read() as txn:
        seen = txn.get_ref(tracking_ref(remote_name, full))
    if seen is None:
        return (
            f"you never fetched it (no {short_name(tracking_ref(remote_name, full))}): the remote is at "
            f"{cur.id.short}, which you have not seen: fetch first, or force"
        )
    if seen != cur.id.digest:
        return (
            f"the remote is at {cur.id.short}, not at {ObjectId.from_digest(seen).short} as you last "
            "fetched: fetch first, or force"
        )
    return ""


def tracking_ref(remote_name: str, full: str) -> str:
    """``refs/heads/exp1`` of remote ``origin`` → ``refs/remotes/origin/exp1``."""
    return f"{REMOTES}{remote_name}/{short_name(full)}"


def _set_tracking(store: ObjectStore, remote_name: str, full: str, oid: ObjectId | None, change: RefChange) -> None:
    if not full.startswith(HEADS):
        return
    with store.index.write() as txn:
        set_if_equals(txn, tracking_ref(remote_name, full), ANY, oid.digest if oid else None, change)


# -- receiving -------------------------------------------------------------------------------


@dataclass
class Received:
    kind: str
    oid: ObjectId
    check: bytes
    codec: int
    raw_len: int
    payload: bytes
    raw: bytes | memoryview | None  # decoded bytes (metadata; chunks only while a fetch needs them)


def _raw_buffer(n: int) -> memoryview:
    """A fresh writable buffer of ``n`` bytes for decoded chunks.

    numpy's allocator asks for transparent huge pages, so a new 16 MiB buffer costs a few page
    faults instead of 4,096: decoding into ``bytes`` (a fresh allocation, then a copy) cost a
    clone more than hashing its data.
    """
    return memoryview(np.empty(n, dtype=np.uint8))


def verify_record(
    buf: bytes, kind: str, oid: ObjectId, loc: Location, keep_raw: bool,
    into: Callable[[int], memoryview] | None = None,
) -> Received:
    """Check one downloaded record against the catalog and its id (R4).

    ``into`` (chunks only) supplies the buffer a chunk is decoded into; its ``raw`` is then a
    view of that buffer (or of ``buf`` itself for a raw chunk), not a new ``bytes``.

    Raises:
        RemoteIntegrityError: truncated, framed wrongly, undecodable, or the wrong bytes.
    """
    where = f"{KINDS[kind]} {oid} (remote pack {loc.pack}, offset {loc.offset})"
    if len(buf) < RECORD.size + loc.enc_len:
        raise RemoteIntegrityError(f"{where}: truncated: got {len(buf)} of {RECORD.size + loc.enc_len} bytes")
    try:
        rec = parse_record_header(buf[: RECORD.size], loc.offset)
    except IntegrityError as exc:
        raise RemoteIntegrityError(f"{where}: {exc}") from None
    if (rec.kind, rec.id, rec.enc_len, rec.raw_len, rec.codec) != (
        kind, oid.digest, loc.enc_len, loc.raw_len, loc.codec,
    ):
        raise RemoteIntegrityError(f"{where}: the record header does not match the pack index")
    payload = memoryview(buf)[RECORD.size : RECORD.size + rec.enc_len]  # no copy of the payload
    if _DELTA is not None and rec.codec == _DELTA:
        if kind != "c" or loc.base is None:
            raise RemoteIntegrityError(f"{where}: a delta record without a base chunk in the pack index")
        try:
            if codecs.delta_base(payload)[0] != loc.base:
                raise IntegrityError("its payload names another base than the pack index")
        except IntegrityError as exc:
            raise RemoteIntegrityError(f"{where}: {exc}") from None
        # Verified against its id once its base is in the store (see _add_deltas).
        return Received(kind, oid, rec.check, rec.codec, rec.raw_len, payload, None)
    try:
        if kind == "c" and rec.check != oid.digest:
            raise IntegrityError("wrong bytes: the record's hash is another id")
        if into is not None and kind == "c":  # bounded by the recorded length
            raw = codecs.decode_into(rec.codec, payload, rec.raw_len, into(rec.raw_len))
        else:
            raw = codecs.decode(rec.codec, payload, rec.raw_len)
        if blake3.blake3(raw).digest() != rec.check:  # for a chunk, that is its id
            raise IntegrityError("payload hash does not match its record (wrong bytes)")
        if kind != "c":
            verify_raw(kind, oid, raw)
    except IntegrityError as exc:
        raise RemoteIntegrityError(f"{where}: {exc}") from None
    return Received(kind, oid, rec.check, rec.codec, rec.raw_len, payload, raw if keep_raw else None)


def _parse_received(r: Received) -> Any:
    """Parse a metadata object (trees: names with ``/`` or ``..`` are refused)."""
    try:
        if r.kind == "t":
            return Tree.parse(r.raw)
        if r.kind == "m":
            return Commit.parse(r.raw)
        if r.kind == "f":
            return FileObject.parse(r.raw)
    except MstoreError as exc:
        raise RemoteIntegrityError(f"remote {KINDS[r.kind]} {r.oid} is hostile or malformed: {exc}") from None
    return None


class RemoteSource:
    """Reads metadata objects local-first, else from the remote (verified); for the walk."""

    def __init__(self, store: ObjectStore, backend: Backend, cat: Catalog, max_object: int):
        self.store = store
        self.backend = backend
        self.cat = cat
        self.max_object = max_object
        self.received: dict[tuple[str, bytes], Received] = {}
        self.errors: list[MstoreError] = []  # what the walk met (it records, we raise)
        self._packs: dict[str, bytes] = {}

    def locate(self, kind: str, oid: ObjectId) -> Location:
        loc = self.cat.objects.get((kind, oid.digest))
        if loc is None:
            pack = self.cat.damaged_keys.get((kind, oid.digest))
            if pack is not None:
                raise RemoteIntegrityError(
                    f"{KINDS[kind]} {oid} is only in remote pack {pack}, which is {self.cat.damaged[pack]}"
                )
            raise RemoteIntegrityError(f"the remote names {KINDS[kind]} {oid} but does not have it")
        if loc.raw_len > self.max_object:
            raise OversizedObject(f"remote {KINDS[kind]} {oid} is {loc.raw_len:,} bytes, above {self.max_object:,}")
        return loc

    def get(self, kind: str, oid: ObjectId) -> bytes:
        try:
            return self._get(kind, oid)
        except MstoreError as exc:
            self.errors.append(exc)
            raise

    def _get(self, kind: str, oid: ObjectId) -> bytes:
        key = (kind, oid.digest)
        got = self.received.get(key)
        if got is not None:
            return got.raw
        if self.store.has(kind, oid):
            return self.store.get(kind, oid)
        loc = self.locate(kind, oid)
        info = self.cat.packs.get(loc.pack, {})
        if info.get("meta") and info.get("size", 0) <= 2 * PACK_TARGET:  # whole, if it is small
            pack = self._packs.get(loc.pack)
            if pack is None:
                pack = self._packs[loc.pack] = self.backend.get(f"packs/{loc.pack}.pack")
            buf = pack[loc.offset : loc.offset + RECORD.size + loc.enc_len]
        else:
            buf = self.backend.get_range(f"packs/{loc.pack}.pack", loc.offset, RECORD.size + loc.enc_len)
        r = verify_record(buf, kind, oid, loc, keep_raw=True)
        _parse_received(r)
        self.received[key] = r
        return r.raw


def _ranges(locs: list[tuple[str, ObjectId, Location]]) -> list[tuple[str, int, int, list]]:
    """Group records by pack into ranged GETs of at most ~16 MiB, decoding to at most 64 MiB."""
    by_pack: dict[str, list[tuple[str, ObjectId, Location]]] = {}
    for item in locs:
        by_pack.setdefault(item[2].pack, []).append(item)
    out = []
    for pack, items in sorted(by_pack.items()):
        items.sort(key=lambda i: i[2].offset)
        start = end = None
        group: list = []
        raw = 0
        for item in items:
            loc = item[2]
            rec_end = loc.offset + RECORD.size + loc.enc_len
            if group and (
                loc.offset - end > _COALESCE_GAP or rec_end - start > _RANGE_MAX or raw + loc.raw_len > _RANGE_RAW_MAX
            ):
                out.append((pack, start, end, group))
                group = []
            if not group:
                start, raw = loc.offset, 0
            group.append(item)
            raw += loc.raw_len
            end = max(end or 0, rec_end)
        if group:
            out.append((pack, start, end, group))
    return out


def fetch(
    store: ObjectStore,
    backend: Backend,
    remote_name: str,
    refs: list[str] | None,
    user: str,
    *,
    progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
    max_object: int = MAX_OBJECT,
    cache_dir: Path | None = None,
    tags: bool = True,
    crash_hook: Hook | None = None,
) -> TransferResult:
    """Receive what the local store lacks for remote refs; update ``refs/remotes/NAME/*``.

    ``refs`` are full remote ref names (None: every branch and tag). Tags are created locally
    when absent; a local tag pointing elsewhere is left alone and reported as rejected.

    Raises:
        RemoteIntegrityError: the remote served wrong, truncated or hostile data; no local ref
            moved and nothing unverified was indexed.
        OversizedObject: an object above ``max_object``.
        RefNotFound: a requested remote ref does not exist.
        UnsupportedFormat: a record in an encoding this store's format version lacks; no local
            ref moved (refused before anything is written when the catalog or the metadata
            shows it; see :func:`append_received` for a low-rank delta found later).
    """
    from .errors import RefNotFound

    progress = progress or _noop
    hook = crash_hook or _noop
    t0 = time.monotonic()
    result = TransferResult()
    if check_layout(backend) is None:
        if refs:
            raise RefNotFound(f"{backend.url} is empty: no {', '.join(short_name(r) for r in refs)} there")
        result.seconds = time.monotonic() - t0
        return result
    remote_refs = list_refs(backend)
    if refs is None:
        chosen = {n: r for n, r in remote_refs.items() if tags or n.startswith(HEADS)}
    else:
        chosen = {}
        for full in refs:
            if full not in remote_refs:
                raise RefNotFound(f"remote {remote_name} has no {short_name(full)}")
            chosen[full] = remote_refs[full]
    cat = load_catalog(backend, cache_dir, max_object)
    src = RemoteSource(store, backend, cat, max_object)
    # Walk the closure through local copies and verified remote metadata; what is not local
    # is exactly what to receive.
    hook("refs-read")
    live = walk(src, [r.id for r in chosen.values()])
    if src.errors:
        raise src.errors[0]
    hook("walked")
    if not live.complete:  # a parse error of an object read back from the local store
        (kind, oid), err = next(iter(live.unreadable.items()))
        raise RemoteIntegrityError(f"cannot fetch {KINDS[kind]} {oid}: {err}")
    need = {o for o in live.chunks if not store.has("c", o)}
    stack = list(need)
    while stack:  # delta bases the local store lacks come too
        loc = src.locate("c", stack.pop())
        if loc.base is not None:
            base = ObjectId.from_digest(loc.base)
            if base not in need and not store.has("c", base):
                need.add(base)
                stack.append(base)
    chunks = [("c", o, src.locate("c", o)) for o in sorted(need)]
    total = sum(loc.enc_len for _k, _o, loc in chunks) + sum(len(r.payload) for r in src.received.values())
    if on_total:
        on_total(total)

    def download(rng: tuple[str, int, int, list]) -> list[Received]:
        pack, start, end, group = rng
        buf = memoryview(backend.get_range(f"packs/{pack}.pack", start, end - start))
        return [
            verify_record(
                buf[loc.offset - start : loc.offset - start + RECORD.size + loc.enc_len], kind, oid, loc, True,
                into=_raw_buffer,
            )
            for kind, oid, loc in group
        ]

    # Encodings this store's format version lacks are refused before anything is written: the
    # metadata's from the records received, the chunks' from the catalog (a low-rank delta is
    # recognised only in its payload, so append_received checks each chunk again).
    version = store.config.version
    for r in src.received.values():
        _check_encoding(version, r)
    for _k, o, loc in chunks:
        _check_codec(version, "c", o, loc.codec)
    new_files = [r for r in src.received.values() if r.kind == "f"]
    verifier = _FileVerifier(store, new_files, {o for _k, o, _l in chunks}, chunks)
    with store.batch() as batch, ThreadPoolExecutor(_THREADS, thread_name_prefix="mstore-fetch") as pool:
        # 1. chunks, verified in the download threads, appended in order by a writer thread;
        #    each new file's content is hashed here from them as they stream past (its id is
        #    that hash), while the writer copies, hashes and writes the local pack.
        deltas: list[Received] = []
        decoding: deque = deque()  # (record, base id, future of its decoded bytes)
        # Decoded bytes of the deltas submitted and not yet taken: they share the in-flight
        # budget with the ranges downloading, so a range dense in small deltas cannot hold
        # gigabytes of decoded output.
        decoding_bytes = [0]

        def take(r: Received) -> None:
            writer.put(r)
            verifier.chunk(r.oid, r.raw)
            r.raw = None
            result.objects += 1
            result.bytes += len(r.payload)
            result.raw_bytes += r.raw_len
            progress(len(r.payload))

        def take_decoded(block: bool, until: int = -1) -> None:
            # In order: the finished ones; all (block); or, with until, as many as it takes
            # to hold at most that many decoded bytes.
            while decoding and (block or decoding[0][2].done() or decoding_bytes[0] > until >= 0):
                r, base_id, fut = decoding.popleft()
                r.raw = fut.result()
                decoding_bytes[0] -= r.raw_len
                verifier.release(base_id)
                take(r)

        writer = _Writer(batch)
        try:
            ranges = _ranges(chunks)
            cost = [end - start + sum(loc.raw_len for _k, _o, loc in group) for _p, start, end, group in ranges]
            for received in _bounded_map(
                pool, download, ranges, 2 * _THREADS, cost, _AHEAD_BYTES, lambda: decoding_bytes[0]
            ):
                for r in received:
                    if r.codec == _DELTA:
                        got = verifier.delta_base(r)
                        if got is None:
                            deltas.append(r)  # its base is not readable yet: after the flush
                        else:  # decoded and verified in a pool thread; taken in order
                            take_decoded(block=False, until=max(0, _AHEAD_BYTES - r.raw_len))
                            decoding.append((r, got[0], pool.submit(decode_delta_checked, r, got[1])))
                            decoding_bytes[0] += r.raw_len
                        continue
                    take(r)
                take_decoded(block=len(decoding) > 2)
                hook("range-received")
            take_decoded(block=True)
        finally:
            writer.close(raise_error=False)  # never leave it writing into a batch being abandoned
        writer.close()
        # 2. index the (verified) chunks; deltas whose base came late and files whose chunks
        #    did not stay in memory are checked from the store. A failure below leaves only
        #    verified, unreachable chunks, which the next fetch re-uses.
        batch.flush()
        hook("chunks-indexed")
        for r in deltas:
            result.objects += 1
            result.bytes += len(r.payload)
            result.raw_bytes += r.raw_len
            progress(len(r.payload))
        _add_deltas(store, batch, deltas)
        for r in verifier.remaining():
            _verify_file_content(store, r)
        hook("files-verified")
        # 3. manifests, trees, commits; then the tracking refs, in the same transaction.
        for key in sorted(src.received, key=lambda k: "ftm".index(k[0])):
            r = src.received[key]
            if not batch.contains(r.kind, r.oid):
                append_received(batch, r)
            result.objects += 1
            result.bytes += len(r.payload)
            result.raw_bytes += r.raw_len
            progress(len(r.payload))
        change = RefChange(user, "fetch", f"fetched from {remote_name}")
        for full, ref in sorted(chosen.items()):
            result.refs.append(RefUpdate(short_name(full), short_name(full), None, ref.id))

        def move(txn) -> None:
            for upd, (full, ref) in zip(result.refs, sorted(chosen.items()), strict=True):
                if full.startswith(HEADS):
                    target = tracking_ref(remote_name, full)
                    cur = txn.get_ref(target)
                    upd.local = short_name(target)
                    upd.old = ObjectId.from_digest(cur) if cur else None
                    set_if_equals(txn, target, ANY, ref.id.digest, change)
                    upd.status = "up-to-date" if cur == ref.id.digest else "ok"
                else:
                    cur = txn.get_ref(full)
                    upd.old = ObjectId.from_digest(cur) if cur else None
                    if cur is None:
                        set_if_equals(txn, full, None, ref.id.digest, change)
                        upd.status = "ok"
                    elif cur == ref.id.digest:
                        upd.status = "up-to-date"
                    else:
                        upd.status, upd.reason = "rejected", "a local tag of that name points elsewhere"

        batch.commit(move)
    hook("committed")
    result.seconds = time.monotonic() - t0
    return result


class _Writer:
    """Appends verified records to a batch on a thread of its own, in the order given.

    The batch is touched only by this thread until :meth:`close` returns. A failure is raised
    by the next :meth:`put` or by :meth:`close`; the records after it are dropped.
    """

    def __init__(self, batch: Any, depth: int = 2):
        self.batch = batch
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="mstore-fetch-write", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (r := self.queue.get()) is not None:
            if self.error is not None:
                continue
            try:
                if not self.batch.contains(r.kind, r.oid):
                    append_received(self.batch, r)
            except BaseException as exc:  # raised in the caller's thread
                self.error = exc

    def put(self, r: Received) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(r)

    def close(self, raise_error: bool = True) -> None:
        """Wait until every record is appended (idempotent); raise what failed."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if raise_error and self.error is not None:
            raise self.error


def decode_delta_checked(
    r: Received, base: bytes | memoryview, buffer: Callable[[int], memoryview] = _raw_buffer
) -> memoryview:
    """Decode a received delta chunk against its base's raw bytes and check it is its id.

    Both the decoded bytes and the record's check hash must be the chunk's id. ``buffer(n)``
    supplies the output buffer (a fresh one by default).

    Raises:
        RemoteIntegrityError: the payload does not decode, or the result is another chunk.
    """
    try:
        raw = codecs.decode_delta_into(r.payload, r.raw_len, base, buffer(r.raw_len))
    except IntegrityError as exc:
        raise RemoteIntegrityError(f"remote delta chunk {r.oid}: {exc}") from None
    if blake3.blake3(raw).digest() != r.oid.digest or r.check != r.oid.digest:
        raise RemoteIntegrityError(f"remote delta chunk {r.oid}: wrong bytes (they hash to another id)")
    return raw


def append_received(batch: Any, r: Received) -> None:
    """Append a verified record to the local batch.

    Raises:
        UnsupportedFormat: the record uses an encoding the local store's format version lacks
            (an older mstore would read it as damage); the record is not appended. No ref
            moves, since refs move only when the batch commits. The batch indexes what it holds
            whenever it has written ``WriteBatch.FLUSH_BYTES``, so in a fetch larger than that,
            records appended before this one may already be indexed: only verified records,
            unreachable until a later fetch re-uses them or gc reclaims them. (A fetch refuses
            the encodings it can see in the catalog and the metadata before writing anything;
            only a low-rank delta, recognised in its payload, can be refused here that late.)
    """
    _check_encoding(batch.store.config.version, r)
    batch.add_encoded(r.kind, r.oid, r.check, r.codec, r.raw_len, r.payload)


def _check_codec(version: int, kind: str, oid: ObjectId, codec: int, payload: bytes | memoryview = b"") -> None:
    """Refuse, before anything is written, an encoding newer than the local store's format.

    The store refuses such a record itself (WriteBatch.add_encoded); asking first lets a fetch
    fail before it downloads or writes anything, with advice for the remote case.

    Raises:
        UnsupportedFormat: the store's version predates the encoding.
    """
    need, what = required_version(codec, payload)
    if version < need:
        raise UnsupportedFormat(
            f"remote {KINDS[kind]} {oid} is a {what} record (format version {need}); this store is version "
            f"{version} and must not hold it: clone the remote into a new store instead"
        )


def _check_encoding(version: int, r: Received) -> None:
    """:func:`_check_codec` of a received record (a low-rank delta is told by its payload)."""
    _check_codec(version, r.kind, r.oid, r.codec, r.payload)


def _bounded_map(
    pool: ThreadPoolExecutor, fn: Callable, items: list, ahead: int, cost: list[int] | None = None,
    budget: int = 0, elsewhere: Callable[[], int] | None = None,
):
    """``pool.map`` that keeps at most ``ahead`` results in flight (bounded memory), in order.

    With ``cost`` (one figure per item) and ``budget``, also at most ``budget`` of cost in
    flight (always at least one item), counting what ``elsewhere()`` says the caller holds
    besides (work it submitted from the results).
    """
    pending: deque = deque()
    held = 0
    i = 0
    while True:
        while i < len(items) and len(pending) < ahead and (
            not pending or cost is None or held + (elsewhere() if elsewhere else 0) + cost[i] <= budget
        ):
            pending.append((pool.submit(fn, items[i]), cost[i] if cost is not None else 0))
            held += pending[-1][1]
            i += 1
        if not pending:
            return
        fut, c = pending.popleft()
        result = fut.result()
        held -= c
        yield result


class _FileVerifier:
    """Hashes each received file manifest's content from chunks as they arrive (R4).

    A file's id is BLAKE3 of its content. Chunks stream past in pack order (a push writes them
    in file order), so each file's hash advances as its next chunk arrives; chunks the local
    store already had are read from it. Raw chunks are kept in memory only while a file or a
    delta still needs them, within a budget; a file that cannot be finished this way is
    checked from the store after the flush (:meth:`remaining`).
    """

    BUDGET = 64 << 20

    def __init__(self, store: ObjectStore, files: list[Received], incoming: set[ObjectId], chunks: list):
        self.store = store
        self.incoming = incoming
        self.arrived: set[ObjectId] = set()
        self.cache: dict[ObjectId, bytes] = {}
        self.cached = 0
        self.uses: dict[ObjectId, int] = {}
        self.waiting: dict[ObjectId, list[ObjectId]] = {}
        self.states: dict[ObjectId, list] = {}
        self.records = {r.oid: r for r in files}
        self.later: list[ObjectId] = []
        incoming_len: dict[ObjectId, int] = {}
        for _k, o, loc in chunks:
            incoming_len[o] = loc.raw_len  # the length its record must have and decode to
            if loc.base is not None:
                b = ObjectId.from_digest(loc.base)
                if b in incoming:
                    self.uses[b] = self.uses.get(b, 0) + 1
        for r in files:
            fobj = FileObject.parse(r.raw)
            if len(fobj.chunks) == 1 and fobj.chunks[0][0] == r.oid:
                # One chunk: its verified id is the content hash, if the sizes agree too.
                cid = fobj.chunks[0][0]
                if cid in incoming_len:
                    raw_len: int | None = incoming_len[cid]
                else:
                    entry = store.entry("c", cid)
                    raw_len = entry.raw_len if entry is not None else None
                _check_one_chunk_file(r.oid, fobj, raw_len)
                continue
            for cid, _n in fobj.chunks:
                if cid in incoming:
                    self.uses[cid] = self.uses.get(cid, 0) + 1
            self.states[r.oid] = [blake3.blake3(), fobj.chunks, 0]
        for fid in list(self.states):
            self._advance(fid)

    def _release(self, cid: ObjectId) -> None:
        left = self.uses.get(cid, 0) - 1
        self.uses[cid] = left
        if left <= 0:
            raw = self.cache.pop(cid, None)
            if raw is not None:
                self.cached -= len(raw)

    def _read(self, cid: ObjectId) -> bytes | None:
        raw = self.cache.get(cid)
        if raw is not None:
            return raw
        if self.store.has("c", cid):
            return self.store.get("c", cid)
        return None

    def _advance(self, fid: ObjectId) -> None:
        state = self.states[fid]
        h, chunks = state[0], state[1]
        while state[2] < len(chunks):
            cid, n = chunks[state[2]]
            raw = self._read(cid)
            if raw is None:
                if cid in self.incoming and cid not in self.arrived:
                    self.waiting.setdefault(cid, []).append(fid)
                else:  # arrived but neither kept nor indexed yet: check after the flush
                    self.later.append(fid)
                    del self.states[fid]
                return
            if len(raw) != n:
                raise RemoteIntegrityError(f"remote file {fid}: chunk {cid} is {len(raw)} bytes, manifest says {n}")
            h.update(raw)
            state[2] += 1
            if cid in self.incoming:
                self._release(cid)
        if h.digest() != fid.digest:
            raise RemoteIntegrityError(f"remote file manifest {fid}: its chunks hash to {h.hexdigest()}, not its id")
        del self.states[fid]

    def chunk(self, cid: ObjectId, raw: bytes | None) -> None:
        """A verified chunk arrived (``raw``: its bytes)."""
        self.arrived.add(cid)
        if raw is not None and self.uses.get(cid, 0) > 0 and self.cached + len(raw) <= self.BUDGET:
            self.cache[cid] = raw
            self.cached += len(raw)
        for fid in self.waiting.pop(cid, []):
            if fid in self.states:
                self._advance(fid)

    def delta_base(self, r: Received) -> tuple[ObjectId, bytes] | None:
        """A delta chunk's base id and raw bytes, if readable now (else None)."""
        base_id = ObjectId.from_digest(codecs.delta_base(r.payload)[0])
        base = self._read(base_id)
        return None if base is None else (base_id, base)

    def release(self, base_id: ObjectId) -> None:
        """A delta built on ``base_id`` has been decoded."""
        if base_id in self.incoming:
            self._release(base_id)

    def remaining(self) -> list[Received]:
        """Files still to check, from the store (call after every chunk is indexed)."""
        return [self.records[f] for f in [*self.later, *self.states]]


def _add_deltas(store: ObjectStore, batch: Any, deltas: list[Received]) -> None:
    """Verify delta chunks against their ids once their bases are indexed, level by level."""
    scratch = Scratch()
    while deltas:
        ready = [r for r in deltas if store.has("c", ObjectId.from_digest(codecs.delta_base(r.payload)[0]))]
        if not ready:
            r = deltas[0]
            raise RemoteIntegrityError(f"remote delta chunk {r.oid}: its base is neither local nor on the remote")
        for r in ready:
            base_id = ObjectId.from_digest(codecs.delta_base(r.payload)[0])
            # The base is read without hashing it: the delta's own id, checked below, covers
            # every byte of it. Only a mismatch asks whether the local base is the damage.
            base = _local_chunk(store, base_id, scratch)
            try:
                decode_delta_checked(r, base)
            except RemoteIntegrityError:
                store.get("c", base_id)  # raises, naming the damage, if the local base is the cause
                raise
            if not batch.contains(r.kind, r.oid):
                append_received(batch, r)
        done = {id(r) for r in ready}
        deltas = [r for r in deltas if id(r) not in done]
        batch.flush()


def _check_one_chunk_file(fid: ObjectId, fobj: FileObject, raw_len: int | None) -> None:
    """Check a one-chunk file whose id is its chunk's: every size it has must agree.

    The manifest's size, its one chunk's length and that chunk's verified raw length
    (``raw_len``: from the record, the catalog or the local index; None if unknown) must be
    one figure. Otherwise a manifest could claim any size for real bytes, and a later commit
    of the same content would re-use it.

    Raises:
        RemoteIntegrityError: they differ.
    """
    n = fobj.chunks[0][1]
    if raw_len is None or not fobj.size == n == raw_len:
        have = "unknown" if raw_len is None else f"{raw_len:,} bytes"
        raise RemoteIntegrityError(
            f"remote file manifest {fid} is hostile or malformed: it claims {fobj.size:,} bytes in one "
            f"chunk of {n:,}, but that chunk is {have}"
        )


def _verify_file_content(store: ObjectStore, r: Received) -> None:
    """A file's id is the hash of its content: hash its (verified, indexed) chunks in order."""
    fobj = FileObject.parse(r.raw)
    if len(fobj.chunks) == 1 and fobj.chunks[0][0] == r.oid:
        entry = store.entry("c", r.oid)
        _check_one_chunk_file(r.oid, fobj, entry.raw_len if entry is not None else None)
        return  # one chunk of the size it claims: its id, already verified, is the content hash
    # The chunks are read without hashing each: the file's id is the hash of them all, so one
    # hash checks every byte. Only a mismatch verifies them one by one, to tell local damage
    # (named by store.get) from a remote manifest that lists the wrong chunks.
    h = blake3.blake3()
    scratch = Scratch()
    for cid, n in fobj.chunks:
        raw = _local_chunk(store, cid, scratch)
        if len(raw) != n:
            raise RemoteIntegrityError(f"remote file {r.oid}: chunk {cid} is {len(raw)} bytes, manifest says {n}")
        h.update(raw)
    if h.digest() != r.oid.digest:
        for cid, _n in fobj.chunks:
            store.get("c", cid)
        raise RemoteIntegrityError(f"remote file manifest {r.oid}: its chunks hash to {h.hexdigest()}, not its id")


def _local_chunk(store: ObjectStore, cid: ObjectId, scratch: Scratch) -> memoryview:
    """A local chunk's decoded bytes, *not* hashed (valid until ``scratch`` is used again).

    Only for callers that hash what they build from it against an id they trust.

    Raises:
        ObjectNotFound: not indexed; IntegrityError: its records do not decode.
    """
    entry = store.entry("c", cid)
    if entry is None:
        raise ObjectNotFound(f"chunk {cid} is not in the store", cid)
    try:
        return store.chunk_view(cid, entry, scratch)
    except IntegrityError:
        store.get("c", cid)  # decodes level by level, naming the damaged base of a chain
        raise


# -- repair ---------------------------------------------------------------------------------


def repair(
    store: ObjectStore, backend: Backend, keys: Iterable[tuple[str, ObjectId]], cache_dir: Path | None = None
) -> tuple[list[tuple[str, ObjectId]], dict[tuple[str, ObjectId], str]]:
    """Replace damaged or missing local objects with verified copies from the remote.

    The copies go into a new local pack; the index entries are repointed in one transaction
    (the damaged bytes stay where they are, unreferenced, for gc to reclaim).

    Returns:
        (repaired keys, {key: why it could not be repaired}).

    Raises:
        UnsupportedFormat: the remote holds a copy in an encoding the local store's format
            version lacks; nothing is repaired (no pack written, no entry repointed).
    """
    cat = load_catalog(backend, cache_dir)
    src = RemoteSource(store, backend, cat, MAX_OBJECT)
    got: list[Received] = []
    failed: dict[tuple[str, ObjectId], str] = {}
    for kind, oid in keys:
        try:
            loc = src.locate(kind, oid)
            buf = backend.get_range(f"packs/{loc.pack}.pack", loc.offset, RECORD.size + loc.enc_len)
            r = verify_record(buf, kind, oid, loc, keep_raw=kind in "tmf")
            if r.codec == _DELTA:
                # The local copy is replaced whole: decode through the base (local, verified),
                # check the id, and store it re-encoded on its own, so nothing repaired hangs
                # on a base that may itself be the damage.
                base = store.get("c", ObjectId.from_digest(codecs.delta_base(r.payload)[0]))
                raw = decode_delta_checked(r, base)  # its record's check hash must be the id too
                r.codec, r.payload = codecs.encode(raw, int(store.config.get("codec", "zstd_level", 3)))
            elif r.raw is not None:
                _parse_received(r)
            _check_encoding(store.config.version, r)
            got.append(r)
        except UnsupportedFormat:
            raise  # not damage of one copy: this store cannot hold the remote's encoding
        except MstoreError as exc:
            failed[(kind, oid)] = str(exc)
    if not got:
        return [], failed
    max_pack = int(store.config.get("packs", "max_size", 64 << 20))
    writer = PackWriter(store.packs_dir, max_pack)
    offsets = []
    try:
        for r in got:
            offsets.append(writer.add(r.kind, r.oid.digest, r.check, r.codec, r.raw_len, r.payload))
        writer.seal()  # durable before the index points at it (I2)
    except BaseException:
        writer.abandon()
        raise
    stamp = time.time()
    with store.index.write() as txn:
        number = txn.register_pack(writer.name, stamp)
        for r, off in zip(got, offsets, strict=True):
            txn.put_entry(
                r.kind, r.oid.digest, Entry(number, off, len(r.payload), r.raw_len, r.codec, 0, stamp), overwrite=True
            )
            if r.kind == "c" and "deltas" in txn.dbs:
                txn.db_delete("deltas", r.oid.digest)  # stored whole now (as WriteBatch does)
    store.forget_pack_names()
    return [(r.kind, r.oid) for r in got], failed


__all__ = [
    "MAX_OBJECT",
    "PACK_TARGET",
    "Catalog",
    "RefUpdate",
    "RemoteRef",
    "TransferResult",
    "check_layout",
    "delete_refs",
    "fetch",
    "is_ancestor",
    "lacks",
    "list_refs",
    "load_catalog",
    "push",
    "read_ref",
    "remote_reflog",
    "repair",
    "resolve_remote_ref",
    "tracking_ref",
]


_REMOTE_NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit"


def check_remote_name(name: str) -> str:
    """Validate a remote's name (it becomes part of ``refs/remotes/NAME/``).

    Raises:
        InvalidName: not a simple name.
    """
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name) or ".." in name:
        raise InvalidName(f"invalid remote name {name!r}: use {_REMOTE_NAME_RULE}")
    check_ref_name(f"{REMOTES}{name}/x")
    return name
