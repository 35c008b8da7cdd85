"""gc: a plan deletes nothing, apply deletes only what a proof still valid at that moment names,
undo brings it back until purge, and purge (the point of no return) waits for the quarantine.

Every test drives time with an injected clock (unix seconds), so "40 days later" is one
assignment, not a sleep.
"""

from __future__ import annotations

import random
from pathlib import Path

import blake3
import pytest

from mstore import Repo
from mstore.errors import IntegrityError, ObjectNotFound
from mstore.gc import GcRefused, collected_by, load_proof, proofs_dir, trash_dir
from mstore.hashing import ObjectId
from mstore.reachability import walk
from mstore.storage.packs import RECORD
from tests.conftest import DAY, Clock, snapshot_dir, tree_bytes

T0 = 1_000_000_000.0


class Store:
    """A repository on an injected clock, and the source bytes of every commit made in it."""

    def __init__(self, root: Path, work: Path):
        self.clock = Clock()
        self.repo = Repo.init(root, clock=self.clock)
        self.work = work
        self.versions: dict[str, dict[str, bytes]] = {}
        self._n = 0

    def commit(self, branch: str, files: dict[str, bytes], message: str | None = None) -> str:
        self._n += 1
        d = self.work / f"v{self._n}"
        for name, data in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_bytes(data)
        res = self.repo.commit(d, branch, message or f"version {self._n}", allow_regression=True)
        self.versions[str(res.id)] = dict(files)
        return str(res.id)

    def check_out(self, rev: str) -> dict[str, bytes]:
        self._n += 1
        dest = self.work.parent / f"checkout{self._n}"
        self.repo.checkout(rev, dest)
        return tree_bytes(dest)


def random_files(seed: int, n: int = 3, size: int = 6000) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"part{i}.bin": rng.randbytes(size) for i in range(n)}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / ".mstore", tmp_path / "work")
    yield s
    s.repo.close()


class History:
    """``keep`` (two commits, alive) and ``old`` (two commits, deleted at T0, sharing one file
    with ``keep``), seen 40 days later: ``old`` is outside the 30-day retention and older than
    the 14-day grace period."""

    def __init__(self, store: Store):
        self.store = store
        self.shared = {"shared.bin": random.Random(100).randbytes(6000)}
        self.keep1 = store.commit("keep", {**random_files(1), **self.shared}, "keep one")
        self.keep2 = store.commit("keep", {**random_files(2), **self.shared}, "keep two")
        self.old1 = store.commit("old", {**random_files(3), **self.shared}, "old run, step 1")
        self.old2 = store.commit("old", {**random_files(4), **self.shared}, "old run, step 2")
        store.repo.delete_branch("old")
        store.clock.advance(days=40)


@pytest.fixture
def history(store: Store) -> History:
    return History(store)


def candidate_keys(doc: dict) -> set[tuple[str, str]]:
    return {(o[0], o[1]) for g in doc["groups"] for o in g["objects"]}


def candidate_commits(doc: dict) -> set[str]:
    return {o[1] for g in doc["groups"] for o in g["objects"] if o[0] == "m"}


def objects_of(repo: Repo, *commits: str) -> set[tuple[str, str]]:
    """Every object a commit reaches (its history, trees, file manifests, chunks)."""
    live = walk(repo.store, [ObjectId(c) for c in commits])
    assert not live.unreadable
    out = set()
    for kind, ids in (("m", live.commits), ("t", live.trees), ("f", live.files), ("c", live.chunks)):
        out.update((kind, str(i)) for i in ids)
    return out


def store_state(repo: Repo) -> tuple:
    """What a refused apply must leave exactly as it was."""
    entries = sorted((k, str(i), e.pack, e.offset, e.stored_at) for k, i, e in repo.store.iter_entries())
    return (
        snapshot_dir(repo.root / "packs"),
        entries,
        repo.gc_log(),
        trash_dir(repo.root).exists(),
        [(b.name, str(b.id)) for b in repo.branches()],
    )


