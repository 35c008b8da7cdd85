"""Round trips: whatever is committed comes back bit-exact, through checkout and open_file.

Every file's id is BLAKE3 of its content, so ``repo.ls`` shows exactly what ``b3sum`` prints.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import struct
from pathlib import Path

import blake3
import numpy as np
import pytest

from mstore import Repo
from mstore.objects import load_file
from tests.conftest import repo_with_chunking, tree_bytes, write_safetensors

HAVE_ML_DTYPES = importlib.util.find_spec("ml_dtypes") is not None


def b3sum(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def write_bf16_safetensors(path: Path, name: str, bits: np.ndarray) -> Path:
    """A BF16 tensor file: ml_dtypes + the safetensors library if installed, else by hand.

    By hand is exactly the format: u64 header length, header JSON, raw little-endian uint16 bits.
    """
    bits = np.ascontiguousarray(bits, dtype="<u2")
    if HAVE_ML_DTYPES:
        import ml_dtypes

        return write_safetensors(path, {name: bits.view(ml_dtypes.bfloat16)})
    header = json.dumps({name: {"dtype": "BF16", "shape": list(bits.shape), "data_offsets": [0, bits.nbytes]}})
    header += " " * (-len(header) % 8)  # the library pads to 8 bytes; so do we
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bits.tobytes())
    return path


def assert_round_trip(repo: Repo, src: Path, rev: str, dest: Path) -> None:
    """Checkout equals the source byte for byte, and every listed id is the content's BLAKE3."""
    repo.checkout(rev, dest)
    expected = tree_bytes(src)
    assert tree_bytes(dest) == expected
    files = {e.path: e for e in repo.ls(rev) if e.kind == "file"}
    assert sorted(files) == sorted(expected)
    for rel, content in expected.items():
        assert files[rel].id == b3sum(content), rel
        assert files[rel].size == len(content), rel
        with repo.open_file(rev, rel) as f:
            assert f.read() == content, rel


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def test_safetensors_of_every_common_dtype_round_trip_bit_exact(repo, work, tmp_path, rng):
    src = work / "ckpt"
    write_safetensors(
        src / "f32.safetensors",
        {"a": rng.standard_normal((33, 17)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)},
    )
    write_safetensors(src / "f16.safetensors", {"h": rng.standard_normal((31, 9)).astype(np.float16)})
    write_bf16_safetensors(src / "bf16.safetensors", "w", rng.integers(0, 1 << 16, (19, 23), dtype=np.uint16))
    write_safetensors(
        src / "i64.safetensors",
        {"ids": rng.integers(-(1 << 62), 1 << 62, (7, 11), dtype=np.int64), "one": np.array([-1], np.int64)},
        metadata={"format": "np"},
    )
    repo.commit(src, "exp", "dtypes")

    assert_round_trip(repo, src, "exp", tmp_path / "out")
    dtypes = {e.path: e.safetensors["dtypes"] for e in repo.ls("exp") if e.safetensors}
    assert dtypes == {
        "f32.safetensors": {"F32": 2},
        "f16.safetensors": {"F16": 1},
        "bf16.safetensors": {"BF16": 1},
        "i64.safetensors": {"I64": 2},
    }


def test_safetensors_with_empty_tensors_round_trip_bit_exact(repo, work, tmp_path, rng):
    src = work / "ckpt"
    write_safetensors(
        src / "model.safetensors",
        {
            "empty": np.zeros((0,), np.float32),
            "empty_rows": np.zeros((0, 4), np.float32),
            "full": rng.standard_normal((8, 4)).astype(np.float32),
        },
    )
    repo.commit(src, "exp", "empty tensors")

    assert_round_trip(repo, src, "exp", tmp_path / "out")
    (entry,) = repo.ls("exp")
    assert entry.safetensors == {"tensors": 3, "parameters": 32, "dtypes": {"F32": 3}}


