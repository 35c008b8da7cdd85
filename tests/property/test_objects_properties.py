"""Objects survive their canonical JSON unchanged, and no bytes make a parser crash."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mstore import MstoreError
from mstore.hashing import ObjectId
from mstore.objects import COMMIT_KINDS, Commit, FileObject, Tree, TreeEntry

SETTINGS = settings(max_examples=100, deadline=None)

ids = st.binary(min_size=32, max_size=32).map(lambda b: ObjectId(b.hex()))
entry_names = st.text(
    st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=30
).filter(lambda n: n not in (".", "..") and len(n.encode()) <= 255)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=8,
)
json_objects = st.dictionaries(st.text(max_size=12), json_values, max_size=4)
flat_objects = st.dictionaries(st.text(max_size=12), json_scalars, max_size=4)


@st.composite
def trees(draw) -> Tree:
    entries = []
    for name in sorted(draw(st.lists(entry_names, unique=True, max_size=8))):
        kind = draw(st.sampled_from(["file", "tree"]))
        mode = 0o755 if kind == "tree" else draw(st.sampled_from([0o644, 0o755]))
        entries.append(TreeEntry(name, kind, mode, draw(ids), draw(st.integers(0, 2**62))))
    return Tree(tuple(entries))


commits = st.builds(
    Commit,
    tree=ids,
    parents=st.lists(ids, max_size=3).map(tuple),
    author=st.text(max_size=20),
    time=st.text(max_size=30),
    message=st.text(max_size=200),
    kind=st.sampled_from(COMMIT_KINDS),
    meta=json_objects,
    metrics=json_objects,
    params=flat_objects,
    inputs=flat_objects,
    provenance=json_objects,
    stats=flat_objects,
)


@st.composite
def file_objects(draw) -> FileObject:
    chunks = tuple(draw(st.lists(st.tuples(ids, st.integers(1, 2**40)), max_size=10)))
    chunker = draw(st.sampled_from(["fastcdc", "safetensors"]) | st.text(max_size=12))
    return FileObject(sum(n for _cid, n in chunks), chunker, chunks)


@SETTINGS
@given(trees())
def test_a_tree_round_trips_through_its_canonical_bytes_with_a_stable_id(tree):
    raw = tree.to_bytes()
    parsed = Tree.parse(raw)
    assert parsed == tree
    assert parsed.to_bytes() == raw
    assert parsed.id == tree.id


@SETTINGS
@given(commits)
def test_a_commit_round_trips_through_its_canonical_bytes_with_a_stable_id(commit):
    raw = commit.to_bytes()
    parsed = Commit.parse(raw)
    assert parsed == commit
    assert parsed.to_bytes() == raw
    assert parsed.id == commit.id


@SETTINGS
@given(file_objects())
def test_a_file_manifest_round_trips_through_its_canonical_bytes(fobj):
    raw = fobj.to_bytes()
    parsed = FileObject.parse(raw)
    assert parsed == fobj
    assert parsed.to_bytes() == raw


@SETTINGS
@given(commits, st.randoms(use_true_random=False))
def test_a_commit_id_does_not_depend_on_the_order_metadata_was_built_in(commit, rnd):
    def shuffled(d):
        if isinstance(d, dict):
            items = list(d.items())
            rnd.shuffle(items)
            return {k: shuffled(v) for k, v in items}
        if isinstance(d, list):
            return [shuffled(v) for v in d]
        return d

    other = Commit(**{**commit.__dict__, "meta": shuffled(commit.meta), "provenance": shuffled(commit.provenance)})
    assert other.to_bytes() == commit.to_bytes()
    assert other.id == commit.id


# -- hostile bytes -------------------------------------------------------------------------------

PARSERS = [Tree.parse, Commit.parse, FileObject.parse]
FIELDS = [
    "v", "entries", "name", "kind", "mode", "id", "size", "chunker", "chunks", "tree", "parents", "author",
    "time", "message", "meta", "metrics", "params", "inputs", "provenance", "stats",
]  # fmt: skip
hostile_values = st.recursive(
    json_scalars | ids | st.sampled_from(["file", "tree", "..", "/", "", 420, 493, -1, 1]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=6),
    max_leaves=10,
)


def parses_or_refuses_cleanly(parse, raw: bytes) -> None:
    try:
        parse(raw)
    except MstoreError:
        return
    except Exception as exc:  # anything else is a crash on hostile input
        pytest.fail(f"{parse.__qualname__} raised {type(exc).__name__}: {str(exc)[:200]}")


@SETTINGS
@given(st.binary(max_size=400))
@example(b"[" * 100_000)  # nesting deeper than the JSON decoder recurses
@example(b'{"v": 1, "size": ' + b"9" * 5000 + b"}")  # an integer past Python's digit limit
@example(  # an entry name that is a lone UTF-16 surrogate (valid JSON, not valid Unicode text)
    b'{"v": 1, "entries": [{"name": "\\ud800", "kind": "file", "mode": 420, "id": "' + b"0" * 64 + b'", "size": 0}]}'
)
@example(b"\xff\xfe")
@pytest.mark.parametrize("parse", PARSERS, ids=lambda p: p.__qualname__)
def test_arbitrary_bytes_only_ever_raise_mstore_errors(parse, raw):
    parses_or_refuses_cleanly(parse, raw)


@SETTINGS
@given(st.dictionaries(st.sampled_from(FIELDS), hostile_values, max_size=12))
def test_arbitrary_json_documents_only_ever_raise_mstore_errors(doc):
    raw = json.dumps({**doc, "v": 1}).encode()
    for parse in PARSERS:
        parses_or_refuses_cleanly(parse, raw)


@st.composite
def mutated_objects(draw) -> bytes:
    """A valid object with one field (top level, or inside one entry or chunk) replaced."""
    obj = draw(st.one_of(trees(), commits, file_objects()))
    doc = json.loads(obj.to_bytes())
    target = doc
    for key in ("entries", "chunks", "parents"):
        if doc.get(key) and draw(st.booleans()):
            target = draw(st.sampled_from(doc[key]))
            break
    value = draw(hostile_values)
    if isinstance(target, dict):
        target[draw(st.sampled_from(sorted(target) + FIELDS))] = value
    elif isinstance(target, list) and target:
        target[draw(st.integers(0, len(target) - 1))] = value
    else:
        doc[draw(st.sampled_from(sorted(doc)))] = value
    return json.dumps(doc).encode()


@SETTINGS
@given(mutated_objects())
def test_valid_objects_with_one_field_corrupted_only_ever_raise_mstore_errors(raw):
    for parse in PARSERS:
        parses_or_refuses_cleanly(parse, raw)


@settings(max_examples=30, deadline=None)
@given(data=st.binary(min_size=0, max_size=1 << 16), window=st.sampled_from([1, 7, 4096, 1 << 20]))
def test_a_file_hashed_window_by_window_has_the_id_of_its_bytes(tmp_path_factory, data, window):
    from mstore import hashing

    path = tmp_path_factory.mktemp("h") / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    saved, hashing._HASH_WINDOW = hashing._HASH_WINDOW, window
    try:
        assert hashing.hash_file_fd(fd, len(data)) == hashing.hash_bytes(data)
    finally:
        hashing._HASH_WINDOW = saved
        os.close(fd)


@pytest.mark.parametrize("size", [1000, 10 << 20])  # one read, and windows read beside the hashing
def test_hashing_a_file_that_is_shorter_than_said_is_refused(tmp_path, size):
    from mstore import hashing
    from mstore.errors import FileChanged

    path = tmp_path / "f"
    path.write_bytes(b"x" * size)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(FileChanged, match="changed size"):
            hashing.hash_file_fd(fd, size + size // 5)
    finally:
        os.close(fd)