def assert_refused_and_unchanged(repo: Repo, pid: str, reason: str) -> None:
    before = store_state(repo)
    with pytest.raises(GcRefused) as exc:
        repo.gc_apply(pid)
    assert any(reason in r for r in exc.value.reasons), exc.value.reasons
    assert reason in str(exc.value)
    assert store_state(repo) == before


# -- plan ------------------------------------------------------------------------------------


def test_plan_deletes_nothing(history: History):
    repo = history.store.repo
    packs_before = snapshot_dir(repo.root / "packs")
    entries_before = sorted((k, str(i)) for k, i, _e in repo.store.iter_entries())
    bytes_before = repo.stored_bytes()

    _pid, doc = repo.gc_plan()

    assert doc["candidates"]["objects"] > 0
    assert snapshot_dir(repo.root / "packs") == packs_before
    assert sorted((k, str(i)) for k, i, _e in repo.store.iter_entries()) == entries_before
    assert repo.stored_bytes() == bytes_before
    assert not trash_dir(repo.root).exists()
    assert repo.gc_log() == []
    assert history.store.check_out(history.old2) == history.store.versions[history.old2]


def test_plan_lists_a_deleted_branch_commit_with_its_message_ref_and_reason_once_out_of_retention(store: Store):
    old = store.commit("old", random_files(1), "the run we gave up on")
    store.commit("keep", random_files(2))
    store.repo.delete_branch("old")

    store.clock.advance(days=20)  # reflog entry still inside the 30-day window
    _pid, doc = store.repo.gc_plan()
    assert old not in candidate_commits(doc)

    store.clock.advance(days=20)  # 40 days: outside the window, and older than the grace period
    _pid, doc = store.repo.gc_plan()
    groups = [g for g in doc["groups"] if any(c["id"] == old for c in g["commits"])]
    assert len(groups) == 1
    group = groups[0]
    assert group["ref"] == "old"
    assert "old deleted 40 days ago" in group["reason"]
    assert "outside the retention window" in group["reason"]
    (listed,) = [c for c in group["commits"] if c["id"] == old]
    assert listed["message"] == "the run we gave up on"


def test_nothing_younger_than_the_grace_period_is_a_candidate(store: Store):
    ancient = store.commit("scratch", random_files(1), "ancient")
    store.repo.delete_branch("scratch")
    store.clock.advance(days=6)
    recent = store.commit("scratch", random_files(2), "recent")
    store.repo.delete_branch("scratch")
    store.clock.advance(days=13)  # recent: 13 days old; ancient: 19 days old

    # Retention 0: no reflog entry protects anything, so only the grace period can.
    _pid, doc = store.repo.gc_plan(retention_days=0)

    grace_cut = doc["created"] - 14 * DAY
    assert all(o[4] < grace_cut for g in doc["groups"] for o in g["objects"])
    assert ancient in candidate_commits(doc)
    assert not objects_of(store.repo, recent) & candidate_keys(doc)
    assert doc["candidates"]["younger_than_grace"] == len(objects_of(store.repo, recent))


def test_nothing_reachable_from_a_ref_is_a_candidate(history: History):
    repo = history.store.repo
    _pid, doc = repo.gc_plan()

    assert {history.old1, history.old2} <= candidate_commits(doc)
    kept = objects_of(repo, history.keep2)
    assert ("m", history.keep1) in kept  # history counts: the parent of a head is reachable
    assert not kept & candidate_keys(doc)


def test_nothing_reachable_from_a_reflog_entry_inside_the_retention_window_is_a_candidate(store: Store):
    ancient = store.commit("ancient", random_files(1))
    recent = store.commit("recent", random_files(2))
    store.repo.delete_branch("ancient")
    store.clock.advance(days=20)
    store.repo.delete_branch("recent")  # its reflog entry is 20 days old at the plan
    store.clock.advance(days=20)

    _pid, doc = store.repo.gc_plan()

    assert ancient in candidate_commits(doc)
    assert not objects_of(store.repo, recent) & candidate_keys(doc)


