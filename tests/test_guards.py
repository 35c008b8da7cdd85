"""Commit guards: each regression is refused with a line that names it; overrides are recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mstore import RegressionRefused
from mstore.guards import VersionSummary, check, direction, vocab_size_of
from tests.conftest import random_tensors, snapshot_dir, write_safetensors


def _model(d, vocab: int, hidden: int = 16, extra: bool = True):
    rng = np.random.default_rng(vocab)
    t = {"emb": rng.standard_normal((vocab, hidden)).astype(np.float32)}
    if extra:
        t["head"] = rng.standard_normal((hidden, 4)).astype(np.float32)
    write_safetensors(d / "model.safetensors", t)
    (d / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    return d


def test_shrinking_by_more_than_half_is_a_finding():
    f = check(VersionSummary(bytes=1000, files=10), VersionSummary(bytes=400, files=10))
    assert [x.what for x in f] == ["bytes"]


def test_shrinking_by_less_than_half_is_not():
    assert check(VersionSummary(bytes=1000, files=10), VersionSummary(bytes=600, files=6)) == []


def test_lost_tensor_dtype_and_shape_changes_are_findings():
    old = VersionSummary(tensors={"m.safetensors": {"a": ("F32", (4, 4)), "b": ("F32", (2,)), "c": ("F32", (3,))}})
    new = VersionSummary(tensors={"m.safetensors": {"a": ("F16", (4, 4)), "b": ("F32", (3,))}})
    whats = [x.what for x in check(old, new)]
    assert "m.safetensors: tensors" in whats
    assert "m.safetensors: a dtype" in whats
    assert "m.safetensors: b shape" in whats


def test_metric_direction_follows_the_name():
    assert direction("eval/loss") == "lower"
    assert direction("val_accuracy") == "higher"
    assert direction("score") == "higher"
    assert direction("learning_rate") is None
    assert direction("lr", {"lr": "lower"}) == "lower"


def test_worse_metric_beyond_threshold_is_a_finding_but_better_is_not():
    worse = check(VersionSummary(metrics={"eval/loss": 1.87}), VersionSummary(metrics={"eval/loss": 2.91}))
    assert [x.what for x in worse] == ["eval/loss"]
    assert check(VersionSummary(metrics={"acc": 0.80}), VersionSummary(metrics={"acc": 0.90})) == []
    assert check(VersionSummary(metrics={"acc": 0.80}), VersionSummary(metrics={"acc": 0.75})) == []  # 6 % < 10 %


def test_thresholds_come_from_the_policy():
    policy = {"max_shrink": 0.9, "max_metric_regression": 0.01}
    assert check(VersionSummary(bytes=1000), VersionSummary(bytes=400), policy) == []
    assert check(VersionSummary(metrics={"acc": 0.80}), VersionSummary(metrics={"acc": 0.78}), policy) != []


def test_vocabulary_is_read_from_tokenizer_and_config_files():
    tok = {"model": {"vocab": {"a": 0, "b": 1, "c": 2}}, "added_tokens": [{"content": "<pad>"}, {"content": "a"}]}
    assert vocab_size_of("tokenizer.json", json.dumps(tok).encode()) == 4
    assert vocab_size_of("config.json", b'{"vocab_size": 15814}') == 15814
    assert vocab_size_of("vocab.txt", b"a\nb\n\nc\n") == 3
    assert vocab_size_of("config.json", b"not json") is None


def test_commit_that_shrinks_vocabulary_is_refused_and_stores_nothing(repo, work):
    repo.commit(_model(work / "v1", vocab=1000), "main", "good", kind="model")
    before = snapshot_dir(repo.root)
    with pytest.raises(RegressionRefused) as exc:
        repo.commit(_model(work / "v2", vocab=900), "main", "smaller vocab")
    assert "vocabulary" in str(exc.value) and "900" in str(exc.value) and "1,000" in str(exc.value)
    assert snapshot_dir(repo.root) == before


def test_allow_regression_records_the_override_in_the_commit(repo, work):
    repo.commit(_model(work / "v1", vocab=1000), "main", "good", kind="model")
    res = repo.commit(_model(work / "v2", vocab=900), "main", "smaller vocab", allow_regression=True)
    overridden = repo.show("main")["provenance"]["guards_overridden"]
    assert {f["guard"] for f in overridden} >= {"vocabulary"}
    assert res.overridden


def test_dry_run_runs_the_guards_too(repo, work):
    repo.commit(_model(work / "v1", vocab=1000), "main", "good", kind="model")
    with pytest.raises(RegressionRefused) as exc:
        repo.commit(_model(work / "v2", vocab=900), "main", "x", dry_run=True)
    assert "dry run" in str(exc.value)


def test_dry_run_commit_changes_nothing_on_disk_and_counts_new_bytes(repo, work):
    repo.commit(work / "a" if False else _model(work / "v1", vocab=1000), "main", "good")
    t = random_tensors(3, seed=7)
    write_safetensors(work / "v1" / "extra.safetensors", t)
    before = snapshot_dir(repo.root)
    res = repo.commit(work / "v1", "main", "would add extra", dry_run=True)
    assert res.id is None and res.dry_run
    assert res.new_bytes >= sum(a.nbytes for a in t.values())
    assert snapshot_dir(repo.root) == before


def test_nan_metadata_is_refused_before_anything_is_stored(repo, work):
    from mstore import MalformedObject

    before = snapshot_dir(repo.root)
    with pytest.raises(MalformedObject):
        repo.commit(_model(work / "v1", vocab=10), "main", "nan", meta={"loss": float("nan")})
    assert snapshot_dir(repo.root) == before
