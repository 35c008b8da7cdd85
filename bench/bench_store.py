#!/usr/bin/env python3
"""Store benchmark: commit, unchanged re-commit, checkout, store size, peak RSS, CLI start-up.

Every throughput is measured in this one process beside a baseline run in the same process on
the same bytes (``shutil.copyfile`` and BLAKE3), with contender and baseline alternating order,
repeated, and reported as medians (plus min and max) and as a ratio to the baseline. Peak RSS
and start-up are measured on fresh child processes. docs/bench.md explains every figure.

    python bench/bench_store.py            # the full run (make bench), a few minutes on 2 cores
    python bench/bench_store.py --quick    # a smoke run with small sizes, well under a minute

All numbers go to bench/out/store.json (or --json PATH).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import tomli_w
from safetensors.numpy import save_file

from mstore import Repo

MB = 1_000_000  # every MB in this benchmark is decimal
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "bench" / "out" / "store.json"

# Targets from the store issue.
RECOMMIT_MIN_MBS = 1000.0  # unchanged re-commit >= 1 GB/s
CHECKOUT_MIN_RATIO = 0.5  # checkout >= 0.5x cp
COMMIT_RSS_MAX_MB = 400.0  # peak RSS <= 400 MB while committing a 2 GB file
STARTUP_MAX_S = 0.15  # `mstore --help` and `mstore log` start in <= 0.15 s


# -- helpers ---------------------------------------------------------------------------------


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def b3_file(path: Path) -> str:
    """BLAKE3 of a file the fastest way the blake3 package offers (mmap, all cores)."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(str(path))
    return h.hexdigest()


def copy_file(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)


def copy_file_fsync(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def disk_usage(path: Path) -> int:
    """Bytes allocated under ``path``."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


@dataclass
class Timing:
    wall: float
    cpu: float


def installed_bytecode() -> None:
    """Compile mstore's and the trainer's modules, as an install does, before anything is timed.

    Under PYTHONDONTWRITEBYTECODE (common in containers and CI) a module edited since the last
    ``make install`` is compiled again in every process that imports it: measured, 30-40 ms of
    each mstore command's start-up (snapshot.py alone, 14 ms), which installed copies and the
    other contenders (pip compiles them) never pay.
    """
    import compileall

    for pkg in ("mstore", "trainer"):
        compileall.compile_dir(str(ROOT / pkg), quiet=1)


def warm_free_memory(nbytes: int) -> None:
    """Touch and free ``nbytes`` of anonymous memory, so the next allocations get pages the
    hypervisor has backed.

    These VMs hand free guest memory back to the host (virtio-balloon free page reporting):
    pages freed for more than about 2 s are discarded, and the first write to one costs a host
    fault, ~12 us per 4 KiB page. A step that writes 266 MB into the page cache then spends
    0.6-0.9 s in the kernel instead of 0.06-0.1 s, with the same page-allocation counts in
    /proc/vmstat. Which contender pays depended only on the order and timing of the steps
    (docs/bench.md), so before every step that writes, each contender alike gets freshly
    freed, backed pages.
    """
    buf = np.empty(nbytes, np.uint8)
    buf.fill(1)
    del buf


def timed(fn: Callable[[], Any], warm: int = 0) -> tuple[Timing, Any]:
    """Run ``fn`` once and time it (wall and this process's CPU, all threads).

    Dirty pages from the previous step are written back first (untimed), so one step's
    write-back never lands in the next step's time. ``warm``: bytes of memory to back first
    (untimed, see :func:`warm_free_memory`), at least what the step will write.
    """
    os.sync()
    if warm:
        warm_free_memory(warm)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    result = fn()
    t1 = time.perf_counter()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return Timing(t1 - t0, cpu), result


@dataclass
class ChildResult:
    rc: int
    wall: float
    cpu: float
    maxrss_mb: float
    stderr: str


# Peak RSS must be the child's own. On Linux an exec'd process's ru_maxrss starts at the RSS
# high-water mark of the process that forked (or vforked) it, so a child spawned straight from
# this benchmark (which holds gigabytes of generated tensors) would report this process's peak.
# The child is therefore forked by this tiny wrapper (about 10 MB), which times it from fork to
# exit and reports its rusage from wait4.
_SPAWN = """
import json, os, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_pid, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(out, "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "wall": wall,
               "cpu": ru.ru_utime + ru.ru_stime, "maxrss_kib": ru.ru_maxrss}, f)
"""


def run_child(cmd: Sequence[str], cwd: Path, env: dict[str, str], sync: bool = True, warm: int = 0) -> ChildResult:
    """Run ``cmd`` as one fresh process: wall time from fork to exit, its own CPU and peak RSS.

    ``warm``: bytes of memory to back first (untimed, see :func:`warm_free_memory`).
    """
    if sync:
        os.sync()
    if warm:
        warm_free_memory(warm)
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r", suffix=".json") as res:
        p = subprocess.run(
            [sys.executable, "-c", _SPAWN, res.name, *cmd], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err,
            check=False,
        )
        err.seek(0)
        text = err.read().decode("utf-8", "replace")
        try:
            r = json.loads(Path(res.name).read_text())
        except (OSError, ValueError):
            return ChildResult(p.returncode or -1, math.nan, math.nan, math.nan, text[-2000:])
    # Linux reports ru_maxrss in KiB.
    return ChildResult(r["rc"], r["wall"], r["cpu"], r["maxrss_kib"] * 1024 / MB, text[-2000:])


def summarize(values: Sequence[float]) -> dict[str, Any]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "values": list(values)}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
        "values": [round(v, 6) for v in vals],
    }


def order_for(rep: int, names: list[str]) -> list[str]:
    """Contender first on even repetitions, last on odd ones (baselines reversed too)."""
    return list(names) if rep % 2 == 0 else list(reversed(names))


# -- workload --------------------------------------------------------------------------------


@dataclass
class Layout:
    """A transformer-like set of tensors: per layer two norms, attention and MLP matrices."""

    hidden: int
    layers: int
    itemsize: int

    def tensors(self) -> list[tuple[str, tuple[int, ...], int]]:
        """(name, shape, layer) in file order."""
        d = self.hidden
        out = []
        for layer in range(self.layers):
            p = f"model.layers.{layer:02d}"
            out += [
                (f"{p}.input_norm.weight", (d,), layer),
                (f"{p}.attn.qkv.weight", (3 * d, d), layer),
                (f"{p}.attn.out.weight", (d, d), layer),
                (f"{p}.post_norm.weight", (d,), layer),
                (f"{p}.mlp.up.weight", (4 * d, d), layer),
                (f"{p}.mlp.down.weight", (d, 4 * d), layer),
            ]
        return out

    @property
    def data_bytes(self) -> int:
        return sum(math.prod(s) for _n, s, _l in self.tensors()) * self.itemsize

    @classmethod
    def for_size(cls, size_bytes: int, itemsize: int, layers: int = 8) -> Layout:
        """The smallest hidden size (a multiple of 16) whose tensors hold at least ``size_bytes``."""
        d = max(16, int(math.sqrt(size_bytes / (layers * 12 * itemsize))) // 16 * 16)
        while cls(d, layers, itemsize).data_bytes < size_bytes:
            d += 16
        return cls(d, layers, itemsize)


def frozen(layer: int) -> bool:
    """Even layers are frozen (identical in every version); odd layers are fine-tuned."""
    return layer % 2 == 0


def make_tensor(seed: int, index: int, shape: tuple[int, ...], version: int | None, dtype: str) -> np.ndarray:
    """Deterministic tensor ``index``; ``version`` None is the base, else base plus that version's update."""
    rng = np.random.default_rng([seed, index])
    if len(shape) == 1:
        base = np.ones(shape, np.float32) + rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)
    else:
        base = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    if version is not None:
        upd = np.random.default_rng([seed, index, version + 1]).random(shape, dtype=np.float32)
        base += (upd - np.float32(0.5)) * np.float32(2e-4 * (version + 1))
    if dtype == "bf16":  # bf16 bit pattern (truncated), stored as U16
        return (base.view(np.uint32) >> 16).astype(np.uint16)
    return base


