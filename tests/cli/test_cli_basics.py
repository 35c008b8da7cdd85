"""The CLI as a user meets it: real `mstore` subprocesses against a real store."""

from __future__ import annotations

import json
import subprocess
import sys

import blake3

from tests.conftest import random_tensors, write_safetensors


def _checkpoint(work, step: int, changed: int = 1):
    t = random_tensors(6, seed=0)
    for i in range(changed):
        t[f"layer{i}.weight"] = t[f"layer{i}.weight"] + step
    d = work / f"ckpt-{step}"
    write_safetensors(d / "model.safetensors", t)
    (d / "config.json").write_text(json.dumps({"step": step}))
    return d


def test_help_lists_every_command_without_error():
    proc = subprocess.run([sys.executable, "-m", "mstore", "--help"], capture_output=True, text=True, check=True)
    for name in ("init", "commit", "log", "show", "ls", "cat", "checkout", "branch", "tag", "status", "diff", "fsck"):
        assert f"  {name}" in proc.stdout


def test_commit_then_log_oneline_shows_the_commit(cli, work):
    ck = _checkpoint(work, 1)
    out = cli("commit", str(ck), "-b", "exp1", "-m", "step 1", "--kind", "checkpoint", "--meta", "lr=3e-4")
    assert "[exp1 " in out.stdout.decode()
    log = cli("log", "exp1", "--oneline").stdout.decode()
    assert "checkpoint" in log and "step 1" in log


def test_show_json_carries_provenance_and_typed_meta(cli, work):
    cli("commit", str(_checkpoint(work, 1)), "-b", "exp1", "-m", "step 1", "--meta", "lr=3e-4", "--meta", "note=hi")
    d = cli.json("show", "exp1")
    assert d["meta"] == {"lr": 3e-4, "note": "hi"}
    prov = d["provenance"]
    for key in ("command", "cwd", "user", "host", "python", "mstore", "packages"):
        assert key in prov
    assert prov["command"][:2] == ["mstore", "commit"]
    assert d["stats"]["tensors"] == 6 and d["stats"]["files"] == 2


def test_ls_reports_tensor_summary_and_b3sum_ids(cli, work):
    ck = _checkpoint(work, 1)
    cli("commit", str(ck), "-b", "exp1", "-m", "m")
    entries = {e["path"]: e for e in cli.json("ls", "exp1")}
    st = entries["model.safetensors"]
    assert st["safetensors"]["tensors"] == 6
    assert st["safetensors"]["dtypes"] == {"F32": 6}
    assert st["id"] == blake3.blake3((ck / "model.safetensors").read_bytes()).hexdigest()


def test_cat_writes_the_exact_bytes(cli, work):
    ck = _checkpoint(work, 1)
    cli("commit", str(ck), "-b", "exp1", "-m", "m")
    assert cli("cat", "exp1:model.safetensors").stdout == (ck / "model.safetensors").read_bytes()


def test_checkout_of_an_earlier_version_is_bit_exact(cli, work, tmp_path):
    first = _checkpoint(work, 1)
    cli("commit", str(first), "-b", "exp1", "-m", "1")
    cli("commit", str(_checkpoint(work, 2)), "-b", "exp1", "-m", "2")
    dest = tmp_path / "restored"
    cli("checkout", "exp1~1", str(dest))
    assert (dest / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    assert (dest / "config.json").read_bytes() == (first / "config.json").read_bytes()


def test_checkout_refuses_a_non_empty_destination_without_force(cli, work, tmp_path):
    cli("commit", str(_checkpoint(work, 1)), "-b", "exp1", "-m", "1")
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    proc = cli("checkout", "exp1", str(dest), check=False)
    assert proc.returncode == 4
    assert "not empty" in proc.stderr.decode()
    assert sorted(p.name for p in dest.iterdir()) == ["keep.txt"]
    cli("checkout", "exp1", str(dest), "--force")
    assert (dest / "model.safetensors").exists() and (dest / "keep.txt").read_text() == "mine"


def test_diff_names_the_changed_tensor_and_how_much(cli, work):
    cli("commit", str(_checkpoint(work, 1)), "-b", "exp1", "-m", "1")
    cli("commit", str(_checkpoint(work, 2)), "-b", "exp1", "-m", "2")
    d = cli.json("diff", "exp1~1", "exp1")
    f = {x["path"]: x for x in d["files"]}["model.safetensors"]
    changed = [t for t in f["tensors"] if t["status"] == "changed"]
    assert [t["name"] for t in changed] == ["layer0.weight"]
    assert abs(changed[0]["max_abs_diff"] - 1.0) < 1e-5
    assert d["summary"]["tensors"]["unchanged"] == 5
    text = cli("diff", "exp1~1", "exp1").stdout.decode()
    assert "layer0.weight" in text and "5 tensors unchanged" in text


def test_status_shows_what_a_commit_would_change_and_stores_nothing(cli, work, repo):
    cli("commit", str(_checkpoint(work, 1)), "-b", "exp1", "-m", "1")
    before = repo.stored_bytes()
    d = cli.json("status", str(_checkpoint(work, 2)), "-b", "exp1")
    f = {x["path"]: x for x in d["files"]}
    assert f["model.safetensors"]["status"] == "modified"
    assert f["config.json"]["status"] == "modified"
    assert repo.stored_bytes() == before


def test_branch_delete_prints_how_to_undo(cli, work):
    cli("commit", str(_checkpoint(work, 1)), "-b", "exp1", "-m", "1")
    out = cli("branch", "-d", "exp1").stdout.decode()
    assert "undo with: mstore restore exp1" in out
    assert cli.json("branch") == []


def test_tag_cannot_be_moved(cli, work):
    cli("commit", str(_checkpoint(work, 1)), "-b", "exp1", "-m", "1")
    cli("tag", "v1", "exp1")
    cli("commit", str(_checkpoint(work, 2)), "-b", "exp1", "-m", "2")
    proc = cli("tag", "v1", "exp1", check=False)
    assert proc.returncode == 4 and "never move" in proc.stderr.decode()


def test_unknown_revision_is_a_clear_error(cli, work):
    cli("commit", str(_checkpoint(work, 1)), "-b", "exp1", "-m", "1")
    proc = cli("show", "nosuch", check=False)
    assert proc.returncode == 3
    assert "nosuch" in proc.stderr.decode()


def test_commands_outside_a_repository_say_how_to_start(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "mstore", "log"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 3
    assert "mstore init" in proc.stderr


def test_fsck_on_a_healthy_store_exits_zero(cli, work):
    cli("commit", str(_checkpoint(work, 1)), "-b", "exp1", "-m", "1")
    assert cli.json("fsck")["ok"] is True


def test_bad_meta_is_refused_before_anything_is_stored(cli, work, repo):
    ck = _checkpoint(work, 1)
    before = repo.stored_bytes()
    proc = cli("commit", str(ck), "-b", "exp1", "-m", "1", "--meta", "noequals", check=False)
    assert proc.returncode == 2 and "KEY=VALUE" in proc.stderr.decode()
    assert repo.stored_bytes() == before and repo.branches() == []


def test_gc_apply_asks_for_at_least_seven_characters_of_the_proof_id_spaces_not_counted():
    from mstore.cli.gc import _confirms

    pid = "0123456789abcdef" * 4
    assert _confirms("0123456", pid) and _confirms(f"  {pid}\n", pid)
    assert not _confirms("   012345   ", pid)  # padding used to count towards the seven
    assert not _confirms("1234567", pid) and not _confirms("", pid)
