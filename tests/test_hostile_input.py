"""Bad input gets a named error and changes nothing (DESIGN promise 4).

Each case asserts the exception class, that its message names the problem, and (where there is
a store) that no file under the store changed.
"""

from __future__ import annotations

import io
import json
import struct
import tomllib
import tracemalloc
from pathlib import Path

import blake3
import numpy as np
import pytest
import tomli_w
import zstandard

from mstore import (
    IntegrityError,
    InvalidName,
    InvalidRevision,
    MstoreError,
    ObjectId,
    Repo,
    UnsupportedFormat,
    codecs,
)
from mstore.chunking.safetensors import MalformedSafetensors, parse_header, read_header
from mstore.format import MAX_VERSION
from mstore.hashing import hash_bytes, hash_typed
from mstore.objects import Commit, FileObject, Tree, canonical_json, load_file
from mstore.storage.packs import RECORD
from tests.conftest import Cli, snapshot_dir, tree_bytes

# -- shared setup -----------------------------------------------------------------------------


@pytest.fixture
def seeded(repo: Repo, work: Path) -> Repo:
    """The ``repo`` fixture with one commit on ``exp1``."""
    (work / "data").mkdir()
    (work / "data" / "a.txt").write_text("hello\n")
    repo.commit(work / "data", "exp1", "first")
    return repo


def set_config(root: Path, **sections: dict) -> None:
    """Merge ``sections`` into an existing repository's config.toml."""
    path = root / "config.toml"
    cfg = tomllib.loads(path.read_text())
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(tomli_w.dumps(cfg))


# -- ref names -----------------------------------------------------------------------------------

BAD_REF_NAMES = [
    pytest.param("a..b", "'..'", id="dot-dot"),
    pytest.param("exp@{1}", "'@{'", id="at-brace"),
    pytest.param("ex\x01p", "control character", id="control-char"),
    pytest.param("ex\x7fp", "control character", id="del-char"),
    pytest.param("ex\np", "control character", id="newline"),
    pytest.param("-exp", "starts with '-'", id="leading-dash"),
    pytest.param("exp.lock", "'.lock'", id="trailing-lock"),
    pytest.param("runs/exp.lock", "'.lock'", id="component-lock"),
    pytest.param("runs//exp", "empty path component", id="double-slash"),
    pytest.param("/exp", "empty path component", id="leading-slash"),
    pytest.param("exp/", "empty path component", id="trailing-slash"),
    pytest.param("my exp", "space", id="space"),
    pytest.param("", "empty", id="empty"),
]


@pytest.mark.parametrize("op", ["commit", "branch", "tag"])
@pytest.mark.parametrize(("name", "problem"), BAD_REF_NAMES)
def test_a_bad_ref_name_is_refused_by_name_and_changes_nothing(seeded, work, op, name, problem):
    repo = seeded
    before = snapshot_dir(repo.root)

    with pytest.raises(InvalidName) as info:
        if op == "commit":
            repo.commit(work / "data", name, "m")
        elif op == "branch":
            repo.create_branch(name, "exp1")
        else:
            repo.create_tag(name, "exp1")

    assert problem in str(info.value)
    assert snapshot_dir(repo.root) == before
    assert [b.name for b in repo.branches()] == ["exp1"] and repo.tags() == []


# -- tree entry names ------------------------------------------------------------------------

HOSTILE_ENTRY_NAMES = [
    pytest.param("a/b", id="slash"),
    pytest.param("../escape.txt", id="parent-path"),
    pytest.param("..", id="dot-dot"),
    pytest.param(".", id="dot"),
    pytest.param("a\0b", id="nul"),
    pytest.param("", id="empty"),
    pytest.param("/abs/escape.txt", id="absolute"),
]


def _tree_bytes_with(name: str, fid: str, size: int, kind: str = "file") -> bytes:
    mode = 0o644 if kind == "file" else 0o755
    return canonical_json({"v": 1, "entries": [{"name": name, "kind": kind, "mode": mode, "id": fid, "size": size}]})


@pytest.mark.parametrize("name", HOSTILE_ENTRY_NAMES)
def test_tree_parse_refuses_a_hostile_entry_name_naming_it(name):
    raw = _tree_bytes_with(name, "ab" * 32, 1)

    with pytest.raises(InvalidName) as info:
        Tree.parse(raw)

    assert repr(name) in str(info.value)


