"""Delta chunks: a checkpoint series costs the bytes that changed (DESIGN §2, promise 5).

A float tensor piece whose file had the same tensor (name, dtype, shape) in the parent commit is
stored as XOR with the parent's piece when that is smaller. These tests pin what that must never
cost: every version reads back bit-exact (NaN, Inf and denormal bit patterns included), chains
stay within their bound, damage to a base is reported with every version that depends on it,
and gc never takes a base that a live delta needs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import blake3
import numpy as np
import pytest

from mstore import IntegrityError, MstoreError, ObjectId, Repo
from mstore.codecs import DELTA, delta_base
from mstore.format import Config, write_config
from mstore.storage.packs import RECORD
from tests.conftest import DAY, Clock, random_tensors, repo_at_version, tree_bytes, write_safetensors


def _bf16(x: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (the top half of float32), as safetensors' numpy API cannot write BF16."""
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


class Series:
    """A fine-tune-like series: every weight moves a little between versions."""

    def __init__(self, repo: Repo, work: Path, dtype: str = "f32", seed: int = 0, shape=(96, 130)):
        self.repo = repo
        self.work = work
        self.rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.w = {
            "embed": self.rng.standard_normal(shape).astype(np.float32) * 0.02,
            "proj": self.rng.standard_normal((shape[1], 64)).astype(np.float32) * 0.02,
        }
        self.commits: list[ObjectId] = []
        self.dirs: list[Path] = []

    def tensors(self) -> dict[str, np.ndarray]:
        if self.dtype == "f16":
            return {k: v.astype(np.float16) for k, v in self.w.items()}
        return dict(self.w)

    def step(self, branch: str = "run") -> ObjectId:
        for k in self.w:
            self.w[k] = self.w[k] - 1e-4 * self.rng.standard_normal(self.w[k].shape).astype(np.float32)
        d = self.work / f"v{len(self.commits)}"
        write_safetensors(d / "model.safetensors", self.tensors())
        cid = self.repo.commit(d, branch, f"step {len(self.commits)}").id
        self.commits.append(cid)
        self.dirs.append(d)
        return cid


def chunk_ids(repo: Repo, rev: str) -> list[ObjectId]:
    with repo.open_file(f"{rev}:model.safetensors") as f:
        return [cid for cid, _n in f.fobj.chunks]


def codec_of(repo: Repo, cid: ObjectId) -> int:
    return repo.store.entry("c", cid).codec


def depth_of(repo: Repo, cid: ObjectId) -> int:
    entry = repo.store.entry("c", cid)
    if entry.codec != DELTA:
        return 0
    with repo.store.index.read() as txn:
        return txn.db_get("deltas", cid.digest)[32]


def set_delta(repo: Repo, **values) -> Repo:
    data = repo.config.data
    data["delta"].update(values)
    write_config(repo.root, Config(data))
    root, clock = repo.root, repo.clock
    repo.close()
    return Repo.open(root, clock=clock)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_every_version_of_a_series_stored_as_deltas_checks_out_bit_exact(repo, work, tmp_path, dtype, plane_kernels):
    s = Series(repo, work, dtype)
    for _ in range(5):
        s.step()

    for i, cid in enumerate(s.commits):
        dest = tmp_path / f"out{i}"
        repo.checkout(cid, dest)
        assert tree_bytes(dest) == tree_bytes(s.dirs[i])
    later = [c for rev in s.commits[1:] for c in chunk_ids(repo, str(rev))]
    assert any(codec_of(repo, c) == DELTA for c in later)


def test_a_delta_chunk_keeps_its_id_the_blake3_of_its_raw_bytes(repo, work):
    s = Series(repo, work)
    s.step()
    s.step()
    data = (s.dirs[1] / "model.safetensors").read_bytes()

    deltas = [c for c in chunk_ids(repo, str(s.commits[1])) if codec_of(repo, c) == DELTA]
    assert deltas
    for cid in deltas:
        assert blake3.blake3(repo.store.get("c", cid)).hexdigest() == str(cid)
    with repo.open_file(f"{s.commits[1]}:model.safetensors") as f:
        assert f.read() == data


def test_a_delta_names_the_parent_version_of_the_same_tensor_as_its_base(repo, work):
    s = Series(repo, work)
    s.step()
    s.step()
    parent = chunk_ids(repo, str(s.commits[0]))
    child = chunk_ids(repo, str(s.commits[1]))

    for i, cid in enumerate(child):
        if codec_of(repo, cid) != DELTA:
            continue
        entry = repo.store.entry("c", cid)
        name = repo.store.pack_name(entry.pack)
        _rec, payload = repo.store.reader.read(name, entry.offset, entry.enc_len)
        base, depth = delta_base(payload)
        assert base == parent[i].digest  # the same piece (tensor, offset) one version earlier
        assert depth == 1


