"""Fixtures for the trainer tests: a tiny Llama and a small dataset, built once, imported per test.

Everything is real: a randomly initialised LlamaForCausalLM with a BPE tokenizer trained on
the generated sentences, committed with ``mstore.lineage.import_model`` / ``import_data``,
and trained on the CPU with one thread (which also makes every number bit-reproducible).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from mstore import Repo
from mstore import lineage as lin


@dataclass
class Assets:
    model: Path
    data: Path
    extra_data: Path


@dataclass
class Store:
    repo: Repo
    root: Path
    base: str
    data: str
    tmp: Path


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    pytest.importorskip("torch")
    from trainer import tiny

    d = tmp_path_factory.mktemp("assets")
    records = tiny.make_corpus(600, seed=1)
    tiny.write_jsonl(d / "data", records, files=3)
    tiny.write_jsonl(d / "extra" / "more.jsonl", tiny.make_corpus(120, seed=2))
    tiny.make_tiny_model(d / "model", [r["text"] for r in records], vocab_size=400, hidden=64, layers=2)
    return Assets(d / "model", d / "data", d / "extra")


@pytest.fixture
def store(tmp_path: Path, assets: Assets) -> Store:
    """A repository holding the tiny model (models/base) and the dataset (data/syllo)."""
    repo = Repo.init(tmp_path / ".mstore")
    base = lin.import_model(repo, assets.model, "models/base").commit.id
    data = lin.import_data(repo, assets.data, "data/syllo").commit.id
    lin.import_data(repo, assets.extra_data, "data/extra")
    yield Store(repo, repo.root, str(base), str(data), tmp_path)
    repo.close()
