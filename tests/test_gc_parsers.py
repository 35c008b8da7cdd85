"""gc reads child ids straight from raw bytes: those readers accept and reject exactly what the
full parsers (FileObject.parse, Tree.parse) accept and reject, and return the same ids.

Property tests compare them on hostile input: valid objects, then the same bytes with a byte
replaced by a JSON-significant one, a slice deleted or repeated, or text inserted; and JSON
documents of the right keys with values of any type.
"""

from __future__ import annotations

import json

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mstore.errors import MstoreError
from mstore.hashing import ObjectId
from mstore.objects import (
    FILE_KIND,
    TREE_KIND,
    FileObject,
    Tree,
    TreeEntry,
    canonical_json,
    manifest_chunk_digests,
    manifests_chunk_digests,
    tree_child_digests,
)

SETTINGS = settings(max_examples=400, deadline=None)

ids = st.binary(min_size=32, max_size=32).map(lambda b: ObjectId(b.hex()))
# Names and chunkers both inside and outside the fast path's plain-ASCII alphabet.
texts = st.text(min_size=0, max_size=12) | st.text("abcXYZ019_.+-", min_size=0, max_size=12)
names = (st.text(min_size=1, max_size=12) | st.text("abc.-_+9", min_size=1, max_size=6)).filter(
    lambda n: "/" not in n and "\0" not in n and n not in (".", "..")
)
SIGNIFICANT = b'"\\,[]{}:0123456789abcdefABCDEF \n.-/\x00\xff'


@st.composite
def manifests(draw) -> bytes:
    chunks = draw(st.lists(st.tuples(ids, st.integers(1, 2**40)), max_size=5))
    size = sum(n for _c, n in chunks)
    return FileObject(size, draw(texts), tuple(chunks)).to_bytes()


@st.composite
def trees(draw) -> bytes:
    entries = []
    for name in sorted(draw(st.lists(names, unique=True, max_size=5))):
        kind = draw(st.sampled_from([FILE_KIND, TREE_KIND]))
        entries.append(
            TreeEntry(name, kind, draw(st.sampled_from([0o644, 0o755])), draw(ids), draw(st.integers(0, 2**62)))
        )
    return Tree(tuple(entries)).to_bytes()


@st.composite
def mutated(draw, base) -> bytes:
    raw = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["replace", "delete", "repeat", "insert"]))
        i = draw(st.integers(0, max(0, len(raw) - 1)))
        j = draw(st.integers(i, min(len(raw), i + 80)))
        if op == "replace" and raw:
            raw[i] = draw(st.sampled_from(SIGNIFICANT))
        elif op == "delete":
            del raw[i:j]
        elif op == "repeat":
            raw[i:i] = raw[i:j]
        else:
            raw[i:i] = draw(
                st.sampled_from([b"\\n", b'"', b",", b"0", b"-", b"1e3", b"\\u0061", b" ", b'"x":1,', b"]"])
            )
    return bytes(raw)


json_any = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _outcome(fn, raw: bytes):
    try:
        return ("ok", fn(raw))
    except MstoreError as exc:
        return (type(exc).__name__, str(exc))


def full_manifest(raw: bytes) -> bytes:
    return b"".join(c.digest for c, _n in FileObject.parse(raw).chunks)


def full_tree(raw: bytes) -> tuple[list[bytes], list[bytes]]:
    t = Tree.parse(raw)
    return (
        [e.id.digest for e in t.entries if e.kind == TREE_KIND],
        [e.id.digest for e in t.entries if e.kind == FILE_KIND],
    )


HEX = "ab" * 32


