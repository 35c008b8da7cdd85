"""`mstore mount REMOTE/BRANCH DIR`: a remote's commit served lazily, verified chunk by chunk.

Real FUSE mounts (a background `mstore mount` process, as a user starts it) of what was pushed
to a real remote: a second directory, or a bucket on the SeaweedFS S3 server. The reading store
is a fresh, empty one unless a test says otherwise. Without /dev/fuse these tests skip, saying
why; the object source itself is also tested without FUSE.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from mstore import ObjectId, Repo, codecs
from mstore.codecs import DELTA
from mstore.errors import ObjectNotFound, RefNotFound, RemoteIntegrityError, StorageError, UserError
from mstore.format import Config, write_config
from mstore.objects import load_commit, load_file
from mstore.remote import load_catalog
from mstore.remote_mount import RemoteObjects, remote_target, resolve_remote
from mstore.snapshot import resolve_path
from mstore.storage import packs
from mstore.storage.backends import open_backend
from mstore.storage.packs import RECORD
from tests.conftest import repo_at_version, write_safetensors
from tests.fuse_helpers import cli, fuse, mounts_under, requires_fuse  # noqa: F401 - fuse is a fixture
from tests.remote.conftest import add_remote

MODEL = "model.safetensors"
N_TENSORS = 24
SHAPE = (64, 1024)  # 256 KiB of float32 per tensor: one chunk each
PAGE = os.sysconf("SC_PAGE_SIZE")


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"layer.{i:02d}.weight": rng.standard_normal(SHAPE).astype(np.float32) * 0.02 for i in range(N_TENSORS)}


def _two_checkpoints(repo: Repo, work: Path) -> tuple[list[ObjectId], list[bytes]]:
    """Two versions of a model on ``exp1``; every tensor of the second moved a little (deltas)."""
    w = _weights()
    commits, files = [], []
    rng = np.random.default_rng(1)
    for step in range(2):
        if step:
            w = {k: (v - 1e-4 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in w.items()}
        d = work / f"ckpt-{step}"
        write_safetensors(d / MODEL, w, {"step": str(step)})
        (d / "config.json").write_text(json.dumps({"step": step}))
        commits.append(repo.commit(d, "exp1", f"step {step}", kind="checkpoint").id)
        files.append((d / MODEL).read_bytes())
    return commits, files


def _chunks(repo: Repo, cid: ObjectId) -> list[tuple[ObjectId, int]]:
    tree = load_commit(repo.store, cid).tree
    return list(load_file(repo.store, resolve_path(repo.store, tree, MODEL).id).chunks)


@pytest.fixture
def pushed(repo: Repo, work: Path, remote: dict):
    """``exp1`` (two checkpoints, the second stored as deltas) pushed to ``remote``."""
    commits, files = _two_checkpoints(repo, work)
    chunks = _chunks(repo, commits[1])
    assert sum(repo.store.entry("c", c).codec == DELTA for c, _n in chunks) >= N_TENSORS // 2
    add_remote(repo, remote)
    repo.push("origin", ["exp1"])
    return commits, files, chunks


@pytest.fixture
def reader(tmp_path: Path, remote: dict) -> Repo:
    """A fresh, empty store that knows the remote as ``origin``."""
    r = Repo.init(tmp_path / "reader" / ".mstore")
    add_remote(r, remote)
    yield r
    r.close()


def _refs(repo: Repo) -> dict[str, bytes]:
    with repo.store.index.read() as txn:
        return dict(txn.iter_refs(""))


def _chunk_ids(repo: Repo) -> set[ObjectId]:
    return {oid for kind, oid, _e in repo.store.iter_entries() if kind == "c"}


def _bases(repo: Repo, chunks: set[ObjectId]) -> set[ObjectId]:
    """Every delta base (down each chain) the source store records for ``chunks``."""
    out: set[ObjectId] = set()
    with repo.store.index.read() as txn:
        for c in chunks:
            row = txn.db_get("deltas", c.digest)
            while row is not None:
                base = ObjectId.from_digest(row[:32])
                out.add(base)
                row = txn.db_get("deltas", base.digest)
    return out


def _flip_remote_record(remote: dict, kind: str, oid: ObjectId) -> None:
    """Flip a byte in the middle of an object's payload in a ``file://`` remote's pack."""
    at = load_catalog(open_backend(remote["url"])).objects[(kind, oid.digest)]
    path = Path(remote["url"].removeprefix("file://")) / "packs" / f"{at.pack}.pack"
    pos = at.offset + RECORD.size + at.enc_len // 2
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x40]))


def _log(repo: Repo) -> str:
    return "\n".join(p.read_text() for p in sorted((repo.root / "mounts").glob("*.log")))


def _pread_fresh(path: Path, n: int, off: int) -> bytes:
    """Read exactly this range: the kernel's own read-ahead is turned off for the file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


