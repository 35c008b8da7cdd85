"""Remote gc (docs/remote-gc.md): plan / verify / apply against a remote's refs and reflog, a
trash on the remote, and the lock protocol that keeps it from racing a push.

What touches the backend's semantics (lock listings, copying and deleting packs, undo, purge,
cloning what is left) runs against a ``file://`` remote and the real SeaweedFS S3 server; the
marking logic and the checks on proof documents, which read the remote through the same
listing and reads, run against the directory remote only, to keep this file fast.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import blake3
import pytest

from mstore import Repo, remote_gc
from mstore.errors import IntegrityError, RemoteBusy, RemoteIntegrityError, UserError
from mstore.gc import GcRefused, store_proof
from mstore.remote import log_key, read_ref, ref_key
from mstore.remote_lock import STALE_AFTER, LockLost, gc_lock, list_locks, push_lock, remove_locks
from mstore.storage.backends import BackendNotFound, open_backend
from tests.conftest import Clock, tree_bytes
from tests.remote.conftest import add_remote, checkpoint


def _backend(settings: dict):
    return open_backend(settings["url"], **{k: v for k, v in settings.items() if k != "url"})


# -- the lock protocol -------------------------------------------------------------------------


def test_push_lock_raises_remote_busy_while_a_gc_lock_is_held_and_leaves_no_lock(remote):
    backend = _backend(remote)
    with gc_lock(backend, "gc-user"):
        with pytest.raises(RemoteBusy) as info, push_lock(backend, "pusher"):
            pass
        assert "gc by gc-user@" in str(info.value) and "retry later" in str(info.value)
        assert [lk.op for lk in list_locks(backend)] == ["gc"]  # the pusher removed its own
    assert list_locks(backend) == []


def test_gc_lock_raises_remote_busy_while_a_push_lock_is_held(remote):
    backend = _backend(remote)
    with push_lock(backend, "pusher"):
        with pytest.raises(RemoteBusy, match="push by pusher@"), gc_lock(backend, "gc-user"):
            pass
        with push_lock(backend, "another pusher"):  # pushers do not exclude each other
            assert sorted(lk.op for lk in list_locks(backend)) == ["push", "push"]
    assert list_locks(backend) == []


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_a_stale_lock_does_not_block_and_unlock_removes_only_stale_locks_without_force(remote):
    backend = _backend(remote)
    dead = "locks/push/" + "0" * 32 + ".json"
    backend.put(dead, json.dumps({"op": "push", "host": "h", "pid": 1, "user": "u", "time": 1.0}).encode())
    with gc_lock(backend, "gc-user") as mine:  # the dead pusher's lock is decades old
        with pytest.raises(UserError, match="may be alive"):
            remove_locks(backend, keys=[mine.key])
        assert [lk.key for lk in remove_locks(backend)] == [dead]
        assert [lk.key for lk in list_locks(backend)] == [mine.key]
    assert STALE_AFTER == 24 * 3600


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_gc_unlock_lists_and_removes_a_dead_pushers_lock_through_the_api_and_the_cli(store, tmp_path):
    from tests.conftest import Cli

    repo, _clock, backend, _settings = store
    dead = "locks/push/" + "1" * 32 + ".json"
    backend.put(dead, json.dumps({"op": "push", "host": "h", "pid": 1, "user": "u", "time": 1.0}).encode())
    g = repo.remote_gc("origin")
    assert [lk.key for lk in g.locks()] == [dead]
    (tmp_path / "cwd").mkdir()
    cli = Cli(repo.root, tmp_path / "cwd")
    assert [lk["key"] for lk in cli.json("gc", "unlock", "--remote", "origin", "--list")] == [dead]
    assert [lk["key"] for lk in cli.json("gc", "unlock", "--remote", "origin")] == [dead]
    assert g.locks() == [] and g.unlock() == []


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_an_unreadable_lock_blocks_until_forced_away(remote):
    backend = _backend(remote)
    junk = "locks/gc/" + "1" * 32 + ".json"
    backend.put(junk, b"not json")
    with pytest.raises(RemoteBusy, match="unreadable"), push_lock(backend, "pusher"):
        pass
    assert remove_locks(backend) == []
    assert [lk.key for lk in remove_locks(backend, force=True)] == [junk]
    with push_lock(backend, "pusher"):
        pass


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_unlock_without_force_never_removes_a_lock_younger_than_the_stale_age(remote):
    backend = _backend(remote)
    t = [time.time()]
    with gc_lock(backend, "gc-user", clock=lambda: t[0]) as held:
        later = lambda: t[0] + 2 * 3600  # noqa: E731 - two hours on: fresh, whatever --older-than says
        assert remove_locks(backend, older_than=3600, clock=later) == []
        assert remove_locks(backend, older_than=0, clock=later) == []
        with pytest.raises(UserError, match="may be alive"):
            remove_locks(backend, older_than=0, keys=[held.key], clock=later)
        assert [lk.key for lk in list_locks(backend)] == [held.key]
        assert [lk.key for lk in remove_locks(backend, older_than=0, clock=lambda: t[0] + STALE_AFTER)] == [held.key]


@pytest.mark.parametrize("remote", ["file"], indirect=True)
@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_holder_whose_lock_was_removed_or_replaced_stops_and_recreates_nothing(remote, how):
    backend = _backend(remote)
    t = [time.time()]
    with gc_lock(backend, "gc-user", clock=lambda: t[0]) as held:
        held.refresh()  # still ours: fine
        if how == "removed":
            remove_locks(backend, force=True)
        else:
            backend.put(held.key, json.dumps({"op": "gc", "host": "h", "pid": 1, "user": "u", "time": t[0]}).encode())
        t[0] += 2 * 3600  # past the refresh interval: the old code re-wrote it
        with pytest.raises(LockLost, match=how):
            held.refresh()
        assert isinstance(LockLost("x", []), RemoteBusy)
        assert [lk.user for lk in list_locks(backend)] == ([] if how == "removed" else ["u"])


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # the order of steps: one backend
def test_apply_stops_before_the_next_pack_once_its_lock_is_removed(series, tmp_path):
    s = series
    pid, doc = _planned(s)
    assert len(doc["packs"]) >= 2
    backend = s["backend"]

    def unlock_force(at: str) -> None:
        if at == "pack-deleted":
            remove_locks(backend, force=True)  # someone else's gc unlock --force

    with pytest.raises(LockLost):
        remote_gc.apply(s["repo"].store, backend, pid, doc, s["clock"](), "tester", "origin", s["settings"]["url"],
                        crash_hook=unlock_force)

    assert len(s["b"] - _packs(backend)) == 1  # one pack moved, then it stopped
    assert remote_gc.proof_status(backend, pid) is None
    assert list_locks(backend) == []
    _clone_matches(s["settings"], tmp_path / "clone", {"keep": s["dirs"]["keep"], "exp": s["dirs"]["v1"]})


# -- plan / verify / apply / undo ----------------------------------------------------------------

POLICY = {"retention_days": 30, "grace_days": 14, "proof_max_age_seconds": 3600, "quarantine_days": 7}


@pytest.fixture
def store(tmp_path: Path, remote: dict):
    clock = Clock(time.time())  # remote pack names carry the real time they were made
    repo = Repo.init(tmp_path / "store", clock=clock)
    add_remote(repo, remote)
    yield repo, clock, _backend(remote), remote
    repo.close()


def _packs(backend) -> set[str]:
    return {k[len("packs/"):-len(".pack")] for k, _s in backend.list("packs/") if k.endswith(".pack")}


def _keys(backend, prefix: str = "packs/") -> set[str]:
    return {k for k, _s in backend.list(prefix)}


def _push(repo, backend, refs, force=False) -> set[str]:
    """Push; return the names of the packs that push created."""
    before = _packs(backend)
    repo.push("origin", refs, force=force)
    return _packs(backend) - before


def _plan(repo, backend, settings, clock, **policy):
    return remote_gc.plan(repo.store, backend, "origin", settings["url"], clock(), {**POLICY, **policy}, "tester")


def _apply(repo, backend, settings, clock, pid, doc):
    return remote_gc.apply(repo.store, backend, pid, doc, clock(), "tester", "origin", settings["url"])


def _delete_remote_ref(backend, full: str, when: float) -> None:
    """What deleting a remote branch writes: a ref document without an id, logged (R3)."""
    cur = read_ref(backend, full)
    doc = {"v": 1, "ref": full, "id": None, "old": str(cur.id), "seq": cur.seq + 1, "time": when,
           "user": "tester", "command": "delete", "message": "deleted"}
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert backend.put_if_version(ref_key(full), raw, cur.version)
    backend.put_if_absent(log_key(full, cur.seq + 1), raw)


@pytest.fixture
def series(store, tmp_path):
    """Remote: keep (step 0); exp pushed at v1 (packs ``a``) and at v2 (packs ``b``)."""
    repo, clock, backend, settings = store
    keep = checkpoint(tmp_path / "keep", 0)
    repo.commit(keep, "keep", "kept")
    _push(repo, backend, ["keep"])
    v1 = checkpoint(tmp_path / "v1", 1)
    repo.commit(v1, "exp", "v1")
    a = _push(repo, backend, ["exp"])
    v2 = checkpoint(tmp_path / "v2", 2)
    repo.commit(v2, "exp", "v2")
    b = _push(repo, backend, ["exp"])
    return {"repo": repo, "clock": clock, "backend": backend, "settings": settings, "a": a, "b": b,
            "dirs": {"keep": keep, "v1": v1, "v2": v2}}


def _force_exp_back_to_v1(s) -> None:
    repo = s["repo"]
    repo.create_branch("back", "exp~1")
    _push(repo, s["backend"], ["back:exp"], force=True)


def test_a_plan_after_a_force_moved_branch_lists_exactly_the_packs_only_its_old_head_reached(series):
    s = series
    _force_exp_back_to_v1(s)
    s["clock"].advance(days=40)
    before = _keys(s["backend"], "")

    pid, doc = _plan(s["repo"], s["backend"], s["settings"], s["clock"])

    assert {p["pack"] for p in doc["packs"]} == s["b"]
    assert doc["candidates"]["bytes"] == sum(p["bytes"] for p in doc["packs"]) > 0
    assert all("old versions of exp" in p["reason"] for p in doc["packs"])
    assert [c["message"] for c in doc["dead_commits"]] == ["v2"]
    assert doc["remote"] == {"name": "origin", "url": s["settings"]["url"]}
    assert set(doc["roots"]["refs"]) == {"refs/heads/keep", "refs/heads/exp"}
    stored = (s["repo"].root / "gc" / "proofs" / f"{pid}.json").read_bytes()
    assert blake3.blake3(stored).hexdigest() == pid
    assert _keys(s["backend"], "") == before  # a plan deletes nothing


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # marking logic: one backend
def test_a_plan_after_a_deleted_branch_lists_every_pack_only_it_reached(series):
    s = series
    _delete_remote_ref(s["backend"], "refs/heads/exp", s["clock"]())
    s["clock"].advance(days=40)

    _pid, doc = _plan(s["repo"], s["backend"], s["settings"], s["clock"])

    assert {p["pack"] for p in doc["packs"]} == s["a"] | s["b"]
    assert all("exp (deleted 40 days ago)" in p["reason"] for p in doc["packs"])
    assert set(doc["roots"]["refs"]) == {"refs/heads/keep"}


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # marking logic: one backend
def test_a_pack_reached_through_a_reflog_entry_inside_the_retention_window_is_not_a_candidate(series):
    s = series
    _force_exp_back_to_v1(s)
    s["clock"].advance(days=10)

    _pid, kept = _plan(s["repo"], s["backend"], s["settings"], s["clock"], grace_days=0)
    _pid, shorter = _plan(s["repo"], s["backend"], s["settings"], s["clock"], grace_days=0, retention_days=5)

    assert kept["packs"] == []
    assert any(r[2] == str(s["repo"].resolve("exp")) for r in kept["roots"]["reflog"])
    assert {p["pack"] for p in shorter["packs"]} == s["b"]  # the same remote, a shorter window


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # about the policy, not the backend
def test_packs_younger_than_the_grace_period_are_not_candidates(series):
    s = series
    _force_exp_back_to_v1(s)
    s["clock"].advance(days=40)

    _pid, doc = _plan(s["repo"], s["backend"], s["settings"], s["clock"], grace_days=60)

    assert doc["packs"] == []
    assert doc["candidates"]["younger_than_grace"] == len(s["b"])


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # marking logic: one backend
def test_a_pack_reached_only_as_a_delta_base_is_not_a_candidate(store, tmp_path):
    """x: v1, then v2 whose tensor is stored as a delta on v1's; then x is force-moved to a new
    root commit holding v2's tensor (so it reaches v2's delta chunk, never v1 itself)."""
    import numpy as np

    from tests.conftest import write_safetensors

    repo, clock, backend, settings = store
    rng = np.random.default_rng(1)
    w1 = (rng.standard_normal((96, 128)) * 0.02).astype(np.float32)
    w2 = (w1 - 1e-4 * rng.standard_normal((96, 128))).astype(np.float32)
    write_safetensors(tmp_path / "v1" / "model.safetensors", {"w": w1})
    repo.commit(tmp_path / "v1", "x", "v1")
    v1_packs = _push(repo, backend, ["x"])
    write_safetensors(tmp_path / "v2" / "model.safetensors", {"w": w2}, {"step": "2"})
    repo.commit(tmp_path / "v2", "x", "v2")
    _push(repo, backend, ["x"])
    tensor2 = blake3.blake3(w2.tobytes()).hexdigest()
    idx = [json.loads(backend.get(k)) for k, _s in backend.list("packs/") if k.endswith(".idx")]
    assert any(len(r) == 7 and r[1] == tensor2 for d in idx for r in d["records"])  # a delta on the remote
    write_safetensors(tmp_path / "v3" / "model.safetensors", {"w": w2}, {"copy": "1"})
    repo.commit(tmp_path / "v3", "y", "v2's tensor in a new root commit")
    _push(repo, backend, ["y:x"], force=True)
    clock.advance(days=40)

    _pid, doc = _plan(repo, backend, settings, clock)

    (v1_data,) = [n for n in v1_packs if not json.loads(backend.get(f"packs/{n}.idx"))["meta"]]
    candidates = {p["pack"] for p in doc["packs"]}
    assert v1_data not in candidates
    assert v1_packs - {v1_data} <= candidates  # v1's commit, tree and manifest are dead
    partial = {p["pack"]: p for p in doc["partial_packs"]}
    assert partial[v1_data]["dead_records"] == partial[v1_data]["records"] - 1  # all but the base


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # marking logic: one backend
def test_a_plan_is_refused_and_writes_no_proof_when_a_live_object_is_missing_on_the_remote(series):
    s = series
    backend = s["backend"]
    keep = str(s["repo"].resolve("keep"))
    (meta,) = [n for n in _packs(backend)
               if any(r[1] == keep for r in json.loads(backend.get(f"packs/{n}.idx"))["records"])]
    backend.delete(f"packs/{meta}.pack")  # the remote lost the pack holding keep's commit
    s["clock"].advance(days=40)
    proofs = s["repo"].root / "gc" / "proofs"

    with pytest.raises(GcRefused) as info:
        _plan(s["repo"], s["backend"], s["settings"], s["clock"])

    assert any(keep in r and "missing" in r for r in info.value.reasons)
    assert not proofs.exists() or list(proofs.iterdir()) == []


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # marking logic: one backend
def test_a_reflog_root_whose_commit_an_earlier_remote_gc_collected_is_no_doubt(series):
    s = series
    _force_exp_back_to_v1(s)
    s["clock"].advance(days=40)
    pid, doc = _plan(s["repo"], s["backend"], s["settings"], s["clock"])
    _apply(s["repo"], s["backend"], s["settings"], s["clock"], pid, doc)
    v2 = doc["dead_commits"][0]["id"]

    _pid, wider = _plan(s["repo"], s["backend"], s["settings"], s["clock"], retention_days=60)

    assert any(r[2] == v2 for r in wider["roots"]["reflog"])  # in the window again ...
    assert wider["roots"]["absent"] == [v2]  # ... but gone by design, not a reason to refuse
    assert wider["packs"] == []


# -- apply, refusals, undo -------------------------------------------------------------------------


def _clone_matches(settings: dict, dest: Path, branches: dict[str, Path]) -> None:
    clone = Repo.clone(settings["url"], dest / ".mstore", endpoint_url=settings.get("endpoint_url"))
    try:
        assert {b.name for b in clone.branches()} == set(branches)
        for name, src in branches.items():
            clone.checkout(name, dest / name)
            assert tree_bytes(dest / name) == tree_bytes(src)
        assert clone.fsck().ok
    finally:
        clone.close()


def test_apply_moves_the_candidates_to_the_remote_trash_and_every_remaining_ref_clones_bit_exact(series, tmp_path):
    s = series
    _force_exp_back_to_v1(s)
    s["clock"].advance(days=40)
    pid, doc = _plan(s["repo"], s["backend"], s["settings"], s["clock"])
    assert remote_gc.verify(s["repo"].store, s["backend"], pid, doc, s["clock"](), "origin", s["settings"]["url"]).valid

    result = _apply(s["repo"], s["backend"], s["settings"], s["clock"], pid, doc)

    assert result.packs == len(s["b"]) and result.bytes == doc["candidates"]["bytes"]
    assert _packs(s["backend"]) & s["b"] == set()
    assert not any(k.startswith(tuple(f"packs/{n}." for n in s["b"])) for k in _keys(s["backend"]))
    trash = _keys(s["backend"], f"trash/{pid}/")
    assert {f"trash/{pid}/packs/{n}.{ext}" for n in s["b"] for ext in ("pack", "idx")} <= trash
    assert remote_gc.proof_status(s["backend"], pid) == "applied"
    assert list_locks(s["backend"]) == []
    _clone_matches(s["settings"], tmp_path / "clone", {"keep": s["dirs"]["keep"], "exp": s["dirs"]["v1"]})


def test_apply_refuses_and_deletes_nothing_when_a_ref_moved_so_a_candidate_is_reachable_again(series):
    s = series
    _force_exp_back_to_v1(s)
    s["clock"].advance(days=40)
    pid, doc = _plan(s["repo"], s["backend"], s["settings"], s["clock"])
    _push(s["repo"], s["backend"], ["exp"], force=True)  # exp back at v2: nothing to send, the ref moves
    before = _keys(s["backend"])

    with pytest.raises(GcRefused) as info:
        _apply(s["repo"], s["backend"], s["settings"], s["clock"], pid, doc)

    assert any("reachable from the remote's current refs" in r for r in info.value.reasons)
    assert _keys(s["backend"]) == before
    assert _keys(s["backend"], "trash/") == set()
    assert list_locks(s["backend"]) == []


def test_apply_refuses_with_remote_busy_and_deletes_nothing_while_a_push_lock_is_held(series):
    s = series
    _force_exp_back_to_v1(s)
    s["clock"].advance(days=40)
    pid, doc = _plan(s["repo"], s["backend"], s["settings"], s["clock"])
    before = _keys(s["backend"])

    with push_lock(s["backend"], "pusher"), pytest.raises(RemoteBusy, match="push by pusher@"):
        _apply(s["repo"], s["backend"], s["settings"], s["clock"], pid, doc)

    assert _keys(s["backend"]) == before
    assert remote_gc.proof_status(s["backend"], pid) is None


def test_a_push_while_a_remote_gc_holds_its_lock_is_refused_and_moves_no_ref(series, tmp_path):
    s = series
    repo, backend = s["repo"], s["backend"]
    repo.commit(checkpoint(tmp_path / "v3", 3), "exp", "v3")
    head = read_ref(backend, "refs/heads/exp").id
    before = _keys(backend)

    with gc_lock(backend, "gc-user"), pytest.raises(RemoteBusy, match="gc by gc-user@"):
        repo.push("origin", ["exp"])

    assert read_ref(backend, "refs/heads/exp").id == head
    assert _keys(backend) == before  # nothing uploaded either
    repo.push("origin", ["exp"])  # once the gc is done
    assert read_ref(backend, "refs/heads/exp").id == repo.resolve("exp")


def test_undo_brings_every_pack_and_index_back_and_the_old_head_clones_again(series, tmp_path):
    s = series
    _force_exp_back_to_v1(s)
    s["clock"].advance(days=40)
    before = _keys(s["backend"])
    pid, doc = _plan(s["repo"], s["backend"], s["settings"], s["clock"])
    _apply(s["repo"], s["backend"], s["settings"], s["clock"], pid, doc)

    assert remote_gc.undo(s["repo"].store, s["backend"], pid, s["clock"](), "tester") == len(s["b"])

    assert _keys(s["backend"]) == before
    assert remote_gc.proof_status(s["backend"], pid) == "undone"
    assert not remote_gc.verify(s["repo"].store, s["backend"], pid, doc, s["clock"](), "origin",
                                s["settings"]["url"]).valid  # an undone proof is not applied again
    _push(s["repo"], s["backend"], ["exp"], force=True)  # v2 is whole on the remote again
    _clone_matches(s["settings"], tmp_path / "clone", {"keep": s["dirs"]["keep"], "exp": s["dirs"]["v2"]})


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # the order of steps: one backend
@pytest.mark.parametrize("point", ["pack-copied", "index-deleted"])
def test_an_interrupted_apply_leaves_a_readable_remote_and_finishes_when_run_again(series, tmp_path, point):
    s = series
    _force_exp_back_to_v1(s)
    s["clock"].advance(days=40)
    pid, doc = _plan(s["repo"], s["backend"], s["settings"], s["clock"])

    def crash(at: str) -> None:
        if at == point:
            raise KeyboardInterrupt(at)

    with pytest.raises(KeyboardInterrupt):
        remote_gc.apply(s["repo"].store, s["backend"], pid, doc, s["clock"](), "tester", "origin",
                        s["settings"]["url"], crash_hook=crash)
    assert list_locks(s["backend"]) == []  # released on the way out
    assert remote_gc.proof_status(s["backend"], pid) is None
    assert [(e["action"], e["unfinished"]) for e in remote_gc.log(s["backend"])] == [("started", True)]
    _clone_matches(s["settings"], tmp_path / "midway", {"keep": s["dirs"]["keep"], "exp": s["dirs"]["v1"]})

    _apply(s["repo"], s["backend"], s["settings"], s["clock"], pid, doc)

    assert _packs(s["backend"]) & s["b"] == set()
    assert remote_gc.proof_status(s["backend"], pid) == "applied"
    assert {f"trash/{pid}/packs/{n}.{e}" for n in s["b"] for e in ("pack", "idx")} <= _keys(s["backend"], "trash/")
    assert [e["action"] for e in remote_gc.log(s["backend"])] == ["started", "applied"]
    assert not remote_gc.log(s["backend"])[0]["unfinished"]


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # S3 trash moves: tested above
def test_purge_deletes_the_trash_only_after_the_quarantine_period(series):
    s = series
    _force_exp_back_to_v1(s)
    s["clock"].advance(days=40)
    pid, doc = _plan(s["repo"], s["backend"], s["settings"], s["clock"])
    _apply(s["repo"], s["backend"], s["settings"], s["clock"], pid, doc)
    store = s["repo"].store

    assert remote_gc.purge(store, s["backend"], s["clock"](), 7, "tester") == []
    s["clock"].advance(days=8)
    (done,) = remote_gc.purge(store, s["backend"], s["clock"](), 7, "tester")

    assert done["proof"] == pid and done["packs"] == len(s["b"])
    assert _keys(s["backend"], f"trash/{pid}/packs/") == set()
    assert remote_gc.proof_status(s["backend"], pid) == "purged"
    with pytest.raises(GcRefused):
        remote_gc.undo(store, s["backend"], pid, s["clock"](), "tester")


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # about the marker, not the backend
@pytest.mark.parametrize("bad_time", [float("-inf"), float("nan")], ids=["-inf", "nan"])
def test_an_applied_marker_whose_time_is_not_a_finite_number_does_not_start_the_quarantine_early(series, bad_time):
    s = series
    _force_exp_back_to_v1(s)
    s["clock"].advance(days=40)
    pid, doc = _plan(s["repo"], s["backend"], s["settings"], s["clock"])
    _apply(s["repo"], s["backend"], s["settings"], s["clock"], pid, doc)
    key = f"trash/{pid}/applied.json"
    marker = json.loads(s["backend"].get(key))
    s["backend"].put(key, json.dumps({**marker, "time": bad_time}).encode())  # JSON: -Infinity, NaN

    assert remote_gc.purge(s["repo"].store, s["backend"], s["clock"](), 7, "tester") == []
    assert _keys(s["backend"], f"trash/{pid}/packs/")  # the trash is still there to undo


# -- partly dead packs are reported, never rewritten or moved -------------------------------------


def _remote_problems(s) -> list[str]:
    """Why the remote's refs and in-window reflog do not all read whole from what it holds."""
    backend = s["backend"]
    sv = remote_gc.survey(backend)
    roots = remote_gc.read_state(backend).roots(s["clock"](), POLICY["retention_days"])
    return sv.doubts() + remote_gc.mark(s["repo"].store, backend, sv, roots).problems


