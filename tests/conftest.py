"""Shared fixtures: a fresh repository, safetensors writers, and a real `mstore` subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mstore import Repo

ROOT = Path(__file__).resolve().parent.parent
DAY = 86400.0


class Clock:
    """A settable clock for ``Repo(clock=...)``: ``clock()`` is the current unix time."""

    def __init__(self, start: float = 1_000_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, days: float = 0.0, seconds: float = 0.0) -> None:
        self.now += days * DAY + seconds


@pytest.fixture(params=["c", "numpy"])
def plane_kernels(request, monkeypatch) -> str:
    """Run a test once with the C byte-plane kernels and once with their numpy versions."""
    from mstore import codecs

    if request.param == "numpy":
        monkeypatch.setattr(codecs, "_kernels", None)
    elif codecs._kernels is None:
        pytest.skip("the C byte-plane kernels are not built (no C compiler at install)")
    return request.param


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    """An empty repository in a temporary directory (store at tmp/.mstore)."""
    r = Repo.init(tmp_path / ".mstore")
    yield r
    r.close()


def repo_with_chunking(path: Path, replace: bool = False, **chunking: int) -> Repo:
    """A new store whose ``[chunking]`` settings are overridden (``replace``: exactly these)."""
    from mstore.format import Config, read_config, write_config

    Repo.init(path).close()
    data = read_config(path).data
    data["chunking"] = dict(chunking) if replace else {**data["chunking"], **chunking}
    write_config(path, Config(data))
    return Repo.open(path)


def repo_at_version(path: Path, version: int) -> Repo:
    """A new store whose config says format ``version`` (an older store, as an older mstore made it)."""
    from mstore.format import Config, write_config

    repo = Repo.init(path)
    data = repo.config.data
    data["format"]["version"] = version
    write_config(repo.root, Config(data))
    repo.close()
    return Repo.open(path)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A scratch directory for files to commit."""
    d = tmp_path / "work"
    d.mkdir(exist_ok=True)
    return d


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    """Write tensors with the real `safetensors` library."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def random_tensors(n: int, shape: tuple[int, ...] = (64, 64), seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """``n`` named random tensors."""
    rng = np.random.default_rng(seed)
    return {f"layer{i}.weight": rng.standard_normal(shape).astype(dtype) for i in range(n)}


def read_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path (for bit-exact comparisons)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def snapshot_dir(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every path under ``root``: to prove a command changed nothing.

    LMDB's ``lock.mdb`` is left out: it is the reader table, written through a shared mapping
    by every read transaction (its mtime moves whenever the kernel writes those pages back),
    and holds no data. ``data.mdb``, where every object, ref and reflog entry lives, is kept.
    """
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.name == "lock.mdb":
            continue
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


class Cli:
    """Runs the installed `mstore` command as a real subprocess against one store."""

    def __init__(self, store: Path, cwd: Path):
        self.store = store
        self.cwd = cwd

    def __call__(self, *args: str, check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MSTORE_")}
        env["MSTORE_DIR"] = str(self.store)
        proc = subprocess.run(
            [sys.executable, "-m", "mstore", *args], cwd=self.cwd, env=env, capture_output=True, input=input,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"mstore {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout.decode()}\n"
                f"stderr:\n{proc.stderr.decode()}"
            )
        return proc

    def json(self, *args: str) -> object:
        return json.loads(self(*args, "--json").stdout)


@pytest.fixture
def cli(tmp_path: Path, repo: Repo) -> Cli:
    """The `mstore` command bound to the `repo` fixture's store, run from tmp_path/work."""
    cwd = tmp_path / "work"
    cwd.mkdir(exist_ok=True)
    return Cli(repo.root, cwd)
