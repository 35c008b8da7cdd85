"""Undo at scale: `mstore reflog --all` with 100,000 reflog entries, `mstore branches` with 1,000.

Targets (issue: never lose a version): the first page of `reflog --all` in <= 0.3 s and
`branches` in <= 0.5 s, as whole processes. Each is timed beside `python -c pass` in the same
run (medians of N runs, alternating), because these machines are shared and noisy.

The store is real: 1,000 branches made by `Repo.create_branch` on real commits, and reflog
entries appended through the same LMDB write path `set_if_equals` uses (moving 100 branches
back and forth 1,000 times each through the public API would take minutes and measure the
same reads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mstore import Repo
from mstore.refs import RefChange, set_if_equals


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--branches", type=int, default=1_000)
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mstore-bench-refs-"))
    repo = Repo.init(tmp / "store")
    ids = []
    for i in range(4):
        src = tmp / f"v{i}"
        src.mkdir()
        (src / "w.bin").write_bytes(os.urandom(4096) + bytes([i]))
        ids.append(repo.commit(src, "main", f"v{i}", allow_regression=True).id)
    t0 = time.perf_counter()
    for b in range(args.branches):
        repo.create_branch(f"runs/exp-{b:04d}", str(ids[b % 4]))
    made_branches = time.perf_counter() - t0
    t0 = time.perf_counter()
    change = RefChange("bench", "bench", "move")
    have = len(repo.reflog())
    with repo.store.index.write() as txn:
        for i in range(args.entries - have):
            name = f"refs/heads/runs/exp-{i % args.branches:04d}"
            cur = txn.get_ref(name)
            set_if_equals(txn, name, cur, ids[(i + 1) % 4].digest if cur != ids[(i + 1) % 4].digest
                          else ids[(i + 2) % 4].digest, change)
    made_entries = time.perf_counter() - t0
    total = len(repo.reflog())
    repo.close()
    env = {**os.environ, "MSTORE_DIR": str(tmp / "store")}
    mstore = [sys.executable, "-m", "mstore"]
    cases = {
        "reflog --all (first page)": [*mstore, "reflog", "--all"],
        "branches": [*mstore, "branches"],
        "python -c pass": [sys.executable, "-c", "pass"],
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for cmd in cases.values():
        timed(cmd, env)  # warm-up
    for _ in range(args.runs):
        for k, cmd in cases.items():
            times[k].append(timed(cmd, env))
    base = statistics.median(times["python -c pass"])
    targets = {"reflog --all (first page)": 0.3, "branches": 0.5}
    result = {"entries": total, "branches": args.branches, "setup_s": {"branches": made_branches,
              "entries": made_entries}, "figures": {}}
    print(f"store: {total:,} reflog entries, {args.branches:,} branches (+ main)")
    print(f"{'command':<28}{'median s':>10}{'min':>8}{'max':>8}{'vs python':>11}{'target':>8}  result")
    for k, ts in times.items():
        med = statistics.median(ts)
        tgt = targets.get(k)
        verdict = "" if tgt is None else ("PASS" if med <= tgt else "FAIL")
        print(f"{k:<28}{med:>10.3f}{min(ts):>8.3f}{max(ts):>8.3f}{med / base:>10.1f}x{tgt or '':>8}  {verdict}")
        result["figures"][k] = {"median": med, "min": min(ts), "max": max(ts), "target": tgt, "result": verdict}
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    (out / "refs.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