@pytest.fixture
def mixed(store, tmp_path):
    """keep and exp pushed together (so they share packs), gone pushed alone; exp and gone then
    deleted on the remote: the shared packs are partly dead, gone's are wholly dead."""
    repo, clock, backend, settings = store
    keep = checkpoint(tmp_path / "keep", 0)
    repo.commit(keep, "keep", "kept")
    exp = checkpoint(tmp_path / "exp", 3, changed=4)
    repo.commit(exp, "exp", "exp")
    shared = _push(repo, backend, ["keep", "exp"])
    repo.commit(checkpoint(tmp_path / "gone", 5), "gone", "gone")
    gone = _push(repo, backend, ["gone"])
    _delete_remote_ref(backend, "refs/heads/exp", clock())
    _delete_remote_ref(backend, "refs/heads/gone", clock())
    clock.advance(days=40)
    return {"repo": repo, "clock": clock, "backend": backend, "settings": settings, "shared": shared,
            "gone": gone, "dirs": {"keep": keep, "exp": exp}}


def _pack_keys(backend, names) -> dict[str, bytes]:
    return {k: backend.get(k) for n in names for k in (f"packs/{n}.pack", f"packs/{n}.idx")}


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # what moves, not how: one backend
def test_a_partly_dead_pack_is_reported_with_its_dead_bytes_and_never_moved(mixed, tmp_path):
    s = mixed
    backend = s["backend"]
    shared = _pack_keys(backend, s["shared"])
    # A policy that once asked for repacking mostly dead packs changes nothing.
    pid, doc = _plan(s["repo"], backend, s["settings"], s["clock"])

    assert {p["pack"] for p in doc["packs"]} == s["gone"]
    partial = {p["pack"]: p for p in doc["partial_packs"]}
    assert set(partial) == s["shared"] and all(0 < p["dead_bytes"] < p["bytes"] for p in partial.values())
    assert doc["candidates"]["partial_dead_bytes"] == sum(p["dead_bytes"] for p in partial.values())
    assert "repack" not in doc

    result = _apply(s["repo"], backend, s["settings"], s["clock"], pid, doc)

    assert result.packs == len(s["gone"])
    assert _pack_keys(backend, s["shared"]) == shared  # byte for byte, in packs/
    s["repo"].push("origin", ["exp"])  # exp again: dedups against the shared packs
    assert _remote_problems(s) == []
    _clone_matches(s["settings"], tmp_path / "clone", s["dirs"])


