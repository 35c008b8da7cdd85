"""`mstore run`: inputs mounted for a job, outputs committed with lineage (real mounts).

Without /dev/fuse the module is skipped, saying why; the `fuse` fixture fails any test that
leaves a mount behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mstore import Repo
from mstore import mount as mount_mod
from tests.fuse_helpers import cli, fuse, make_sample, mounts_under, requires_fuse  # noqa: F401

pytestmark = [requires_fuse, pytest.mark.usefixtures("fuse")]

# A job that proves it sees its inputs: it records the paths it was given (through the {NAME}
# placeholders and $MSTORE_INPUT_<NAME>) and a file read from each mount, in its output.
JOB = r"""
import json, os, sys
base, data, out = sys.argv[1:4]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "seen.json"), "w") as f:
    json.dump({
        "argv": [base, data],
        "env": [os.environ["MSTORE_INPUT_BASE"], os.environ["MSTORE_INPUT_DATA"]],
        "config": open(os.path.join(base, "config.json")).read(),
        "first_line": open(os.path.join(data, "shard-0.jsonl")).readline(),
        "mounted": [os.path.ismount(base), os.path.ismount(data)],
    }, f)
sys.exit(int(os.environ.get("JOB_EXIT", "0")))
"""


@pytest.fixture
def inputs(repo: Repo, work: Path) -> dict[str, str]:
    d = make_sample(work)
    base = repo.commit(d, "models/base", "base", kind="model").id
    data = repo.commit(d / "data", "data/syllo", "data", kind="dataset").id
    return {"base": str(base), "data": str(data)}


def _job(tmp_path: Path, repo: Repo, *, exit_code: int = 0, **kw):
    cwd = tmp_path / "job"
    cwd.mkdir(exist_ok=True)
    env = {"PATH": os.environ.get("PATH", ""), "JOB_EXIT": str(exit_code)}
    return repo.run(
        [sys.executable, "-c", JOB, "{base}", "{data}", "out"],
        inputs=[("base", "models/base"), ("data", "data/syllo")],
        output="out",
        branch="runs/job7",
        message="sweep lr=3e-4",
        env=env,
        cwd=cwd,
        **kw,
    )


def _leases(repo: Repo) -> list[str]:
    with repo.store.index.read() as txn:
        return [v.decode() for _k, v in txn.db_items("leases")]


def test_run_commits_the_output_with_inputs_command_exit_code_and_wall_time(repo, inputs, tmp_path):
    res = _job(tmp_path, repo)

    assert res.exit_code == 0 and res.commit is not None
    c = repo.get_commit("runs/job7")
    assert repo.head("runs/job7") == res.commit.id
    assert c.inputs == inputs
    run = c.provenance["run"]
    assert run["command"] == [sys.executable, "-c", JOB, "{base}", "{data}", "out"]
    assert run["exit_code"] == 0 and run["wall_seconds"] >= 0
    assert run["inputs"] == {
        n: {"rev": r, "id": inputs[n]} for n, r in (("base", "models/base"), ("data", "data/syllo"))
    }
    assert c.provenance["cwd"] == str(tmp_path / "job")
    for key in ("python", "host", "packages"):
        assert key in c.provenance
    assert c.message == "sweep lr=3e-4"


def test_the_job_sees_each_input_mounted_through_its_placeholder_and_env_var(repo, inputs, tmp_path, work):
    res = _job(tmp_path, repo)

    seen = json.loads((tmp_path / "job" / "out" / "seen.json").read_text())
    assert seen["argv"] == seen["env"] == [res.inputs["base"].mountpoint, res.inputs["data"].mountpoint]
    assert seen["mounted"] == [True, True]
    assert seen["config"] == (work / "model" / "config.json").read_text()
    assert seen["first_line"] == (work / "model" / "data" / "shard-0.jsonl").open().readline()
    assert res.inputs["base"].id == inputs["base"] and res.inputs["data"].id == inputs["data"]
    # released after the job: not mounted, no lease, mount point directories removed
    assert mounts_under(Path(res.inputs["base"].mountpoint).parent) == []
    assert not Path(res.inputs["base"].mountpoint).exists()
    assert _leases(repo) == []


def test_a_failing_job_commits_nothing_and_leaves_no_mount(repo, inputs, tmp_path):
    res = _job(tmp_path, repo, exit_code=3)

    assert res.exit_code == 3 and res.commit is None
    assert repo.head("runs/job7") is None
    assert (tmp_path / "job" / "out" / "seen.json").exists()  # the job did run
    mps = [i.mountpoint for i in res.inputs.values()]
    assert all(not mount_mod.is_mounted(mp) for mp in mps)
    assert repo.mounts() == [] and _leases(repo) == []


def test_commit_on_failure_commits_and_records_the_exit_code(repo, inputs, tmp_path):
    res = _job(tmp_path, repo, exit_code=3, commit_on_failure=True)

    assert res.commit is not None
    assert repo.get_commit("runs/job7").provenance["run"]["exit_code"] == 3


def test_an_unknown_input_fails_before_anything_is_mounted_or_run(repo, inputs, tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(Exception, match="nosuch"):
        repo.run(
            ["touch", str(marker)],
            inputs=[("base", "models/base"), ("x", "nosuch")],
            output="out",
            branch="b",
            message="m",
            env={"PATH": os.environ.get("PATH", "")},
            cwd=tmp_path,
        )
    assert not marker.exists()
    assert repo.mounts() == []


def test_mounts_are_released_when_the_command_cannot_start(repo, inputs, tmp_path):
    with pytest.raises(Exception, match="cannot run"):
        repo.run(
            ["/nonexistent/train"],
            inputs={"base": "models/base"},
            output="out",
            branch="b",
            message="m",
            env={},
            cwd=tmp_path,
        )
    assert repo.mounts() == [] and _leases(repo) == []


def test_a_job_that_succeeds_without_writing_its_output_commits_nothing(repo, inputs, tmp_path):
    with pytest.raises(Exception, match="left no out"):
        repo.run(
            ["true"],
            inputs={"base": "models/base"},
            output="out",
            branch="b",
            message="m",
            env={"PATH": os.environ.get("PATH", "")},
            cwd=tmp_path,
        )
    assert repo.head("b") is None


def test_bad_input_names_are_refused(repo, inputs, tmp_path):
    for bad in ("a-b", "1x", ""):
        with pytest.raises(mount_mod.UserError):
            repo.run(["true"], inputs=[(bad, "models/base")], output="o", branch="b", message="m", env={}, cwd=tmp_path)


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_run_reports_mounts_and_the_commit_and_records_lineage(repo, inputs, tmp_path):
    cwd = tmp_path / "job"
    cwd.mkdir()
    proc = cli(
        repo.root,
        "run",
        "--input",
        "base=models/base",
        "--input",
        "data=data/syllo",
        "--output",
        "out/",
        "-b",
        "runs/job7",
        "-m",
        "sweep lr=3e-4",
        "--",
        sys.executable,
        "-c",
        JOB,
        "{base}",
        "{data}",
        "out",
        cwd=cwd,
    )
    head = repo.head("runs/job7")
    assert head is not None
    assert f"mounted base ({inputs['base'][:7]}) at " in proc.stderr
    assert f"mounted data ({inputs['data'][:7]}) at " in proc.stderr
    assert (
        f"committed out/ as {head[:7]} on runs/job7 (inputs: base {inputs['base'][:7]}, "
        f"data {inputs['data'][:7]}; exit 0; "
    ) in proc.stderr
    c = repo.get_commit("runs/job7")
    assert c.inputs == inputs
    assert c.provenance["command"][:2] == ["mstore", "run"]


def test_cli_run_of_a_failing_job_exits_with_its_status_and_commits_nothing(repo, inputs, tmp_path):
    proc = cli(
        repo.root,
        "run",
        "-i",
        "base=models/base",
        "-o",
        "out",
        "-b",
        "runs/x",
        "-m",
        "m",
        "--",
        "sh",
        "-c",
        "exit 7",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 7
    assert "nothing committed" in proc.stderr
    assert repo.head("runs/x") is None
    assert repo.mounts() == []


def test_a_killed_mstore_run_leaves_no_mount_behind(repo, inputs, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSTORE_")}
    env["MSTORE_DIR"] = str(repo.root)
    env["TMPDIR"] = str(tmp_path)  # the mount points of a killed run stay behind (empty): here
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mstore",
            "run",
            "-i",
            "base=models/base",
            "-o",
            "out",
            "-b",
            "runs/k",
            "-m",
            "m",
            "--",
            "sleep",
            "30",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 15
        while not repo.mounts() and time.monotonic() < deadline:
            time.sleep(0.05)
        (info,) = repo.mounts()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert mount_mod._wait_exit(info.pid, 10), "the input mount outlived mstore run"
        assert not mount_mod.is_mounted(info.mountpoint)
        assert repo.head("runs/k") is None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the orphaned `sleep`
        except ProcessLookupError:
            pass
        proc.wait()