def test_an_id_with_a_trailing_newline_is_refused_so_no_object_has_two_encodings():
    fid = "ab" * 32
    with pytest.raises(MstoreError):
        Tree.parse(_tree_bytes_with("weights.bin", fid + "\n", 1))
    with pytest.raises(MstoreError):
        FileObject.parse(canonical_json({"v": 1, "size": 1, "chunker": "fastcdc", "chunks": [[fid + "\n", 1]]}))
    with pytest.raises(InvalidRevision):
        ObjectId(fid + "\n")
    assert Tree.parse(_tree_bytes_with("weights.bin", fid, 1)).entries[0].id == fid


def store_hostile_commit(repo: Repo, name: str, nested: bool) -> ObjectId:
    """Store, bypassing every builder, a commit whose tree has an entry called ``name``."""
    content = b"written outside the checkout\n"
    fid = hash_bytes(content)
    fobj = FileObject(len(content), "fastcdc", ((fid, len(content)),))
    leaf = _tree_bytes_with(name, fid, len(content))
    trees = [leaf]
    if nested:
        trees.append(_tree_bytes_with("sub", hash_typed("tree", leaf), len(content), kind="tree"))
    commit = Commit(
        tree=hash_typed("tree", trees[-1]), parents=(), author="mallory", time="2026-01-01T00:00:00.000000Z",
        message="hostile",
    )
    with repo.store.batch() as batch:
        batch.add("c", fid, content)
        batch.add("f", fid, fobj.to_bytes())
        for raw in trees:
            batch.add("t", hash_typed("tree", raw), raw)
        batch.add("m", commit.id, commit.to_bytes())
        batch.commit()
    return commit.id


@pytest.mark.parametrize("nested", [False, True], ids=["top", "nested"])
@pytest.mark.parametrize("name", HOSTILE_ENTRY_NAMES)
def test_checkout_refuses_a_stored_tree_with_a_hostile_name_and_writes_nothing_outside_dest(
    repo, tmp_path, name, nested
):
    area = tmp_path / "area"
    area.mkdir()
    if name.startswith("/"):
        name = str(area / name.lstrip("/"))  # an absolute path that would land in the area
    cid = store_hostile_commit(repo, name, nested)
    dest = area / "deep" / "dest"
    store_before = snapshot_dir(repo.root)

    with pytest.raises(InvalidName) as info:
        repo.checkout(cid, dest)

    assert repr(name) in str(info.value)
    outside = {p for p in snapshot_dir(area) if not (area / p).is_relative_to(dest)}
    assert outside <= {"deep", "deep/dest"}
    assert [p for p in dest.rglob("*") if not p.is_dir()] == []
    assert snapshot_dir(repo.root) == store_before


# -- safetensors headers ----------------------------------------------------------------------


