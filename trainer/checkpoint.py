"""A checkpoint's full training state on disk, and back.

A checkpoint directory (one commit) holds everything a run needs to continue exactly::

    model.safetensors, config.json, generation_config.json   full fine-tune
    adapter_model.safetensors, adapter_config.json           LoRA (the base is an input)
    tokenizer.json, tokenizer_config.json
    trainer_state/optimizer.safetensors   AdamW moments and step counts, by parameter name
    trainer_state/rng.safetensors         torch CPU (and CUDA) generator states, NumPy's state
    trainer_state/state.json              step, tokens, data position, optimizer groups,
                                          scheduler, Python RNG
    trainer_state/history.jsonl           one line per step: loss, learning rate, tokens

Optimizer state is safetensors, not a pickle: nothing in a checkpoint executes code when
loaded, and the store chunks it per tensor like the weights. Every file is a function of the
training state alone (no times, paths or run ids), so an interrupted-and-resumed run commits
byte-identical checkpoints to an uninterrupted one; run identity lives in the commit's
metadata instead.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import ResumeError

STATE_DIR = "trainer_state"
STATE_FORMAT = "mstore-trainer-checkpoint"
STATE_VERSION = 1


@dataclass
class TrainingState:
    """The position of a run: what was trained, and where the data order continues."""

    step: int = 0
    tokens: int = 0
    records: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def save_state(
    path: Path,
    state: TrainingState,
    data_position: dict[str, int],
    optimizer: torch.optim.Optimizer,
    param_names: list[str],
    scheduler: Any,
) -> None:
    """Write ``trainer_state/`` (optimizer, scheduler, RNG, position, history) into ``path``."""
    sd = path / STATE_DIR
    sd.mkdir(parents=True, exist_ok=True)
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt["state"].items():
        name = param_names[idx]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(name, {})[key] = value
    save_file(tensors, str(sd / "optimizer.safetensors"), metadata={"format": STATE_FORMAT})
    groups = []
    for g in opt["param_groups"]:
        gg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
        gg["params"] = [param_names[i] for i in g["params"]]
        groups.append(gg)
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    rng["numpy_keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.uint32).astype(np.int64))
    save_file({k: v.contiguous() for k, v in rng.items()}, str(sd / "rng.safetensors"))
    py_state = random.getstate()
    doc = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "step": state.step,
        "tokens": state.tokens,
        "data_position": data_position,
        "optimizer": {"class": type(optimizer).__name__, "param_groups": groups, "scalars": scalars},
        "scheduler": _jsonable(scheduler.state_dict()),
        "rng": {
            "python": [py_state[0], list(py_state[1]), py_state[2]],
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        },
    }
    (sd / "state.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    with open(sd / "history.jsonl", "w", encoding="utf-8") as f:
        for h in state.history:
            f.write(json.dumps(h, sort_keys=True) + "\n")


def read_state(path: Path) -> tuple[dict[str, Any], TrainingState]:
    """``state.json`` and the training position of a checked-out checkpoint.

    Raises:
        ResumeError: the directory is not a trainer checkpoint of a version this trainer reads.
    """
    sd = path / STATE_DIR
    try:
        doc = json.loads((sd / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ResumeError(f"{path.name} holds no readable {STATE_DIR}/state.json: not a trainer checkpoint") from None
    if doc.get("format") != STATE_FORMAT or doc.get("version") != STATE_VERSION:
        raise ResumeError(f"checkpoint state format {doc.get('format')!r} v{doc.get('version')} is not supported")
    history = []
    hist = sd / "history.jsonl"
    if hist.exists():
        history = [json.loads(line) for line in hist.read_text(encoding="utf-8").splitlines() if line.strip()]
    st = TrainingState(doc["step"], doc["tokens"], doc["data_position"]["records"], history)
    return doc, st


def restore_optimizer(optimizer: torch.optim.Optimizer, param_names: list[str], path: Path, doc: dict) -> None:
    """Load the saved AdamW state into ``optimizer`` (built over the same parameters).

    Raises:
        ResumeError: the parameters differ from the checkpoint's.
    """
    saved = doc["optimizer"]
    tensors = load_file(str(path / STATE_DIR / "optimizer.safetensors"))
    index = {n: i for i, n in enumerate(param_names)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, field_name = key.rpartition("/")
        if name not in index:
            raise ResumeError(f"checkpoint optimizer state names parameter {name!r}, which the model does not have")
        state.setdefault(index[name], {})[field_name] = value
    for name, extra in saved.get("scalars", {}).items():
        state.setdefault(index[name], {}).update(extra)
    groups = []
    for g in saved["param_groups"]:
        gg = dict(g)
        missing = [n for n in g["params"] if n not in index]
        if missing:
            raise ResumeError(f"checkpoint optimizer group names unknown parameters: {missing[:3]}")
        gg["params"] = [index[n] for n in g["params"]]
        if isinstance(gg.get("betas"), list):
            gg["betas"] = tuple(gg["betas"])
        groups.append(gg)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def restore_rng(path: Path, doc: dict) -> None:
    """Put every random generator back where the checkpoint left it."""
    rng = load_file(str(path / STATE_DIR / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        for i in range(min(doc["rng"].get("cuda_devices", 0), torch.cuda.device_count())):
            key = f"torch_cuda_{i}"
            if key in rng:
                torch.cuda.set_rng_state(rng[key], i)
    py = doc["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, pos, has_gauss, cached = doc["rng"]["numpy"]
    np.random.set_state((kind, rng["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return None  # a callable (an lr lambda) is rebuilt from the config, not stored
