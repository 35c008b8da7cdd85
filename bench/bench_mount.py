#!/usr/bin/env python3
"""Mount benchmark: cold sequential read through `mstore mount` against `mstore checkout`.

Measures, on one safetensors file (1 GB by default):

* **read ratio**: sequential read (1 MiB reads) of the file through a freshly started mount
  (cold chunk cache) against checking the same file out (``Repo.checkout``, the code behind
  ``mstore checkout``). Both read the same packs, which the commit left in the OS page cache,
  so the ratio compares mstore's two read paths, not the disk. Target: >= 0.5.
* **ready**: time from ``mount_commit`` (background) until it returns with the mount
  answering. Target: <= 1 s.
* **RSS**: the mount process's peak RSS (VmHWM) above its idle RSS after the full read, for
  two cache sizes. Target: within the cache size plus 80 MiB (threads and FUSE buffers, and the
  pages of one chunk load freed but not yet trimmed), whatever the file size.

Contenders alternate order over the repeats; medians are reported (with min and max), and the
read ratio is the median of the per-repeat ratios (each repeat reads both ways back to back).

    python bench/bench_mount.py            # 1 GB, 5 repeats (a few minutes on 2 cores)
    python bench/bench_mount.py --quick    # 128 MB, 2 repeats

Results go to bench/out/mount.json (or --json PATH). Needs FUSE (/dev/fuse and fuse3).
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

import bench_store  # (bench/ is the script's directory, first on sys.path)
import numpy as np
from safetensors.numpy import save_file

from mstore import Repo
from mstore import mount as mount_mod

MB = 1_000_000
MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "bench" / "out" / "mount.json"

READ_MIN_RATIO = 0.5
READY_MAX_S = 1.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_model(path: Path, size: int) -> None:
    """A safetensors file of float32 tensors of 16 MiB and 4 MiB (a new store cuts them into 4 MiB pieces)."""
    rng = np.random.default_rng(0)
    tensors = {}
    left, i = size, 0
    while left > 0:
        rows = 4096 if left >= 16 * MiB else 1024
        n = min(rows, max(1, left // (1024 * 4)))
        tensors[f"layer{i:03d}.weight"] = rng.standard_normal((n, 1024), dtype=np.float32)
        left -= n * 1024 * 4
        i += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def read_all(path: Path) -> int:
    buf = bytearray(MiB)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def settle(nbytes: int) -> None:
    """Before each timed step, untimed: write back dirty pages, then back fresh memory.

    Both steps fill ``nbytes`` of fresh page cache (checkout: the file it writes; the mount
    read: the kernel's cache of the mounted file). On these VMs pages freed a few seconds ago
    are handed back to the host, and the first write to one costs a host fault: without this,
    the same checkout ran at 467-523 MB/s in one repeat and 1935-2517 MB/s in the next
    (bench_store.warm_free_memory, docs/bench.md).
    """
    os.sync()
    bench_store.warm_free_memory(nbytes)


def time_checkout(repo: Repo, dest: Path, size: int) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    settle(2 * size)
    t = time.perf_counter()
    repo.checkout("base:model.safetensors", dest)
    elapsed = time.perf_counter() - t
    shutil.rmtree(dest)
    return elapsed


def time_mount(repo: Repo, mnt: Path, size: int, cache: int) -> dict[str, float]:
    settle(2 * size)
    t = time.perf_counter()
    m = mount_mod.mount_commit(repo, "base", mnt, cache_bytes=cache)
    ready = time.perf_counter() - t
    try:
        idle = status_kb(m.pid, "VmRSS")
        t = time.perf_counter()
        got = read_all(Path(m.mountpoint) / "model.safetensors")
        elapsed = time.perf_counter() - t
        assert got == size, (got, size)
        peak = status_kb(m.pid, "VmHWM")
    finally:
        m.umount()
    return {"ready_s": ready, "read_s": elapsed, "idle_rss_mb": idle * 1024 / MB, "peak_rss_mb": peak * 1024 / MB}


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="128 MB and 2 repeats")
    ap.add_argument("--size-mb", type=int, default=None, help="file size in MB (default 1000)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--cache", default="256,64", help="cache sizes in MiB for the RSS runs (first: the read runs)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a new temporary one)")
    args = ap.parse_args()
    mount_mod.check_fuse()
    from mstore.cli import COMMANDS

    if "mount" not in COMMANDS:  # the command is not registered yet: start mounts through the tests' glue
        mount_mod.CHILD_COMMAND = [sys.executable, str(ROOT / "tests" / "mount_glue.py")]
    size = (args.size_mb or (128 if args.quick else 1000)) * MB
    repeats = args.repeats or (2 if args.quick else 5)
    caches = [int(c) * MiB for c in args.cache.split(",")]
    # The cache budget covers cached chunks and the copies loads in flight hold. Beyond it: the
    # threads, FUSE buffers and interpreter (mount.MEMORY_SLACK), and heap pages freed by at most
    # one chunk load (three copies of a 16 MiB chunk) before they are trimmed.
    slack = mount_mod.MEMORY_SLACK + 3 * 16 * MiB

    work = Path(tempfile.mkdtemp(prefix="mstore-bench-mount-", dir=args.dir))
    try:
        store = work / "store"
        repo = Repo.init(store)
        # One pack for the whole file keeps the comparison about the two read paths.
        cfg = store / "config.toml"
        cfg.write_text(cfg.read_text().replace("max_size = 67108864", f"max_size = {2 * size + (64 << 20)}"))
        repo.close()
        repo = Repo(store)
        model = work / "src" / "model.safetensors"
        log(f"writing a {size / MB:.0f} MB safetensors file")
        make_model(model, size)
        size = model.stat().st_size
        t = time.perf_counter()
        cid = repo.commit(model.parent, "base", "bench model", kind="model").id
        log(f"committed {cid.short} in {time.perf_counter() - t:.1f} s")
        model.unlink()

        checkout_s, mount_runs = [], []
        for i in range(repeats):
            order = ("checkout", "mount") if i % 2 == 0 else ("mount", "checkout")
            for what in order:
                if what == "checkout":
                    checkout_s.append(time_checkout(repo, work / "co", size))
                    log(f"  checkout   {size / MB / checkout_s[-1]:7.0f} MB/s")
                else:
                    r = time_mount(repo, work / "mnt", size, caches[0])
                    mount_runs.append(r)
                    log(
                        f"  mount read {size / MB / r['read_s']:7.0f} MB/s  (ready {r['ready_s']:.2f} s, "
                        f"peak RSS {r['peak_rss_mb']:.0f} MB)"
                    )
        rss = []
        for cache in caches:
            r = mount_runs[0] if cache == caches[0] else time_mount(repo, work / "mnt", size, cache)
            over = r["peak_rss_mb"] - r["idle_rss_mb"]
            bound = (cache + slack) / MB
            rss.append(
                {
                    "cache_mb": cache / MB,
                    **{k: r[k] for k in ("idle_rss_mb", "peak_rss_mb")},
                    "above_idle_mb": over,
                    "bound_mb": bound,
                    "within_bound": over <= bound,
                }
            )
            log(f"  cache {cache // MiB} MiB: peak RSS {r['peak_rss_mb']:.0f} MB, {over:.0f} MB above idle")

        co = summary([size / MB / s for s in checkout_s])
        mo = summary([size / MB / r["read_s"] for r in mount_runs])
        ready = summary([r["ready_s"] for r in mount_runs])
        # Each repeat reads both ways back to back: the ratio of each pair is robust to load
        # that drifts over the run; the median pair is the figure.
        pairs = [c / r["read_s"] for c, r in zip(checkout_s, mount_runs, strict=True)]
        ratio = statistics.median(pairs)
        result: dict[str, Any] = {
            "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()},
            "file_bytes": size,
            "repeats": repeats,
            "checkout_mb_s": co,
            "mount_read_mb_s": mo,
            "read_ratio": ratio,
            "read_ratio_per_repeat": pairs,
            "ready_s": ready,
            "rss": rss,
            "targets": {
                "read_ratio_min": READ_MIN_RATIO,
                "ready_max_s": READY_MAX_S,
                "met": {
                    "read_ratio": ratio >= READ_MIN_RATIO,
                    "ready": ready["median"] <= READY_MAX_S,
                    "rss": all(r["within_bound"] for r in rss),
                },
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    met = result["targets"]["met"]
    print(
        f"checkout {co['median']:.0f} MB/s, cold mount read {mo['median']:.0f} MB/s: ratio {ratio:.2f} "
        f"(per repeat {', '.join(f'{p:.2f}' for p in pairs)}) "
        f"(target >= {READ_MIN_RATIO}) {'ok' if met['read_ratio'] else 'MISSED'}\n"
        f"mount ready in {ready['median']:.2f} s (target <= {READY_MAX_S} s) {'ok' if met['ready'] else 'MISSED'}\n"
        + "\n".join(
            f"cache {r['cache_mb']:.0f} MB: peak RSS {r['peak_rss_mb']:.0f} MB, {r['above_idle_mb']:.0f} MB above "
            f"idle (bound {r['bound_mb']:.0f} MB) {'ok' if r['within_bound'] else 'OVER'}"
            for r in rss
        )
    )
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
