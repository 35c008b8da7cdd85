"""A repository keeps one set of worker threads (and their buffers) for its commits and checkouts."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

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


def test_commits_and_checkouts_of_one_repository_run_on_the_same_worker_threads_until_close(tmp_path, monkeypatch):
    from mstore import snapshot

    ran: dict[str, set[int]] = {"commit": set(), "checkout": set()}
    for cls, name, op in ((snapshot.Ingest, "_work", "commit"), (snapshot.Checkout, "_decode", "checkout")):
        def record(self, *args, _task=getattr(cls, name), _op=op, **kw):
            ran[_op].add(threading.get_ident())
            return _task(self, *args, **kw)

        monkeypatch.setattr(cls, name, record)
    before = _workers()  # other tests' repositories may still hold theirs
    repo = Repo.init(tmp_path / "store")
    _series(repo, tmp_path / "work")
    mine = _workers() - before
    repo.checkout("run~1", tmp_path / "a")
    repo.checkout("run", tmp_path / "b")
    assert mine and _workers() - before == mine
    assert ran["commit"] and ran["checkout"] and ran["commit"] | ran["checkout"] <= mine
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
    assert not any(t.is_alive() for t in threads), "a checkout hung"
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


def _twelve_tensors(path, seed: int):
    rng = np.random.default_rng(seed)
    write_safetensors(path / "model.safetensors",
                      {f"t{i}": rng.standard_normal((64, 64)).astype(np.float32) for i in range(12)})
    return path


def _record_task_starts(monkeypatch, cls, name: str) -> list[float]:
    """Slow down the worker task ``cls.name`` and record when each one starts.

    The pool is pinned to two workers, so that some of the 13 tasks are still queued when the
    interrupt comes, whatever the machine's core count.
    """
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    started: list[float] = []
    task = getattr(cls, name)

    def slow(self, *args, **kw):
        started.append(time.monotonic())
        time.sleep(0.05)
        return task(self, *args, **kw)

    monkeypatch.setattr(cls, name, slow)
    return started


def _ctrl_c_at_second_progress():
    """A progress callback that raises KeyboardInterrupt (the user's Ctrl-C) on its second call."""
    calls = []

    def progress(n: int) -> None:
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt

    return progress


def _interrupted(call) -> float:
    """Run ``call``, which must be interrupted, and return when it returned."""
    with pytest.raises(KeyboardInterrupt):
        call()
    returned = time.monotonic()
    time.sleep(0.3)  # long enough for any task left queued to start
    return returned


def test_no_chunk_is_decoded_after_a_failed_checkout_returns(tmp_path, monkeypatch):
    # The workers outlive the checkout: a task still queued when it fails would decode into a
    # buffer of the repository's that the next checkout may be using.
    from mstore import snapshot

    started = _record_task_starts(monkeypatch, snapshot.Checkout, "_decode")
    repo = Repo.init(tmp_path / "store")
    repo.commit(_twelve_tensors(tmp_path / "big", 1), "run", "twelve tensors")
    returned = _interrupted(lambda: repo.checkout("run", tmp_path / "out", progress=_ctrl_c_at_second_progress()))
    assert 0 < len(started) < 13  # some tasks were still queued when it failed
    assert max(started) <= returned  # no task began after the checkout returned
    assert not (tmp_path / "out" / "model.safetensors").exists()
    repo.close()


def test_no_piece_is_encoded_after_a_failed_commit_returns(tmp_path, monkeypatch):
    from mstore import snapshot

    started = _record_task_starts(monkeypatch, snapshot.Ingest, "_work")
    repo = Repo.init(tmp_path / "store")
    d = _twelve_tensors(tmp_path / "big", 2)
    returned = _interrupted(lambda: repo.commit(d, "run", "interrupted", progress=_ctrl_c_at_second_progress()))
    assert 0 < len(started) < 13  # some tasks were still queued when it failed
    assert max(started) <= returned
    assert repo.head("run") is None  # nothing was committed
    repo.close()


def test_a_closed_repository_refuses_to_start_workers_again(tmp_path):
    from mstore import UserError

    repo = Repo.init(tmp_path / "store")
    _series(repo, tmp_path / "work", n=1)
    repo.close()
    with pytest.raises(UserError, match="closed"):
        repo._worker_pool()


def test_a_repository_keeps_at_most_eight_workers_whatever_the_cores(tmp_path, monkeypatch):
    from mstore import repo as repo_mod

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    repo = Repo.init(tmp_path / "store")
    assert repo._worker_pool()._max_workers == repo_mod.MAX_WORKERS == 8
    repo.close()


def test_chunks_decoded_out_of_order_are_each_written_at_their_own_offset(tmp_path, monkeypatch):
    # The first chunk's decode is held back, so the ones after it finish (and are written)
    # first; the file must still come out whole and in order.
    from mstore import snapshot

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # two workers, whatever the machine
    real = snapshot.Checkout._decode
    order: list[int] = []

    def held_first(self, cid, entry, n, buf, _seen=[]):  # noqa: B006 - shared on purpose
        first = not _seen
        _seen.append(cid)
        if first:
            time.sleep(0.3)
        view = real(self, cid, entry, n, buf)
        order.append(len(_seen) if not first else 0)
        return view

    repo = Repo.init(tmp_path / "store")
    src = _twelve_tensors(tmp_path / "v", 3)
    repo.commit(src, "run", "twelve tensors")
    monkeypatch.setattr(snapshot.Checkout, "_decode", held_first)
    repo.checkout("run", tmp_path / "out")
    assert order[0] != 0 and 0 in order  # something finished before the first chunk
    assert tree_bytes(tmp_path / "out") == tree_bytes(src)
    repo.close()
