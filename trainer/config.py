"""TrainConfig: everything that decides what a run computes, validated with clear errors.

The fields that decide the numbers (model, data, schedule, seeds) are recorded in every
checkpoint commit as ``params`` and restored from there by ``--resume``; the fields that only
decide where and how fast (device, threads, work directory, disk quota) are not, so a run can
resume on another machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")

# Options a resumed run may change: they do not change what is computed (steps only extends it).
RESUMABLE = ("steps", "device", "precision", "threads", "work_dir", "disk_quota", "log_every")


@dataclass
class LoraSpec:
    """LoRA adapter settings (peft). ``alpha`` defaults to ``2 * r``; ``targets`` to peft's choice."""

    r: int = 16
    alpha: float | None = None
    dropout: float = 0.05
    targets: list[str] | None = None

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``"r=16,alpha=32,dropout=0.1,targets=q_proj+v_proj"`` -> LoraSpec.

        Raises:
            ConfigError: an unknown key or a bad value.
        """
        spec = cls()
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--lora wants KEY=VALUE items (r=16,alpha=32,...), got {item!r}")
            try:
                if key == "r":
                    spec.r = int(value)
                elif key == "alpha":
                    spec.alpha = float(value)
                elif key == "dropout":
                    spec.dropout = float(value)
                elif key == "targets":
                    spec.targets = sorted(t for t in value.replace("+", " ").split() if t)
                else:
                    raise ConfigError(f"--lora: unknown key {key!r} (known: r, alpha, dropout, targets)")
            except ValueError:
                raise ConfigError(f"--lora: bad value for {key}: {value!r}") from None
        if spec.r < 1:
            raise ConfigError("--lora r must be at least 1")
        if not 0 <= spec.dropout < 1:
            raise ConfigError("--lora dropout must be in [0, 1)")
        return spec

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.r


@dataclass
class TrainConfig:
    """One training run. ``base``/``data`` are revisions (branch, tag or id) in the store."""

    branch: str
    base: str | None = None
    data: str | None = None
    eval_data: str | None = None
    lora: LoraSpec | None = None
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 128
    lr: float = 2e-4
    warmup_steps: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 200
    eval_every: int = 200
    eval_records: int = 64
    eval_seed: int = 0
    shuffle_block: int = 32
    text_field: str = "text"
    verify_tolerance: float = 1e-4
    allow_seen_data: bool = False
    message: str | None = None
    # Where and how fast: not recorded as params, changeable on resume.
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    work_dir: str | None = None
    disk_quota: int | None = None
    log_every: int = 10
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> TrainConfig:
        """Check ranges and combinations.

        Raises:
            ConfigError: naming the option and what is wrong with it.
        """
        positive = ("steps", "batch_size", "grad_accum", "seq_len", "save_every", "shuffle_block", "log_every")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("eval_every", "eval_records", "warmup_steps"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must not be negative")
        if self.seq_len < 2:
            raise ConfigError("--seq-len must be at least 2 (a token and its successor)")
        if not self.lr > 0:
            raise ConfigError("--lr must be positive")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("--threads must be at least 1")
        if self.verify_tolerance < 0:
            raise ConfigError("--verify-tolerance must not be negative")
        if self.eval_every and self.eval_data is None and self.eval_records == 0:
            raise ConfigError("evaluation needs held-out records: set --eval-records > 0, or --eval-data REV")
        return self

    @property
    def method(self) -> str:
        return "lora" if self.lora is not None else "full"

    def params(self) -> dict[str, Any]:
        """The hyperparameters recorded in each checkpoint commit (and restored on resume)."""
        d = asdict(self)
        for k in ("branch", "base", "data", "eval_data", "allow_seen_data", "message", "extra", *RESUMABLE):
            d.pop(k, None)
        d.pop("lora")
        if self.lora is not None:
            d["lora"] = {
                "r": self.lora.r,
                "alpha": self.lora.effective_alpha,
                "dropout": self.lora.dropout,
                "targets": self.lora.targets,
            }
        d["method"] = self.method
        d["steps"] = self.steps
        return d

    @classmethod
    def from_params(cls, branch: str, params: dict[str, Any], **overrides: Any) -> TrainConfig:
        """Rebuild the config of a run from a checkpoint's ``params`` (for ``--resume``)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in params.items() if k in known and k != "lora"}
        lora = params.get("lora")
        if isinstance(lora, dict):
            kw["lora"] = LoraSpec(
                r=int(lora["r"]), alpha=lora.get("alpha"), dropout=float(lora["dropout"]), targets=lora.get("targets")
            )
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(branch=branch, **kw)
