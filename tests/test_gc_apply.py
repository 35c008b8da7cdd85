"""gc apply rewrites packs from the index rows it verified, reading each record where the index
says it is: a record that is not there, or a live record that no longer matches its id or its
index entry, makes apply refuse and change nothing (never carry damage into a new pack, never
drop an object silently)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from mstore.gc import GcRefused
from mstore.hashing import ObjectId
from mstore.storage.packs import RECORD
from tests.test_gc import Store, objects_of, random_files, store_state


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / ".mstore", tmp_path / "work")
    yield s
    s.repo.close()


def _shared_pack_store(store: Store) -> tuple[str, str]:
    """``old`` (deleted 40 days ago) and ``keep`` share a file whose chunks live in old's pack,
    so apply must copy those live chunks out of that pack. Returns (proof id, a live chunk)."""
    shared = random_files(11, n=1)
    store.commit("old", {**shared, "gone.bin": random_files(12, n=1)["part0.bin"]})
    store.commit("keep", shared)
    store.repo.delete_branch("old")
    store.clock.advance(days=40)
    pid, doc = store.repo.gc_plan()
    assert doc["candidates"]["objects"] > 0
    live = sorted(c for k, c in objects_of(store.repo, store.repo.head("keep")) if k == "c")
    cand_packs = {store.repo.store.entry(o[0], ObjectId(o[1])).pack for g in doc["groups"] for o in g["objects"]}
    shared_live = [c for c in live if store.repo.store.entry("c", ObjectId(c)).pack in cand_packs]
    assert shared_live, "the workload must put a live chunk in a pack apply rewrites"
    return pid, shared_live[0]


def _pack_path(store: Store, kind: str, oid: str) -> tuple[Path, int, int]:
    e = store.repo.store.entry(kind, ObjectId(oid))
    return store.repo.root / "packs" / store.repo.store.pack_name(e.pack), e.offset, e.enc_len


def _as_old(store: Store, path: Path) -> None:
    """Date an edited pack back to the build (an unsealed pack written recently is one another
    process may still be appending to, which apply never rewrites)."""
    when = store.clock.now - 40 * 86400
    os.utime(path, (when, when))


def test_apply_refuses_and_changes_nothing_when_a_live_record_it_must_copy_was_damaged_after_the_plan(store: Store):
    pid, chunk = _shared_pack_store(store)
    path, offset, enc_len = _pack_path(store, "c", chunk)
    with open(path, "r+b") as f:
        f.seek(offset + RECORD.size + enc_len // 2)
        b = f.read(1)[0]
        f.seek(offset + RECORD.size + enc_len // 2)
        f.write(bytes([b ^ 0x10]))
    _as_old(store, path)
    before = store_state(store.repo)

    with pytest.raises(GcRefused) as exc:
        store.repo.gc_apply(pid)

    assert f"live chunk {chunk} is damaged" in str(exc.value)
    assert store_state(store.repo) == before


def test_apply_refuses_when_a_live_record_header_disagrees_with_its_index_entry(store: Store):
    pid, chunk = _shared_pack_store(store)
    path, offset, _enc_len = _pack_path(store, "c", chunk)
    with open(path, "r+b") as f:  # raw_len is the u64 after magic, kind, codec and reserved
        f.seek(offset + 8)
        raw_len = struct.unpack("<Q", f.read(8))[0]
        f.seek(offset + 8)
        f.write(struct.pack("<Q", raw_len + 1))
    _as_old(store, path)
    before = store_state(store.repo)

    with pytest.raises(GcRefused) as exc:
        store.repo.gc_apply(pid)

    assert "record header does not match the index" in str(exc.value)
    assert store_state(store.repo) == before


def test_apply_refuses_when_a_record_the_index_points_at_is_not_in_its_pack(store: Store):
    pid, chunk = _shared_pack_store(store)
    path, offset, enc_len = _pack_path(store, "c", chunk)
    data = bytearray(path.read_bytes())
    data[offset : offset + 4] = b"XXXX"  # the record's magic: no record starts here any more
    path.write_bytes(bytes(data))
    _as_old(store, path)
    before = store_state(store.repo)

    with pytest.raises(GcRefused) as exc:
        store.repo.gc_apply(pid)

    assert "indexed objects were not found in their packs" in str(exc.value)
    assert store_state(store.repo) == before


def test_apply_copies_every_live_record_out_of_a_rewritten_pack_bit_exact(store: Store):
    pid, chunk = _shared_pack_store(store)
    expected = store.versions[str(store.repo.head("keep"))]
    old_pack, _o, _n = _pack_path(store, "c", chunk)

    store.repo.gc_apply(pid)

    assert not old_pack.exists()
    assert _pack_path(store, "c", chunk)[0] != old_pack
    assert store.check_out("keep") == expected
    assert store.repo.fsck().ok
