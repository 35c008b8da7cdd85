"""gc plan reads and verifies the live chunks of every pack apply would rewrite (all live chunks
with --verify-data), each pack read once: it accepts a healthy store, deltas included, and
names every live chunk whose record is damaged or does not match its index entry."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from mstore import Repo
from mstore.codecs import DELTA, delta_base
from mstore.gc import GcRefused, proofs_dir
from mstore.hashing import ObjectId
from mstore.storage.packs import RECORD
from tests.conftest import DAY, Clock
from tests.test_delta import Series, chunk_ids, codec_of


@pytest.fixture
def series(tmp_path: Path):
    """Three versions of a model on ``run`` (stored as deltas) and one deleted branch 40 days
    back, so that the plan has candidates."""
    clock = Clock()
    repo = Repo.init(tmp_path / "store", clock=clock)
    s = Series(repo, tmp_path / "work")
    for _ in range(3):
        s.step("run")
    Series(repo, tmp_path / "other", seed=1).step("old")
    repo.delete_branch("old")
    clock.now += 40 * DAY
    yield repo, s
    repo.close()


def _record(repo: Repo, cid: ObjectId) -> tuple[Path, int]:
    e = repo.store.entry("c", cid)
    path = repo.root / "packs" / repo.store.pack_name(e.pack)
    return path, e.offset


def test_plan_with_verify_data_accepts_a_healthy_store_with_delta_chunks(series):
    repo, _s = series
    delta = chunk_ids(repo, "run")[1]
    assert codec_of(repo, delta) == DELTA

    _pid, doc = repo.gc_plan(verify_data=True)

    assert doc["candidates"]["objects"] > 0


def test_plan_with_verify_data_names_a_live_base_whose_bytes_are_damaged(series):
    repo, _s = series
    delta = chunk_ids(repo, "run")[1]
    e = repo.store.entry("c", delta)
    path, offset = _record(repo, delta)
    with open(path, "rb") as f:
        f.seek(offset + RECORD.size)
        base = ObjectId.from_digest(delta_base(f.read(e.enc_len))[0])
    bpath, boffset = _record(repo, base)
    with open(bpath, "r+b") as f:
        f.seek(boffset + RECORD.size + 40)
        b = f.read(1)[0]
        f.seek(boffset + RECORD.size + 40)
        f.write(bytes([b ^ 0x08]))

    with pytest.raises(GcRefused) as exc:
        repo.gc_plan(verify_data=True)

    assert str(base) in str(exc.value)
    assert not list(proofs_dir(repo.root).glob("*.json"))


def test_plan_with_verify_data_names_a_live_chunk_whose_header_disagrees_with_the_index(series):
    repo, _s = series
    cid = chunk_ids(repo, "run")[0]
    path, offset = _record(repo, cid)
    with open(path, "r+b") as f:  # raw_len: the u64 after magic, kind, codec and reserved
        f.seek(offset + 8)
        raw_len = struct.unpack("<Q", f.read(8))[0]
        f.seek(offset + 8)
        f.write(struct.pack("<Q", raw_len + 1))

    with pytest.raises(GcRefused) as exc:
        repo.gc_plan(verify_data=True)

    assert f"chunk {cid} is damaged" in str(exc.value)
    assert "record header does not match the index" in str(exc.value)
