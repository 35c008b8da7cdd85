"""The validation metric, and its receipt: recomputed from the committed bytes before it counts.

Incident 3: checkpoints recorded a validation cosine of 0.53-0.56 while their weights gave
-0.007, and every gate passed because it read the stored number. Here a metric is recorded as
verified only when the checkpoint, read back from the store (every byte checked against its
id) into a freshly built model, reproduces the in-loop value on the held-out split within a
tolerance. A receipt, stored in the commit under ``metrics.receipts.<name>``, says what was
compared with what::

    {"verified": true, "status": "verified", "value": 3.0512,
     "in_loop": 3.0512, "recomputed": 3.0512, "abs_diff": 0.0,
     "tolerance": {"rel": 0.0001, "abs": 1e-06},
     "checkpoint": {"staged_commit": "<id>", "tree": "<id>",
                    "weights": {"adapter_model.safetensors": "<file id>"}},
     "eval_data": {"commit": "<data id>", "split": "<split id>", "records": 64, "tokens": 2311,
                   "source": "held out of the training data"},
     "evaluator": {"metric": "mean token cross-entropy", "code": {...}}, "device": "cpu"}
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import modeling
from .env import code_revision

METRIC = "eval_loss"
METRIC_DEFINITION = "mean token cross-entropy (nats) over the held-out split"
ABS_TOLERANCE = 1e-6


@dataclass
class Batch:
    """One tokenized batch: inputs, attention mask, labels (-100 on padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    tokens: int
    targets: int

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.tokens,
            self.targets,
        )


def encode(tokenizer: Any, texts: list[str], seq_len: int) -> Batch:
    """Tokenize ``texts`` (each + EOS, truncated to ``seq_len``), right-padded to the longest."""
    ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=seq_len - 1)["input_ids"]
    eos = tokenizer.eos_token_id
    rows = [list(r) + ([eos] if eos is not None else []) for r in ids]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    tokens = int(mask.sum())
    return Batch(input_ids, mask, labels, tokens, tokens - len(rows))


def loss_sum(model: Any, batch: Batch, amp: Any) -> torch.Tensor:
    """Summed next-token cross-entropy of a batch (float32), padding ignored."""
    with amp:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    shift = logits[:, :-1, :].float()
    target = batch.labels[:, 1:]
    return F.cross_entropy(shift.reshape(-1, shift.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum")


@torch.no_grad()
def eval_loss(model: Any, batches: list[Batch], device: torch.device, amp_dtype: torch.dtype | None) -> float:
    """The metric: mean token cross-entropy over ``batches`` (model left in the mode it was in)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for b in batches:
            total += float(loss_sum(model, b.to(device), modeling.autocast(device, amp_dtype)))
            count += b.targets
    finally:
        model.train(was_training)
    return total / max(count, 1)


def verify(
    repo: Any,
    staged_commit: str,
    *,
    method: str,
    base_dir: Path | None,
    batches: list[Batch],
    in_loop: float,
    tolerance: float,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    split: dict[str, Any],
    scratch: Path,
) -> dict[str, Any]:
    """Check out ``staged_commit``, load it into a new model, recompute the metric, compare.

    Never raises for a bad checkpoint: damaged bytes or weights that do not load are a failed
    verification (``status: "error"``), recorded like a mismatch. RNG state is preserved, so
    verifying does not change the training run it interrupts.
    """
    receipt: dict[str, Any] = {
        "verified": False,
        "in_loop": in_loop,
        "tolerance": {"rel": tolerance, "abs": ABS_TOLERANCE},
        "eval_data": {
            "commit": split["data"],
            "split": split["id"],
            "records": split["records"],
            "tokens": sum(b.tokens for b in batches),
            "source": split["source"],
        },
        "evaluator": {"metric": METRIC_DEFINITION, "code": code_revision()},
        "device": str(device),
    }
    if not math.isfinite(in_loop):
        receipt.update(in_loop=None, status="non-finite", value=None, recomputed=None,
                       error=f"the in-loop metric is {in_loop}")
        return receipt
    dest = scratch / f"verify-{staged_commit[:12]}"
    shutil.rmtree(dest, ignore_errors=True)
    try:
        commit = repo.get_commit(staged_commit)
        weights = [e for e in repo.ls(staged_commit, recursive=False) if e.path.endswith(".safetensors")]
        receipt["checkpoint"] = {
            "staged_commit": staged_commit,
            "tree": str(commit.tree),
            "weights": {e.path: str(e.id) for e in weights},
        }
        repo.checkout(staged_commit, dest)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if method == "lora":
                model = modeling.load_adapter(modeling.load_model(base_dir, device), dest, trainable=False)
            else:
                model = modeling.load_model(dest, device)
            recomputed = eval_loss(model, batches, device, amp_dtype)
            del model
    except Exception as exc:  # noqa: BLE001 - any failure to reload is a failed verification, recorded
        receipt.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500], value=None, recomputed=None)
        return receipt
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    if not math.isfinite(recomputed):
        receipt.update(status="mismatch", value=None, recomputed=None, error=f"recomputed metric is {recomputed}")
        return receipt
    diff = abs(recomputed - in_loop)
    ok = diff <= max(tolerance * abs(recomputed), ABS_TOLERANCE)
    receipt.update(
        verified=ok,
        status="verified" if ok else "mismatch",
        value=recomputed,
        recomputed=recomputed,
        abs_diff=diff,
    )
    return receipt


def receipt_line(r: dict[str, Any]) -> str:
    """A one-line summary of a receipt for progress output."""
    if r.get("verified"):
        return f"eval {r['value']:.4g} (verified)"
    if r.get("status") == "error":
        return f"eval {r['in_loop']:.4g} VERIFICATION FAILED: could not reload the committed checkpoint ({r['error']})"
    if r.get("recomputed") is None:
        return f"eval VERIFICATION FAILED: {r.get('error')}"
    return (
        f"eval {r['in_loop']:.4g} VERIFICATION FAILED: the committed weights give {r['recomputed']:.6g} "
        f"(in-loop {r['in_loop']:.6g}, |diff| {r['abs_diff']:.3g} > tolerance)"
    )