def test_nothing_reachable_from_a_pin_is_a_candidate(store: Store):
    ancient = store.commit("ancient", random_files(1))
    pinned = store.commit("pinned", random_files(2))
    store.repo.pin(pinned, note="the paper's checkpoint")
    store.repo.delete_branch("ancient")
    store.repo.delete_branch("pinned")
    store.clock.advance(days=40)

    _pid, doc = store.repo.gc_plan()

    assert ancient in candidate_commits(doc)
    assert not objects_of(store.repo, pinned) & candidate_keys(doc)


def test_nothing_reachable_from_an_unexpired_lease_is_a_candidate(store: Store):
    ancient = store.commit("ancient", random_files(1))
    leased = store.commit("leased", random_files(2))
    store.repo.delete_branch("ancient")
    store.repo.delete_branch("leased")
    store.clock.advance(days=40)

    with store.repo.lease([leased], note="evaluation job", ttl=DAY):
        store.clock.advance(seconds=3600)  # the lease has 23 hours left
        _pid, doc = store.repo.gc_plan()

    assert ancient in candidate_commits(doc)
    assert not objects_of(store.repo, leased) & candidate_keys(doc)


def _flip_live_chunk(history: History) -> str:
    repo = history.store.repo
    live_chunk = sorted(c for k, c in objects_of(repo, history.keep2) if k == "c")[0]
    entry = repo.store.entry("c", ObjectId(live_chunk))
    pos = entry.offset + RECORD.size + entry.enc_len // 2
    with open(repo.root / "packs" / repo.store.pack_name(entry.pack), "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x40]))
    return live_chunk


def test_plan_with_verify_data_refuses_when_a_live_object_cannot_be_read_and_names_it(history: History):
    repo = history.store.repo
    live_chunk = _flip_live_chunk(history)
    packs_before = snapshot_dir(repo.root / "packs")
    entries_before = sorted((k, str(i)) for k, i, _e in repo.store.iter_entries())

    with pytest.raises(GcRefused) as exc:
        repo.gc_plan(verify_data=True)

    assert live_chunk in str(exc.value)
    assert not list(proofs_dir(repo.root).glob("*.json"))
    assert snapshot_dir(repo.root / "packs") == packs_before
    assert sorted((k, str(i)) for k, i, _e in repo.store.iter_entries()) == entries_before


def test_plan_refuses_by_default_when_a_live_object_in_a_pack_it_would_rewrite_is_damaged(store: Store):
    shared = random_files(11, n=1)
    store.commit("old", {**shared, "gone.bin": random_files(12, n=1)["part0.bin"]})
    store.commit("keep", shared)  # re-uses the shared file: its chunks live in old's pack
    store.repo.delete_branch("old")
    store.clock.advance(days=40)
    live_chunk = sorted(c for k, c in objects_of(store.repo, store.repo.head("keep")) if k == "c")[0]
    entry = store.repo.store.entry("c", ObjectId(live_chunk))
    with open(store.repo.root / "packs" / store.repo.store.pack_name(entry.pack), "r+b") as f:
        f.seek(entry.offset + RECORD.size + entry.enc_len // 2)
        byte = f.read(1)[0]
        f.seek(entry.offset + RECORD.size + entry.enc_len // 2)
        f.write(bytes([byte ^ 0x40]))

    with pytest.raises(GcRefused) as exc:
        store.repo.gc_plan()

    assert live_chunk in str(exc.value)
    assert not list(proofs_dir(store.repo.root).glob("*.json"))


def test_plan_refuses_by_default_when_the_pack_of_a_live_chunk_is_missing(history: History):
    repo = history.store.repo
    live_chunk = sorted(c for k, c in objects_of(repo, history.keep2) if k == "c")[0]
    entry = repo.store.entry("c", ObjectId(live_chunk))
    (repo.root / "packs" / repo.store.pack_name(entry.pack)).unlink()

    with pytest.raises(GcRefused) as exc:
        repo.gc_plan()

    assert live_chunk in str(exc.value) and "missing or truncated" in str(exc.value)
    assert not list(proofs_dir(repo.root).glob("*.json"))


# -- apply re-checks everything ----------------------------------------------------------------


def test_apply_refuses_and_changes_nothing_when_a_commit_was_made_after_the_plan(history: History):
    pid, _doc = history.store.repo.gc_plan()
    history.store.commit("keep", random_files(5))
    assert_refused_and_unchanged(history.store.repo, pid, "ref keep moved")


def test_apply_refuses_and_changes_nothing_when_a_ref_was_deleted_after_the_plan(history: History):
    pid, _doc = history.store.repo.gc_plan()
    history.store.repo.delete_branch("keep")
    assert_refused_and_unchanged(history.store.repo, pid, "ref keep was deleted")


def test_apply_refuses_and_changes_nothing_when_a_branch_was_restored_after_the_plan(history: History):
    pid, doc = history.store.repo.gc_plan()
    assert history.old2 in candidate_commits(doc)
    history.store.repo.restore("old")
    assert_refused_and_unchanged(history.store.repo, pid, "ref old was created")


def test_an_edited_proof_is_refused_as_edited_and_changes_nothing(history: History):
    repo = history.store.repo
    pid, doc = repo.gc_plan()
    path = proofs_dir(repo.root) / f"{pid}.json"
    raw = bytearray(path.read_bytes())
    # Take one candidate off the list by changing one character of its id.
    at = raw.index(sorted(candidate_commits(doc))[0].encode())
    raw[at] = ord("0") if raw[at] != ord("0") else ord("1")
    path.chmod(0o644)
    path.write_bytes(bytes(raw))
    before = store_state(repo)

    with pytest.raises(IntegrityError, match=f"gc proof {pid[:7]} was edited"):
        load_proof(repo.root, pid)
    for command in (repo.gc_show, repo.gc_verify, repo.gc_apply):
        with pytest.raises(IntegrityError, match="was edited"):
            command(pid)

    assert store_state(repo) == before


def test_apply_refuses_and_changes_nothing_when_the_proof_is_older_than_its_limit(history: History):
    pid, doc = history.store.repo.gc_plan()
    assert doc["policy"]["proof_max_age_seconds"] == 3600
    history.store.clock.advance(seconds=3601)
    assert_refused_and_unchanged(history.store.repo, pid, "the limit is 60")


def test_apply_refuses_and_changes_nothing_when_a_candidate_was_stored_again_within_the_grace_period(
    history: History,
):
    store = history.store
    pid, doc = store.repo.gc_plan()
    assert history.old2 in candidate_commits(doc)
    store.commit("again", store.versions[history.old2])  # the same content, stored again now
    assert_refused_and_unchanged(store.repo, pid, "candidates were stored again within the grace period")


def test_verify_notices_any_single_candidate_stored_again(history: History):
    store = history.store
    own = {n: d for n, d in store.versions[history.old1].items() if n not in history.shared}
    assert len(own) == 3
    for i, (name, data) in enumerate(sorted(own.items())):
        pid, doc = store.repo.gc_plan()
        assert ("c", blake3.blake3(data).hexdigest()) in candidate_keys(doc)
        store.commit(f"again{i}", {name: data})  # one file of many candidates, stored again

        verdict = store.repo.gc_verify(pid)

        assert any("stored again within the grace period" in r for r in verdict.reasons), (name, verdict.reasons)


def test_a_proof_cannot_be_applied_twice(history: History):
    repo = history.store.repo
    pid, _doc = repo.gc_plan()
    repo.gc_apply(pid)
    assert_refused_and_unchanged(repo, pid, "already applied")


# -- verify explains ---------------------------------------------------------------------------


def _commit_on_keep(h: History) -> None:
    h.store.commit("keep", random_files(7))


def _delete_keep(h: History) -> None:
    h.store.repo.delete_branch("keep")


def _restore_old(h: History) -> None:
    h.store.repo.restore("old")


def _wait_past_the_limit(h: History) -> None:
    h.store.clock.advance(seconds=2 * 3600)


def _store_old_again(h: History) -> None:
    h.store.commit("again", h.store.versions[h.old2])


def _apply_it(h: History) -> None:
    (proof,) = proofs_dir(h.store.repo.root).glob("*.json")
    h.store.repo.gc_apply(proof.stem)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_commit_on_keep, "ref keep moved "),
        (_delete_keep, "ref keep was deleted"),
        (_restore_old, "ref old was created"),
        (_wait_past_the_limit, "the proof is 120 minutes old; the limit is 60 (plan again)"),
        (_store_old_again, "candidates were stored again within the grace period"),
        (_apply_it, "the proof was already applied"),
    ],
    ids=["commit", "ref-deleted", "branch-restored", "too-old", "stored-again", "applied"],
)
def test_verify_explains_why_a_proof_is_no_longer_valid(history: History, change, reason):
    repo = history.store.repo
    pid, _doc = repo.gc_plan()
    assert repo.gc_verify(pid).valid

    change(history)
    verdict = repo.gc_verify(pid)

    assert not verdict.valid
    assert any(reason in r for r in verdict.reasons), verdict.reasons


