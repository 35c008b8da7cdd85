"""Crash safety of gc apply: a process killed (SIGKILL) at any point of applying a proof leaves a
store that opens, passes fsck and checks out every live version bit-exact; the proof then either
applies again or is reported as already applied, and the store is still consistent afterwards.

One store is built once: several versions of a few hundred KB, each in its own pack, on a kept
branch, two branches deleted 40 days ago (the candidates, spread over eight packs, one of them
also holding a chunk a live version re-uses) and a branch deleted 5 days ago (live through the
reflog). One proof is planned. Every trial copies that store and runs a child process that
applies the proof and is killed: at every crash-hook call in turn (before copying, after each
pack, after copying, after the index transaction, after each retired pack is unlinked), and at
seeded random moments.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import mstore
from mstore import Repo
from mstore.gc import GcRefused, collected_by
from mstore.hashing import ObjectId
from tests.conftest import tree_bytes

pytestmark = pytest.mark.slow

DAY = 86400.0
T0 = 1_000_000_000.0
NOW = T0 + 40 * DAY
SEED = 20251122
RANDOM_KILLS = 10

# Applies the proof; crash_hook prints each point and SIGKILLs the process at call number KILL_AT
# (0: never). "ready" once the store is open; "done SECONDS" when apply returned, SECONDS counted
# from the first hook call (where apply starts writing).
CHILD = """\
import os, signal, sys, time
from mstore import Repo

store, now, proof, kill_at = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
calls = 0
start = None

def hook(point):
    global calls, start
    calls += 1
    if start is None:
        start = time.monotonic()
    print(point, flush=True)
    if calls == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

repo = Repo.open(store, clock=lambda: now)
print("ready", flush=True)
repo.gc_apply(proof, crash_hook=hook)
print(f"done {time.monotonic() - start}", flush=True)
"""


def version_files(n: int) -> dict[str, bytes]:
    rng = random.Random(SEED + n)
    return {
        "tokenizer.bin": random.Random(SEED).randbytes(32 << 10),  # the same in every version
        "model.bin": rng.randbytes(200 << 10),
        "optimizer.bin": rng.randbytes(64 << 10),
    }


@dataclass
class Built:
    store: Path
    proof: str
    live: dict[str, dict[str, bytes]]  # commit id -> files, for every version that must survive
    collected: set[str]  # the proof's candidate commits
    retired_packs: set[str]  # pack files that held a candidate before apply


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    base = tmp_path_factory.mktemp("gc-crash")
    clock = [T0]
    repo = Repo.init(base / "store", clock=lambda: clock[0])
    versions: dict[str, dict[str, bytes]] = {}

    def commit(branch: str, n: int, files: dict[str, bytes] | None = None) -> str:
        files = files or version_files(n)
        src = base / "src" / f"v{n}"
        src.mkdir(parents=True)
        for name, data in files.items():
            (src / name).write_bytes(data)
        cid = str(repo.commit(src, branch, f"version {n}", allow_regression=True).id)
        versions[cid] = files
        return cid

    live = [commit("main", n) for n in range(3)]
    dead = [commit("exp-a", n) for n in range(3, 7)] + [commit("exp-b", n) for n in range(7, 11)]
    repo.delete_branch("exp-a")
    repo.delete_branch("exp-b")
    clock[0] = T0 + 35 * DAY
    live += [commit("exp-c", n) for n in (11, 12)]
    repo.delete_branch("exp-c")  # 5 days before NOW: inside the retention window
    # A live version that re-uses the weights of a deleted one: its pack holds live and dead records.
    live.append(commit("main", 13, {**version_files(13), "model.bin": version_files(5)["model.bin"]}))
    clock[0] = NOW
    pid, doc = repo.gc_plan()
    cands = {(o[0], o[1]) for g in doc["groups"] for o in g["objects"]}
    retired = {repo.store.pack_name(e.pack) for k, i, e in repo.store.iter_entries() if (k, str(i)) in cands}
    repo.close()

    collected = {o[1] for g in doc["groups"] for o in g["objects"] if o[0] == "m"}
    assert collected == set(dead)
    assert len(retired) == len(dead) == 8
    return Built(base / "store", pid, {c: versions[c] for c in live}, collected, retired)


@dataclass
class Run:
    killed: bool
    points: list[str]
    seconds: float | None  # how long apply took, if it finished


def run_child(store: Path, proof: str, kill_at: int = 0, delay: float | None = None) -> Run:
    """Apply the proof in a child; it kills itself at hook call ``kill_at``, or is killed ``delay``
    seconds after apply started writing (its first hook call)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSTORE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(mstore.__file__).parent.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(store), repr(NOW), proof, str(kill_at)],
        cwd=store.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines = []
    if delay is not None:
        assert proc.stdout is not None
        while not lines or lines[-1] != "before-copy":
            line = proc.stdout.readline()
            assert line, proc.communicate()
            lines.append(line.rstrip("\n"))
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    lines += out.splitlines()
    killed = proc.returncode == -signal.SIGKILL
    assert killed or proc.returncode == 0, f"apply failed on its own ({proc.returncode}):\n{err}"
    done = [line for line in lines if line.startswith("done ")]
    return Run(killed, [p for p in lines if p not in ("ready",) and not p.startswith("done ")],
               float(done[0].split()[1]) if done else None)


