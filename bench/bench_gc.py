"""gc at scale: `gc plan` on a store of ~1,000,000 chunks and 10,000 commits; apply throughput.

Targets (gc issue): plan <= 5 s and <= 500 MB peak RSS; apply's bytes rewritten per second
reported beside a same-run `cp` of the same pack files.

Building: the chunks are real — files ingested through `Repo.commit` with FastCDC set to its
smallest average (256 B), so 1M chunks are ~0.3 GB instead of 64 GB. The 10,000 commits are
written through the store's own write batch (trees and commits built with mstore.objects), as a
fast writer would; half of them are on branches deleted 40 days before the plan, so the plan has
candidates. `plan` and `apply` then run as whole `mstore` processes, timed and with peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mstore import Repo
from mstore.format import read_config, write_config
from mstore.objects import Commit, Tree, TreeEntry, load_commit, load_tree
from mstore.refs import RefChange, set_if_equals

DAY = 86400.0


def child(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds and peak RSS (MB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out = proc.stdout.read() + proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out}")
    return wall, usage.ru_maxrss / 1024, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=1_000_000)
    ap.add_argument("--commits", type=int, default=10_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mstore-bench-gc-"))
    start = 1_900_000_000.0
    now = [start]
    repo = Repo.init(tmp / "store", clock=lambda: now[0])
    cfg = read_config(repo.root)
    cfg.data["chunking"]["cdc_avg_size"] = 256
    write_config(repo.root, cfg)
    repo.close()
    repo = Repo.open(tmp / "store", clock=lambda: now[0])
    rng = random.Random(7)
    t0 = time.perf_counter()
    # FastCDC with a 256 B average cuts at 256 B + min (64 B) on average: ~320 B per chunk.
    files_per_dir, file_size = 50, 64 * 320
    ndirs = max(1, args.chunks // (files_per_dir * 64))
    for d in range(ndirs):
        src = tmp / "src" / f"d{d}"
        src.mkdir(parents=True)
        for f in range(files_per_dir):
            (src / f"f{f}.bin").write_bytes(rng.randbytes(file_size))
        repo.commit(src, f"data/d{d}", f"shard {d}", allow_regression=True)
        shutil.rmtree(src)
    built_chunks = time.perf_counter() - t0
    file_entries = []
    for b in repo.branches():
        for e in load_tree(repo.store, load_commit(repo.store, b.id).tree).entries:
            file_entries.append(e)
    t0 = time.perf_counter()
    change = RefChange("bench", "bench", "synthetic")
    per_branch = 10
    with repo.store.batch() as batch:
        heads = {}
        for i in range(args.commits):
            branch = f"refs/heads/runs/r{i // per_branch:05d}"
            picks = rng.sample(file_entries, 5)
            tree = Tree.build([TreeEntry(f"p{j}-{e.name}", e.kind, e.mode, e.id, e.size) for j, e in enumerate(picks)])
            batch.add("t", tree.id, tree.to_bytes())
            parent = heads.get(branch)
            c = Commit(tree=tree.id, parents=(parent,) if parent else (), author="bench", time="2030-03-17T00:00:00Z",
                       message=f"step {i}", kind="checkpoint", meta={"step": i})
            batch.add("m", c.id, c.to_bytes())
            heads[branch] = c.id

        def move(txn):
            for name, cid in heads.items():
                set_if_equals(txn, name, txn.get_ref(name), cid.digest, change, now[0])

        batch.commit(move)
    built_commits = time.perf_counter() - t0
    # Half the run branches deleted 40 days before the plan: their commits become candidates.
    for i, name in enumerate(sorted(heads)):
        if i % 2 == 0:
            repo.delete_branch(name.removeprefix("refs/heads/"))
    with repo.store.index.read() as txn:
        nobj = txn.count_entries()
    repo.close()
    env = dict(os.environ)
    # The plan must see the deletions 40 days later: run it through a tiny wrapper that opens the
    # repository with a shifted clock (the CLI itself has no clock option, on purpose).
    wrapper = tmp / "at.py"
    wrapper.write_text(
        "import sys, json\n"
        "from mstore import Repo\n"
        f"r = Repo.open({str(tmp / 'store')!r}, clock=lambda: {start + 40 * DAY})\n"
        "if sys.argv[1] == 'plan':\n"
        "    pid, doc = r.gc_plan()\n"
        "    print(json.dumps({'proof': pid, 'candidates': doc['candidates']}))\n"
        "else:\n"
        "    res = r.gc_apply(sys.argv[2])\n"
        "    print(json.dumps(res.to_dict()))\n"
    )
    plans = [child([sys.executable, str(wrapper), "plan"], env) for _ in range(3)]
    plan_wall = sorted(p[0] for p in plans)[1]
    plan_rss = max(p[1] for p in plans)
    proof = json.loads(plans[-1][2])
    packs_bytes = sum(p.stat().st_size for p in (tmp / "store" / "packs").iterdir())
    cpdir = tmp / "cp"
    cpdir.mkdir()
    t0 = time.perf_counter()
    for p in (tmp / "store" / "packs").iterdir():
        shutil.copyfile(p, cpdir / p.name)
    cp_s = time.perf_counter() - t0
    shutil.rmtree(cpdir)
    apply_wall, apply_rss, out = child([sys.executable, str(wrapper), "apply", proof["proof"]], env)
    res = json.loads(out)
    result = {
        "objects": nobj, "chunks_target": args.chunks, "commits": args.commits,
        "build_s": {"chunks": built_chunks, "commits": built_commits},
        "plan": {"median_s": plan_wall, "all_s": [p[0] for p in plans], "peak_rss_mb": plan_rss,
                 "candidates": proof["candidates"], "target_s": 5, "target_rss_mb": 500},
        "apply": {"wall_s": apply_wall, "peak_rss_mb": apply_rss, **res,
                  "rewrite_mb_s": res["bytes_before"] / 1e6 / apply_wall,
                  "cp_same_packs_mb_s": packs_bytes / 1e6 / cp_s},
    }
    print(json.dumps(result, indent=2))
    out_dir = Path(__file__).resolve().parent / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "gc.json").write_text(json.dumps(result, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
