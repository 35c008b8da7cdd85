"""Corruption is found and reported with what it affects, never returned (DESIGN promise 3).

History used throughout (branch ``exp``; tag ``good`` on the first commit)::

    c1  ckpt/model.safetensors (t0 t1 t2 t3), notes.txt
    c2  t1 changed            <- the damaged chunk is t1 as of c2
    c3  t2 changed (t1 as in c2, so c3 reaches the damaged chunk too)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np
import pytest

from mstore import IntegrityError, ObjectId, Repo
from mstore.storage.index import Entry
from mstore.storage.packs import RECORD
from tests.conftest import tree_bytes, write_safetensors

MODEL = "ckpt/model.safetensors"


@dataclass
class History:
    repo: Repo
    dirs: dict[str, Path]
    commits: dict[str, ObjectId]
    damaged_chunk: ObjectId


def _random_f32(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 1 << 32, (128, 128), dtype=np.uint32).view(np.float32)


@pytest.fixture
def history(repo: Repo, work: Path) -> History:
    rng = np.random.default_rng(7)
    tensors = {f"t{i}": _random_f32(rng) for i in range(4)}
    dirs: dict[str, Path] = {}
    commits: dict[str, ObjectId] = {}
    for name, change in (("c1", None), ("c2", "t1"), ("c3", "t2")):
        if change:
            tensors[change] = _random_f32(rng)
        d = work / name
        write_safetensors(d / MODEL, tensors)
        (d / "notes.txt").write_text(f"version {name}\n")
        dirs[name] = d
        commits[name] = repo.commit(d, "exp", name).id
        if name == "c2":
            damaged = ObjectId(blake3.blake3(tensors["t1"].tobytes()).hexdigest())
    repo.create_tag("good", commits["c1"])
    assert repo.store.has("c", damaged)
    return History(repo, dirs, commits, damaged)


def _entry(repo: Repo, kind: str, oid: ObjectId) -> Entry:
    entry = repo.store.entry(kind, oid)
    assert entry is not None
    return entry


def _pack_path(repo: Repo, entry: Entry) -> Path:
    return repo.root / "packs" / repo.store.pack_name(entry.pack)


def flip_payload_byte(repo: Repo, kind: str, oid: ObjectId) -> None:
    """Flip one byte in the middle of an object's payload, found through the index."""
    matches = [e for k, i, e in repo.store.iter_entries() if k == kind and i == oid]
    assert len(matches) == 1
    entry = matches[0]
    pos = entry.offset + RECORD.size + entry.enc_len // 2
    with open(_pack_path(repo, entry), "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x40]))


def _ids_in_pack(repo: Repo, pack: int) -> set[str]:
    return {str(oid) for _k, oid, e in repo.store.iter_entries() if e.pack == pack}


def _leftovers(dest: Path) -> list[str]:
    return [str(p.relative_to(dest)) for p in dest.rglob("*") if p.name.startswith(".mstore-")]


# -- a flipped byte in one tensor chunk ------------------------------------------------------


def test_fsck_reports_a_flipped_byte_with_the_object_its_file_and_the_commits_that_reach_it(history):
    repo, c = history.repo, history.commits
    flip_payload_byte(repo, "c", history.damaged_chunk)

    report = repo.fsck()

    assert not report.ok
    (damage,) = report.damaged
    assert damage["kind"] == "chunk"
    assert damage["id"] == history.damaged_chunk
    assert "damaged" in damage["error"]
    assert damage["files"] == [MODEL]
    reached = {d["id"]: d["refs"] for d in damage["commits"]}
    assert set(reached) == {c["c2"], c["c3"]}
    assert "exp" in reached[c["c3"]]


def test_fsck_names_the_refs_that_reach_each_affected_commit_through_history(history):
    repo, c = history.repo, history.commits
    flip_payload_byte(repo, "c", history.damaged_chunk)

    (damage,) = repo.fsck().damaged

    reached = {d["id"]: d["refs"] for d in damage["commits"]}
    # exp points at c3, whose parent is c2: both versions are reached through exp.
    assert reached == {c["c2"]: ["exp"], c["c3"]: ["exp"]}


def test_cli_fsck_exits_5_and_names_the_damaged_file_and_commits(history, cli):
    flip_payload_byte(history.repo, "c", history.damaged_chunk)

    proc = cli("fsck", check=False)

    out = proc.stdout.decode()
    assert proc.returncode == 5, out + proc.stderr.decode()
    assert MODEL in out
    assert history.damaged_chunk in out
    assert history.commits["c2"][:7] in out and history.commits["c3"][:7] in out
    assert history.commits["c1"][:7] not in out


@pytest.mark.parametrize("version", ["c2", "c3"])
def test_checkout_of_a_damaged_version_raises_integrity_error_and_never_creates_the_file(
    history, tmp_path, version
):
    repo = history.repo
    flip_payload_byte(repo, "c", history.damaged_chunk)
    dest = tmp_path / "restored"

    with pytest.raises(IntegrityError) as info:
        repo.checkout(history.commits[version], dest)

    msg = str(info.value)
    assert history.damaged_chunk in msg
    assert "damaged" in msg
    assert not (dest / MODEL).exists()
    assert _leftovers(dest) == []


def test_checkout_error_names_the_file_it_could_not_restore(history, tmp_path):
    repo = history.repo
    flip_payload_byte(repo, "c", history.damaged_chunk)

    with pytest.raises(IntegrityError) as info:
        repo.checkout(history.commits["c2"], tmp_path / "restored")

    assert "model.safetensors" in str(info.value)


def test_open_file_of_a_damaged_file_raises_integrity_error_naming_the_chunk(history):
    repo = history.repo
    flip_payload_byte(repo, "c", history.damaged_chunk)

    with pytest.raises(IntegrityError, match=history.damaged_chunk):
        with repo.open_file(history.commits["c2"], MODEL) as f:
            f.read()


def test_versions_without_the_damaged_chunk_still_check_out_bit_exact(history, tmp_path):
    repo = history.repo
    flip_payload_byte(repo, "c", history.damaged_chunk)

    repo.checkout("good", tmp_path / "c1")

    assert tree_bytes(tmp_path / "c1") == tree_bytes(history.dirs["c1"])


def test_undamaged_files_of_a_damaged_version_still_read_bit_exact(history):
    repo = history.repo
    flip_payload_byte(repo, "c", history.damaged_chunk)

    with repo.open_file(history.commits["c2"], "notes.txt") as f:
        assert f.read() == (history.dirs["c2"] / "notes.txt").read_bytes()


# -- damaged pack files ------------------------------------------------------------------------


def test_fsck_reports_a_truncated_pack(history, cli):
    repo = history.repo
    commit_entry = _entry(repo, "m", history.commits["c3"])
    pack = _pack_path(repo, commit_entry)
    in_pack = _ids_in_pack(repo, commit_entry.pack)
    os.truncate(pack, pack.stat().st_size // 2)

    report = repo.fsck()

    assert not report.ok
    damaged = {d["id"]: d["error"] for d in report.damaged}
    assert history.commits["c3"] in damaged  # the commit is the pack's last record
    assert "truncated" in damaged[history.commits["c3"]]
    assert pack.name in damaged[history.commits["c3"]]
    assert set(damaged) <= in_pack
    proc = cli("fsck", check=False)
    assert proc.returncode == 5
    assert history.commits["c3"] in proc.stdout.decode()


def test_fsck_reports_a_deleted_pack(history, cli):
    repo = history.repo
    commit_entry = _entry(repo, "m", history.commits["c3"])
    pack = _pack_path(repo, commit_entry)
    in_pack = _ids_in_pack(repo, commit_entry.pack)
    pack.unlink()

    report = repo.fsck()

    assert not report.ok
    damaged = {d["id"]: d["error"] for d in report.damaged}
    assert set(damaged) == in_pack  # every object of that pack, and nothing else
    for err in damaged.values():
        assert "missing" in err and pack.name in err
    proc = cli("fsck", check=False)
    assert proc.returncode == 5
    assert pack.name in proc.stdout.decode()


def test_fsck_reports_a_deleted_pack_even_after_this_process_has_read_from_it(history, tmp_path):
    repo = history.repo
    repo.checkout(history.commits["c3"], tmp_path / "warm")  # the pack is now open in this process
    commit_entry = _entry(repo, "m", history.commits["c3"])
    pack = _pack_path(repo, commit_entry)
    pack.unlink()

    report = repo.fsck()

    assert not report.ok
    assert history.commits["c3"] in {d["id"] for d in report.damaged}


# -- damage that checkout's fast path meets in different places --------------------------------


def _compressible_weights(work: Path, repo: Repo) -> tuple[ObjectId, ObjectId]:
    """A commit whose one tensor is stored with compressed byte planes; returns (commit, chunk)."""
    w = (np.random.default_rng(3).standard_normal((256, 256)) * 0.02).astype(np.float32)
    write_safetensors(work / "w" / "model.safetensors", {"w": w})
    cid = repo.commit(work / "w", "weights", "w").id
    chunk = ObjectId(blake3.blake3(w.tobytes()).hexdigest())
    assert repo.store.entry("c", chunk).codec in (2, 4)  # byte planes, exponent plane compressed
    return cid, chunk


def test_checkout_names_a_chunk_whose_encoding_no_longer_decodes(repo, work, tmp_path):
    commit, chunk = _compressible_weights(work, repo)
    entry = _entry(repo, "c", chunk)
    with open(_pack_path(repo, entry), "r+b") as f:  # the byte-plane header's element size
        f.seek(entry.offset + RECORD.size)
        f.write(b"\x03")

    with pytest.raises(IntegrityError) as info:
        repo.checkout(commit, tmp_path / "out")

    assert str(chunk) in str(info.value)
    assert "model.safetensors" in str(info.value)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert _leftovers(tmp_path / "out") == []


def test_checkout_names_a_chunk_whose_bytes_decode_but_are_wrong(repo, work, tmp_path):
    commit, chunk = _compressible_weights(work, repo)
    entry = _entry(repo, "c", chunk)
    payload = entry.offset + RECORD.size
    with open(_pack_path(repo, entry), "r+b") as f:
        f.seek(payload)
        item, mask = f.read(2)
        assert (item, mask & 1) == (4, 0)  # plane 0 (lowest mantissa bytes) is stored raw
        pos = payload + 2 + 4 * item + 10  # a byte inside plane 0: decodes fine, value wrong
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x01]))

    with pytest.raises(IntegrityError) as info:
        repo.checkout(commit, tmp_path / "out")

    assert str(chunk) in str(info.value)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert _leftovers(tmp_path / "out") == []


def test_a_manifest_that_misstates_a_chunk_length_fails_checkout_naming_the_chunk(repo, work, tmp_path, monkeypatch):
    # The lengths still add up to the file's size; only the split between two chunks is wrong.
    from mstore import snapshot
    from mstore.objects import FileObject

    (work / "data.jsonl").write_bytes(b"".join(b'{"id": %d, "text": "record"}\n' % i for i in range(40_000)))
    repo.commit(work, "b", "text")
    real = snapshot.load_file
    first: list = []

    def lying(store, oid):
        f = real(store, oid)
        (c0, n0), (c1, n1), *rest = f.chunks
        first[:] = [c0, n0]
        return FileObject(f.size, f.chunker, ((c0, n0 - 1), (c1, n1 + 1), *rest))

    monkeypatch.setattr(snapshot, "load_file", lying)
    with pytest.raises(IntegrityError) as info:
        repo.checkout("b", tmp_path / "out")
    c0, n0 = first
    assert f"chunk {c0} of" in str(info.value) and f"has {n0} bytes, manifest says {n0 - 1}" in str(info.value)
    assert not (tmp_path / "out" / "data.jsonl").exists()
