"""The parts of mount and run that need no FUSE: the chunk cache, the file system's operations
called directly, and a job with fake mounts."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from mstore import ObjectId
from mstore.errors import IntegrityError
from mstore.mount import ChunkCache
from mstore.run import execute, substitute


def test_the_chunk_cache_stays_within_its_byte_bound():
    blobs = {ObjectId(f"{i:064x}"): bytes([i]) * 1000 for i in range(50)}
    cache = ChunkCache(blobs.__getitem__, capacity=10_000)
    for cid in list(blobs) * 2:
        assert cache.get(cid) == blobs[cid]
        assert cache.used <= 10_000
    assert cache.used == 10_000


def test_chunks_being_loaded_count_against_the_cache_bound():
    capacity, size = 1000, 100
    seen = []
    cache = None

    def load(cid):
        seen.append((cache.used + cache.reserved, cache.loading))
        time.sleep(0.01)
        return b"x" * size

    cache = ChunkCache(load, capacity=capacity, max_loads=3)
    ids = [ObjectId(f"{i:064x}") for i in range(40)]
    threads = [threading.Thread(target=cache.get, args=(cid, size)) for cid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 40
    assert max(total for total, _ in seen) <= capacity
    assert max(loading for _, loading in seen) <= 3
    assert cache.used <= capacity


def test_concurrent_reads_of_one_chunk_load_it_once():
    calls = []
    gate = threading.Event()

    def load(cid):
        calls.append(cid)
        gate.wait(5)
        return b"x" * 100

    cache = ChunkCache(load, capacity=1 << 20)
    cid = ObjectId("ab" * 32)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(cid))) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    gate.set()
    for t in threads:
        t.join()
    assert calls == [cid] and results == [b"x" * 100] * 8


def test_a_failed_chunk_load_is_not_cached():
    state = {"bad": True}

    def load(cid):
        if state["bad"]:
            raise IntegrityError("damaged")
        return b"ok"

    cache = ChunkCache(load, capacity=1 << 20)
    cid = ObjectId("cd" * 32)
    with pytest.raises(IntegrityError):
        cache.get(cid)
    state["bad"] = False
    assert cache.get(cid) == b"ok"


def test_execute_passes_its_collaborators_exactly_what_the_job_needs(tmp_path):
    """No FUSE here: a fake mount and commit show the order of events and what is recorded."""
    events = []

    class FakeMount:
        def __init__(self, rev, mp):
            self.rev, self.mountpoint, self.commit = rev, str(mp), "c" * 64

        def __enter__(self):
            Path(self.mountpoint).mkdir()
            events.append(("mount", self.rev))
            return self

        def __exit__(self, *exc):
            events.append(("umount", self.rev))

    def commit(path, **kw):
        events.append(("commit", path.name))
        return kw

    res = execute(
        ["sh", "-c", 'mkdir -p out && echo "$1 $MSTORE_INPUT_M" > out/x', "sh", "{m}"],
        inputs={"m": "models/base"},
        output="out",
        mount=FakeMount,
        commit=commit,
        env={"PATH": os.environ.get("PATH", "")},
        cwd=tmp_path,
        mount_root=tmp_path / "mnts",
    )
    assert events == [("mount", "models/base"), ("umount", "models/base"), ("commit", "out")]
    mp = str(tmp_path / "mnts" / "m")
    assert (tmp_path / "out" / "x").read_text() == f"{mp} {mp}\n"
    assert res.commit["inputs"] == {"m": "c" * 64}
    assert res.commit["provenance"]["run"]["env"] == ["MSTORE_INPUT_M"]


def test_placeholders_replace_only_input_names():
    got = substitute(["--model={base}", "{base}/x", "{other}", "${HOME}", "{}"], {"base": "/m/b"})
    assert got == ["--model=/m/b", "/m/b/x", "{other}", "${HOME}", "{}"]


def test_a_mount_keeps_at_most_as_many_decode_buffers_as_it_allows_concurrent_loads(repo, tmp_path):
    import numpy as np

    from mstore.mount import MountFS
    from tests.conftest import write_safetensors

    rng = np.random.default_rng(3)
    tensors = {f"t{i}": rng.standard_normal(1 << 18).astype(np.float32) for i in range(12)}  # 1 MiB pieces
    path = write_safetensors(tmp_path / "src" / "model.safetensors", tensors)
    cid = repo.commit(path.parent, "m", "model").id
    fs = MountFS(repo.store, cid, readahead_bytes=0, workers=2)
    fh = fs.open("/model.safetensors", os.O_RDONLY)
    size = path.stat().st_size
    starts = list(range(0, size, 1 << 20))
    got: dict[int, bytes] = {}

    def read(start):  # a thread per MiB, as FUSE serves requests on many threads
        got[start] = fs.read("/model.safetensors", 1 << 20, start, fh)

    threads = [threading.Thread(target=read, args=(s,)) for s in starts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b"".join(got[s] for s in starts) == path.read_bytes()
    assert fs.cache.misses >= 12
    assert 1 <= len(fs._scratches) <= fs.cache.max_loads
    fs.destroy("/")
