"""Property: whatever sequence of commits, branch deletes, restores, time passing, gc plans,
applies and undos happens, gc never takes a version anyone can still reach.

The machine keeps its own model of refs and the reflog (with times) and the source bytes of every
commit it made. After every step, every commit reachable from a ref or from a reflog entry inside
the 30-day retention window (following parents) checks out bit-exact, fsck is clean, and exactly
the commits applied proofs collected (and not undone) are missing from the store. A commit a proof
collected must not have been reachable when the proof was applied, and a proof planned before the
state changed (or too long ago) is refused without changing anything.

Commits are random files, or safetensors checkpoints whose tensors move a little (stored as
deltas against the branch's previous checkpoint) or copy a recent checkpoint of any branch (so
one history re-uses delta chunks whose bases only another, deleted history reaches): gc must
follow deltas to their bases. (Without that, the machine fails on its first plan and apply.)
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mstore import Repo
from mstore.gc import GcRefused, collected_by
from mstore.hashing import ObjectId
from tests.conftest import tree_bytes, write_safetensors

BRANCHES = ("exp", "runs/a", "runs/b")
DAY = 86400.0
HOUR = 3600.0
RETENTION = 30 * DAY  # the default policy
MAX_PROOF_AGE = 3600.0

# The files of one commit: (store bytes of an earlier version again?, seed, size) per file.
FILES = st.lists(st.tuples(st.booleans(), st.integers(0, 2**32 - 1), st.integers(500, 4000)), min_size=1, max_size=4)


class GcMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="mstore-gc-"))
        self.now = 1_000_000_000.0
        self.repo = Repo.init(self.tmp / "store", clock=lambda: self.now)
        self.files: dict[str, dict[str, bytes]] = {}  # commit id -> its source files
        self.parent: dict[str, str | None] = {}
        self.heads: dict[str, str] = {}
        self.reflog: list[tuple[str, str | None, str | None, float]] = []  # ref, old, new, time
        self.pool: list[bytes] = []  # earlier file contents, to store again in later commits
        self.collected: set[str] = set()  # commits applied proofs took and no undo brought back
        self.undo_stack: list[tuple[str, set[str]]] = []
        self.proofs: list[tuple[str, int, float]] = []  # (id, state epoch, created) of every plan
        self.applied: set[str] = set()
        self.epoch = 0  # bumped by every ref change
        self.counter = 0
        self.weights: dict[str, dict[str, np.ndarray]] = {}  # branch -> its latest checkpoint's tensors
        self.checkpoints: list[dict[str, np.ndarray]] = []  # every checkpoint's tensors, to copy

    def teardown(self):
        self.repo.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the model ---------------------------------------------------------------------------
    def reachable(self) -> set[str]:
        """Commits reachable from refs and reflog entries inside the retention window."""
        roots = set(self.heads.values())
        for _ref, old, new, t in self.reflog:
            if t >= self.now - RETENTION:
                roots.update(v for v in (old, new) if v)
        out: set[str] = set()
        stack = list(roots)
        while stack:
            c = stack.pop()
            if c in out:
                continue
            out.add(c)
            p = self.parent[c]
            if p is not None:
                stack.append(p)
        return out

    def restorable(self) -> list[str]:
        """Deleted branches whose last commit is still stored."""
        out = []
        for b in BRANCHES:
            if b in self.heads:
                continue
            last = [old for ref, old, _new, _t in self.reflog if ref == b]
            if last and last[-1] not in self.collected:
                out.append(b)
        return out

    def stale_proofs(self) -> list[str]:
        """Proofs that apply must refuse: the refs moved since, they are too old, or already applied."""
        return [
            pid
            for pid, epoch, created in self.proofs
            if epoch != self.epoch or self.now - created > MAX_PROOF_AGE or pid in self.applied
        ]

    # -- rules -------------------------------------------------------------------------------
    @initialize(first=FILES, second=FILES, third=FILES, age=st.integers(31 * 24, 40 * 24))
    def a_month_old_history_with_a_deleted_branch(self, first, second, third, age):
        self.commit(BRANCHES[0], first)
        self.commit(BRANCHES[1], second)
        self.commit(BRANCHES[2], third)
        # Two checkpoints on the branch about to be deleted: the second holds deltas whose bases
        # only that branch's history reaches; a copy of it on another branch re-uses those deltas.
        self.checkpoint(BRANCHES[2], False, age)
        self.checkpoint(BRANCHES[2], False, age + 1)
        self.checkpoint(BRANCHES[0], True, 0)
        self.delete_branch(BRANCHES[2])
        self.advance_time(age)

    @rule(branch=st.sampled_from(BRANCHES), specs=FILES)
    def commit(self, branch, specs):
        self.counter += 1
        src = self.tmp / f"src{self.counter}"
        src.mkdir()
        files = {}
        for i, (reuse, seed, size) in enumerate(specs):
            rng = random.Random(seed)
            if reuse and self.pool:
                data = rng.choice(self.pool)  # the same bytes as an earlier version: shared chunks
            else:
                data = rng.randbytes(size)
                self.pool.append(data)
            (src / f"f{i}.bin").write_bytes(data)
            files[f"f{i}.bin"] = data
        res = self.repo.commit(src, branch, f"c{self.counter}", allow_regression=True)
        shutil.rmtree(src)
        cid = str(res.id)
        self.files[cid] = files
        self.parent[cid] = self.heads.get(branch)
        self.reflog.append((branch, self.heads.get(branch), cid, self.now))
        self.heads[branch] = cid
        self.epoch += 1

    @rule(branch=st.sampled_from(BRANCHES), copy=st.booleans(), seed=st.integers(0, 2**32 - 1))
    def checkpoint(self, branch, copy, seed):
        """A safetensors checkpoint: the branch's weights moved a little (stored as deltas
        against its previous checkpoint), or exactly an earlier checkpoint of any branch (its
        chunks, deltas included, re-used by a history that does not hold their bases)."""
        rng = np.random.default_rng(seed)
        if copy and self.checkpoints:
            recent = min(3, len(self.checkpoints))  # recent checkpoints are the ones with deltas
            weights = self.checkpoints[-1 - int(rng.integers(recent))] if seed else self.checkpoints[-1]
        else:
            prev = self.weights.get(branch) or {
                f"w{i}": (rng.standard_normal((24, 40)) * 0.02).astype(np.float32) for i in range(3)
            }
            weights = {k: (v - 1e-4 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in prev.items()}
            self.checkpoints.append(weights)
        self.weights[branch] = weights
        self.counter += 1
        src = self.tmp / f"src{self.counter}"
        write_safetensors(src / "model.safetensors", weights)
        data = (src / "model.safetensors").read_bytes()
        res = self.repo.commit(src, branch, f"checkpoint {self.counter}", allow_regression=True)
        shutil.rmtree(src)
        cid = str(res.id)
        with self.repo.open_file(f"{cid}:model.safetensors") as f:
            codecs_used = {self.repo.store.entry("c", c).codec for c, _n in f.fobj.chunks}
        event("a checkpoint holds delta chunks" if 3 in codecs_used else "a checkpoint stored whole")
        self.files[cid] = {"model.safetensors": data}
        self.parent[cid] = self.heads.get(branch)
        self.reflog.append((branch, self.heads.get(branch), cid, self.now))
        self.heads[branch] = cid
        self.epoch += 1

    @precondition(lambda self: self.heads)
    @rule(data=st.data())
    def delete(self, data):
        self.delete_branch(data.draw(st.sampled_from(sorted(self.heads))))

    def delete_branch(self, b):
        self.repo.delete_branch(b)
        self.reflog.append((b, self.heads.pop(b), None, self.now))
        self.epoch += 1

    @precondition(lambda self: self.restorable())
    @rule(data=st.data())
    def restore(self, data):
        b = data.draw(st.sampled_from(self.restorable()))
        target = [old for ref, old, _new, _t in self.reflog if ref == b][-1]
        res = self.repo.restore(b)
        assert str(res.new) == target
        self.heads[b] = target
        self.reflog.append((b, None, target, self.now))
        self.epoch += 1
        event("restore")

    @rule(hours=st.one_of(st.integers(1, 48), st.integers(25 * 24, 40 * 24)))
    def advance_time(self, hours):
        self.now += hours * HOUR

    @rule(apply=st.sampled_from([True, True, False]))
    def plan(self, apply):
        reachable = self.reachable()
        pid, doc = self.repo.gc_plan()
        self.proofs.append((pid, self.epoch, self.now))
        taken = {o[1] for g in doc["groups"] for o in g["objects"] if o[0] == "m"}
        assert not taken & reachable, "plan lists a reachable commit"
        assert not taken & self.collected, "plan lists a commit that is already collected"
        if not apply:
            return  # kept to be applied later, when it must be refused
        if pid in self.applied:
            # The same state planned at the same instant is the same proof, applied already.
            with pytest.raises(GcRefused, match="already"):
                self.repo.gc_apply(pid)
            return

        res = self.repo.gc_apply(pid)

        assert res.objects == doc["candidates"]["objects"]
        self.applied.add(pid)
        now_collected = {c for c in self.files if collected_by(self.repo.store, "m", ObjectId(c)) == pid}
        assert now_collected == taken
        assert not now_collected & reachable, "gc collected a commit that was reachable at apply time"
        self.collected |= now_collected
        self.undo_stack.append((pid, now_collected))
        event("apply collected commits" if now_collected else "apply collected no commit")

    @precondition(lambda self: self.stale_proofs())
    @rule(data=st.data())
    def apply_stale_proof(self, data):
        pid = data.draw(st.sampled_from(self.stale_proofs()))
        _pid, epoch, created = next(p for p in self.proofs if p[0] == pid)
        entries = sorted((k, str(i), e.pack, e.offset) for k, i, e in self.repo.store.iter_entries())
        log = self.repo.gc_log()
        with pytest.raises(GcRefused) as refused:
            self.repo.gc_apply(pid)
        reasons = refused.value.reasons
        if pid in self.applied:
            assert any("already" in r for r in reasons), reasons
        if self.now - created > MAX_PROOF_AGE:
            assert any("minutes old" in r for r in reasons), reasons
        if epoch != self.epoch:
            assert any(r.startswith("ref ") or "reflog" in r for r in reasons), reasons
        assert sorted((k, str(i), e.pack, e.offset) for k, i, e in self.repo.store.iter_entries()) == entries
        assert self.repo.gc_log() == log
        event("stale proof refused")

    @precondition(lambda self: self.undo_stack)
    @rule()
    def undo_last_apply(self):
        pid, ids = self.undo_stack.pop()
        self.repo.gc_undo(pid)
        self.collected -= ids
        assert all(self.repo.store.has("m", ObjectId(c)) for c in ids)
        event("undo brought commits back" if ids else "undo of an empty apply")

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def every_reachable_version_checks_out_bit_exact(self):
        for cid in sorted(self.reachable()):
            assert cid not in self.collected
            self.counter += 1
            dest = self.tmp / f"co{self.counter}"
            self.repo.checkout(cid, dest)
            assert tree_bytes(dest) == self.files[cid], cid
            shutil.rmtree(dest)

    @invariant()
    def branches_are_where_the_model_says(self):
        assert {b.name: str(b.id) for b in self.repo.branches()} == self.heads

    @invariant()
    def exactly_the_collected_commits_are_missing(self):
        missing = {c for c in self.files if not self.repo.store.has("m", ObjectId(c))}
        assert missing == self.collected

    @invariant()
    def fsck_is_clean(self):
        report = self.repo.fsck()
        assert report.ok, report.to_dict()


# Every step fsyncs packs and the index, so shrinking a failure (hundreds of re-runs) would take
# minutes: a failure is reported as generated, at most 20 steps.
GcMachine.TestCase.settings = settings(
    max_examples=10,
    stateful_step_count=20,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
TestGcStateMachine = GcMachine.TestCase
