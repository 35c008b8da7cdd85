#!/usr/bin/env python3
"""Trainer benchmark: what committing every checkpoint costs a training run.

The same training run (the demo model, full fine-tuning, checkpoints every ``--save-every``
steps) is timed three ways in this one process, in alternating order, ``--reps`` times:

* ``none``   no checkpoints at all (the in-loop evaluation still runs at the same steps);
* ``files``  every checkpoint written to plain files (the very files the trainer writes:
             safetensors weights, optimizer and RNG state, state.json), and nothing else;
* ``mstore`` the trainer as shipped: each checkpoint staged, committed in the background while
             training goes on, checked out again and its metric recomputed from the committed
             bytes, then committed to the run's branch (into a fresh store for every repetition,
             so no repetition profits from another's dedup).

The figure of merit is the same-run ratio of the medians, ``mstore / files``: what the store
adds over saving the same checkpoints as files (the issue's target: at most 1.10). Times are
training-loop wall times, from the first step until every checkpoint is committed (preflight
and model loading are the same in all three and excluded).

    python bench/bench_trainer.py              # 3 repetitions, ~6 minutes on 2 cores
    python bench/bench_trainer.py --quick      # 1 repetition of a short run, a smoke test

Numbers go to bench/out/trainer.json (or --json PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the trainer

from mstore import Repo  # noqa: E402
from mstore import lineage as lin  # noqa: E402

DEFAULT_JSON = ROOT / "bench" / "out" / "trainer.json"
TARGET_RATIO = 1.10


class _Files:
    """Stand-in for the committer: the checkpoint files are already written; keep them, do nothing."""

    def __init__(self, repo, branch, head, **_kw):
        self.head = head
        self.done: list = []

    def submit(self, job):
        pass

    def poll(self, block=False, limit=None):
        pass

    def drain(self):
        pass

    def close(self):
        pass


def _run(mode: str, assets: tuple[Path, Path], scratch: Path, args: argparse.Namespace) -> dict[str, Any]:
    import trainer.committer
    import trainer.loop
    from trainer import TrainConfig, train

    store = scratch / f"store-{mode}-{time.monotonic_ns()}"
    repo = Repo.init(store)
    lin.import_model(repo, assets[0], "models/demo")
    lin.import_data(repo, assets[1], "data/demo")
    cfg = TrainConfig(
        branch="runs/bench", base="models/demo", data="data/demo", lora=None, steps=args.steps,
        save_every=args.save_every, eval_every=args.save_every, batch_size=8, seq_len=64, lr=1e-3, threads=args.threads,
        eval_records=64, log_every=10**9, work_dir=str(scratch),
    )
    real_committer, real_save = trainer.committer.Committer, trainer.loop._Run._save
    marks: dict[str, float] = {}

    def report(event, **fields):
        if event == "start":
            marks["start"] = time.perf_counter()

    try:
        if mode != "mstore":
            trainer.committer.Committer = _Files  # type: ignore[misc, assignment]
        if mode == "none":
            trainer.loop._Run._save = lambda self, st, *a: None  # type: ignore[method-assign]
        result = train(cfg, repo, report=report)
        end = time.perf_counter()
    finally:
        trainer.committer.Committer = real_committer  # type: ignore[misc]
        trainer.loop._Run._save = real_save  # type: ignore[method-assign]
    out = {"mode": mode, "loop_seconds": end - marks["start"], "checkpoints": len(result.checkpoints)}
    if mode == "mstore":
        out["verified"] = sum(1 for c in result.checkpoints if c.receipt and c.receipt.get("verified"))
        out["store_bytes"] = repo.stored_bytes()
    repo.close()
    shutil.rmtree(store, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the commit thread uses another core)")
    ap.add_argument("--quick", action="store_true", help="1 repetition of 120 steps, saving every 40")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args()
    if args.quick:
        args.reps, args.steps, args.save_every = 1, 120, 40
    from trainer import tiny

    scratch = Path(tempfile.mkdtemp(prefix="mstore-bench-trainer-"))
    try:
        assets = tiny.build_demo(scratch / "assets")
        _run("files", assets, scratch, argparse.Namespace(**{**vars(args), "steps": 20, "save_every": 10}))  # warm-up
        runs: list[dict[str, Any]] = []
        modes = ["none", "files", "mstore"]
        for rep in range(args.reps):
            order = modes if rep % 2 == 0 else modes[::-1]
            for mode in order:
                r = _run(mode, assets, scratch, args)
                r["rep"] = rep
                r["load_avg"] = os.getloadavg()[0]
                runs.append(r)
                done = ""
                if mode == "mstore":
                    done = f"  ({r['checkpoints']} checkpoints committed, {r['verified']} verified)"
                print(f"rep {rep} {mode:<6} {r['loop_seconds']:7.2f} s{done}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    med = {m: statistics.median(r["loop_seconds"] for r in runs if r["mode"] == m) for m in modes}
    ratio_files = med["mstore"] / med["files"]
    ratio_none = med["mstore"] / med["none"]
    print()
    print(f"steps {args.steps}, a checkpoint every {args.save_every}, {args.threads} torch thread(s), "
          f"{args.reps} repetitions (medians)")
    for m in modes:
        print(f"  {m:<6} {med[m]:7.2f} s")
    print(f"  mstore / files = {ratio_files:.3f}  (target <= {TARGET_RATIO})")
    print(f"  mstore / none  = {ratio_none:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "time": datetime.now(UTC).isoformat(),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "workload": {"steps": args.steps, "save_every": args.save_every, "threads": args.threads,
                     "model": tiny.DEMO_MODEL, "records": tiny.DEMO_RECORDS, "method": "full"},
        "medians": med, "ratio_mstore_to_files": ratio_files, "ratio_mstore_to_none": ratio_none,
        "target": TARGET_RATIO, "runs": runs,
    }, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
