"""Pack writing: big payloads go straight to the file; a failed write makes the pack unusable."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

import mstore.storage.packs as packs
from mstore import Repo
from mstore.errors import IntegrityError, StorageError
from mstore.storage.packs import PackReader, PackWriter
from tests.conftest import tree_bytes, write_safetensors


def _fail_writes(monkeypatch, times: int = 1) -> list[int]:
    """Make the next ``times`` pack writes fail with ENOSPC; returns the sizes attempted."""
    real = packs.write_all
    attempts: list[int] = []

    def write_all(fd, data):
        attempts.append(len(data))
        if len(attempts) <= times:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(packs, "write_all", write_all)
    return attempts


def test_records_around_a_payload_of_more_than_the_write_buffer_read_back_in_order(tmp_path):
    rng = np.random.default_rng(0)
    payloads = [rng.bytes(100), rng.bytes(packs._WRITE_BUFFER + 12345), rng.bytes(7), rng.bytes(3 << 20)]
    w = PackWriter(tmp_path, 1 << 30)
    offsets = [w.add("c", bytes([i]) * 32, bytes([i]) * 32, 0, len(p), p) for i, p in enumerate(payloads)]
    w.seal()

    reader = PackReader(tmp_path)
    for off, p in zip(offsets, payloads, strict=True):
        _rec, got = reader.read(w.name, off, len(p))
        assert bytes(got) == p


def test_a_record_given_in_parts_reads_back_as_their_concatenation_in_a_pack_that_scans_intact(tmp_path):
    rng = np.random.default_rng(2)
    # A header part, a part written straight out, a part small enough for the buffer.
    parts = [rng.bytes(40), rng.bytes(packs._DIRECT_MIN + 3), rng.bytes(1000)]
    w = PackWriter(tmp_path, 1 << 30)
    first = w.add("c", b"\x01" * 32, b"\x01" * 32, 0, 7, b"abcdefg")
    split = w.add("c", b"\x02" * 32, b"\x02" * 32, 0, sum(map(len, parts)), [memoryview(p) for p in parts])
    last = w.add("c", b"\x03" * 32, b"\x03" * 32, 0, 3, b"xyz")
    w.seal()

    reader = PackReader(tmp_path)
    assert bytes(reader.read(w.name, split, sum(map(len, parts)))[1]) == b"".join(parts)
    assert bytes(reader.read(w.name, first, 7)[1]) == b"abcdefg"
    assert bytes(reader.read(w.name, last, 3)[1]) == b"xyz"
    records, intact, _size = packs.scan_pack(tmp_path / w.name)
    assert intact and [r.enc_len for r in records] == [7, sum(map(len, parts)), 3]


def _pack_of(tmp_path, payloads):
    w = PackWriter(tmp_path, 1 << 30)
    offsets = [w.add("c", bytes([i]) * 32, bytes([i]) * 32, 0, len(p), p) for i, p in enumerate(payloads)]
    w.seal()
    return w.name, offsets


def test_a_mapped_record_has_the_same_header_and_payload_as_a_read_one(tmp_path):
    rng = np.random.default_rng(1)
    # Unaligned offsets, a record inside one page and ones spanning many.
    payloads = [rng.bytes(13), rng.bytes(packs.MAP_MIN + 4097), rng.bytes(5000), rng.bytes(2 * packs.MAP_MIN)]
    name, offsets = _pack_of(tmp_path, payloads)
    reader = PackReader(tmp_path)
    for off, p in zip(offsets, payloads, strict=True):
        rec, got = reader.map_record(name, off, len(p))
        assert rec == reader.read(name, off, len(p))[0]
        assert bytes(got) == p


def test_mapping_a_record_of_a_pack_cut_short_is_refused_with_the_pack_named(tmp_path):
    name, offsets = _pack_of(tmp_path, [b"x" * 100, b"y" * (packs.MAP_MIN + 10)])
    path = tmp_path / name
    os.truncate(path, offsets[1] + 1000)  # the second record now ends past the end of the file
    reader = PackReader(tmp_path)
    with pytest.raises(IntegrityError, match=f"pack {name} is truncated"):
        reader.map_record(name, offsets[1], packs.MAP_MIN + 10)
    assert bytes(reader.map_record(name, offsets[0], 100)[1]) == b"x" * 100


def test_a_mapped_record_is_unmapped_once_its_last_view_is_dropped(tmp_path):
    name, offsets = _pack_of(tmp_path, [b"z" * (packs.MAP_MIN + 1)])
    reader = PackReader(tmp_path)

    def maps_of_pack() -> int:
        with open("/proc/self/maps") as f:
            return sum(1 for line in f if line.rstrip().endswith(name))

    _rec, view = reader.map_record(name, offsets[0], packs.MAP_MIN + 1)
    part = view[10:20]
    del view
    assert maps_of_pack() == 1  # a slice still holds the map
    assert bytes(part) == b"z" * 10
    del part
    assert maps_of_pack() == 0


def test_after_a_failed_write_a_pack_refuses_to_append_sync_or_seal(tmp_path, monkeypatch):
    w = PackWriter(tmp_path, 1 << 30)
    _fail_writes(monkeypatch)
    big = b"x" * (packs._WRITE_BUFFER + 1)
    with pytest.raises(StorageError, match="No space left"):
        w.add("c", b"a" * 32, b"a" * 32, 0, len(big), big)

    for attempt in (
        lambda: w.add("c", b"b" * 32, b"b" * 32, 0, 3, b"abc"),
        w.sync,
        w.seal,
    ):
        with pytest.raises(StorageError, match="unusable after an earlier write error"):
            attempt()
    w.abandon()


def test_a_commit_whose_pack_write_fails_stores_nothing_and_moves_no_ref(repo, work, tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    write_safetensors(work / "v0" / "model.safetensors", {"w": rng.standard_normal((1024, 1024)).astype(np.float32)})
    first = repo.commit(work / "v0", "exp", "v0").id
    big = rng.integers(0, 1 << 32, (1536, 1024), dtype=np.uint32).view(np.float32)  # 6 MiB, incompressible
    write_safetensors(work / "v1" / "model.safetensors", {"w": big})
    keys = {(k, str(o)) for k, o, _e in repo.store.iter_entries()}
    _fail_writes(monkeypatch)

    with pytest.raises(StorageError):
        repo.commit(work / "v1", "exp", "v1", allow_regression=True)

    monkeypatch.undo()
    assert repo.resolve("exp") == first
    assert {(k, str(o)) for k, o, _e in repo.store.iter_entries()} == keys
    assert repo.fsck().ok
    repo.checkout("exp", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(work / "v0")


def test_an_incompressible_tensor_above_the_write_buffer_commits_and_checks_out_bit_exact(tmp_path):
    repo = Repo.init(tmp_path / "store")
    big = np.random.default_rng(2).integers(0, 1 << 32, (1536, 1024), dtype=np.uint32).view(np.float32)
    write_safetensors(tmp_path / "v" / "model.safetensors", {"w": big})
    repo.commit(tmp_path / "v", "exp", "big")
    assert repo.fsck().ok
    repo.checkout("exp", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "v")
    repo.close()


def test_a_pack_writer_asks_for_writeback_of_each_8_mib_as_it_goes_and_the_bytes_stay_intact(tmp_path, monkeypatch):
    asked: list[tuple[int, int]] = []
    real = packs.start_writeback
    monkeypatch.setattr(packs, "start_writeback", lambda fd, off, n: (asked.append((off, n)), real(fd, off, n)))
    step = packs._WRITEBACK_STEP
    payloads = [os.urandom(step // 2 + 1000) for _ in range(5)]  # ~2.5 steps, some records buffered
    name, offsets = _pack_of(tmp_path, payloads)
    assert len(asked) >= 2
    assert asked[0][0] == 0 and all(n >= step for _o, n in asked)
    assert all(a[0] + a[1] == b[0] for a, b in zip(asked, asked[1:], strict=False))  # contiguous, once each
    reader = PackReader(tmp_path)
    for off, p in zip(offsets, payloads, strict=True):
        assert bytes(reader.read(name, off, len(p))[1]) == p


def test_starting_writeback_on_what_has_no_pages_to_write_is_silently_refused(tmp_path):
    from mstore.fsutil import start_writeback

    r, w = os.pipe()
    try:
        start_writeback(w, 0, 10)  # sync_file_range refuses a pipe (ESPIPE): no exception
    finally:
        os.close(r)
        os.close(w)
