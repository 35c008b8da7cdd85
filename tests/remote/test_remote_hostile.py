"""What a remote serves is verified before it is taken in: wrong bytes, hostile trees,
truncated packs and oversized objects get a named error and change nothing locally."""

from __future__ import annotations

import json

import pytest

from mstore import Repo
from mstore.errors import OversizedObject, RemoteIntegrityError
from mstore.fsutil import unique_name
from mstore.hashing import hash_typed
from mstore.remote import _log_entry, ref_key
from mstore.storage.backends import open_backend
from mstore.storage.packs import FOOTER, FOOTER_MAGIC, HEADER, PACK_MAGIC, PACK_VERSION, RECORD, RECORD_MAGIC
from tests.conftest import tree_bytes
from tests.remote.conftest import add_remote, checkpoint


def _backend(remote):
    return open_backend(remote["url"], endpoint_url=remote.get("endpoint_url"))


def _pushed(repo, work, remote):
    cid = repo.commit(checkpoint(work / "ck", 1), "exp1", "one").id
    add_remote(repo, remote)
    repo.push("origin", ["exp1"])
    return cid


def _state(repo: Repo):
    """Everything fetch could change: indexed objects and refs."""
    with repo.store.index.read() as txn:
        return sorted((k, d) for k, d, _e in txn.iter_entries()), list(txn.iter_refs())


def _fetch_refused(tmp_path, remote, error, match=None, refs=None) -> Repo:
    """A fresh store fetching from ``remote`` gets ``error`` and changes nothing; returns it (open)."""
    other = Repo.init(tmp_path / "other")
    add_remote(other, remote)
    before = _state(other)
    with pytest.raises(error, match=match):
        other.fetch("origin", refs or ())
    assert _state(other) == before
    return other


def _data_pack(backend):
    for key, _size in backend.list("packs/"):
        if key.endswith(".idx"):
            doc = json.loads(backend.get(key))
            if not doc["meta"]:
                return doc
    raise AssertionError("no data pack")


