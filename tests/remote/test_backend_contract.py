"""ONE contract suite, run against every backend: memory, a local directory and real S3."""

from __future__ import annotations

import threading

import pytest

from mstore.errors import InvalidName
from mstore.storage.backends import Backend, BackendNotFound, MemoryBackend, open_backend
from mstore.storage.backends.local import LocalBackend


@pytest.fixture(params=["memory", "file", "s3"])
def backend(request, tmp_path) -> Backend:
    if request.param == "memory":
        b = MemoryBackend()
    elif request.param == "file":
        b = LocalBackend(tmp_path / "remote")
    else:
        s3 = request.getfixturevalue("s3")
        bucket = request.getfixturevalue("bucket")
        b = open_backend(f"s3://{bucket}/some/prefix", endpoint_url=s3.endpoint)
    yield b
    b.close()


def test_put_then_get_returns_the_same_bytes(backend):
    backend.put("packs/a.pack", b"hello" * 100)
    assert backend.get("packs/a.pack") == b"hello" * 100
    assert backend.stat("packs/a.pack") == 500


def test_get_of_a_missing_key_raises_not_found(backend):
    with pytest.raises(BackendNotFound):
        backend.get("packs/missing.pack")
    with pytest.raises(BackendNotFound):
        backend.get_range("packs/missing.pack", 0, 10)
    assert backend.stat("packs/missing.pack") is None


def test_get_range_returns_the_slice_and_stops_at_the_end(backend):
    backend.put("k", bytes(range(256)))
    assert backend.get_range("k", 10, 5) == bytes(range(10, 15))
    assert backend.get_range("k", 250, 100) == bytes(range(250, 256))


def test_list_is_sorted_scoped_to_the_prefix_and_gives_sizes(backend):
    for key in ("packs/b.pack", "packs/a.idx", "refs/heads/x.ref", "packs/sub/c"):
        backend.put(key, b"12345")
    assert list(backend.list("packs/")) == [("packs/a.idx", 5), ("packs/b.pack", 5), ("packs/sub/c", 5)]
    assert [k for k, _ in backend.list()] == ["packs/a.idx", "packs/b.pack", "packs/sub/c", "refs/heads/x.ref"]
    assert list(backend.list("logs/")) == []


def test_put_replaces_and_delete_removes(backend):
    backend.put("k", b"one")
    backend.put("k", b"two")
    assert backend.get("k") == b"two"
    backend.delete("k")
    backend.delete("k")  # already gone: no error
    assert backend.stat("k") is None


def test_big_objects_round_trip_through_files(backend, tmp_path):
    data = bytes(range(256)) * (80 << 10)  # 20 MiB: above the S3 multipart threshold
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    backend.put_file("packs/big.pack", src)
    backend.put("packs/big2.pack", data)
    dest = tmp_path / "back.bin"
    backend.get_file("packs/big.pack", dest)
    assert dest.read_bytes() == data
    assert backend.get("packs/big2.pack") == data


def test_put_if_absent_creates_only_once(backend):
    assert backend.put_if_absent("logs/r/1", b"first") is True
    assert backend.put_if_absent("logs/r/1", b"second") is False
    assert backend.get("logs/r/1") == b"first"


def test_compare_and_swap_moves_only_from_the_version_it_saw(backend):
    assert backend.read_versioned("refs/heads/main.ref") is None
    assert backend.put_if_version("refs/heads/main.ref", b"v1", None) is True
    assert backend.put_if_version("refs/heads/main.ref", b"again", None) is False  # exists now
    data, version = backend.read_versioned("refs/heads/main.ref")
    assert data == b"v1"
    assert backend.put_if_version("refs/heads/main.ref", b"v2", version) is True
    assert backend.put_if_version("refs/heads/main.ref", b"v3", version) is False  # stale version
    assert backend.get("refs/heads/main.ref") == b"v2"


def test_of_many_racing_swaps_from_one_version_exactly_one_wins(backend):
    backend.put_if_version("refs/heads/race.ref", b"start", None)
    _data, version = backend.read_versioned("refs/heads/race.ref")
    wins = []
    barrier = threading.Barrier(6)

    def racer(i: int) -> None:
        barrier.wait()
        if backend.put_if_version("refs/heads/race.ref", f"writer {i}".encode(), version):
            wins.append(i)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert backend.get("refs/heads/race.ref") == f"writer {wins[0]}".encode()


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "../up", "a/../b", "a/.hidden", "x.lock", "sp ace", "a/"])
def test_invalid_keys_are_refused(backend, key):
    with pytest.raises(InvalidName):
        backend.put(key, b"x")
    with pytest.raises(InvalidName):
        backend.get(key)


def test_unknown_url_schemes_are_refused():
    with pytest.raises(InvalidName):
        open_backend("ftp://host/x")
    with pytest.raises(InvalidName):
        open_backend("file://relative/path")