def test_a_push_between_an_interrupted_apply_and_its_rerun_loses_nothing(series, tmp_path):
    # The apply stops after deleting the index of one of v2's packs (the pack file is still in
    # packs/, or copied to the trash); a push then makes v2 live again. What the remote holds is
    # what its indexes list, so the push re-uploads that pack's objects. Whether the rerun then
    # refuses (a candidate is reachable again) or finishes, v2 must stay whole.
    s = series
    backend = s["backend"]
    _force_exp_back_to_v1(s)
    s["clock"].advance(days=40)
    pid, doc = _plan(s["repo"], backend, s["settings"], s["clock"])
    assert {p["pack"] for p in doc["packs"]} == s["b"]

    def crash(at: str) -> None:
        if at == "index-deleted":
            raise KeyboardInterrupt(at)

    with pytest.raises(KeyboardInterrupt):
        remote_gc.apply(s["repo"].store, backend, pid, doc, s["clock"](), "tester", "origin",
                        s["settings"]["url"], crash_hook=crash)
    assert len(_keys(backend, "packs/") & {f"packs/{p}.idx" for p in s["b"]}) == len(s["b"]) - 1
    _push(s["repo"], backend, ["exp"], force=True)  # exp back at v2
    with contextlib.suppress(GcRefused):
        _apply(s["repo"], backend, s["settings"], s["clock"], pid, doc)

    assert _remote_problems(s) == []  # every ref and reflog entry reads whole
    _clone_matches(s["settings"], tmp_path / "clone", {"exp": s["dirs"]["v2"], "keep": s["dirs"]["keep"]})


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # the order of steps: one backend
def test_undo_after_an_interrupted_purge_deletes_nothing_a_ref_reaches(mixed, monkeypatch):
    s = mixed
    backend, store = s["backend"], s["repo"].store
    pid, doc = _plan(s["repo"], backend, s["settings"], s["clock"])
    _apply(s["repo"], backend, s["settings"], s["clock"], pid, doc)
    s["clock"].advance(days=8)
    real = remote_gc._put_marker

    def network_down(backend, p, action, *a, **k):
        if action == "purged":
            raise ConnectionError("network down")
        return real(backend, p, action, *a, **k)

    monkeypatch.setattr(remote_gc, "_put_marker", network_down)
    with pytest.raises(ConnectionError):
        remote_gc.purge(store, backend, s["clock"](), 7, "tester")
    monkeypatch.setattr(remote_gc, "_put_marker", real)
    assert remote_gc.proof_status(backend, pid) == "applied"

    remote_gc.undo(store, backend, pid, s["clock"](), "tester")

    assert _remote_problems(s) == []  # keep reads whole
    assert s["shared"] <= _packs(backend)


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # about the proof, not the backend
def test_a_proof_that_lists_packs_to_repack_is_refused(mixed):
    s = mixed
    _pid, doc = _plan(s["repo"], s["backend"], s["settings"], s["clock"])
    p = doc["partial_packs"][0]
    fid = store_proof(s["repo"].root, {**doc, "repack": [{**p, "index": "0" * 64, "meta": False, "created": 1.0}]})

    with pytest.raises(IntegrityError, match="malformed"):
        remote_gc.load_proof(s["repo"].root, fid)