# -- through FUSE ----------------------------------------------------------------------------------


@requires_fuse
@pytest.mark.usefixtures("fuse")
def test_a_remote_mount_serves_the_pushed_bytes_delta_checkpoint_included_and_moves_no_ref(pushed, reader, tmp_path):
    commits, files, _chunks_v2 = pushed
    mnt = tmp_path / "mnt"
    proc = cli(reader.root, "mount", "origin/exp1", str(mnt))
    assert f"mounted origin/exp1 ({commits[1].short}, from remote origin)" in proc.stdout
    try:
        listing = cli(reader.root, "mounts").stdout
        assert "remote origin" in listing and commits[1].short in listing
        [info] = json.loads(cli(reader.root, "mounts", "--json").stdout)
        assert info["remote"] == "origin" and info["commit"] == str(commits[1])
        assert (mnt / MODEL).read_bytes() == files[1]
        assert json.loads((mnt / "config.json").read_text()) == {"step": 1}
        # The first checkpoint, by commit id, at a second mount point.
        cli(reader.root, "mount", "--remote", "origin", str(commits[0]), str(tmp_path / "v0"))
        assert (tmp_path / "v0" / MODEL).read_bytes() == files[0]
        cli(reader.root, "umount", str(tmp_path / "v0"))
    finally:
        cli(reader.root, "umount", str(mnt))
    # Nothing was fetched into the store, no ref or lease exists: a remote mount is read-only here.
    assert _refs(reader) == {}
    assert _chunk_ids(reader) == set()
    with reader.store.index.read() as txn:
        assert list(txn.db_items("leases")) == []
    assert "remote origin: " in _log(reader) and "0 read from the local store" in _log(reader)


@requires_fuse
@pytest.mark.usefixtures("fuse")
@pytest.mark.parametrize("remote", ["file"], indirect=True)  # S3 reads: the test above
def test_only_the_chunks_read_are_downloaded_and_kept_and_a_later_fetch_completes_the_rest(
    pushed, reader, tmp_path, repo
):
    commits, files, chunks = pushed
    mnt = tmp_path / "mnt"
    cli(reader.root, "mount", "--keep-chunks", "--readahead", "0", "origin/exp1", str(mnt))
    try:
        # Bytes inside tensors 5 and 6 only (chunk 0 is the header).
        starts = np.cumsum([0] + [n for _c, n in chunks])
        off, n = int(starts[6]) + 100, int(chunks[6][1])
        assert _pread_fresh(mnt / MODEL, n, off) == files[1][off : off + n]
    finally:
        cli(reader.root, "umount", str(mnt))
    # The kernel asks for whole pages: the chunks those pages overlap are the ones read.
    lo, hi = off // PAGE * PAGE, -(-(off + n) // PAGE) * PAGE
    read = {c for i, (c, k) in enumerate(chunks) if starts[i] < hi and starts[i] + k > lo}
    assert 2 <= len(read) <= 4
    log = _log(reader)
    assert f"remote origin: {len(read)} chunks fetched" in log, log
    # Kept: exactly those chunks and the bases their deltas needed (the first checkpoint's
    # tensors); nothing else of either version.
    assert _chunk_ids(reader) == read | _bases(repo, read)
    assert _refs(reader) == {}, "keeping chunks must not move any ref"
    kept = _chunk_ids(reader)
    # A fetch afterwards sends only what the store still lacks, and leaves a complete closure.
    result = reader.fetch("origin", ["exp1"])
    assert result.objects > 0 and kept <= _chunk_ids(reader)
    dest = tmp_path / "out"
    reader.checkout("origin/exp1", dest)
    assert (dest / MODEL).read_bytes() == files[1]