def test_chains_never_exceed_the_configured_depth_and_restart_with_a_whole_piece(repo, work, tmp_path):
    repo = set_delta(repo, max_depth=3)
    s = Series(repo, work)
    for _ in range(9):
        s.step()

    depths = [depth_of(repo, chunk_ids(repo, str(c))[1]) for c in s.commits]
    # Skip-deltas: version v after a whole piece chains popcount(v) links; after max_depth
    # versions the piece is stored whole again.
    assert depths == [0, 1, 1, 2, 0, 1, 1, 2, 0]
    dest = tmp_path / "last"
    repo.checkout(s.commits[-1], dest)
    assert tree_bytes(dest) == tree_bytes(s.dirs[-1])
    repo.close()


def test_a_delta_skips_back_lowbit_of_its_distance_from_the_last_whole_piece(repo, work):
    s = Series(repo, work)
    for _ in range(9):
        s.step()
    pieces = [chunk_ids(repo, str(c))[1] for c in s.commits]

    def base_of(cid: ObjectId) -> int | None:
        if codec_of(repo, cid) != DELTA:
            return None
        with repo.store.index.read() as txn:
            return pieces.index(ObjectId.from_digest(txn.db_get("deltas", cid.digest)[:32]))

    # v -> v & (v - 1): 1->0, 2->0, 3->2, 4->0, 5->4, 6->4, 7->6, 8->0; 9 is whole again.
    assert [base_of(c) for c in pieces] == [None, 0, 0, 2, 0, 4, 4, 6, 0]


def _base_index(repo: Repo, cid: ObjectId) -> bytes | None:
    if codec_of(repo, cid) != DELTA:
        return None
    with repo.store.index.read() as txn:
        return bytes(txn.db_get("deltas", cid.digest)[:32])


def test_versions_in_which_a_piece_did_not_change_do_not_count_towards_a_keyframe(repo, work):
    s = Series(repo, work)
    s.step()
    s.step()  # v1: a delta against v0
    for i in range(9):  # nine commits in which nothing changed
        repo.commit(s.dirs[-1], "run", f"unchanged {i}")
    s.step()  # now it moves again

    piece = chunk_ids(repo, "run")[1]
    # Eleven commits since v0 but two distinct versions: still a delta (counting commits made it
    # a keyframe); v0 is beyond the nine versions read back, so the base is the unchanged piece.
    assert codec_of(repo, piece) == DELTA
    assert _base_index(repo, piece) == chunk_ids(repo, str(s.commits[1]))[1].digest
    dest = work.parent / "out-unchanged"
    repo.checkout("run", dest)
    assert tree_bytes(dest) == tree_bytes(s.dirs[-1])


def test_a_parent_whose_piece_came_from_another_line_is_the_base_itself(repo, work):
    x = Series(repo, work / "x", seed=1)
    for _ in range(4):
        x.step("x")
    y = Series(repo, work / "y", seed=2)  # other weights under the same tensor names
    y.step("y")
    repo.commit(x.dirs[-1], "y", "copy of x's head")  # its pieces are x's, chained in x's line
    y.w = {k: v.copy() for k, v in x.w.items()}
    y.commits.append(repo.resolve("y"))
    y.step("y")  # a small step from the copy

    piece = chunk_ids(repo, "y")[1]
    assert codec_of(repo, piece) == DELTA  # against the copy, not against y's unrelated first version
    assert _base_index(repo, piece) == chunk_ids(repo, "y~1")[1].digest


def test_nan_inf_and_denormal_bit_patterns_survive_a_delta_chain_bit_exact(repo, work, tmp_path):
    rng = np.random.default_rng(5)
    base = rng.integers(0, 1 << 32, (64, 67), dtype=np.uint32)  # every bit pattern, NaNs included
    special = np.array([0x7F800000, 0xFF800000, 0x7FC00001, 0x00000001, 0x807FFFFF, 0x80000000], np.uint32)
    dirs = []
    for v in range(4):
        x = base.copy()
        x.flat[: special.size] = np.roll(special, v)
        x.flat[100 + v] ^= 1  # a small change every version
        d = work / f"s{v}"
        write_safetensors(d / "model.safetensors", {"w": x.view(np.float32), "b": _bf16(x.view(np.float32))})
        repo.commit(d, "special", f"v{v}")
        dirs.append(d)

    for v, d in enumerate(dirs):
        dest = tmp_path / f"o{v}"
        repo.checkout(f"special~{3 - v}", dest)
        assert tree_bytes(dest) == tree_bytes(d)
    assert codec_of(repo, chunk_ids(repo, "special")[1]) == DELTA


def test_odd_sized_tensors_round_trip_through_deltas(repo, work, tmp_path):
    s = Series(repo, work, shape=(7, 13))
    for _ in range(3):
        s.step()
    for i, cid in enumerate(s.commits):
        repo.checkout(cid, tmp_path / f"o{i}")
        assert tree_bytes(tmp_path / f"o{i}") == tree_bytes(s.dirs[i])