def test_verify_reports_an_applied_proof_with_status_applied(history: History):
    repo = history.store.repo
    pid, _doc = repo.gc_plan()
    repo.gc_apply(pid)
    verdict = repo.gc_verify(pid)
    assert verdict.status == "applied"
    assert not verdict.valid


# -- apply, undo, purge ------------------------------------------------------------------------


def test_apply_returns_the_candidates_space_and_keeps_every_live_version_bit_exact(store: Store):
    keep = [store.commit("keep", random_files(i, size=40_000)) for i in range(3)]
    for i in range(3, 7):
        store.commit("big", random_files(i, size=200_000))
    store.repo.delete_branch("big")
    store.clock.advance(days=40)
    pid, doc = store.repo.gc_plan()
    cands = doc["candidates"]
    before = store.repo.stored_bytes()

    res = store.repo.gc_apply(pid)

    after = store.repo.stored_bytes()
    assert res.objects == cands["objects"]
    assert (res.bytes_before, res.bytes_after) == (before, after)
    # Each removed record also had an 88-byte header; new packs add a 64-byte frame each.
    assert cands["stored_bytes"] - 64 * res.packs_rewritten <= before - after
    assert before - after <= cands["stored_bytes"] + RECORD.size * cands["objects"] + 64 * res.packs_rewritten
    assert before - after > 0.6 * before
    for cid in keep:
        assert store.check_out(cid) == store.versions[cid]
    assert store.repo.fsck().ok


