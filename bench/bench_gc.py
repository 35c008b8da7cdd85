"""gc at scale: `gc plan` on a store of ~1,000,000 chunks and 10,000 commits; apply throughput.

Targets (gc issue): plan <= 5 s and <= 500 MB peak RSS; apply's bytes rewritten per second
reported beside a same-run `cp` of the same pack files.

Building: the chunks are real — files ingested through `Repo.commit` with FastCDC set to its
smallest average (256 B), so 1M chunks are ~0.3 GB instead of 64 GB. The 10,000 commits are
written through the store's own write batch (trees and commits built with mstore.objects), as a
fast writer would; half of them are on branches deleted 40 days before the plan, so the plan has
candidates. Building takes several minutes; ``--store DIR`` keeps the built store there and
re-uses it on the next run (apply always runs on a fresh copy, so the kept store stays as built).

Measuring: `plan` and `apply` run as whole processes (the repository opened with a clock 40
days after the build), each forked by a tiny wrapper process so that its peak RSS is its own
(Linux starts an exec'd process's ``ru_maxrss`` at the high-water mark of the process that
forked it, and this benchmark holds the build's state). Each runs ``--repeat`` times (default
3); medians are reported. Apply's baseline is a `cp` of exactly the pack files apply rewrites,
timed in the same repetition, seconds apart: apply reads those packs, verifies every live
record and writes them again, so `cp` of the same bytes is the floor it cannot beat.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAY = 86400.0
START = 1_900_000_000.0

# Children are forked by bench_store's tiny wrapper, so each reports its own peak RSS.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import _SPAWN  # noqa: E402

# The plan's same-run floor: open the store and walk every index entry once with a raw LMDB
# cursor (no Python work per entry). Any gc that looks at every object pays at least this.
_FLOOR = """
import sys
from mstore import Repo
r = Repo.open(sys.argv[1])
with r.store.index.read() as txn:
    with txn.txn.cursor(db=txn.dbs["objects"]) as cur:
        n = sum(1 for _ in cur)
print(n)
"""

# Runs inside the measured process: opens the store 40 days after the build. Apply also reports
# when its copy phase began and ended (its crash hooks mark the step boundaries).
_AT = """
import json, sys, time
from mstore import Repo
store, when, verb = sys.argv[1], float(sys.argv[2]), sys.argv[3]
t0 = time.perf_counter()
r = Repo.open(store, clock=lambda: when)
if verb == "plan":
    pid, doc = r.gc_plan()
    print(json.dumps({"proof": pid, "candidates": doc["candidates"], "live": doc["live"]}))
else:
    marks = {}
    res = r.gc_apply(sys.argv[4], crash_hook=lambda p: marks.setdefault(p, time.perf_counter() - t0))
    print(json.dumps({**res.to_dict(), "hooks_s": marks}))