@SETTINGS
@given(mutated(manifests()))
@example(b'{"chunker":"fastcdc","chunks":[],"size":0,"v":1}')
@example(b'{"chunker":"fastcdc","chunks":[],"size":1,"v":1}')
@example(('{"chunker":"x","chunks":[["' + HEX + '",5],["' + HEX + '",7]],"size":12,"v":1}').encode())
@example(('{"chunker":"x","chunks":[["' + HEX + '",5]],"size":6,"v":1}').encode())  # lengths do not add up
@example(('{"chunker":"x","chunks":[["' + HEX + '",0]],"size":0,"v":1}').encode())  # empty chunk
@example(('{"chunker":"x","chunks":[["' + HEX + '",05]],"size":5,"v":1}').encode())  # leading zero
@example(('{"chunker":"x","chunks":[["' + HEX.upper() + '",5]],"size":5,"v":1}').encode())
@example(('{"chunker":"x","chunks":[["' + HEX + '\\n",5]],"size":5,"v":1}').encode())  # id with escaped newline
@example(('{"chunker":"x","chunks":[["' + HEX + '",5]],"extra":1,"size":5,"v":1}').encode())  # extra key
@example(('{"chunker":"x","chunks":[["' + HEX + '",' + "9" * 5000 + ']],"size":5,"v":1}').encode())
@example(('{"chunker":"\\u00e9","chunks":[["' + HEX + '",5]],"size":5,"v":1}').encode())  # not canonical
def test_raw_manifest_reader_agrees_with_the_full_parser(raw: bytes):
    assert _outcome(manifest_chunk_digests, raw) == _outcome(full_manifest, raw)


@SETTINGS
@given(st.fixed_dictionaries({"chunker": json_any, "chunks": json_any, "size": json_any, "v": st.just(1) | json_any}))
def test_raw_manifest_reader_agrees_on_manifests_with_fields_of_any_type(doc: dict):
    try:
        raw = canonical_json(doc)
    except MstoreError:
        raw = json.dumps(doc).encode()
    assert _outcome(manifest_chunk_digests, raw) == _outcome(full_manifest, raw)


def _tree(*entries: tuple[str, str, int, str, int]) -> bytes:
    return canonical_json(
        {"v": 1, "entries": [{"name": n, "kind": k, "mode": m, "id": i, "size": s} for n, k, m, i, s in entries]}
    )


@SETTINGS
@given(mutated(trees()))
@example(_tree(("a", "file", 420, HEX, 1), ("b", "tree", 493, HEX, 0)))
@example(_tree(("b", "file", 420, HEX, 1), ("a", "file", 420, HEX, 0)))  # unsorted
@example(_tree(("a", "file", 420, HEX, 1), ("a", "file", 420, HEX, 0)))  # duplicate
@example(_tree((".", "file", 420, HEX, 1)))
@example(_tree(("..", "tree", 493, HEX, 1)))
@example(_tree(("a" * 256, "file", 420, HEX, 1)))  # too long
@example(_tree(("a", "file", 511, HEX, 1)))  # mode not allowed
@example(_tree(("a", "link", 420, HEX, 1)))  # unknown kind
@example(_tree(("a", "file", 420, HEX + "\n", 1)))
@example(_tree(("B", "file", 420, HEX, 1), ("a", "file", 420, HEX, 1), ("é", "file", 420, HEX, 1)))
def test_raw_tree_reader_agrees_with_the_full_parser(raw: bytes):
    assert _outcome(tree_child_digests, raw) == _outcome(full_tree, raw)


@SETTINGS
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "name": json_any | names,
                "kind": st.sampled_from(["file", "tree"]) | json_any,
                "mode": st.sampled_from([420, 493]) | json_any,
                "id": st.just(HEX) | json_any,
                "size": st.integers(0, 10) | json_any,
            }
        ),
        max_size=3,
    )
)
def test_raw_tree_reader_agrees_on_entries_with_fields_of_any_type(entries: list):
    try:
        raw = canonical_json({"v": 1, "entries": entries})
    except MstoreError:
        raw = json.dumps({"v": 1, "entries": entries}).encode()
    assert _outcome(tree_child_digests, raw) == _outcome(full_tree, raw)


