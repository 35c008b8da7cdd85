"""Never lose a version: reflog, restore, protected refs, and the incidents replayed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mstore import Conflict, InvalidRevision, ProtectedRef, RefNotFound, RegressionRefused
from tests.conftest import snapshot_dir, tree_bytes, write_safetensors


def _version(d, seed: int, vocab: int = 2000):
    rng = np.random.default_rng(seed)
    write_safetensors(
        d / "model.safetensors",
        {
            "emb": rng.standard_normal((vocab, 32)).astype(np.float32),
            "head": rng.standard_normal((32, 8)).astype(np.float32),
        },
    )
    (d / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    return d


def test_incident_1_a_98_percent_smaller_model_is_refused_and_the_good_one_is_one_restore_away(repo, work, tmp_path):
    good = _version(work / "good", 1, vocab=15814)
    repo.commit(good, "main", "trained on 37,318 documents", kind="model", meta={"eval/loss": 1.87})
    bad = _version(work / "bad", 2, vocab=329)
    with pytest.raises(RegressionRefused) as exc:
        repo.commit(bad, "main", "Update model after training evaluation", meta={"eval/loss": 2.91})
    msg = str(exc.value)
    assert "vocabulary" in msg and "15,814" in msg and "329" in msg and "eval/loss" in msg and "bytes" in msg
    # The script insists: the override is recorded, and the good version is one restore away.
    repo.commit(bad, "main", "Update model after training evaluation", meta={"eval/loss": 2.91}, allow_regression=True)
    repo.restore("main@{1}", force_protected=True, confirm="main")
    repo.checkout("main", tmp_path / "back")
    assert tree_bytes(tmp_path / "back") == tree_bytes(good)


def test_incident_2_five_deleted_branches_are_listed_by_the_reflog_and_restored_bit_exact(repo, work, tmp_path):
    sources = {}
    for i in range(5):
        name = f"runs/qwen-ft-{i}"
        for step in range(2):
            src = _version(work / f"{i}-{step}", seed=10 * i + step)
            repo.commit(src, name, f"checkpoint {step}", kind="checkpoint", meta={"step": step * 100})
        sources[name] = src
    heads = {b.name: b.id for b in repo.branches()}
    for name in sources:  # the "clean-up"
        repo.delete_branch(name)
    assert repo.branches() == []
    deletions = [e for e in repo.reflog() if e["command"] == "branch -d"]
    assert {e["ref"].removeprefix("refs/heads/"): e["old"] for e in deletions} == {n: str(i) for n, i in heads.items()}
    for name, src in sources.items():
        res = repo.restore(name)
        assert res.new == heads[name]
        dest = tmp_path / "restored" / name
        repo.checkout(name, dest)
        assert tree_bytes(dest) == tree_bytes(src)


def test_restore_without_selector_refuses_an_existing_branch(repo, work):
    repo.commit(_version(work / "a", 1), "exp1", "a")
    with pytest.raises(Conflict, match="exp1@\\{1\\}"):
        repo.restore("exp1")


def test_restore_at_n_moves_the_branch_back_and_is_itself_undoable(repo, work):
    first = repo.commit(_version(work / "a", 1), "exp1", "a").id
    second = repo.commit(_version(work / "b", 2), "exp1", "b").id
    res = repo.restore("exp1@{1}")
    assert (res.old, res.new) == (second, first)
    assert repo.head("exp1") == first
    repo.restore("exp1@{1}")  # undo the restore
    assert repo.head("exp1") == second


def test_restore_as_creates_a_new_branch_and_leaves_the_old_one(repo, work):
    first = repo.commit(_version(work / "a", 1), "exp1", "a").id
    second = repo.commit(_version(work / "b", 2), "exp1", "b").id
    repo.restore("exp1@{1}", as_name="exp1-recovered")
    assert repo.head("exp1-recovered") == first and repo.head("exp1") == second
    with pytest.raises(Conflict):
        repo.restore("exp1@{1}", as_name="exp1-recovered")


def test_restore_by_time_uses_the_value_at_that_time(tmp_path, work):
    from mstore import Repo

    now = [1_000_000.0]
    repo = Repo.init(tmp_path / "s", clock=lambda: now[0])
    first = repo.commit(_version(work / "a", 1), "exp1", "a").id
    now[0] += 3 * 86400
    repo.commit(_version(work / "b", 2), "exp1", "b")
    now[0] += 1
    # refs.reflog times come from the repo clock
    assert repo.resolve("exp1@{2.days.ago}") == first
    repo.close()


def test_bad_reflog_selectors_are_clear_errors(repo, work):
    repo.commit(_version(work / "a", 1), "exp1", "a")
    for spec, word in (("exp1@{9}", "only 1"), ("exp1@{yesterday-ish}", "time"), ("exp1@{}", "empty")):
        with pytest.raises(InvalidRevision, match=word):
            repo.restore(spec)
    with pytest.raises(RefNotFound):
        repo.restore("never-existed")


def test_protected_branch_cannot_be_deleted_without_force_and_exact_confirmation(repo, work):
    repo.commit(_version(work / "a", 1), "main", "a")
    with pytest.raises(ProtectedRef):
        repo.delete_branch("main")
    with pytest.raises(ProtectedRef):
        repo.delete_branch("main", force_protected=True, confirm="mian")
    res = repo.delete_branch("main", force_protected=True, confirm="main")
    assert res.forced and repo.head("main") is None
    entry = repo.reflog("main")[0]
    assert entry["command"] == "branch -d" and "forced" in entry["message"]


def test_tags_never_move_and_deleting_one_needs_confirmation(repo, work):
    repo.commit(_version(work / "a", 1), "exp1", "a")
    repo.create_tag("v1", "exp1")
    repo.commit(_version(work / "b", 2), "exp1", "b")
    with pytest.raises(Conflict, match="never move"):
        repo.create_tag("v1", "exp1")
    with pytest.raises(ProtectedRef):
        repo.delete_tag("v1")
    repo.delete_tag("v1", force_protected=True, confirm="v1")
    assert repo.tags() == []


def test_dry_runs_of_delete_restore_and_tag_change_nothing(repo, work):
    repo.commit(_version(work / "a", 1), "exp1", "a")
    repo.commit(_version(work / "b", 2), "exp1", "b")
    before = snapshot_dir(repo.root)
    head = repo.head("exp1")
    assert repo.delete_branch("exp1", dry_run=True).old == head
    assert repo.restore("exp1@{1}", dry_run=True).new != head
    repo.create_tag("v1", "exp1", dry_run=True)
    assert snapshot_dir(repo.root) == before
    assert repo.head("exp1") == head and repo.tags() == []


def test_deleting_a_branch_that_others_were_trained_from_names_them(repo, work):
    base = repo.commit(_version(work / "base", 1), "models/base", "base", kind="model").id
    repo.commit(_version(work / "ft", 2), "runs/ft", "fine-tuned", kind="checkpoint", inputs={"base": str(base)})
    res = repo.delete_branch("models/base")
    assert res.dependents == ["runs/ft"]


def test_branches_info_answers_what_is_this(repo, work):
    base = repo.commit(_version(work / "base", 1), "models/base", "base", kind="model").id
    repo.commit(
        _version(work / "ft", 2),
        "runs/ft",
        "step 200",
        kind="checkpoint",
        inputs={"base": str(base)},
        meta={"step": 200, "eval/loss": 1.5, "lr": 1e-4},
    )
    info = {b["name"]: b for b in repo.branches_info()}
    ft = info["runs/ft"]
    assert ft["kind"] == "checkpoint" and ft["base"] == str(base) and ft["step"] == 200
    assert ft["metrics"] == {"eval/loss": 1.5}
    assert ft["bytes"] > 0 and ft["created"] is not None and ft["moved"] is not None


def test_cli_branch_delete_then_restore_round_trip(cli, work, tmp_path):
    src = _version(work / "a", 1)
    cli("commit", str(src), "-b", "exp1", "-m", "a")
    out = cli("branch", "-d", "exp1").stdout.decode()
    assert "undo with: mstore restore exp1" in out
    out = cli("restore", "exp1").stdout.decode()
    assert "restored exp1" in out and "undo with: mstore branch -d exp1" in out
    cli("checkout", "exp1", str(tmp_path / "o"))
    assert tree_bytes(tmp_path / "o") == tree_bytes(src)


def test_cli_protected_delete_exits_8_with_instructions(cli, work):
    cli("commit", str(_version(work / "a", 1)), "-b", "main", "-m", "a")
    proc = cli("branch", "-d", "main", check=False)
    assert proc.returncode == 8
    assert "--force-protected --confirm main" in proc.stderr.decode()


def test_cli_reflog_lists_deleted_branches_with_positions(cli, work):
    cli("commit", str(_version(work / "a", 1)), "-b", "exp1", "-m", "first")
    cli("branch", "-d", "exp1")
    text = cli("reflog", "--all").stdout.decode()
    assert "exp1@{0}" in text and "branch -d" in text and "exp1@{1}" in text and "commit: first" in text


def test_branches_info_created_and_moved_are_the_first_and_latest_reflog_times(tmp_path, work):
    from mstore import Repo

    now = [1_000_000.0]
    repo = Repo.init(tmp_path / "s", clock=lambda: now[0])
    repo.commit(_version(work / "a", 1), "exp1", "a")
    now[0] += 100
    repo.commit(_version(work / "b", 2), "exp1", "b")
    now[0] += 100
    repo.commit(_version(work / "c", 3), "exp2", "c")  # another ref's entries must not leak in
    info = {b["name"]: b for b in repo.branches_info()}
    assert (info["exp1"]["created"], info["exp1"]["moved"]) == (1_000_000.0, 1_000_100.0)
    assert (info["exp2"]["created"], info["exp2"]["moved"]) == (1_000_200.0, 1_000_200.0)
    repo.close()