# -- hostile and mismatched proofs -----------------------------------------------------------------


def _planned(s):
    _force_exp_back_to_v1(s)
    s["clock"].advance(days=40)
    return _plan(s["repo"], s["backend"], s["settings"], s["clock"])


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # about the proof, not the backend
def test_an_edited_remote_proof_is_refused(series):
    s = series
    pid, _doc = _planned(s)
    path = s["repo"].root / "gc" / "proofs" / f"{pid}.json"
    path.write_bytes(path.read_bytes().replace(b'"grace_days":14', b'"grace_days":0'))

    with pytest.raises(IntegrityError, match="was edited"):
        remote_gc.load_proof(s["repo"].root, pid)


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # marking logic: one backend
def test_a_proof_for_one_remote_is_refused_for_another_and_deletes_nothing(series, tmp_path):
    s = series
    pid, doc = _planned(s)
    other = (tmp_path / "other-disk").as_uri()
    before = _keys(s["backend"])

    verdict = remote_gc.verify(s["repo"].store, s["backend"], pid, doc, s["clock"](), "backup", other)
    with pytest.raises(GcRefused, match="is for remote 'origin'"):
        remote_gc.apply(s["repo"].store, s["backend"], pid, doc, s["clock"](), "tester", "backup", other)

    assert not verdict.valid and "is for remote 'origin'" in verdict.reasons[0]
    assert _keys(s["backend"]) == before


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # marking logic: one backend
def test_a_well_hashed_forged_proof_naming_a_live_pack_deletes_nothing(series):
    s = series
    _pid, doc = _planned(s)
    backend = s["backend"]
    live = sorted(_packs(backend) - s["b"])[0]  # keep's or v1's: reachable
    idx = backend.get(f"packs/{live}.idx")
    forged = {**doc, "packs": [{**doc["packs"][0], "pack": live, "bytes": backend.stat(f"packs/{live}.pack"),
                                "index": blake3.blake3(idx).hexdigest()}]}
    fid = store_proof(s["repo"].root, forged)  # a proof file anyone could write, named by its hash
    fid, loaded = remote_gc.load_proof(s["repo"].root, fid)
    before = _keys(backend)

    with pytest.raises(GcRefused, match="reachable from the remote's current refs"):
        _apply(s["repo"], backend, s["settings"], s["clock"], fid, loaded)

    assert _keys(backend) == before


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # about the proof, not the backend
@pytest.mark.parametrize("forge", ["made in the future", "a longer age limit"])
def test_a_well_hashed_proof_cannot_outlive_the_configured_proof_age(series, forge):
    s = series
    _pid, doc = _planned(s)
    s["clock"].advance(seconds=2 * POLICY["proof_max_age_seconds"])  # past the limit
    if forge == "made in the future":
        forged = {**doc, "created": s["clock"]() + 86400}
    else:
        forged = {**doc, "policy": {**doc["policy"], "proof_max_age_seconds": 1e300}}
    fid = store_proof(s["repo"].root, forged)
    fid, loaded = remote_gc.load_proof(s["repo"].root, fid)
    before = _keys(s["backend"])

    verdict = remote_gc.verify(s["repo"].store, s["backend"], fid, loaded, s["clock"](), "origin",
                               s["settings"]["url"], floor=POLICY)
    with pytest.raises(GcRefused, match="plan again"):
        _apply(s["repo"], s["backend"], s["settings"], s["clock"], fid, loaded)

    assert not verdict.valid and any("plan again" in r for r in verdict.reasons)
    assert _keys(s["backend"]) == before


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # about the proof, not the backend
@pytest.mark.parametrize("field", ["created_by", "candidates", "roots", "partial_packs", "dead_commits"])
def test_a_well_hashed_proof_missing_what_gc_show_prints_is_malformed_not_a_traceback(series, field):
    s = series
    _pid, doc = _planned(s)
    fid = store_proof(s["repo"].root, {k: v for k, v in doc.items() if k != field})

    with pytest.raises(IntegrityError, match="malformed"):
        remote_gc.load_proof(s["repo"].root, fid)


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # about the proof, not the backend
def test_a_proof_naming_a_key_outside_the_packs_prefix_is_malformed(series):
    s = series
    _pid, doc = _planned(s)
    forged = {**doc, "packs": [{**doc["packs"][0], "pack": "../refs/heads/keep"}]}
    fid = store_proof(s["repo"].root, forged)

    with pytest.raises(IntegrityError, match="malformed"):
        remote_gc.load_proof(s["repo"].root, fid)


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # about the proof, not the backend
def test_a_local_gc_apply_of_a_remote_proof_is_a_named_error(series):
    s = series
    pid, _doc = _planned(s)
    before = _keys(s["backend"], "")

    with pytest.raises(UserError, match="--remote origin"):
        s["repo"].gc_apply(pid)

    assert _keys(s["backend"], "") == before


