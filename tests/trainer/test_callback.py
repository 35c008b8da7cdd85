"""MstoreCallback: a real, short HF `Trainer.train()` gets every checkpoint it saves committed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.conftest import tree_bytes  # noqa: E402


class _Records(torch.utils.data.Dataset):
    def __init__(self, tokenizer, texts):
        enc = tokenizer(texts, truncation=True, max_length=32, padding="max_length", return_tensors="pt")
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


def _hf_train(store, tmp_path, callback, save_total_limit=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from trainer import tiny

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "base", local_files_only=True)
    texts = [r["text"] for r in tiny.make_corpus(48, seed=5)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=6, save_steps=2, save_strategy="steps",
        per_device_train_batch_size=4, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        eval_strategy="steps", eval_steps=2, save_total_limit=save_total_limit, disable_tqdm=True,
    )
    t = Trainer(model=model, args=args, train_dataset=_Records(tok, texts), eval_dataset=_Records(tok, texts[:8]),
                processing_class=tok)
    t.add_callback(callback)
    t.train()
    return tmp_path / "out"


def test_every_checkpoint_hf_trainer_saves_is_committed(store, tmp_path):
    from trainer import MstoreCallback

    store.repo.checkout("models/base", tmp_path / "base")
    cb = MstoreCallback("runs/hf", store.repo, base="models/base", data="data/syllo")
    out = _hf_train(store, tmp_path, cb)
    assert [step for step, _id in cb.commits] == [2, 4, 6]
    log = store.repo.log("runs/hf")
    assert [e.commit.meta["step"] for e in log] == [6, 4, 2]
    for step, oid in cb.commits:
        store.repo.checkout(oid, tmp_path / f"co-{step}")
        assert tree_bytes(tmp_path / f"co-{step}") == tree_bytes(out / f"checkpoint-{step}")


def test_hf_checkpoints_carry_the_same_provenance_and_inputs_as_the_trainers(store, tmp_path):
    from trainer import MstoreCallback

    store.repo.checkout("models/base", tmp_path / "base")
    cb = MstoreCallback("runs/hf", store.repo, base="models/base", data="data/syllo")
    _hf_train(store, tmp_path, cb)
    d = store.repo.show("runs/hf")
    assert d["kind"] == "checkpoint" and d["inputs"] == {"base": store.base, "data": store.data}
    for key in ("command", "host", "python", "packages", "cuda", "gpu", "trainer"):
        assert key in d["provenance"], key
    assert d["provenance"]["trainer"]["callback"] == "hf-trainer"
    assert d["params"]["max_steps"] == 6 and d["params"]["learning_rate"] > 0
    assert d["meta"]["run"]["status"] == "finished" and isinstance(d["meta"]["train"]["loss"], float)
    receipt = d["metrics"]["receipts"]["eval_loss"]
    assert receipt["verified"] is False and "eval_loss" not in d["metrics"]  # HF's in-memory eval: never verified


def test_checkpoints_hf_rotates_away_are_still_in_the_store(store, tmp_path):
    from trainer import MstoreCallback

    store.repo.checkout("models/base", tmp_path / "base")
    cb = MstoreCallback("runs/hf", store.repo)
    out = _hf_train(store, tmp_path, cb, save_total_limit=1)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-6"]
    assert len(store.repo.log("runs/hf")) == 3
    store.repo.checkout("runs/hf~2", tmp_path / "first")
    assert (tmp_path / "first" / "model.safetensors").exists()
