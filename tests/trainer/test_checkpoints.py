"""A run commits one checkpoint per save, each complete, atomic and loadable as a normal HF model."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from tests.trainer.helpers import Events, config  # noqa: E402

PROBE = torch.tensor([[5, 17, 42, 9, 77, 3, 120, 64]])


def _probe_logits(model) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=PROBE).logits.clone()
    model.train(was)
    return out


def _train(store, **kw):
    from trainer import Hooks, train

    live = {}
    hooks = Hooks(after_save=lambda step, path, model: live.__setitem__(step, _probe_logits(model)))
    events = Events()
    result = train(config(**kw), store.repo, report=events, hooks=hooks)
    return result, live, events


def test_a_run_commits_one_checkpoint_commit_per_save_on_its_branch(store):
    result, _live, _events = _train(store)
    log = store.repo.log("runs/a")
    assert [e.commit.meta["step"] for e in log] == [8, 4]
    assert [c.step for c in result.checkpoints] == [4, 8]
    assert all(e.commit.kind == "checkpoint" for e in log)
    assert log[0].commit.parents == (log[1].id,)
    assert str(store.repo.head("runs/a")) == result.head == str(log[0].id)
    assert log[0].commit.meta["run"]["status"] == "finished" and log[1].commit.meta["run"]["status"] == "running"
    assert store.repo.head("runs/a.pending") is None  # the staging ref is gone once the run finished


def test_every_checkpoint_records_provenance_inputs_params_and_training_metadata(store):
    _train(store)
    for entry in store.repo.log("runs/a"):
        d = store.repo.show(entry.id)
        p = d["provenance"]
        for key in ("command", "host", "python", "packages", "cuda", "gpu", "trainer"):
            assert key in p, key
        assert {"torch", "transformers", "peft"} <= set(p["packages"])
        assert p["trainer"]["code"]["source_digest"] and "runtime" in p["trainer"]
        assert p["trainer"]["runtime"]["device"] == "cpu" and p["gpu"] == []
        assert p["trainer"]["inputs"]["base"] == {"rev": "models/base", "id": store.base}
        assert d["inputs"] == {"base": store.base, "data": store.data}
        assert d["params"]["method"] == "lora" and d["params"]["lora"]["r"] == 4 and d["params"]["seed"] == 0
        meta = d["meta"]
        for key in ("step", "tokens", "lr", "train", "data_position", "run", "ledger"):
            assert key in meta, key
        assert meta["tokens"] > 0 and isinstance(meta["train"]["loss"], float)
        assert meta["data_position"]["records"] == meta["step"] * 4


def test_every_checkpoint_holds_the_full_training_state(store):
    _train(store)
    names = {e.path for e in store.repo.ls("runs/a~1")}
    assert {
        "adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
        "trainer_state/optimizer.safetensors", "trainer_state/rng.safetensors", "trainer_state/state.json",
        "trainer_state/history.jsonl",
    } <= names
    assert not any(n.endswith((".pt", ".bin", ".pkl")) for n in names)  # no pickles to load
    with store.repo.open_file("runs/a~1:trainer_state/state.json") as f:
        state = json.loads(f.read())
    assert state["step"] == 4 and state["data_position"]["records"] == 16
    assert state["scheduler"]["last_epoch"] == 4 and state["optimizer"]["param_groups"][0]["params"]


def test_lora_checkpoints_check_out_into_folders_peft_loads_with_identical_outputs(store, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _result, live, _events = _train(store)
    store.repo.checkout("models/base", tmp_path / "base")
    for entry in store.repo.log("runs/a"):
        step = entry.commit.meta["step"]
        dest = tmp_path / f"ckpt-{step}"
        store.repo.checkout(entry.id, dest)
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", local_files_only=True)
        model = PeftModel.from_pretrained(base, dest)
        assert torch.equal(_probe_logits(model), live[step]), f"step {step}"


def test_full_finetune_checkpoints_check_out_into_folders_from_pretrained_loads_identically(store, tmp_path):
    from transformers import AutoModelForCausalLM

    _result, live, _events = _train(store, lora=None, lr=1e-3)
    for entry in store.repo.log("runs/a"):
        step = entry.commit.meta["step"]
        dest = tmp_path / f"ckpt-{step}"
        store.repo.checkout(entry.id, dest)
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in dest.iterdir()}
        model = AutoModelForCausalLM.from_pretrained(dest, local_files_only=True)
        assert torch.equal(_probe_logits(model), live[step]), f"step {step}"
    assert store.repo.show("runs/a")["params"]["method"] == "full"


def test_training_moves_the_weights_and_lowers_the_loss(store):
    result, _live, _events = _train(store, lora=None, lr=3e-3, steps=16, save_every=8, eval_every=8)
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert last < first - 0.5
    diff = store.repo.diff("runs/a~1", "runs/a")
    changed = [f.path for f in diff.files if f.status == "modified"]
    assert "model.safetensors" in changed and "tokenizer.json" not in changed


def test_a_second_checkpoint_stores_only_what_changed(store):
    result, _live, _events = _train(store)
    first, second = result.checkpoints
    # tokenizer and config are shared; only the adapter, optimizer and state files are new
    assert second.new_bytes < store.repo.size_of(first.id) * 0.5


def test_each_checkpoint_carries_its_lineage_ledger_as_ranges_of_exactly_the_records_trained(store):
    from trainer import ledger

    _train(store)
    for entry in store.repo.log("runs/a"):
        led = ledger.load(store.repo, entry.id)
        trained = entry.commit.meta["data_position"]["records"]
        assert sum(ledger.count(e["seen"]) for e in led["files"].values()) == trained
        summary = entry.commit.meta["ledger"]
        assert summary["file"] == "trainer_state/ledger.json" and summary["files"] == len(led["files"])
        assert summary["datasets"][store.data]["trained"] == trained
        assert sum(len(e["seen"]) for e in led["files"].values()) <= trained // 8  # whole blocks of 8: ranges