@dataclass
class Series:
    files: list[Path]
    sizes: list[int]
    ids: list[str]
    layout: Layout
    frozen_bytes: int  # tensor bytes per file that never change
    header_bytes: int  # 8 + JSON header, identical in every version
    unique_bytes: int  # distinct bytes over the whole series (what perfect dedup would keep)

    @property
    def logical_bytes(self) -> int:
        return sum(self.sizes)


def generate_series(out: Path, n: int, size_bytes: int, dtype: str, seed: int) -> Series:
    itemsize = 2 if dtype == "bf16" else 4
    layout = Layout.for_size(size_bytes, itemsize)
    tensors = layout.tensors()
    frozen_cache: dict[str, np.ndarray] = {}
    files, sizes, ids = [], [], []
    frozen_bytes = sum(math.prod(s) for _n, s, layer in tensors if frozen(layer)) * itemsize
    for v in range(n):
        arrays = {}
        for i, (name, shape, layer) in enumerate(tensors):
            if frozen(layer):
                if name not in frozen_cache:
                    frozen_cache[name] = make_tensor(seed, i, shape, None, dtype)
                arrays[name] = frozen_cache[name]
            else:
                arrays[name] = make_tensor(seed, i, shape, v, dtype)
        path = out / f"checkpoint-{v:02d}" / "model.safetensors"
        path.parent.mkdir(parents=True)
        save_file(arrays, str(path))
        del arrays
        files.append(path)
        sizes.append(path.stat().st_size)
        ids.append(b3_file(path))  # also warms the page cache
    with open(files[0], "rb") as f:
        header_bytes = 8 + int.from_bytes(f.read(8), "little")
    unique = sizes[0] + sum(s - frozen_bytes - header_bytes for s in sizes[1:])
    return Series(files, sizes, ids, layout, frozen_bytes, header_bytes, unique)


def generate_big(path: Path, size_bytes: int, dtype: str, seed: int) -> tuple[int, str]:
    itemsize = 2 if dtype == "bf16" else 4
    layout = Layout.for_size(size_bytes, itemsize)
    tensors = layout.tensors()
    arrays = {name: make_tensor(seed + 1, i, shape, None, dtype) for i, (name, shape, _l) in enumerate(tensors)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(path))
    del arrays
    return path.stat().st_size, b3_file(path)


# -- the store under test ------------------------------------------------------------------


def init_store(path: Path, pack_max_mb: int | None) -> Repo:
    repo = Repo.init(path)
    if pack_max_mb is None:
        return repo
    repo.close()
    cfg_path = path / "config.toml"
    cfg = tomllib.loads(cfg_path.read_text())
    cfg.setdefault("packs", {})["max_size"] = pack_max_mb * 1024 * 1024
    cfg_path.write_text(tomli_w.dumps(cfg))
    return Repo.open(path)


def commit_file(repo: Repo, path: Path, branch: str, message: str, cwd: Path) -> Any:
    return repo.commit(path, branch=branch, message=message, kind="checkpoint", cwd=cwd)


# -- the benchmark ---------------------------------------------------------------------------


@dataclass
class Figure:
    key: str
    title: str
    unit: str
    values: list[float]
    baseline: str = ""
    baseline_values: list[float] = field(default_factory=list)
    higher_is_better: bool = True
    target: str = ""
    check: Callable[[float | None, float | None], bool] | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def result(self) -> dict[str, Any]:
        med = summarize(self.values)
        base = summarize(self.baseline_values) if self.baseline_values else None
        ratio = None
        if base and base["median"] and med["median"] is not None:
            ratio = med["median"] / base["median"]
        status = "-"
        if self.error:
            status = "ERROR"
        elif self.check is not None:
            status = "PASS" if med["median"] is not None and self.check(med["median"], ratio) else "FAIL"
        return {
            "title": self.title,
            "unit": self.unit,
            **{k: med[k] for k in ("median", "min", "max", "n", "values")},
            "baseline": self.baseline or None,
            "baseline_stats": base,
            "ratio": ratio,
            "higher_is_better": self.higher_is_better,
            "target": self.target or None,
            "status": status,
            "error": self.error,
            **self.extra,
        }


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.a = args
        self.work = work
        self.figures: list[Figure] = []
        self.raw: dict[str, Any] = {}
        self.errors: list[str] = []
        self.disk_peak = 0
        self.env = {k: v for k, v in os.environ.items() if k != "MSTORE_DIR"}
        exe = Path(sys.executable).parent / "mstore"
        self.mstore_cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mstore"]
        self.help_rss: list[float] = []
        self.repo: Repo | None = None

    def phase(self, name: str) -> None:
        """Record the machine's load when a phase starts (the machine may be shared)."""
        self.raw.setdefault("loadavg_1min", {})[name] = round(os.getloadavg()[0], 2)

    def note_disk(self) -> None:
        self.disk_peak = max(self.disk_peak, disk_usage(self.work))

    def fail(self, where: str, exc: BaseException) -> str:
        msg = f"{where}: {type(exc).__name__}: {exc}"
        self.errors.append(msg)
        log(f"  ERROR {msg}")
        if self.a.verbose:
            traceback.print_exc()
        return msg

    # -- series --------------------------------------------------------------------------
    def run_series(self) -> None:
        a = self.a
        log(f"generating {a.checkpoints} checkpoints of {a.size_mb} MB ({a.dtype}, seed {a.seed}) ...")
        t0 = time.perf_counter()
        s = generate_series(self.work / "series", a.checkpoints, a.size_mb * MB, a.dtype, a.seed)
        self.series = s
        self.raw["workload"] = {
            "checkpoints": len(s.files),
            "file_bytes": s.sizes,
            "logical_bytes": s.logical_bytes,
            "tensors_per_file": len(s.layout.tensors()),
            "frozen_tensors_per_file": sum(1 for _n, _s, la in s.layout.tensors() if frozen(la)),
            "frozen_bytes_per_file": s.frozen_bytes,
            "header_bytes": s.header_bytes,
            "unique_bytes": s.unique_bytes,
            "hidden": s.layout.hidden,
            "layers": s.layout.layers,
            "dtype": a.dtype,
            "seed": a.seed,
            "file_ids": s.ids,
            "generate_s": round(time.perf_counter() - t0, 3),
        }
        log(f"  {len(s.files)} x {s.sizes[0] / MB:.1f} MB in {time.perf_counter() - t0:.1f} s")
        self.note_disk()

        # Warm-up, untimed: imports and thread pools of the first commit, a first read of every file.
        warm = init_store(self.work / "warmup-store", a.pack_max_mb)
        commit_file(warm, s.files[0], "warmup", "warm-up", self.work)
        warm.close()
        rmtree(self.work / "warmup-store")
        for f in s.files:
            b3_file(f)

        self.phase_commit()
        self.phase_recommit()
        self.phase_checkout()

    def phase_commit(self) -> None:
        a, s = self.a, self.series
        self.phase("commit")
        log(f"commit: {a.repeat} x the series into an empty store, beside cp, cp+fsync and BLAKE3 ...")
        names = ["mstore", "cp", "cp+fsync", "blake3"]
        times: dict[str, list[list[Timing]]] = {n: [] for n in names}
        results: list[list[dict[str, int]]] = []
        stored: list[int] = []
        error = None
        for rep in range(a.repeat):
            for name in order_for(rep, names):
                row: list[Timing] = []
                if name == "mstore":
                    if self.repo is not None:
                        self.repo.close()
                        rmtree(self.work / "store")
                    repo = self.repo = init_store(self.work / "store", a.pack_max_mb)
                    res_row = []
                    try:
                        for i, f in enumerate(s.files):
                            t, res = timed(
                                lambda r=repo, f=f, i=i: commit_file(r, f, "series", f"checkpoint {i}", self.work),
                                warm=2 * f.stat().st_size,
                            )
                            row.append(t)
                            res_row.append(
                                {
                                    "new_bytes": getattr(res, "new_bytes", None),
                                    "stored_bytes": getattr(res, "stored_bytes", None),
                                }
                            )
                    except Exception as exc:
                        error = self.fail(f"commit (repetition {rep})", exc)
                        break
                    results.append(res_row)
                    stored.append(repo.stored_bytes())
                    self.note_disk()
                elif name in ("cp", "cp+fsync"):
                    dst = self.work / "cp"
                    fn = copy_file if name == "cp" else copy_file_fsync
                    for i, f in enumerate(s.files):
                        (dst / str(i)).mkdir(parents=True)
                        t, _ = timed(lambda fn=fn, f=f, d=dst / str(i): fn(f, d / f.name), warm=2 * f.stat().st_size)
                        row.append(t)
                    self.note_disk()
                    rmtree(dst)
                else:
                    for f in s.files:
                        t, _ = timed(lambda f=f: b3_file(f))
                        row.append(t)
                times[name].append(row)
            if error:
                break

        def first(rows: list[list[Timing]]) -> list[float]:
            return [s.sizes[0] / MB / r[0].wall for r in rows if r]

        def rest(rows: list[list[Timing]]) -> list[float]:
            return [sum(s.sizes[1:]) / MB / sum(t.wall for t in r[1:]) for r in rows if len(r) == len(s.files)]

        cpu_first = [r[0].cpu / r[0].wall for r in times["mstore"] if r]
        bases = (("cp", "commit_new_vs_cp"), ("cp+fsync", "commit_new_vs_cp_fsync"), ("blake3", "commit_new_vs_b3"))
        for base, key in bases:
            self.figures.append(
                Figure(
                    key,
                    "commit, new data (1st checkpoint, empty store)",
                    "MB/s",
                    first(times["mstore"]),
                    base,
                    first(times[base]),
                    error=error,
                    extra={"cores_busy": summarize(cpu_first)["median"]} if base == "cp" else {},
                )
            )
        new_rest = []
        for r, res in zip(times["mstore"], results, strict=False):
            if len(r) == len(s.files) and res and res[1]["new_bytes"] is not None:
                new_rest.append(sum(x["new_bytes"] for x in res[1:]) / MB / sum(t.wall for t in r[1:]))
        for base, key in (("cp", "commit_series_vs_cp"), ("blake3", "commit_series_vs_b3")):
            self.figures.append(
                Figure(
                    key,
                    f"commit, checkpoints 2..{len(s.files)} (half the tensors new)",
                    "MB/s",
                    rest(times["mstore"]),
                    base,
                    rest(times[base]),
                    error=error,
                    extra={"new_data_mb_per_s": summarize(new_rest)} if base == "cp" else {},
                )
            )
        self.raw["commit"] = {
            n: [[{"wall": round(t.wall, 6), "cpu": round(t.cpu, 6)} for t in row] for row in rows]
            for n, rows in times.items()
        }
        self.raw["commit_results"] = results
        # Store bytes / logical bytes over the whole series (every repetition builds the same store).
        if stored:
            ratio = [x / s.logical_bytes for x in stored]
            ideal = s.unique_bytes / s.logical_bytes
            self.figures.append(
                Figure(
                    "store_ratio",
                    f"store bytes / logical bytes ({len(s.files)} checkpoints)",
                    "x",
                    ratio,
                    "unique bytes / logical",
                    [ideal],
                    higher_is_better=False,
                    target="<= unique bytes",
                    check=lambda m, r: r is not None and r <= 1.0,
                    extra={
                        "stored_bytes": stored,
                        "logical_bytes": s.logical_bytes,
                        "unique_bytes": s.unique_bytes,
                        "new_bytes_reported": [sum(x["new_bytes"] or 0 for x in res) for res in results],
                        "pack_bytes_written_reported": [sum(x["stored_bytes"] or 0 for x in res) for res in results],
                    },
                )
            )

    def phase_recommit(self) -> None:
        a, s = self.a, self.series
        repo = self.repo
        self.phase("recommit")
        log(f"re-commit unchanged: {a.repeat} x every checkpoint again, beside BLAKE3 ...")
        times: dict[str, list[list[Timing]]] = {"mstore": [], "blake3": []}
        new_bytes: list[int] = []
        error = None
        if repo is None or len(self.raw.get("commit_results", [])) == 0:
            error = "no store (commit failed)"
        for rep in range(a.repeat if error is None else 0):
            for name in order_for(rep, ["mstore", "blake3"]):
                row: list[Timing] = []
                if name == "mstore":
                    try:
                        for i, f in enumerate(s.files):
                            t, res = timed(lambda f=f, i=i: commit_file(repo, f, "recommit", f"again {i}", self.work))
                            row.append(t)
                            new_bytes.append(getattr(res, "new_bytes", 0) or 0)
                    except Exception as exc:
                        error = self.fail(f"re-commit (repetition {rep})", exc)
                        break
                else:
                    for f in s.files:
                        t, _ = timed(lambda f=f: b3_file(f))
                        row.append(t)
                times[name].append(row)
            if error:
                break

        def mbs(rows: list[list[Timing]]) -> list[float]:
            return [s.logical_bytes / MB / sum(t.wall for t in r) for r in rows if len(r) == len(s.files)]

        cpu = [sum(t.cpu for t in r) / sum(t.wall for t in r) for r in times["mstore"] if r]
        self.figures.append(
            Figure(
                "recommit",
                "re-commit, unchanged data (every checkpoint)",
                "MB/s",
                mbs(times["mstore"]),
                "blake3",
                mbs(times["blake3"]),
                target=">= 1000 MB/s",
                check=lambda m, r: m is not None and m >= RECOMMIT_MIN_MBS,
                error=error,
                extra={
                    "cores_busy": summarize(cpu)["median"],
                    "max_new_bytes_per_recommit": max(new_bytes, default=None),
                },
            )
        )
        self.raw["recommit"] = {
            n: [[{"wall": round(t.wall, 6), "cpu": round(t.cpu, 6)} for t in row] for row in rows]
            for n, rows in times.items()
        }

    def phase_checkout(self) -> None:
        a, s = self.a, self.series
        repo = self.repo
        n = len(s.files)
        self.phase("checkout")
        log(f"checkout: one untimed round, then {a.repeat} x every checkpoint into an empty directory, beside cp ...")
        times: dict[str, list[list[Timing]]] = {"mstore": [], "cp": []}
        error = None
        if repo is None or len(self.raw.get("commit_results", [])) == 0:
            error = "no store (commit failed)"
        if error is None:
            # One untimed round of each, outputs deleted: the timed rounds then start alike. The
            # first writer after the re-commit phase (which frees no page cache) otherwise pays
            # for fresh pages that the later ones reuse: in one run, every one of mstore's first
            # round of checkouts took 0.51 s, and 0.08-0.15 s two rounds later.
            try:
                for i, f in enumerate(s.files):
                    rev = f"series~{n - 1 - i}" if i < n - 1 else "series"
                    repo.checkout(rev, self.work / "warm-mstore" / str(i))
                    (self.work / "warm-cp" / str(i)).mkdir(parents=True)
                    copy_file(f, self.work / "warm-cp" / str(i) / f.name)
            finally:
                rmtree(self.work / "warm-mstore")
                rmtree(self.work / "warm-cp")
        for rep in range(a.repeat if error is None else 0):
            for name in order_for(rep, ["mstore", "cp"]):
                row: list[Timing] = []
                dst = self.work / f"out-{name}"
                try:
                    for i, f in enumerate(s.files):
                        d = dst / str(i)
                        if name == "mstore":
                            rev = f"series~{n - 1 - i}" if i < n - 1 else "series"
                            t, _ = timed(lambda rev=rev, d=d: repo.checkout(rev, d), warm=2 * f.stat().st_size)
                        else:
                            d.mkdir(parents=True)
                            t, _ = timed(lambda f=f, d=d: copy_file(f, d / f.name), warm=2 * f.stat().st_size)
                        row.append(t)
                    if name == "mstore":  # untimed: the checkout must give back exactly the committed bytes
                        for i, f in enumerate(s.files):
                            got = b3_file(dst / str(i) / f.name)
                            if got != s.ids[i]:
                                raise RuntimeError(f"checkout of checkpoint {i} differs from what was committed")
                except Exception as exc:
                    error = self.fail(f"checkout (repetition {rep})", exc)
                    break
                finally:
                    self.note_disk()
                    rmtree(dst)
                times[name].append(row)
            if error:
                break

        def mbs(rows: list[list[Timing]]) -> list[float]:
            return [s.logical_bytes / MB / sum(t.wall for t in r) for r in rows if len(r) == n]

        def per_checkpoint(rows: list[list[Timing]]) -> list[float]:
            # Each checkpoint's median time over the rounds, summed: a step that one round's
            # disturbance slowed (a burst of unbacked pages, another process) is outvoted by
            # its other rounds, for the contender and the baseline alike.
            full = [r for r in rows if len(r) == n]
            if not full:
                return []
            return [s.logical_bytes / MB / sum(statistics.median(r[i].wall for r in full) for i in range(n))]

        cpu = [sum(t.cpu for t in r) / sum(t.wall for t in r) for r in times["mstore"] if len(r) == n]
        self.figures.append(
            Figure(
                "checkout",
                "checkout (verified), median per checkpoint",
                "MB/s",
                per_checkpoint(times["mstore"]),
                "cp",
                per_checkpoint(times["cp"]),
                target=">= 0.5x cp",
                check=lambda m, r: r is not None and r >= CHECKOUT_MIN_RATIO,
                error=error,
                extra={"cores_busy": summarize(cpu)["median"]},
            )
        )
        self.figures.append(
            Figure(
                "checkout_rounds",
                "checkout (verified), whole rounds",
                "MB/s",
                mbs(times["mstore"]),
                "cp",
                mbs(times["cp"]),
                error=error,
            )
        )
        self.raw["checkout"] = {
            n_: [[{"wall": round(t.wall, 6), "cpu": round(t.cpu, 6)} for t in row] for row in rows]
            for n_, rows in times.items()
        }

    # -- CLI start-up -----------------------------------------------------------------------
    def phase_cli(self) -> None:
        a = self.a
        store = self.work / "store"
        self.phase("cli")
        log(f"CLI start-up: {a.cli_runs} x each command as a whole process, beside `python -c pass` ...")
        cmds = {
            "help": [*self.mstore_cmd, "--help"],
            "log": [*self.mstore_cmd, "--store", str(store), "log", "series"],
            "python": [sys.executable, "-c", "pass"],
        }
        have_store = (store / "config.toml").is_file() and self.repo is not None
        if not have_store:
            cmds.pop("log")
        times: dict[str, list[float]] = {k: [] for k in cmds}
        rss: dict[str, list[float]] = {k: [] for k in cmds}
        errors: dict[str, str] = {}
        for cmd in cmds.values():  # one untimed run each: page in the interpreter and packages
            run_child(cmd, self.work, self.env, sync=False)
        names = list(cmds)
        for rep in range(a.cli_runs):
            shift = rep % len(names)
            for k in names[shift:] + names[:shift]:
                r = run_child(cmds[k], self.work, self.env, sync=False)
                if r.rc != 0:
                    errors[k] = f"exit {r.rc}: {r.stderr.strip()[-300:]}"
                times[k].append(r.wall)
                rss[k].append(r.maxrss_mb)
        self.help_rss = rss["help"]
        imports = {k: import_profile(cmd, self.work, self.env) for k, cmd in cmds.items() if k != "python"}
        for k, title in (("help", "start-up, `mstore --help`"), ("log", "start-up, `mstore log BRANCH`")):
            if k not in cmds:
                self.figures.append(Figure(f"startup_{k}", title, "s", [], error="no store to read"))
                continue
            self.figures.append(
                Figure(
                    f"startup_{k}",
                    title,
                    "s",
                    times[k],
                    "python -c pass",
                    times["python"],
                    higher_is_better=False,
                    target="<= 0.15 s",
                    check=lambda m, r: m is not None and m <= STARTUP_MAX_S,
                    error=errors.get(k),
                    extra={"imports": imports.get(k), "peak_rss_mb": summarize(rss[k])["median"]},
                )
            )
        self.raw["cli"] = {"times": times, "peak_rss_mb": rss, "commands": {k: " ".join(v) for k, v in cmds.items()}}

    # -- one big file: peak RSS ---------------------------------------------------------------
    def phase_big(self) -> None:
        a = self.a
        big = self.work / "big" / "model.safetensors"
        self.phase("big")
        log(f"peak RSS: generating one {a.big_mb} MB safetensors file ...")
        t0 = time.perf_counter()
        size, fid = generate_big(big, a.big_mb * MB, a.dtype, a.seed)
        log(f"  {size / MB:.0f} MB in {time.perf_counter() - t0:.1f} s")
        b3_file(big)  # warm
        self.note_disk()
        cp = shutil.which("cp")
        runs: dict[str, list[ChildResult]] = {"commit": [], "checkout": [], "cp": []}
        err_commit = err_checkout = None
        log(f"  {a.repeat} x `mstore commit` and `mstore checkout` of it (fresh child and store each), beside `cp` ...")
        for rep in range(a.repeat):
            store = self.work / "big-store"
            dest = self.work / "big-out"
            for step in order_for(rep, ["mstore", "cp"]):
                if step == "cp":
                    if cp is None:
                        continue
                    dest.mkdir()
                    r = run_child([cp, str(big), str(dest / big.name)], self.work, self.env)
                    runs["cp"].append(r)
                    self.note_disk()
                    rmtree(dest)
                    continue
                init_store(store, a.pack_max_mb).close()
                r = run_child(
                    [*self.mstore_cmd, "--store", str(store), "commit", str(big), "-b", "big", "-m", "one big file",
                     "--kind", "checkpoint"],
                    self.work,
                    self.env,
                )
                runs["commit"].append(r)
                if r.rc != 0:
                    err_commit = f"`mstore commit` exited {r.rc}: {r.stderr.strip()[-400:]}"
                    self.errors.append(err_commit)
                else:
                    cmd = [*self.mstore_cmd, "--store", str(store), "checkout", "big", str(dest)]
                    r = run_child(cmd, self.work, self.env)
                    runs["checkout"].append(r)
                    self.note_disk()
                    if r.rc != 0:
                        err_checkout = f"`mstore checkout` exited {r.rc}: {r.stderr.strip()[-400:]}"
                        self.errors.append(err_checkout)
                    elif b3_file(dest / big.name) != fid:
                        err_checkout = "checkout of the big file differs from what was committed"
                        self.errors.append(err_checkout)
                rmtree(dest)
                rmtree(store)
        ok_commit = [r for r in runs["commit"] if r.rc == 0]
        ok_checkout = [r for r in runs["checkout"] if r.rc == 0]
        help_rss = self.help_rss
        self.figures.append(
            Figure(
                "rss_commit_big",
                f"peak RSS, `mstore commit` of one {size / MB:.0f} MB file",
                "MB",
                [r.maxrss_mb for r in ok_commit],
                "mstore --help",
                help_rss,
                higher_is_better=False,
                target="<= 400 MB",
                check=lambda m, r: m is not None and m <= COMMIT_RSS_MAX_MB,
                error=err_commit,
            )
        )
        self.figures.append(
            Figure(
                "rss_checkout_big",
                f"peak RSS, `mstore checkout` of one {size / MB:.0f} MB file",
                "MB",
                [r.maxrss_mb for r in ok_checkout],
                "mstore --help",
                help_rss,
                higher_is_better=False,
                error=err_checkout,
            )
        )
        cp_mbs = [size / MB / r.wall for r in runs["cp"] if r.rc == 0]
        self.figures.append(
            Figure(
                "commit_big_process",
                f"`mstore commit` of one {size / MB:.0f} MB file (whole process)",
                "MB/s",
                [size / MB / r.wall for r in ok_commit],
                "cp process",
                cp_mbs,
                error=err_commit,
                extra={"cores_busy": summarize([r.cpu / r.wall for r in ok_commit])["median"]},
            )
        )
        self.figures.append(
            Figure(
                "checkout_big_process",
                f"`mstore checkout` of one {size / MB:.0f} MB file (whole process)",
                "MB/s",
                [size / MB / r.wall for r in ok_checkout],
                "cp process",
                cp_mbs,
                error=err_checkout,
                extra={"cores_busy": summarize([r.cpu / r.wall for r in ok_checkout])["median"]},
            )
        )
        self.raw["big"] = {
            "file_bytes": size,
            "file_id": fid,
            **{
                k: [
                    {"rc": r.rc, "wall": round(r.wall, 4), "cpu": round(r.cpu, 4), "maxrss_mb": round(r.maxrss_mb, 1)}
                    for r in v
                ]
                for k, v in runs.items()
            },
        }
        rmtree(big.parent)

    # -- optional profile ---------------------------------------------------------------------
    def phase_profile(self, out_dir: Path) -> None:
        """cProfile of one commit of new data, one unchanged re-commit and one checkout (main thread)."""
        s = self.series
        out_dir.mkdir(parents=True, exist_ok=True)
        store = self.work / "profile-store"
        repo = init_store(store, self.a.pack_max_mb)
        steps = [
            ("commit_new", lambda: commit_file(repo, s.files[0], "p", "profile", self.work)),
            ("recommit", lambda: commit_file(repo, s.files[0], "p", "profile again", self.work)),
            ("checkout", lambda: repo.checkout("p", self.work / "profile-out")),
        ]
        self.raw["profile"] = {}
        for name, fn in steps:
            prof = cProfile.Profile()
            os.sync()
            try:
                prof.runcall(fn)
            except Exception as exc:
                self.fail(f"profile {name}", exc)
            buf = io.StringIO()
            st = pstats.Stats(prof, stream=buf).sort_stats("tottime")
            st.print_stats(15)
            text = buf.getvalue()
            (out_dir / f"profile-{name}.txt").write_text(text)
            self.raw["profile"][name] = str(out_dir / f"profile-{name}.txt")
            log(f"\n--- profile: {name} (main thread, by own time) ---\n" + _trim_profile(text))
        repo.close()
        rmtree(store)
        rmtree(self.work / "profile-out")