def test_a_tensor_above_the_chunk_bound_is_split_at_element_boundaries_and_round_trips(work, tmp_path, rng):
    bound = 1000  # not a multiple of 8: each piece must still hold whole int64 elements
    repo = repo_with_chunking(tmp_path / "store", tensor_max_chunk=bound)
    try:
        big = rng.integers(-(1 << 62), 1 << 62, 1000, dtype=np.int64)  # 8000 bytes
        src = work / "ckpt"
        write_safetensors(src / "model.safetensors", {"big": big})
        repo.commit(src, "exp", "big tensor")

        assert_round_trip(repo, src, "exp", tmp_path / "out")
        (entry,) = repo.ls("exp")
        fobj = load_file(repo.store, entry.id)
        assert fobj.chunker == "safetensors"
        header_len, *pieces = [n for _cid, n in fobj.chunks]
        assert sum(pieces) == big.nbytes
        assert len(pieces) == -(-big.nbytes // (bound // 8 * 8))
        assert all(n <= bound and n % 8 == 0 for n in pieces)
    finally:
        repo.close()


@pytest.mark.parametrize("size", [0, 1, 2, 7, 4099, 65_537, 1_000_003])
def test_random_binary_of_any_size_round_trips_bit_exact(repo, work, tmp_path, size):
    src = work / "data"
    src.mkdir()
    (src / "blob.bin").write_bytes(os.urandom(size))
    repo.commit(src, "exp", f"{size} bytes")

    assert_round_trip(repo, src, "exp", tmp_path / "out")


def test_a_binary_spanning_many_cdc_chunks_is_stored_as_many_chunks_and_round_trips(repo, work, tmp_path):
    src = work / "data"
    src.mkdir()
    (src / "blob.bin").write_bytes(os.urandom((3 << 20) + 17))  # ~48 chunks at the 64 KiB average
    repo.commit(src, "exp", "big blob")

    assert_round_trip(repo, src, "exp", tmp_path / "out")
    (entry,) = repo.ls("exp")
    fobj = load_file(repo.store, entry.id)
    assert fobj.chunker == "fastcdc"
    assert len(fobj.chunks) >= 8


def test_empty_files_nested_directories_and_the_exec_bit_round_trip(repo, work, tmp_path):
    src = work / "tree"
    (src / "a" / "b" / "c").mkdir(parents=True)
    (src / "sibling").mkdir()
    (src / "empty.txt").write_bytes(b"")
    (src / "a" / "empty.bin").write_bytes(b"")
    (src / "a" / "b" / "c" / "deep.txt").write_text("deep\n")
    (src / "sibling" / "x").write_bytes(b"x")
    run = src / "a" / "run.sh"
    run.write_text("#!/bin/sh\necho hi\n")
    run.chmod(0o755)
    (src / "a" / "plain.sh").write_text("not executable\n")
    repo.commit(src, "exp", "tree")

    dest = tmp_path / "out"
    assert_round_trip(repo, src, "exp", dest)
    modes = {e.path: e.mode for e in repo.ls("exp")}
    assert modes["a/run.sh"] == 0o755
    assert modes["a/plain.sh"] == 0o644
    assert modes["empty.txt"] == 0o644
    assert stat.S_IMODE((dest / "a" / "run.sh").stat().st_mode) & 0o111
    assert not stat.S_IMODE((dest / "a" / "plain.sh").stat().st_mode) & 0o111
    kinds = {e.path: e.kind for e in repo.ls("exp")}
    assert kinds["a"] == kinds["a/b"] == kinds["a/b/c"] == "tree"


def test_a_single_file_commit_round_trips_through_checkout_and_open_file(repo, work, tmp_path, rng):
    path = write_safetensors(work / "model.safetensors", {"w": rng.standard_normal((16, 16)).astype(np.float32)})
    repo.commit(path, "exp", "one file")

    repo.checkout("exp", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == path.read_bytes()
    with repo.open_file("exp") as f:
        assert f.read() == path.read_bytes()
    assert repo.ls("exp")[0].id == b3sum(path.read_bytes())


def _commit_blob_and_model(repo, work, rng) -> dict[str, bytes]:
    src = work / "data"
    src.mkdir()
    blob = os.urandom((1 << 20) + 333)
    (src / "blob.bin").write_bytes(blob)
    model = write_safetensors(
        src / "model.safetensors", {f"t{i}": rng.standard_normal((64, 65)).astype(np.float32) for i in range(6)}
    ).read_bytes()
    repo.commit(src, "exp", "data")
    return {"blob.bin": blob, "model.safetensors": model}


def _read_fully(f, n: int) -> bytes:
    """Read until ``n`` bytes or end of file, whatever a single read returns."""
    parts = []
    while n > 0:
        part = f.read(n)
        if not part:
            break
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def test_open_file_returns_the_source_bytes_at_random_offsets(repo, work, rng):
    files = _commit_blob_and_model(repo, work, rng)
    for rel, content in files.items():
        with repo.open_file(f"exp:{rel}") as f:
            assert f.seekable()
            for _ in range(200):
                off = int(rng.integers(0, len(content) + 1))
                n = int(rng.integers(0, 200_000))
                assert f.seek(off) == off
                assert _read_fully(f, n) == content[off : off + n], (rel, off, n)
                assert f.tell() == min(off + n, len(content)), (rel, off, n)
            assert f.seek(-10, os.SEEK_END) == len(content) - 10
            assert _read_fully(f, 100) == content[-10:]
            assert f.read(1) == b""


def test_open_file_read_n_returns_n_bytes_across_chunk_boundaries_like_a_regular_file(repo, work, rng):
    files = _commit_blob_and_model(repo, work, rng)
    for rel, content in files.items():
        with repo.open_file(f"exp:{rel}") as f:
            for _ in range(50):
                off = int(rng.integers(0, len(content) + 1))
                n = int(rng.integers(0, 200_000))
                f.seek(off)
                got = f.read(n)
                assert got == content[off : off + n], f"{rel}: read({n}) at {off} returned {len(got)} bytes"
