"""The remote commands as a user runs them: real `mstore` subprocesses against file:// and S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mstore.errors import FormatError
from mstore.format import parse_config
from tests.conftest import Cli, tree_bytes
from tests.remote.conftest import checkpoint


def _args(remote) -> list[str]:
    return ["--endpoint-url", remote["endpoint_url"]] if remote.get("endpoint_url") else []


def test_remote_add_push_clone_log_and_fetch_from_the_command_line(cli, work, tmp_path, remote):
    checkpoint(work / "ck", 1)
    cli("commit", str(work / "ck"), "-b", "exp1", "-m", "one")
    cli("remote", "add", "origin", remote["url"], *_args(remote))
    assert cli.json("remote", "list")["origin"]["url"] == remote["url"]
    pushed = cli.json("push", "origin", "exp1")
    assert pushed["refs"][0]["status"] == "ok" and pushed["bytes"] > 0
    text = cli("push", "origin", "exp1").stdout.decode()
    assert "up-to-date" in text and "0 objects" in text
    dest = tmp_path / "copy" / ".mstore"
    cloned = cli.json("clone", remote["url"], str(dest), *_args(remote))
    assert cloned["branches"] == ["exp1"]
    other = Cli(dest, tmp_path)
    log = other.json("log", "origin/exp1")
    assert [e["message"] for e in log] == ["one"]
    other("checkout", "exp1", str(tmp_path / "out"))
    assert tree_bytes(tmp_path / "out") == tree_bytes(work / "ck")
    shown = other.json("remote", "show", "origin")
    assert [r["ref"] for r in shown] == ["exp1"]
    assert [e["seq"] for e in other.json("remote", "log", "origin", "exp1")] == [1]
    assert other.json("fetch", "origin")["objects"] == 0


def test_a_rejected_push_exits_4_and_tells_to_fetch_first(cli, work, tmp_path, remote):
    checkpoint(work / "a", 1)
    cli("commit", str(work / "a"), "-b", "exp1", "-m", "a")
    cli("remote", "add", "origin", remote["url"], *_args(remote))
    cli("push", "origin", "exp1")
    dest = tmp_path / "other" / ".mstore"
    cli("clone", remote["url"], str(dest), *_args(remote))
    other = Cli(dest, tmp_path)
    checkpoint(work / "b", 2)
    other("commit", str(work / "b"), "-b", "exp1", "-m", "theirs")
    other("push", "origin", "exp1")
    checkpoint(work / "c", 3)
    cli("commit", str(work / "c"), "-b", "exp1", "-m", "mine")
    proc = cli("push", "origin", "exp1", check=False)
    assert proc.returncode == 4
    assert "fetch first" in proc.stderr.decode()
    assert "pushing" not in proc.stderr.decode()  # no progress bar when stderr is not a terminal


def test_fsck_repair_from_on_the_command_line(cli, repo, work, remote):
    checkpoint(work / "ck", 1)
    cli("commit", str(work / "ck"), "-b", "exp1", "-m", "one")
    cli("remote", "add", "backup", remote["url"], *_args(remote))
    cli("push", "backup", "exp1")
    _kind, _oid, entry = max(repo.store.iter_entries("c"), key=lambda x: x[2].enc_len)
    pack = repo.root / "packs" / repo.store.pack_name(entry.pack)
    pack.chmod(0o644)
    with open(pack, "r+b") as f:
        f.seek(entry.offset + 88 + 10)
        f.write(b"\x00\xff\x00\xff")
    assert cli("fsck", check=False).returncode == 5
    fixed = json.loads(cli("fsck", "--repair-from", "backup", "--json").stdout)
    assert fixed["ok"] and len(fixed["repaired"]) == 1
    assert cli("fsck").returncode == 0


def test_clone_of_a_broken_remote_leaves_no_directory(cli, work, tmp_path):
    dest = tmp_path / "nothing-here" / ".mstore"
    proc = cli("clone", (tmp_path / "no-such-remote").as_uri(), str(dest), check=False)
    assert proc.returncode == 3 and "not an mstore remote" in proc.stderr.decode()
    assert not dest.exists()


def test_credentials_are_refused_in_config():
    with pytest.raises(FormatError, match="never from config.toml"):
        parse_config('[format]\nversion = 2\n[remotes.o]\nurl = "s3://b/p"\naws_secret_access_key = "x"\n')


def test_push_help_explains_the_race_and_resumption():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSTORE_")}
    out = subprocess.run([sys.executable, "-m", "mstore", "push", "--help"], capture_output=True, env=env,
                         text=True, timeout=60).stdout
    assert "compare-and-swap" in out and "resumes" in out


def test_push_delete_from_the_command_line_is_logged_and_a_missing_ref_exits_3(cli, work, remote):
    checkpoint(work / "ck", 1)
    cli("commit", str(work / "ck"), "-b", "exp1", "-m", "one")
    cli("remote", "add", "origin", remote["url"], *_args(remote))
    cli("push", "origin", "exp1")
    text = cli("push", "origin", "--delete", "exp1").stdout.decode()
    assert "deleted" in text and "origin/exp1" in text
    assert cli.json("remote", "show", "origin") == []
    log = cli.json("remote", "log", "origin", "exp1")
    assert [(e["seq"], e["id"], e["command"]) for e in log][-1] == (2, None, "delete")
    assert "(deleted)" in cli("remote", "log", "origin", "exp1").stdout.decode()
    proc = cli("push", "origin", "--delete", "exp1", check=False)
    assert proc.returncode == 3 and "exp1" in proc.stderr.decode()
