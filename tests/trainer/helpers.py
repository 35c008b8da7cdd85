"""Helpers shared by the trainer tests (configs, event capture, the trainer as a subprocess)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Small enough that a run of 8 steps with two checkpoints takes about a second.
RUN = dict(steps=8, save_every=4, eval_every=4, batch_size=4, seq_len=48, threads=1, eval_records=32,
           shuffle_block=8, log_every=1)
CLI_RUN = ["--steps", "12", "--save-every", "4", "--eval-every", "4", "--batch-size", "4", "--seq-len", "48",
           "--threads", "1", "--eval-records", "32", "--shuffle-block", "8", "--log-every", "1"]


def config(**kw):
    from trainer import LoraSpec, TrainConfig

    args = {"branch": "runs/a", "base": "models/base", "data": "data/syllo", "lora": LoraSpec(r=4), **RUN}
    args.update(kw)
    return TrainConfig(**args)


class Events:
    """A report callable that keeps every event (the CLI renders the same events)."""

    def __init__(self):
        self.items: list[tuple[str, dict]] = []

    def __call__(self, event: str, **fields):
        self.items.append((event, fields))

    def of(self, event: str) -> list[dict]:
        return [f for e, f in self.items if e == event]


def trainer_cmd(store_root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "trainer", "--store", str(store_root), *args]


def trainer_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSTORE_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_trainer(store_root: Path, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(trainer_cmd(store_root, *args), cwd=cwd, env=trainer_env(), capture_output=True,
                          text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def copy_store(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest
