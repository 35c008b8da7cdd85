#!/usr/bin/env python3
"""What a checkpoint series costs: mstore against DVC, plain cp and (for one file) ZipNN.

Workloads (bench/series_workloads.py, generated deterministically and cached by a hash of their
parameters): a full fine-tune in fp32 with optimizer state, a partial fine-tune saved in bf16
with the lower half frozen, base + LoRA adapters + merged model, JSONL dataset versions, and
real pretrained weights (all-MiniLM-L6-v2, fp32 and bf16) for the single-file ratio.

Every contender runs as a command-line process in this one run, in alternating order between
repetitions: ``mstore commit`` / ``mstore checkout``; ``dvc add`` + ``git commit`` /
``git checkout`` + ``dvc checkout``; ``cp -r``. Every checkout is verified byte for byte
(BLAKE3) against the generated files. docs/bench.md explains every figure.

    python bench/bench_series.py            # the full run (make bench-series), ~10 min on 2 cores
    python bench/bench_series.py --quick    # small model, fewer versions, 2 repetitions: a smoke run

Numbers go to bench/out/series.json and a chart to bench/out/series.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))

import series_workloads as wl  # noqa: E402
from bench_store import (  # noqa: E402  (the house helpers: same measurement, same wrapper)
    MB,
    ChildResult,
    Layout,
    b3_file,
    disk_usage,
    generate_big,
    installed_bytecode,
    log,
    machine_info,
    make_tensor,
    now_iso,
    order_for,
    rmtree,
    run_child,
    summarize,
    timed,
)

from mstore import Repo  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
DEFAULT_WORKDIR = OUT / "series-work"

SERIES = ("full_ft", "partial_ft", "lora", "jsonl")
TITLES = {
    "full_ft": "full fine-tune fp32 + optimizer",
    "partial_ft": "partial fine-tune bf16 (lower half frozen)",
    "lora": "base + LoRA adapters + merged",
    "jsonl": "JSONL dataset versions",
}
KINDS = {"full_ft": "checkpoint", "partial_ft": "checkpoint", "lora": "adapter", "jsonl": "dataset"}
CONTENDERS = ("mstore", "dvc", "cp")

# Targets from issue 5.
RATIO_TARGETS = {"partial_ft": 0.30, "full_ft": 0.70, "lora": 0.50, "jsonl": 0.15}
COMMIT_VS_DVC_MIN = 2.0  # mstore commit throughput >= 2x DVC's
CHECKOUT_VS_DVC_MAX = 1.0  # mstore checkout time <= DVC's
SINGLE_TARGETS = {"fp32": 1.21, "bf16": 1.50}
BIG_RSS_MAX_MB = 400.0  # peak RSS committing / checking out a 4 GB checkpoint
# --scale: every version is the base plus uniform noise of this amplitude (what make_tensor adds
# for the second version), and each store size is the median over this many commits (one
# keyframe cycle at the default max_depth 8).
SCALE_STEP = 4e-4
SCALE_WINDOW = 9

QUICK_MODEL = wl.ModelSpec(vocab=2048, hidden=128, layers=4, heads=4, intermediate=344, versions=3, steps=1,
                           lora_versions=2, lora_r=8)
QUICK_JSONL = wl.JsonlSpec(shards=4, records_per_shard=4000)


# ``--mstore-config SECTION.KEY=VALUE`` overrides, applied to every store the bench creates.
MSTORE_CONFIG: dict[str, dict[str, Any]] = {}


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["delta.enabled=true"]`` -> ``{"delta": {"enabled": True}}`` (values are TOML literals)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, val = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise ValueError(f"--mstore-config wants SECTION.KEY=VALUE, not {item!r}")
        try:
            value = tomllib.loads(f"v = {val.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = val.strip()  # a bare word is taken as a string
        out.setdefault(section, {})[name] = value
    return out


def init_mstore(path: Path) -> Repo:
    """A fresh store at ``path`` with the ``--mstore-config`` overrides written into its config.toml."""
    repo = Repo.init(path)
    if not MSTORE_CONFIG:
        return repo
    repo.close()
    cfg_path = path / "config.toml"
    cfg = tomllib.loads(cfg_path.read_text())
    for section, values in MSTORE_CONFIG.items():
        cfg.setdefault(section, {}).update(values)
    cfg_path.write_text(tomli_w.dumps(cfg))
    return Repo.open(path)


def tree_bytes(path: Path) -> int:
    """Apparent size of every file under ``path`` (what the files hold, not blocks allocated)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def check_tree(dest: Path, expected: dict[str, str]) -> str | None:
    """None if ``dest`` holds exactly the expected files with the expected BLAKE3, else what differs."""
    got = wl.manifest(dest) if dest.is_dir() else {}
    if got == expected:
        return None
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    return f"checkout differs: missing {missing[:3]}, extra {extra[:3]}, wrong bytes {wrong[:3]}"


