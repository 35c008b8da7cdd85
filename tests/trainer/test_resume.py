"""Killed with SIGKILL anywhere, a run keeps its last complete checkpoint and resumes exactly.

Real `python -m trainer` processes: a reference run that is never interrupted, and runs that
are stopped at a chosen point (the hidden ``--fault POINT:STEP`` makes the process SIGSTOP
itself there, so the kill lands at a known place) and then killed with SIGKILL, which no code
can intercept. The resumed run must produce the same losses, step for step, and checkpoints
whose files are bit-identical to the reference run's.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

from mstore import Repo  # noqa: E402
from tests.trainer.helpers import CLI_RUN, copy_store, run_trainer, trainer_cmd, trainer_env  # noqa: E402

# Full fine-tuning: the subprocesses then need no peft import (seconds each); LoRA resumption is
# checked in-process below.
TRAIN = ["--base", "models/base", "--data", "data/syllo", "--lr", "1e-3", *CLI_RUN]


def _history(repo: Repo, rev: str) -> list[dict]:
    with repo.open_file(f"{rev}:trainer_state/history.jsonl") as f:
        return [json.loads(line) for line in f.read().decode().splitlines()]


def _files(repo: Repo, rev: str) -> dict[str, str]:
    return {e.path: str(e.id) for e in repo.ls(rev) if e.kind != "tree"}


def _kill_at(store_root: Path, cwd: Path, branch: str, point: str) -> str:
    """Start a run, wait until it stops itself at ``point``, SIGKILL it; return its output."""
    log = cwd / f"{branch.replace('/', '_')}-{point.replace(':', '_')}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(trainer_cmd(store_root, *TRAIN, "-b", branch, "--fault", point), cwd=cwd,
                                env=trainer_env(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while "fault: holding" not in log.read_text():
            assert proc.poll() is None, f"run ended before reaching {point}:\n{log.read_text()}"
            assert time.monotonic() < deadline, "run never reached the fault point"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return log.read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, assets):
    """The store with an uninterrupted 12-step run on runs/ref (checkpoints at 4, 8, 12)."""
    from mstore import lineage as lin

    tmp = tmp_path_factory.mktemp("resume")
    repo = Repo.init(tmp / ".mstore")
    lin.import_model(repo, assets.model, "models/base")
    lin.import_data(repo, assets.data, "data/syllo")
    repo.close()
    run_trainer(tmp / ".mstore", *TRAIN, "-b", "runs/ref", cwd=tmp)
    return tmp


def _assert_same_as_reference(root: Path, branch: str):
    with Repo.open(root) as repo:
        ref, got = repo.log("runs/ref"), repo.log(branch)
        assert [e.commit.meta["step"] for e in got] == [12, 8, 4]
        assert _history(repo, branch) == _history(repo, "runs/ref")  # every step's loss, lr, tokens
        for a, b in zip(ref, got, strict=True):
            assert _files(repo, a.id) == _files(repo, b.id)  # weights, optimizer, RNG, position: bit-identical
        assert got[0].commit.meta["run"]["status"] == "finished"


@pytest.fixture(scope="module")
def killed_between(reference, tmp_path_factory):
    """A copy of the reference store plus runs/k, SIGKILLed at step 6 (its last commit: step 4)."""
    tmp = tmp_path_factory.mktemp("killed")
    root = copy_store(reference / ".mstore", tmp / ".mstore")
    _kill_at(root, tmp, "runs/k", "step:6")
    return root


def test_killed_between_commits_the_head_is_the_last_complete_checkpoint(killed_between):
    with Repo.open(killed_between) as repo:
        head = repo.get_commit("runs/k")
        assert head.meta["step"] == 4 and head.meta["run"]["status"] == "running"
        assert _files(repo, "runs/k") == _files(repo, "runs/ref~2")
        assert repo.fsck().ok


def test_resume_after_a_kill_between_commits_gives_the_uninterrupted_runs_losses(killed_between, tmp_path):
    root = copy_store(killed_between, tmp_path / ".mstore")
    out = run_trainer(root, "--resume", "runs/k", cwd=tmp_path).stdout
    assert "resuming runs/k at step 4" in out
    _assert_same_as_reference(root, "runs/k")


def test_a_new_run_on_a_branch_whose_run_was_killed_is_refused(killed_between, tmp_path):
    root = copy_store(killed_between, tmp_path / ".mstore")
    proc = run_trainer(root, *TRAIN, "-b", "runs/k", cwd=tmp_path, check=False)
    assert proc.returncode == 8
    assert "previous run on runs/k did not finish" in proc.stderr and "--resume runs/k" in proc.stderr
    with Repo.open(root) as repo:
        assert repo.get_commit("runs/k").meta["step"] == 4  # nothing committed


def test_resume_after_a_kill_right_after_a_commit_gives_the_uninterrupted_runs_losses(reference, tmp_path):
    root = copy_store(reference / ".mstore", tmp_path / ".mstore")
    _kill_at(root, tmp_path, "runs/k", "after-commit:8")
    with Repo.open(root) as repo:
        assert repo.get_commit("runs/k").meta["step"] == 8
    run_trainer(root, "--resume", "runs/k", cwd=tmp_path)
    _assert_same_as_reference(root, "runs/k")


def test_killed_while_committing_a_checkpoint_leaves_no_half_checkpoint_and_resumes(reference, tmp_path):
    root = copy_store(reference / ".mstore", tmp_path / ".mstore")
    _kill_at(root, tmp_path, "runs/k", "before-final:8")  # step 8 staged and verified, branch not moved
    with Repo.open(root) as repo:
        assert repo.get_commit("runs/k").meta["step"] == 4
        assert repo.get_commit("runs/k.pending").meta["step"] >= 8  # staged, never on the branch
        assert repo.fsck().ok
    out = run_trainer(root, "--resume", "runs/k", cwd=tmp_path).stdout
    assert "never reached the branch" in out
    _assert_same_as_reference(root, "runs/k")


def test_resume_refuses_to_change_what_decides_the_numbers(reference, tmp_path):
    proc = run_trainer(reference / ".mstore", "--resume", "runs/ref", "--lr", "0.1", "--steps", "16", cwd=tmp_path,
                       check=False)
    assert proc.returncode == 2 and "restores lr from the checkpoint" in proc.stderr


def test_lora_run_resumed_from_a_mid_run_checkpoint_matches_the_uninterrupted_run(store):
    from tests.trainer.helpers import config
    from trainer import resume, train

    train(config(steps=12), store.repo)
    store.repo.create_branch("runs/b", "runs/a~1")  # the step-8 checkpoint, as a killed run leaves it
    resume("runs/b", store.repo)
    assert _history(store.repo, "runs/b") == _history(store.repo, "runs/a")
    assert _files(store.repo, "runs/b") == _files(store.repo, "runs/a")


def test_resume_with_more_steps_trains_a_finished_run_further(store):
    from tests.trainer.helpers import config
    from trainer import resume, train

    train(config(), store.repo)
    resume("runs/a", store.repo, steps=12)
    head = store.repo.get_commit("runs/a")
    assert head.meta["step"] == 12 and head.meta["run"]["status"] == "finished"
    assert [h["step"] for h in _history(store.repo, "runs/a")] == list(range(1, 13))
    assert head.meta["run"]["resumed_from"] == str(store.repo.resolve("runs/a~1"))
