"""The trainer demo: a tiny Llama fine-tuned from the store on the CPU, in about a minute.

    python -m trainer.demo [WORK_DIR]

It builds a tiny Llama from a config (with a tokenizer trained on generated syllogisms), imports
the model and two datasets into a fresh store, fine-tunes the whole model on one dataset, then
a LoRA adapter on top of that checkpoint on the other (checkpoints every 200 steps, each
committed with provenance, its data ledger and a verified metric), shows preflight refusing to
train the lineage on data it has seen, then the log, a checkpoint, the lineage and what the run
has seen. Every step is the real ``mstore`` command, printed before it runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import tiny

COMMON = ["--save-every", "200", "--eval-every", "200", "--batch-size", "8", "--seq-len", "64", "--log-every", "100",
          "--threads", "1"]
PRETRAIN = ["train", "--base", "models/base", "--data", "data/general", "-b", "runs/pretrain", "--steps", "400",
            "--lr", "1e-3", *COMMON]
LORA = ["train", "--base", "runs/pretrain", "--data", "data/syllo", "-b", "runs/syllo-lora", "--lora", "r=16",
        "--steps", "400", "--lr", "3e-3", *COMMON]
AGAIN = ["train", "--base", "runs/pretrain", "--data", "data/general", "-b", "runs/again", "--steps", "200",
         *COMMON]


class Demo:
    """Runs ``mstore`` commands against the demo store, printing each one first."""

    def __init__(self, work: Path, mstore: list[str]):
        self.work = work
        self.mstore = mstore

    def run(self, *args: str, expect_failure: bool = False) -> subprocess.CompletedProcess:
        print(f"\n$ mstore {' '.join(shlex.quote(a) for a in args)}", flush=True)
        env = {**os.environ, "MSTORE_DIR": str(self.work / ".mstore")}
        proc = subprocess.run([*self.mstore, *args], cwd=self.work, env=env, text=True, capture_output=True)
        sys.stdout.write(proc.stdout)
        sys.stdout.write(proc.stderr)
        sys.stdout.flush()
        if (proc.returncode != 0) != expect_failure:
            raise SystemExit(f"demo step ended with exit status {proc.returncode}")
        return proc


def main(argv: list[str] | None = None) -> None:
    """Run the demo in WORK_DIR (default ./demo-work/trainer), replacing what is there."""
    ap = argparse.ArgumentParser(prog="python -m trainer.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("work", nargs="?", type=Path, default=Path("demo-work") / "trainer")
    ap.add_argument("--mstore", default=f"{shlex.quote(sys.executable)} -m mstore",
                    help="the mstore command (default: this Python's -m mstore)")
    args = ap.parse_args(argv)
    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    general, syllo = tiny.make_corpus(3000, seed=0), tiny.make_corpus(1000, seed=1)
    print(f"# a tiny Llama from a config ({tiny.DEMO_MODEL}), a tokenizer trained offline, and two generated "
          f"datasets ({len(general):,} and {len(syllo):,} records) in {work}")
    tiny.write_jsonl(work / "general", general, files=3)
    tiny.write_jsonl(work / "syllo", syllo, files=2)
    tiny.make_tiny_model(work / "model", [r["text"] for r in general + syllo], **tiny.DEMO_MODEL)
    demo = Demo(work, shlex.split(args.mstore))
    demo.run("init")
    demo.run("import-model", "model", "-b", "models/base")
    demo.run("import-data", "general", "-b", "data/general", "--tokenizer", "models/base")
    demo.run("import-data", "syllo", "-b", "data/syllo", "--tokenizer", "models/base")
    print("\n# full fine-tuning from the imported model, then a LoRA adapter on top of its checkpoint")
    demo.run(*PRETRAIN)
    demo.run(*LORA)
    print("\n# the lineage has already trained on data/general: preflight refuses before a step runs")
    demo.run(*AGAIN, expect_failure=True)
    demo.run("log", "runs/syllo-lora", "--oneline")
    demo.run("show", "runs/syllo-lora")
    demo.run("lineage", "runs/syllo-lora")
    demo.run("seen", "data/general", "--by", "runs/syllo-lora")
    print(f"\n# done in {time.monotonic() - t0:.0f} s; the store is {work / '.mstore'}")

if __name__ == "__main__":
    main()