def _trim_profile(text: str) -> str:
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("ncalls")), 0)
    return "\n".join(lines[start : start + 16])


_IMPORT_RE = re.compile(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|\s+(.*)$")


def import_profile(cmd: Sequence[str], cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """Modules a command imports (``-X importtime``): how many, their total time, the heaviest."""
    if Path(cmd[0]).name == "mstore" or cmd[:3] == [sys.executable, "-m", "mstore"]:
        args = list(cmd[1:]) if Path(cmd[0]).name == "mstore" else list(cmd[3:])
        full = [sys.executable, "-X", "importtime", "-c", "from mstore.cli import main; main()", *args]
    else:
        return {}
    p = subprocess.run(full, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    mods = []
    for line in p.stderr.splitlines():
        m = _IMPORT_RE.match(line)
        if m:
            mods.append((int(m.group(1)), m.group(3).strip()))
    total_us = sum(us for us, _ in mods)
    top = sorted(mods, reverse=True)[:8]
    return {
        "modules": len(mods),
        "self_time_ms": round(total_us / 1000, 1),
        "heaviest": [{"module": name, "self_ms": round(us / 1000, 1)} for us, name in top],
        "mstore_modules": sorted({name for _us, name in mods if name.startswith("mstore")}),
    }


# -- report ----------------------------------------------------------------------------------


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "s":
        return f"{v:.3f}"
    if unit == "x":
        return f"{v:.3f}"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}"


def render_table(results: dict[str, dict[str, Any]]) -> str:
    head = ["figure", "unit", "median", "min", "max", "baseline", "base med", "ratio", "target", "result"]
    rows = [head]
    for r in results.values():
        base = r["baseline_stats"] or {}
        rows.append(
            [
                r["title"],
                r["unit"],
                fmt(r["median"], r["unit"]),
                fmt(r["min"], r["unit"]),
                fmt(r["max"], r["unit"]),
                r["baseline"] or "-",
                fmt(base.get("median"), r["unit"]) if base else "-",
                f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-",
                r["target"] or "-",
                r["status"],
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    right = {2, 3, 4, 6, 7}
    lines = []
    for j, row in enumerate(rows):
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpus": os.cpu_count(),
    }
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gb"] = round(int(line.split()[1]) * 1024 / 1e9, 1)
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("mstore", "blake3", "zstandard", "lmdb", "numpy", "safetensors", "click"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    info["packages"] = versions
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
        if rev.returncode == 0:
            info["code_revision"] = rev.stdout.strip()
    except OSError:
        pass
    return info


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run (under a minute)")
    p.add_argument("--checkpoints", type=int, help="checkpoints in the series (default 6; quick 5)")
    p.add_argument("--size-mb", type=int, help="size of each checkpoint in MB (default 256; quick 24)")
    p.add_argument("--big-mb", type=int, help="size of the single file for peak RSS in MB (default 2048; quick 128)")
    p.add_argument("--repeat", type=int, help="repetitions of every timed measurement (default 3, minimum 3)")
    p.add_argument("--cli-runs", type=int, help="runs of each start-up command (default 15; quick 10)")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32", help="element type (bf16 is stored as U16)")
    p.add_argument("--seed", type=int, default=1234, help="workload seed")
    p.add_argument("--pack-max-mb", type=int, help="set [packs] max_size of the bench stores (default: untouched)")
    p.add_argument("--skip-big", action="store_true", help="skip the single-big-file peak RSS phase")
    p.add_argument("--profile", action="store_true", help="also cProfile one commit, re-commit and checkout")
    p.add_argument("--workdir", type=Path, help="where to create the scratch directory (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="output file (default bench/out/store.json)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any target is missed")
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of errors")
    a = p.parse_args(argv)
    defaults = (5, 24, 128, 3, 10) if a.quick else (6, 256, 2048, 3, 15)
    for name, d in zip(("checkpoints", "size_mb", "big_mb", "repeat", "cli_runs"), defaults, strict=True):
        if getattr(a, name) is None:
            setattr(a, name, d)
    if a.repeat < 3:
        p.error("--repeat must be at least 3 (medians of fewer runs mean little)")
    if a.checkpoints < 2:
        p.error("--checkpoints must be at least 2")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    installed_bytecode()
    started = time.perf_counter()
    base = a.workdir
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mstore-bench-", dir=base))
    bench = Bench(a, work)
    log(f"scratch directory {work}")
    try:
        try:
            bench.run_series()
        except Exception as exc:
            bench.fail("series", exc)
        if a.profile and hasattr(bench, "series"):
            bench.phase_profile(a.json.parent)
        try:
            bench.phase_cli()
        except Exception as exc:
            bench.fail("cli", exc)
        if bench.repo is not None:
            bench.repo.close()
        rmtree(work / "series")
        rmtree(work / "store")
        if not a.skip_big:
            try:
                bench.phase_big()
            except Exception as exc:
                bench.fail("big file", exc)
    finally:
        if a.keep:
            log(f"kept {work}")
        else:
            rmtree(work)
    runtime = time.perf_counter() - started
    results = {f.key: f.result() for f in bench.figures}
    doc = {
        "date": now_iso(),
        "runtime_s": round(runtime, 1),
        "machine": machine_info(),
        "params": {
            "quick": a.quick,
            "checkpoints": a.checkpoints,
            "size_mb": a.size_mb,
            "big_mb": a.big_mb,
            "repeat": a.repeat,
            "cli_runs": a.cli_runs,
            "dtype": a.dtype,
            "seed": a.seed,
            "pack_max_mb": a.pack_max_mb,
            "mb": "decimal (1 MB = 10^6 bytes)",
            "cache": "warm: every file is read once before timing; contender and baseline read the same cached bytes",
        },
        "figures": results,
        "peak_disk_bytes": bench.disk_peak,
        "errors": bench.errors,
        "raw": bench.raw,
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print()
    print(render_table(results))
    print()
    for k in ("startup_help", "startup_log"):
        imp = results.get(k, {}).get("imports")
        if imp:
            heavy = ", ".join(f"{h['module']} {h['self_ms']} ms" for h in imp["heaviest"][:5])
            print(f"{k}: {imp['modules']} modules imported ({imp['self_time_ms']} ms); heaviest: {heavy}")
    print(f"peak scratch disk use {bench.disk_peak / 1e9:.2f} GB; runtime {runtime:.0f} s; numbers in {a.json}")
    busy = {k: v for k, v in bench.raw.get("loadavg_1min", {}).items() if v > 0.5 * (os.cpu_count() or 1)}
    if busy:
        print(f"note: the machine was busy (1-minute load average by phase: {busy}); expect noisy absolute figures")
    for e in bench.errors:
        print(f"ERROR: {e}")
    if bench.errors:
        return 2
    if a.strict and any(r["status"] == "FAIL" for r in results.values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
