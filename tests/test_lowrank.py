"""Low-rank deltas: a merged LoRA model costs its factors and a residual, not its matrices.

A model merged from a LoRA adapter differs from its base by ``scale * B @ A`` (rank r). These
tests pin the codec (bit-exact, refuses what it cannot reproduce everywhere, refuses hostile
payloads by name) and the store (a merged model committed after its base is stored as such
deltas, reads back bit-exact, also under a further delta; a version 2 store never writes one).
"""

from __future__ import annotations

import struct

import blake3
import numpy as np
import pytest

from mstore import IntegrityError, ObjectId, Repo, codecs
from mstore.codecs import DELTA, DELTA_HEAD, LOWRANK, LOWRANK_HEAD
from mstore.storage.store import Scratch
from tests.conftest import repo_at_version, repo_with_chunking, tree_bytes, write_safetensors

ID = b"\x01" * 32


def merged_pair(rows: int = 128, cols: int = 160, rank: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(base, base merged with a rank-``rank`` update computed in float32, as peft does)."""
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    b = (rng.standard_normal((rows, rank)) * 0.01).astype(np.float32)
    a = (rng.standard_normal((rank, cols)) * 0.05).astype(np.float32)
    return base, (base + (b @ a) * np.float32(2.0)).astype(np.float32)


def encode(raw: np.ndarray, base: np.ndarray) -> bytes | None:
    return codecs.encode_lowrank_delta(raw.tobytes(), base.tobytes(), ID, 1, raw.shape[1], 3)


@pytest.mark.parametrize("shape,rank", [((128, 160), 8), ((97, 300), 1), ((512, 384), 64)])
def test_a_low_rank_update_round_trips_bit_exact_at_a_fraction_of_its_size(shape, rank):
    base, merged = merged_pair(*shape, rank=rank)
    payload = encode(merged, base)

    assert payload is not None and payload[33] == LOWRANK
    assert codecs.decode_delta(payload, merged.nbytes, base.tobytes()) == merged.tobytes()
    xor = codecs.encode_delta(merged.tobytes(), base.tobytes(), ID, 1, 3, 4)
    assert len(payload) < 0.6 * len(xor)


def test_a_full_rank_update_is_not_encoded_as_low_rank():
    base, _ = merged_pair()
    moved = (base + np.random.default_rng(1).standard_normal(base.shape).astype(np.float32) * 1e-3).astype(np.float32)
    assert encode(moved, base) is None


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e-40])  # 1e-40 is subnormal in float32
def test_a_base_with_a_non_finite_or_subnormal_value_is_not_encoded_as_low_rank(value):
    base, merged = merged_pair()
    base[5, 7] = value
    assert encode(merged, base) is None


def test_a_matrix_too_narrow_for_the_range_finder_is_not_encoded_as_low_rank():
    base, merged = merged_pair(128, 64)
    assert encode(merged, base) is None


def _parts(payload: bytes) -> tuple[int, int, int]:
    return LOWRANK_HEAD.unpack_from(payload, DELTA_HEAD.size)


def _with_head(payload: bytes, rows: int, cols: int, rank: int) -> bytes:
    rest = payload[DELTA_HEAD.size + LOWRANK_HEAD.size :]
    return payload[: DELTA_HEAD.size] + LOWRANK_HEAD.pack(rows, cols, rank) + rest


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p, r, c, k: _with_head(p, r, c, 0), "rank 0"),
        (lambda p, r, c, k: _with_head(p, r, c, 65), "rank 65"),
        (lambda p, r, c, k: _with_head(p, r + 1, c, k), "does not fit"),
        (lambda p, r, c, k: _with_head(p, 1, r * c, k), "a side of at most 72"),  # 16 B/column to decode
        (lambda p, r, c, k: p[: DELTA_HEAD.size + LOWRANK_HEAD.size + 40], "truncated"),
        (lambda p, r, c, k: p[: DELTA_HEAD.size + 3], "truncated"),
    ],
)
def test_a_hostile_low_rank_header_is_refused_by_name(damage, message):
    base, merged = merged_pair()
    payload = encode(merged, base)
    rows, cols, rank = _parts(payload)
    with pytest.raises(IntegrityError, match=message):
        codecs.decode_delta(damage(payload, rows, cols, rank), merged.nbytes, base.tobytes())


def test_non_finite_factors_are_refused():
    base, merged = merged_pair()
    payload = bytearray(encode(merged, base))
    at = DELTA_HEAD.size + LOWRANK_HEAD.size
    payload[at : at + 4] = struct.pack("<f", np.inf)
    with pytest.raises(IntegrityError, match="not finite"):
        codecs.decode_delta(bytes(payload), merged.nbytes, base.tobytes())


def test_subnormal_factors_are_refused():  # a thread that flushes subnormals would read them as 0
    base, merged = merged_pair()
    payload = bytearray(encode(merged, base))
    at = DELTA_HEAD.size + LOWRANK_HEAD.size
    payload[at : at + 4] = struct.pack("<f", 1e-40)
    with pytest.raises(IntegrityError, match="not finite normal"):
        codecs.decode_delta(bytes(payload), merged.nbytes, base.tobytes())


def test_the_writer_flushes_factors_that_would_be_subnormal():
    rng = np.random.default_rng(2)
    rows, cols = 192, 160
    scale_b = np.where(np.arange(rows) < rows // 2, 2.0**-95, 2.0**-110)  # tiny but normal weights
    scale_d = np.where(np.arange(rows) < rows // 2, 2.0**-100, 2.0**-127)
    base = ((np.abs(rng.standard_normal((rows, cols))) + 1) * scale_b[:, None]).astype(np.float32)
    update = (rng.standard_normal((rows, 4)) * scale_d[:, None]) @ rng.standard_normal((4, cols))
    merged = (base.astype(np.float64) + update).astype(np.float32)

    payload = encode(merged, base)

    assert payload is not None
    rows_, cols_, rank = _parts(payload)
    at = DELTA_HEAD.size + LOWRANK_HEAD.size
    factors = np.frombuffer(payload, "<f4", rank * (rows_ + cols_), at)
    assert not ((np.abs(factors) < 2.0**-126) & (factors != 0)).any()
    assert codecs.decode_delta(payload, merged.nbytes, base.tobytes()) == merged.tobytes()


def test_a_residual_that_claims_to_be_a_delta_is_refused():
    base, merged = merged_pair()
    payload = bytearray(encode(merged, base))
    rows, cols, rank = _parts(bytes(payload))
    payload[DELTA_HEAD.size + LOWRANK_HEAD.size + 4 * rank * (rows + cols)] = DELTA
    with pytest.raises(IntegrityError, match="residual has codec 3"):
        codecs.decode_delta(bytes(payload), merged.nbytes, base.tobytes())


def test_the_prediction_is_the_fixed_order_float64_sum_rounded_once():
    rng = np.random.default_rng(3)
    base = (rng.standard_normal((70, 90)) * 0.02).astype(np.float32)
    u = rng.standard_normal((70, 5)).astype(np.float32)
    v = rng.standard_normal((5, 90)).astype(np.float32)
    got = np.empty_like(base)
    codecs.lowrank_predict(base.tobytes(), 70, 90, u, v, got)
    ref = base.astype(np.float64)
    for k in range(5):  # the definition: rank-1 terms added in order, rounded once
        ref = ref + u[:, k, None].astype(np.float64) * v[None, k, :].astype(np.float64)
    assert got.tobytes() == ref.astype(np.float32).tobytes()


# -- in the store ----------------------------------------------------------------------------


def _commit_base_then_merged(repo: Repo, work):
    base, merged = {}, {}
    for i in range(3):
        base[f"layer{i}.q.weight"], merged[f"layer{i}.q.weight"] = merged_pair(seed=i)
    base["norm.weight"] = merged["norm.weight"] = np.ones(160, np.float32)  # unchanged by the merge
    write_safetensors(work / "base" / "model.safetensors", base)
    write_safetensors(work / "merged" / "model.safetensors", merged)
    repo.commit(work / "base", "lora", "base")
    repo.commit(work / "merged", "lora", "merged")
    return merged


def _inner_codecs(repo: Repo, rev: str) -> list[int | None]:
    out = []
    with repo.open_file(f"{rev}:model.safetensors") as f:
        for cid, _n in f.fobj.chunks:
            entry = repo.store.entry("c", cid)
            if entry.codec != DELTA:
                out.append(None)
                continue
            _rec, payload = repo.store.reader.read(repo.store.pack_name(entry.pack), entry.offset, entry.enc_len)
            out.append(payload[33])
    return out


def test_a_merged_model_committed_after_its_base_is_stored_as_low_rank_deltas(repo, work, tmp_path):
    _commit_base_then_merged(repo, work)

    assert _inner_codecs(repo, "lora").count(LOWRANK) == 3
    repo.checkout("lora", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(work / "merged")
    assert repo.fsck().ok


def test_a_delta_on_top_of_a_low_rank_delta_reads_back_bit_exact(repo):
    # Skip-delta bases rarely put a delta on a low-rank one, so the chain is built directly:
    # base (whole) <- merged (low-rank) <- tuned (XOR, planes), and read through the store.
    base, merged = merged_pair()
    tuned = (merged + np.float32(1e-4) * np.sign(merged)).astype(np.float32)
    ids = [ObjectId(blake3.blake3(x.tobytes()).hexdigest()) for x in (base, merged, tuned)]
    low = codecs.encode_lowrank_delta(merged.tobytes(), base.tobytes(), ids[0].digest, 1, merged.shape[1], 3)
    top = codecs.encode_delta(tuned.tobytes(), merged.tobytes(), ids[1].digest, 2, 3, 4)
    assert low is not None and low[33] == LOWRANK and top[33] != LOWRANK
    with repo.store.batch() as batch:
        batch.add("c", ids[0], base.tobytes(), item_size=4)
        batch.add_encoded("c", ids[1], ids[1].digest, DELTA, merged.nbytes, low)
        batch.add_encoded("c", ids[2], ids[2].digest, DELTA, tuned.nbytes, top)
        batch.commit()

    assert repo.store.get("c", ids[2]) == tuned.tobytes()  # decoded level by level, verified
    view = repo.store.chunk_view(ids[2], repo.store.entry("c", ids[2]), Scratch())  # checkout's path
    assert bytes(view) == tuned.tobytes()
    assert repo.fsck().ok


@pytest.mark.parametrize("matrix_rows,pieces,low", [(100, 5, 5), (1024, 3, 3), (0, 5, 0)])
def test_a_matrix_in_several_pieces_is_stored_as_low_rank_deltas_when_its_pieces_are_whole_rows(
    tmp_path, matrix_rows, pieces, low
):
    # 1000 rows of 1200 bytes, pieces of at most 256 KiB: 218 rows fit, so 5 even pieces of 200
    # rows; at least 1024 rows stretches them to 2 x 256 KiB (436 rows): 3 of 334. Cut at
    # elements (a store made before matrix_rows), no piece is whole rows: no low-rank delta.
    base, merged = merged_pair(rows=1000, cols=300, rank=8)
    write_safetensors(tmp_path / "base" / "model.safetensors", {"w": base})
    write_safetensors(tmp_path / "merged" / "model.safetensors", {"w": merged})
    with repo_with_chunking(tmp_path / "store", tensor_max_chunk=256 << 10, matrix_rows=matrix_rows) as repo:
        repo.commit(tmp_path / "base", "lora", "base")
        repo.commit(tmp_path / "merged", "lora", "merged")

        inner = _inner_codecs(repo, "lora")[1:]  # after the header
        assert len(inner) == pieces
        assert inner.count(LOWRANK) == low
        repo.checkout("lora", tmp_path / "out")
        assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "merged")


def test_a_version_2_store_never_writes_a_low_rank_delta(tmp_path):
    repo = repo_at_version(tmp_path / "v2", 2)
    _commit_base_then_merged(repo, tmp_path / "work")

    assert LOWRANK not in _inner_codecs(repo, "lora")
    repo.close()
