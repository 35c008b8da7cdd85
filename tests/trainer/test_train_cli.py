"""`mstore train` / `python -m trainer`: what a user sees, and what it costs to start."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tests.trainer.helpers import ROOT, trainer_env

ARGS = ["--base", "models/base", "--data", "data/syllo", "-b", "runs/cli", "--lora", "r=4", "--steps", "8",
        "--save-every", "4", "--eval-every", "4", "--batch-size", "4", "--seq-len", "48", "--threads", "1",
        "--eval-records", "32", "--shuffle-block", "8", "--log-every", "4"]


def test_loading_the_train_command_does_not_import_torch():
    code = "import sys, trainer.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=trainer_env(), capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "False"]


def test_python_dash_m_trainer_shows_the_train_commands_help():
    proc = subprocess.run([sys.executable, "-m", "trainer", "--help"], cwd=ROOT, env=trainer_env(),
                          capture_output=True, text=True, check=True)
    assert "Usage: python -m trainer" in proc.stdout and "--allow-seen-data" in proc.stdout
    assert "--fault" not in proc.stdout  # test-only option stays hidden


def test_the_train_command_prints_preflight_progress_and_committed_checkpoints(store):
    pytest.importorskip("torch")
    from trainer.cli import train

    r = CliRunner().invoke(train, [*ARGS, "--store", str(store.root)])
    assert r.exit_code == 0, (r.output, r.exception)
    lines = r.output.splitlines()
    pre = [line for line in lines if line.startswith("preflight: ")]
    assert pre[0] == "preflight: branch runs/cli is new"
    assert pre[1].startswith(f"preflight: base models/base {store.base[:7]} ok")
    assert pre[2].startswith(f"preflight: data data/syllo {store.data[:7]} ok (3 files, 600 records")
    assert pre[3] == "preflight: data not yet seen by this lineage"
    assert pre[4].startswith("preflight: device cpu") and pre[5].startswith("preflight: disk ok")
    assert any(line.startswith("step 4/8 · ") and " tokens · loss " in line and "ETA" in line for line in lines)
    committed = [line for line in lines if line.startswith("checkpoint step ")]
    assert len(committed) == 2 and all("(verified) · committed " in line for line in committed)
    head = str(store.repo.head("runs/cli"))
    assert lines[-1].startswith(f"done: runs/cli at {head[:7]} (step 8); 2 checkpoints committed")


def test_the_train_command_reports_json_events_with_json(store):
    pytest.importorskip("torch")
    from trainer.cli import train

    r = CliRunner().invoke(train, [*ARGS, "--store", str(store.root), "--json"])
    assert r.exit_code == 0, (r.output, r.exception)
    events = [json.loads(line) for line in r.output.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("preflight") == 6 and kinds.count("checkpoint") == 2
    ck = [e for e in events if e["event"] == "checkpoint"][-1]["committed"]
    assert ck["id"] == str(store.repo.head("runs/cli")) and ck["receipt"]["verified"] is True


def test_a_refused_preflight_exits_8_with_the_reason(store, capsys):
    pytest.importorskip("torch")
    from trainer.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--base", "no/such/model", *ARGS[2:], "--store", str(store.root)])
    assert exc.value.code == 8
    assert "error: preflight failed (base): base 'no/such/model' does not resolve" in capsys.readouterr().err