# -- doubt: what is listed but cannot be read ------------------------------------------------------


class _Flaky:
    """A remote whose listing shows every key, but whose GET of some keys fails (a flaky gateway)."""

    def __init__(self, inner, hide: set[str], error: type[Exception] = BackendNotFound):
        self.inner, self.hide, self.error = inner, hide, error

    def get(self, key: str) -> bytes:
        if key in self.hide:
            raise self.error(key)
        return self.inner.get(key)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class _Lagging:
    """A remote whose listing does not show some keys yet (they read and stat fine)."""

    def __init__(self, inner, unlisted: set[str]):
        self.inner, self.unlisted = inner, unlisted

    def list(self, prefix: str):
        return [(k, n) for k, n in self.inner.list(prefix) if k not in self.unlisted]

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # marking logic: one backend
@pytest.mark.parametrize("how", ["not-found", "error", "garbage"])
def test_a_listed_pack_index_that_cannot_be_read_refuses_the_plan(series, how):
    """v2 is reached only through a reflog entry inside the window; its indexes do not read."""
    s = series
    _force_exp_back_to_v1(s)
    s["clock"].advance(days=20)
    backend = s["backend"]
    hide = {f"packs/{n}.idx" for n in s["b"]}
    if how == "garbage":
        for key in hide:
            backend.put(key, b"not an index")
        view = backend
    else:
        view = _Flaky(backend, hide, BackendNotFound if how == "not-found" else ConnectionError)
    proofs = s["repo"].root / "gc" / "proofs"

    with pytest.raises(GcRefused) as info:
        remote_gc.plan(s["repo"].store, view, "origin", s["settings"]["url"], s["clock"](), POLICY, "tester")

    assert sum("is listed but cannot be read" in r for r in info.value.reasons) == len(s["b"])
    assert not proofs.exists() or list(proofs.iterdir()) == []


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # marking logic: one backend
def test_a_listed_reflog_entry_that_cannot_be_read_refuses_the_plan(series):
    s = series
    _force_exp_back_to_v1(s)
    s["clock"].advance(days=20)
    backend = s["backend"]
    pushed_v2 = sorted(k for k, _n in backend.list("logs/") if "exp" in k)[-2]  # not the current one

    with pytest.raises(RemoteIntegrityError, match="is listed but cannot be read"):
        remote_gc.plan(s["repo"].store, _Flaky(backend, {pushed_v2}), "origin", s["settings"]["url"], s["clock"](),
                       {**POLICY, "grace_days": 0}, "tester")


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # the order of steps: one backend
def test_a_pack_planned_without_index_stays_if_its_index_exists_at_apply(series):
    """The listing lags behind the index a push wrote: apply stats the .idx key itself."""
    s = series
    _force_exp_back_to_v1(s)
    s["clock"].advance(days=40)
    backend = s["backend"]
    view = _Lagging(backend, {f"packs/{n}.idx" for n in s["b"]})
    pid, doc = remote_gc.plan(s["repo"].store, view, "origin", s["settings"]["url"], s["clock"](), POLICY, "tester")
    assert {p["pack"] for p in doc["packs"] if p["index"] is None} == s["b"]
    before = _keys(backend)

    result = remote_gc.apply(s["repo"].store, view, pid, doc, s["clock"](), "tester", "origin", s["settings"]["url"])

    assert result.packs == 0 and result.kept == sorted(s["b"])
    assert _keys(backend) == before


