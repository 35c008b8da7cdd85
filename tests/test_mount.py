"""`mstore mount`: a commit as a read-only FUSE file system, lazy and verified (real mounts).

Every test mounts in its own temporary directory and must leave nothing mounted (the `fuse`
fixture fails a test that does). Without /dev/fuse the whole module is skipped, saying why.
"""

from __future__ import annotations

import errno
import filecmp
import os
import random
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from mstore import ObjectId, Repo
from mstore import mount as mount_mod
from mstore.mount import MountError, mount_commit
from mstore.objects import load_commit, load_file
from mstore.snapshot import resolve_path
from tests.conftest import snapshot_dir
from tests.fuse_helpers import (  # noqa: F401 - fuse is a fixture
    FUSE_MISSING,
    cleanup,
    cli,
    fuse,
    make_sample,
    mounts_under,
    requires_fuse,
)
from tests.test_corruption import flip_payload_byte

pytestmark = [requires_fuse, pytest.mark.usefixtures("fuse")]

SHARD = "data/shard-0.jsonl"
PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def sample(repo: Repo, work: Path) -> tuple[Path, ObjectId]:
    d = make_sample(work)
    return d, repo.commit(d, "models/base", "base model", kind="model").id


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _leases(repo: Repo) -> list[str]:
    with repo.store.index.read() as txn:
        return [v.decode() for _k, v in txn.db_items("leases")]


# -- what a reader sees (one read-only mount shared by these tests) -------------------------------


@dataclass
class Shared:
    repo: Repo
    src: Path
    cid: ObjectId
    mnt: Path


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory):
    if FUSE_MISSING:
        pytest.skip(FUSE_MISSING)
    base = tmp_path_factory.mktemp("shared")
    repo = Repo.init(base / ".mstore")
    (base / "work").mkdir()
    src = make_sample(base / "work")
    cid = repo.commit(src, "models/base", "base model", kind="model").id
    try:
        with mount_commit(repo, "models/base", base / "mnt") as m:
            yield Shared(repo, src, cid, Path(m.mountpoint))
    finally:
        left = cleanup(base)
        repo.close()
    assert left == [], f"left mounted: {left}"


