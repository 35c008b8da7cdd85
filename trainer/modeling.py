"""Models: load a causal LM from a checked-out commit, wrap it with LoRA, save it reproducibly.

Everything loads with ``local_files_only=True`` from directories the store wrote and verified;
nothing is ever downloaded. Weights are kept and saved in float32 (master weights), so a
checkpoint resumes bit-exactly; on a CUDA device the forward pass runs under bf16 autocast
when the GPU supports it. On the CPU training runs in float32.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from .config import LoraSpec
from .errors import PreflightFailed

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def select_device(spec: str) -> torch.device:
    """The torch device for ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        PreflightFailed: the device does not exist on this machine (never silently replaced).
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise PreflightFailed("device", f"{spec!r} is not a device name (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise PreflightFailed(
                "device", f"device {spec} requested but {why} (torch {torch.__version__}); use --device cpu or auto"
            )
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            raise PreflightFailed(
                "device", f"device {spec} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return torch.device("cuda", index)
    raise PreflightFailed("device", f"device {spec} is not supported by the trainer (use cpu or cuda)")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 on a CUDA device that supports it (``auto``/``bf16``), else None (float32).

    Raises:
        PreflightFailed: bf16 was requested where it is not supported.
    """
    if precision == "fp32":
        return None
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not supported:
        raise PreflightFailed("device", f"--precision bf16 needs a CUDA device with bf16 support, not {device}")
    return torch.bfloat16 if supported else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The autocast context for the forward pass (a no-op in float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a model directory (pad token defaults to EOS)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, device: torch.device) -> Any:
    """A causal LM from a directory (config.json + safetensors), float32, on ``device``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    return model.to(device)


def wrap_lora(model: Any, spec: LoraSpec) -> Any:
    """A trainable peft LoRA model around ``model`` (its base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=spec.r,
        lora_alpha=spec.effective_alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def load_adapter(base_model: Any, path: str | Path, trainable: bool) -> Any:
    """A peft model: ``base_model`` plus the adapter saved in ``path``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(path), is_trainable=trainable)


def lora_targets(model: Any) -> list[str]:
    """The module names LoRA was applied to (sorted), as recorded in params."""
    targets = model.peft_config["default"].target_modules
    return sorted(targets) if not isinstance(targets, str) else [targets]


def save_weights(model: Any, tokenizer: Any, path: Path, base_id: str | None) -> list[str]:
    """Write the weights (or adapter), config and tokenizer into ``path``; return the file names.

    The output is a byte-for-byte function of the weights: peft's model card (README.md, which
    names local paths) is not written, LoRA target lists are sorted (peft keeps a set, whose
    order changes from process to process), and the adapter's base is the base commit's id.
    """
    path.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        cfg = model.peft_config["default"]
        cfg.target_modules = lora_targets(model)
        cfg.base_model_name_or_path = base_id
        model.save_pretrained(str(path))
        (path / "README.md").unlink(missing_ok=True)
    else:
        model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return sorted(p.name for p in path.iterdir() if p.is_file())


def is_peft(model: Any) -> bool:
    """True for a peft-wrapped model."""
    return hasattr(model, "peft_config")


def trainable_parameters(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every trainable parameter, in module order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def model_summary(path: str | Path) -> dict[str, Any]:
    """A few facts from ``config.json`` (model type, sizes) for messages and metadata."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    return {k: cfg[k] for k in keys if k in cfg}