def _st(header: bytes | dict, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _valid_file() -> bytes:
    from safetensors.numpy import save

    return save({"a": np.arange(16, dtype=np.float32), "b": np.ones((2, 3), np.float32)})


MALFORMED_SAFETENSORS = [
    pytest.param(lambda: _valid_file()[:-10], "outside the data", id="truncated-data"),
    pytest.param(lambda: _st(b"{}", length=10_000), "runs past the end", id="header-length-past-end"),
    pytest.param(lambda: _st(b'{"a": {"dtype": "F32", "shape": [2], ', b"\0" * 8), "not valid JSON", id="bad-json"),
    pytest.param(
        lambda: _st(
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
        ),
        "overlap",
        id="overlapping-offsets",
    ),
    pytest.param(
        lambda: _st({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, b"\0" * 8),
        "needs 16",
        id="offsets-disagree-with-shape",
    ),
    pytest.param(lambda: _st(b"[" * 100_000, b"\0" * 8), "JSON", id="deeply-nested-json"),
    pytest.param(
        lambda: _st(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', b"\0" * 4),
        "JSON",
        id="integer-too-long-for-json",
    ),
]


@pytest.mark.parametrize(("make", "problem"), MALFORMED_SAFETENSORS)
def test_parse_header_names_what_is_wrong_with_a_malformed_safetensors_file(make, problem):
    data = make()

    with pytest.raises(MalformedSafetensors, match=problem):
        parse_header(data, len(data))


@pytest.mark.parametrize(("make", "problem"), MALFORMED_SAFETENSORS)
def test_read_header_names_what_is_wrong_with_a_malformed_safetensors_file(make, problem):
    data = make()

    with pytest.raises(MalformedSafetensors, match=problem):
        read_header(io.BytesIO(data), len(data))


@pytest.mark.parametrize(("make", "problem"), MALFORMED_SAFETENSORS)
def test_a_malformed_safetensors_file_still_commits_as_plain_bytes_with_a_warning(
    repo, work, tmp_path, make, problem
):
    data = make()
    src = work / "ckpt"
    src.mkdir()
    (src / "model.safetensors").write_bytes(data)

    res = repo.commit(src, "exp", "bad header")

    (warning,) = res.commit.stats["invalid_safetensors"]
    assert warning.startswith("model.safetensors: ") and problem in warning
    (entry,) = repo.ls("exp")
    assert entry.id == blake3.blake3(data).hexdigest()
    assert load_file(repo.store, entry.id).chunker == "fastcdc"
    repo.checkout("exp", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == {"model.safetensors": data}


# -- compression bombs --------------------------------------------------------------------------

RLE_BLOCK = 128 * 1024


def zstd_frame(declared: int | None, rle_blocks: int, total_len: int | None = None) -> bytes:
    """A hand-made zstd frame: ``rle_blocks`` RLE blocks of 128 KiB (4 bytes each), then one raw
    block of zeros padding the frame to ``total_len`` bytes; content size ``declared`` (None: unknown).
    """
    magic = struct.pack("<I", 0xFD2FB528)
    window = bytes([0x38])  # window descriptor: 128 KiB
    if declared is None:
        head = magic + bytes([0x00]) + window
    else:
        head = magic + bytes([0xC0]) + window + struct.pack("<Q", declared)  # 8-byte content size
    blocks = (((1 << 1) | (RLE_BLOCK << 3)).to_bytes(3, "little") + b"\0") * rle_blocks
    pad = 1 if total_len is None else total_len - len(head) - len(blocks) - 3
    assert pad >= 0, "frame does not fit"
    return head + blocks + (1 | (pad << 3)).to_bytes(3, "little") + b"\0" * pad


def test_the_hand_made_zstd_frame_is_what_it_claims():
    frame = zstd_frame(2 * RLE_BLOCK + 5, 2, total_len=30)
    assert len(frame) == 30
    assert zstandard.get_frame_parameters(frame).content_size == 2 * RLE_BLOCK + 5
    assert zstandard.ZstdDecompressor().decompress(frame) == b"\0" * (2 * RLE_BLOCK + 5)


def _peak_bytes_while(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


RECORDED = 4096
BOMBS = [
    # 1 GiB declared (and really produced) against a 4 KiB record
    pytest.param(lambda: zstd_frame(1 << 30, 8192), "declares", id="claims-beyond-record"),
    # declares the recorded size, but its blocks expand to 1 GiB
    pytest.param(lambda: zstd_frame(RECORDED, 8192), "decompress", id="expands-beyond-record"),
    pytest.param(lambda: zstd_frame(None, 8192), "declares", id="size-not-declared"),
]


@pytest.mark.parametrize(("make", "problem"), BOMBS)
def test_codecs_decode_refuses_a_zstd_bomb_without_allocating_its_size(make, problem):
    frame = make()

    def decode():
        with pytest.raises(IntegrityError, match=problem):
            codecs.decode(codecs.ZSTD, frame, RECORDED)

    assert _peak_bytes_while(decode) < 16 << 20


@pytest.fixture
def compressible_chunk(repo: Repo, work: Path) -> tuple[ObjectId, bytes]:
    """A committed one-chunk file stored zstd-compressed; returns (chunk id, content)."""
    content = "".join(f"row {i}: {i * i % 9973} {'abc' * (i % 11)}\n" for i in range(500)).encode()
    assert len(content) < 16 * 1024  # below FastCDC's minimum chunk: one chunk
    (work / "d").mkdir()
    (work / "d" / "rows.txt").write_bytes(content)
    repo.commit(work / "d", "exp", "rows")
    cid = hash_bytes(content)
    entry = repo.store.entry("c", cid)
    assert entry is not None and entry.codec == codecs.ZSTD and entry.raw_len == len(content)
    return cid, content


def _doctor_payload(repo: Repo, cid: ObjectId, make_frame) -> None:
    entry = repo.store.entry("c", cid)
    frame = make_frame(entry)
    assert len(frame) == entry.enc_len
    with open(repo.root / "packs" / repo.store.pack_name(entry.pack), "r+b") as f:
        f.seek(entry.offset + RECORD.size)
        f.write(frame)


STORE_BOMBS = [
    pytest.param(lambda e: zstd_frame(1 << 30, 0, total_len=e.enc_len), "declares", id="claims-beyond-record"),
    pytest.param(
        lambda e: zstd_frame(e.raw_len, (e.enc_len - 40) // 4, total_len=e.enc_len),
        "decompress",
        id="expands-beyond-record",
    ),
]


@pytest.mark.parametrize(("make_frame", "problem"), STORE_BOMBS)
def test_a_doctored_pack_record_holding_a_zstd_bomb_is_refused_by_the_store(
    repo, compressible_chunk, make_frame, problem
):
    cid, _content = compressible_chunk
    _doctor_payload(repo, cid, make_frame)
    before = snapshot_dir(repo.root)

    def read():
        with pytest.raises(IntegrityError, match=problem) as info:
            repo.store.get("c", cid)
        assert cid in str(info.value)
        with pytest.raises(IntegrityError):
            with repo.open_file("exp:rows.txt") as f:
                f.read()

    assert _peak_bytes_while(read) < 16 << 20
    assert snapshot_dir(repo.root) == before


# -- repository format ---------------------------------------------------------------------------


@pytest.fixture
def closed_store(tmp_path: Path) -> Path:
    root = tmp_path / ".mstore"
    Repo.init(root).close()
    return root


def test_a_store_of_a_newer_format_version_is_refused_naming_the_version(closed_store):
    set_config(closed_store, format={"version": MAX_VERSION + 1})
    before = snapshot_dir(closed_store)

    with pytest.raises(UnsupportedFormat) as info:
        Repo.open(closed_store)

    assert f"version {MAX_VERSION + 1}" in str(info.value) and "newer" in str(info.value)
    assert snapshot_dir(closed_store) == before


def test_the_cli_exits_non_zero_on_a_newer_format_version_naming_it(closed_store, tmp_path):
    set_config(closed_store, format={"version": MAX_VERSION + 1})
    before = snapshot_dir(closed_store)
    cli = Cli(closed_store, tmp_path)

    for args in (("log", "exp"), ("fsck",)):
        proc = cli(*args, check=False)
        assert proc.returncode != 0
        assert f"version {MAX_VERSION + 1}" in proc.stderr.decode()
    assert snapshot_dir(closed_store) == before


def test_a_config_with_an_unknown_section_is_refused_naming_the_section(closed_store):
    set_config(closed_store, telemetry={"enabled": True})
    before = snapshot_dir(closed_store)

    with pytest.raises(UnsupportedFormat, match="telemetry"):
        Repo.open(closed_store)

    assert snapshot_dir(closed_store) == before


# -- revision syntax -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rev", "problem"),
    [
        ("exp1@{", "'@{'"),
        ("exp1~x", "'x'"),
        ("@{-1}", "no ref or id"),
        ("exp1^x", "'x'"),
        ("exp1@{}", "empty @{}"),
        ("exp1@{-1}", "@{-1}"),
    ],
)
def test_bad_revision_syntax_raises_invalid_revision_naming_it(seeded, tmp_path, rev, problem):
    before = snapshot_dir(seeded.root)

    with pytest.raises(InvalidRevision) as info:
        seeded.resolve(rev)
    with pytest.raises(InvalidRevision):
        seeded.checkout(rev, tmp_path / "out")

    assert problem in str(info.value)
    assert not (tmp_path / "out").exists()
    assert snapshot_dir(seeded.root) == before