# -- purge: the last re-check ----------------------------------------------------------------------


def _set_remote_ref(backend, full: str, oid: str, when: float) -> None:
    """What a push that takes no lock writes when it moves a ref (no upload: it deduped)."""
    cur = read_ref(backend, full)
    doc = {"v": 1, "ref": full, "id": oid, "old": str(cur.id), "seq": cur.seq + 1, "time": when,
           "user": "old-client", "command": "push", "message": "pushed"}
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert backend.put_if_version(ref_key(full), raw, cur.version)
    backend.put_if_absent(log_key(full, cur.seq + 1), raw)


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # marking logic: one backend
def test_purge_skips_a_proof_whose_trash_holds_a_record_live_now(series):
    s = series
    pid, doc = _planned(s)
    _apply(s["repo"], s["backend"], s["settings"], s["clock"], pid, doc)
    _push(s["repo"], s["backend"], ["exp"], force=True)  # v2 is live again (uploaded anew)
    s["clock"].advance(days=8)
    trash = _keys(s["backend"], f"trash/{pid}/packs/")

    (item,) = remote_gc.purge(s["repo"].store, s["backend"], s["clock"](), 7, "tester")

    assert item["proof"] == pid and "which is live now" in item["skipped"]
    assert _keys(s["backend"], f"trash/{pid}/packs/") == trash
    assert remote_gc.proof_status(s["backend"], pid) == "applied"


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # marking logic: one backend
def test_purge_refuses_when_a_ref_names_objects_only_in_the_trash(series):
    s = series
    pid, doc = _planned(s)
    _apply(s["repo"], s["backend"], s["settings"], s["clock"], pid, doc)
    _set_remote_ref(s["backend"], "refs/heads/exp", doc["dead_commits"][0]["id"], s["clock"]())
    s["clock"].advance(days=8)
    trash = _keys(s["backend"], f"trash/{pid}/packs/")

    with pytest.raises(GcRefused, match="gc undo"):
        remote_gc.purge(s["repo"].store, s["backend"], s["clock"](), 7, "tester")

    assert _keys(s["backend"], f"trash/{pid}/packs/") == trash
    remote_gc.undo(s["repo"].store, s["backend"], pid, s["clock"](), "tester")
    assert _remote_problems(s) == []  # the ref reads whole again


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # about the policy, not the backend
def test_purge_waits_for_the_longer_of_the_proofs_quarantine_and_the_one_given(series):
    s = series
    _force_exp_back_to_v1(s)
    s["clock"].advance(days=40)
    pid, doc = _plan(s["repo"], s["backend"], s["settings"], s["clock"], quarantine_days=10)
    _apply(s["repo"], s["backend"], s["settings"], s["clock"], pid, doc)
    s["clock"].advance(days=8)

    assert remote_gc.purge(s["repo"].store, s["backend"], s["clock"](), 7, "tester") == []
    s["clock"].advance(days=3)
    (done,) = remote_gc.purge(s["repo"].store, s["backend"], s["clock"](), 7, "tester")
    assert done["proof"] == pid and done["skipped"] is None
    assert remote_gc.proof_status(s["backend"], pid) == "purged"


