"""A repository keeps one set of worker threads (and their buffers) for its commits and checkouts."""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from mstore import Repo
from tests.conftest import tree_bytes, write_safetensors


def _series(repo: Repo, work, n: int = 3) -> list:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 128)).astype(np.float32)
    dirs = []
    for v in range(n):
        w = w - 1e-3 * rng.standard_normal(w.shape).astype(np.float32)
        d = work / f"v{v}"
        write_safetensors(d / "model.safetensors", {"w": w, "b": np.full(128, v, dtype=np.float32)})
        repo.commit(d, "run", f"v{v}")
        dirs.append(d)
    return dirs


def _workers() -> set[int]:
    return {t.ident for t in threading.enumerate() if t.name.startswith("mstore-worker")}


def test_commits_and_checkouts_of_one_repository_run_on_the_same_worker_threads_until_close(tmp_path):
    before = _workers()  # other tests' repositories may still hold theirs
    repo = Repo.init(tmp_path / "store")
    _series(repo, tmp_path / "work")
    mine = _workers() - before
    repo.checkout("run~1", tmp_path / "a")
    repo.checkout("run", tmp_path / "b")
    assert mine and _workers() - before == mine
    repo.close()
    assert not _workers() & mine


def test_checkouts_from_two_threads_of_one_repository_are_each_bit_exact(tmp_path):
    repo = Repo.init(tmp_path / "store")
    dirs = _series(repo, tmp_path / "work")
    errors: list[BaseException] = []

    def out(i: int) -> None:
        try:
            for k in range(3):
                repo.checkout(f"run~{2 - i}", tmp_path / f"t{i}-{k}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=out, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for i in range(3):
        for k in range(3):
            assert tree_bytes(tmp_path / f"t{i}-{k}") == tree_bytes(dirs[i])
    repo.close()


def test_a_forked_child_checks_out_with_workers_of_its_own(tmp_path):
    repo = Repo.init(tmp_path / "store")
    dirs = _series(repo, tmp_path / "work")
    repo.checkout("run", tmp_path / "parent")  # the parent's workers exist now
    pid = os.fork()
    if pid == 0:  # the child: the parent's threads are not here; a checkout must not wait for them
        code = 1
        try:
            repo.checkout("run~1", tmp_path / "child")
            code = 0 if tree_bytes(tmp_path / "child") == tree_bytes(dirs[1]) else 3
        finally:
            os._exit(code)
    start = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - start > 60:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child's checkout hung")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    repo.close()