def _uncached(path: Path) -> None:
    """Drop the kernel's cached pages of a mounted file, so reads reach the mount again."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_every_file_of_a_mounted_commit_equals_the_original_byte_for_byte(shared):
    src, mnt = shared.src, shared.mnt
    assert _files(mnt) == _files(src)
    for rel in _files(src):
        _uncached(mnt / rel)
        subprocess.run(["cmp", str(src / rel), str(mnt / rel)], check=True)
        assert filecmp.cmp(src / rel, mnt / rel, shallow=False)


def test_random_offset_reads_match_the_original(shared):
    rng = random.Random(11)
    for rel in ("model.safetensors", SHARD):
        want = (shared.src / rel).read_bytes()
        _uncached(shared.mnt / rel)
        fd = os.open(shared.mnt / rel, os.O_RDONLY)
        try:
            for _ in range(200):
                off = rng.randrange(0, len(want) + 100)
                n = rng.choice([1, 7, 4096, 65536, 300_000, 2_000_000])
                assert os.pread(fd, n, off) == want[off : off + n], (rel, off, n)
        finally:
            os.close(fd)


def test_ls_lR_shows_the_committed_tree_with_sizes_read_only_modes_and_the_commit_time(shared):
    src, mnt = shared.src, shared.mnt
    commit_time = load_commit(shared.repo.store, shared.cid).time
    commit_ts = datetime.fromisoformat(commit_time.replace("Z", "+00:00")).timestamp()
    listing = subprocess.run(
        ["ls", "-lR", "--time-style=+%s", str(mnt)], capture_output=True, text=True, check=True
    ).stdout
    for rel in _files(src):
        size = (src / rel).stat().st_size
        assert f" {size} {int(commit_ts)} {Path(rel).name}" in listing
        st = (mnt / rel).stat()
        assert st.st_size == size
        assert stat.S_IMODE(st.st_mode) == (0o555 if rel == "run.sh" else 0o444)
        assert abs(st.st_mtime - commit_ts) < 1e-3
    for d in ("data", "a", "a/b"):
        st = (mnt / d).stat()
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o555
    assert sorted(os.listdir(mnt)) == sorted(os.listdir(src))


def test_safetensors_load_file_on_the_mount_gives_the_original_tensors(shared):
    from safetensors.numpy import load_file

    _uncached(shared.mnt / "model.safetensors")
    got = load_file(str(shared.mnt / "model.safetensors"))
    want = load_file(str(shared.src / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_writes_of_any_kind_fail_with_erofs(shared):
    mnt = shared.mnt
    f = mnt / "config.json"
    attempts = {
        "open for writing": lambda: os.open(f, os.O_WRONLY),
        "open read-write": lambda: os.open(f, os.O_RDWR),
        "append": lambda: os.open(f, os.O_WRONLY | os.O_APPEND),
        "create": lambda: os.open(mnt / "new.txt", os.O_WRONLY | os.O_CREAT, 0o644),
        "truncate": lambda: os.truncate(f, 0),
        "unlink": lambda: os.unlink(f),
        "rename": lambda: os.rename(f, mnt / "renamed.json"),
        "mkdir": lambda: os.mkdir(mnt / "newdir"),
        "rmdir": lambda: os.rmdir(mnt / "a" / "b"),
        "chmod": lambda: os.chmod(f, 0o777),
        "chown": lambda: os.chown(f, 1, 1),
        "utime": lambda: os.utime(f, (0, 0)),
        "symlink": lambda: os.symlink("config.json", mnt / "link"),
        "hard link": lambda: os.link(f, mnt / "hard"),
        "setxattr": lambda: os.setxattr(f, "user.x", b"1"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.errno == errno.EROFS, what
    assert not (mnt / "new.txt").exists()
    assert f.read_bytes() == (shared.src / "config.json").read_bytes()


def test_a_corrupted_chunk_fails_reads_of_its_region_with_eio_and_everything_else_still_reads(repo, sample, tmp_path):
    src, cid = sample
    commit = load_commit(repo.store, cid)
    fobj = load_file(repo.store, resolve_path(repo.store, commit.tree, SHARD).id)
    assert len(fobj.chunks) >= 4
    k = len(fobj.chunks) // 2
    bad_id, bad_len = fobj.chunks[k]
    bad_start = sum(n for _c, n in fobj.chunks[:k])
    flip_payload_byte(repo, "c", bad_id)
    want = (src / SHARD).read_bytes()
    with mount_commit(repo, "models/base", tmp_path / "mnt") as m:
        path = Path(m.mountpoint) / SHARD
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as exc:
                os.pread(fd, 100, bad_start + bad_len // 2)
            assert exc.value.errno == errno.EIO
            # the same file before and after the damaged chunk is fine (the kernel reads whole
            # pages, so the pages the chunk touches are the region that fails)
            before = bad_start // PAGE * PAGE
            assert os.pread(fd, before, 0) == want[:before]
            after = -(-(bad_start + bad_len) // PAGE) * PAGE
            assert os.pread(fd, 10_000, after) == want[after : after + 10_000]
        finally:
            os.close(fd)
        assert (Path(m.mountpoint) / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
        log = Path(m.info.log).read_text()
    assert f"damaged data in /{SHARD} at offset {bad_start}-{bad_start + bad_len}" in log
    assert str(bad_id) in log


def test_the_store_is_unchanged_after_a_mounted_session(repo, sample, tmp_path):
    src, _ = sample
    packs = snapshot_dir(repo.root / "packs")
    refs = [(b.name, b.id) for b in repo.branches()]
    reflog = repo.reflog()
    objects = sorted((k, i) for k, i, _e in repo.store.iter_entries())
    with mount_commit(repo, "models/base", tmp_path / "mnt") as m:
        for rel in _files(src):
            (Path(m.mountpoint) / rel).read_bytes()
    assert snapshot_dir(repo.root / "packs") == packs
    assert [(b.name, b.id) for b in repo.branches()] == refs
    assert repo.reflog() == reflog
    assert sorted((k, i) for k, i, _e in repo.store.iter_entries()) == objects
    assert _leases(repo) == []
    assert list((repo.root / "mounts").glob("*.json")) == []
    assert repo.fsck().ok


# -- lifecycle ---------------------------------------------------------------------------------


def test_the_mount_holds_a_gc_lease_on_its_commit_until_it_is_unmounted(repo, sample, tmp_path):
    _, cid = sample
    with mount_commit(repo, "models/base", tmp_path / "mnt"):
        (lease,) = _leases(repo)
        assert str(cid) in lease and "mount" in lease
    assert _leases(repo) == []


def test_mounts_lists_each_mount_with_its_commit_rev_and_process(repo, sample, tmp_path):
    _, cid = sample
    with mount_commit(repo, "models/base", tmp_path / "mnt") as m:
        (info,) = repo.mounts()
        assert (info.mountpoint, info.commit, info.rev, info.pid) == (m.mountpoint, cid, "models/base", m.pid)
        assert info.alive and info.mounted
    assert repo.mounts() == []


def test_sigterm_to_the_mount_process_unmounts_cleanly_and_releases_everything(repo, sample, tmp_path):
    m = mount_commit(repo, "models/base", tmp_path / "mnt")
    try:
        os.kill(m.pid, signal.SIGTERM)
        assert mount_mod._wait_exit(m.pid, 10)
        assert not mount_mod.is_mounted(m.mountpoint)
        assert repo.mounts() == []
        assert _leases(repo) == []
    finally:
        m.umount()


def test_a_killed_mount_is_listed_as_dead_until_umount_clears_it(repo, sample, tmp_path):
    m = mount_commit(repo, "models/base", tmp_path / "mnt")
    try:
        os.kill(m.pid, signal.SIGKILL)
        assert mount_mod._wait_exit(m.pid, 10)
        with pytest.raises(OSError) as exc:
            os.listdir(m.mountpoint)
        assert exc.value.errno == errno.ENOTCONN
        (info,) = repo.mounts()
        assert not info.alive and info.mounted
        repo.umount(m.mountpoint)
        assert not mount_mod.is_mounted(m.mountpoint)
        assert repo.mounts() == []
    finally:
        m.umount(lazy=True)


def test_unmounting_a_busy_mount_is_refused_with_the_reason_and_lazy_detaches_it(repo, sample, tmp_path):
    m = mount_commit(repo, "models/base", tmp_path / "mnt")
    fd = os.open(Path(m.mountpoint) / "config.json", os.O_RDONLY)
    try:
        with pytest.raises(MountError, match="busy.*--lazy"):
            repo.umount(m.mountpoint)
        assert mount_mod.is_mounted(m.mountpoint)
        repo.umount(m.mountpoint, lazy=True)
        assert not mount_mod.is_mounted(m.mountpoint)
        assert os.pread(fd, 1, 0) == b"{"  # an open file keeps working until closed
    finally:
        os.close(fd)
        m.umount(lazy=True)
    assert mount_mod._wait_exit(m.pid, 10)


def test_a_mount_point_with_spaces_in_its_path_is_listed_and_unmounted(repo, sample, tmp_path):
    with mount_commit(repo, "models/base", tmp_path / "my models" / "base v2") as m:
        assert mount_mod.is_mounted(m.mountpoint)
        assert [i.mountpoint for i in repo.mounts()] == [m.mountpoint]
    assert not mount_mod.is_mounted(m.mountpoint)


def test_a_mount_ends_when_the_process_that_owns_it_exits(repo, sample, tmp_path):
    owner = subprocess.Popen(["sleep", "30"])
    try:
        m = mount_commit(repo, "models/base", tmp_path / "mnt", owner_pid=owner.pid)
        owner.kill()
        owner.wait()
        assert mount_mod._wait_exit(m.pid, 10), "the mount outlived its owner"
        assert not mount_mod.is_mounted(m.mountpoint)
    finally:
        owner.kill()
        owner.wait()


def test_the_mount_context_manager_unmounts_when_the_block_raises(repo, sample, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with repo.mount("models/base", tmp_path / "mnt") as m:
            assert (Path(m.mountpoint) / "config.json").exists()
            raise RuntimeError("boom")
    assert not mount_mod.is_mounted(m.mountpoint)
    assert not mount_mod._pid_alive(m.pid)


def test_a_file_still_open_after_the_block_keeps_reading_and_the_mount_ends_when_it_closes(repo, sample, tmp_path):
    src, _ = sample
    with repo.mount("models/base", tmp_path / "mnt") as m:
        f = open(Path(m.mountpoint) / "model.safetensors", "rb")  # outlives the block
    try:
        assert not mount_mod.is_mounted(m.mountpoint)  # detached at the end of the block
        assert f.read() == (src / "model.safetensors").read_bytes()
        assert mount_mod._pid_alive(m.pid)
    finally:
        f.close()
    assert mount_mod._wait_exit(m.pid, 10)
    assert repo.mounts() == [] and _leases(repo) == []


def test_mounting_on_a_busy_or_non_empty_directory_is_refused(repo, sample, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(mount_mod.UserError, match="not empty"):
        mount_commit(repo, "models/base", full)
    with mount_commit(repo, "models/base", tmp_path / "mnt") as m:
        with pytest.raises(mount_mod.Conflict, match="already mounted"):
            mount_commit(repo, "models/base", m.mountpoint)
    assert (full / "keep.txt").read_text() == "mine"


def test_a_failed_mount_raises_with_the_reason_and_leaves_nothing(repo, sample, tmp_path, monkeypatch):
    monkeypatch.setattr(mount_mod, "CHILD_COMMAND", [sys.executable, "-c", "import sys; sys.exit('no fuse here')"])
    with pytest.raises(MountError, match="no fuse here"):
        mount_commit(repo, "models/base", tmp_path / "mnt", timeout=10)
    assert repo.mounts() == []


def test_foreground_mount_serves_until_unmounted_then_exits_zero(repo, sample, tmp_path):
    mnt = tmp_path / "mnt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSTORE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mstore", "--store", str(repo.root), "mount", "--foreground", "models/base", str(mnt)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("mounted models/base") and str(mnt) in line
        assert (mnt / "config.json").read_text().startswith("{")
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "unmounted" in out
        assert not mount_mod.is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_mount_mounts_and_umount_round_trip(repo, sample, tmp_path):
    mnt = tmp_path / "mnt"
    out = cli(repo.root, "mount", "models/base", str(mnt)).stdout
    try:
        assert f"at {mnt}" in out and "mstore umount" in out
        assert (mnt / "a" / "b" / "deep.txt").read_text() == "deep\n"
        listing = cli(repo.root, "mounts").stdout
        assert str(mnt) in listing and "models/base" in listing and "mounted" in listing
    finally:
        cli(repo.root, "umount", str(mnt))
    assert mounts_under(tmp_path) == []
    assert "nothing mounted" in cli(repo.root, "mounts").stdout
    missing = cli(repo.root, "umount", str(mnt), check=False)
    assert missing.returncode == 3 and "nothing is mounted" in missing.stderr
