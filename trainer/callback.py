"""MstoreCallback: every checkpoint a Hugging Face ``Trainer`` saves becomes an mstore commit.

One line in an existing script::

    trainer.add_callback(MstoreCallback("runs/my-exp", base="models/base", data="data/train"))

Each ``checkpoint-N`` folder HF writes (weights, optimizer, scheduler, RNG, trainer_state.json)
is committed as it is, right after HF saves it and before ``save_total_limit`` could remove
it, with the same provenance the bundled trainer records (code, command, environment, CUDA,
GPUs) and the base and data as inputs by id. Resume as HF does: check the commit out and pass
the folder to ``trainer.train(resume_from_checkpoint=...)``.

Two records need the bundled trainer (``mstore train``) and are stated as absent here: HF
evaluates in memory, so its metrics are recorded with ``verified: false`` receipts (never a
top-level verified metric); and HF's sampler does not expose which records it consumed, so
the data ledger records only how many samples were seen, not ranges.
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

import mstore

from . import env
from .committer import commit_checkpoint

TRACKED_ARGS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "max_steps",
    "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed",
    "bf16", "fp16", "optim", "save_steps", "eval_steps",
)


class MstoreCallback(TrainerCallback):
    """Commit each checkpoint HF ``Trainer`` saves to ``branch`` (see the module docstring).

    Args:
        branch: branch to commit to.
        repo: a :class:`mstore.Repo`, a store directory, or None to find one as ``mstore``
            does (``$MSTORE_DIR``, else ``.mstore`` at or above the working directory).
        base, data: revisions of the base model and training data, recorded as inputs by id.
        message: prefix of each commit message.

    Attributes:
        commits: ``(global_step, commit id)`` of every checkpoint committed so far.
    """

    def __init__(
        self,
        branch: str,
        repo: Any = None,
        *,
        base: str | None = None,
        data: str | None = None,
        message: str | None = None,
    ):
        self.branch = branch
        self._repo_arg = repo
        self._repo: Any = None
        self.base = base
        self.data = data
        self.message = message
        self.commits: list[tuple[int, str]] = []
        self.inputs: dict[str, str] = {}
        self.revs: dict[str, dict[str, str]] = {}
        self.run_id = uuid.uuid4().hex[:16]
        self.started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.head: str | None = None

    @property
    def repo(self) -> Any:
        if self._repo is None:
            if isinstance(self._repo_arg, mstore.Repo):
                self._repo = self._repo_arg
            elif self._repo_arg is not None:
                self._repo = mstore.Repo.open(self._repo_arg)
            else:
                self._repo = mstore.Repo.discover(os.getcwd(), env=dict(os.environ))
            for name, rev in (("base", self.base), ("data", self.data)):
                if rev:
                    oid = str(self._repo.resolve(rev))
                    self.inputs[name] = oid
                    self.revs[name] = {"rev": rev, "id": oid}
            head = self._repo.head(self.branch)
            self.head = str(head) if head else None
        return self._repo

    def on_train_begin(self, args, state, control, **kwargs):
        """Open the store and resolve the inputs before the first step (a wrong name fails fast)."""
        if state.is_world_process_zero:
            _ = self.repo

    def on_save(self, args, state, control, **kwargs):
        """Commit the checkpoint folder HF just wrote."""
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            return
        repo = self.repo
        logs = [h for h in state.log_history if h.get("step") == state.global_step]
        train_log = next((h for h in reversed(state.log_history) if "loss" in h), {})
        evals = {k: v for h in logs for k, v in h.items()
                 if k.startswith("eval_") and isinstance(v, (int, float)) and not isinstance(v, bool)
                 and k not in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")}
        finished = state.max_steps > 0 and state.global_step >= state.max_steps
        samples = state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps * max(
            args.world_size, 1
        )
        meta = {
            "step": state.global_step,
            "steps": state.max_steps,
            "epoch": state.epoch,
            "lr": train_log.get("learning_rate"),
            "train": {"loss": train_log.get("loss"), "logged_at_step": train_log.get("step")},
            "run": {"id": self.run_id, "method": "hf-trainer", "started": self.started,
                    "status": "finished" if finished else "running"},
            "ledger": {"v": 1, "files": {}, "datasets": {},
                       "samples": samples, "note": "HF Trainer: samples counted, record ranges not tracked"},
        }
        if state.num_input_tokens_seen:
            meta["tokens"] = int(state.num_input_tokens_seen)
        receipts = {
            k: {"verified": False, "status": "unverified", "in_loop": v, "value": None,
                "reason": "computed in memory by HF Trainer; not recomputed from the committed bytes"}
            for k, v in evals.items()
        }
        metrics = {"receipts": receipts} if receipts else {}
        params = {k: _plain(getattr(args, k, None)) for k in TRACKED_ARGS}
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
        prov = env.provenance(str(args.device), precision, inputs=self.revs, run=self.run_id, callback="hf-trainer")
        msg = (self.message + ": " if self.message else "") + f"HF checkpoint-{state.global_step}"
        if train_log.get("loss") is not None:
            msg += f", loss {train_log['loss']:.4f}"
        res = commit_checkpoint(
            repo, folder, self.branch, msg, _warn,
            meta=meta, metrics=metrics, params=params, inputs=self.inputs, provenance=prov,
            expected_head=mstore.ObjectId(self.head) if self.head else None,
        )
        self.head = str(res.id)
        self.commits.append((state.global_step, self.head))

    def on_train_end(self, args, state, control, **kwargs):
        """Release the store (the commits are already durable)."""
        if self._repo is not None and not isinstance(self._repo_arg, mstore.Repo):
            self._repo.close()
            self._repo = None


def _plain(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(getattr(v, "value", v))


def _warn(event: str, **fields: Any) -> None:
    import warnings

    for g in fields.get("findings", []):
        warnings.warn(f"mstore: {g['what']} regressed ({g['detail']}); checkpoint committed anyway", stacklevel=2)