"""


def child(cmd: list[str]) -> dict:
    """Run ``cmd`` as one fresh process: wall time, CPU, its own peak RSS (MB) and stdout."""
    os.sync()
    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se, \
            tempfile.NamedTemporaryFile("r", suffix=".json") as res:
        subprocess.run([sys.executable, "-c", _SPAWN, res.name, *cmd], stdout=so, stderr=se, check=False)
        so.seek(0)
        se.seek(0)
        r = json.loads(Path(res.name).read_text())
        out, err = so.read().decode(), se.read().decode()
    if r["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r['rc']}):\n{out}\n{err}")
    return {"wall": r["wall"], "cpu": r["cpu"], "rss_mb": r["maxrss_kib"] / 1024, "out": out}


def build(store: Path, chunks: int, commits: int) -> dict:
    """Build the synthetic store at ``store``; returns what was built."""
    from mstore import Repo
    from mstore.format import read_config, write_config
    from mstore.objects import Commit, Tree, TreeEntry, load_commit, load_tree
    from mstore.refs import RefChange, set_if_equals

    now = [START]
    repo = Repo.init(store, clock=lambda: now[0])
    cfg = read_config(repo.root)
    cfg.data["chunking"]["cdc_avg_size"] = 256
    write_config(repo.root, cfg)
    repo.close()
    repo = Repo.open(store, clock=lambda: now[0])
    rng = random.Random(7)
    t0 = time.perf_counter()
    # FastCDC with a 256 B average cuts at 256 B + min (64 B) on average: ~320 B per chunk.
    files_per_dir, file_size = 50, 64 * 320
    ndirs = max(1, chunks // (files_per_dir * 64))
    src_root = store.parent / "src"
    for d in range(ndirs):
        src = src_root / f"d{d}"
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
        for i in range(commits):
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
        nchunks = sum(1 for _ in txn.iter_entries("c"))
    repo.close()
    info = {"objects": nobj, "chunks": nchunks, "commits": commits, "chunks_target": chunks,
            "build_s": {"chunks": built_chunks, "commits": built_commits}}
    (store.parent / "built.json").write_text(json.dumps(info))
    return info


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=1_000_000)
    ap.add_argument("--commits", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of plan and of apply (>= 3)")
    ap.add_argument("--store", type=Path, help="keep the built store in this directory and re-use it")
    ap.add_argument("--build-only", action="store_true", help="build (or check) the store, measure nothing")
    ap.add_argument("--no-apply", action="store_true", help="measure plan only")
    ap.add_argument("--heavy-apply", type=int, default=4, metavar="N",
                    help="also apply with every N-th data branch deleted (0: skip; default 4)")
    args = ap.parse_args()
    if args.repeat < 3:
        raise SystemExit("--repeat must be at least 3 (medians of fewer runs are noise)")
    work = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="mstore-bench-gc-"))
    store = work / "store"
    built = work / "built.json"
    if built.exists():
        info = json.loads(built.read_text())
        if (info["chunks_target"], info["commits"]) != (args.chunks, args.commits):
            raise SystemExit(f"{work} holds a store built for {info['chunks_target']} chunks / "
                             f"{info['commits']} commits; use another --store")
    else:
        if store.exists():
            shutil.rmtree(store)
        work.mkdir(parents=True, exist_ok=True)
        info = build(store, args.chunks, args.commits)
    print(json.dumps(info), flush=True)
    if args.build_only:
        return
    when = str(START + 40 * DAY)
    at = [sys.executable, "-c", _AT]
    plans, floors = [], []
    for i in range(args.repeat):
        # Alternate which of plan and its floor runs first.
        for which in (("plan", "floor") if i % 2 == 0 else ("floor", "plan")):
            if which == "plan":
                plans.append(child([*at, str(store), when, "plan"]))
            else:
                floors.append(child([sys.executable, "-c", _FLOOR, str(store)]))
        print(f"plan {i + 1}: {plans[-1]['wall']:.2f} s, {plans[-1]['rss_mb']:.0f} MB; floor (index walk) "
              f"{floors[-1]['wall']:.2f} s, {floors[-1]['rss_mb']:.0f} MB; load {os.getloadavg()[0]:.1f}", flush=True)
    proof = json.loads(plans[-1]["out"])
    result = {
        **info,
        "load_avg_1m": os.getloadavg()[0],
        "plan": {"median_s": median([p["wall"] for p in plans]), "all_s": [p["wall"] for p in plans],
                 "cpu_s": [p["cpu"] for p in plans], "peak_rss_mb": max(p["rss_mb"] for p in plans),
                 "all_rss_mb": [p["rss_mb"] for p in plans],
                 "candidates": proof["candidates"], "live": proof["live"], "target_s": 5, "target_rss_mb": 500,
                 "floor_median_s": median([f["wall"] for f in floors]), "floor_all_s": [f["wall"] for f in floors],
                 "floor_peak_rss_mb": max(f["rss_mb"] for f in floors),
                 "vs_floor": median([p["wall"] for p in plans]) / median([f["wall"] for f in floors])},
    }
    if not args.no_apply:
        result["apply"] = apply_runs(work, store, when, args.repeat, delete_every=0)
        if args.heavy_apply:
            result["apply_heavy"] = apply_runs(work, store, when, args.repeat, delete_every=args.heavy_apply)
    print(json.dumps(result, indent=2))
    out_dir = Path(__file__).resolve().parent / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "gc.json").write_text(json.dumps(result, indent=2))
    if not args.store:
        shutil.rmtree(work, ignore_errors=True)


def apply_runs(work: Path, store: Path, when: str, repeat: int, delete_every: int) -> dict:
    """Apply a fresh plan on a fresh copy of the store ``repeat`` times, each beside a `cp` of
    exactly the pack files that apply rewrote (from the kept store, where they are the same).

    With ``delete_every`` N, the copy's branches data/d0, data/dN, ... are deleted at build
    time first, so that the chunks only they (and deleted runs) reached are candidates spread
    over many data packs: apply then really compacts packs full of small live chunks.
    """
    at = [sys.executable, "-c", _AT]
    copy, cpdir = work / "apply-copy", work / "cp"
    runs: list[dict] = []
    rewritten: list[str] | None = None

    def do_cp(names: list[str]) -> tuple[float, float]:
        """Seconds to `cp` the packs, and to `cp` them and fsync each copy (apply fsyncs its packs)."""
        out = []
        for durable in (False, True):
            if cpdir.exists():
                shutil.rmtree(cpdir)
            cpdir.mkdir()
            os.sync()
            t0 = time.perf_counter()
            for name in names:
                shutil.copyfile(store / "packs" / name, cpdir / name)
                if durable:
                    fd = os.open(cpdir / name, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
            out.append(time.perf_counter() - t0)
        shutil.rmtree(cpdir)
        return out[0], out[1]

    for i in range(repeat):
        if copy.exists():
            shutil.rmtree(copy)
        shutil.copytree(store, copy)
        if delete_every:
            _delete_data_branches(copy, delete_every)
        plan_run = child([*at, str(copy), when, "plan"])
        proof = json.loads(plan_run["out"])
        before = set(os.listdir(copy / "packs"))
        # cp after apply on even repetitions, before it on odd ones (once the set is known), so
        # neither always gets the warmer page cache.
        cp = do_cp(rewritten) if i % 2 == 1 and rewritten is not None else None
        run = child([*at, str(copy), when, "apply", proof["proof"]])
        res = json.loads(run["out"])
        removed = sorted(before - set(os.listdir(copy / "packs")))
        if rewritten is None:
            rewritten = removed
        elif removed != rewritten:
            raise SystemExit("apply rewrote different packs in two repetitions of the same workload")
        if cp is None:
            cp = do_cp(removed)
        hooks = res.pop("hooks_s")
        runs.append({"wall": run["wall"], "rss_mb": run["rss_mb"], "cp_s": cp[0], "cp_fsync_s": cp[1],
                     "result": res, "hooks_s": hooks, "copy_s": hooks["after-copy"] - hooks["before-copy"],
                     "candidates": proof["candidates"], "plan_s": plan_run["wall"], "plan_rss_mb": plan_run["rss_mb"]})
        print(f"apply{' (data deleted)' if delete_every else ''} {i + 1}: {run['wall']:.2f} s "
              f"(copy phase {runs[-1]['copy_s']:.2f} s), {run['rss_mb']:.0f} MB, {len(removed)} packs; "
              f"cp {cp[0]:.3f} s, cp+fsync {cp[1]:.3f} s; load {os.getloadavg()[0]:.1f}", flush=True)
    shutil.rmtree(copy)
    nbytes = sum((store / "packs" / n).stat().st_size for n in rewritten or [])
    wall, copy_s, cp_s, cpf_s = (median([r[k] for r in runs]) for k in ("wall", "copy_s", "cp_s", "cp_fsync_s"))
    return {
        "delete_data_every": delete_every, "candidates": runs[0]["candidates"],
        "packs_rewritten": len(rewritten or []), "rewritten_bytes": nbytes,
        "median_s": wall, "all_s": [r["wall"] for r in runs], "peak_rss_mb": max(r["rss_mb"] for r in runs),
        "copy_phase_median_s": copy_s, "copy_phase_all_s": [r["copy_s"] for r in runs],
        "cp_median_s": cp_s, "cp_all_s": [r["cp_s"] for r in runs],
        "rewrite_mb_s_whole": nbytes / 1e6 / wall, "rewrite_mb_s_copy_phase": nbytes / 1e6 / copy_s,
        "cp_mb_s": nbytes / 1e6 / cp_s, "copy_phase_vs_cp": cp_s / copy_s,
        "cp_fsync_median_s": cpf_s, "cp_fsync_all_s": [r["cp_fsync_s"] for r in runs],
        "cp_fsync_mb_s": nbytes / 1e6 / cpf_s, "copy_phase_vs_cp_fsync": cpf_s / copy_s,
        "phases_s": [r["hooks_s"] for r in runs], "result": runs[-1]["result"],
        # The plan each apply was given (on the copy): how plan scales with the candidates.
        "plan_median_s": median([r["plan_s"] for r in runs]), "plan_peak_rss_mb": max(r["plan_rss_mb"] for r in runs),
    }


def _delete_data_branches(store: Path, every: int) -> None:
    """Delete data/d0, data/dN, ... with the build's clock (so 40 days before the plan)."""
    from mstore import Repo

    with Repo.open(store, clock=lambda: START) as r:
        for b in r.branches():
            name = b.name.removeprefix("refs/heads/")
            if name.startswith("data/d") and int(name.removeprefix("data/d")) % every == 0:
                r.delete_branch(name)


if __name__ == "__main__":
    main()