def test_an_unrelated_tensor_of_the_same_shape_is_stored_whole_when_a_delta_would_not_be_smaller(repo, work):
    rng = np.random.default_rng(9)
    for v in range(2):
        x = rng.integers(0, 1 << 32, (128, 128), dtype=np.uint32).view(np.float32)  # unrelated noise
        write_safetensors(work / f"n{v}" / "model.safetensors", {"w": x})
        repo.commit(work / f"n{v}", "noise", f"v{v}")

    assert codec_of(repo, chunk_ids(repo, "noise")[1]) != DELTA


def test_a_series_with_deltas_costs_less_than_without(tmp_path):
    sizes = {}
    for enabled in (True, False):
        repo = Repo.init(tmp_path / f"store-{enabled}")
        repo = set_delta(repo, enabled=enabled)
        s = Series(repo, tmp_path / f"work-{enabled}", seed=1, shape=(256, 256))
        for _ in range(4):
            s.step()
        sizes[enabled] = repo.stored_bytes()
        repo.close()
    assert sizes[True] < 0.9 * sizes[False]


def test_a_version_1_store_gets_neither_deltas_nor_float_planes_only_what_version_1_reads(tmp_path):
    from mstore.codecs import BYTEPLANE, FLOATPLANE

    repo = repo_at_version(tmp_path / "old", 1)
    s = Series(repo, tmp_path / "work")
    s.step()
    s.step()
    codecs_used = {codec_of(repo, c) for c in chunk_ids(repo, "run")}
    assert DELTA not in codecs_used and FLOATPLANE not in codecs_used
    assert BYTEPLANE in codecs_used  # float tensors still split into planes, unrotated
    repo.checkout("run", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(s.dirs[-1])
    repo.close()


def test_a_store_refuses_to_index_an_encoding_its_format_version_predates(tmp_path):
    from mstore.codecs import encode
    from mstore.errors import UnsupportedFormat

    repo = repo_at_version(tmp_path / "old", 1)
    raw = (np.random.default_rng(0).standard_normal(4096) * 0.02).astype(np.float32).tobytes()
    codec, payload = encode(raw, item_size=4)  # float planes: format version 2
    oid = ObjectId(blake3.blake3(raw).hexdigest())
    with repo.store.batch() as batch, pytest.raises(UnsupportedFormat, match="floatplane record .*version 1"):
        batch.add_encoded("c", oid, oid.digest, codec, len(raw), payload)
    assert not repo.store.has("c", oid)
    assert list((repo.root / "packs").iterdir()) == []  # nothing was written either
    repo.close()


# -- damage and gc -------------------------------------------------------------------------


def test_fsck_reports_a_damaged_base_with_every_version_whose_delta_depends_on_it(repo, work, tmp_path):
    s = Series(repo, work)
    for _ in range(4):
        s.step()
    base = chunk_ids(repo, str(s.commits[0]))[1]  # the keyframe of tensor piece 1
    assert [depth_of(repo, chunk_ids(repo, str(c))[1]) for c in s.commits] == [0, 1, 1, 2]
    entry = repo.store.entry("c", base)
    with open(repo.root / "packs" / repo.store.pack_name(entry.pack), "r+b") as f:
        f.seek(entry.offset + RECORD.size + entry.enc_len - 3)
        b = f.read(1)[0]
        f.seek(entry.offset + RECORD.size + entry.enc_len - 3)
        f.write(bytes([b ^ 0x10]))

    report = repo.fsck()

    assert not report.ok
    text = str(report.to_dict())
    assert str(base) in text
    for cid in s.commits:  # every version reaches the base through its chain
        assert str(cid) in text
    with pytest.raises(IntegrityError) as info:  # checkout's fast path, then its diagnosis
        repo.checkout(s.commits[-1], tmp_path / "broken")
    assert str(base) in str(info.value) and "model.safetensors" in str(info.value)
    assert not (tmp_path / "broken" / "model.safetensors").exists()
    assert [p.name for p in (tmp_path / "broken").iterdir()] == []  # no temporary file left


def test_checkout_names_the_delta_whose_own_xor_bytes_were_damaged(repo, work, tmp_path):
    s = Series(repo, work)
    for _ in range(4):
        s.step()
    top = chunk_ids(repo, str(s.commits[-1]))[1]
    assert depth_of(repo, top) == 2  # v3 -> v2 -> v0
    entry = repo.store.entry("c", top)
    with open(repo.root / "packs" / repo.store.pack_name(entry.pack), "r+b") as f:
        at = entry.offset + RECORD.size + entry.enc_len - 5  # inside the XOR's last plane
        f.seek(at)
        b = f.read(1)[0]
        f.seek(at)
        f.write(bytes([b ^ 0x21]))

    with pytest.raises(IntegrityError) as info:
        repo.checkout(s.commits[-1], tmp_path / "out")

    assert str(top) in str(info.value)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    repo.checkout(s.commits[-2], tmp_path / "older")  # the versions below it are intact
    assert tree_bytes(tmp_path / "older") == tree_bytes(s.dirs[-2])


def _delta_only_a_doomed_history_can_decode(tmp_path: Path) -> tuple[Repo, Clock, ObjectId, Path]:
    """Branch ``x``: two checkpoints, the second's tensor a delta whose base only ``x``'s
    history holds; ``y/`` on disk holds the same bytes as ``x``'s head. Returns
    ``(repo, clock, the delta chunk, y)``."""
    clock = Clock()
    repo = Repo.init(tmp_path / "store", clock=clock)
    s = Series(repo, tmp_path / "work")
    s.step("x")
    s.step("x")
    delta = chunk_ids(repo, "x")[1]
    assert codec_of(repo, delta) == DELTA
    y = tmp_path / "y"
    write_safetensors(y / "model.safetensors", s.tensors())
    return repo, clock, delta, y


def test_gc_keeps_the_base_of_a_live_delta_whose_own_history_was_deleted(tmp_path):
    """Branch ``y`` re-uses (by dedup) a delta chunk first stored on ``x``; its base exists only
    in ``x``'s history. Deleting ``x`` and collecting it must not take the base."""
    repo, clock, delta, y = _delta_only_a_doomed_history_can_decode(tmp_path)
    repo.commit(y, "y", "copy of x's head")
    assert chunk_ids(repo, "y")[1] == delta
    repo.delete_branch("x")
    clock.now += 60 * DAY

    pid, doc = repo.gc_plan()
    repo.gc_apply(pid)
    repo.gc_purge(quarantine_days=0)

    dest = tmp_path / "out"
    repo.checkout("y", dest)
    assert tree_bytes(dest) == tree_bytes(y)
    assert repo.fsck().ok
    repo.close()


def test_a_file_the_parent_lacks_is_a_delta_against_the_nearest_ancestor_that_had_it(repo, work, tmp_path):
    """A LoRA run: the base model, then adapters only, then the merged model."""
    rng = np.random.default_rng(11)
    base = {"q": (rng.standard_normal((128, 128)) * 0.02).astype(np.float32),
            "k": (rng.standard_normal((128, 128)) * 0.02).astype(np.float32)}
    write_safetensors(work / "v0" / "model.safetensors", base)
    repo.commit(work / "v0", "lora", "base")
    for step in (1, 2):
        a = (rng.standard_normal((8, 128)) * 0.01).astype(np.float32)
        write_safetensors(work / f"v{step}" / "adapter_model.safetensors", {"lora_A": a, "lora_B": a.T.copy()})
        repo.commit(work / f"v{step}", "lora", f"adapter {step}", allow_regression=True)
    merged = {"q": base["q"] + (rng.standard_normal((128, 128)) * 1e-5).astype(np.float32), "k": base["k"]}
    write_safetensors(work / "v3" / "model.safetensors", merged)
    repo.commit(work / "v3", "lora", "merged", allow_regression=True)

    q_chunk = ObjectId(blake3.blake3(merged["q"].tobytes()).hexdigest())
    k_chunk = ObjectId(blake3.blake3(base["k"].tobytes()).hexdigest())
    assert q_chunk in chunk_ids(repo, "lora") and k_chunk in chunk_ids(repo, "lora~3")
    assert codec_of(repo, q_chunk) == DELTA  # against the base's "q", three commits back
    assert k_chunk in chunk_ids(repo, "lora")  # unchanged: the base's chunk itself
    repo.checkout("lora", tmp_path / "merged")
    assert tree_bytes(tmp_path / "merged") == tree_bytes(work / "v3")


def test_deltas_in_a_commit_that_spans_many_packs_are_all_indexed_with_their_bases(repo, work, tmp_path):
    data = repo.config.data
    data["packs"]["max_size"] = 16 * 1024  # every few chunks fill a pack: the batch rolls often
    write_config(repo.root, Config(data))
    repo.close()
    repo = Repo.open(repo.root)
    s = Series(repo, work, shape=(64, 64))
    s.w.update({f"extra{i}": np.random.default_rng(i).standard_normal((64, 64)).astype(np.float32) * 0.02
                for i in range(6)})
    for _ in range(3):
        s.step()

    assert sum(codec_of(repo, c) == DELTA for c in chunk_ids(repo, "run")) >= 6
    for i, cid in enumerate(s.commits):
        repo.checkout(cid, tmp_path / f"o{i}")
        assert tree_bytes(tmp_path / f"o{i}") == tree_bytes(s.dirs[i])
    assert repo.fsck().ok
    repo.close()


def test_a_commit_re_using_a_delta_keeps_its_bases_from_a_concurrent_gc(tmp_path):
    """A large commit re-uses (and refreshes) a delta chunk in an intermediate flush, before any
    manifest names it; a gc planned and applied meanwhile must not take the delta's base."""
    repo, clock, delta, y = _delta_only_a_doomed_history_can_decode(tmp_path)
    repo.delete_branch("x")
    clock.now += 60 * DAY

    with repo.store.batch() as batch:  # the commit, half-way: its first flush re-used the delta
        assert batch.contains("c", delta)
        batch.flush()
        pid, _doc = repo.gc_plan()
        repo.gc_apply(pid)
    repo.commit(y, "y", "the commit, finished")
    repo.gc_purge(quarantine_days=0)

    repo.checkout("y", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(y)
    assert repo.fsck().ok
    repo.close()


def test_chains_stay_below_the_readers_bound_whatever_max_depth_says(repo, work, tmp_path):
    from mstore.storage.store import MAX_DELTA_CHAIN

    repo = set_delta(repo, max_depth=255)
    s = Series(repo, work, shape=(32, 64))
    # Skip-deltas reach back at most 9 versions; beyond that a piece chains on its parent, so
    # the chain grows one link per version from the tenth on.
    for _ in range(MAX_DELTA_CHAIN + 12):
        s.step()

    depths = [depth_of(repo, chunk_ids(repo, str(c))[1]) for c in s.commits]
    assert max(depths) == MAX_DELTA_CHAIN - 1
    deepest = s.commits[depths.index(MAX_DELTA_CHAIN - 1)]
    repo.checkout(deepest, tmp_path / "deep")  # both readers accept the deepest chain written
    assert tree_bytes(tmp_path / "deep") == tree_bytes(s.dirs[depths.index(MAX_DELTA_CHAIN - 1)])
    with repo.open_file(f"{deepest}:model.safetensors") as f:
        assert f.read() == (s.dirs[depths.index(MAX_DELTA_CHAIN - 1)] / "model.safetensors").read_bytes()
    repo.close()


def test_a_failed_fsync_fails_the_commit_instead_of_being_retried(repo, work, monkeypatch):
    import errno

    import mstore.storage.packs as packs

    data = repo.config.data
    data["packs"]["max_size"] = 16 * 1024  # deltas roll packs, so a sync happens inside add_encoded
    write_config(repo.root, Config(data))
    repo.close()
    repo = Repo.open(repo.root)
    s = Series(repo, work, shape=(64, 64))
    s.w.update({f"e{i}": np.random.default_rng(i).standard_normal((64, 64)).astype(np.float32) * 0.02
                for i in range(6)})
    s.step()
    head = repo.head("run")
    real = packs.os.fsync
    calls = {"n": 0}

    def failing_once(fd):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(packs.os, "fsync", failing_once)
    with pytest.raises(MstoreError, match="fsync"):
        s.step()
    assert repo.head("run") == head  # the branch did not move onto bytes that may not be on disk
    repo.close()


def _scribble(scratch) -> None:
    """Overwrite every buffer a decode can leave a result in: the scratch's and the codecs'."""
    from mstore import codecs

    for buf in [*scratch._payload, *scratch._output, scratch._final, *getattr(codecs._local, "bufs", {}).values()]:
        mv = memoryview(buf).cast("B")
        mv[:] = b"\xaa" * len(mv)


def test_a_chunk_decoded_into_a_buffer_of_its_own_survives_the_scratch_being_reused(repo, work, plane_kernels):
    # Checkout hands each decoded chunk to another thread to write while the worker decodes the
    # next one with the same scratch: every kind of chunk must land in ``into`` (or in a map
    # of its record), never in a buffer the next decode overwrites.
    from mstore.storage.packs import MAP_MIN
    from mstore.storage.store import Scratch

    s = Series(repo, work, "f32", shape=(800, 800))  # delta levels above MAP_MIN: mapped
    for _ in range(4):  # chains of byte-plane deltas, up to three levels
        s.step()
    rng = np.random.default_rng(7)
    extra = work / "extra"
    extra.mkdir()
    (extra / "noise.bin").write_bytes(rng.bytes(300_000))  # small raw chunks
    (extra / "text.jsonl").write_bytes(b'{"a": 1, "b": "some text"}\n' * 20_000)  # zstd
    write_safetensors(extra / "big.safetensors", {"w": rng.integers(0, 255, MAP_MIN + 4096, dtype=np.uint8)})
    repo.commit(extra, "extra", "other kinds of chunk")
    chunks = [(oid, e) for kind, oid, e in repo.store.iter_entries("c")]
    assert {0, 1, 3, 4} <= {e.codec for _oid, e in chunks}  # raw, zstd, delta, float planes
    assert any(e.codec == 0 and e.enc_len >= MAP_MIN for _oid, e in chunks)
    assert any(e.codec == 3 and e.enc_len >= MAP_MIN for _oid, e in chunks)
    assert max(depth_of(repo, oid) for oid, _e in chunks) >= 2

    scratch = Scratch()
    for oid, e in chunks:
        into = bytearray(e.raw_len + 100)  # larger than the chunk, as pooled buffers are
        view = repo.store.chunk_view(oid, e, scratch, into)
        _scribble(scratch)
        assert len(view) == e.raw_len
        assert blake3.blake3(view).digest() == oid.digest


class _Reads:
    """Counts, per chunk, whole decodes and prefix decodes made through the store."""

    def __init__(self, monkeypatch):
        from mstore.storage.store import ObjectStore

        self.whole: list[ObjectId] = []
        self.prefix: list[ObjectId] = []
        view, prefix = ObjectStore.chunk_view, ObjectStore.chunk_prefix

        def chunk_view(store, oid, *a, **k):
            self.whole.append(oid)
            return view(store, oid, *a, **k)

        def chunk_prefix(store, oid, *a, **k):
            self.prefix.append(oid)
            return prefix(store, oid, *a, **k)

        monkeypatch.setattr(ObjectStore, "chunk_view", chunk_view)
        monkeypatch.setattr(ObjectStore, "chunk_prefix", chunk_prefix)


def test_a_piece_whose_prefix_xor_does_not_pay_is_stored_whole_without_decoding_its_base_whole(
    repo, work, tmp_path, monkeypatch
):
    rng = np.random.default_rng(11)
    for v in range(2):  # 2 MiB vectors of unrelated values, like Adam moments that move as much as they are
        write_safetensors(work / f"m{v}" / "model.safetensors", {"m": rng.standard_normal(1 << 19).astype(np.float32)})
    repo.commit(work / "m0", "moments", "v0")
    base = chunk_ids(repo, "moments")[1]
    reads = _Reads(monkeypatch)

    repo.commit(work / "m1", "moments", "v1")

    assert reads.prefix == [base]
    assert base not in reads.whole
    assert codec_of(repo, chunk_ids(repo, "moments")[1]) != DELTA
    repo.checkout("moments", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(work / "m1")


def _drifting_versions(work: Path, seed: int, n: int) -> None:
    """``work/w0`` .. ``w{n-1}``: one 2 MiB float32 tensor moving a little each version."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(1 << 19).astype(np.float32)
    for v in range(n):
        x = x + np.float32(1e-4) * rng.standard_normal(x.shape).astype(np.float32)
        write_safetensors(work / f"w{v}" / "model.safetensors", {"w": x})


def test_a_piece_under_a_mib_whose_prefix_xor_does_not_pay_is_probed_on_a_quarter_of_it(
    repo, work, tmp_path, monkeypatch
):
    rng = np.random.default_rng(14)
    for v in range(2):  # 384 KiB: probed on its first 96 KiB, not decoded, XORed and encoded whole
        write_safetensors(work / f"m{v}" / "model.safetensors", {"m": rng.standard_normal(96 << 10).astype(np.float32)})
    repo.commit(work / "m0", "moments", "v0")
    base = chunk_ids(repo, "moments")[1]
    reads = _Reads(monkeypatch)

    repo.commit(work / "m1", "moments", "v1")

    assert reads.prefix == [base] and base not in reads.whole
    assert codec_of(repo, chunk_ids(repo, "moments")[1]) != DELTA
    repo.checkout("moments", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(work / "m1")


def test_a_whole_base_some_versions_back_is_not_probed_since_the_deltas_after_it_paid(repo, work, monkeypatch):
    _drifting_versions(work, 15, 3)
    repo.commit(work / "w0", "slow", "v0")
    repo.commit(work / "w1", "slow", "v1")
    root = chunk_ids(repo, "slow~1")[1]
    assert codec_of(repo, chunk_ids(repo, "slow")[1]) == DELTA
    reads = _Reads(monkeypatch)

    repo.commit(work / "w2", "slow", "v2")  # two from the last whole piece: its base is v0's, stored whole

    assert codec_of(repo, root) != DELTA
    assert reads.prefix == []
    assert root in reads.whole
    assert codec_of(repo, chunk_ids(repo, "slow")[1]) == DELTA


def _flags_of(repo: Repo, cid: ObjectId) -> int:
    return repo.store.entry("c", cid).flags


def test_a_tensor_whose_delta_did_not_pay_is_stored_whole_untried_for_three_versions_then_tried_again(
    repo, work, tmp_path, monkeypatch
):
    rng = np.random.default_rng(16)
    x = rng.standard_normal(1 << 19).astype(np.float32)
    write_safetensors(work / "w0" / "model.safetensors", {"w": x})
    x = rng.standard_normal(1 << 19).astype(np.float32)  # v1 unrelated to v0: its delta cannot pay
    for v in range(1, 6):  # from v1 on the tensor drifts a little: a delta against the parent would pay
        write_safetensors(work / f"w{v}" / "model.safetensors", {"w": x})
        x = x + np.float32(1e-4) * rng.standard_normal(x.shape).astype(np.float32)
    repo.commit(work / "w0", "run", "v0")
    repo.commit(work / "w1", "run", "v1")
    assert codec_of(repo, chunk_ids(repo, "run")[1]) != DELTA
    assert _flags_of(repo, chunk_ids(repo, "run")[1]) == 1

    for v, streak in ((2, 2), (3, 3), (4, 0)):
        parent = chunk_ids(repo, "run")[1]
        reads = _Reads(monkeypatch)
        repo.commit(work / f"w{v}", "run", f"v{v}")
        piece = chunk_ids(repo, "run")[1]
        assert codec_of(repo, piece) != DELTA, v
        assert _flags_of(repo, piece) == streak, v
        assert parent not in reads.prefix and parent not in reads.whole, v  # not even read
        monkeypatch.undo()

    repo.commit(work / "w5", "run", "v5")  # the fourth version after the failed try tries again

    piece = chunk_ids(repo, "run")[1]
    assert codec_of(repo, piece) == DELTA
    with repo.store.index.read() as txn:
        assert bytes(txn.db_get("deltas", piece.digest)[:32]) == chunk_ids(repo, "run~1")[1].digest
    for v in range(6):
        repo.checkout(f"run~{5 - v}", tmp_path / f"out{v}")
        assert tree_bytes(tmp_path / f"out{v}") == tree_bytes(work / f"w{v}")


def test_a_piece_whose_base_is_itself_a_delta_goes_straight_to_the_whole_xor(repo, work, monkeypatch):
    _drifting_versions(work, 12, 4)
    for v in range(3):
        repo.commit(work / f"w{v}", "slow", f"v{v}")
    reads = _Reads(monkeypatch)

    repo.commit(work / "w3", "slow", "v3")  # three from the last whole piece: its base is v2's delta

    new = chunk_ids(repo, "slow")[1]
    with repo.store.index.read() as txn:
        base = ObjectId.from_digest(bytes(txn.db_get("deltas", new.digest)[:32]))
    assert base == chunk_ids(repo, "slow~1")[1]
    assert codec_of(repo, base) == DELTA
    assert reads.prefix == []
    assert base in reads.whole


def test_the_same_tensor_twice_in_one_file_is_stored_once(repo, work):
    x = np.random.default_rng(13).standard_normal(1 << 19).astype(np.float32)
    write_safetensors(work / "tied" / "model.safetensors", {"a": x, "b": x.copy()})
    result = repo.commit(work / "tied", "tied", "two copies")
    ids = chunk_ids(repo, "tied")
    assert ids[1] == ids[2]
    assert result.new_bytes < x.nbytes + (1 << 16)  # one copy and the header


def test_a_file_cut_short_while_it_is_committed_fails_naming_it_and_moves_no_ref(repo, work, monkeypatch):
    from mstore import UserError, snapshot

    path = write_safetensors(work / "cut" / "model.safetensors", random_tensors(8, (256, 256)))
    plan_file = snapshot.plan_file

    def plan_then_cut(f, size, *a, **k):  # the training process rewrites the file meanwhile
        plan = plan_file(f, size, *a, **k)
        os.truncate(path, size // 2)
        return plan

    monkeypatch.setattr(snapshot, "plan_file", plan_then_cut)
    with pytest.raises(UserError, match="model.safetensors changed size while it was being committed"):
        repo.commit(work / "cut", "cut", "v0")
    assert "cut" not in [b.name for b in repo.branches()]


def test_pieces_read_into_the_repositorys_reused_buffers_are_stored_as_they_were_read(
    repo, work, tmp_path, monkeypatch
):
    # Workers read pieces into pooled buffers, and the caller gives each back once the file
    # hash has it: nothing stored may still point into one then. Every buffer given back is
    # scribbled over at once, so a piece stored (or its fallback encoded) after its buffer went
    # back would be stored wrong, and the checkout or fsck below would say so.
    from mstore.snapshot import ResultBuffers

    give = ResultBuffers.give
    given: list[int] = []

    def scribbling_give(self, buf):
        buf[:] = b"\xa5" * len(buf)
        given.append(len(buf))
        give(self, buf)

    monkeypatch.setattr(ResultBuffers, "give", scribbling_give)
    rng = np.random.default_rng(14)
    tensors = {f"noise{i}": rng.integers(0, 255, 3 << 20, dtype=np.uint8) for i in range(8)}  # raw pieces
    tensors |= {f"w{i}": rng.standard_normal((512, 700)).astype(np.float32) for i in range(40)}  # float planes
    tensors["small"] = rng.standard_normal(1000).astype(np.float32)  # below the pooled size: new bytes
    for v in range(3):
        for i in range(40):
            tensors[f"w{i}"] = tensors[f"w{i}"] + np.float32(1e-3) * rng.standard_normal((512, 700)).astype(np.float32)
        write_safetensors(work / f"p{v}" / "model.safetensors", tensors)
        repo.commit(work / f"p{v}", "pooled", f"v{v}")
    assert len(given) >= 3 * 48  # every piece of 256 KiB or more went through the pool
    for v in range(3):
        repo.checkout(f"pooled~{2 - v}", tmp_path / f"out{v}")
        assert tree_bytes(tmp_path / f"out{v}") == tree_bytes(work / f"p{v}")
    assert repo.fsck().ok

def test_a_delta_that_clearly_pays_is_judged_by_its_chain_roots_ratio_without_encoding_it_whole(
    repo, work, monkeypatch
):
    from mstore import codecs

    rng = np.random.default_rng(15)
    x = rng.standard_normal(1 << 19).astype(np.float32)
    for v in range(2):
        x = x + np.float32(1e-4) * rng.standard_normal(x.shape).astype(np.float32)
        write_safetensors(work / f"r{v}" / "model.safetensors", {"w": x})
    repo.commit(work / "r0", "ratio", "v0")
    encoded: list[tuple[int, int]] = []
    encode = codecs.encode

    def counting(raw, *a, **k):
        encoded.append((len(raw), k.get("item_size", a[1] if len(a) > 1 else 0)))
        return encode(raw, *a, **k)

    monkeypatch.setattr(codecs, "encode", counting)
    repo.commit(work / "r1", "ratio", "v1")

    assert codec_of(repo, chunk_ids(repo, "ratio")[1]) == DELTA
    assert [n for n, item in encoded if item == 4] == []  # neither the piece nor a prefix of it


def test_a_prefix_read_of_a_record_that_is_not_what_the_index_says_names_the_chunk(repo, work):
    from mstore.storage.store import Scratch

    write_safetensors(work / "one" / "model.safetensors", {"w": np.ones(1 << 18, np.float32)})
    repo.commit(work / "one", "one", "v0")
    header, piece = chunk_ids(repo, "one")[:2]
    entry = repo.store.entry("c", piece)
    with pytest.raises(IntegrityError, match=str(header)):
        repo.store.chunk_prefix(header, entry, 4096, Scratch())  # the record there is another chunk's
    assert repo.store.chunk_prefix(piece, entry, 4096, Scratch()) == np.ones(1024, np.float32).tobytes()


def test_a_bad_entry_after_a_stored_file_fails_the_commit_and_leaves_no_file_open(repo, work, monkeypatch):
    # The first file is read and stored before the dangling symlink after it is reached: the
    # commit fails naming the symlink, moves no ref, and keeps neither the file nor a worker.
    from mstore import snapshot

    write_safetensors(work / "bad" / "a.safetensors", random_tensors(8, (512, 512)))
    (work / "bad" / "b_dangling").symlink_to(work / "nowhere")
    stored = []
    ingest_file = snapshot.Ingest.ingest_file

    def recording(self, path, rel):
        result = ingest_file(self, path, rel)
        stored.append((rel, self.batch is not None))
        return result

    monkeypatch.setattr(snapshot.Ingest, "ingest_file", recording)
    with pytest.raises(MstoreError, match="dangling symlink"):
        repo.commit(work / "bad", "bad", "v0")
    assert stored == [("a.safetensors", True)]  # the file before it was stored, not only scanned
    fds = f"/proc/{os.getpid()}/fd"
    open_paths = [os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds) if os.path.exists(f"{fds}/{fd}")]
    assert str(work / "bad" / "a.safetensors") not in open_paths
    assert "bad" not in [b.name for b in repo.branches()]
    pool = repo._worker_pool()
    assert pool.submit(lambda: 1).result(timeout=5) == 1  # the workers are free again


def test_every_file_of_a_directory_of_mixed_sizes_gets_its_own_bytes_and_id(repo, work, tmp_path):
    rng = np.random.default_rng(16)
    d = work / "many"
    for i in range(12):  # pooled and unpooled pieces, tensor files beside content-cut ones
        n = 50_000 if i % 2 else 700_000
        write_safetensors(d / f"f{i:02d}.safetensors", {"w": rng.standard_normal(n).astype(np.float32)})
        (d / f"f{i:02d}.json").write_text(json.dumps({"i": i}))
    repo.commit(d, "many", "v0")
    repo.checkout("many", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(d)
    for i in range(12):
        entry = repo.ls(f"many:f{i:02d}.safetensors")[0]
        assert entry.id == ObjectId(blake3.blake3((d / f"f{i:02d}.safetensors").read_bytes()).hexdigest())
