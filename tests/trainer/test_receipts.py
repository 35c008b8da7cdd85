"""Metric receipts: a metric counts as verified only if the committed bytes reproduce it (incident 3)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tests.trainer.helpers import Events, config  # noqa: E402


def _run(store, **hooks):
    from trainer import Hooks, train

    events = Events()
    result = train(config(), store.repo, report=events, hooks=Hooks(**hooks))
    return result, events


def _receipt(repo, rev):
    return repo.show(rev)["metrics"]["receipts"]["eval_loss"]


def _corrupt_adapter(step_to_break):
    from safetensors.torch import load_file, save_file

    def after_save(step, path, model):
        if step == step_to_break:  # the committed weights are not the trained ones: a broken save
            f = path / "adapter_model.safetensors"
            tensors = load_file(f)
            for name in tensors:
                if "lora_B" in name:
                    tensors[name] = tensors[name] + 0.5
            save_file(tensors, f)

    return after_save


def test_a_metric_reproduced_from_the_committed_bytes_is_recorded_as_verified(store):
    _run(store)
    for rev in ("runs/a", "runs/a~1"):
        d = store.repo.show(rev)
        r = d["metrics"]["receipts"]["eval_loss"]
        assert r["verified"] is True and r["status"] == "verified"
        assert d["metrics"]["eval_loss"] == r["value"] == r["recomputed"]
        assert abs(r["recomputed"] - r["in_loop"]) <= r["tolerance"]["rel"] * abs(r["recomputed"])
        # computed from a stored commit with exactly this checkpoint's tree and weights
        staged = store.repo.get_commit(r["checkpoint"]["staged_commit"])
        assert str(staged.tree) == d["tree"] == r["checkpoint"]["tree"]
        weights = {e.path: str(e.id) for e in store.repo.ls(rev) if e.path.endswith("adapter_model.safetensors")}
        assert r["checkpoint"]["weights"] == weights
        assert r["eval_data"]["commit"] == store.data and r["eval_data"]["records"] == 32
        assert len(r["eval_data"]["split"]) == 64 and r["evaluator"]["code"]["source_digest"]


def test_a_tampered_in_loop_metric_is_recorded_as_failed_verification(store):
    _result, events = _run(store, in_loop_metric=lambda step, v: v - 0.5 if step == 8 else v)
    d = store.repo.show("runs/a")
    r = d["metrics"]["receipts"]["eval_loss"]
    assert r["verified"] is False and r["status"] == "mismatch"
    assert r["abs_diff"] == pytest.approx(0.5, abs=1e-9)
    assert "eval_loss" not in d["metrics"]  # no top-level (trusted) metric for it
    assert "VERIFICATION FAILED" in d["message"]
    failed = [e["committed"] for e in events.of("checkpoint") if not e["committed"].receipt["verified"]]
    assert [c.step for c in failed] == [8]


def test_a_checkpoint_that_failed_verification_never_becomes_the_best(store):
    result, _events = _run(store, in_loop_metric=lambda step, v: v - 0.5 if step == 8 else v)
    assert result.best == str(store.repo.resolve("runs/a~1"))  # step 4, verified
    assert str(store.repo.head("runs/a.best")) == result.best
    assert not any(c.best for c in result.checkpoints if c.step == 8)


def test_weights_corrupted_before_commit_fail_verification(store):
    _run(store, after_save=_corrupt_adapter(8))
    bad, good = _receipt(store.repo, "runs/a"), _receipt(store.repo, "runs/a~1")
    assert good["verified"] is True
    assert bad["verified"] is False and bad["status"] == "mismatch"
    assert abs(bad["recomputed"] - bad["in_loop"]) > 1e-3
    assert str(store.repo.head("runs/a.best")) == str(store.repo.resolve("runs/a~1"))


def test_the_best_ref_follows_the_best_verified_checkpoint(store):
    result, _events = _run(store)
    receipts = {c.id: c.receipt["value"] for c in result.checkpoints}
    assert result.best == min(receipts, key=receipts.get)
    assert store.repo.show("runs/a.best")["metrics"]["receipts"]["eval_loss"]["verified"] is True


def test_a_verified_metric_much_worse_than_the_parents_is_committed_with_a_recorded_override(store):
    from trainer import train

    train(config(lora=None, lr=3e-3, steps=4, save_every=4), store.repo)
    events = Events()
    # a second run continues the branch from its head with a learning rate that makes it diverge
    train(config(lora=None, base="runs/a", lr=0.3, max_grad_norm=0.0, steps=4, save_every=4, allow_seen_data=True),
          store.repo, report=events)
    d = store.repo.show("runs/a")
    assert d["metrics"]["eval_loss"] > 1.1 * store.repo.show("runs/a~1")["metrics"]["eval_loss"]
    overridden = d["provenance"]["guards_overridden"]
    assert [g["what"] for g in overridden] == ["eval_loss"]
    assert events.of("guard") and events.of("guard")[0]["step"] == 4