def test_apply_leaves_packs_that_hold_only_live_objects_alone(store: Store):
    # compact_below rewrites packs with dead bytes; a pack of small, all-live objects has none.
    for i in range(3):
        store.commit("keep", random_files(i, size=600))
    store.clock.advance(days=40)
    packs = snapshot_dir(store.repo.root / "packs")
    pid, doc = store.repo.gc_plan()
    assert doc["candidates"]["objects"] == 0

    res = store.repo.gc_apply(pid)

    assert res.packs_rewritten == 0
    assert snapshot_dir(store.repo.root / "packs") == packs


def test_undo_makes_a_collected_branch_restorable_bit_exact(history: History):
    store = history.store
    pid, _doc = store.repo.gc_plan()
    store.repo.gc_apply(pid)

    assert store.repo.gc_undo(pid) > 0
    store.repo.restore("old")

    assert store.check_out("old") == store.versions[history.old2]
    assert store.check_out("old~1") == store.versions[history.old1]
    assert store.repo.fsck().ok


def test_restore_of_a_collected_branch_before_undo_fails_naming_the_proof(history: History):
    store = history.store
    pid, _doc = store.repo.gc_plan()
    store.repo.gc_apply(pid)

    with pytest.raises(ObjectNotFound) as exc:
        store.repo.restore("old")

    assert f"collected by gc proof {pid[:7]}" in str(exc.value)
    assert f"mstore gc undo {pid[:7]}" in str(exc.value)
    assert store.repo.head("old") is None


