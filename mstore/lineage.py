"""Models and datasets as versions with a past: import them, trace what they came from, ask what saw what.

Four operations, none of which needs torch (the trainer writes what they read):

* :func:`import_model` commits a local Hugging Face model folder (config, tokenizer,
  safetensors shards) as a ``model`` commit, after checking it is one;
* :func:`import_data` commits JSONL files (or a folder of them) as a ``dataset`` commit with
  record counts per file, and optionally token counts with a given tokenizer;
* :func:`lineage` follows the ``inputs`` recorded in commits (a checkpoint names its base model
  and its data) back to commits that have none: "what was this model trained from?";
* :func:`seen` reads the data ledger that trainer checkpoints carry (a file named by
  ``meta.ledger.file``: record ranges by file id) and answers "which records of this dataset has this lineage, or any
  branch, trained on?" (incident 4).

A record is a non-empty line of a ``.jsonl`` file, numbered from 0 in file order; the trainer
counts by the same rule. Every function takes the repository as its first argument and uses
only its public methods.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from .errors import FormatError, PathNotFound, UserError
from .hashing import is_full_id

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MODEL_FACTS = (
    "model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "dtype", "torch_dtype",
)
MAX_DEPTH = 64


@dataclass
class ImportResult:
    """A committed (or, dry run, checked) import: the commit, what was found, and warnings."""

    commit: Any
    summary: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


# -- import-model ---------------------------------------------------------------------------------
def inspect_model_dir(path: str | os.PathLike) -> tuple[dict[str, Any], list[str]]:
    """Check that ``path`` is a loadable Hugging Face model folder; return its facts and warnings.

    Raises:
        PathNotFound: ``path`` does not exist.
        UserError: no config.json, no safetensors weights, a missing shard, or no tokenizer.
    """
    root = Path(path)
    if not root.exists():
        raise PathNotFound(f"{root} does not exist")
    if not root.is_dir():
        raise UserError(f"{root} is a file; import-model takes a model folder (config.json, tokenizer, *.safetensors)")
    names = {p.name for p in root.iterdir() if p.is_file()}
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{root} has no config.json: not a Hugging Face model folder") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{root}/config.json is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise UserError(f"{root}/config.json is not a JSON object")
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    if not shards:
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        hint = f" (found {', '.join(pickles)}: convert to safetensors first)" if pickles else ""
        raise UserError(f"{root} has no *.safetensors weights{hint}")
    index_name = "model.safetensors.index.json"
    if index_name in names:
        try:
            weight_map = json.loads((root / index_name).read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError, AttributeError) as exc:
            raise UserError(f"{root}/{index_name} is not valid: {exc}") from None
        missing = sorted(set(weight_map.values()) - names)
        if missing:
            raise UserError(f"{root}: {index_name} names shards that are missing: {', '.join(missing[:5])}")
    tokenizer = sorted(n for n in names if n in TOKENIZER_FILES)
    if not tokenizer:
        raise UserError(
            f"{root} has no tokenizer ({', '.join(TOKENIZER_FILES)}): a model without its tokenizer cannot be "
            "trained or served; save it into the folder first"
        )
    warnings = []
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        warnings.append(
            f"{', '.join(pickles)}: pickle files can run code when loaded; they are committed as they are, "
            "but the trainer only ever loads the safetensors"
        )
    facts = {k: config[k] for k in MODEL_FACTS if k in config}
    summary = {"source": root.resolve().name, "model": facts, "shards": len(shards), "tokenizer": tokenizer}
    return summary, warnings


def import_model(
    repo: Any,
    path: str | os.PathLike,
    branch: str,
    message: str | None = None,
    *,
    allow_regression: bool = False,
    dry_run: bool = False,
    argv: list[str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> ImportResult:
    """Commit a local Hugging Face model folder as a ``model`` commit on ``branch``.

    Raises:
        PathNotFound, UserError: see :func:`inspect_model_dir`.
        RegressionRefused: the folder looks like a regression of the branch head.
    """
    summary, warnings = inspect_model_dir(path)
    facts = summary["model"]
    arch = (facts.get("architectures") or [facts.get("model_type", "model")])[0]
    msg = message or f"import {summary['source']} ({arch})"
    meta = {"source": summary["source"], "model": facts, "shards": summary["shards"],
            "tokenizer": summary["tokenizer"]}
    res = repo.commit(
        path, branch, msg, kind="model", meta=meta, allow_regression=allow_regression, dry_run=dry_run,
        argv=argv, cwd=cwd,
    )
    return ImportResult(res, summary, warnings)


# -- import-data ----------------------------------------------------------------------------------
def split_records(data: bytes) -> list[bytes]:
    """The records of a JSONL file: its non-empty lines, in order."""
    return [line for line in data.split(b"\n") if line.strip()]


def _jsonl_files(root: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    if not root.exists():
        raise PathNotFound(f"{root} does not exist")
    if root.is_file():
        if not root.name.endswith(".jsonl"):
            raise UserError(f"{root} is not a .jsonl file")
        return [(root.name, root)], []
    files: list[tuple[str, Path]] = []
    others: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if name.endswith(".jsonl"):
                files.append((rel, p))
            else:
                others.append(rel)
    if not files:
        raise UserError(f"{root} holds no .jsonl files")
    return files, others


def load_tokenizer(repo: Any, spec: str) -> tuple[Any, dict[str, Any]]:
    """A ``tokenizers.Tokenizer`` from a tokenizer.json path, a folder, or a revision in the store.

    Raises:
        UserError: the tokenizers package is missing, or ``spec`` names no tokenizer.json.
    """
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError("counting tokens needs the 'tokenizers' package (pip install 'mstore[train]')") from None
    p = Path(spec)
    if p.is_dir():
        p = p / "tokenizer.json"
    if p.is_file():
        raw = p.read_bytes()
        source = {"path": str(spec), "file": blake3.blake3(raw).hexdigest()}
    else:
        try:
            oid = str(repo.resolve(spec))
            with repo.open_file(f"{oid}:tokenizer.json") as f:
                raw = f.read()
        except Exception as exc:  # noqa: BLE001 - any failure means: no tokenizer there
            raise UserError(f"--tokenizer {spec}: no tokenizer.json there (path, folder or revision): {exc}") from None
        source = {"rev": spec, "id": oid, "file": blake3.blake3(raw).hexdigest()}
    try:
        return Tokenizer.from_str(raw.decode("utf-8")), source
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exception
        raise UserError(f"--tokenizer {spec}: tokenizer.json does not load: {exc}") from None


def _text(rec: Any, text_field: str) -> str | None:
    if isinstance(rec, dict):
        if isinstance(rec.get(text_field), str):
            return rec[text_field]
        if isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
            return rec["prompt"] + rec["completion"]
    return None


def inspect_data(path: str | os.PathLike, tokenizer: Any = None, text_field: str = "text") -> dict[str, Any]:
    """Count (and check) the records of JSONL files; with a tokenizer, their tokens too.

    Raises:
        PathNotFound: ``path`` does not exist.
        UserError: no JSONL files, a line that is not a JSON object, or (with a tokenizer) a
            record without text.
    """
    root = Path(path)
    files, others = _jsonl_files(root)
    per_file: dict[str, int] = {}
    tokens_per_file: dict[str, int] = {}
    keys: set[str] = set()
    total_bytes = 0
    for rel, p in files:
        raw = p.read_bytes()
        total_bytes += len(raw)
        n = 0
        texts = []
        for lineno, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise UserError(f"{rel} line {lineno}: not valid JSON ({exc})") from None
            if not isinstance(rec, dict):
                raise UserError(f"{rel} line {lineno}: a record must be a JSON object, not {type(rec).__name__}")
            if len(keys) < 64:
                keys.update(rec)
            if tokenizer is not None:
                t = _text(rec, text_field)
                if t is None:
                    raise UserError(f"{rel} line {lineno}: no string field {text_field!r} to count tokens of")
                texts.append(t)
            n += 1
        per_file[rel] = n
        if tokenizer is not None:
            tokens_per_file[rel] = sum(len(e.ids) for e in tokenizer.encode_batch(texts)) if texts else 0
    out: dict[str, Any] = {
        "format": "jsonl",
        "records": sum(per_file.values()),
        "bytes": total_bytes,
        "files": per_file,
        "fields": sorted(keys)[:32],
    }
    if tokenizer is not None:
        out["tokens"] = sum(tokens_per_file.values())
        out["tokens_per_file"] = tokens_per_file
        out["text_field"] = text_field
    out["ignored"] = others
    return out


def import_data(
    repo: Any,
    path: str | os.PathLike,
    branch: str,
    message: str | None = None,
    *,
    tokenizer: str | None = None,
    text_field: str = "text",
    allow_regression: bool = False,
    dry_run: bool = False,
    argv: list[str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> ImportResult:
    """Commit JSONL files (a file, or a folder of them) as a ``dataset`` commit with counts.

    Raises:
        PathNotFound, UserError: see :func:`inspect_data` and :func:`load_tokenizer`.
        RegressionRefused: far fewer bytes or files than the branch head.
    """
    tok, tok_source = load_tokenizer(repo, tokenizer) if tokenizer else (None, None)
    info = inspect_data(path, tok, text_field)
    warnings = []
    ignored = info.pop("ignored")
    if ignored:
        warnings.append(f"{len(ignored)} non-JSONL files are committed but not counted: {', '.join(ignored[:5])}")
    if tok_source is not None:
        info["tokenizer"] = tok_source
    name = Path(path).resolve().name
    n = len(info["files"])
    msg = message or f"import {name} ({n} file{'s' if n != 1 else ''}, {info['records']:,} records)"
    res = repo.commit(
        path, branch, msg, kind="dataset", meta={"source": name, "data": info},
        allow_regression=allow_regression, dry_run=dry_run, argv=argv, cwd=cwd,
    )
    return ImportResult(res, info, warnings)


# -- lineage --------------------------------------------------------------------------------------
def _input_ids(commit: Any) -> list[tuple[str, str]]:
    out = []
    for name, v in sorted(commit.inputs.items()):
        if isinstance(v, str) and is_full_id(v):
            out.append((name, v))
        elif isinstance(v, dict) and isinstance(v.get("id"), str) and is_full_id(v["id"]):
            out.append((name, v["id"]))
    base = commit.meta.get("base")
    if isinstance(base, str) and is_full_id(base) and ("base", base) not in out:
        out.append(("base", base))
    return out


def _recorded_revs(commit: Any) -> dict[str, str]:
    revs = {}
    for key in ("trainer", "run"):
        block = commit.provenance.get(key)
        if isinstance(block, dict) and isinstance(block.get("inputs"), dict):
            for name, v in block["inputs"].items():
                if isinstance(v, dict) and isinstance(v.get("rev"), str):
                    revs[name] = v["rev"]
    return revs


def _summary(commit: Any) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for k in ("step", "steps", "tokens"):
        if isinstance(commit.meta.get(k), int):
            s[k] = commit.meta[k]
    run = commit.meta.get("run")
    if isinstance(run, dict):
        s["run"] = {k: run.get(k) for k in ("id", "status", "method")}
    data = commit.meta.get("data")
    if isinstance(data, dict):
        s["data"] = {k: data[k] for k in ("records", "tokens") if k in data}
        s["data"]["files"] = len(data.get("files") or {})
    model = commit.meta.get("model")
    if isinstance(model, dict):
        s["model"] = model.get("model_type")
    receipts = commit.metrics.get("receipts")
    if isinstance(receipts, dict):
        s["metrics"] = {
            name: {
                "value": r.get("value") if r.get("verified") else r.get("in_loop"),
                "verified": bool(r.get("verified")),
            }
            for name, r in receipts.items()
            if isinstance(r, dict)
        }
    return s


def lineage(repo: Any, rev: str, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """The tree of inputs behind ``rev``: each node a commit, its children the commits it names as inputs.

    A commit's inputs are those it records itself plus those of its first-parent ancestors
    (checkpoints of one run name the same inputs; a branch that held several runs names all
    of theirs). Each input is shown once per node, with the revision it was given as when that
    was recorded.

    Raises:
        NotFound: ``rev`` does not resolve.
    """
    refs: dict[str, list[str]] = {}
    for b in repo.branches():
        refs.setdefault(str(b.id), []).append(b.name)
    for t in repo.tags():
        refs.setdefault(str(t.id), []).append(t.name)
    memo: dict[str, dict[str, Any]] = {}

    def node(oid: str, depth: int, trail: frozenset[str]) -> dict[str, Any]:
        commit = repo.get_commit(oid)
        n = {
            "id": oid,
            "refs": sorted(refs.get(oid, [])),
            "kind": commit.kind,
            "message": commit.message,
            "time": commit.time,
            "bytes": commit.stats.get("bytes"),
            "parameters": commit.stats.get("parameters"),
            **_summary(commit),
            "inputs": [],
        }
        if depth >= max_depth or oid in trail:
            n["truncated"] = True
            return n
        seen: dict[tuple[str, str], str | None] = {}
        for entry in repo.log(oid, limit=100_000) if commit.parents else [None]:
            c = commit if entry is None else entry.commit
            revs = _recorded_revs(c)
            for name, iid in _input_ids(c):
                seen.setdefault((name, iid), revs.get(name))
        for (name, iid), was in seen.items():
            if iid not in memo:
                try:
                    memo[iid] = node(iid, depth + 1, trail | {oid})
                except Exception as exc:  # noqa: BLE001 - a missing input is shown, not fatal
                    memo[iid] = {"id": iid, "missing": f"{type(exc).__name__}: {exc}", "inputs": []}
            n["inputs"].append({"name": name, "rev": was, "node": memo[iid]})
        return n

    return node(str(repo.resolve(rev)), 0, frozenset())


def to_dot(tree: dict[str, Any]) -> str:
    """Graphviz ``digraph`` of a :func:`lineage` tree (inputs point at what was made from them)."""
    lines = ["digraph lineage {", "  rankdir=LR;", '  node [shape=box, fontname="monospace"];']
    done: set[str] = set()

    def label(n: dict[str, Any]) -> str:
        parts = [", ".join(n.get("refs") or []) or n["id"][:7]]
        parts.append(f"{n.get('kind', '?')} {n['id'][:7]}")
        if "step" in n:
            parts.append(f"step {n['step']}")
        for name, m in (n.get("metrics") or {}).items():
            if isinstance(m.get("value"), (int, float)):
                parts.append(f"{name} {m['value']:.4g} {'verified' if m['verified'] else 'UNVERIFIED'}")
        if n.get("missing"):
            parts.append("missing")
        return "\\n".join(p.replace('"', "'") for p in parts)

    def visit(n: dict[str, Any]) -> None:
        if n["id"] in done:
            return
        done.add(n["id"])
        lines.append(f'  "{n["id"]}" [label="{label(n)}"];')
        for inp in n.get("inputs", []):
            visit(inp["node"])
            lines.append(f'  "{inp["node"]["id"]}" -> "{n["id"]}" [label="{inp["name"]}"];')

    visit(tree)
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- seen -----------------------------------------------------------------------------------------
def _normalize(ranges: Any) -> list[list[int]]:
    items = sorted((int(a), int(b)) for a, b in ranges if int(b) > int(a))
    out: list[list[int]] = []
    for a, b in items:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _clip(ranges: list[list[int]], n: int) -> list[list[int]]:
    return [[a, min(b, n)] for a, b in ranges if a < n]


def _data_files(repo: Any, spec: str) -> tuple[str, str, list[dict[str, Any]]]:
    rev, _, inner = spec.partition(":")
    oid = str(repo.resolve(rev))
    commit = repo.get_commit(oid)
    counts = (commit.meta.get("data") or {}).get("files") or {}
    inner = inner.strip("/")
    files = []
    for e in repo.ls(oid):
        if e.kind == "tree" or not e.path.endswith(".jsonl"):
            continue
        if inner and e.path != inner and not e.path.startswith(inner + "/"):
            continue
        n = counts.get(e.path)
        if not isinstance(n, int):
            with repo.open_file(f"{oid}:{e.path}") as f:
                n = len(split_records(f.read()))
        files.append({"path": e.path, "id": str(e.id), "records": n})
    if not files:
        where = f"{rev}:{inner}" if inner else rev
        raise PathNotFound(f"{where} holds no .jsonl files")
    return rev, oid, sorted(files, key=lambda f: f["path"])


def read_ledger(repo: Any, oid: str, commit: Any) -> dict[str, Any] | None:
    """The data ledger a commit carries: the file ``meta.ledger.file`` names, or an inline one; None if none.

    Raises:
        IntegrityError: the ledger file is damaged in the store.
        FormatError: it is not valid JSON.
    """
    led = commit.meta.get("ledger")
    if not isinstance(led, dict):
        return None
    if isinstance(led.get("file"), str):
        with repo.open_file(f"{oid}:{led['file']}") as f:
            raw = f.read()
        try:
            led = json.loads(raw)
        except ValueError as exc:
            raise FormatError(f"{oid[:7]}:{led['file']} is not valid JSON: {exc}") from None
    return led if isinstance(led, dict) and isinstance(led.get("files"), dict) else None


def seen(repo: Any, data: str, by: str | None = None) -> dict[str, Any]:
    """Which records of ``data`` (``REV`` or ``REV:PATH``) were trained on, by ``by`` or by any branch.

    Reads the data ledger of the checkpoint ``by`` names (its whole lineage), or of every
    branch head when ``by`` is None (see :func:`read_ledger`). Files are matched by content id, so a shard is
    recognised in any dataset version that contains it.

    Raises:
        NotFound: ``data`` or ``by`` does not resolve; PathNotFound: no JSONL files there.
    """
    rev, oid, files = _data_files(repo, data)
    total = sum(f["records"] for f in files)
    if by is not None:
        targets = [(by, str(repo.resolve(by)))]
    else:
        targets = [(b.name, str(b.id)) for b in repo.branches()]
    consumers = []
    for name, cid in targets:
        c = repo.get_commit(cid)
        led = read_ledger(repo, cid, c)
        entries = led["files"] if led is not None else None
        if entries is None:
            if by is not None:
                consumers.append({"ref": name, "id": cid, "ledger": False, "records_seen": 0, "files": []})
            continue
        per = []
        for f in files:
            e = entries.get(f["id"])
            ranges = _clip(_normalize(e.get("seen", [])), f["records"]) if isinstance(e, dict) else []
            n = sum(b - a for a, b in ranges)
            per.append({**f, "seen": n, "ranges": ranges})
        n_seen = sum(p["seen"] for p in per)
        if by is None and n_seen == 0:
            continue
        consumers.append({
            "ref": name,
            "id": cid,
            "ledger": True,
            "step": c.meta.get("step"),
            "records_seen": n_seen,
            "files_seen": sum(1 for p in per if p["seen"]),
            "files_complete": sum(1 for p in per if p["seen"] == p["records"]),
            "files": per,
        })
    return {
        "data": {"rev": data, "id": oid, "files": len(files), "records": total},
        "by": consumers,
    }
