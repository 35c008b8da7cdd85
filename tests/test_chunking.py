"""Where tensors are cut: float32 matrices in whole rows (new stores), everything else at elements.

A low-rank delta needs a piece that is rows x columns of its matrix, so a new store cuts 2-D
float32 tensors at whole rows, enough of them per piece that the factor it stores per piece
stays small. A store whose config.toml predates the ``matrix_rows`` setting keeps cutting as
it always did, or its next versions would share no pieces with its history.
"""

from __future__ import annotations

import math
import tomllib

import numpy as np
import pytest
import tomli_w
from hypothesis import given, settings
from hypothesis import strategies as st

from mstore import FormatError, Repo
from mstore.chunking.safetensors import MATRIX_STRETCH, TensorInfo, piece_size
from mstore.format import LEGACY_CHUNKING, NEW_CHUNKING, Config, read_config, write_config
from mstore.objects import load_file
from tests.conftest import repo_with_chunking, write_safetensors


def cuts(t: TensorInfo, max_chunk: int, matrix_rows: int) -> list[int]:
    """Piece lengths of tensor ``t`` in order, as plan_keyed_pieces takes them."""
    step = piece_size(t, max_chunk, matrix_rows)
    return [min(step, t.nbytes - off) for off in range(0, t.nbytes, step)]


def f32(rows: int, cols: int) -> TensorInfo:
    return TensorInfo("w", "F32", (rows, cols), 0, rows * cols * 4)


@settings(max_examples=300, deadline=None)
@given(
    rows=st.integers(1, 5000),
    cols=st.integers(1, 3000),
    max_chunk=st.integers(1, 1 << 20),
    matrix_rows=st.integers(1, 4096),
)
def test_every_piece_of_a_float32_matrix_is_whole_rows_within_the_stretched_bound(rows, cols, max_chunk, matrix_rows):
    t = f32(rows, cols)
    lengths = cuts(t, max_chunk, matrix_rows)
    row = cols * 4

    assert sum(lengths) == t.nbytes
    if row > max_chunk:  # not even one row fits a piece: cut at elements
        assert all(n <= max(4, max_chunk // 4 * 4) for n in lengths)
        return
    assert all(n % row == 0 for n in lengths)
    assert all(n <= MATRIX_STRETCH * max_chunk for n in lengths)
    # Beyond max_chunk only to reach matrix_rows rows, never further.
    assert all(n <= max_chunk or n // row <= matrix_rows for n in lengths)
    # Pieces are even: none but the last is smaller, and the first holds at least half of what
    # the bound allows (the rows spread over as few pieces as the bound needs).
    assert all(n == lengths[0] for n in lengths[:-1]) and lengths[-1] <= lengths[0]
    wanted = min(rows, max(max_chunk // row, min(matrix_rows, MATRIX_STRETCH * max_chunk // row)))
    assert lengths[0] // row * 2 >= wanted
    assert len(lengths) == math.ceil(rows / wanted)


def test_a_narrow_matrix_gets_pieces_of_whole_rows_near_the_bound_and_a_wide_one_at_least_the_minimum_rows():
    mib = 1 << 20
    rows = NEW_CHUNKING["matrix_rows"]
    assert rows == 512
    # lm_head of the bench's model: 12 MiB of 384-wide rows in four even pieces of 2048 rows.
    assert cuts(f32(8192, 384), 4 * mib, rows) == [2048 * 1536] * 4
    # 4096 wide: 4 MiB is only 256 rows, so pieces stretch to 512 rows (8 MiB).
    assert cuts(f32(8192, 4096), 4 * mib, rows) == [8 * mib] * 16
    # 8192 wide: 512 rows would be 16 MiB, past 2 x 4 MiB: 256 rows.
    assert cuts(f32(2048, 8192), 4 * mib, rows) == [8 * mib] * 8


def test_legacy_settings_cut_every_tensor_at_elements_as_stores_always_did():
    t = f32(50257, 768)  # 16 MiB is not a multiple of a 3 KiB row
    lengths = cuts(t, LEGACY_CHUNKING["tensor_max_chunk"], LEGACY_CHUNKING["matrix_rows"])
    assert lengths[:-1] == [16 << 20] * (len(lengths) - 1)


def test_only_two_dimensional_float32_tensors_are_cut_in_rows():
    for t in (
        TensorInfo("w", "BF16", (1000, 300), 0, 1000 * 300 * 2),
        TensorInfo("w", "F32", (10, 100, 300), 0, 10 * 100 * 300 * 4),
        TensorInfo("w", "F32", (300_000,), 0, 1_200_000),
    ):
        assert cuts(t, 100_000, 1024)[0] == 100_000 // t.item_size * t.item_size


def test_a_new_store_is_made_with_the_new_chunking_settings(tmp_path):
    Repo.init(tmp_path / "s").close()
    cfg = read_config(tmp_path / "s")
    assert {k: cfg.get("chunking", k) for k in NEW_CHUNKING} == NEW_CHUNKING
    assert NEW_CHUNKING["matrix_rows"] > 0 and NEW_CHUNKING != LEGACY_CHUNKING


def _piece_lengths(repo: Repo, rev: str) -> list[int]:
    (entry,) = repo.ls(rev)
    _header, *pieces = [n for _cid, n in load_file(repo.store, entry.id).chunks]
    return pieces


def test_a_store_whose_config_predates_matrix_rows_keeps_cutting_at_elements(tmp_path):
    root = tmp_path / "old"
    src = tmp_path / "work"
    write_safetensors(src / "model.safetensors", {"w": np.ones((100, 3), dtype=np.float32)})
    # What an mstore before matrix_rows wrote, with a bound small enough to cut this tensor.
    with repo_with_chunking(root, replace=True, cdc_avg_size=65536, tensor_max_chunk=1000) as repo:
        repo.commit(src, "main", "old store")
        assert _piece_lengths(repo, "main") == [1000, 200]  # at elements: 1000 is not whole 12-byte rows

    data = read_config(root).data
    data["chunking"]["matrix_rows"] = 1
    write_config(root, Config(data))
    # A stored file is reused whole, however it was cut: a new one shows the new cuts.
    write_safetensors(src / "model.safetensors", {"w": np.full((100, 3), 2, dtype=np.float32)})
    with Repo.open(root) as repo:
        repo.commit(src, "rows", "rows")
        assert _piece_lengths(repo, "rows") == [600, 600]  # 83 rows fit 1000 bytes: two even pieces of 50


@pytest.mark.parametrize(
    "key,value",
    [("matrix_rows", "many"), ("matrix_rows", True), ("cdc_avg_size", 8 << 20), ("tensor_max_chunk", 0)],
)
def test_a_config_with_a_chunking_setting_the_chunkers_cannot_use_is_refused_naming_it(tmp_path, key, value):
    root = tmp_path / "s"
    Repo.init(root).close()
    cfg = tomllib.loads((root / "config.toml").read_text())
    cfg["chunking"][key] = value
    (root / "config.toml").write_text(tomli_w.dumps(cfg))

    with pytest.raises(FormatError, match=f"\\[chunking\\] {key} = "):
        Repo.open(root)