def test_raw_readers_take_the_fast_path_on_what_mstore_writes():
    """The common shape is read without the full parser (so the fast path is really used)."""
    import mstore.objects as objects

    chunks = ((ObjectId("cd" * 32), 7), (ObjectId("ef" * 32), 9))
    manifest = FileObject(16, "fastcdc", chunks).to_bytes()
    tree = Tree.build([TreeEntry("model.safetensors", FILE_KIND, 0o644, ObjectId(HEX), 16)]).to_bytes()
    assert objects._MANIFEST_SHAPE.fullmatch(manifest) and objects._TREE_SHAPE.fullmatch(tree)
    assert manifest_chunk_digests(manifest) == bytes.fromhex("cd" * 32 + "ef" * 32)
    sections = [objects._MANIFEST_FRAME.fullmatch(manifest).group(1)] * 2
    assert objects._chunk_lists(sections) == [(bytes.fromhex("cd" * 32 + "ef" * 32), 16)] * 2
    assert tree_child_digests(tree) == ([], [bytes.fromhex(HEX)])


def _manifest(chunks: str, size: int) -> bytes:
    return ('{"chunker":"x","chunks":[' + chunks + '],"size":' + str(size) + ',"v":1}').encode()


def _each_full(raws: list[bytes]) -> list:
    out = []
    for raw in raws:
        try:
            out.append(full_manifest(raw))
        except MstoreError as exc:
            out.append((type(exc).__name__, str(exc)))
    return out


def _each_batched(raws: list[bytes]) -> list:
    return [(type(g).__name__, str(g)) if isinstance(g, MstoreError) else g for g in manifests_chunk_digests(raws)]


@SETTINGS
@given(st.lists(mutated(manifests()) | manifests(), max_size=6))
@example([("{" + '"chunker":"x","chunks":[["' + HEX + '",5],' + '],"size":5,"v":1}').encode()])  # trailing comma
@example(
    [
        ('{"chunker":"x","chunks":[["' + HEX + '",5]],"size":5,"v":1}').encode(),
        ('{"chunker":"x","chunks":[["' + HEX[:63] + '",5],["' + HEX + "a" + '",7]],"size":12,"v":1}').encode(),
    ]
)  # ids of 63 and 65 characters: the total length of the ids is right, each one is not
@example([('{"chunker":"x","chunks":[["' + HEX + '",5a]],"size":5,"v":1}').encode()])  # hex among the digits
@example([('{"chunker":"x","chunks":[["' + HEX + '",1' + "0" * 15 + ']],"size":1' + "0" * 15 + ',"v":1}').encode()])
@example(
    [
        (
            '{"chunker":"x","chunks":['
            + ",".join(['["' + HEX + '",999999999999999]'] * 20000)
            + '],"size":'
            + str(20000 * 999999999999999)
            + ',"v":1}'
        ).encode()
    ]
)  # totals beyond 64 bits stay exact
@example([('{"chunker":"x","chunks":[["' + HEX + '",5]' + "]" + ',"size":5,"v":1}').encode()])
@example([('{"chunker":"x","chunks":[["' + HEX + '",5],"size":5,"v":1}').encode()])
@example([_manifest('("' + HEX + '",5]', 5)])  # another byte where a structure character belongs
@example([_manifest('["' + HEX + '":5]', 5)])
@example([_manifest('ab["' + HEX + '",5]', 5)])  # hex before the first item
@example([_manifest('["' + HEX + '",5]ab', 5)])  # and after the last
@example([_manifest('["' + HEX + '"ab,5]', 5)])  # letters between the id and its comma
@example([_manifest('["' + HEX + '",05]', 5)])  # leading zero
@example([_manifest('["' + HEX + '",1' + "0" * 15 + "]", 0)])  # 16 digits: the last 15 read 0
@example([_manifest('["' + HEX + '",5]a,["' + HEX + '",7]', 12)])  # a letter between items
@example([_manifest('["' + HEX + '",1a]', 59)])  # a hex letter among the digits
@example([_manifest('["' + HEX + '",33554433]', 1)])  # only the low 25 bits would add up
@example([_manifest('["' + HEX + '",5 ]', 5)])
@example(
    [_manifest('["' + HEX + '",5],["' + HEX + '"', 12), _manifest('7],["' + HEX + '",9]', 9)]
)  # joined, the two chunk lists would read as three whole items
def test_batched_manifest_reader_agrees_with_the_full_parser_on_each(raws: list[bytes]):
    assert _each_batched(raws) == _each_full(raws)