def check_live_versions(repo: Repo, built: Built, dest: Path) -> None:
    for i, (cid, files) in enumerate(sorted(built.live.items())):
        out = dest / f"{i}"
        repo.checkout(cid, out)
        assert tree_bytes(out) == files, f"live version {cid[:7]} is not bit-exact"
        shutil.rmtree(out)


def check_after_kill(built: Built, store: Path, where: str) -> None:
    """The store as a user finds it after the crash, and after applying the proof again."""
    repo = Repo.open(store, clock=lambda: NOW)
    try:
        report = repo.fsck()
        assert report.ok, (where, report.to_dict())
        check_live_versions(repo, built, store.parent / "checkout")

        verdict = repo.gc_verify(built.proof)
        if verdict.status == "applied":
            assert "the proof was already applied" in verdict.reasons, (where, verdict.reasons)
            with pytest.raises(GcRefused, match="already applied"):
                repo.gc_apply(built.proof)  # finishes removing the retired packs
        else:
            assert verdict.status is None and verdict.valid, (where, verdict.reasons)
            res = repo.gc_apply(built.proof)
            assert res.objects > 0

        report = repo.fsck()
        assert report.ok, (where, report.to_dict())
        check_live_versions(repo, built, store.parent / "checkout-again")
        for cid in built.collected:
            assert not repo.store.has("m", ObjectId(cid)), where
            assert collected_by(repo.store, "m", ObjectId(cid)) == built.proof, where
        left = built.retired_packs & {p.name for p in (store / "packs").iterdir()}
        assert not left, (where, f"retired packs still in packs/: {sorted(left)}")
    finally:
        repo.close()


def fresh_copy(built: Built, tmp_path: Path, name: str) -> Path:
    dest = tmp_path / name / "store"
    shutil.copytree(built.store, dest)
    return dest


def test_gc_apply_killed_at_any_point_loses_nothing_and_can_be_completed(built: Built, tmp_path: Path):
    # Uninterrupted, to learn every hook call and how long apply takes to write.
    calibration = run_child(fresh_copy(built, tmp_path, "calibration"), built.proof)
    assert not calibration.killed and calibration.seconds is not None
    points = calibration.points
    assert points[0] == "before-copy" and "after-commit" in points
    assert points.count("copy-pack") == points.count("unlinked-one") == len(built.retired_packs)

    kills: list[str] = []
    for n, point in enumerate(points, start=1):
        store = fresh_copy(built, tmp_path, f"hook{n}")
        run = run_child(store, built.proof, kill_at=n)
        assert run.killed, f"the child was not killed at hook call {n} ({point})"
        assert run.points == points[:n]
        where = f"hook call {n}: {point}"
        check_after_kill(built, store, where)
        kills.append(where)

    rng = random.Random(SEED)
    for i in range(RANDOM_KILLS):
        store = fresh_copy(built, tmp_path, f"random{i}")
        delay = rng.uniform(0.0, 1.5 * calibration.seconds)
        run = run_child(store, built.proof, delay=delay)
        where = f"random kill after {delay * 1000:.1f} ms (last point: {run.points[-1] if run.points else 'none'})"
        check_after_kill(built, store, where)
        if run.killed:
            kills.append(where)

    assert len(kills) >= 20, kills