# -- the proof's policy: range-checked, and never below this store's --------------------------------


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # about the proof, not the backend
def test_a_proof_planned_below_the_configured_retention_and_grace_is_refused_at_apply(series):
    s = series
    _force_exp_back_to_v1(s)
    s["clock"].advance(days=10)  # v2 is in the 30-day window, not in a 5-day one
    pid, doc = _plan(s["repo"], s["backend"], s["settings"], s["clock"], retention_days=5, grace_days=0)
    assert {p["pack"] for p in doc["packs"]} == s["b"]
    before = _keys(s["backend"])

    with pytest.raises(GcRefused) as info:
        _apply(s["repo"], s["backend"], s["settings"], s["clock"], pid, doc)  # the floor: 30 and 14 days

    assert any("retention_days is 5, below this store's 30" in r for r in info.value.reasons)
    assert any("grace_days is 0, below this store's 14" in r for r in info.value.reasons)
    assert _keys(s["backend"]) == before
    floor = {**POLICY, "retention_days": 5, "grace_days": 0}  # a store configured so
    result = remote_gc.apply(s["repo"].store, s["backend"], pid, doc, s["clock"](), "tester", "origin",
                             s["settings"]["url"], floor=floor)
    assert result.packs == len(s["b"])


@pytest.mark.parametrize("remote", ["file"], indirect=True)  # about the proof, not the backend
def test_a_proof_with_a_negative_policy_value_is_refused_and_a_nan_one_is_never_planned(series):
    s = series
    _pid, doc = _planned(s)
    forged = {**doc, "policy": {**doc["policy"], "retention_days": -1}}
    fid, loaded = remote_gc.load_proof(s["repo"].root, store_proof(s["repo"].root, forged))
    before = _keys(s["backend"])

    verdict = remote_gc.verify(s["repo"].store, s["backend"], fid, loaded, s["clock"](), "origin", s["settings"]["url"])
    with pytest.raises(GcRefused, match="must be a finite number"):
        _apply(s["repo"], s["backend"], s["settings"], s["clock"], fid, loaded)
    with pytest.raises(UserError, match="must be a finite number"):
        _plan(s["repo"], s["backend"], s["settings"], s["clock"], grace_days=float("nan"))

    assert not verdict.valid and "retention_days is -1" in verdict.reasons[0]
    assert _keys(s["backend"]) == before


