r"""The object model: file manifests, trees and commits, with canonical JSON and validation.

Chunks are raw bytes and need no class. Every other object is canonical JSON (sorted keys, no
spaces, UTF-8, no NaN or infinities) so that the same content always has the same id.

Examples (pretty-printed here; stored without whitespace)::

    file   {"chunker": "safetensors", "chunks": [["9f3c…", 120], ["41aa…", 1048576]],
            "size": 1048696, "v": 1}
    tree   {"entries": [{"id": "9f3c…", "kind": "file", "mode": 420, "name": "model.safetensors",
            "size": 1048696}], "v": 1}
    commit {"author": "ada", "inputs": {}, "kind": "checkpoint", "message": "step 100",
            "meta": {"lr": 0.0003}, "metrics": {}, "params": {}, "parents": ["…"],
            "provenance": {…}, "stats": {…}, "time": "2026-11-22T05:30:57.123456Z",
            "tree": "…", "v": 1}

A file's id is BLAKE3 of its *content* (what ``b3sum`` prints), not of its manifest; a tree's
and a commit's id is BLAKE3 of ``b"tree <len>\\0"`` / ``b"commit <len>\\0"`` + canonical bytes.

Parsing validates everything a hostile store or remote could get wrong: types, id syntax,
entry names (no ``/``, ``.``, ``..``, NUL or empty), sort order and duplicates, sizes that add
up. Nothing unvalidated leaves this module.
"""

from __future__ import annotations

import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidName, MalformedObject, MstoreError
from .hashing import ObjectId, hash_typed, is_full_id

OBJECT_VERSION = 1

FILE_KIND = "file"
TREE_KIND = "tree"
KINDS_IN_TREE = (FILE_KIND, TREE_KIND)
COMMIT_KINDS = ("model", "dataset", "checkpoint", "adapter", "eval", "other")

MODE_FILE = 0o644
MODE_EXEC = 0o755
MODE_DIR = 0o755

# A commit message or metadata is not a place for a file's content.
MAX_COMMIT_BYTES = 16 << 20


def canonical_json(value: Any) -> bytes:
    """Canonical bytes of a JSON value.

    Raises:
        MalformedObject: the value holds NaN, an infinity, or something JSON cannot express.
    """
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
            "utf-8"
        )
    except (TypeError, ValueError) as exc:
        raise MalformedObject(f"cannot be stored as canonical JSON: {exc}") from None


