"""`mstore import-model` and `mstore import-data`: ordinary commits, checked first, with kind and counts.

No torch needed: the model folder is written with NumPy and the safetensors library.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mstore import MalformedObject, PathNotFound, UserError  # noqa: F401
from mstore.cli import State
from mstore.cli.lineage import import_data, import_model
from tests.conftest import write_safetensors

TOKENIZER = {
    "version": "1.0",
    "added_tokens": [{"id": 0, "content": "<pad>", "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True}],
    "model": {"type": "WordLevel", "vocab": {"<pad>": 0, "<unk>": 1, "all": 2, "cats": 3, "are": 4, "animals": 5},
              "unk_token": "<unk>"},
    "pre_tokenizer": {"type": "Whitespace"},
    "normalizer": None, "post_processor": None, "decoder": None, "truncation": None, "padding": None,
}


def _model_dir(root: Path, tokenizer: bool = True, weights: bool = True) -> Path:
    d = root / "my-llama"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 6, "hidden_size": 8,
        "num_hidden_layers": 2,
    }))
    if weights:
        rng = np.random.default_rng(0)
        write_safetensors(d / "model.safetensors", {
            "model.embed_tokens.weight": rng.standard_normal((6, 8)).astype(np.float32),
            "lm_head.weight": rng.standard_normal((6, 8)).astype(np.float32),
        })
    if tokenizer:
        (d / "tokenizer.json").write_text(json.dumps(TOKENIZER))
    return d


def _data_dir(root: Path) -> Path:
    d = root / "shards"
    d.mkdir(parents=True)
    (d / "a.jsonl").write_text('{"text": "all cats are animals"}\n\n{"text": "all cats"}\n')
    (d / "sub").mkdir()
    (d / "sub" / "b.jsonl").write_text('{"text": "cats are animals"}\n')
    (d / "README.md").write_text("not data\n")
    return d


def _invoke(repo, command, *args):
    result = CliRunner().invoke(command, list(args), obj=State(str(repo.root)), catch_exceptions=True)
    return result


def test_import_model_commits_a_model_with_its_architecture_and_tensor_stats(repo, tmp_path):
    r = _invoke(repo, import_model, str(_model_dir(tmp_path)), "-b", "models/base")
    assert r.exit_code == 0, r.output
    assert "imported to models/base" in r.output and "llama" in r.output
    d = repo.show("models/base")
    assert d["kind"] == "model"
    assert d["meta"]["model"]["model_type"] == "llama" and d["meta"]["tokenizer"] == ["tokenizer.json"]
    assert d["stats"]["tensors"] == 2 and d["stats"]["parameters"] == 96 and d["stats"]["vocab_size"] == 6


def test_import_model_refuses_a_folder_without_a_tokenizer(repo, tmp_path):
    r = _invoke(repo, import_model, str(_model_dir(tmp_path, tokenizer=False)), "-b", "models/base")
    assert isinstance(r.exception, UserError) and "has no tokenizer" in str(r.exception)
    assert repo.head("models/base") is None


def test_import_model_refuses_a_folder_without_safetensors_weights(repo, tmp_path):
    d = _model_dir(tmp_path, weights=False)
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    r = _invoke(repo, import_model, str(d), "-b", "models/base")
    assert isinstance(r.exception, UserError) and "convert to safetensors" in str(r.exception)


def test_import_data_counts_records_per_file_and_commits_a_dataset(repo, tmp_path):
    r = _invoke(repo, import_data, str(_data_dir(tmp_path)), "-b", "data/x", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert out["data"]["records"] == 3 and out["data"]["files"] == {"a.jsonl": 2, "sub/b.jsonl": 1}
    d = repo.show("data/x")
    assert d["kind"] == "dataset" and d["meta"]["data"]["records"] == 3
    assert "README.md" in r.output  # warned: committed, not counted


def test_import_data_counts_tokens_with_a_given_tokenizer(repo, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(json.dumps(TOKENIZER))
    pytest.importorskip("tokenizers")
    r = _invoke(repo, import_data, str(_data_dir(tmp_path)), "-b", "data/x", "--tokenizer", str(tok))
    assert r.exit_code == 0, r.output
    data = repo.show("data/x")["meta"]["data"]
    assert data["tokens"] == 4 + 2 + 3 and data["tokens_per_file"] == {"a.jsonl": 6, "sub/b.jsonl": 3}
    assert len(data["tokenizer"]["file"]) == 64


def test_import_data_counts_tokens_with_a_tokenizer_from_a_model_in_the_store(repo, tmp_path):
    pytest.importorskip("tokenizers")
    _invoke(repo, import_model, str(_model_dir(tmp_path)), "-b", "models/base")
    r = _invoke(repo, import_data, str(_data_dir(tmp_path)), "-b", "data/x", "--tokenizer", "models/base")
    assert r.exit_code == 0, r.output
    tok = repo.show("data/x")["meta"]["data"]["tokenizer"]
    assert tok["rev"] == "models/base" and tok["id"] == str(repo.resolve("models/base"))


def test_import_data_refuses_a_line_that_is_not_a_json_object_naming_file_and_line(repo, tmp_path):
    d = _data_dir(tmp_path)
    (d / "a.jsonl").write_text('{"text": "ok"}\n\n[1, 2]\n')
    r = _invoke(repo, import_data, str(d), "-b", "data/x")
    assert isinstance(r.exception, UserError) and "a.jsonl line 3" in str(r.exception)
    assert repo.head("data/x") is None


def test_import_data_of_a_single_file(repo, tmp_path):
    d = _data_dir(tmp_path)
    r = _invoke(repo, import_data, str(d / "a.jsonl"), "-b", "data/x")
    assert r.exit_code == 0, r.output
    assert repo.show("data/x")["meta"]["data"]["files"] == {"a.jsonl": 2}
    assert [e.path for e in repo.ls("data/x")] == ["a.jsonl"]


def test_a_dataset_version_with_far_fewer_bytes_is_refused_by_the_guard(repo, tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    (big / "a.jsonl").write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(100)))
    assert _invoke(repo, import_data, str(big), "-b", "data/x").exit_code == 0
    (big / "a.jsonl").write_text('{"text": "one"}\n')
    r = _invoke(repo, import_data, str(big), "-b", "data/x")
    assert type(r.exception).__name__ == "RegressionRefused"
    assert _invoke(repo, import_data, str(big), "-b", "data/x", "--allow-regression").exit_code == 0