def test_a_chunk_corrupted_in_the_bucket_is_detected_on_fetch_and_nothing_is_indexed(repo, work, tmp_path, remote):
    _pushed(repo, work, remote)
    backend = _backend(remote)
    doc = _data_pack(backend)
    key = f"packs/{doc['pack']}.pack"
    pack = bytearray(backend.get(key))
    biggest = max(doc["records"], key=lambda r: r[3])
    pack[biggest[2] + 88 + biggest[3] // 2] ^= 0xFF  # one flipped byte inside a payload
    backend.put(key, bytes(pack))
    other = _fetch_refused(tmp_path, remote, RemoteIntegrityError, match=biggest[1])
    assert list((other.root / "packs").iterdir()) == []  # the aborted batch left no pack behind
    other.close()


def test_a_truncated_remote_pack_is_named_and_nothing_is_indexed(repo, work, tmp_path, remote):
    _pushed(repo, work, remote)
    backend = _backend(remote)
    doc = _data_pack(backend)
    key = f"packs/{doc['pack']}.pack"
    backend.put(key, backend.get(key)[: doc["size"] // 2])
    other = _fetch_refused(tmp_path, remote, RemoteIntegrityError, match="truncated")
    other.close()


def _hand_made_pack(objects) -> tuple[str, bytes, bytes]:
    """A remote pack and its index, built byte by byte (docs/remotes.md), from ``objects``."""
    import blake3

    name = unique_name()
    buf = bytearray(HEADER.pack(PACK_MAGIC, PACK_VERSION, 0))
    records = []
    for kind, oid, raw, *encoded in objects:  # (kind, id, raw bytes[, codec, payload])
        codec, payload = encoded if encoded else (0, raw)
        records.append([kind, oid.digest.hex(), len(buf), len(payload), len(raw), codec])
        buf += RECORD.pack(RECORD_MAGIC, ord(kind), codec, 0, len(raw), len(payload), oid.digest,
                           blake3.blake3(raw).digest())
        buf += payload
    buf += FOOTER.pack(FOOTER_MAGIC, 0, len(records), blake3.blake3(buf).digest())
    index = {"v": 1, "pack": name, "size": len(buf), "meta": True, "records": records}
    return name, bytes(buf), json.dumps(index, separators=(",", ":")).encode()


def _publish(backend, objects, commit_id, branch="refs/heads/evil"):
    """Put hand-made objects on a remote the way a push would, and point a branch at them."""
    name, pack, index = _hand_made_pack(objects)
    backend.put(f"packs/{name}.pack", pack)
    backend.put(f"packs/{name}.idx", index)
    doc = {"v": 1, "ref": branch, "id": str(commit_id), "old": None, "seq": 1, "time": 0.0, "user": "x",
           "command": "push", "message": ""}
    backend.put(ref_key(branch), _log_entry(doc))


def _commit_raw(tree_id: str, message: str = "evil") -> bytes:
    d = {"author": "mallory", "inputs": {}, "kind": "other", "message": message, "meta": {}, "metrics": {},
         "params": {}, "parents": [], "provenance": {}, "stats": {}, "time": "2026-01-01T00:00:00.000000Z",
         "tree": tree_id, "v": 1}
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("name", ["..", "a/b"])
def test_a_tree_with_a_traversing_name_is_refused(repo, work, tmp_path, remote, name):
    cid = _pushed(repo, work, remote)
    real_tree = repo.get_commit(str(cid)).tree
    entry = repo.store.get("t", real_tree)
    first = json.loads(entry)["entries"][0]
    first["name"] = name
    tree_raw = json.dumps({"entries": [first], "v": 1}, sort_keys=True, separators=(",", ":")).encode()
    tree_id = hash_typed("tree", tree_raw)
    commit_raw = _commit_raw(str(tree_id))
    commit_id = hash_typed("commit", commit_raw)
    _publish(_backend(remote), [("t", tree_id, tree_raw), ("m", commit_id, commit_raw)], commit_id)
    other = _fetch_refused(tmp_path, remote, RemoteIntegrityError, match="hostile or malformed", refs=["evil"])
    other.close()


def test_an_object_served_under_another_id_is_refused(repo, work, tmp_path, remote):
    _pushed(repo, work, remote)
    raw = _commit_raw("0" * 64)
    liar = hash_typed("commit", raw + b" ")  # an id the bytes do not hash to
    _publish(_backend(remote), [("m", liar, raw)], liar)
    other = _fetch_refused(tmp_path, remote, RemoteIntegrityError, match="hash", refs=["evil"])
    other.close()


def test_an_oversized_object_is_refused_before_it_is_downloaded(repo, work, tmp_path, remote):
    _pushed(repo, work, remote)
    backend = _backend(remote)
    doc = _data_pack(backend)
    doc["records"][0][4] = 1 << 40  # claims a 1 TB chunk
    backend.put(f"packs/{doc['pack']}.idx", json.dumps(doc).encode())
    other = _fetch_refused(tmp_path, remote, OversizedObject)
    with pytest.raises(OversizedObject):  # and a lower limit of one's own is honoured too
        repo.fetch("origin", max_object=1000)
    other.close()


def test_fsck_repair_from_restores_a_corrupted_local_object_from_a_good_remote(repo, work, tmp_path, remote):
    cid = _pushed(repo, work, remote)
    # Corrupt the biggest local record in place.
    kind, oid, entry = max(repo.store.iter_entries("c"), key=lambda x: x[2].enc_len)
    pack = repo.root / "packs" / repo.store.pack_name(entry.pack)
    pack.chmod(0o644)
    with open(pack, "r+b") as f:
        f.seek(entry.offset + 88 + entry.enc_len // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    repo.store.forget_pack_names()
    assert not repo.fsck().ok
    report = repo.fsck_repair("origin")
    assert report["ok"] and [r["id"] for r in report["repaired"]] == [oid]
    repo.checkout(str(cid), tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(work / "ck")


def test_fsck_repair_from_restores_a_damaged_delta_chunk(repo, work, tmp_path, remote):
    from mstore import codecs

    add_remote(repo, remote)
    repo.commit(checkpoint(work / "a", 0), "exp1", "base")
    second = repo.commit(checkpoint(work / "b", 1, changed=3), "exp1", "moved").id
    repo.push("origin", ["exp1"])
    deltas = [(o, e) for _k, o, e in repo.store.iter_entries("c") if e.codec == codecs.DELTA]
    assert deltas, "the second checkpoint should store moved tensors as deltas"
    oid, entry = deltas[0]
    pack = repo.root / "packs" / repo.store.pack_name(entry.pack)
    pack.chmod(0o644)
    with open(pack, "r+b") as f:
        f.seek(entry.offset + 88 + entry.enc_len - 5)
        f.write(b"\xde\xad\xbe\xef\x00")
    repo.store.forget_pack_names()
    assert not repo.fsck().ok
    report = repo.fsck_repair("origin")
    assert report["ok"] and oid in [r["id"] for r in report["repaired"]]
    repo.checkout(str(second), tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(work / "b")


def _one_chunk_file_remote(repo, work, remote, claimed: int):
    """A remote serving a real 110-byte chunk X and a manifest with id X that claims ``claimed``
    bytes in one chunk X, with a tree and a commit naming it (branch ``evil``)."""
    import os

    from mstore.hashing import ObjectId
    from mstore.objects import FileObject

    cid = _pushed(repo, work, remote)
    tree = json.loads(repo.store.get("t", repo.get_commit(str(cid)).tree))
    real = next(e for e in tree["entries"] if e["kind"] == "file")
    chunker = FileObject.parse(repo.store.get("f", ObjectId(real["id"]))).chunker
    content = os.urandom(110)
    import blake3

    x = ObjectId.from_digest(blake3.blake3(content).digest())
    manifest = FileObject(claimed, chunker, ((x, claimed),)).to_bytes()
    entry = dict(real, name="weights.bin", id=str(x), size=claimed)
    tree_raw = json.dumps({"entries": [entry], "v": 1}, sort_keys=True, separators=(",", ":")).encode()
    tree_id = hash_typed("tree", tree_raw)
    commit_raw = _commit_raw(str(tree_id))
    commit_id = hash_typed("commit", commit_raw)
    _publish(_backend(remote), [("c", x, content), ("f", x, manifest), ("t", tree_id, tree_raw),
                                ("m", commit_id, commit_raw)], commit_id)
    return x, content


def test_a_one_chunk_manifest_claiming_another_size_than_its_chunk_is_refused(repo, work, tmp_path, remote):
    x, content = _one_chunk_file_remote(repo, work, remote, claimed=115)
    # Nothing indexed, no tracking ref:
    other = _fetch_refused(tmp_path, remote, RemoteIntegrityError, match=f"manifest {x}.*115.*110 bytes", refs=["evil"])
    # The user's own identical file gets a manifest of its true size.
    (work / "mine").mkdir()
    (work / "mine" / "weights.bin").write_bytes(content)
    other.commit(work / "mine", "main", "mine")
    from mstore.objects import load_file

    assert load_file(other.store, x).size == 110
    other.close()


def test_a_one_chunk_manifest_checked_from_the_store_needs_its_chunks_size(repo, work, tmp_path):
    """The after-the-flush check of a file's content takes the same care as the streaming one."""
    from mstore.hashing import ObjectId
    from mstore.objects import FileObject
    from mstore.remote import Received, _verify_file_content

    (work / "one").mkdir()
    (work / "one" / "w.bin").write_bytes(b"w" * 110)
    repo.commit(work / "one", "main", "one")
    fid = next(o for _k, o, _e in repo.store.iter_entries("f"))
    fobj = FileObject.parse(repo.store.get("f", fid))
    assert fobj.chunks[0][0] == fid and fobj.size == 110
    lying = FileObject(115, fobj.chunker, ((ObjectId(str(fid)), 115),)).to_bytes()
    r = Received("f", fid, b"", 0, len(lying), lying, lying)
    with pytest.raises(RemoteIntegrityError, match="115"):
        _verify_file_content(repo.store, r)
    _verify_file_content(repo.store, Received("f", fid, b"", 0, 0, b"", repo.store.get("f", fid)))


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_a_version_1_store_refuses_a_commit_record_in_a_newer_encoding_and_indexes_nothing(tmp_path, remote):
    """The encoding check covers metadata records too, not only chunks."""
    from mstore import codecs
    from mstore.errors import UnsupportedFormat
    from tests.conftest import repo_at_version

    tree_raw = json.dumps({"entries": [], "v": 1}, sort_keys=True, separators=(",", ":")).encode()
    tree_id = hash_typed("tree", tree_raw)
    message = "e" * 400
    while len(_commit_raw(str(tree_id), message)) % 4:
        message += "e"
    commit_raw = _commit_raw(str(tree_id), message)
    commit_id = hash_typed("commit", commit_raw)
    payload = codecs._encode_planes(commit_raw, 4, -1.0, rotate=True)
    assert codecs.decode(codecs.FLOATPLANE, payload, len(commit_raw)) == commit_raw
    backend = _backend(remote)
    from mstore.remote import check_layout

    check_layout(backend, create=True)
    _publish(backend, [("t", tree_id, tree_raw), ("m", commit_id, commit_raw, codecs.FLOATPLANE, payload)],
             commit_id)
    old = repo_at_version(tmp_path / "old", 1)
    add_remote(old, remote)
    before = _state(old)
    with pytest.raises(UnsupportedFormat, match=f"commit {commit_id} is a floatplane record"):
        old.fetch("origin")
    assert _state(old) == before
    old.close()


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_repair_of_a_version_1_store_refuses_a_copy_in_a_newer_encoding(tmp_path, remote):
    from mstore import codecs
    from mstore.errors import UnsupportedFormat
    from tests.conftest import repo_at_version

    src = Repo.init(tmp_path / "src")
    add_remote(src, remote)
    src.commit(checkpoint(tmp_path / "ck", 1), "exp1", "one")
    src.push("origin", ["exp1"])
    planes = {o for _k, o, e in src.store.iter_entries("c") if e.codec == codecs.FLOATPLANE}
    old = repo_at_version(tmp_path / "old", 1)
    old.commit(tmp_path / "ck", "exp1", "one")
    add_remote(old, remote)
    mine = [(o, e) for _k, o, e in old.store.iter_entries("c") if o in planes]
    assert mine, "the remote should hold some of the old store's chunks byte-plane encoded"
    oid, entry = mine[0]
    pack = old.root / "packs" / old.store.pack_name(entry.pack)
    pack.chmod(0o644)
    with open(pack, "r+b") as f:
        f.seek(entry.offset + 88 + entry.enc_len // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    old.store.forget_pack_names()
    before = _state(old)
    packs_before = sorted(p.name for p in (old.root / "packs").iterdir())
    with pytest.raises(UnsupportedFormat, match="floatplane"):
        old.fsck_repair("origin")
    assert _state(old) == before
    assert sorted(p.name for p in (old.root / "packs").iterdir()) == packs_before
    old.close()
    src.close()


def _flip_stored_chunk(repo: Repo, cid) -> None:
    """Flip one payload byte of a chunk in the local store's pack (local damage)."""
    from mstore.storage.packs import RECORD

    entry = repo.store.entry("c", cid)
    path = repo.store.packs_dir / repo.store.pack_name(entry.pack)
    with open(path, "r+b") as f:
        f.seek(entry.offset + RECORD.size + entry.enc_len // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))


def _series_pushed_with_a_delta(repo, work, remote):
    """Two versions pushed; the second stores a moved tensor as a delta against the first's.

    Returns the delta base's id and another whole chunk's (neither a delta nor its base).
    """
    from mstore.codecs import DELTA, delta_base
    from mstore.hashing import ObjectId

    repo.commit(checkpoint(work / "v0", 0), "exp1", "v0")
    repo.commit(checkpoint(work / "v1", 1), "exp1", "v1")
    add_remote(repo, remote)
    repo.push("origin", ["exp1"])
    with repo.store.index.read() as txn:
        chunks = [(ObjectId.from_digest(d), e) for _k, d, e in txn.iter_entries("c")]
    bases = set()
    for _oid, entry in chunks:
        if entry.codec == DELTA:
            _rec, payload = repo.store.reader.read(repo.store.pack_name(entry.pack), entry.offset, entry.enc_len)
            bases.add(ObjectId.from_digest(delta_base(payload)[0]))
    assert bases, "the second version stored no delta"
    other = next(o for o, e in chunks if e.codec != DELTA and o not in bases and e.raw_len > 4096)
    return sorted(bases)[0], other


@pytest.mark.parametrize("damaged", ["base", "chunk"])  # a delta's base; a chunk of a file
def test_a_local_chunk_damaged_while_a_fetch_checks_it_is_named_as_local_damage_not_the_remotes(
    repo, work, tmp_path, remote, monkeypatch, damaged
):
    # Nothing stays in memory: deltas are checked against their bases, and files against their
    # chunks, from the store after the chunks are indexed, which is when the damage happens.
    from mstore import remote as remote_mod
    from mstore.errors import IntegrityError

    base_id, chunk_id = _series_pushed_with_a_delta(repo, work, remote)
    monkeypatch.setattr(remote_mod._FileVerifier, "BUDGET", 0)
    other = Repo.init(tmp_path / "other")
    add_remote(other, remote)
    target = base_id if damaged == "base" else chunk_id

    def damage(point):
        if point == "chunks-indexed" and other.store.entry("c", target) is not None:
            _flip_stored_chunk(other, target)

    with pytest.raises(IntegrityError) as info:
        other.fetch("origin", crash_hook=damage)
    assert not isinstance(info.value, RemoteIntegrityError), str(info.value)
    assert str(target) in str(info.value)
    with other.store.index.read() as txn:
        assert list(txn.iter_refs()) == []


@pytest.mark.parametrize("path", ["as chunks stream in", "from the store after indexing"])
def test_a_manifest_listing_genuine_chunks_in_the_wrong_order_is_refused_and_moves_no_ref(
    repo, work, tmp_path, remote, monkeypatch, path
):
    # Each chunk is genuine (it hashes to its id): only hashing the whole file against its id
    # can tell that the manifest swapped them.
    import blake3

    from mstore import remote as remote_mod
    from mstore.hashing import ObjectId
    from mstore.objects import FILE_KIND, FileObject, Tree, TreeEntry

    _pushed(repo, work, remote)  # a remote in use
    if path == "from the store after indexing":
        monkeypatch.setattr(remote_mod._FileVerifier, "BUDGET", 0)  # nothing kept in memory
    else:  # the streaming check must be what refuses it, not the one after indexing
        monkeypatch.setattr(remote_mod, "_verify_file_content", lambda *a: pytest.fail("checked after indexing"))
    a, b = b"A" * 5000 + bytes(range(256)), b"B" * 5000 + bytes(range(256))
    ca, cb = ObjectId.from_digest(blake3.blake3(a).digest()), ObjectId.from_digest(blake3.blake3(b).digest())
    fid = ObjectId.from_digest(blake3.blake3(a + b).digest())  # the id of the real content a + b
    manifest = FileObject(len(a + b), "cdc", ((cb, len(b)), (ca, len(a)))).to_bytes()  # ... listed as b + a
    tree_raw = Tree((TreeEntry("weights.bin", FILE_KIND, 0o644, fid, len(a + b)),)).to_bytes()
    tree_id = hash_typed("tree", tree_raw)
    commit_raw = _commit_raw(str(tree_id))
    commit_id = hash_typed("commit", commit_raw)
    _publish(_backend(remote), [("c", ca, a), ("c", cb, b), ("f", fid, manifest), ("t", tree_id, tree_raw),
                                ("m", commit_id, commit_raw)], commit_id)
    other = Repo.init(tmp_path / "other")
    add_remote(other, remote)

    with pytest.raises(RemoteIntegrityError, match="hash to"):
        other.fetch("origin", ["evil"])
    with other.store.index.read() as txn:
        assert list(txn.iter_refs()) == []
        assert txn.get_entry("f", fid.digest) is None  # the manifest itself is never indexed
    other.close()
