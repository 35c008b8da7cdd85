"""Racing pushers and killed pushers never lose a commit or leave a ref to missing objects.

Real child processes, against a second directory and the real S3 server: four pushers race on
one remote branch; a pusher is SIGKILLed at every step of a push (a crash hook, like the crash
tests in tests/crash/) and the push is re-run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from mstore import Repo
from mstore.remote import is_ancestor, list_refs, load_catalog
from mstore.storage.backends import open_backend
from tests.conftest import ROOT, tree_bytes
from tests.remote.conftest import add_remote, checkpoint

pytestmark = pytest.mark.slow

PUSHER = """\
import sys, time
from pathlib import Path
from mstore import Repo
from mstore.errors import PushRejected
sys.path.insert(0, sys.argv[4])
from tests.remote.conftest import checkpoint

store, me, start_file = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
repo = Repo.open(store)
while not start_file.exists():
    time.sleep(0.005)
for n in range(3):
    base = repo.resolve("origin/shared")
    branch = f"w{me}-{n}"
    repo.create_branch(branch, str(base))
    cid = repo.commit(checkpoint(Path(store).parent / f"v{n}", 1000 * me + n + 1), branch, f"{me}/{n}").id
    try:
        repo.push("origin", [f"{branch}:shared"])
        print("ok", cid, flush=True)
    except PushRejected:
        print("rejected", cid, flush=True)
    repo.fetch("origin", ["shared"])
"""

KILLED_PUSH = """\
import os, signal, sys, threading
from mstore import Repo

store, kill_at = sys.argv[1], int(sys.argv[2])
calls = 0
lock = threading.Lock()  # packs upload from two threads

def hook(point):
    global calls
    with lock:
        calls += 1
        print(point, flush=True)
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

repo = Repo.open(store)
repo.push("origin", ["exp1"], crash_hook=hook, pack_target=400 << 10)
print("done", flush=True)
"""


def _env(remote) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSTORE_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_four_racing_pushers_lose_no_commit_and_the_remote_reflog_is_complete(repo, work, tmp_path, remote):
    base = repo.commit(checkpoint(work / "base", 0), "shared", "base").id
    add_remote(repo, remote)
    repo.push("origin", ["shared"])
    stores = []
    for i in range(4):
        clone = Repo.clone(remote["url"], tmp_path / f"p{i}" / ".mstore", endpoint_url=remote.get("endpoint_url"))
        stores.append(clone.root)
        clone.close()
    start = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PUSHER, str(s), str(i), str(start), str(ROOT)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(remote), text=True,
        )
        for i, s in enumerate(stores)
    ]
    time.sleep(0.5)
    start.touch()
    ok, rejected = [], []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        for line in out.splitlines():
            status, cid = line.split()
            (ok if status == "ok" else rejected).append(cid)
    assert len(ok) + len(rejected) == 12 and ok
    repo.fetch("origin")
    head = repo.resolve("origin/shared")
    # No commit lost: each acknowledged push is in the remote head's history.
    for cid in ok:
        assert is_ancestor(repo.store, repo.resolve(cid), head)
    log = repo.remote_reflog("origin", "shared")
    assert [e["seq"] for e in log] == list(range(1, len(ok) + 2))
    assert [e["id"] for e in log] == [base, *[e["id"] for e in log[1:]]]
    assert sorted(e["id"] for e in log[1:]) == sorted(ok)
    assert all(e["old"] == prev["id"] for prev, e in zip(log, log[1:], strict=False))
    assert log[-1]["id"] == head


def _remote_consistent(remote) -> None:
    """Every remote ref's commit reaches only objects the remote lists as present (R2)."""
    backend = open_backend(remote["url"], endpoint_url=remote.get("endpoint_url"))
    refs = list_refs(backend)
    if not refs:
        return
    cat = load_catalog(backend)
    from mstore.reachability import walk
    from mstore.remote import RemoteSource

    class _NoLocal:
        def has(self, kind, oid):
            return False

    src = RemoteSource(_NoLocal(), backend, cat, 1 << 30)
    live = walk(src, [r.id for r in refs.values()])
    assert live.complete and not src.errors, (live.unreadable, src.errors)
    missing = [c for c in live.chunks if not cat.has("c", c.digest)]
    assert missing == []


