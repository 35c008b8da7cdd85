"""gc plan --require-remote: gc never deletes the last copy (DESIGN §5.6, incident 2).

The proof records that the named remote held every candidate, and apply asks the remote again:
a remote that lost data between plan and apply makes apply refuse and change nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import blake3
import pytest

from mstore import Repo
from mstore.gc import GcRefused
from tests.conftest import DAY, Clock, tree_bytes
from tests.remote.conftest import add_remote, checkpoint


@pytest.fixture
def store(tmp_path: Path, remote: dict):
    clock = Clock()
    repo = Repo.init(tmp_path / "store", clock=clock)
    add_remote(repo, remote, "backup")
    repo.commit(checkpoint(tmp_path / "keep", 0), "keep", "kept")
    yield repo, clock
    repo.close()


def _old_branch(repo: Repo, tmp_path: Path, name: str, push: bool) -> None:
    for step in (1, 2):
        repo.commit(checkpoint(tmp_path / f"{name}{step}", 10 * step + len(name)), name, f"{name} {step}")
    if push:
        repo.push("backup", [name])
        # The tracking ref backup/NAME is a root too (it keeps a local copy); forget it, as a
        # user does who keeps that branch only on the backup.
        settings = repo.remotes()["backup"]
        repo.remote_remove("backup")
        add_remote(repo, settings, "backup")
    repo.delete_branch(name)


def test_a_plan_requiring_a_remote_that_holds_every_candidate_records_the_check(store, tmp_path):
    repo, clock = store
    _old_branch(repo, tmp_path, "old", push=True)
    clock.now += 40 * DAY

    pid, doc = repo.gc_plan(require_remote="backup")

    assert doc["policy"]["require_remote"] == "backup"
    assert doc["remote_check"] == {"remote": "backup", "objects_checked": doc["candidates"]["objects"], "lacking": 0}
    assert doc["candidates"]["objects"] > 0
    result = repo.gc_apply(pid)
    assert result.freed > 0
    assert repo.fsck().ok


def test_a_plan_is_refused_when_the_remote_lacks_a_candidate_and_writes_no_proof(store, tmp_path):
    repo, clock = store
    _old_branch(repo, tmp_path, "unpushed", push=False)
    clock.now += 40 * DAY
    proofs = repo.root / "gc" / "proofs"
    before = sorted(proofs.iterdir()) if proofs.exists() else []

    with pytest.raises(GcRefused) as info:
        repo.gc_plan(require_remote="backup")

    assert any("not on remote 'backup'" in r for r in info.value.reasons)
    assert (sorted(proofs.iterdir()) if proofs.exists() else []) == before
    repo.restore("unpushed")  # nothing was deleted
    repo.checkout("unpushed", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "unpushed2")


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # the backup disk loses files
def test_apply_refuses_and_changes_nothing_when_the_remote_lost_candidates_after_the_plan(store, tmp_path, remote):
    repo, clock = store
    _old_branch(repo, tmp_path, "old", push=True)
    clock.now += 40 * DAY
    pid, _doc = repo.gc_plan(require_remote="backup")
    shutil.rmtree(Path(remote["url"][len("file://"):]) / "packs")  # the backup disk lost its packs
    packs_before = sorted(p.name for p in (repo.root / "packs").iterdir())

    with pytest.raises(GcRefused) as info:
        repo.gc_apply(pid)

    assert any("not on remote 'backup'" in r for r in info.value.reasons)
    assert sorted(p.name for p in (repo.root / "packs").iterdir()) == packs_before
    assert not repo.gc_verify(pid).valid
    repo.restore("old")
    repo.checkout("old", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "old2")


def test_requiring_an_unknown_remote_is_a_named_error_before_anything_is_marked(store, tmp_path):
    repo, _clock = store
    from mstore.errors import RemoteNotFound

    with pytest.raises(RemoteNotFound, match="nosuch"):
        repo.gc_plan(require_remote="nosuch")


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # the backup disk loses files
def test_a_remote_copy_that_is_a_delta_on_a_base_the_remote_lost_does_not_count(tmp_path, remote):
    """Another store pushed the chunk as a delta; this store holds it whole. If the remote lost
    the delta's base, the remote has no usable copy, and gc must not delete the local one."""
    import numpy as np

    from tests.conftest import write_safetensors

    rng = np.random.default_rng(1)
    w = {"w": (rng.standard_normal((96, 128)) * 0.02).astype(np.float32)}
    other = Repo.init(tmp_path / "other")
    add_remote(other, remote, "backup")
    write_safetensors(tmp_path / "v1" / "model.safetensors", w)
    other.commit(tmp_path / "v1", "x", "v1")
    other.push("backup", ["x"])
    first_packs = {p.name for p in (Path(remote["url"][len("file://"):]) / "packs").iterdir()}
    w2 = {"w": (w["w"] - 1e-4 * rng.standard_normal((96, 128))).astype(np.float32)}
    write_safetensors(tmp_path / "v2" / "model.safetensors", w2, {"step": "2"})
    other.commit(tmp_path / "v2", "x", "v2")  # the tensor is a delta on v1's here and on the remote
    other.push("backup", ["x"])
    other.close()

    clock = Clock()
    repo = Repo.init(tmp_path / "store", clock=clock)
    add_remote(repo, remote, "backup")
    write_safetensors(tmp_path / "mine" / "model.safetensors", w2, {"copy": "1"})  # own header chunk
    repo.commit(tmp_path / "mine", "m", "the same tensor, stored whole here")
    repo.push("backup", ["m"])
    settings = repo.remotes()["backup"]
    repo.remote_remove("backup")  # keep it only on the backup
    add_remote(repo, settings, "backup")
    repo.delete_branch("m")
    for name in first_packs:  # the backup loses the pack holding the delta's base
        (Path(remote["url"][len("file://"):]) / "packs" / name).unlink()
    clock.now += 40 * DAY

    with pytest.raises(GcRefused) as info:
        repo.gc_plan(require_remote="backup")

    tensor = blake3.blake3(w2["w"].tobytes()).hexdigest()
    assert info.value.reasons[0].startswith("1 of ")  # only the tensor: the rest is intact there
    assert any(tensor in r for r in info.value.reasons)
    repo.close()
