"""Runtime facts for provenance (device, CUDA, GPUs, threads) and the trainer's own code revision.

mstore records Python, host, command, package versions and the working directory's git
revision on every commit by itself; this module adds what only a process that imported torch
can know, and which code of the trainer ran, so a checkpoint's provenance is complete even
when training is started from outside any git checkout (incident 5).
"""

from __future__ import annotations

import functools
import os
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import blake3

PACKAGE_DIR = Path(__file__).resolve().parent


def go_offline() -> None:
    """Never download, never draw progress bars: the trainer reads models only from the store.

    Set before transformers / huggingface_hub are imported (they read these once, at import);
    every ``from_pretrained`` call also passes ``local_files_only=True``, which holds even when
    a user's script imported them first.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet_transformers() -> None:
    """Silence transformers' progress bars, advisory logging and two warnings that do not apply.

    peft looks for the base model's config under the adapter's ``base_model_name_or_path``
    (here the base commit id, which is not a hub name) and warns that it cannot; and it calls a
    transformers method that transformers 5 deprecates. Neither is the user's to act on.
    """
    import warnings

    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    warnings.filterwarnings("ignore", message=r"Could not find a config file in", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)


@functools.cache
def code_revision() -> dict[str, Any]:
    """Which trainer code ran: version, a BLAKE3 digest of its sources, and git state if any."""
    h = blake3.blake3()
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    info: dict[str, Any] = {"package": "trainer", "source_digest": h.hexdigest()}
    try:
        info["version"] = metadata.version("mstore")
    except metadata.PackageNotFoundError:
        info["version"] = "0+unknown"
    git = _git(PACKAGE_DIR, "rev-parse", "HEAD")
    if git:
        # Untracked trainer files count as dirty: the commit alone would not reproduce them.
        status = _git(PACKAGE_DIR, "status", "--porcelain", "--", ".")
        info["git"] = {"commit": git, "dirty": bool(status)}
    return info


def _git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def runtime(device: Any = None, precision: str | None = None) -> dict[str, Any]:
    """Device, CUDA and GPU facts of this process (keys present even on a CPU-only machine)."""
    import torch

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "memory_bytes": int(p.total_memory),
                         "capability": f"{p.major}.{p.minor}"})
    return {
        "device": str(device) if device is not None else None,
        "precision": precision,
        "cuda": torch.version.cuda,
        "cuda_available": bool(torch.cuda.is_available()),
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "gpu": gpus,
        "torch_threads": torch.get_num_threads(),
    }


def provenance(device: Any, precision: str | None, **trainer: Any) -> dict[str, Any]:
    """The ``provenance`` argument for a checkpoint commit (merged into mstore's own record)."""
    rt = runtime(device, precision)
    return {
        "cuda": rt["cuda"],
        "gpu": rt["gpu"],
        "trainer": {"code": code_revision(), "runtime": rt, **trainer},
    }