@requires_fuse
@pytest.mark.usefixtures("fuse")
@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_a_sequential_reader_gets_the_next_chunks_downloaded_ahead(pushed, reader, tmp_path):
    commits, files, chunks = pushed
    mnt = tmp_path / "mnt"
    cli(reader.root, "mount", "--readahead", "2M", "origin/exp1", str(mnt))
    try:
        fd = os.open(mnt / MODEL, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # only what is asked reaches the mount
            end = sum(n for _c, n in chunks[:3])  # the header and two tensors
            for off in range(0, end, 128 << 10):
                assert os.pread(fd, 128 << 10, off) == files[1][off : off + (128 << 10)]
        finally:
            os.close(fd)
        time.sleep(0.5)  # let the downloads ahead finish before the mount ends
    finally:
        cli(reader.root, "umount", str(mnt))
    fetched = int(re.search(r"remote origin: (\d+) chunks fetched", _log(reader)).group(1))
    assert 3 + 2 <= fetched < len(chunks), _log(reader)  # ahead of the reader, within the budget


@requires_fuse
@pytest.mark.usefixtures("fuse")
@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_a_corrupted_remote_chunk_fails_that_read_with_eio_and_names_the_chunk(pushed, reader, tmp_path, remote):
    commits, files, chunks = pushed
    backend = open_backend(remote["url"])
    cat = load_catalog(backend)
    # Damage a whole chunk (a base of the second checkpoint's tensor 3) and a delta (tensor 9).
    bad_delta = chunks[10][0]
    loc = cat.objects[("c", bad_delta.digest)]
    assert loc.codec == DELTA
    bad_base = ObjectId.from_digest(cat.objects[("c", chunks[4][0].digest)].base)
    for oid in (bad_delta, bad_base):
        _flip_remote_record(remote, "c", oid)
    mnt = tmp_path / "mnt"
    cli(reader.root, "mount", "--readahead", "0", "origin/exp1", str(mnt))
    try:
        starts = np.cumsum([0] + [n for _c, n in chunks])
        for i in (10, 4):
            with pytest.raises(OSError) as exc:
                _pread_fresh(mnt / MODEL, 4096, int(starts[i]) + 8192)
            assert exc.value.errno == errno.EIO
        # Its neighbours read fine, and equal the pushed bytes.
        for i in (2, 7, 13):  # not next to a damaged chunk: the kernel reads whole pages
            off = int(starts[i])
            assert _pread_fresh(mnt / MODEL, chunks[i][1], off) == files[1][off : off + chunks[i][1]]
    finally:
        cli(reader.root, "umount", str(mnt))
    log = _log(reader)
    # Each failed read names its chunk, and what failed: the delta's own decoded bytes, and the
    # damaged base's record (with its remote pack) under the delta that needed it.
    assert re.search(rf"\(chunk 10, {bad_delta}\): remote delta chunk {bad_delta}: .*; returning EIO", log), log
    at = cat.objects[("c", bad_base.digest)]
    assert f"(chunk 4, {chunks[4][0]}): chunk {bad_base} (remote pack {at.pack}, offset {at.offset}): " in log, log


@requires_fuse
@pytest.mark.usefixtures("fuse")
@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_the_mount_serves_the_commit_it_resolved_while_the_remote_branch_moves_on(pushed, reader, tmp_path, repo, work):
    commits, files, _chunks_v2 = pushed
    mnt = tmp_path / "mnt"
    cli(reader.root, "mount", "origin/exp1", str(mnt))
    try:
        d = work / "ckpt-2"
        write_safetensors(d / MODEL, _weights(seed=9))
        newer = repo.commit(d, "exp1", "step 2").id
        repo.push("origin", ["exp1"])
        assert (mnt / MODEL).read_bytes() == files[1]
        [info] = reader.mounts()
        assert info.commit == str(commits[1]) != str(newer)
    finally:
        cli(reader.root, "umount", str(mnt))


@requires_fuse
@pytest.mark.usefixtures("fuse")
@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_with_the_branch_fetched_the_mount_reads_the_store_and_holds_a_lease(pushed, reader, tmp_path):
    commits, files, _chunks_v2 = pushed
    reader.fetch("origin", ["exp1"])
    mnt = tmp_path / "mnt"
    cli(reader.root, "mount", "origin/exp1", str(mnt))
    try:
        assert (mnt / MODEL).read_bytes() == files[1]
        with reader.store.index.read() as txn:
            assert len(list(txn.db_items("leases"))) == 1
    finally:
        cli(reader.root, "umount", str(mnt))
    assert "remote origin: 0 chunks fetched (0 ranged GETs" in _log(reader)


@requires_fuse
@pytest.mark.usefixtures("fuse")
@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_unknown_remote_missing_branch_and_unreachable_remote_fail_before_anything_is_mounted(pushed, reader, tmp_path):
    mnt = tmp_path / "mnt"
    cases = [
        (["mount", "--remote", "upstream", "exp1", str(mnt)], 3, "no remote 'upstream'"),
        (["mount", "origin/no-such-branch", str(mnt)], 3, "remote origin has no branch or tag 'no-such-branch'"),
        (["mount", "--remote", "origin", "0" * 64, str(mnt)], 3, "remote origin has no commit"),
    ]
    reader.remote_add("down", "s3://nowhere/x", endpoint_url="http://127.0.0.1:9")
    cases.append((["mount", "down/exp1", str(mnt)], 7, "cannot reach remote down"))
    for args, code, message in cases:
        proc = cli(reader.root, *args, check=False)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert not mnt.exists() and mounts_under(tmp_path) == []


@requires_fuse
@pytest.mark.usefixtures("fuse")
@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_an_unreachable_remote_whose_branch_was_fetched_names_the_local_copy_which_mounts(pushed, reader, tmp_path):
    commits, files, _chunks = pushed
    reader.fetch("origin", ["exp1"])
    data = reader.config.data
    data["remotes"]["origin"] = {"url": "s3://nowhere/x", "endpoint_url": "http://127.0.0.1:9"}
    write_config(reader.root, Config(data))
    mnt = tmp_path / "mnt"
    proc = cli(reader.root, "mount", "origin/exp1", str(mnt), check=False)
    assert proc.returncode == 7, proc.stderr
    assert "cannot reach remote origin" in proc.stderr
    assert "the copy fetched earlier mounts as refs/remotes/origin/exp1" in proc.stderr
    assert not mnt.exists()
    cli(reader.root, "mount", "refs/remotes/origin/exp1", str(mnt))
    try:
        assert (mnt / MODEL).read_bytes() == files[1]
    finally:
        cli(reader.root, "umount", str(mnt))


# -- the object source, without FUSE ---------------------------------------------------------------


class Counting:
    """A backend that counts ranged GETs (and may serve a flipped byte at one offset)."""

    def __init__(self, inner):
        self.inner = inner
        self.url = inner.url
        self.ranges: list[tuple[str, int, int]] = []
        self.flip_at: tuple[str, int] | None = None

    def get_range(self, key, offset, length):
        self.ranges.append((key, offset, length))
        data = self.inner.get_range(key, offset, length)
        if self.flip_at and self.flip_at[0] == key and offset <= self.flip_at[1] < offset + length:
            i = self.flip_at[1] - offset
            data = data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
        return data

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_the_source_downloads_one_chain_per_chunk_asked_for_and_refuses_wrong_bytes(pushed, reader, remote):
    commits, files, chunks = pushed
    backend = Counting(open_backend(remote["url"]))
    src = RemoteObjects(reader.store, backend, "origin", commits[1])
    metadata_gets = len(backend.ranges)
    cid, n = chunks[8]
    want = files[1][sum(k for _c, k in chunks[:8]) :][:n]
    assert src.get("c", cid) == want
    chain = backend.ranges[metadata_gets:]
    loc = src.location(cid)
    assert loc.codec == DELTA and len(chain) == 2  # the delta and its base, nothing else
    assert src.remote_chunks == 1 and src.gets == 2
    # A remote that serves one wrong byte of a chunk: an error naming it, never bytes.
    other, _n = chunks[12]
    at = src.location(other)
    backend.flip_at = (f"packs/{at.pack}.pack", at.offset + RECORD.size + at.enc_len - 1)
    with pytest.raises(RemoteIntegrityError, match=str(other)):
        src.get("c", other)
    src.close()


def test_remote_target_names_a_remote_only_for_a_plain_remote_slash_branch(repo, tmp_path):
    repo.remote_add("origin", (tmp_path / "r").as_uri())
    assert remote_target(repo, "origin/exp1") == ("origin", "exp1")
    assert remote_target(repo, "origin/runs/a") == ("origin", "runs/a")
    assert remote_target(repo, "other/exp1") is None
    assert remote_target(repo, "refs/remotes/origin/exp1") is None
    assert remote_target(repo, "origin/exp1@{1}") is None
    assert remote_target(repo, "exp1", "origin") == ("origin", "exp1")
    d = tmp_path / "w"
    d.mkdir()
    (d / "f").write_text("x")
    repo.commit(d, "origin/exp1", "a local branch of that name wins")
    assert remote_target(repo, "origin/exp1") is None


@requires_fuse
@pytest.mark.usefixtures("fuse")
@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_a_remote_tree_with_wrong_bytes_refuses_the_mount_before_anything_is_mounted(
    pushed, reader, tmp_path, remote, repo
):
    commits, _files, _chunks = pushed
    tree = load_commit(repo.store, commits[1]).tree
    _flip_remote_record(remote, "t", tree)
    mnt = tmp_path / "mnt"
    proc = cli(reader.root, "mount", "origin/exp1", str(mnt), check=False)
    assert proc.returncode == 5, proc.stderr
    assert str(tree) in proc.stderr
    assert not mnt.exists() and mounts_under(tmp_path) == []


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_a_delta_whose_base_the_store_has_costs_one_get_and_kept_chunks_are_then_read_locally(
    pushed, reader, remote, repo
):
    commits, files, chunks = pushed
    backend = Counting(open_backend(remote["url"]))
    i = 9
    want = files[1][sum(k for _c, k in chunks[:i]) :][: chunks[i][1]]
    delta = chunks[i][0]
    [base] = _bases(repo, {delta})
    assert base in {c for c, _n in _chunks(repo, commits[0])}  # the same tensor, one version back
    # Keep only the first version's tensor (a whole chunk) in the reader's store.
    with RemoteObjects(reader.store, backend, "origin", commits[0], keep=True) as old:
        old.get("c", base)
    assert _chunk_ids(reader) == {base}
    with RemoteObjects(reader.store, backend, "origin", commits[1], keep=True) as src:
        before = len(backend.ranges)
        assert src.get("c", delta) == want
        assert len(backend.ranges) - before == 1  # the delta only: its base was read locally
    assert _chunk_ids(reader) == {base, delta}
    assert reader.store.entry("c", delta).codec == DELTA  # kept as it travels, on its local base
    with RemoteObjects(reader.store, backend, "origin", commits[1]) as again:
        before = len(backend.ranges)
        assert again.get("c", delta) == want
        assert len(backend.ranges) == before and again.local_chunks == 1
    assert _refs(reader) == {}


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_a_remote_revision_is_its_branch_else_its_tag_else_a_full_commit_id(pushed, repo, remote):
    commits, _files, _chunks = pushed
    repo.create_tag("v0", str(commits[0]))
    repo.push("origin", ["v0"])
    backend = open_backend(remote["url"])
    assert resolve_remote("origin", backend, "exp1").commit == commits[1]
    assert resolve_remote("origin", backend, "v0").commit == commits[0]
    assert resolve_remote("origin", backend, "v0").ref == "refs/tags/v0"
    assert resolve_remote("origin", backend, str(commits[0])).commit == commits[0]
    with pytest.raises(RefNotFound, match="remote origin has no branch or tag 'v9'"):
        resolve_remote("origin", backend, "v9")


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_many_threads_reading_at_once_all_get_the_pushed_bytes(pushed, reader, remote):
    commits, files, chunks = pushed
    starts = np.cumsum([0] + [n for _c, n in chunks])
    order = [i for _ in range(3) for i in range(len(chunks))]
    random.Random(5).shuffle(order)
    backend = Counting(open_backend(remote["url"]))
    with RemoteObjects(reader.store, backend, "origin", commits[1], keep=True) as src:

        def read(i: int) -> bool:
            off = int(starts[i])
            return src.get("c", chunks[i][0]) == files[1][off : off + chunks[i][1]]

        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(read, order))
    assert {c for c, _n in chunks} <= _chunk_ids(reader)


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_a_failed_write_while_keeping_stops_keeping_and_indexes_nothing_it_cannot_read(
    pushed, reader, remote, monkeypatch, caplog, tmp_path
):
    commits, files, chunks = pushed
    starts = np.cumsum([0] + [n for _c, n in chunks])
    monkeypatch.setattr(packs, "_WRITE_BUFFER", 1024)  # as for a 16 MiB tensor: payloads go straight out
    real = packs.write_all
    calls = []

    def disk_full_once(fd, data):
        calls.append(len(data))
        if len(calls) == 3:  # mid-record
            os.write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(packs, "write_all", disk_full_once)
    backend = open_backend(remote["url"])
    with caplog.at_level(logging.INFO, logger="mstore.mount"):
        with RemoteObjects(reader.store, backend, "origin", commits[1], keep=True) as src:
            for i in range(1, 6):  # reads go on, whatever the keeping does
                off = int(starts[i])
                assert src.get("c", chunks[i][0]) == files[1][off : off + chunks[i][1]]
    monkeypatch.setattr(packs, "write_all", real)
    assert len(calls) >= 3
    kept = _chunk_ids(reader)
    for c in kept:  # everything indexed reads back
        reader.store.get("c", c)
    summary = src.summary()
    offered = 10  # five chunks, each a delta on its base
    assert f"; {len(kept)} chunks kept in the local store, {offered - len(kept)} not kept (keeping stopped: " in summary
    assert "No space left on device" in summary, summary
    assert "stopped keeping fetched chunks in the local store" in caplog.text
    # The store is whole: a fetch and a checkout afterwards work.
    reader.fetch("origin", ["exp1"])
    reader.checkout("origin/exp1", tmp_path / "out")
    assert (tmp_path / "out" / MODEL).read_bytes() == files[1]


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_keep_chunks_is_refused_for_a_store_of_an_older_format_version(pushed, remote, tmp_path):
    commits, files, chunks = pushed
    old = repo_at_version(tmp_path / "old" / ".mstore", 1)
    try:
        add_remote(old, remote)
        backend = open_backend(remote["url"])
        with pytest.raises(UserError, match="--keep-chunks needs a store of format version 3; this one is version 1"):
            RemoteObjects(old.store, backend, "origin", commits[1], keep=True)
        mnt = tmp_path / "mnt"
        proc = cli(old.root, "mount", "--keep-chunks", "origin/exp1", str(mnt), check=False)
        assert proc.returncode == 2, proc.stderr
        assert "format version 3; this one is version 1" in proc.stderr and "without --keep-chunks" in proc.stderr
        assert not mnt.exists()
        # Without keeping, such a store reads the delta-stored version, and holds none of it.
        with RemoteObjects(old.store, backend, "origin", commits[1]) as src:
            off = sum(n for _c, n in chunks[:9])
            assert src.get("c", chunks[9][0]) == files[1][off : off + chunks[9][1]]
        assert _chunk_ids(old) == set()
    finally:
        old.close()


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_metadata_read_from_the_local_store_is_held_so_a_local_gc_cannot_take_it(pushed, reader, remote, monkeypatch):
    commits, files, chunks = pushed
    reader.fetch("origin", ["exp1"])
    backend = Counting(open_backend(remote["url"]))
    with RemoteObjects(reader.store, backend, "origin", commits[1]) as src:
        assert backend.ranges == []  # every object was local

        def collected(kind, oid, *args, **kwargs):  # a gc took everything since
            raise ObjectNotFound(f"{kind} {oid} is not in the store", oid)

        monkeypatch.setattr(reader.store, "get", collected)
        tree = load_commit(src, commits[1]).tree
        fobj = load_file(src, resolve_path(src, tree, MODEL).id)
        assert list(fobj.chunks) == chunks
        assert json.loads(src.get("c", load_file(src, resolve_path(src, tree, "config.json").id).chunks[0][0])) == {
            "step": 1
        }
        assert src.fallbacks == 1  # the chunk came from the remote


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_a_remote_delta_chain_is_decoded_within_what_the_cache_reserves_for_a_load(pushed, reader, remote, repo):
    commits, files, chunks = pushed
    backend = open_backend(remote["url"])
    cat = load_catalog(backend)
    delta = chunks[9][0]
    loc = cat.objects[("c", delta.digest)]
    assert loc.codec == DELTA
    size = loc.raw_len
    # What decoding the delta takes by itself (the codec's own working memory), for comparison.
    payload = backend.get_range(f"packs/{loc.pack}.pack", loc.offset, RECORD.size + loc.enc_len)[RECORD.size :]
    base = repo.store.get("c", ObjectId.from_digest(loc.base))
    out = bytearray(size)
    tracemalloc.start()
    try:
        codecs.decode_delta_into(payload, size, base, out)
        codec_own = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del payload, base, out
    with RemoteObjects(reader.store, backend, "origin", commits[1], catalog=cat) as src:
        tracemalloc.start()
        try:
            raw = src.get("c", delta)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    off = sum(n for _c, n in chunks[:9])
    assert raw == files[1][off : off + size]
    # Three raw lengths (the mount's reservation for a load: its records and the two decode
    # buffers, the result one of them) on top of the codec's own.
    assert peak <= 3 * size + codec_own + size // 8, (peak / size, codec_own / size)


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_a_chunk_whose_remote_pack_a_remote_gc_took_fails_saying_to_mount_again(pushed, reader, remote, caplog):
    commits, files, chunks = pushed
    backend = open_backend(remote["url"])
    with RemoteObjects(reader.store, backend, "origin", commits[1]) as src:
        cid = chunks[5][0]
        loc = src.location(cid)
        pack = Path(remote["url"].removeprefix("file://")) / "packs" / f"{loc.pack}.pack"
        pack.rename(pack.with_name("moved-away"))
        with caplog.at_level(logging.ERROR, logger="mstore.mount"):
            for _ in range(2):
                with pytest.raises(StorageError, match=f"remote origin no longer has pack {loc.pack}") as exc:
                    src.get("c", cid)
                assert "unmount and mount again" in str(exc.value)
        assert caplog.text.count(f"remote origin no longer has pack {loc.pack}") == 1  # logged once
        assert "gc on the remote" in caplog.text


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_a_corrupted_remote_chunk_is_never_kept_in_the_local_store(pushed, reader, remote):
    commits, files, chunks = pushed
    backend = Counting(open_backend(remote["url"]))
    with RemoteObjects(reader.store, backend, "origin", commits[1], keep=True) as src:
        delta = chunks[10][0]
        loc = src.location(delta)
        assert loc.codec == DELTA
        whole = next(c for c, _n in chunks if src.location(c).codec != DELTA)
        good = chunks[12][0]
        for bad in (delta, whole):
            at = src.location(bad)
            backend.flip_at = (f"packs/{at.pack}.pack", at.offset + RECORD.size + at.enc_len // 2)
            with pytest.raises(RemoteIntegrityError, match=str(bad)):
                src.get("c", bad)
        backend.flip_at = None
        off = sum(n for _c, n in chunks[:12])
        assert src.get("c", good) == files[1][off : off + chunks[12][1]]
    kept = _chunk_ids(reader)
    assert delta not in kept and whole not in kept
    assert good in kept and ObjectId.from_digest(loc.base) in kept  # the verified base of the bad delta too
    for c in kept:
        reader.store.get("c", c)