def test_a_push_killed_at_every_step_leaves_a_consistent_remote_and_completes_when_re_run(
    repo, work, tmp_path, remote
):
    ids = [repo.commit(checkpoint(work / f"ck{s}", s, changed=3), "exp1", f"s{s}").id for s in range(3)]
    add_remote(repo, remote)
    probe = subprocess.run(
        [sys.executable, "-c", KILLED_PUSH, str(repo.root), "0"], capture_output=True, text=True, env=_env(remote),
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    points = probe.stdout.split()[:-1]
    assert len(points) >= 10, points
    for k in range(1, len(points) + 1):
        # A fresh remote per kill point; the probe's remote is replaced by an empty one.
        target = dict(remote)
        target["url"] = remote["url"].rstrip("/") + f"-k{k}"
        repo.remote_remove("origin")
        add_remote(repo, target)
        proc = subprocess.run(
            [sys.executable, "-c", KILLED_PUSH, str(repo.root), str(k)], capture_output=True, text=True,
            env=_env(remote), timeout=120,
        )
        assert proc.returncode == -signal.SIGKILL, (k, proc.stdout, proc.stderr)
        _remote_consistent(target)
        sent_before = _remote_bytes(target)
        again = repo.push("origin", ["exp1"])
        assert repo.remote_refs("origin")[0]["id"] == ids[-1]
        # Resumed: what finished before the kill is not sent again.
        assert again.bytes <= _total_bytes(repo) - _complete_bytes(target, sent_before) + 1
        log = repo.remote_reflog("origin", "exp1")
        assert [e["seq"] for e in log] == list(range(1, len(log) + 1)) and log[-1]["id"] == ids[-1]
    clone = Repo.clone(target["url"], tmp_path / "clone", endpoint_url=target.get("endpoint_url"))
    for s, cid in enumerate(ids):
        clone.checkout(str(cid), tmp_path / f"out{s}")
        assert tree_bytes(tmp_path / f"out{s}") == tree_bytes(work / f"ck{s}")
    clone.close()


def _remote_bytes(target) -> dict:
    backend = open_backend(target["url"], endpoint_url=target.get("endpoint_url"))
    return dict(backend.list("packs/"))


def _complete_bytes(target, listing: dict) -> int:
    """Encoded record bytes in packs that had their index before the re-run."""
    import json

    backend = open_backend(target["url"], endpoint_url=target.get("endpoint_url"))
    total = 0
    for key in listing:
        if key.endswith(".idx"):
            total += sum(r[3] for r in json.loads(backend.get(key))["records"])
    return total


def _total_bytes(repo: Repo) -> int:
    return sum(e.enc_len for _k, _o, e in repo.store.iter_entries())




KILLED_FETCH = """\
import os, signal, sys
from mstore import Repo

store, kill_at = sys.argv[1], int(sys.argv[2])
calls = 0

def hook(point):
    global calls
    calls += 1
    print(point, flush=True)
    if calls == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

repo = Repo.open(store)
repo.fetch("origin", crash_hook=hook)
print("done", flush=True)
"""


def test_a_fetch_killed_at_every_step_leaves_a_sound_store_and_completes_when_re_run(repo, work, tmp_path, remote):
    ids = [repo.commit(checkpoint(work / f"ck{s}", s, changed=3), "exp1", f"s{s}").id for s in range(3)]
    add_remote(repo, remote)
    repo.push("origin", ["exp1"], pack_target=400 << 10)
    points = None
    k = 1
    while points is None or k <= len(points):
        other = Repo.init(tmp_path / (f"f{k}" if points is not None else "probe") / ".mstore")
        add_remote(other, remote)
        proc = subprocess.run(
            [sys.executable, "-c", KILLED_FETCH, str(other.root), str(k if points is not None else 0)],
            capture_output=True, text=True, env=_env(remote), timeout=120,
        )
        if points is None:  # the first run counts the steps
            assert proc.returncode == 0, proc.stderr
            points = proc.stdout.split()[:-1]
            assert len(points) >= 6, points
            other.close()
            continue
        assert proc.returncode == -signal.SIGKILL, (k, proc.stdout, proc.stderr)
        report = other.fsck()
        assert not report.damaged and not report.refs, (k, report.to_dict())
        tracked = other.remote_refs("origin") and dict(other._iter_refs("refs/remotes/"))
        assert tracked.get("refs/remotes/origin/exp1") in (None, ids[-1])
        other.fetch("origin")
        assert other.resolve("origin/exp1") == ids[-1]
        other.checkout("origin/exp1", tmp_path / f"out{k}")
        assert tree_bytes(tmp_path / f"out{k}") == tree_bytes(work / "ck2")
        other.close()
        k += 1