def test_purge_deletes_nothing_before_the_quarantine_period(history: History):
    store = history.store
    pid, _doc = store.repo.gc_plan()
    store.repo.gc_apply(pid)
    trash = trash_dir(store.repo.root) / pid
    contents = snapshot_dir(trash)
    assert contents

    store.clock.advance(days=6.9)
    assert store.repo.gc_purge() == []

    assert snapshot_dir(trash) == contents
    assert [e["action"] for e in store.repo.gc_log()] == ["applied"]
    assert store.repo.gc_undo(pid) > 0  # still possible


def test_purge_after_the_quarantine_period_removes_the_trash_and_is_logged(history: History):
    store = history.store
    pid, doc = store.repo.gc_plan()
    store.repo.gc_apply(pid)
    trash = trash_dir(store.repo.root) / pid

    store.clock.advance(days=7)
    purged = store.repo.gc_purge()

    assert [p["proof"] for p in purged] == [pid]
    assert purged[0]["objects"] == doc["candidates"]["objects"]
    assert not trash.exists()
    assert [(e["action"], e["proof"]) for e in store.repo.gc_log()] == [("applied", pid), ("purged", pid)]
    assert store.check_out("keep") == store.versions[history.keep2]
    assert store.repo.fsck().ok


def test_undo_is_refused_after_purge(history: History):
    store = history.store
    pid, _doc = store.repo.gc_plan()
    store.repo.gc_apply(pid)
    store.clock.advance(days=8)
    store.repo.gc_purge()

    with pytest.raises(GcRefused, match="its status is purged"):
        store.repo.gc_undo(pid)
    with pytest.raises(ObjectNotFound):
        store.repo.restore("old")


def test_gc_log_records_applied_undone_and_purged_with_user_and_counts(history: History):
    store = history.store
    repo = store.repo
    first, doc1 = repo.gc_plan()
    repo.gc_apply(first)
    log = repo.gc_log()
    assert [(e["action"], e["proof"]) for e in log] == [("applied", first)]
    assert log[-1]["user"] == repo.user
    assert log[-1]["objects"] == doc1["candidates"]["objects"]
    assert log[-1]["trashed_bytes"] == doc1["candidates"]["stored_bytes"]
    assert log[-1]["time"] == store.clock.now

    n = repo.gc_undo(first)
    log = repo.gc_log()
    assert [(e["action"], e["proof"]) for e in log[1:]] == [("undone", first)]
    assert log[-1]["user"] == repo.user
    assert log[-1]["objects"] == n == doc1["candidates"]["objects"]

    store.clock.advance(seconds=60)
    second, doc2 = repo.gc_plan()
    repo.gc_apply(second)
    trash_bytes = sum(p.stat().st_size for p in (trash_dir(repo.root) / second).iterdir())
    store.clock.advance(days=8)
    repo.gc_purge()
    log = repo.gc_log()
    assert [(e["action"], e["proof"]) for e in log[2:]] == [("applied", second), ("purged", second)]
    assert log[2]["objects"] == doc2["candidates"]["objects"]
    assert log[3]["user"] == repo.user
    assert log[3]["bytes"] == trash_bytes > 0
    assert [e["seq"] for e in log] == [1, 2, 3, 4]


