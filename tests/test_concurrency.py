"""Concurrent writers: real processes racing on one store, through the API and the real CLI.

A branch moves by compare-and-swap inside the index transaction, so of writers racing on one
branch each commit either lands on it or its writer is told it lost (``RefConflict``, exit code
4 from the CLI). Nothing in between: no commit silently vanishes, none appears unannounced.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from mstore import Repo

WRITERS = 4
COMMITS_PER_WRITER = 5

# One racing writer: opens the store, waits at the barrier, then makes its commits (no retry),
# printing one line per attempt: "ok <id> <dir>" or "conflict <ref> <actual head>". Any other
# exception escapes, and the non-zero exit fails the test.
RACER = """\
import sys
import time
from pathlib import Path

from mstore import RefConflict, Repo

store, branch, barrier, name = sys.argv[1:5]
repo = Repo.open(store)
Path(barrier, name + ".ready").touch()
go = Path(barrier, "go")
while not go.exists():
    time.sleep(0.001)
for d in sys.argv[5:]:
    try:
        res = repo.commit(d, branch, f"{name}: {Path(d).name}", meta={"writer": name}, cwd=barrier)
    except RefConflict as exc:
        print("conflict", exc.ref, exc.actual, flush=True)
    else:
        print("ok", res.id, d, flush=True)
"""


def _env(store: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSTORE_")}
    if store is not None:
        env["MSTORE_DIR"] = str(store)
    return env


def make_checkpoint(d: Path, seed: int) -> Path:
    """A small checkpoint directory: a 1 MiB safetensors file and 256 KiB of random bytes."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True)
    tensors = {f"layer{i}.weight": rng.standard_normal((256, 256)).astype(np.float32) for i in range(4)}
    save_file(tensors, str(d / "model.safetensors"))
    (d / "state.bin").write_bytes(rng.bytes(256 << 10))
    return d


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def race(store: Path, barrier: Path, plans: dict[str, tuple[str, list[Path]]]) -> dict[str, list[list[str]]]:
    """Start one racer per plan (name -> (branch, dirs)), release them together, collect their lines."""
    barrier.mkdir()
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", RACER, str(store), branch, str(barrier), name, *map(str, dirs)],
            cwd=barrier, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name, (branch, dirs) in plans.items()
    }
    deadline = time.monotonic() + 60
    while not all((barrier / f"{name}.ready").exists() for name in procs):
        assert time.monotonic() < deadline, "racers never reached the barrier"
        assert all(p.poll() is None for p in procs.values()), "a racer died before the barrier"
        time.sleep(0.005)
    (barrier / "go").touch()
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, f"racer {name} failed with something other than a ref conflict:\n{stderr}"
        out[name] = [line.split() for line in stdout.splitlines()]
    return out


def reflog_targets(repo: Repo, branch: str) -> set[str]:
    full = "refs/heads/" + branch
    return {e["new"] for e in repo.reflog() if e["ref"] == full and e["new"]}


@pytest.mark.slow
def test_racing_commits_to_one_branch_either_land_or_raise_ref_conflict(tmp_path: Path):
    store = tmp_path / "store"
    Repo.init(store).close()
    plans = {
        f"w{w}": (
            "shared",
            [make_checkpoint(tmp_path / f"w{w}" / f"c{i}", 100 * w + i) for i in range(COMMITS_PER_WRITER)],
        )
        for w in range(WRITERS)
    }

    results = race(store, tmp_path / "barrier", plans)

    for name, lines in results.items():
        assert len(lines) == COMMITS_PER_WRITER, f"{name} reported {len(lines)} of {COMMITS_PER_WRITER} attempts"
    outcomes = [line for lines in results.values() for line in lines]
    won = [line[1] for line in outcomes if line[0] == "ok"]
    lost = [line for line in outcomes if line[0] == "conflict"]
    assert len(won) + len(lost) == WRITERS * COMMITS_PER_WRITER  # every attempt accounted for
    assert lost, "the writers never collided, so this run proved nothing about conflicts"
    assert all(ref == "refs/heads/shared" for _c, ref, _actual in lost)

    with Repo.open(store) as repo:
        history = [str(e.id) for e in repo.log("shared")]
        logged = reflog_targets(repo, "shared")
        assert [w for w in won if w not in history and w not in logged] == []
        # No commit silently disappeared and none appeared that nobody was told about: the
        # branch history is exactly the winners, and every loser was told where the head went.
        assert sorted(history) == sorted(won)
        assert all(actual in won for _c, _ref, actual in lost)
        assert repo.fsck().ok


@pytest.mark.slow
def test_racing_cli_commits_exit_0_or_4_and_the_loser_is_told_of_the_conflict(tmp_path: Path):
    store = tmp_path / "store"
    Repo.init(store).close()
    won: list[str] = []
    conflicts: list[str] = []
    attempts = 0
    # Each round starts four real `mstore commit` processes at once; collisions are all but
    # certain, but rounds repeat (bounded) until at least one has been seen.
    for rnd in range(8):
        dirs = [make_checkpoint(tmp_path / f"r{rnd}" / f"w{w}", 1000 * rnd + w) for w in range(WRITERS)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "mstore", "commit", str(d), "-b", "shared", "-m", f"round {rnd}", "--json"],
                cwd=tmp_path, env=_env(store), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for d in dirs
        ]
        for p in procs:
            stdout, stderr = p.communicate(timeout=120)
            attempts += 1
            assert p.returncode in (0, 4), f"mstore commit exited {p.returncode}:\n{stderr}"
            if p.returncode == 0:
                won.append(json.loads(stdout)["id"])
            else:
                conflicts.append(stderr)
        if conflicts:
            break

    assert conflicts, "four concurrent `mstore commit` never collided in 8 rounds"
    assert len(won) + len(conflicts) == attempts
    for stderr in conflicts:
        # The error names the branch and the commit it moved to while this one was being made.
        m = re.search(r"error: shared moved to ([0-9a-f]{7})\b", stderr)
        assert m, f"the conflict is not named on stderr:\n{stderr}"
        assert any(w.startswith(m.group(1)) for w in won), stderr
    with Repo.open(store) as repo:
        history = [str(e.id) for e in repo.log("shared")]
        assert sorted(history) == sorted(won)
        assert reflog_targets(repo, "shared") == set(won)


@pytest.mark.slow
def test_two_processes_committing_identical_content_leave_a_consistent_store(tmp_path: Path):
    store = tmp_path / "store"
    Repo.init(store).close()
    dirs = [make_checkpoint(tmp_path / "same" / f"c{i}", 7 + i) for i in range(3)]

    results = race(store, tmp_path / "barrier", {"a": ("left", dirs), "b": ("right", dirs)})

    assert all(line[0] == "ok" for lines in results.values() for line in lines), results
    with Repo.open(store) as repo:
        report = repo.fsck()
        assert report.ok, report.to_dict()
        for name, lines in results.items():
            assert len(lines) == len(dirs), name
            for i, (_ok, cid, d) in enumerate(lines):
                dest = tmp_path / "out" / name / str(i)
                repo.checkout(cid, dest)
                assert tree_bytes(dest) == tree_bytes(Path(d))
        # Same bytes, same tree: the two writers' copies of every object are interchangeable.
        assert repo.get_commit("left").tree == repo.get_commit("right").tree
