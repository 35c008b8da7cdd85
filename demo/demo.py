"""`make demo`: mstore at work on an embedded local store, start to finish, in about a minute.

It trains a tiny two-layer network with NumPy on the CPU (a real training loop on generated
data), commits every checkpoint with its inputs and metrics, shows the log, a tensor-level diff
and a guard stopping a bad overwrite, deletes a branch in a "clean-up" and restores it from the
reflog, plans a gc and walks its lifecycle (show, apply to trash, undo), and checks the store.
Every step is the real `mstore` command, printed before it runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "demo-work" / "undo"
MSTORE = [sys.executable, "-m", "mstore"]


def run(*args: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    """Show and run one mstore command against the demo store."""
    print(f"\n$ mstore {' '.join(args)}", flush=True)
    env = {**os.environ, "MSTORE_DIR": str(WORK / ".mstore")}
    proc = subprocess.run([*MSTORE, *args], cwd=WORK, env=env, text=True, capture_output=True)
    if not quiet:
        sys.stdout.write(proc.stdout)
    sys.stdout.write(proc.stderr)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo step failed with exit status {proc.returncode}")
    return proc


def save_model(path: Path, params: dict[str, np.ndarray], vocab: int) -> None:
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.astype(np.float32) for k, v in params.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "tiny-mlp", "vocab_size": vocab, "hidden": 64}))


def make_data(path: Path, rng: np.random.Generator, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """A bag-of-tokens classification set: label = which half of the vocabulary dominates."""
    x = rng.poisson(0.05, size=(2048, vocab)).astype(np.float32)
    y = (x[:, : vocab // 2].sum(1) > x[:, vocab // 2 :].sum(1)).astype(np.int64)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "train.jsonl", "w") as f:
        for row, label in zip(x[:1792], y[:1792], strict=True):
            f.write(json.dumps({"tokens": np.flatnonzero(row).tolist(), "label": int(label)}) + "\n")
    with open(path / "eval.jsonl", "w") as f:
        for row, label in zip(x[1792:], y[1792:], strict=True):
            f.write(json.dumps({"tokens": np.flatnonzero(row).tolist(), "label": int(label)}) + "\n")
    return x, y


def loss_and_grads(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
    h = np.maximum(x @ p["embed.weight"] + p["embed.bias"], 0)
    logits = h @ p["head.weight"] + p["head.bias"]
    logits -= logits.max(1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    loss = float(-np.log(probs[np.arange(len(y)), y] + 1e-9).mean())
    d = probs
    d[np.arange(len(y)), y] -= 1
    d /= len(y)
    g = {"head.weight": h.T @ d, "head.bias": d.sum(0)}
    dh = (d @ p["head.weight"].T) * (h > 0)
    g["embed.weight"] = x.T @ dh
    g["embed.bias"] = dh.sum(0)
    return loss, g


def main() -> None:
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir()
    rng = np.random.default_rng(0)
    vocab = 2000
    print("mstore demo: a tiny model trained on the CPU, every checkpoint committed.")
    run("init", str(WORK))

    base = {
        "embed.weight": rng.standard_normal((vocab, 64)) * 0.05,
        "embed.bias": np.zeros(64),
        "head.weight": rng.standard_normal((64, 2)) * 0.05,
        "head.bias": np.zeros(2),
    }
    save_model(WORK / "base", base, vocab)
    run("commit", "base", "-b", "models/base", "-m", "tiny-mlp base (random init)", "--kind", "model")
    x, y = make_data(WORK / "data", rng, vocab)
    run("commit", "data", "-b", "data/bag-of-tokens", "-m", "2,048 generated examples", "--kind", "dataset")

    params = {k: v.copy() for k, v in base.items()}
    xt, yt, xe, ye = x[:1792], y[:1792], x[1792:], y[1792:]
    step = 0
    for ckpt in range(1, 4):
        for _ in range(40):
            idx = rng.integers(0, len(xt), 64)
            loss, g = loss_and_grads(params, xt[idx], yt[idx])
            # A partial fine-tune: the embedding stays frozen after the first checkpoint.
            for k in params:
                if ckpt == 1 or not k.startswith("embed"):
                    params[k] -= 0.5 * g[k]
            step += 1
        eval_loss, _ = loss_and_grads(params, xe, ye)
        out = WORK / "runs" / f"checkpoint-{step}"
        save_model(out, params, vocab)
        print(f"\ntrained to step {step}: train loss {loss:.4f}, eval loss {eval_loss:.4f}")
        run(
            "commit",
            str(out.relative_to(WORK)),
            "-b",
            "runs/demo",
            "-m",
            f"step {step}",
            "--kind",
            "checkpoint",
            "--input",
            "base=models/base",
            "--input",
            "data=data/bag-of-tokens",
            "--meta",
            f"step={step}",
            "--meta",
            f"loss={loss:.4f}",
            "--meta",
            f"eval/loss={eval_loss:.4f}",
        )

    run("log", "runs/demo", "--oneline")
    run("show", "runs/demo")
    run("diff", "runs/demo~1", "runs/demo")
    run("branches")

    print("\nIncident 1: an evaluation script overwrites the good model with a tiny one.")
    small = {k: v[:50] if k == "embed.weight" else v for k, v in params.items()}
    save_model(WORK / "overwritten", small, 50)
    proc = run("commit", "overwritten", "-b", "runs/demo", "-m", "Update model after evaluation", check=False)
    assert proc.returncode == 8, "the guard should have refused this commit"

    print("\nIncident 2: a clean-up deletes the run's branch.")
    run("branch", "-d", "runs/demo")
    run("reflog", "-n", "5")
    run("restore", "runs/demo")
    run("checkout", "runs/demo", "restored")
    same = (WORK / "restored" / "model.safetensors").read_bytes() == (
        WORK / "runs" / f"checkpoint-{step}" / "model.safetensors"
    ).read_bytes()
    print(f"restored checkpoint is bit-identical to the one trained: {same}")
    assert same
    print("\nA throw-away experiment, deleted; gc shows exactly what it would reclaim before deleting anything.")
    scratch = {k: v + rng.standard_normal(v.shape) * 0.01 for k, v in params.items()}
    save_model(WORK / "scratch", scratch, vocab)
    run("commit", "scratch", "-b", "runs/scratch", "-m", "lr sweep 1e-2 (diverged)", "--kind", "checkpoint")
    run("branch", "-d", "runs/scratch")
    # The defaults keep a deleted branch's data for 30 days; for the demo, a window of 0 days.
    proc = run("gc", "plan", "--retention-days", "0", "--grace-days", "0", "--json", quiet=True)
    proof = json.loads(proc.stdout)["proof"]
    run("gc", "show", proof[:12])
    run("gc", "apply", proof[:12], "--yes")
    run("gc", "undo", proof[:12])
    run("restore", "runs/scratch")
    run("fsck")
    print("\nThe store is in demo-work/undo/.mstore; try:")
    print("  MSTORE_DIR=demo-work/undo/.mstore .venv/bin/mstore log runs/demo")


if __name__ == "__main__":
    main()
