"""gc marks on an index snapshot and raw digests (reachability.mark); it must reach exactly what
the object-by-object walk (reachability.walk, used by fsck and push) reaches, report the same
objects as unreadable, and keep its index snapshot identical to the index."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mstore import Repo
from mstore.hashing import ObjectId
from mstore.reachability import IndexSnapshot, mark, walk
from mstore.storage.packs import RECORD

DAY = 86400.0


def build(tmp_path: Path, seed: int) -> tuple[Repo, list[str]]:
    """A store with branches sharing files, nested directories, one-chunk files (whose manifest
    and chunk share an id) and multi-chunk files; returns it and every commit id."""
    rng = random.Random(seed)
    repo = Repo.init(tmp_path / "s", clock=lambda: 1_900_000_000.0)
    pool = [rng.randbytes(rng.choice([10, 3000, 200_000])) for _ in range(6)]
    commits = []
    for i in range(6):
        src = tmp_path / f"src{i}"
        for j in range(rng.randint(1, 4)):
            path = src / ("sub/deeper" if j % 2 else "") / f"f{j}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.choice(pool) if rng.random() < 0.5 else rng.randbytes(rng.randint(1, 300_000)))
        commits.append(str(repo.commit(src, rng.choice(["a", "b", "c"]), f"c{i}", allow_regression=True).id))
    return repo, commits


def marked_keys(repo: Repo, commits: list[str]) -> tuple[set[tuple[str, str]], dict]:
    with repo.store.index.read() as txn:
        snap = IndexSnapshot.read(txn)
    m = mark(repo.store, snap, [ObjectId(c).digest for c in commits])
    rows = m.live.nonzero()[0].tolist()
    return {(snap.kind(r), snap.digest(r).hex()) for r in rows}, m.unreadable


def walked_keys(repo: Repo, commits: list[str]) -> tuple[set[tuple[str, str]], dict]:
    live = walk(repo.store, [ObjectId(c) for c in commits])
    out = set()
    for kind, ids in (("m", live.commits), ("t", live.trees), ("f", live.files), ("c", live.chunks)):
        out.update((kind, str(i)) for i in ids if repo.store.has(kind, ObjectId(i)))
    return out, live.unreadable


@pytest.mark.parametrize("seed", range(4))
def test_mark_reaches_exactly_what_walk_reaches_from_any_set_of_commits(tmp_path: Path, seed: int):
    repo, commits = build(tmp_path, seed)
    rng = random.Random(seed)
    for roots in ([commits[-1]], rng.sample(commits, 2), commits, []):
        got, unreadable = marked_keys(repo, roots)
        assert (got, unreadable) == walked_keys(repo, roots)
    repo.close()


def test_mark_without_parents_reaches_only_the_given_commits_trees(tmp_path: Path):
    repo, commits = build(tmp_path, 7)
    with repo.store.index.read() as txn:
        snap = IndexSnapshot.read(txn)
    m = mark(repo.store, snap, [ObjectId(commits[-1]).digest], follow_parents=False)
    live = walk(repo.store, [ObjectId(commits[-1])], follow_parents=False)
    assert {snap.digest(r).hex() for r in m.live.nonzero()[0] if snap.kind(r) == "m"} == set(live.commits)
    repo.close()


def test_mark_reports_a_damaged_manifest_like_walk_and_still_marks_the_rest(tmp_path: Path):
    repo, commits = build(tmp_path, 3)
    fid = sorted(i for k, i in walked_keys(repo, commits)[0] if k == "f")[0]
    e = repo.store.entry("f", ObjectId(fid))
    with open(repo.root / "packs" / repo.store.pack_name(e.pack), "r+b") as f:
        f.seek(e.offset + RECORD.size)
        b = f.read(1)[0]
        f.seek(e.offset + RECORD.size)
        f.write(bytes([b ^ 1]))

    got, unreadable = marked_keys(repo, commits)

    assert ("f", ObjectId(fid)) in unreadable
    assert (got, unreadable) == walked_keys(repo, commits)
    repo.close()


def test_mark_reports_a_root_that_is_not_stored_as_absent(tmp_path: Path):
    repo, commits = build(tmp_path, 1)
    ghost = "ab" * 32
    with repo.store.index.read() as txn:
        snap = IndexSnapshot.read(txn)

    m = mark(repo.store, snap, [bytes.fromhex(ghost), ObjectId(commits[0]).digest])

    assert ("m", bytes.fromhex(ghost)) in m.absent
    assert "not in the store" in m.unreadable[("m", ObjectId(ghost))]
    assert m.doubt(absent_ok="m") == {}
    assert ("m", ObjectId(ghost)) in m.doubt()
    repo.close()


def test_a_chunk_a_live_manifest_names_but_the_index_lacks_is_reported_missing(tmp_path: Path):
    repo, commits = build(tmp_path, 2)
    chunk = sorted(i for k, i in walked_keys(repo, commits)[0] if k == "c")[0]
    with repo.store.index.write() as txn:
        txn.delete_entry("c", bytes.fromhex(chunk))
    with repo.store.index.read() as txn:
        snap = IndexSnapshot.read(txn)

    m = mark(repo.store, snap, [ObjectId(c).digest for c in commits])

    assert m.missing_chunks == [bytes.fromhex(chunk)]
    repo.close()


def test_index_snapshot_rows_are_the_index_entries_in_key_order(tmp_path: Path):
    repo, _commits = build(tmp_path, 5)
    with repo.store.index.read() as txn:
        snap = IndexSnapshot.read(txn)
        entries = list(txn.iter_entries())

    assert snap.n == len(entries) > 0
    assert [(snap.kind(r), snap.digest(r), snap.entry(r)) for r in range(snap.n)] == entries
    for r, (k, d, e) in enumerate(entries):
        assert snap.find_one(k, d) == r
        assert (int(snap.pack[r]), int(snap.offset[r]), int(snap.enc_len[r]), float(snap.stored_at[r])) == (
            e.pack,
            e.offset,
            e.enc_len,
            e.stored_at,
        )
    kinds = {k for k, _d, _e in entries}
    for k in kinds:
        digests = [d for kk, d, _e in entries if kk == k]
        assert snap.find(snap.keys_of(k, digests)).tolist() == [snap.find_one(k, d) for d in digests]
        assert snap.find_one(k, b"\xff" * 32) == -1
        assert snap.find(snap.keys_of(k, [b"\x00" * 32, b"\xff" * 32])).tolist() == [-1, -1]
    repo.close()


def test_index_snapshot_of_an_empty_store_has_no_rows_and_marks_nothing(tmp_path: Path):
    repo = Repo.init(tmp_path / "s")
    with repo.store.index.read() as txn:
        snap = IndexSnapshot.read(txn)
    m = mark(repo.store, snap, [b"\x01" * 32])
    assert snap.n == 0 and not m.live.any() and m.absent == {("m", b"\x01" * 32)}
    repo.close()


def test_plan_of_an_empty_store_has_no_candidates(tmp_path: Path):
    repo = Repo.init(tmp_path / "s")
    _pid, doc = repo.gc_plan()
    assert doc["candidates"]["objects"] == 0 and doc["live"]["objects"] == 0
    repo.close()