@dataclass
class Run:
    """One contender's pass over one series: commit every version, then check out every version."""

    commit: list[ChildResult] = field(default_factory=list)  # per version (DVC: dvc add only)
    commit_extra: list[ChildResult] = field(default_factory=list)  # DVC: git add + git commit
    checkout: list[ChildResult] = field(default_factory=list)
    checkout_extra: list[ChildResult] = field(default_factory=list)  # DVC: git checkout of the .dvc file
    stored_bytes: int | None = None
    metadata_bytes: int | None = None  # mstore: LMDB index (blocks allocated); DVC: the git repo
    error: str | None = None

    def commit_wall(self) -> float:
        return sum(r.wall for r in self.commit) + sum(r.wall for r in self.commit_extra)

    def checkout_wall(self) -> float:
        return sum(r.wall for r in self.checkout) + sum(r.wall for r in self.checkout_extra)

    def to_dict(self) -> dict[str, Any]:
        def rows(rs: list[ChildResult]) -> list[dict[str, Any]]:
            return [{"rc": r.rc, "wall": round(r.wall, 4), "cpu": round(r.cpu, 4), "maxrss_mb": round(r.maxrss_mb, 1)}
                    for r in rs]

        return {"commit": rows(self.commit), "commit_extra": rows(self.commit_extra),
                "checkout": rows(self.checkout), "checkout_extra": rows(self.checkout_extra),
                "stored_bytes": self.stored_bytes, "metadata_bytes": self.metadata_bytes, "error": self.error}


