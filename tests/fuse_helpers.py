"""Shared by the mount and run tests: the FUSE skip reason, fixtures' cleanup, sample data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mstore import mount as mount_mod
from tests.conftest import random_tensors, write_safetensors


def _fuse_missing() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is absent: this machine (or container) cannot mount FUSE file systems"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"the FUSE binding cannot load: {exc}"
    return None


FUSE_MISSING = _fuse_missing()
requires_fuse = pytest.mark.skipif(FUSE_MISSING is not None, reason=FUSE_MISSING or "")


def mounts_under(root: Path) -> list[str]:
    """Mount points (alive or dead) at or below ``root``."""
    root_s = os.path.realpath(root)
    return sorted(mp for mp in mount_mod.mount_table() if mp == root_s or mp.startswith(root_s + os.sep))


def _stop_registered(store: Path) -> None:
    for info in mount_mod.list_mounts(store):
        if info.alive:
            try:
                os.kill(info.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def cleanup(tmp_path: Path) -> list[str]:
    """Unmount everything under ``tmp_path`` and stop its mount processes; returns what was left."""
    left = mounts_under(tmp_path)
    for mp in left:
        subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True, check=False)
    try:
        stores = [p.parent for p in tmp_path.rglob("config.toml") if (p.parent / "mounts").is_dir()]
    except OSError:
        stores = []
    for store in stores:
        _stop_registered(store)
    deadline = time.monotonic() + 5
    while mounts_under(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def fuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Mounting available; afterwards, nothing may be left mounted.

    A test that leaves a mount behind fails here (after the mount is cleared), so every test
    must unmount what it mounts, also on failure (context managers do).
    """
    yield
    left = cleanup(tmp_path)
    assert left == [], f"the test left mounts behind: {left}"


def cli(store: Path, *args: str, cwd: Path | None = None, check: bool = True, timeout: float = 60):
    """The mstore command (with mount and run) as a real subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSTORE_")}
    env["MSTORE_DIR"] = str(store)
    proc = subprocess.run(
        [sys.executable, "-m", "mstore", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mstore {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_sample(work: Path) -> Path:
    """A model directory: safetensors, a JSONL shard of many chunks, an executable, nested and empty files."""
    d = work / "model"
    tensors = random_tensors(4, shape=(128, 256), seed=1)
    tensors["embed.weight"] = np.arange(1024 * 64, dtype=np.float32).reshape(1024, 64)
    write_safetensors(d / "model.safetensors", tensors, metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"hidden_size": 512, "vocab_size": 4096}))
    rng = np.random.default_rng(3)
    lines = [json.dumps({"id": i, "text": " ".join(map(str, rng.integers(0, 10**6, 20)))}) for i in range(4000)]
    (d / "data").mkdir()
    (d / "data" / "shard-0.jsonl").write_text("\n".join(lines) + "\n")
    (d / "a" / "b").mkdir(parents=True)
    (d / "a" / "b" / "deep.txt").write_text("deep\n")
    (d / "empty.txt").write_bytes(b"")
    (d / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (d / "run.sh").chmod(0o755)
    return d