# -- the command line --------------------------------------------------------------------------------


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_the_cli_plans_shows_verifies_applies_and_undoes_a_remote_proof(tmp_path, remote):
    from tests.conftest import Cli

    repo = Repo.init(tmp_path / "store")
    add_remote(repo, remote)
    repo.commit(checkpoint(tmp_path / "keep", 0), "keep", "kept")
    repo.commit(checkpoint(tmp_path / "v1", 1), "exp", "v1")
    repo.push("origin", ["keep", "exp"])
    backend = _backend(remote)
    repo.commit(checkpoint(tmp_path / "v2", 2), "exp", "v2")
    b = _push(repo, backend, ["exp"])
    repo.create_branch("back", "exp~1")
    repo.push("origin", ["back:exp"], force=True)
    repo.close()
    _configure_gc(tmp_path / "store", retention_days=0, grace_days=0)  # else apply refuses a 0-day proof
    (tmp_path / "work").mkdir()
    cli = Cli(tmp_path / "store", tmp_path / "work")
    before = _keys(backend)

    doc = cli.json("gc", "plan", "--remote", "origin", "--retention-days", "0", "--grace-days", "0")
    pid = doc["proof"]
    shown = cli("gc", "show", pid[:7]).stdout.decode()
    verified = cli("gc", "verify", pid[:7]).stdout.decode()
    wrong = cli("gc", "apply", pid[:7], "--remote", "backup", "--yes", check=False)
    applied = cli.json("gc", "apply", pid[:7], "--yes")
    after_apply = _keys(backend)
    logged = cli.json("gc", "log", "--remote", "origin")
    cli("gc", "undo", pid[:7])

    assert {p["pack"] for p in doc["packs"]} == b
    assert f"remote gc proof {pid[:7]} for origin" in shown and "v2" in shown
    assert "is valid" in verified
    assert wrong.returncode == 2 and b"is for remote 'origin'" in wrong.stderr
    assert applied["packs"] == len(b) and after_apply == before - {f"packs/{n}.{e}" for n in b for e in ("pack", "idx")}
    assert [e["action"] for e in logged] == ["started", "applied"] and not logged[0]["unfinished"]
    assert _keys(backend) == before
    assert cli.json("gc", "unlock", "--remote", "origin", "--list") == []


def _configure_gc(root: Path, **values) -> None:
    """Set ``[gc]`` values in a store's config.toml (the floor a remote proof cannot go below)."""
    import tomllib

    import tomli_w

    path = root / "config.toml"
    cfg = tomllib.loads(path.read_text())
    cfg.setdefault("gc", {}).update(values)
    path.write_text(tomli_w.dumps(cfg))


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_cli_gc_purge_remote_purges_the_remotes_trash_and_not_this_stores(tmp_path, remote):
    from tests.conftest import Cli

    repo = Repo.init(tmp_path / "store")
    add_remote(repo, remote)
    repo.commit(checkpoint(tmp_path / "keep", 0), "keep", "kept")
    repo.commit(checkpoint(tmp_path / "v1", 1), "exp", "v1")
    repo.push("origin", ["keep", "exp"])
    repo.commit(checkpoint(tmp_path / "v2", 2), "exp", "v2")
    repo.push("origin", ["exp"])
    repo.create_branch("back", "exp~1")
    repo.push("origin", ["back:exp"], force=True)
    repo.commit(checkpoint(tmp_path / "scratch", 7), "scratch", "local only")
    repo.delete_branch("scratch")
    repo.close()
    _configure_gc(tmp_path / "store", retention_days=0, grace_days=0, quarantine_days=0)
    (tmp_path / "work").mkdir()
    cli = Cli(tmp_path / "store", tmp_path / "work")
    local = cli.json("gc", "plan")
    cli("gc", "apply", local["proof"][:7], "--yes")
    rdoc = cli.json("gc", "plan", "--remote", "origin")
    cli("gc", "apply", rdoc["proof"][:7], "--yes")
    backend = _backend(remote)
    assert _keys(backend, f"trash/{rdoc['proof']}/packs/")
    local_trash = sorted(p for p in (tmp_path / "store" / "trash").rglob("*") if p.is_file())
    assert local_trash

    shown = cli("gc", "purge", "--remote", "origin", "--dry-run").stdout.decode()
    purged = cli("gc", "purge", "--remote", "origin").stdout.decode()

    assert f"would purge trash of proof {rdoc['proof'][:7]} on origin" in shown
    assert f"purged trash of proof {rdoc['proof'][:7]} on origin" in purged
    assert _keys(backend, f"trash/{rdoc['proof']}/packs/") == set()
    assert remote_gc.proof_status(backend, rdoc["proof"]) == "purged"
    assert sorted(p for p in (tmp_path / "store" / "trash").rglob("*") if p.is_file()) == local_trash


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_the_python_api_plans_applies_and_undoes_a_remote_gc(tmp_path, remote):
    repo = Repo.init(tmp_path / "store")
    add_remote(repo, remote)
    repo.commit(checkpoint(tmp_path / "keep", 0), "keep", "kept")
    repo.push("origin", ["keep"])
    repo.commit(checkpoint(tmp_path / "v1", 1), "exp", "v1")
    repo.push("origin", ["exp"])  # a pack of its own
    repo.push("origin", ["exp"], delete=True)
    repo.close()
    _configure_gc(tmp_path / "store", retention_days=0, grace_days=0, quarantine_days=0)
    repo = Repo.open(tmp_path / "store")
    g = repo.remote_gc("origin")
    backend = _backend(remote)
    before = _packs(backend)

    pid, doc = g.plan()
    assert g.verify(pid, doc).valid
    g.apply(pid, doc)
    gone = before - _packs(backend)
    g.undo(pid)

    assert gone and gone == {p["pack"] for p in doc["packs"]}
    assert _packs(backend) == before
    repo.close()
