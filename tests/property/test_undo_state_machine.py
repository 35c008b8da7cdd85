"""Property: whatever sequence of commits, deletes, restores and tags happens, every version any
ref ever pointed to is still in the reflog and checks out bit-exact."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mstore import Repo
from tests.conftest import tree_bytes

BRANCHES = ("exp1", "exp2", "runs/a")


class UndoMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="mstore-undo-"))
        self.repo = Repo.init(self.tmp / "store")
        self.content: dict[str, dict[str, bytes]] = {}  # commit id -> files
        self.counter = 0

    def teardown(self):
        self.repo.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @rule(branch=st.sampled_from(BRANCHES), payload=st.binary(min_size=0, max_size=3000), nfiles=st.integers(1, 3))
    def commit(self, branch, payload, nfiles):
        self.counter += 1
        src = self.tmp / f"src{self.counter}"
        src.mkdir()
        files = {}
        for i in range(nfiles):
            data = payload[i:] + bytes([self.counter % 256])
            (src / f"f{i}.bin").write_bytes(data)
            files[f"f{i}.bin"] = data
        # Guards would (rightly) refuse some random shrinks; this property is about refs.
        res = self.repo.commit(src, branch, f"c{self.counter}", allow_regression=True)
        self.content[str(res.id)] = files

    @precondition(lambda self: self.repo.branches())
    @rule(data=st.data())
    def delete(self, data):
        b = data.draw(st.sampled_from([b.name for b in self.repo.branches()]))
        self.repo.delete_branch(b)

    @precondition(lambda self: any(self.repo.head(b) is None and self._logged(b) for b in BRANCHES))
    @rule(data=st.data())
    def restore_deleted(self, data):
        b = data.draw(st.sampled_from([b for b in BRANCHES if self.repo.head(b) is None and self._logged(b)]))
        self.repo.restore(b)

    @precondition(lambda self: any(self.repo.head(b) is not None and len(self.repo.reflog(b)) > 1 for b in BRANCHES))
    @rule(data=st.data())
    def restore_earlier(self, data):
        b = data.draw(
            st.sampled_from([b for b in BRANCHES if self.repo.head(b) is not None and len(self.repo.reflog(b)) > 1])
        )
        entries = self.repo.reflog(b)
        n = data.draw(st.integers(1, len(entries) - 1))
        if entries[n]["new"] is None:
            return  # that position is a deletion: nothing to restore to
        self.repo.restore(f"{b}@{{{n}}}", as_name=None)

    @precondition(lambda self: self.repo.branches())
    @rule(data=st.data())
    def tag(self, data):
        b = data.draw(st.sampled_from([b.name for b in self.repo.branches()]))
        self.counter += 1
        self.repo.create_tag(f"t{self.counter}", b)

    def _logged(self, branch):
        try:
            return bool(self.repo.reflog(branch))
        except Exception:
            return False

    @invariant()
    def every_version_ever_pointed_to_is_in_the_reflog_and_checks_out(self):
        listed = set()
        for e in self.repo.reflog():
            listed.update(v for v in (e["old"], e["new"]) if v)
        assert set(self.content) <= listed
        for cid, files in self.content.items():
            dest = self.tmp / f"co-{self.counter}-{cid[:8]}"
            self.repo.checkout(cid, dest)
            assert tree_bytes(dest) == files
            shutil.rmtree(dest)


UndoMachine.TestCase.settings = settings(
    max_examples=12, stateful_step_count=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestUndoStateMachine = UndoMachine.TestCase
