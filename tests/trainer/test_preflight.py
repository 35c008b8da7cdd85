"""Preflight refuses a run that would train on the wrong things, or could not finish, before any step."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from tests.trainer.helpers import Events, config  # noqa: E402


def _refused(store, check: str, keep_head: bool = False, **kw) -> str:
    from trainer import PreflightFailed, train

    events = Events()
    with pytest.raises(PreflightFailed) as exc:
        train(config(**kw), store.repo, report=events)
    assert exc.value.check == check
    assert exc.value.exit_code == 8
    assert store.repo.head(kw.get("branch", "runs/a")) is None or keep_head  # nothing committed
    assert not events.of("step")  # not a single step ran
    return str(exc.value)


def test_a_base_id_that_names_nothing_is_refused(store):
    msg = _refused(store, "base", base="0123456789abcdef")
    assert "base '0123456789abcdef' does not resolve" in msg


def test_a_base_that_is_not_a_model_is_refused(store):
    msg = _refused(store, "base", base="data/syllo")
    assert "is a dataset commit, not a model" in msg


def test_a_base_that_is_a_lora_adapter_is_refused(store):
    from trainer import train

    train(config(steps=4, save_every=4), store.repo)
    msg = _refused(store, "base", base="runs/a", branch="runs/b")
    assert "is a LoRA adapter" in msg


def test_missing_data_is_refused(store):
    msg = _refused(store, "data", data="data/nope")
    assert "data 'data/nope' does not resolve" in msg


def test_data_without_jsonl_records_is_refused(store):
    msg = _refused(store, "data", data="models/base")
    assert "is a model commit, not a dataset" in msg


def test_data_already_seen_by_the_lineage_is_refused(store):
    from trainer import train

    train(config(lora=None, steps=4, save_every=4), store.repo)  # runs/a trains on 16 records
    msg = _refused(store, "seen", base="runs/a", branch="runs/b", lora=None)
    assert "16 of the" in msg and "already trained on by this lineage" in msg and "--allow-seen-data" in msg


def test_allow_seen_data_trains_anyway_and_records_the_override(store):
    from trainer import train

    train(config(lora=None, steps=4, save_every=4), store.repo)
    events = Events()
    train(config(base="runs/a", branch="runs/b", lora=None, steps=4, save_every=4, allow_seen_data=True),
          store.repo, report=events)
    assert store.repo.show("runs/b")["provenance"]["trainer"]["overrides"] == ["allow_seen_data"]
    assert any("--allow-seen-data" in e["text"] for e in events.of("preflight"))


def test_the_ledger_is_inherited_from_the_base_so_the_whole_lineage_counts(store):
    from trainer import ledger, train

    train(config(lora=None, steps=4, save_every=4), store.repo)
    train(config(base="runs/a", branch="runs/b", data="data/extra", lora=None, steps=4, save_every=4,
                 eval_records=16), store.repo)
    led_a = ledger.load(store.repo, "runs/a")["files"]
    led_b = ledger.load(store.repo, "runs/b")["files"]
    assert set(led_a) < set(led_b)  # b's ledger holds a's files plus its own
    assert all(led_b[fid]["seen"] == e["seen"] for fid, e in led_a.items())


def test_too_little_disk_is_refused(store):
    msg = _refused(store, "disk", disk_quota=10_000)
    assert "not enough disk" in msg and "--disk-quota 10.0 kB" in msg


def test_a_missing_device_is_refused(store):
    msg = _refused(store, "device", device="cuda")
    assert "device cuda requested but" in msg


def test_a_new_run_on_a_branch_holding_other_commits_is_refused(store):
    store.repo.create_branch("runs/a", "models/base")
    msg = _refused(store, "branch", keep_head=True)
    assert "not trainer checkpoints" in msg


def test_every_check_is_reported_before_training(store):
    from trainer import train

    events = Events()
    train(config(steps=4, save_every=4), store.repo, report=events)
    checks = [e["check"] for e in events.of("preflight")]
    assert checks == ["branch", "base", "data", "seen", "device", "disk"]
    first_step = next(i for i, (e, _f) in enumerate(events.items) if e == "step")
    last_check = max(i for i, (e, _f) in enumerate(events.items) if e == "preflight")
    assert last_check < first_step