class Contenders:
    """How each contender commits and checks out a series, each step one child process."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        exe = Path(sys.executable).parent
        self.mstore = [str(exe / "mstore")] if (exe / "mstore").exists() else [sys.executable, "-m", "mstore"]
        self.dvc = [str(exe / "dvc")] if (exe / "dvc").exists() else (shutil.which("dvc") and ["dvc"])
        self.git = shutil.which("git")
        self.cp = shutil.which("cp")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MSTORE_", "DVC_", "GIT_"))}
        env.update({
            # DVC: no analytics, no update check, no Studio, and nothing outside the scratch dir.
            "DVC_NO_ANALYTICS": "1",
            "DVC_STUDIO_OFFLINE": "1",
            "DVC_SITE_CACHE_DIR": str(scratch / "dvc-site"),
            "DVC_GLOBAL_CONFIG_DIR": str(scratch / "dvc-global"),
            "DVC_SYSTEM_CONFIG_DIR": str(scratch / "dvc-system"),
            "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
            "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost",
            "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
        })
        self.env = env

    def missing(self, name: str) -> str | None:
        if name == "dvc" and (not self.dvc or not self.git):
            return "dvc or git not installed (pip install -e '.[bench]')"
        if name == "cp" and not self.cp:
            return "cp not found"
        return None

    def _must(self, cmd: list[str], cwd: Path) -> None:
        p = subprocess.run(cmd, cwd=cwd, env=self.env, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} exited {p.returncode}: {p.stderr.strip()[-300:]}")

    @staticmethod
    def _ok(r: ChildResult, what: str) -> None:
        if r.rc != 0:
            raise RuntimeError(f"{what} exited {r.rc}: {r.stderr.strip()[-400:]}")

    def run(self, name: str, s: wl.Series) -> Run:
        run = Run()
        base = self.scratch / name
        rmtree(base)
        base.mkdir(parents=True)
        try:
            getattr(self, f"_run_{name}")(s, base, run)
        except Exception as exc:  # a failed step is reported as ERROR, never as a figure
            run.error = f"{type(exc).__name__}: {exc}"
        finally:
            rmtree(base)
        return run

    # mstore: the CLI as a process, one `mstore commit` per version onto one branch.
    def _run_mstore(self, s: wl.Series, base: Path, run: Run) -> None:
        warm = self.warm_bytes(s)
        store = base / "store"
        init_mstore(store).close()
        n = len(s.versions)
        for i, v in enumerate(s.versions):
            # --allow-regression: the series shrink on purpose (an adapter after a base model, a
            # deleted shard); the guards still run, and their cost is inside the figure.
            r = run_child([*self.mstore, "--store", str(store), "commit", str(v), "-b", "series", "-m", f"v{i}",
                           "--kind", KINDS[s.name], "--allow-regression"], base, self.env, warm=warm[i])
            self._ok(r, f"mstore commit v{i}")
            run.commit.append(r)
        with Repo.open(store) as repo:
            run.stored_bytes = repo.stored_bytes()
        run.metadata_bytes = disk_usage(store) - disk_usage(store / "packs")
        for i in range(n):
            dest = base / "out" / f"v{i:02d}"
            rev = f"series~{n - 1 - i}" if i < n - 1 else "series"
            r = run_child([*self.mstore, "--store", str(store), "checkout", rev, str(dest)], base, self.env,
                          warm=warm[i])
            self._ok(r, f"mstore checkout v{i}")
            run.checkout.append(r)
            bad = check_tree(dest, s.files[i])
            if bad:
                raise RuntimeError(f"v{i}: {bad}")
            rmtree(dest)

    @staticmethod
    def warm_bytes(s: wl.Series) -> list[int]:
        """Per version, the memory to back before a step that writes it (twice its size).

        Every contender's writing steps alike; see bench_store.warm_free_memory: on these VMs
        the first write into memory the host took back costs a host fault per page.
        """
        return [2 * tree_bytes(v) for v in s.versions]

    def dvc_workspace(self, base: Path) -> Path:
        """A fresh git + DVC workspace under ``base``: no analytics, no update checks, copies."""
        ws = base / "ws"
        ws.mkdir()
        self._must([self.git, "init", "-q"], ws)
        self._must([*self.dvc, "init", "-q"], ws)
        for key, val in (("core.analytics", "false"), ("core.check_update", "false"), ("cache.type", "copy")):
            self._must([*self.dvc, "config", key, val], ws)
        return ws

    # DVC: a git repo + dvc init; per version the workspace gets that version's files (untimed,
    # like a training run writing them), then `dvc add data` and `git add` + `git commit` of the
    # .dvc file (timed, both). Checkout: the workspace is emptied (untimed), so every byte is
    # written as for the others, then `git checkout SHA -- data.dvc` + `dvc checkout` (timed).
    def _run_dvc(self, s: wl.Series, base: Path, run: Run) -> None:
        warm = self.warm_bytes(s)
        ws = self.dvc_workspace(base)
        self._must([self.git, "add", "-A"], ws)
        self._must([self.git, "commit", "-q", "-m", "dvc init"], ws)
        data = ws / "data"
        shas = []
        for i, v in enumerate(s.versions):
            rmtree(data)
            shutil.copytree(v, data)
            r = run_child([*self.dvc, "add", "-q", "data"], ws, self.env, warm=warm[i])
            self._ok(r, f"dvc add v{i}")
            run.commit.append(r)
            r1 = run_child([self.git, "add", "data.dvc", ".gitignore"], ws, self.env)
            self._ok(r1, "git add")
            r2 = run_child([self.git, "commit", "-q", "-m", f"v{i}"], ws, self.env)
            self._ok(r2, "git commit")
            run.commit_extra.append(ChildResult(0, r1.wall + r2.wall, r1.cpu + r2.cpu,
                                                max(r1.maxrss_mb, r2.maxrss_mb), ""))
            shas.append(subprocess.run([self.git, "rev-parse", "HEAD"], cwd=ws, env=self.env, capture_output=True,
                                       text=True, check=True).stdout.strip())
        run.stored_bytes = tree_bytes(ws / ".dvc" / "cache")
        run.metadata_bytes = disk_usage(ws / ".git")
        for i, sha in enumerate(shas):
            rmtree(data)
            r1 = run_child([self.git, "checkout", "-q", sha, "--", "data.dvc"], ws, self.env)
            self._ok(r1, f"git checkout v{i}")
            r2 = run_child([*self.dvc, "checkout", "-q", "data.dvc"], ws, self.env, warm=warm[i])
            self._ok(r2, f"dvc checkout v{i}")
            run.checkout_extra.append(r1)
            run.checkout.append(r2)
            bad = check_tree(data, s.files[i])
            if bad:
                raise RuntimeError(f"v{i}: {bad}")

    # cp: every version copied into a versions directory; checkout copies it back out.
    def _run_cp(self, s: wl.Series, base: Path, run: Run) -> None:
        warm = self.warm_bytes(s)
        store = base / "versions"
        store.mkdir()
        for i, v in enumerate(s.versions):
            r = run_child([self.cp, "-r", str(v), str(store / f"v{i:02d}")], base, self.env, warm=warm[i])
            self._ok(r, f"cp v{i}")
            run.commit.append(r)
        run.stored_bytes = tree_bytes(store)
        (base / "out").mkdir()
        for i in range(len(s.versions)):
            dest = base / "out" / f"v{i:02d}"
            r = run_child([self.cp, "-r", str(store / f"v{i:02d}"), str(dest)], base, self.env, warm=warm[i])
            self._ok(r, f"cp back v{i}")
            run.checkout.append(r)
            bad = check_tree(dest, s.files[i])
            if bad:
                raise RuntimeError(f"v{i}: {bad}")
            rmtree(dest)


# -- single-file ratio ---------------------------------------------------------------------------


def single_file(path: Path, dtype: str, scratch: Path, repeat: int) -> dict[str, Any]:
    """Compression ratio (file bytes / stored bytes) of one real weights file: mstore, ZipNN, zstd-3."""
    size = path.stat().st_size
    data = path.read_bytes()
    out: dict[str, Any] = {"file_bytes": size, "dtype": dtype}
    names = ["mstore", "zipnn", "zstd-3"]
    secs: dict[str, list[float]] = {n: [] for n in names}
    ratio: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    try:
        import zipnn
    except ImportError:
        zipnn = None
        errors["zipnn"] = "zipnn not installed (pip install -e '.[bench]')"
    for rep in range(repeat):
        for name in order_for(rep, names):
            if name in errors:
                continue
            try:
                if name == "mstore":
                    store = scratch / "single-store"
                    rmtree(store)
                    repo = init_mstore(store)
                    try:
                        t, _ = timed(lambda r=repo: r.commit(path, branch="one", message="one file", kind="model",
                                                             cwd=scratch))
                        stored = repo.stored_bytes()
                        dest = scratch / "single-out"
                        rmtree(dest)
                        repo.checkout("one", dest)
                        if b3_file(dest / path.name) != b3_file(path):
                            raise RuntimeError("checkout differs from the committed file")
                        rmtree(dest)
                    finally:
                        repo.close()
                        rmtree(store)
                elif name == "zipnn":
                    z = zipnn.ZipNN(input_format="byte", bytearray_dtype="float32" if dtype == "fp32" else "bfloat16")
                    buf = bytearray(data)  # compress() changes its input in place, even a bytes object
                    t, enc = timed(lambda z=z, b=buf: z.compress(b))
                    stored = len(enc)
                    if bytes(z.decompress(bytearray(enc))) != data:
                        raise RuntimeError("ZipNN round trip differs")
                else:
                    comp = zstandard.ZstdCompressor(level=3)
                    t, enc = timed(lambda c=comp: c.compress(data))
                    stored = len(enc)
                secs[name].append(t.wall)
                ratio[name].append(size / stored)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
    for n in names:
        out[n] = {
            "ratio": summarize(ratio[n])["median"],
            "ratios": ratio[n],
            "mb_per_s": summarize([size / MB / s for s in secs[n]]),
            "error": errors.get(n),
        }
    return out


# -- optional scale part -------------------------------------------------------------------------


def scale_tensor(seed: int, index: int, shape: tuple[int, ...], version: int) -> np.ndarray:
    """Tensor ``index`` of version ``version``: the base plus noise of the same size in every version.

    Any two versions then differ alike, so what one more commit costs depends on the store it
    goes into, not on which version it is. (Built on ``make_tensor``'s updates, which grow with
    the version, every tensor drifted until, from the eighth version on, two pieces in three no
    longer paid as deltas: the commits measured "into a store of 1" were v1-v5, all cheap
    deltas, and those "into 10 and 50" mostly whole pieces, a 1.45x CPU gap that was the
    workload's, not the store's.)
    """
    base = make_tensor(seed, index, shape, None, "f32")
    upd = np.random.default_rng([seed, index, version + 1]).random(shape, dtype=np.float32)
    base += (upd - np.float32(0.5)) * np.float32(SCALE_STEP)
    return base


def write_scale_version(path: Path, layout: Layout, v: int, seed: int) -> None:
    """Version ``v`` of a synthetic fp32 checkpoint in which every tensor moves (like a full fine-tune)."""
    from safetensors.numpy import save_file

    arrays = {name: scale_tensor(seed, i, shape, v) for i, (name, shape, _l) in enumerate(layout.tensors())}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(path))


def scale_phase(con: Contenders, scratch: Path, sizes: list[int], version_mb: int, big_mb: int,
                seed: int) -> dict[str, Any]:
    """Commit time vs store size (mstore and DVC), and peak RSS of one big checkpoint (one repetition each)."""
    out: dict[str, Any] = {"version_mb": version_mb, "store_sizes": sizes, "big_mb": big_mb}
    layout = Layout.for_size(version_mb * MB, 4)
    # One keyframe cycle at the default [delta] max_depth (8 deltas, then a whole piece): every
    # store size is measured over the same mix of chain positions (1-3 links to decode, one
    # whole piece), not over whichever positions its first commits happen to fall on.
    window = SCALE_WINDOW
    n = max(sizes) + window
    src = scratch / "scale-src" / "model.safetensors"
    per: dict[str, list[float]] = {}
    per_cpu: dict[str, list[float]] = {}
    errors: dict[str, str] = {}
    log(f"scale: {n} versions of {version_mb} MB committed one after another (mstore, then DVC) ...")
    for cname in ("mstore", "dvc"):
        why = con.missing(cname)
        if why:
            errors[cname] = why
            continue
        base = scratch / f"scale-{cname}"
        rmtree(base)
        base.mkdir(parents=True)
        walls: list[float] = []
        cpus: list[float] = []
        try:
            if cname == "mstore":
                store = base / "store"
                init_mstore(store).close()
            else:
                ws = con.dvc_workspace(base)
            for v in range(n):
                # As everywhere else: the version's own write-back (and the last commit's) is
                # not left to land inside the next timed step.
                if cname == "mstore":
                    write_scale_version(src, layout, v, seed)
                    os.sync()
                    r = run_child([*con.mstore, "--store", str(store), "commit", str(src.parent), "-b", "scale", "-m",
                                   f"v{v}", "--kind", "checkpoint"], base, con.env)
                    con._ok(r, f"mstore commit v{v}")
                    walls.append(r.wall)
                    cpus.append(r.cpu)
                else:
                    write_scale_version(ws / "data" / "model.safetensors", layout, v, seed)
                    os.sync()
                    r = run_child([*con.dvc, "add", "-q", "data"], ws, con.env)
                    con._ok(r, f"dvc add v{v}")
                    r1 = run_child([con.git, "add", "data.dvc", ".gitignore"], ws, con.env)
                    r2 = run_child([con.git, "commit", "-q", "-m", f"v{v}"], ws, con.env)
                    con._ok(r2, "git commit")
                    walls.append(r.wall + r1.wall + r2.wall)
                    cpus.append(r.cpu + r1.cpu + r2.cpu)
        except Exception as exc:
            errors[cname] = f"{type(exc).__name__}: {exc}"
        finally:
            rmtree(base)
        per[cname] = walls
        per_cpu[cname] = cpus
    file_bytes = src.stat().st_size if src.exists() else layout.data_bytes
    rmtree(src.parent)
    out["file_bytes"] = file_bytes
    out["commit_s_per_version"] = {k: [round(w, 4) for w in v] for k, v in per.items()}
    out["commit_cpu_s_per_version"] = {k: [round(w, 4) for w in v] for k, v in per_cpu.items()}
    # The cost of committing one more version into a store that already holds N versions: the
    # median of commits N+1..N+5 (1-based), so one disturbed commit does not decide the figure.
    # Wall time and CPU time of the process; CPU time moves less with the machine's load.
    out["window"] = window

    def at(d: dict[str, list[float]]) -> dict[str, Any]:
        return {k: {str(size): summarize(v[size : size + window]) for size in sizes if len(v) >= size + window}
                for k, v in d.items()}

    out["commit_s_at_store_size"] = at(per)
    out["commit_cpu_s_at_store_size"] = at(per_cpu)
    out["errors"] = errors

    big = scratch / "big" / "model.safetensors"
    log(f"scale: one {big_mb} MB checkpoint, peak RSS of commit and checkout (mstore, DVC) ...")
    t0 = time.perf_counter()
    size, fid = generate_big(big, big_mb * MB, "f32", seed + 7)
    log(f"  generated {size / MB:.0f} MB in {time.perf_counter() - t0:.0f} s")
    b3_file(big)
    res: dict[str, Any] = {"file_bytes": size}
    for cname in ("mstore", "dvc"):
        if con.missing(cname):
            continue
        base = scratch / f"big-{cname}"
        rmtree(base)
        base.mkdir(parents=True)
        try:
            if cname == "mstore":
                store = base / "store"
                init_mstore(store).close()
                rc = run_child([*con.mstore, "--store", str(store), "commit", str(big), "-b", "big", "-m", "big",
                                "--kind", "checkpoint"], base, con.env)
                con._ok(rc, "mstore commit")
                dest = base / "out"
                rk = run_child([*con.mstore, "--store", str(store), "checkout", "big", str(dest)], base, con.env)
                con._ok(rk, "mstore checkout")
                got = b3_file(dest / big.name)
            else:
                ws = con.dvc_workspace(base)
                (ws / "data").mkdir()
                shutil.copyfile(big, ws / "data" / big.name)
                rc = run_child([*con.dvc, "add", "-q", "data"], ws, con.env)
                con._ok(rc, "dvc add")
                rmtree(ws / "data")
                rk = run_child([*con.dvc, "checkout", "-q", "data.dvc"], ws, con.env)
                con._ok(rk, "dvc checkout")
                got = b3_file(ws / "data" / big.name)
            if got != fid:
                raise RuntimeError("checkout of the big file differs from the original")
            res[cname] = {"commit_s": round(rc.wall, 3), "commit_peak_rss_mb": round(rc.maxrss_mb, 1),
                          "checkout_s": round(rk.wall, 3), "checkout_peak_rss_mb": round(rk.maxrss_mb, 1),
                          "error": None}
        except Exception as exc:
            res[cname] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            rmtree(base)
    rmtree(big.parent)
    out["big"] = res
    return out


def render_scale(sc: dict[str, Any]) -> list[str]:
    sizes = sc["store_sizes"]
    t = [["scale (1 repetition)", *[f"store holds {n}" for n in sizes]]]
    for cname, by in sc["commit_s_at_store_size"].items():
        t.append([f"{cname}: commit one {sc['file_bytes'] / MB:.0f} MB version, wall s",
                  *[_stat(by.get(str(n), {}), ".2f") for n in sizes]])
        cpu = sc["commit_cpu_s_at_store_size"][cname]
        t.append([f"{cname}: the same, CPU s", *[_stat(cpu.get(str(n), {}), ".2f") for n in sizes]])
    for cname, e in sc["errors"].items():
        t.append([f"{cname}: ERROR {e[:80]}", *["" for _ in sizes]])
    lines = _grid(t)
    b = sc["big"]
    t2 = [[f"one {b['file_bytes'] / MB:.0f} MB checkpoint", "commit s", "commit peak RSS MB", "checkout s",
           "checkout peak RSS MB"]]
    for cname in ("mstore", "dvc"):
        r = b.get(cname)
        if r is None:
            continue
        if r["error"]:
            t2.append([cname, "ERROR", r["error"][:60], "", ""])
        else:
            t2.append([cname, f"{r['commit_s']:.1f}", f"{r['commit_peak_rss_mb']:.0f}", f"{r['checkout_s']:.1f}",
                       f"{r['checkout_peak_rss_mb']:.0f}"])
    return [*lines, "", *_grid(t2)]


def scale_targets(sc: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    r = sc["big"].get("mstore", {"error": "not run"})
    for step in ("commit", "checkout"):
        v = None if r["error"] else r[f"{step}_peak_rss_mb"]
        rows.append({"target": f"scale: mstore {step} of one {sc['big']['file_bytes'] / MB:.0f} MB file, "
                               f"peak RSS <= {BIG_RSS_MAX_MB:.0f} MB", "measured": v,
                     "status": "ERROR" if v is None else ("PASS" if v <= BIG_RSS_MAX_MB else "FAIL")})
    by = sc["commit_cpu_s_at_store_size"].get("mstore", {})
    lo, hi = str(min(sc["store_sizes"])), str(max(sc["store_sizes"]))
    if lo in by and hi in by and by[lo]["median"]:
        growth = by[hi]["median"] / by[lo]["median"]
        # Flat within noise: committing the same amount of new bytes into a store of 50 versions
        # costs at most 1.25x the CPU time of committing it into a store of 1.
        rows.append({"target": f"scale: mstore commit CPU time, store of {hi} / store of {lo} versions <= 1.25",
                     "measured": growth, "status": "PASS" if growth <= 1.25 else "FAIL"})
    return rows


# -- report --------------------------------------------------------------------------------------


def series_figures(s: wl.Series, runs: dict[str, list[Run]]) -> dict[str, Any]:
    logical = s.logical_bytes
    out: dict[str, Any] = {"title": TITLES[s.name], "versions": len(s.versions), "logical_bytes": logical,
                           "version_bytes": s.sizes, "info": s.info, "contenders": {}}
    for name, rs in runs.items():
        ok = [r for r in rs if r.error is None]
        errs = [r.error for r in rs if r.error]
        c: dict[str, Any] = {
            "error": errs[0] if errs else None,
            "repetitions": len(ok),
            "commit_mb_per_s": summarize([logical / MB / r.commit_wall() for r in ok]),
            "commit_s": summarize([r.commit_wall() for r in ok]),
            "checkout_s": summarize([r.checkout_wall() for r in ok]),
            "checkout_mb_per_s": summarize([logical / MB / r.checkout_wall() for r in ok]),
            "stored_bytes": [r.stored_bytes for r in ok],
            "stored_over_logical": summarize([r.stored_bytes / logical for r in ok if r.stored_bytes is not None]),
            "metadata_bytes": [r.metadata_bytes for r in ok],
            "peak_rss_commit_mb": summarize([max(x.maxrss_mb for x in r.commit) for r in ok]),
            "peak_rss_checkout_mb": summarize([max(x.maxrss_mb for x in r.checkout) for r in ok]),
            "cores_busy_commit": summarize([sum(x.cpu for x in r.commit) / max(1e-9, sum(x.wall for x in r.commit))
                                            for r in ok])["median"],
            "runs": [r.to_dict() for r in rs],
        }
        if name == "dvc":
            c["commit_s_dvc_add_only"] = summarize([sum(x.wall for x in r.commit) for r in ok])
            c["checkout_s_dvc_checkout_only"] = summarize([sum(x.wall for x in r.checkout) for r in ok])
        out["contenders"][name] = c
    m, d = out["contenders"].get("mstore"), out["contenders"].get("dvc")
    ratios: dict[str, Any] = {}
    if m and d and not m["error"] and not d["error"] and m["repetitions"] and d["repetitions"]:
        ratios["commit_throughput_mstore_over_dvc"] = m["commit_mb_per_s"]["median"] / d["commit_mb_per_s"]["median"]
        ratios["checkout_time_mstore_over_dvc"] = m["checkout_s"]["median"] / d["checkout_s"]["median"]
        ratios["stored_mstore_over_dvc"] = m["stored_over_logical"]["median"] / d["stored_over_logical"]["median"]
    out["mstore_vs_dvc"] = ratios
    return out


def targets(figs: dict[str, Any], single: dict[str, Any], single_expected: bool) -> list[dict[str, Any]]:
    rows = []
    for name, f in figs.items():
        m = f["contenders"].get("mstore", {})
        err = m.get("error")
        med = (m.get("stored_over_logical") or {}).get("median")
        goal = RATIO_TARGETS[name]
        rows.append({"target": f"{name}: mstore stored/logical <= {goal:.2f}", "measured": med,
                     "status": "ERROR" if err else ("PASS" if med is not None and med <= goal else "FAIL")})
        r = f["mstore_vs_dvc"]
        dvc_err = f["contenders"].get("dvc", {}).get("error")
        for key, goal2, cmp, text in (
            ("commit_throughput_mstore_over_dvc", COMMIT_VS_DVC_MIN, lambda v, g: v >= g, ">= 2.00x DVC"),
            ("checkout_time_mstore_over_dvc", CHECKOUT_VS_DVC_MAX, lambda v, g: v <= g, "<= 1.00x DVC's time"),
        ):
            what = "commit MB/s" if key.startswith("commit") else "checkout time"
            v = r.get(key)
            status = "ERROR" if (err or dvc_err or v is None) else ("PASS" if cmp(v, goal2) else "FAIL")
            rows.append({"target": f"{name}: mstore {what} {text}", "measured": v, "status": status})
    for dtype, goal in SINGLE_TARGETS.items():
        sf = single.get(dtype)
        if sf is None:
            status = "ERROR" if single_expected else "SKIPPED"
            rows.append({"target": f"real weights {dtype}: single-file ratio >= {goal:.2f}", "measured": None,
                         "status": status})
            continue
        v = sf["mstore"]["ratio"]
        rows.append({"target": f"real weights {dtype}: mstore single-file ratio >= {goal:.2f}", "measured": v,
                     "status": "ERROR" if sf["mstore"]["error"] or v is None else ("PASS" if v >= goal else "FAIL"),
                     "zipnn": sf["zipnn"]["ratio"]})
    return rows


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _stat(st: dict[str, Any], spec: str) -> str:
    if not st or st.get("median") is None:
        return "-"
    if st["n"] == 1:
        return format(st["median"], spec)
    return f"{format(st['median'], spec)} ({format(st['min'], spec)}-{format(st['max'], spec)})"


def render(figs: dict[str, Any], single: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = []
    head = ["series", "contender", "commit MB/s", "checkout s", "stored/logical", "RSS commit MB",
            "RSS checkout MB"]
    table = [head]
    for name, f in figs.items():
        for cname, c in f["contenders"].items():
            if c["error"]:
                table.append([name, cname, "ERROR", c["error"][:60], "", "", ""])
                continue
            table.append([name, cname, _stat(c["commit_mb_per_s"], ".0f"), _stat(c["checkout_s"], ".2f"),
                          _f(c["stored_over_logical"]["median"], ".3f"), _stat(c["peak_rss_commit_mb"], ".0f"),
                          _stat(c["peak_rss_checkout_mb"], ".0f")])
        r = f["mstore_vs_dvc"]
        if r:
            table.append([name, "mstore/DVC", f"{r['commit_throughput_mstore_over_dvc']:.2f}x",
                          f"{r['checkout_time_mstore_over_dvc']:.2f}x", f"{r['stored_mstore_over_dvc']:.2f}x", "", ""])
    lines += _grid(table)
    if single:
        lines.append("")
        t2 = [["real weights", "MB", "mstore ratio", "ZipNN ratio", "zstd-3 ratio", "mstore MB/s", "ZipNN MB/s"]]
        for dtype, sf in single.items():
            t2.append([f"all-MiniLM-L6-v2 {dtype}", f"{sf['file_bytes'] / MB:.1f}",
                       "ERROR" if sf["mstore"]["error"] else _f(sf["mstore"]["ratio"], ".3f"),
                       "ERROR" if sf["zipnn"]["error"] else _f(sf["zipnn"]["ratio"], ".3f"),
                       _f(sf["zstd-3"]["ratio"], ".3f"), _stat(sf["mstore"]["mb_per_s"], ".0f"),
                       _stat(sf["zipnn"]["mb_per_s"], ".0f")])
        lines += _grid(t2)
    lines.append("")
    t3 = [["target", "measured", "result"]]
    for r in rows:
        t3.append([r["target"], _f(r["measured"], ".3f"), r["status"]])
    lines += _grid(t3)
    return "\n".join(lines)


def _grid(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def chart(figs: dict[str, Any], single: dict[str, Any], path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"mstore": "#1f77b4", "dvc": "#ff7f0e", "cp": "#7f7f7f", "zipnn": "#2ca02c", "zstd-3": "#9467bd"}
    names = list(figs)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    panels = [
        (axes[0][0], "commit_mb_per_s", "commit throughput, MB/s (higher is better)"),
        (axes[0][1], "checkout_s", "checkout of every version, s (lower is better)"),
        (axes[1][0], "stored_over_logical", "stored bytes / logical bytes (lower is better)"),
    ]
    width = 0.26
    for ax, key, title in panels:
        for k, cname in enumerate(CONTENDERS):
            xs, ys, lo, hi = [], [], [], []
            for i, n in enumerate(names):
                c = figs[n]["contenders"].get(cname)
                st = c and not c["error"] and c[key]
                if not st or st.get("median") is None:
                    continue
                xs.append(i + (k - 1) * width)
                ys.append(st["median"])
                lo.append(st["median"] - st["min"])
                hi.append(st["max"] - st["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=cname, color=colors[cname])
            for x, y, h in zip(xs, ys, hi, strict=True):  # the label sits above the max whisker
                ax.annotate(f"{y:.2f}" if key != "commit_mb_per_s" else f"{y:.0f}", (x, y + h), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        if key == "stored_over_logical":
            for i, n in enumerate(names):
                ax.hlines(RATIO_TARGETS[n], i - 1.5 * width, i + 1.5 * width, colors="red", linestyles="--",
                          label="target" if i == 0 else None)
        ax.set_xticks(range(len(names)), [TITLES[n].replace(" (", "\n(").replace(" + ", "\n+ ", 1) for n in names],
                      fontsize=8)
        if key == "commit_mb_per_s":
            ax.set_yscale("log")  # cp is two orders of magnitude faster than either store
        if key == "stored_over_logical":
            ax.set_ylim(0, 1.25)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, ncol=4, loc="upper center")
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    ax = axes[1][1]
    if single:
        dtypes = list(single)
        for k, cname in enumerate(("mstore", "zipnn", "zstd-3")):
            xs = [i + (k - 1) * width for i in range(len(dtypes))]
            ys = [single[d][cname]["ratio"] or 0 for d in dtypes]
            ax.bar(xs, ys, width, label=cname, color=colors[cname])
            for x, y in zip(xs, ys, strict=True):
                ax.annotate(f"{y:.3f}", (x, y), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                            textcoords="offset points")
        for i, d in enumerate(dtypes):
            ax.hlines(SINGLE_TARGETS[d], i - 1.5 * width, i + 1.5 * width, colors="red", linestyles="--",
                      label="target" if i == 0 else None)
        ax.set_xticks(range(len(dtypes)), [f"all-MiniLM-L6-v2 {d}" for d in dtypes], fontsize=8)
        ax.set_ylim(1.0, max(1.7, max(single[d][c]["ratio"] or 0 for d in dtypes for c in ("mstore", "zipnn")) + 0.1))
        ax.legend(fontsize=8, ncol=4, loc="upper left")
    else:
        ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("single-file ratio, file / stored (higher is better)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Checkpoint series: mstore vs DVC vs cp — {label}", fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small model, fewer versions, 2 repetitions (a smoke run; figures labelled quick)")
    p.add_argument("--repeat", type=int, help="repetitions of every series per contender (default 3; quick 2)")
    p.add_argument("--series", nargs="+", choices=SERIES, default=list(SERIES), help="run only these series")
    p.add_argument("--no-single", action="store_true", help="skip the single-file ratio on the real weights")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help="cache of generated workloads and scratch space (default bench/out/series-work)")
    p.add_argument("--regenerate", action="store_true", help="generate the workloads again even if cached")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory of the run")
    p.add_argument("--json", type=Path, default=OUT / "series.json", help="output (default bench/out/series.json)")
    p.add_argument("--png", type=Path, default=OUT / "series.png", help="chart (default bench/out/series.png)")
    p.add_argument("--scale", action="store_true",
                   help="also: commit time vs store size (1, 10, 50 versions) and peak RSS of a 4 GB checkpoint")
    p.add_argument("--scale-mb", type=int, help="size of each version in the store-size part (default 32; quick 8)")
    p.add_argument("--big-mb", type=int, help="size of the single big checkpoint (default 4000; quick 500)")
    p.add_argument("--train-steps", type=int,
                   help="optimizer steps between checkpoints in the model series (default 2; quick 1). Real "
                        "runs save every few hundred steps: more steps move the weights further apart")
    p.add_argument("--mstore-config", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="set a config.toml value in every mstore store the bench creates (repeatable), "
                        "e.g. delta.enabled=true")
    p.add_argument("--revision", help="revision to record when the code is not a git checkout (e.g. an export)")
    p.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    a = p.parse_args(argv)
    try:
        a.overrides = parse_overrides(a.mstore_config)
    except ValueError as exc:
        p.error(str(exc))
    if a.scale_mb is None:
        a.scale_mb = 8 if a.quick else 32
    if a.big_mb is None:
        a.big_mb = 500 if a.quick else 4000
    if a.repeat is None:
        a.repeat = 2 if a.quick else 3
    if a.train_steps is not None and a.train_steps < 1:
        p.error("--train-steps must be at least 1")
    if a.repeat < 1:
        p.error("--repeat must be at least 1")
    if not a.quick and a.repeat < 3:
        p.error("--repeat must be at least 3 outside --quick (medians of fewer runs mean little)")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    installed_bytecode()
    MSTORE_CONFIG.clear()
    MSTORE_CONFIG.update(a.overrides)
    started = time.perf_counter()
    label = (f"QUICK ({a.repeat} repetition{'s' if a.repeat != 1 else ''}, small model: not comparable with "
             "the targets)" if a.quick else f"full run, medians of {a.repeat}")
    a.workdir.mkdir(parents=True, exist_ok=True)
    spec, jspec = (QUICK_MODEL, QUICK_JSONL) if a.quick else (wl.ModelSpec(), wl.JsonlSpec())
    if a.train_steps is not None:
        spec = dataclasses.replace(spec, steps=a.train_steps)
    log(f"workloads ({'quick' if a.quick else 'full'}) in {a.workdir / 'workloads'} ...")
    series, gen_s = wl.generate_all(a.workdir / "workloads", spec, jspec, a.regenerate, log)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=a.workdir))
    con = Contenders(scratch)
    figs: dict[str, Any] = {}
    single: dict[str, Any] = {}
    scale: dict[str, Any] = {}
    load: dict[str, float] = {}
    try:
        for name in a.series:
            s = series[name]
            for f in s.versions:  # warm the page cache: every contender reads cached bytes
                for p in f.rglob("*"):
                    if p.is_file():
                        b3_file(p)
            load[name] = round(os.getloadavg()[0], 2)
            runs: dict[str, list[Run]] = {c: [] for c in CONTENDERS}
            log(f"{name}: {len(s.versions)} versions, {s.logical_bytes / MB:.1f} MB; {a.repeat} x "
                f"{', '.join(CONTENDERS)} ...")
            for rep in range(a.repeat):
                for cname in order_for(rep, list(CONTENDERS)):
                    why = con.missing(cname)
                    r = Run(error=why) if why else con.run(cname, s)
                    if r.error:
                        log(f"  ERROR {cname} (repetition {rep}): {r.error}")
                    else:
                        log(f"  {cname:6s} rep {rep}: commit {r.commit_wall():6.2f} s, checkout "
                            f"{r.checkout_wall():6.2f} s, stored/logical {r.stored_bytes / s.logical_bytes:.3f}")
                    runs[cname].append(r)
            figs[name] = series_figures(s, runs)
        if not a.no_single and "real_weights" in series:
            rw = series["real_weights"]
            log(f"single-file ratio on the real weights, {a.repeat} x mstore, ZipNN, zstd-3 ...")
            load["single"] = round(os.getloadavg()[0], 2)
            for dtype, v in zip(("fp32", "bf16"), rw.versions, strict=True):
                single[dtype] = single_file(v / "model.safetensors", dtype, scratch, a.repeat)
        if a.scale:
            load["scale"] = round(os.getloadavg()[0], 2)
            sizes = [1, 5, 10] if a.quick else [1, 10, 50]
            scale = scale_phase(con, scratch, sizes, a.scale_mb, a.big_mb, spec.seed)
    finally:
        if a.keep:
            log(f"kept {scratch}")
        else:
            rmtree(scratch)
    rows = targets(figs, single, not a.no_single)
    if scale:
        rows += scale_targets(scale)
    runtime = time.perf_counter() - started
    info = machine_info()
    pk = {}
    for pkg in ("dvc", "zipnn", "torch", "transformers", "peft", "matplotlib"):
        try:
            pk[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pk[pkg] = None
    info["packages"].update(pk)
    if "code_revision" not in info and a.revision:
        info["code_revision"] = a.revision
    elif "code_revision" in info:
        # Uncommitted changes to mstore/ mean the figures are not those of the named revision.
        st = subprocess.run(["git", "status", "--porcelain", "--", "mstore"], cwd=ROOT, capture_output=True,
                            text=True, check=False)
        info["mstore_dirty"] = bool(st.stdout.strip())
    rev = info.get("code_revision", "?")[:9] + ("+dirty" if info.get("mstore_dirty") else "")
    doc = {
        "date": now_iso(),
        "runtime_s": round(runtime, 1),
        "label": label,
        "machine": info,
        "params": {"quick": a.quick, "repeat": a.repeat, "mstore_config": a.overrides,
                   "model": spec.__dict__, "jsonl": jspec.__dict__,
                   "mb": "decimal (1 MB = 10^6 bytes)", "generation_s": gen_s, "loadavg_1min": load,
                   "how": "every step is one child process (fork to exit, peak RSS from wait4 via a small "
                          "wrapper); the page cache is warm; sync() before every step; order alternates"},
        "series": figs,
        "single_file": single,
        "scale": scale or None,
        "targets": rows,
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    try:
        chart(figs, single, a.png, f"{label}, {doc['date']}, revision {rev}")
    except ImportError:
        log("matplotlib not installed: no chart (pip install -e '.[bench]')")
    print()
    print(f"{label}; {doc['date']}; revision {rev}")
    print(render(figs, single, rows))
    if scale:
        print()
        print("\n".join(render_scale(scale)))
    print()
    busy = {k: v for k, v in load.items() if v > 0.5 * (os.cpu_count() or 1)}
    if busy:
        print(f"note: the machine was busy (1-minute load average by phase: {busy}); absolute figures are noisy")
    print(f"runtime {runtime:.0f} s; numbers in {a.json}, chart in {a.png}")
    if any(r["status"] == "ERROR" for r in rows) or any(
        c["error"] for f in figs.values() for c in f["contenders"].values()
    ) or (scale and scale["errors"]):
        return 2
    if a.strict and any(r["status"] == "FAIL" for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
