"""Commit guards: refuse a new version that looks like a regression of its parent.

Incident 1 (docs/undo.md): a 13 MB model with a 15,814-word vocabulary was silently replaced
by a 2.7 K-line model with 329 words, under a commit message that called it an update. Every
finding below would have stopped that commit. A guard never blocks silently: each finding is
one line with both values, and ``--allow-regression`` records the override in the commit.

Checks (thresholds from ``[guards]`` in config.toml; defaults in :data:`DEFAULTS`):

* total bytes or file count shrink by more than ``max_shrink`` (default 50 %);
* a safetensors file loses tensors or parameters, or a tensor changes dtype or shape;
* the vocabulary shrinks by more than ``max_vocab_shrink`` (default: any shrink);
* a tracked metric is worse by more than ``max_metric_regression`` (default 10 %, relative).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from typing import Any

DEFAULTS: dict[str, Any] = {
    "max_shrink": 0.5,
    "max_vocab_shrink": 0.0,
    "max_metric_regression": 0.10,
}

# Metric names (glob patterns, matched case-insensitively against the key and its last
# path component) and which direction is better. Config `[guards.metrics]` entries win.
DEFAULT_DIRECTIONS: tuple[tuple[str, str], ...] = (
    ("*loss*", "lower"),
    ("*perplexity*", "lower"),
    ("ppl", "lower"),
    ("*_ppl", "lower"),
    ("wer", "lower"),
    ("cer", "lower"),
    ("*error*", "lower"),
    ("acc*", "higher"),
    ("*accuracy*", "higher"),
    ("*score*", "higher"),
    ("f1", "higher"),
    ("*_f1", "higher"),
    ("bleu", "higher"),
    ("rouge*", "higher"),
    ("auc", "higher"),
    ("precision", "higher"),
    ("recall", "higher"),
    ("exact_match", "higher"),
    ("*cosine*", "higher"),
)

# Files whose content says how large the vocabulary is, most specific first.
VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "config.json")


@dataclass
class VersionSummary:
    """What the guards compare: sizes, tensors per safetensors file, vocabulary, metrics."""

    bytes: int = 0
    files: int = 0
    vocab_size: int | None = None
    tensors: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tensor_files: int = 0  # files that may be chunked by tensor (safetensors, torch archives)


@dataclass(frozen=True)
class Finding:
    """One reason a commit looks like a regression."""

    guard: str
    what: str
    new: Any
    old: Any
    detail: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form (recorded in the commit when overridden)."""
        return {"guard": self.guard, "what": self.what, "new": self.new, "old": self.old, "detail": self.detail}


def direction(name: str, overrides: dict[str, str] | None = None) -> str | None:
    """``"lower"``, ``"higher"`` or None (not a tracked metric) for a metric name."""
    overrides = overrides or {}
    if name in overrides:
        return overrides[name]
    low = name.lower()
    last = low.rsplit("/", 1)[-1]
    for pattern, d in DEFAULT_DIRECTIONS:
        if fnmatch.fnmatchcase(low, pattern) or fnmatch.fnmatchcase(last, pattern):
            return d
    return None


def numeric_metrics(*sources: dict[str, Any]) -> dict[str, float]:
    """Numbers (not booleans) from ``meta``/``metrics`` dicts; later sources win."""
    out: dict[str, float] = {}
    for src in sources:
        for k, v in src.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = float(v)
    return out


def vocab_size_of(name: str, data: bytes) -> int | None:
    """Vocabulary size stated by a tokenizer/config file, or None if it states none."""
    try:
        if name == "vocab.txt":
            return sum(1 for line in data.decode("utf-8").splitlines() if line.strip())
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    if name == "config.json":
        v = doc.get("vocab_size")
        return v if isinstance(v, int) and not isinstance(v, bool) else None
    if name == "vocab.json":
        return len(doc)
    if name == "tokenizer.json":
        model = doc.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if not isinstance(vocab, (dict, list)):
            return None
        size = len(vocab)
        added = doc.get("added_tokens")
        if isinstance(added, list) and isinstance(vocab, dict):
            size += sum(1 for t in added if isinstance(t, dict) and t.get("content") not in vocab)
        return size
    return None


def pick_vocab(sizes: dict[str, int]) -> int | None:
    """The vocabulary size of a version from ``{path: size}`` of its vocab-bearing files."""
    for wanted in VOCAB_FILES:
        for path in sorted(sizes):
            if path.rsplit("/", 1)[-1] == wanted:
                return sizes[path]
    return None


def _pct(new: float, old: float) -> str:
    if old == 0:
        return "n/a"
    return f"{(new - old) / abs(old) * 100:+.1f} %"


def check(parent: VersionSummary, child: VersionSummary, policy: dict[str, Any] | None = None) -> list[Finding]:
    """Every way ``child`` looks like a regression of ``parent``."""
    pol = {**DEFAULTS, **{k: v for k, v in (policy or {}).items() if k != "metrics"}}
    overrides = (policy or {}).get("metrics") or {}
    out: list[Finding] = []
    shrink = float(pol["max_shrink"])
    if parent.bytes and child.bytes < parent.bytes * (1 - shrink):
        out.append(Finding("size", "bytes", child.bytes, parent.bytes, _pct(child.bytes, parent.bytes)))
    if parent.files and child.files < parent.files * (1 - shrink):
        out.append(Finding("size", "files", child.files, parent.files, _pct(child.files, parent.files)))
    for path, old_t in sorted(parent.tensors.items()):
        new_t = child.tensors.get(path)
        if new_t is None:
            continue  # a vanished file shows in bytes/files; a renamed one is not a regression by itself
        lost = sorted(set(old_t) - set(new_t))
        if lost:
            shown = ", ".join(lost[:3]) + (f" and {len(lost) - 3} more" if len(lost) > 3 else "")
            out.append(Finding("tensors", f"{path}: tensors", len(new_t), len(old_t), f"lost {shown}"))
        old_params = sum(_numel(s) for _d, s in old_t.values())
        new_params = sum(_numel(s) for _d, s in new_t.values())
        if new_params < old_params:
            out.append(Finding("tensors", f"{path}: parameters", new_params, old_params, _pct(new_params, old_params)))
        for name in sorted(set(old_t) & set(new_t)):
            (od, os_), (nd, ns) = old_t[name], new_t[name]
            if od != nd:
                out.append(Finding("tensors", f"{path}: {name} dtype", nd, od, f"{od} -> {nd}"))
            elif os_ != ns:
                out.append(
                    Finding("tensors", f"{path}: {name} shape", list(ns), list(os_), f"{list(os_)} -> {list(ns)}")
                )
    if parent.vocab_size and child.vocab_size is not None:
        if child.vocab_size < parent.vocab_size * (1 - float(pol["max_vocab_shrink"])):
            out.append(
                Finding(
                    "vocabulary",
                    "vocabulary",
                    child.vocab_size,
                    parent.vocab_size,
                    _pct(child.vocab_size, parent.vocab_size),
                )
            )
    limit = float(pol["max_metric_regression"])
    for key in sorted(set(parent.metrics) & set(child.metrics)):
        d = direction(key, overrides)
        if d is None:
            continue
        old, new = parent.metrics[key], child.metrics[key]
        worse = (new - old) if d == "lower" else (old - new)
        if worse > limit * abs(old) and worse > 0:
            out.append(Finding("metric", key, new, old, f"worse by {worse / abs(old) * 100:.0f} %" if old else "worse"))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