def test_applied_gc_marks_exactly_the_proof_s_commits_as_collected(history: History):
    repo = history.store.repo
    pid, doc = repo.gc_plan()
    repo.gc_apply(pid)
    collected = {c for c in history.store.versions if collected_by(repo.store, "m", ObjectId(c)) == pid}
    assert collected == candidate_commits(doc) == {history.old1, history.old2}
    assert all(repo.store.has("m", ObjectId(c)) for c in (history.keep1, history.keep2))


# -- the command line (real clock: plan with --retention-days 0 --grace-days 0) ---------------


@pytest.fixture
def cli_history(repo: Repo, tmp_path: Path) -> Repo:
    for i, branch in enumerate(("keep", "old")):
        d = tmp_path / f"src{i}"
        d.mkdir()
        for name, data in random_files(i).items():
            (d / name).write_bytes(data)
        repo.commit(d, branch, f"{branch} run")
    repo.delete_branch("old")
    return repo


def _plan(cli) -> str:
    proc = cli("gc", "plan", "--retention-days", "0", "--grace-days", "0")
    (proof,) = proofs_dir(cli.store).glob("*.json")
    assert proof.stem[:7] in proc.stdout.decode()
    return proof.stem


def test_cli_gc_plan_prints_the_summary_and_the_proof_id(cli_history: Repo, cli):
    proc = cli("gc", "plan", "--retention-days", "0", "--grace-days", "0")
    out = proc.stdout.decode()
    (proof,) = proofs_dir(cli.store).glob("*.json")
    pid = proof.stem
    assert f"gc proof {pid[:7]}: 1 commit," in out
    assert "old deleted 0 days ago" in out
    assert "roots: 1 branches" in out
    assert f"mstore gc apply {pid[:7]}" in out


@pytest.mark.parametrize("typed", [b"0000000\n", b"\n", b""], ids=["wrong-id", "empty", "eof"])
def test_cli_gc_apply_without_yes_aborts_on_a_wrong_typed_id_and_deletes_nothing(cli_history: Repo, cli, typed):
    pid = _plan(cli)
    packs = snapshot_dir(cli.store / "packs")

    proc = cli("gc", "apply", pid[:7], input=typed, check=False)

    assert proc.returncode == 130
    assert "aborted" in proc.stderr.decode()
    assert snapshot_dir(cli.store / "packs") == packs
    assert cli_history.gc_log() == []
    assert not (trash_dir(cli.store) / pid).exists()


def test_cli_gc_apply_applies_when_the_proof_id_is_typed(cli_history: Repo, cli):
    pid = _plan(cli)
    proc = cli("gc", "apply", pid[:7], input=pid[:9].encode() + b"\n")
    assert f"applied {pid[:7]}" in proc.stdout.decode()
    assert [e["action"] for e in cli_history.gc_log()] == ["applied"]


def test_cli_gc_apply_with_yes_applies_without_asking(cli_history: Repo, cli):
    pid = _plan(cli)
    before = cli_history.stored_bytes()

    proc = cli("gc", "apply", pid, "--yes", input=b"")

    assert f"applied {pid[:7]}" in proc.stdout.decode()
    assert f"mstore gc undo {pid[:7]}" in proc.stdout.decode()
    assert [(e["action"], e["proof"]) for e in cli_history.gc_log()] == [("applied", pid)]
    assert cli_history.stored_bytes() < before


def test_cli_gc_verify_exits_8_on_an_invalid_proof(cli_history: Repo, cli):
    pid = _plan(cli)
    assert cli("gc", "verify", pid).returncode == 0
    cli_history.delete_branch("keep")

    proc = cli("gc", "verify", pid, check=False)

    assert proc.returncode == 8
    assert f"proof {pid[:7]} is not valid now" in proc.stdout.decode()
    assert "ref keep was deleted" in proc.stdout.decode()


def test_cli_gc_purge_help_says_it_is_the_point_of_no_return(cli):
    proc = cli("gc", "purge", "--help")
    assert "POINT OF NO RETURN" in proc.stdout.decode()
