"""Regressions found in review: gc must never keep an object while deleting what it reaches,
and a commit must never re-use an object a concurrent gc removed."""

from __future__ import annotations

import os

from mstore import RefConflict, Repo

DAY = 86400.0


def test_gc_keeps_the_chunks_of_a_young_manifest_over_old_chunks(tmp_path):
    now = [1_900_000_000.0]
    repo = Repo.init(tmp_path / "s", clock=lambda: now[0])
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.bin").write_bytes(os.urandom(2 << 20))
    repo.commit(src, "a", "first")
    repo.delete_branch("a")
    now[0] += 20 * DAY
    # A commit that loses its race: its objects (the re-used manifest, refreshed) stay indexed,
    # but no ref or reflog entry ever names its commit.
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.bin").write_bytes(os.urandom(1000))
    raced = []

    def meanwhile(_n):
        if not raced:
            raced.append(True)
            with Repo.open(repo.root, clock=lambda: now[0]) as rival:
                rival.commit(other, "b", "rival")

    try:
        repo.commit(src, "b", "loser", progress=meanwhile)
        raise AssertionError("the commit should have lost the race")
    except RefConflict:
        pass
    repo.delete_branch("b")
    now[0] += 31 * DAY - 20 * DAY  # day 31: the first commit is outside retention, its data old
    pid, _doc = repo.gc_plan()
    repo.gc_apply(pid)
    now[0] += DAY
    repo.commit(src, "d", "again")
    repo.checkout("d", tmp_path / "out")
    assert (tmp_path / "out" / "model.bin").read_bytes() == (src / "model.bin").read_bytes()
    assert repo.fsck().ok
    repo.close()


def test_a_commit_re_using_a_manifest_refreshes_its_chunks_too(tmp_path):
    now = [1_900_000_000.0]
    repo = Repo.init(tmp_path / "s", clock=lambda: now[0])
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.bin").write_bytes(os.urandom(2 << 20))
    repo.commit(src, "a", "first")
    now[0] += 20 * DAY
    repo.commit(src, "a", "same content again")
    ages = {k: e.stored_at for k, _i, e in repo.store.iter_entries() if k in "cf"}
    assert ages and all(t == now[0] for t in ages.values())
    repo.close()
