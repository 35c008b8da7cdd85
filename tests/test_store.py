"""The object store under the repository: packs, the index and the write order."""

from __future__ import annotations

import os

import pytest

from mstore import Repo, UserError
from mstore.format import read_config, write_config
from tests.conftest import tree_bytes


def _small_packs_repo(tmp_path, max_size: int) -> Repo:
    repo = Repo.init(tmp_path / "s")
    cfg = read_config(repo.root)
    cfg.data["packs"]["max_size"] = max_size
    write_config(repo.root, cfg)
    repo.close()
    return Repo.open(tmp_path / "s")


def test_a_commit_spanning_many_packs_registers_each_and_checks_out_bit_exact(tmp_path):
    repo = _small_packs_repo(tmp_path, 100_000)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"f{i}.bin").write_bytes(os.urandom(150_000))
    repo.commit(src, "b", "many packs")
    packs = sorted(p.name for p in (repo.root / "packs").iterdir())
    with repo.store.index.read() as txn:
        registered = sorted(rec["name"] for _n, rec in txn.iter_packs())
    assert len(packs) >= 10 and registered == packs
    repo.checkout("b", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(src)
    assert repo.fsck().ok
    repo.close()


def test_an_aborted_commit_leaves_no_pack_behind(tmp_path):
    repo = Repo.init(tmp_path / "s")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(10_000))
    os.mkfifo(src / "z.fifo")  # not a regular file: the commit fails after storing a.bin's chunks
    with pytest.raises(UserError, match="not a regular file"):
        repo.commit(src, "b", "x")
    assert list((repo.root / "packs").iterdir()) == []
    assert repo.branches() == []
    repo.close()


FORK_SCRIPT = """
import os, sys
from pathlib import Path
from mstore import Repo
root = Path(sys.argv[1])
repo = Repo.init(root / "store")
(root / "d").mkdir()
(root / "d" / "a.txt").write_text("hello")
head = repo.commit(root / "d", "main", "one").id
pid = os.fork()
if pid == 0:
    if sys.argv[2] in ("reads", "close"):
        assert repo.head("main") == head  # through an environment of the child's own
    if sys.argv[2] == "close":
        repo.close()
    sys.exit(0)  # a normal exit: the interpreter frees (and so would close) what the child holds
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
assert repo.head("main") == head
print(len(list(repo.log("main"))))
"""


@pytest.mark.parametrize("child", ["exits", "reads", "close"])
def test_a_forked_child_that_reads_or_closes_the_repository_leaves_the_parents_index_readable(tmp_path, child):
    # Closing an inherited LMDB environment frees the parent's reader slots (MDB_BAD_RSLOT on
    # the parent's next read), and LMDB forbids using one after fork: a child that reads opens
    # its own, and never closes the parent's.
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, str(tmp_path), child], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
