"""The bundled trainer: fine-tune from store-resident models and data, committing every checkpoint.

Public entry points (loaded on first use, so ``import trainer`` does not import torch)::

    from trainer import TrainConfig, LoraSpec, train, resume, MstoreCallback

``train(TrainConfig(...), repo)`` runs preflight and a training loop that commits each
checkpoint with provenance, a data ledger and a verified metric receipt; ``resume(branch,
repo)`` continues a run exactly; ``MstoreCallback`` gives an existing Hugging Face ``Trainer``
script the same commits with one line. See docs/trainer.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "TrainConfig": "config",
    "LoraSpec": "config",
    "train": "loop",
    "resume": "loop",
    "Hooks": "loop",
    "RunResult": "loop",
    "MstoreCallback": "callback",
    "PreflightFailed": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "ResumeError": "errors",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