def _load(raw: bytes, what: str) -> dict:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError: malformed JSON or an integer too long to convert; RecursionError: deep nesting.
        raise MalformedObject(f"{what} is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise MalformedObject(f"{what} is not a JSON object")
    v = value.get("v")
    if type(v) is not int or v != OBJECT_VERSION:
        raise MalformedObject(f"{what} has unsupported object version {v!r}")
    try:
        canonical = canonical_json(value)
    except MalformedObject:
        canonical = None
    if canonical != bytes(raw):
        # One content, one id: a non-canonical encoding would let the same object live under
        # many ids (and hide edits from a reviewer comparing ids).
        raise MalformedObject(f"{what} is not in canonical form (sorted keys, no whitespace)")
    return value


def _id(value: Any, what: str) -> ObjectId:
    if not isinstance(value, str) or not is_full_id(value):
        raise MalformedObject(f"{what}: {value!r} is not an object id")
    return ObjectId.trusted(value)  # just validated: skip the second check


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedObject(f"{what}: {value!r} is not a non-negative integer")
    return value


def check_name(name: str) -> str:
    """Validate one tree entry name.

    Raises:
        InvalidName: empty, ``.`` or ``..``, containing ``/`` or NUL, or longer than 255
            bytes (no file system would accept it).
    """
    if not isinstance(name, str) or name in ("", ".", ".."):
        raise InvalidName(f"invalid entry name {name!r}")
    if "/" in name or "\0" in name:
        raise InvalidName(f"invalid entry name {name!r}: contains '/' or NUL")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidName(f"invalid entry name {name!r}: not valid UTF-8") from None
    if len(encoded) > 255:
        raise InvalidName(f"entry name too long ({len(name)} characters): {name[:40]!r}…")
    return name


@dataclass(frozen=True)
class FileObject:
    """A file's manifest: its chunks in order."""

    size: int
    chunker: str
    chunks: tuple[tuple[ObjectId, int], ...]

    def to_bytes(self) -> bytes:
        """Canonical bytes."""
        return canonical_json(
            {
                "v": OBJECT_VERSION,
                "size": self.size,
                "chunker": self.chunker,
                "chunks": [[cid, n] for cid, n in self.chunks],
            }
        )

    @classmethod
    def parse(cls, raw: bytes) -> FileObject:
        """Parse and validate a manifest.

        Raises:
            MalformedObject: any field wrong, or chunk lengths that do not add up to the size.
        """
        d = _load(raw, "file manifest")
        size = _int(d.get("size"), "file size")
        chunker = d.get("chunker")
        if not isinstance(chunker, str):
            raise MalformedObject("file manifest: chunker missing")
        chunks_raw = d.get("chunks")
        if not isinstance(chunks_raw, list):
            raise MalformedObject("file manifest: chunks missing")
        chunks = []
        total = 0
        for item in chunks_raw:
            if not isinstance(item, list) or len(item) != 2:
                raise MalformedObject("file manifest: chunk entry is not [id, length]")
            n = _int(item[1], "chunk length")
            if n == 0:
                raise MalformedObject("file manifest: empty chunk")
            chunks.append((_id(item[0], "chunk id"), n))
            total += n
        if total != size:
            raise MalformedObject(f"file manifest: chunks add up to {total}, size says {size}")
        return cls(size, chunker, tuple(chunks))


@dataclass(frozen=True)
class TreeEntry:
    """One name in a tree."""

    name: str
    kind: str
    mode: int
    id: ObjectId
    size: int

    def to_dict(self) -> dict:
        """JSON form."""
        return {"name": self.name, "kind": self.kind, "mode": self.mode, "id": str(self.id), "size": self.size}


@dataclass(frozen=True)
class Tree:
    """A directory: entries sorted by name."""

    entries: tuple[TreeEntry, ...]

    def __post_init__(self) -> None:
        names = [e.name for e in self.entries]
        if names != sorted(names):
            raise MalformedObject("tree entries are not sorted by name")
        if len(set(names)) != len(names):
            raise MalformedObject("tree has duplicate names")

    def to_bytes(self) -> bytes:
        """Canonical bytes."""
        return canonical_json({"v": OBJECT_VERSION, "entries": [e.to_dict() for e in self.entries]})

    @property
    def id(self) -> ObjectId:
        """This tree's id."""
        return hash_typed("tree", self.to_bytes())

    def get(self, name: str) -> TreeEntry | None:
        """The entry called ``name``, or None."""
        for e in self.entries:
            if e.name == name:
                return e
        return None

    @classmethod
    def build(cls, entries: list[TreeEntry]) -> Tree:
        """A tree from entries in any order (names are validated).

        Raises:
            InvalidName: an entry name is not acceptable.
        """
        for e in entries:
            check_name(e.name)
        return cls(tuple(sorted(entries, key=lambda e: e.name)))

    @classmethod
    def parse(cls, raw: bytes) -> Tree:
        """Parse and validate a tree.

        Raises:
            MalformedObject: a field is wrong, or entries unsorted or duplicated.
            InvalidName: an entry name could escape a checkout directory.
        """
        d = _load(raw, "tree")
        items = d.get("entries")
        if not isinstance(items, list):
            raise MalformedObject("tree: entries missing")
        entries = []
        for item in items:
            if not isinstance(item, dict):
                raise MalformedObject("tree: entry is not an object")
            name = check_name(item.get("name"))
            kind = item.get("kind")
            if kind not in KINDS_IN_TREE:
                raise MalformedObject(f"tree entry {name!r}: unknown kind {kind!r}")
            mode = _int(item.get("mode"), f"mode of {name!r}")
            if mode not in (MODE_FILE, MODE_EXEC):
                raise MalformedObject(f"tree entry {name!r}: mode {oct(mode)} not allowed")
            entries.append(
                TreeEntry(
                    name,
                    kind,
                    mode,
                    _id(item.get("id"), f"id of {name!r}"),
                    _int(item.get("size"), f"size of {name!r}"),
                )
            )
        return cls(tuple(entries))


@dataclass(frozen=True)
class Commit:
    """A version: a tree plus everything that says what it is and where it came from."""

    tree: ObjectId
    parents: tuple[ObjectId, ...]
    author: str
    time: str
    message: str
    kind: str = "other"
    meta: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON form (without the id)."""
        return {
            "v": OBJECT_VERSION,
            "tree": str(self.tree),
            "parents": [str(p) for p in self.parents],
            "author": self.author,
            "time": self.time,
            "message": self.message,
            "kind": self.kind,
            "meta": self.meta,
            "metrics": self.metrics,
            "params": self.params,
            "inputs": self.inputs,
            "provenance": self.provenance,
            "stats": self.stats,
        }

    def to_bytes(self) -> bytes:
        """Canonical bytes.

        Raises:
            MalformedObject: metadata holds NaN/infinity or is too large.
        """
        raw = canonical_json(self.to_dict())
        if len(raw) > MAX_COMMIT_BYTES:
            raise MalformedObject(f"commit is {len(raw)} bytes; the limit is {MAX_COMMIT_BYTES}")
        return raw

    @property
    def id(self) -> ObjectId:
        """This commit's id."""
        return hash_typed("commit", self.to_bytes())

    @classmethod
    def parse(cls, raw: bytes) -> Commit:
        """Parse and validate a commit.

        Raises:
            MalformedObject: a field is missing or of the wrong type.
        """
        if len(raw) > MAX_COMMIT_BYTES:
            raise MalformedObject("commit object too large")
        d = _load(raw, "commit")
        parents = d.get("parents")
        if not isinstance(parents, list):
            raise MalformedObject("commit: parents missing")
        for key in ("author", "time", "message", "kind"):
            if not isinstance(d.get(key), str):
                raise MalformedObject(f"commit: {key} missing or not a string")
        for key in ("meta", "metrics", "params", "inputs", "provenance", "stats"):
            if not isinstance(d.get(key), dict):
                raise MalformedObject(f"commit: {key} missing or not an object")
        if d["kind"] not in COMMIT_KINDS:
            raise MalformedObject(f"commit: unknown kind {d['kind']!r}")
        return cls(
            tree=_id(d.get("tree"), "commit tree"),
            parents=tuple(_id(p, "commit parent") for p in parents),
            author=d["author"],
            time=d["time"],
            message=d["message"],
            kind=d["kind"],
            meta=d["meta"],
            metrics=d["metrics"],
            params=d["params"],
            inputs=d["inputs"],
            provenance=d["provenance"],
            stats=d["stats"],
        )


# -- typed loading from any store with ``get(kind, id) -> verified bytes`` -------------------
# (duck-typed so that this module stays free of storage imports)


def load_commit(store: Any, oid: ObjectId) -> Commit:
    """Read and parse a commit.

    Raises:
        ObjectNotFound, IntegrityError, MalformedObject.
    """
    return Commit.parse(store.get("m", oid))


def load_tree(store: Any, oid: ObjectId) -> Tree:
    """Read and parse a tree.

    Raises:
        ObjectNotFound, IntegrityError, MalformedObject, InvalidName.
    """
    return Tree.parse(store.get("t", oid))


def load_file(store: Any, oid: ObjectId) -> FileObject:
    """Read and parse a file manifest.

    Raises:
        ObjectNotFound, IntegrityError, MalformedObject.
    """
    return FileObject.parse(store.get("f", oid))


# -- child ids straight from the raw bytes (gc marks a million chunks) -----------------------
# Marking needs only the ids an object names, not its dataclass. These functions return them
# as raw 32-byte digests and accept and reject *exactly* what the full parsers accept and reject
# (tests/test_gc_parsers.py compares them on hostile input): bytes in the one canonical shape
# every mstore writer produces are checked by a single regular expression, and anything else
# (escapes, unusual names, huge numbers, extra keys, damage) goes to the full parser, which
# decides. Nothing here skips a check; the fast path only avoids building objects.

_HEX64 = rb"[0-9a-f]{64}"
# Chunk lengths of up to 15 digits and sizes of up to 18: far above any real file, and small
# enough that Python's limit on int digits can never be what rejects them (that is left to the
# full parser).
_CHUNK_ITEM = rb'\["' + _HEX64 + rb'",[1-9][0-9]{0,14}\]'
_MANIFEST_SHAPE = re.compile(
    rb'\{"chunker":"[A-Za-z0-9_.\-]*","chunks":\[((?:' + _CHUNK_ITEM + rb"(?:," + _CHUNK_ITEM + rb")*)?)\],"
    rb'"size":(0|[1-9][0-9]{0,17}),"v":1\}'
)
_CHUNK_SEP = re.compile(rb'",[0-9]+\],\["')
_CHUNK_LEN = re.compile(rb",([0-9]+)\]")

_TREE_ITEM = (
    rb'\{"id":"' + _HEX64 + rb'","kind":"(?:file|tree)","mode":(?:420|493),"name":"[A-Za-z0-9_.+\-]{1,255}",'
    rb'"size":(?:0|[1-9][0-9]{0,17})\}'
)
_TREE_SHAPE = re.compile(rb'\{"entries":\[(?:' + _TREE_ITEM + rb"(?:," + _TREE_ITEM + rb')*)?\],"v":1\}')
_TREE_FIELDS = re.compile(rb'\{"id":"(' + _HEX64 + rb')","kind":"(file|tree)","mode":[0-9]+,"name":"([^"]*)"')


def manifest_chunk_digests(raw: bytes) -> bytes:
    """The chunk ids of a file manifest, in order, as concatenated 32-byte digests.

    Validates exactly what :meth:`FileObject.parse` validates.

    Raises:
        MalformedObject: whatever :meth:`FileObject.parse` would raise.
    """
    m = _MANIFEST_SHAPE.fullmatch(raw)
    if m is not None:
        items = m.group(1)
        if not items:
            if m.group(2) == b"0":
                return b""
        elif sum(map(int, _CHUNK_LEN.findall(items))) == int(m.group(2)):
            # ["id1",n1],["id2",n2] -> ["id1id2",n2]: the ids, adjacent, in one C-level pass.
            joined = _CHUNK_SEP.sub(b"", items)
            return binascii.unhexlify(joined[2 : joined.index(b'"', 2)])
    # Not in the common shape, or lengths that do not add up: the full parser decides (and
    # raises the error a reader would see).
    return b"".join(cid.digest for cid, _n in FileObject.parse(raw).chunks)


def tree_child_digests(raw: bytes) -> tuple[list[bytes], list[bytes]]:
    """The ids a tree names, as 32-byte digests: ``(subtrees, files)``, each in entry order.

    Validates exactly what :meth:`Tree.parse` validates.

    Raises:
        MalformedObject, InvalidName: whatever :meth:`Tree.parse` would raise.
    """
    if _TREE_SHAPE.fullmatch(raw) is not None:
        fields = _TREE_FIELDS.findall(raw)
        names = [f[2] for f in fields]
        # ASCII names: byte order is code point order, which is what Tree checks.
        if all(a < b for a, b in zip(names, names[1:], strict=False)) and b"." not in names and b".." not in names:
            trees = [binascii.unhexlify(f[0]) for f in fields if f[1] == b"tree"]
            files = [binascii.unhexlify(f[0]) for f in fields if f[1] == b"file"]
            return trees, files
    tree = Tree.parse(raw)
    return (
        [e.id.digest for e in tree.entries if e.kind == TREE_KIND],
        [e.id.digest for e in tree.entries if e.kind == FILE_KIND],
    )


_MANIFEST_FRAME = re.compile(
    rb'\{"chunker":"[A-Za-z0-9_.\-]*","chunks":\[(.*)\],"size":(0|[1-9][0-9]{0,17}),"v":1\}', re.DOTALL
)


def manifests_chunk_digests(raws: list[bytes]) -> list[bytes | MstoreError]:
    """:func:`manifest_chunk_digests` of many manifests at once.

    Returns, for each manifest, its chunk digests or the error :meth:`FileObject.parse` raises
    for it (returned, not raised). Every manifest is validated exactly as the full parser
    validates it; the chunk lists of all of them are checked together with bulk operations
    (one pass of C-level byte operations and numpy over their concatenation), and any that is
    not in the canonical shape is left to :func:`manifest_chunk_digests`.
    """
    out: list[bytes | MstoreError | None] = [None] * len(raws)
    batch: list[tuple[int, bytes, int]] = []
    for i, raw in enumerate(raws):
        m = _MANIFEST_FRAME.fullmatch(raw)
        if m is None or not m.group(1):
            out[i] = _digests_or_error(raw)
        else:
            batch.append((i, m.group(1), int(m.group(2))))
    if batch:
        got = _chunk_lists([sec for _i, sec, _size in batch])
        for j, (i, _sec, size) in enumerate(batch):
            out[i] = got[j][0] if got is not None and got[j][1] == size else _digests_or_error(raws[i])
    return out  # type: ignore[return-value]


def _digests_or_error(raw: bytes) -> bytes | MstoreError:
    try:
        return manifest_chunk_digests(raw)
    except MstoreError as exc:
        return exc


def _chunk_lists(sections: list[bytes]) -> list[tuple[bytes, int]] | None:
    """Digests and length totals of non-empty chunk lists ``["<id>",<n>],...``.

    None unless every list is exactly ``_CHUNK_ITEM`` items joined by commas.
    """
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    big = b",".join(sections)
    # Without the lowercase hex digits, exactly the structure characters of n items `["",]`
    # joined by commas: no other byte anywhere, and these in this order.
    n = big.count(b"[")
    if n == 0 or big.translate(None, b"0123456789abcdef") != b'["",]' + b',["",]' * (n - 1):
        return None
    a = np.frombuffer(big, dtype=np.uint8)
    # Every structure character, in order: `[`, `"`, `"`, `,`, `]` per item and `,` between.
    structure = np.flatnonzero((a < ord("0")) | ((a > ord("9")) & (a < ord("a"))))
    if len(structure) != 6 * n - 1:
        return None
    starts, opening, closing, inner, ends = (structure[k::6] for k in range(5))
    digits_len = ends - inner - 1
    # Positions: `["` then 64 id characters, `",`, 1-15 digits without a leading zero, `]`, and
    # items separated by exactly one comma from the first byte to the last.
    if not (
        starts[0] == 0
        and ends[-1] == len(a) - 1
        and np.array_equal(opening, starts + 1)
        and np.array_equal(closing, opening + 65)
        and np.array_equal(inner, closing + 1)
        and np.array_equal(starts[1:], ends[:-1] + 2)
        and bool((digits_len >= 1).all())
        and bool((digits_len <= 15).all())
        and bool((a[inner + 1] != ord("0")).all())
    ):
        return None
    # The length digits, right-aligned in windows of 15 ending before each `]`.
    digits = sliding_window_view(a, 15)[ends - 15] - np.uint8(ord("0"))  # wraps below "0"
    used = np.arange(15) >= (15 - digits_len)[:, None]
    if bool(((digits > 9) & used).any()):
        return None  # a hex letter among the digits
    values = (np.where(used, digits, 0).astype(np.int64) * (10 ** np.arange(14, -1, -1, dtype=np.int64))).sum(axis=1)
    # Each section must begin exactly at an item (so no item straddles two manifests).
    offsets = np.cumsum([0] + [len(s) + 1 for s in sections[:-1]])
    first = np.searchsorted(starts, offsets)
    if not (bool((first < n).all()) and np.array_equal(starts[np.minimum(first, n - 1)], offsets)):
        return None
    # Exact totals whatever the count: sum the high and low halves separately.
    high = np.add.reduceat(values >> 25, first)
    low = np.add.reduceat(values & ((1 << 25) - 1), first)
    digests = binascii.unhexlify(sliding_window_view(a, 64)[opening + 1].tobytes())
    bounds = [*first.tolist(), n]
    return [
        (digests[bounds[j] * 32 : bounds[j + 1] * 32], (int(high[j]) << 25) + int(low[j]))
        for j in range(len(sections))
    ]
