"""push / fetch / clone / pull against a second directory and a real S3 server (same behaviour)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mstore import Repo
from mstore.errors import (
    Diverged,
    FormatError,
    MstoreError,
    PushRejected,
    RemoteIntegrityError,
    RemoteNotFound,
    UnsupportedFormat,
)
from mstore.format import LEGACY_CHUNKING, NEW_CHUNKING, read_config
from mstore.objects import load_file
from mstore.storage.backends import open_backend
from tests.conftest import repo_with_chunking, tree_bytes, write_safetensors
from tests.remote.conftest import add_remote, checkpoint


def _series(repo: Repo, work, steps, branch="exp1"):
    ids = {}
    for step in steps:
        d = checkpoint(work / f"ck{step}", step)
        ids[step] = repo.commit(d, branch, f"step {step}", kind="checkpoint").id
    return ids


def test_push_then_clone_gives_every_version_bit_exact_and_a_second_push_sends_nothing(
    repo, work, tmp_path, remote
):
    ids = _series(repo, work, [0, 1, 2, 3])
    add_remote(repo, remote)
    first = repo.push("origin", ["exp1"])
    assert first.refs[0].status == "ok" and first.objects > 0 and first.bytes > 0
    again = repo.push("origin", ["exp1"])
    assert again.objects == 0 and again.bytes == 0 and again.refs[0].status == "up-to-date"

    clone = Repo.clone(remote["url"], tmp_path / "clone", endpoint_url=remote.get("endpoint_url"))
    assert clone.head("exp1") == ids[3]
    assert [e.id for e in clone.log("origin/exp1")] == [ids[3], ids[2], ids[1], ids[0]]
    for step, cid in ids.items():
        clone.checkout(cid, tmp_path / f"out{step}")
        assert tree_bytes(tmp_path / f"out{step}") == tree_bytes(work / f"ck{step}")
    assert clone.fsck().ok
    clone.close()


def test_an_incremental_push_sends_only_the_new_objects(repo, work, remote):
    _series(repo, work, [0])
    add_remote(repo, remote)
    repo.push("origin", ["exp1"])
    res = repo.commit(checkpoint(work / "ck1", 1), "exp1", "step 1")
    pushed = repo.push("origin", ["exp1"])
    # What crossed the wire is what the commit stored: its new objects, nothing re-sent.
    assert pushed.bytes <= res.stored_bytes * 1.05
    assert pushed.bytes >= res.stored_bytes * 0.95


def test_fetch_creates_remote_tracking_refs_that_log_reads(repo, work, tmp_path, remote):
    ids = _series(repo, work, [0, 1])
    add_remote(repo, remote)
    repo.push("origin", ["exp1"])
    other = Repo.init(tmp_path / "other")
    add_remote(other, remote)
    res = other.fetch("origin")
    assert [r.status for r in res.refs] == ["ok"]
    assert [e.id for e in other.log("origin/exp1")] == [ids[1], ids[0]]
    assert other.head("exp1") is None  # fetch moves only the tracking ref
    assert other.reflog("origin/exp1")[0]["command"] == "fetch"
    assert other.fetch("origin").objects == 0
    other.close()


def test_a_push_that_is_not_a_fast_forward_is_rejected_and_says_fetch_first(repo, work, tmp_path, remote):
    _series(repo, work, [0])
    add_remote(repo, remote)
    repo.push("origin", ["exp1"])
    other = Repo.clone(remote["url"], tmp_path / "other", endpoint_url=remote.get("endpoint_url"))
    theirs = other.commit(checkpoint(work / "theirs", 7), "exp1", "theirs").id
    other.push("origin", ["exp1"])
    repo.commit(checkpoint(work / "mine", 8), "exp1", "mine")
    with pytest.raises(PushRejected, match="fetch first"):
        repo.push("origin", ["exp1"])
    assert other.remote_refs("origin")[0]["id"] == theirs  # the winner's commit is not lost
    forced = repo.push("origin", ["exp1"], force=True)
    assert forced.refs[0].status == "ok"
    other.close()


def test_pull_fast_forwards_and_refuses_a_diverged_branch(repo, work, tmp_path, remote):
    ids = _series(repo, work, [0])
    add_remote(repo, remote)
    repo.push("origin", ["exp1"])
    other = Repo.clone(remote["url"], tmp_path / "other", endpoint_url=remote.get("endpoint_url"))
    new = other.commit(checkpoint(work / "n", 3), "exp1", "next").id
    other.push("origin", ["exp1"])
    _res, change = repo.pull("origin", "exp1")
    assert (change.old, change.new) == (ids[0], new) and repo.head("exp1") == new
    repo.commit(checkpoint(work / "a", 4), "exp1", "local")
    other.commit(checkpoint(work / "b", 5), "exp1", "remote")
    other.push("origin", ["exp1"])
    before = repo.head("exp1")
    with pytest.raises(Diverged):
        repo.pull("origin", "exp1")
    assert repo.head("exp1") == before
    other.close()


def test_remote_tags_never_move(repo, work, remote):
    ids = _series(repo, work, [0, 1])
    repo.create_tag("v1", str(ids[0]))
    add_remote(repo, remote)
    repo.push("origin", ["v1", "exp1"])
    repo.delete_tag("v1", force_protected=True, confirm="v1")
    repo.create_tag("v1", str(ids[1]))
    with pytest.raises(PushRejected, match="tags never move"):
        repo.push("origin", ["v1"], force=True)
    assert {r["ref"]: r["id"] for r in repo.remote_refs("origin")}["v1"] == ids[0]


def test_every_remote_ref_change_is_in_the_remote_reflog(repo, work, remote):
    add_remote(repo, remote)
    pushed = []
    for step in range(3):
        pushed.append(repo.commit(checkpoint(work / f"c{step}", step), "exp1", f"s{step}").id)
        repo.push("origin", ["exp1"])
    log = repo.remote_reflog("origin", "exp1")
    assert [e["seq"] for e in log] == [1, 2, 3]
    assert [e["id"] for e in log] == pushed
    assert [e["old"] for e in log] == [None, *pushed[:2]]


def test_push_of_all_branches_and_local_to_remote_names(repo, work, remote):
    _series(repo, work, [0], branch="a")
    _series(repo, work, [1], branch="b")
    add_remote(repo, remote)
    repo.push("origin", all_branches=True)
    repo.push("origin", ["a:renamed"])
    assert sorted(r["ref"] for r in repo.remote_refs("origin")) == ["a", "b", "renamed"]


def test_remote_config_is_validated_and_unknown_remotes_are_named(repo, remote):
    add_remote(repo, remote)
    with pytest.raises(RemoteNotFound, match="origin"):
        repo.fetch("nope")
    reopened = Repo.open(repo.root)
    assert reopened.remotes()["origin"]["url"] == remote["url"]
    reopened.close()


def test_s3_errors_never_show_the_secret_key(repo, work, s3, bucket, monkeypatch):
    _series(repo, work, [0])
    repo.remote_add("origin", f"s3://{bucket}/x", endpoint_url=s3.endpoint)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-" + "z" * 20)
    with pytest.raises(Exception) as info:
        repo.push("origin", ["exp1"])
    text = str(info.value) + repr(info.value)
    assert "SignatureDoesNotMatch" in text or "AccessDenied" in text or "403" in text
    assert "wrong-secret" not in text and s3.secret_key not in text and "Authorization" not in text


def test_remote_lacks_answers_from_the_pack_indexes(repo, work, remote):
    ids = _series(repo, work, [0])
    add_remote(repo, remote)
    keys = [("m", ids[0].digest), ("c", b"\x01" * 32)]
    assert repo.remote_lacks("origin", keys) == set(keys)
    repo.push("origin", ["exp1"])
    assert repo.remote_lacks("origin", keys) == {("c", b"\x01" * 32)}
    backend = open_backend(remote["url"], endpoint_url=remote.get("endpoint_url"))
    idx = [k for k, _ in backend.list("packs/") if k.endswith(".idx")]
    assert idx and all(json.loads(backend.get(k))["v"] == 1 for k in idx)


def test_fetched_versions_are_gc_roots_through_their_tracking_refs(repo, work, tmp_path, remote):
    _series(repo, work, [0, 1])
    add_remote(repo, remote)
    repo.push("origin", ["exp1"])
    other = Repo.init(tmp_path / "other", clock=lambda: 4_000_000_000.0)  # far in the future
    add_remote(other, remote)
    other.fetch("origin")
    assert other.branches() == []  # nothing but refs/remotes/origin/exp1 points at them
    _pid, proof = other.gc_plan(retention_days=0, grace_days=0)
    assert proof["candidates"]["objects"] == 0
    assert "refs/remotes/origin/exp1" in proof["roots"]["refs"]
    other.close()


def test_objects_only_in_a_truncated_remote_pack_count_as_lacking(repo, work, remote):
    ids = _series(repo, work, [0])
    add_remote(repo, remote)
    repo.push("origin", ["exp1"])
    backend = open_backend(remote["url"], endpoint_url=remote.get("endpoint_url"))
    for key, size in backend.list("packs/"):
        if key.endswith(".pack"):
            backend.put(key, backend.get(key)[: size - 1])
    assert repo.remote_lacks("origin", [("m", ids[0].digest)]) == {("m", ids[0].digest)}


def test_packs_larger_than_a_multipart_part_round_trip_from_the_push_buffer(repo, work, tmp_path, remote):
    # Four 4 MiB tensors: one 16 MiB data pack, uploaded in parts straight from the buffer the
    # push read the local records into.
    d = checkpoint(work / "big", 1, changed=4, n=4, shape=(1024, 1024))
    cid = repo.commit(d, "exp1", "big").id
    add_remote(repo, remote)
    from mstore.storage.backends.s3 import PART_SIZE

    repo.push("origin", ["exp1"])
    backend = open_backend(remote["url"], endpoint_url=remote.get("endpoint_url"))
    sizes = [size for key, size in backend.list("packs/") if key.endswith(".pack")]
    assert max(sizes) > PART_SIZE  # on S3: more than one part
    clone = Repo.clone(remote["url"], tmp_path / "clone", endpoint_url=remote.get("endpoint_url"))
    clone.checkout(cid, tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(d)
    clone.close()


def test_packs_built_in_the_buffer_of_an_uploaded_pack_carry_none_of_its_bytes(
    repo, work, tmp_path, remote, monkeypatch
):
    from mstore import remote as remote_mod

    reused = []
    init = remote_mod._LocalPackBuilder.__init__

    def spy(self, meta, capacity, mem=None):
        init(self, meta, capacity, mem)
        reused.append(mem is not None and self.mem is mem)

    monkeypatch.setattr(remote_mod._LocalPackBuilder, "__init__", spy)
    dirs = [checkpoint(work / f"ck{i}", i, changed=3, n=6, shape=(256, 256)) for i in range(3)]
    ids = [repo.commit(d, "exp1", f"v{i}").id for i, d in enumerate(dirs)]
    add_remote(repo, remote)
    repo.push("origin", ["exp1"], pack_target=300 << 10)  # a pack per record or two, sizes varying
    assert sum(reused) >= 2  # later packs were built in earlier packs' buffers
    clone = Repo.clone(remote["url"], tmp_path / "clone", endpoint_url=remote.get("endpoint_url"))
    for i, cid in enumerate(ids):
        clone.checkout(cid, tmp_path / f"out{i}")
        assert tree_bytes(tmp_path / f"out{i}") == tree_bytes(dirs[i])
    assert clone.fsck().ok
    clone.close()


def test_a_push_meeting_a_remote_gc_lock_is_busy_and_sends_nothing(repo, work, remote):
    from mstore.errors import RemoteBusy
    from mstore.remote_lock import gc_lock, list_locks

    _series(repo, work, [0])
    add_remote(repo, remote)
    repo.push("origin", ["exp1"])
    repo.commit(checkpoint(work / "ck1", 1), "exp1", "step 1")
    backend = open_backend(remote["url"], endpoint_url=remote.get("endpoint_url"))
    try:
        with gc_lock(backend, "gc-user"):
            before = sorted(k for k, _s in backend.list("packs/"))
            with pytest.raises(RemoteBusy):
                repo.push("origin", ["exp1"])
            assert sorted(k for k, _s in backend.list("packs/")) == before
            assert [lk.op for lk in list_locks(backend)] == ["gc"]  # the push left no lock behind
        assert repo.push("origin", ["exp1"]).refs[0].status == "ok"
        assert list_locks(backend) == []
    finally:
        backend.close()


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_a_version_2_store_refuses_to_fetch_a_low_rank_delta_and_indexes_nothing(tmp_path, remote):
    from mstore.errors import UnsupportedFormat
    from tests.conftest import repo_at_version
    from tests.test_lowrank import _commit_base_then_merged

    src = Repo.init(tmp_path / "src")
    add_remote(src, remote)
    _commit_base_then_merged(src, tmp_path / "work")
    src.push("origin", ["lora"])
    old = repo_at_version(tmp_path / "old", 2)
    add_remote(old, remote)

    with pytest.raises(UnsupportedFormat, match="low-rank delta"):
        old.fetch("origin")

    assert list(old.store.iter_entries()) == []  # no chunk, tree, manifest or commit
    with pytest.raises(MstoreError):
        old.resolve("refs/remotes/origin/lora")
    old.close()
    src.close()


def test_a_remote_reflog_entry_that_is_listed_but_unreadable_is_an_integrity_error(tmp_path, monkeypatch):
    from mstore import remote as rm
    from mstore.errors import RemoteIntegrityError
    from mstore.storage.backends.base import BackendNotFound

    src = Repo.init(tmp_path / "src")
    settings = {"url": (tmp_path / "remote-disk").as_uri()}
    add_remote(src, settings)
    src.commit(checkpoint(tmp_path / "c0", 0), "exp", "v0")
    src.push("origin", ["exp"])
    backend = open_backend(settings["url"])
    listed = [k for k, _s in backend.list("logs/")]
    assert listed
    real_get = backend.get

    def get(key):
        if key == listed[0]:
            raise BackendNotFound(key)
        return real_get(key)

    monkeypatch.setattr(backend, "get", get)

    with pytest.raises(RemoteIntegrityError, match="listed but cannot be read"):
        rm.remote_reflog(backend, "refs/heads/exp")
    src.close()


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_push_verifies_the_delta_bytes_it_sends_not_a_second_read(repo, work, remote, monkeypatch):
    """A delta payload that goes bad on its way into the outgoing pack is caught, not sent."""
    from mstore import codecs
    from mstore.errors import IntegrityError

    add_remote(repo, remote)
    repo.commit(checkpoint(work / "a", 0), "exp1", "base")
    repo.commit(checkpoint(work / "b", 1, changed=3), "exp1", "moved")
    assert any(e.codec == codecs.DELTA for _k, _o, e in repo.store.iter_entries("c"))
    reader = repo.store.reader
    real = reader.read_into

    def read_into(name, offset, enc_len, buf):
        rec, payload = real(name, offset, enc_len, buf)
        if rec.codec == codecs.DELTA:  # the copy in the outgoing buffer goes bad; the pack is fine
            payload[len(payload) // 2] ^= 0xFF
        return rec, payload

    monkeypatch.setattr(reader, "read_into", read_into)
    with pytest.raises(IntegrityError, match="damaged"):
        repo.push("origin", ["exp1"])
    assert repo.remote_refs("origin") == []
    monkeypatch.undo()
    assert repo.push("origin", ["exp1"]).refs[0].status == "ok"


def test_a_range_of_small_records_decodes_to_a_bounded_size():
    from mstore import remote as rm
    from mstore.hashing import ObjectId

    def loc(i, offset, enc, raw):
        return ("c", ObjectId.from_digest(i.to_bytes(32, "big")), rm.Location("p", offset, enc, raw, 3))

    # 400 records of 4 KiB that each decode to 16 MiB (low-rank deltas), and one 100 MiB record.
    locs = [loc(i, 16 + i * 5000, 4096, 16 << 20) for i in range(400)]
    locs.append(loc(999, 16 + 400 * 5000, 4096, 100 << 20))
    ranges = rm._ranges(locs)
    assert sum(len(g) for _p, _s, _e, g in ranges) == len(locs)
    for _p, _s, _e, group in ranges:
        assert group  # at least one record each
        assert len(group) == 1 or sum(x[2].raw_len for x in group) <= 64 << 20
    assert max(len(g) for _p, _s, _e, g in ranges) == 4  # 64 MiB of 16 MiB records


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_delta_decodes_in_flight_count_against_the_fetch_budget(repo, work, tmp_path, remote, monkeypatch):
    """With no budget to spare, each delta is taken before the next is submitted for decoding."""
    from concurrent.futures import ThreadPoolExecutor

    from mstore import codecs
    from mstore import remote as rm

    add_remote(repo, remote)
    repo.commit(checkpoint(work / "a", 0), "exp1", "base")
    second = repo.commit(checkpoint(work / "b", 1, changed=4), "exp1", "moved").id
    assert sum(e.codec == codecs.DELTA for _k, _o, e in repo.store.iter_entries("c")) >= 2
    repo.push("origin", ["exp1"])

    counts = {"submitted": 0, "released": 0, "max_outstanding": 0}

    class Pool(ThreadPoolExecutor):
        def submit(self, fn, *a, **kw):
            if fn is rm.decode_delta_checked:
                outstanding = counts["submitted"] - counts["released"]
                counts["max_outstanding"] = max(counts["max_outstanding"], outstanding)
                counts["submitted"] += 1
            return super().submit(fn, *a, **kw)

    real_release = rm._FileVerifier.release

    def release(self, base_id):
        counts["released"] += 1
        return real_release(self, base_id)

    monkeypatch.setattr(rm, "ThreadPoolExecutor", Pool)
    monkeypatch.setattr(rm._FileVerifier, "release", release)
    monkeypatch.setattr(rm, "_AHEAD_BYTES", 1)
    clone = Repo.init(tmp_path / "clone")
    add_remote(clone, remote)
    clone.fetch("origin")
    assert counts["submitted"] >= 2
    assert counts["max_outstanding"] == 0
    clone.checkout(str(second), tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(work / "b")
    clone.close()


def test_a_clone_cuts_new_versions_as_the_store_that_made_the_remote(work, tmp_path, remote):
    own = {"cdc_avg_size": 32768, "tensor_max_chunk": 8 << 20, "matrix_rows": 512}  # neither new nor legacy
    with repo_with_chunking(tmp_path / "src", **own) as src:
        _series(src, work, [0])
        add_remote(src, remote)
        src.push("origin", ["exp1"])

    with Repo.clone(remote["url"], tmp_path / "clone", endpoint_url=remote.get("endpoint_url")) as clone:
        assert {k: clone.config.get("chunking", k) for k in own} == own
    assert read_config(tmp_path / "clone").data["chunking"] == own  # kept for the next open too


def test_a_clones_new_versions_are_cut_with_the_settings_it_adopted(work, tmp_path):
    # 54 rows of 1200 bytes fit 64 KiB, 100 fit in twice that: a 200-row matrix in two pieces
    # of 100 rows. With this mstore's new-store settings it would be one piece.
    finer = {"cdc_avg_size": 32768, "tensor_max_chunk": 65536, "matrix_rows": 100}
    url = (tmp_path / "remote-disk").as_uri()
    with repo_with_chunking(tmp_path / "src", **finer) as src:
        _series(src, work, [0])
        src.remote_add("origin", url)
        src.push("origin", ["exp1"])
    write_safetensors(work / "wide" / "w.safetensors", {"w": np.ones((200, 300), np.float32)})

    with Repo.clone(url, tmp_path / "clone") as clone:
        clone.commit(work / "wide", "wide", "a matrix")
        (entry,) = clone.ls("wide")
        pieces = [n for _cid, n in load_file(clone.store, entry.id).chunks][1:]
    assert pieces == [120_000, 120_000]


def _pushed_remote(work, tmp_path):
    """``(url, marker path)`` of a file remote that a new store pushed one version to."""
    url = (tmp_path / "remote-disk").as_uri()
    with Repo.init(tmp_path / "src") as src:
        _series(src, work, [0])
        src.remote_add("origin", url)
        src.push("origin", ["exp1"])
    return url, tmp_path / "remote-disk" / "mstore-remote.json"


def test_a_clone_of_a_remote_whose_marker_names_no_chunking_cuts_as_every_earlier_store(work, tmp_path):
    url, marker = _pushed_remote(work, tmp_path)
    doc = json.loads(marker.read_text())
    assert doc["chunking"] == NEW_CHUNKING
    del doc["chunking"]  # as an mstore before the chunking settings wrote it
    marker.write_text(json.dumps(doc))

    with Repo.clone(url, tmp_path / "clone") as clone:
        assert clone.config.data["chunking"] == LEGACY_CHUNKING


def _remote_with_marker_chunking(work, tmp_path, chunking) -> str:
    url, marker = _pushed_remote(work, tmp_path)
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "chunking": chunking}))
    return url


@pytest.mark.parametrize(
    "chunking",
    [
        {"tensor_max_chunk": 1},
        {"tensor_max_chunk": 1 << 40},  # pieces no fetch would take
        {"cdc_avg_size": 8 << 20},  # beyond what FastCDC accepts: every later commit would fail
        {"matrix_rows": "many"},
        {"matrix_rows": True},
        {"tensor_max_chunk": 4194304.0},
        [1, 2],
    ],
)
def test_a_clone_refuses_a_marker_with_bad_chunking_settings_and_leaves_no_directory(work, tmp_path, chunking):
    url = _remote_with_marker_chunking(work, tmp_path, chunking)

    with pytest.raises(RemoteIntegrityError, match="chunking"):
        Repo.clone(url, tmp_path / "clone")
    assert not (tmp_path / "clone").exists()


def test_a_clone_of_a_marker_with_a_chunking_setting_it_does_not_know_asks_for_an_upgrade(work, tmp_path):
    url = _remote_with_marker_chunking(work, tmp_path, {**NEW_CHUNKING, "shiny": 3})

    with pytest.raises(UnsupportedFormat, match="upgrade mstore"):
        Repo.clone(url, tmp_path / "clone")
    assert not (tmp_path / "clone").exists()


def test_a_push_that_would_record_out_of_bounds_chunking_settings_is_refused_before_writing(work, tmp_path):
    url = (tmp_path / "remote-disk").as_uri()
    with repo_with_chunking(tmp_path / "src", cdc_avg_size=65536, tensor_max_chunk=1 << 30, matrix_rows=0) as src:
        _series(src, work, [0])
        src.remote_add("origin", url)
        with pytest.raises(FormatError, match="tensor_max_chunk"):
            src.push("origin", ["exp1"])
    assert not (tmp_path / "remote-disk" / "mstore-remote.json").exists()
    assert not list((tmp_path / "remote-disk").glob("packs/*"))
