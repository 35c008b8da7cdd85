"""Garbage collection that cannot delete what anyone still needs.

Three verbs, and a proof between them (docs/gc.md):

* :func:`plan` computes the roots (refs, reflog entries inside the retention window, pins,
  unexpired leases), marks everything reachable, and writes a *proof*: a canonical JSON
  document, named by its BLAKE3 hash, listing every candidate with its size, age and what last
  referenced it, the roots, a digest of the whole refs/reflog/pins/leases state and the live
  set's size and digest. It deletes nothing. If marking meets an object it cannot read, it
  refuses to produce a proof at all: an incomplete view of what is live is never a reason to
  delete.
* :func:`verify` re-checks a proof against the store as it is now and says exactly why it is no
  longer valid, if it is not.
* :func:`apply` re-checks everything again and moves the candidates to ``trash/<proof>/``,
  rewriting the packs that held them so the space is really returned; :func:`undo` brings them
  back; :func:`purge` empties trash older than the quarantine period — the only point of no
  return.

Crash safety of apply (reverse of the write order): new packs (live records copied, candidates
copied to trash packs) are written and fsynced first; one LMDB transaction then re-checks the
state digest under the write lock, repoints live entries, moves candidate entries to the trash
table and marks the old packs retired; the old pack files are unlinked last. A crash before the
transaction leaves unregistered packs (reclaimed later); after it, retired packs that the next
gc run removes. The proof can be applied again or verified as done.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from .errors import IntegrityError, MstoreError, NotFound, Refused, UnsupportedFormat, UserError
from .fsutil import atomic_write, fsync_dir
from .hashing import ObjectId, hash_bytes, is_id_prefix
from .objects import Commit, canonical_json, manifest_chunk_digests, tree_child_digests
from .reachability import IndexSnapshot, mark
from .refs import short_name
from .storage.index import KINDS, Entry, Txn
from .storage.packs import FOOTER, HEADER, RECORD, RECORD_MAGIC, SUFFIX, PackWriter, Record, scan_pack
from .storage.store import ObjectStore, verify_raw

PROOF_TYPE = "mstore-gc-proof"
PROOF_VERSION = 1
#: A proof about a remote's packs (mstore/remote_gc.py); stored beside local proofs.
REMOTE_PROOF_TYPE = "mstore-remote-gc-proof"
DAY = 86400.0

POLICY_DEFAULTS: dict[str, Any] = {
    "retention_days": 30,  # reflog entries younger than this are roots
    "grace_days": 14,  # nothing stored (or re-stored) more recently is ever a candidate
    "proof_max_age_seconds": 3600,  # apply refuses an older proof
    "quarantine_days": 7,  # purge only empties trash older than this
    "compact_below": 0.8,  # also rewrite packs whose live fraction is below this
    "require_remote": None,  # name of a remote that must hold every candidate (checked at plan and apply)
}

# Given (kind, digest) keys, the subset a named remote does not hold intact (Repo builds it from
# remote.lacks, so this layer never opens a remote itself).
RemoteLacks = Callable[[list[tuple[str, bytes]]], set]

_U64BE = struct.Struct(">Q")
_ENTRY_SIZE = len(Entry(0, 0, 0, 0, 0, 0, 0.0).pack_bytes())


class GcRefused(Refused):
    """A proof cannot be produced or applied; ``reasons`` lists every reason."""

    def __init__(self, message: str, reasons: list[str]):
        super().__init__(message + "".join(f"\n  - {r}" for r in reasons))
        self.reasons = reasons


def policy_from(config_section: dict[str, Any] | None, **overrides: Any) -> dict[str, Any]:
    """The effective policy: defaults, then ``[gc]`` in config.toml, then explicit overrides."""
    pol = dict(POLICY_DEFAULTS)
    for k, v in (config_section or {}).items():
        if k in POLICY_DEFAULTS:
            pol[k] = v
    for k, v in overrides.items():
        if v is not None:
            pol[k] = v
    return pol


def proofs_dir(root: Path) -> Path:
    """Where proofs are kept."""
    return root / "gc" / "proofs"


def trash_dir(root: Path) -> Path:
    """Where applied proofs put what they removed."""
    return root / "trash"


# -- state and roots ------------------------------------------------------------------------


def state_digest(txn: Txn) -> str:
    """BLAKE3 over every ref, every reflog entry, every pin and every lease.

    Any ref move, deletion, restore, new reflog entry, pin or lease change since a plan changes
    it, and apply refuses.
    """
    h = blake3.blake3()
    for name, digest in txn.iter_refs(""):
        h.update(b"R" + name.encode() + b"\0" + digest)
    h.update(b"L" + _U64BE.pack(txn.get_counter("reflog_seq")))
    for key, value in txn.db_items("reflog"):
        h.update(key + value)
    for key, value in txn.db_items("pins"):
        h.update(b"P" + key + value)
    for key, value in txn.db_items("leases"):
        h.update(b"E" + key + value)
    return h.hexdigest()


@dataclass
class Roots:
    """What gc must keep, and why."""

    refs: dict[str, str] = field(default_factory=dict)
    reflog: list[list[Any]] = field(default_factory=list)  # [seq, ref, id, time]
    pins: list[str] = field(default_factory=list)
    leases: list[dict[str, Any]] = field(default_factory=list)

    def commit_ids(self) -> set[str]:
        """Every commit id named by a root."""
        ids = set(self.refs.values()) | set(self.pins)
        ids.update(r[2] for r in self.reflog)
        for lease in self.leases:
            ids.update(lease.get("ids", []))
        return ids

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"refs": self.refs, "reflog": self.reflog, "pins": self.pins, "leases": self.leases}


def collect_roots(txn: Txn, now: float, retention_days: float) -> Roots:
    """Refs, in-window reflog entries (old and new values), pins, and unexpired leases."""
    roots = Roots()
    for name, digest in txn.iter_refs(""):
        roots.refs[name] = digest.hex()
    cutoff = now - retention_days * DAY
    for seq, e in txn.iter_reflog(newest_first=True):
        if e["time"] < cutoff:
            break
        for key in ("new", "old"):
            if e.get(key):
                roots.reflog.append([seq, e["ref"], e[key], e["time"]])
    roots.pins = sorted(key.hex() for key, _ in txn.db_items("pins"))
    for key, value in txn.db_items("leases"):
        lease = json.loads(value)
        if lease.get("expires", 0) >= now:
            roots.leases.append({"lease": key.decode(), **lease})
    return roots


# -- plan -----------------------------------------------------------------------------------


def plan(
    store: ObjectStore,
    now: float,
    policy: dict[str, Any],
    user: str,
    progress: Callable[[str], None] | None = None,
    verify_data: bool = False,
    remote_lacks: RemoteLacks | None = None,
) -> tuple[str, dict[str, Any]]:
    """Compute and store a proof; returns ``(proof id, proof document)``. Deletes nothing.

    With ``policy["require_remote"]``, ``remote_lacks`` must say which candidates that remote
    lacks; any at all refuses the plan (push them there first), and the proof records the check.

    With ``verify_data`` every live byte is read and verified first (as fsck would); without,
    live chunks must be indexed inside existing packs, and live objects in packs that apply
    would rewrite must verify.

    Raises:
        GcRefused: an object reachable from the roots cannot be read or verified (its id and
            the error are listed); no proof is written.
    """
    import numpy as np

    with store.index.read() as txn:
        digest = state_digest(txn)
        roots = collect_roots(txn, now, float(policy["retention_days"]))
        reflog_all = list(txn.iter_reflog(newest_first=True))
        snap = IndexSnapshot.read(txn)
        registered = {rec["name"]: (num, rec) for num, rec in txn.iter_packs()}
    if progress:
        progress("marking")
    marks = mark(store, snap, [ObjectId(i).digest for i in roots.commit_ids()])
    # A root naming a commit that is not stored at all (collected earlier) is no doubt about
    # what is live; anything else unreadable is.
    unreadable = marks.doubt(absent_ok="m")
    if unreadable:
        reasons = [f"{KINDS[k]} {oid}: {err}" for (k, oid), err in sorted(unreadable.items())]
        raise GcRefused("gc plan refused: some live objects cannot be read, so nothing is safe to delete", reasons)
    live = marks.live
    grace_cut = now - float(policy["grace_days"]) * DAY
    # Unreachable but younger than the grace period: kept, and so is everything they reach (a
    # young manifest over old chunks, a young commit over an old parent). Without this closure
    # gc could take the chunks of a manifest it keeps, and a later commit re-using the manifest
    # would point at nothing.
    young_rows = np.flatnonzero(~live & (snap.stored_at >= grace_cut))
    missing_chunks = list(marks.missing_chunks)
    if len(young_rows):
        by_kind: dict[str, list[bytes]] = {"m": [], "t": [], "f": []}
        for row in young_rows.tolist():
            k = snap.kind(row)
            if k in by_kind:
                by_kind[k].append(snap.digest(row))
            elif k == "c":
                live[row] = True  # a young delta chunk keeps its bases (mark follows marked chunks)
        # Rows marked so far are not followed again; the young rows themselves are roots.
        kept = mark(store, snap, by_kind["m"], by_kind["t"], by_kind["f"], live=live)
        doubt = kept.doubt(absent_ok="mtf")
        if doubt:
            reasons = [f"{KINDS[k]} {oid}: {err}" for (k, oid), err in sorted(doubt.items())]
            raise GcRefused("gc plan refused: objects kept by the grace period cannot be read", reasons)
        missing_chunks += kept.missing_chunks
    cand_rows = np.flatnonzero(~live & (snap.stored_at < grace_cut))
    candidates = {(snap.kind(r), snap.digest(r)): snap.entry(r) for r in cand_rows.tolist()}
    # Keep on doubt. Every live chunk must be indexed and lie inside an existing pack; the bytes
    # of live objects sharing a pack with a candidate (apply copies them into a new pack) must
    # verify; with verify_data, every live byte must. Reading all live data by default would make
    # plan cost scale with the store instead of its metadata, and gc never touches live bytes
    # outside the packs it rewrites (apply re-verifies each record it copies).
    problems = [f"chunk {d.hex()}: referenced by a live file but not in the store" for d in set(missing_chunks)]
    pack_sizes = np.zeros(max((num for num, _rec in registered.values()), default=-1) + 2, dtype=np.int64)
    for _name, (num, rec) in registered.items():
        pack_sizes[num] = _size(store.packs_dir / rec["name"])
    packs = np.minimum(snap.pack, len(pack_sizes) - 1)  # an unregistered number reads size 0
    ends = snap.offset.astype(np.int64) + RECORD.size + snap.enc_len.astype(np.int64)
    bad = live & (ends > pack_sizes[packs])
    for row in np.flatnonzero(bad).tolist():
        problems.append(f"{KINDS[snap.kind(row)]} {snap.digest(row).hex()}: its pack is missing or truncated")
    # Marking has read and verified every live commit, tree and manifest (or refused above):
    # only chunks are left to read.
    check = live & ~bad
    check[: snap.ranges["c"][0]] = False
    check[snap.ranges["c"][1] :] = False
    if not verify_data:
        check &= np.isin(snap.pack, snap.pack[cand_rows])
    problems += _verify_rows(store, snap, np.flatnonzero(check))
    if problems:
        raise GcRefused(
            "gc plan refused: some live objects cannot be read, so nothing is safe to delete", sorted(problems)
        )
    young = len(young_rows)
    # Rows are in index key order (kind byte, digest), which is the order the digest is defined in.
    lh = blake3.blake3(snap.keys[live].view(np.uint8))  # hashed through the buffer: no second copy
    live_bytes = int(snap.enc_len[live].sum())
    live_count = int(live.sum())
    groups = _attribute(store, candidates, reflog_all, roots, now)
    dead_packs = []
    for path in sorted(store.packs_dir.glob("*" + SUFFIX)):
        st = path.stat()
        if path.name not in registered and st.st_mtime < grace_cut:
            dead_packs.append(
                {"pack": path.name, "bytes": st.st_size, "reason": "not indexed (left by a killed writer)"}
            )
    for name, (_num, rec) in sorted(registered.items()):
        if rec.get("retired"):
            dead_packs.append(
                {"pack": name, "bytes": _size(store.packs_dir / name), "reason": "retired by an applied proof"}
            )
    remote_check = _require_remote(policy, list(candidates), remote_lacks, "gc plan refused")
    doc = {
        "type": PROOF_TYPE,
        "version": PROOF_VERSION,
        "created": now,
        "created_by": f"{user}@{socket.gethostname()}",
        "policy": policy,
        "state_digest": digest,
        "roots": roots.to_dict(),
        "live": {"objects": live_count, "stored_bytes": live_bytes, "digest": lh.hexdigest()},
        "candidates": {
            "objects": len(candidates),
            "bytes": sum(e.raw_len for e in candidates.values()),
            "stored_bytes": sum(e.enc_len for e in candidates.values()),
            "younger_than_grace": young,
        },
        "groups": groups,
        "dead_packs": dead_packs,
    }
    if remote_check is not None:
        doc["remote_check"] = remote_check
    return store_proof(store.root, doc), doc


def store_proof(root: Path, doc: dict[str, Any]) -> str:
    """Write a proof document as canonical JSON under ``gc/proofs/<id>.json``; returns the id.

    The id is the BLAKE3 of the file's bytes, so ``b3sum`` of the file prints its name and an
    edited byte makes :func:`read_proof` refuse it. Used for local and remote gc proofs alike.
    """
    raw = canonical_json(doc)
    pid = hash_bytes(raw)
    d = proofs_dir(root)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(d / f"{pid}.json", raw)
    return str(pid)


def _require_remote(
    policy: dict[str, Any], keys: list[tuple[str, bytes]], remote_lacks: RemoteLacks | None, refusal: str
) -> dict[str, Any] | None:
    """Check that the policy's required remote holds every key; the record a proof keeps of it.

    Raises:
        GcRefused: the remote lacks some keys, or could not be asked (names them).
    """
    remote = policy.get("require_remote")
    if not remote:
        return None
    if remote_lacks is None:
        raise GcRefused(refusal, [f"the policy requires remote {remote!r}, which was not checked"])
    lacking = remote_lacks(keys)
    if lacking:
        sample = sorted(lacking)[:5]
        reasons = [f"{len(lacking)} of {len(keys)} candidates are not on remote {remote!r}: "
                   f"push them there first, or plan without --require-remote"]
        reasons += [f"{KINDS[k]} {d.hex() if isinstance(d, bytes) else d} is not on {remote!r} in a form it can decode"
                    for k, d in sample]
        raise GcRefused(refusal, reasons)
    return {"remote": remote, "objects_checked": len(keys), "lacking": 0}


def _verify_rows(store: ObjectStore, snap: IndexSnapshot, rows: Any) -> list[str]:
    """Read and verify the records of index rows, each pack read once; returns the problems.

    The same checks as ObjectStore.get (the record where the entry points, its header matching
    the entry, its payload decoding to its id), without a lookup and a read per record: the
    packs apply would rewrite can hold a few hundred thousand small live chunks.
    """
    import numpy as np

    problems: list[str] = []
    if not len(rows):
        return problems
    rows = rows[np.lexsort((snap.offset[rows], snap.pack[rows]))]
    for group in np.split(rows, np.flatnonzero(np.diff(snap.pack[rows])) + 1):
        num = int(snap.pack[group[0]])
        try:
            name = store.pack_name(num)
            data = (store.packs_dir / name).read_bytes()
        except (MstoreError, OSError) as exc:
            problems += [f"{KINDS[snap.kind(r)]} {snap.digest(r).hex()}: pack #{num}: {exc}" for r in group.tolist()]
            continue
        columns = (snap.offset[group].tolist(), snap.enc_len[group].tolist(), snap.raw_len[group].tolist())
        for row, at, n, raw_n in zip(group.tolist(), *columns, strict=True):
            kind, digest = snap.kind(row), snap.digest(row)
            header = _record_at(data, kind, digest, at, n)
            try:
                if header is None:
                    raise IntegrityError("no such record where the index points")
                codec, raw_len, check = header
                if raw_len != raw_n:
                    raise IntegrityError("record header does not match the index")
                payload = data[at + RECORD.size : at + RECORD.size + n]
                _verify_record(store, Record(kind, codec, raw_len, n, digest, check, at), payload)
            except IntegrityError as exc:
                problems.append(f"{KINDS[kind]} {digest.hex()} is damaged (pack {name}, offset {at}): {exc}")
    return problems


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _attribute(
    store: ObjectStore,
    candidates: dict[tuple[str, bytes], Entry],
    reflog_all: list[tuple[int, dict]],
    roots: Roots,
    now: float,
) -> list[dict[str, Any]]:
    """Group candidates by what last referenced them: ref, commit, message, when deleted."""
    last_ref: dict[str, tuple[int, dict]] = {}
    deleted_at: dict[str, float] = {}
    for seq, e in reflog_all:  # newest first
        for key in ("new", "old"):
            v = e.get(key)
            if v and v not in last_ref:
                last_ref[v] = (seq, e)
        if e.get("new") is None and e["ref"] not in deleted_at and e["ref"] not in roots.refs:
            deleted_at[e["ref"]] = e["time"]
    cand_commits = [ObjectId.from_digest(d) for (k, d) in candidates if k == "m"]
    owner: dict[tuple[str, bytes], str] = {}
    info: dict[str, dict[str, Any]] = {}
    for cid in sorted(cand_commits, key=lambda c: -(last_ref.get(c, (0, {}))[0])):
        try:
            c = Commit.parse(store.get("m", cid, candidates[("m", cid.digest)]))
        except MstoreError:
            info[cid] = {"id": str(cid), "message": None, "time": None}
            owner[("m", cid.digest)] = cid
            continue
        info[cid] = {"id": str(cid), "message": c.message, "time": c.time, "kind": c.kind}
        owner[("m", cid.digest)] = cid
        _claim_tree(store, c.tree.digest, cid, candidates, owner)
    groups: dict[Any, dict[str, Any]] = {}
    for key, e in sorted(candidates.items()):
        cid = owner.get(key)
        ref = None
        if cid is not None and cid in last_ref:
            ref = last_ref[cid][1]["ref"]
        gkey = ref if cid is not None else None
        g = groups.get(gkey)
        if g is None:
            g = groups[gkey] = {
                "ref": short_name(ref) if ref else None,
                "commits": [],
                "objects": [],
                "bytes": 0,
                "stored_bytes": 0,
                "reason": _reason(ref, cid, last_ref, deleted_at, roots, now),
            }
        if key[0] == "m":
            c_info = dict(info.get(cid, {"id": str(cid)}))
            if cid in last_ref:
                c_info["last_referenced"] = last_ref[cid][1]["time"]
            g["commits"].append(c_info)
        g["objects"].append([key[0], key[1].hex(), e.raw_len, e.enc_len, round(e.stored_at, 3)])
        g["bytes"] += e.raw_len
        g["stored_bytes"] += e.enc_len
    return sorted(groups.values(), key=lambda g: (-g["stored_bytes"], g["ref"] or ""))


def _claim_tree(store: ObjectStore, tid: bytes, cid: ObjectId, candidates: dict, owner: dict) -> None:
    """Attribute a candidate commit's candidate trees, files and chunks to it.

    Only candidates are opened: everything below a live tree or a live file is live, so a
    store of a million chunks reads just the manifests of what would be deleted. (What cannot
    be read here is only left unattributed: marking, not this, decides what is live.)
    """
    stack = [tid]
    while stack:
        key = ("t", stack.pop())
        if key not in candidates or key in owner:
            continue
        owner[key] = cid
        try:
            subtrees, files = tree_child_digests(store.get("t", ObjectId.from_digest(key[1]), candidates[key]))
        except MstoreError:
            continue
        stack.extend(reversed(subtrees))
        for fd in files:
            fkey = ("f", fd)
            if fkey not in candidates or fkey in owner:
                continue
            owner[fkey] = cid
            try:
                chunks = manifest_chunk_digests(store.get("f", ObjectId.from_digest(fd), candidates[fkey]))
            except MstoreError:
                continue
            for i in range(0, len(chunks), 32):
                ck = ("c", chunks[i : i + 32])
                if ck in candidates and ck not in owner:
                    owner[ck] = cid


def _reason(ref, cid, last_ref, deleted_at, roots: Roots, now: float) -> str:
    if cid is None:
        return "not reachable from any commit (left by an interrupted or refused operation)"
    if ref is None:
        return "a commit no ref or reflog entry ever named (a commit that lost a race)"
    when = last_ref[cid][1]["time"]
    days = (now - when) / DAY
    if ref in deleted_at:
        return (
            f"{short_name(ref)} deleted {(now - deleted_at[ref]) / DAY:.0f} days ago; "
            f"last referenced {days:.0f} days ago (reflog entry outside the retention window)"
        )
    return f"no longer on {short_name(ref)}: moved away {days:.0f} days ago (reflog entry outside the retention window)"


# -- loading and verifying ----------------------------------------------------------------


def load_proof(root: Path, prefix: str) -> tuple[str, dict[str, Any]]:
    """Find a local gc proof by id or prefix (≥ 7) and check that its content still hashes to its id.

    Raises:
        UserError: a prefix shorter than 7 or not hex, or a remote gc proof (named: it is applied
            with ``--remote``); NotFound: no such proof;
        IntegrityError: the file was edited (its hash is not its name).
    """
    pid, doc = read_proof(root, prefix, {PROOF_TYPE: PROOF_VERSION, REMOTE_PROOF_TYPE: PROOF_VERSION})
    if doc["type"] == REMOTE_PROOF_TYPE:
        remote = doc.get("remote", {}).get("name") if isinstance(doc.get("remote"), dict) else None
        raise UserError(f"gc proof {pid[:7]} is a proof for remote {remote!r}: use it with --remote {remote}")
    return pid, doc


def read_proof(root: Path, prefix: str, types: dict[str, int]) -> tuple[str, dict[str, Any]]:
    """Find a proof by id or prefix (≥ 7), check it hashes to its id and is of one of ``types``.

    ``types`` maps each accepted document type to the version this mstore reads.

    Raises:
        UserError: a prefix shorter than 7 or not hex, or matching several proofs;
        NotFound: no such proof; IntegrityError: edited, not JSON, or of another type;
        UnsupportedFormat: a version this mstore does not read.
    """
    if not is_id_prefix(prefix):
        raise UserError(f"give the proof id or a prefix of at least 7 hex characters, not {prefix!r}")
    matches = sorted(p for p in proofs_dir(root).glob(f"{prefix}*.json"))
    if not matches:
        raise NotFound(f"no gc proof {prefix}")
    if len(matches) > 1:
        raise UserError(f"{prefix} matches several proofs; give more characters")
    path = matches[0]
    raw = path.read_bytes()
    pid = path.stem
    got = hash_bytes(raw)
    if got != pid:
        raise IntegrityError(f"gc proof {pid[:7]} was edited: its content hashes to {got[:12]}…, not its id")
    try:
        doc = json.loads(raw)
    except ValueError:
        raise IntegrityError(f"gc proof {pid[:7]} is not JSON") from None
    if not isinstance(doc, dict) or doc.get("type") not in types:
        raise IntegrityError(f"{path.name} is not a gc proof")
    if doc.get("version") != types[doc["type"]]:
        raise UnsupportedFormat(
            f"gc proof {pid[:7]} has version {doc.get('version')}; this mstore reads {types[doc['type']]}"
        )
    return pid, doc


def proof_candidates(doc: dict[str, Any]) -> dict[tuple[str, bytes], list[Any]]:
    """(kind, digest) → [kind, hex, raw, stored, stored_at] of every candidate in a proof."""
    out = {}
    for g in doc["groups"]:
        for obj in g["objects"]:
            out[(obj[0], bytes.fromhex(obj[1]))] = obj
    return out


def audit_entries(store: ObjectStore) -> list[dict[str, Any]]:
    """The gc audit log, oldest first."""
    with store.index.read() as txn:
        return [json.loads(v) for _k, v in txn.db_items("gc_log")]


def proof_status(store: ObjectStore, pid: str) -> str | None:
    """``applied``, ``undone``, ``purged`` (the latest audit action for the proof) or None."""
    status = None
    for e in audit_entries(store):
        if e["proof"] == pid:
            status = e["action"]
    return status


@dataclass
class Verdict:
    """Whether a proof may be applied now, and every reason if not."""

    proof: str
    valid: bool
    reasons: list[str]
    status: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"proof": self.proof, "valid": self.valid, "reasons": self.reasons, "status": self.status}


def verify(
    store: ObjectStore, pid: str, doc: dict[str, Any], now: float, remote_lacks: RemoteLacks | None = None
) -> Verdict:
    """Recompute everything a proof claims; list every reason it no longer holds."""
    return _verify(store, pid, doc, now, remote_lacks)[0]


def _verify(
    store: ObjectStore, pid: str, doc: dict[str, Any], now: float, remote_lacks: RemoteLacks | None = None
) -> tuple[Verdict, IndexSnapshot, Any]:
    """:func:`verify`, plus the index snapshot it checked and each candidate's row in it.

    Rows are in :func:`proof_candidates` order, -1 for a candidate not indexed; apply works from
    exactly the snapshot that was verified.
    """
    import numpy as np

    reasons: list[str] = []
    status = proof_status(store, pid)
    if status is not None:
        reasons.append(f"the proof was already {status}")
    policy = doc["policy"]
    age = now - float(doc["created"])
    if age > float(policy["proof_max_age_seconds"]):
        reasons.append(
            f"the proof is {age / 60:.0f} minutes old; the limit is {float(policy['proof_max_age_seconds']) / 60:.0f} "
            "(plan again)"
        )
    with store.index.read() as txn:
        digest = state_digest(txn)
        roots = collect_roots(txn, float(doc["created"]), float(policy["retention_days"]))
        roots_now = collect_roots(txn, now, float(policy["retention_days"]))
        snap = IndexSnapshot.read(txn)
    if digest != doc["state_digest"]:
        reasons.extend(_state_changes(doc["roots"], roots) or ["refs, reflog, pins or leases changed since the plan"])
    cands = list(proof_candidates(doc))
    rows = _rows_of(snap, cands)
    gone = [k for k, r in zip(cands, rows.tolist(), strict=True) if r < 0]
    if gone:
        reasons.append(
            f"{len(gone)} candidates are no longer in the store (e.g. {KINDS[gone[0][0]]} {gone[0][1].hex()})"
        )
    grace_cut = now - float(policy["grace_days"]) * DAY
    indexed = rows >= 0
    young_row = np.zeros(len(rows), dtype=bool)
    young_row[indexed] = snap.stored_at[rows[indexed]] >= grace_cut
    young = [k for k, y in zip(cands, young_row.tolist(), strict=True) if y]
    if young:
        reasons.append(
            f"{len(young)} candidates were stored again within the grace period "
            f"(e.g. {KINDS[young[0][0]]} {young[0][1].hex()})"
        )
    marks = mark(store, snap, [ObjectId(i).digest for i in roots_now.commit_ids()])
    missing = set(marks.missing_chunks)
    live_row = np.zeros(len(rows), dtype=bool)
    live_row[indexed] = marks.live[rows[indexed]]
    reachable = [
        k
        for k, lv in zip(cands, live_row.tolist(), strict=True)
        if lv or k in marks.absent or (k[0] == "c" and k[1] in missing)
    ]
    if reachable:
        reasons.append(
            f"{len(reachable)} candidates are reachable from the current roots "
            f"(e.g. {KINDS[reachable[0][0]]} {reachable[0][1].hex()})"
        )
    # A root naming a commit that is not stored (collected by an earlier proof) is not doubt;
    # any other object it reaches that cannot be read or is not indexed is.
    problems = len(marks.doubt(absent_ok="m")) + len(missing)
    if problems:
        reasons.append(f"{problems} live objects cannot be read; nothing is safe to delete")
    if policy.get("require_remote") and status is None:
        try:
            _require_remote(policy, cands, remote_lacks, "")
        except GcRefused as exc:
            reasons.extend(exc.reasons)
        except MstoreError as exc:  # the remote could not be asked: no evidence, no deletion
            reasons.append(f"remote {policy['require_remote']!r} could not be checked: {exc}")
    return Verdict(pid, not reasons, reasons, status), snap, rows


def _rows_of(snap: IndexSnapshot, keys: list[tuple[str, bytes]]) -> Any:
    """The snapshot row of each ``(kind, digest)`` (-1 if not indexed), in the order given."""
    import numpy as np

    rows = np.full(len(keys), -1, dtype=np.int64)
    for kind in "cftm":
        where = [i for i, k in enumerate(keys) if k[0] == kind]
        if where:
            rows[where] = snap.find(snap.keys_of(kind, (keys[i][1] for i in where)))
    return rows


def collect_roots_now(store: ObjectStore, now: float, policy: dict[str, Any]) -> Roots:
    """The roots as they are now."""
    with store.index.read() as txn:
        return collect_roots(txn, now, float(policy["retention_days"]))


def _state_changes(old: dict[str, Any], new: Roots) -> list[str]:
    out = []
    for name in sorted(set(old["refs"]) | set(new.refs)):
        a, b = old["refs"].get(name), new.refs.get(name)
        if a != b:
            if a is None:
                out.append(f"ref {short_name(name)} was created (at {b[:7]})")
            elif b is None:
                out.append(f"ref {short_name(name)} was deleted (was {a[:7]})")
            else:
                out.append(f"ref {short_name(name)} moved {a[:7]} -> {b[:7]}")
    old_max = max((r[0] for r in old["reflog"]), default=0)
    new_entries = [r for r in new.reflog if r[0] > old_max]
    if new_entries and not out:
        out.append(f"{len({r[0] for r in new_entries})} new reflog entries since the plan")
    if sorted(old["pins"]) != sorted(new.pins):
        out.append("pins changed since the plan")
    if [x.get("lease") for x in old["leases"]] != [x.get("lease") for x in new.leases]:
        out.append("leases of running jobs changed since the plan")
    return out


# -- apply ----------------------------------------------------------------------------------


@dataclass
class ApplyResult:
    """What an applied proof did."""

    proof: str
    objects: int
    trashed_bytes: int
    packs_rewritten: int
    packs_removed: int
    bytes_before: int
    bytes_after: int

    @property
    def freed(self) -> int:
        """Bytes no longer in packs/ (now in trash/ or gone as dead bytes)."""
        return self.bytes_before - self.bytes_after

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "proof": self.proof,
            "objects": self.objects,
            "trashed_bytes": self.trashed_bytes,
            "packs_rewritten": self.packs_rewritten,
            "packs_removed": self.packs_removed,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "freed": self.freed,
        }


def _packs_bytes(store: ObjectStore) -> int:
    return sum(p.stat().st_size for p in store.packs_dir.glob("*" + SUFFIX))


def _record_at(data: bytes, kind: str, digest: bytes, at: int, n: int) -> tuple[int, int, bytes] | None:
    """The record an index entry points at in a pack's bytes: ``(codec, raw length, check)``.

    None unless a record of ``kind`` and ``digest`` with an ``n``-byte payload starts at ``at``.
    """
    if at + RECORD.size + n > len(data):
        return None
    magic, kind_byte, codec, _res, raw_len, enc_len, oid, check = RECORD.unpack_from(data, at)
    if magic != RECORD_MAGIC or kind_byte != ord(kind) or oid != digest or enc_len != n:
        return None
    return codec, raw_len, check


def _verify_record(store: ObjectStore, r: Record, payload: bytes) -> None:
    """Decode a record and check it against its id, as ObjectStore.get does on every read.

    Raises:
        IntegrityError: the payload does not decode, or its hash is not the record's check or id.
    """
    raw = store.reader.decode(r, payload)  # BLAKE3(raw) == r.check
    if r.kind == "c":
        if r.check != r.id:
            raise IntegrityError("record check is not the chunk id")
    else:
        verify_raw(r.kind, ObjectId.from_digest(r.id), raw)


def apply(
    store: ObjectStore,
    pid: str,
    doc: dict[str, Any],
    now: float,
    user: str,
    crash_hook: Callable[[str], None] | None = None,
    remote_lacks: RemoteLacks | None = None,
) -> ApplyResult:
    """Re-check a proof and move its candidates to trash, rewriting the packs that held them.

    ``crash_hook(point)`` is called at each step boundary (tests kill the process there). A
    proof whose policy requires a remote is re-checked against it through ``remote_lacks``.

    Raises:
        GcRefused: the proof is not valid now (every reason listed); nothing changed.
    """
    import numpy as np

    hook = crash_hook or (lambda point: None)
    verdict, snap, cand_rows = _verify(store, pid, doc, now, remote_lacks)
    if verdict.status == "applied":
        _cleanup_retired(store)
    if not verdict.valid:
        raise GcRefused(f"gc proof {pid[:7]} cannot be applied", verdict.reasons)
    before = _packs_bytes(store)
    cands = proof_candidates(doc)
    policy = doc["policy"]
    with store.index.read() as txn:
        packs = {num: rec for num, rec in txn.iter_packs()}
    # The index as verify saw it (every candidate indexed there, none reachable): which packs
    # to rewrite: every pack holding a candidate, and packs mostly dead.
    is_cand = np.zeros(snap.n, dtype=bool)
    is_cand[cand_rows] = True
    cand_packs = set(np.unique(snap.pack[is_cand]).tolist())
    keep = ~is_cand
    live_per_pack = np.bincount(
        snap.pack[keep],
        weights=(RECORD.size + snap.enc_len[keep]).astype(np.float64),
        minlength=max(packs, default=0) + 1,
    )
    grace_cut = now - float(policy["grace_days"]) * DAY

    def in_use(rec: dict) -> bool:
        # A pack another process may still append to: unsealed and recently written.
        path = store.packs_dir / rec["name"]
        try:
            recent = path.stat().st_mtime >= grace_cut
        except FileNotFoundError:
            return False
        return recent and not scan_pack(path)[1]

    rewrite = set(cand_packs)
    busy = [packs[n]["name"] for n in cand_packs if in_use(packs[n])]
    if busy:
        raise GcRefused(f"gc proof {pid[:7]} cannot be applied", [f"pack {b} is still being written" for b in busy])
    for num, rec in packs.items():
        if rec.get("dir") or rec.get("retired") or num in rewrite:
            continue
        size = _size(store.packs_dir / rec["name"])
        live = int(live_per_pack[num]) + HEADER.size + FOOTER.size
        if size and live / size < float(policy["compact_below"]) and not in_use(rec):
            rewrite.add(num)
    tdir = trash_dir(store.root) / pid
    made_tdir = not tdir.exists()
    tdir.mkdir(parents=True, exist_ok=True)
    if made_tdir:  # the trash packs' directory entries must survive a power loss too (undo needs them)
        fsync_dir(tdir.parent)
        fsync_dir(store.root)
    max_pack = int(store.config.get("packs", "max_size", 64 << 20))
    live_writer = trash_writer = None
    live_index = trash_index = -1
    writers: list[PackWriter] = []

    def new_writer(directory: Path) -> PackWriter:
        w = PackWriter(directory, max_pack)
        writers.append(w)
        return w

    # Every record copied: its snapshot row, the writer (index into ``writers``) and its new
    # offset. Plain lists of ints: a compaction moves hundreds of thousands of records.
    moved_rows: list[int] = []
    moved_writer: list[int] = []
    moved_offset: list[int] = []
    missing: list[tuple[str, bytes]] = []
    by_pack = np.argsort(snap.pack, kind="stable")
    pack_sorted = snap.pack[by_pack]
    hook("before-copy")
    try:
        for num in sorted(rewrite):
            hook("copy-pack")
            rec = packs[num]
            # The records the index points at, in file order; bytes no entry points at are dead.
            lo, hi = np.searchsorted(pack_sorted, [num, num + 1])
            rows = by_pack[lo:hi]
            rows = rows[np.argsort(snap.offset[rows], kind="stable")].tolist()
            try:
                data = (store.packs_dir / rec["name"]).read_bytes()
            except FileNotFoundError:
                data = b""
            offsets = snap.offset[rows].tolist()
            lengths = snap.enc_len[rows].tolist()
            raw_lengths = snap.raw_len[rows].tolist()
            for row, at, n, raw_n in zip(rows, offsets, lengths, raw_lengths, strict=True):
                key = (snap.kind(row), snap.digest(row))
                header = _record_at(data, key[0], key[1], at, n)
                if header is None:
                    missing.append(key)
                    continue
                codec, raw_len, check = header
                payload = data[at + RECORD.size : at + RECORD.size + n]
                if key in cands:
                    if trash_writer is None or trash_writer.full:
                        if trash_writer is not None:
                            trash_writer.seal()
                        trash_writer = new_writer(tdir)
                        trash_index = len(writers) - 1
                    w, wi = trash_writer, trash_index
                else:
                    try:  # never carry a damaged live object into a new pack silently
                        if raw_len != raw_n:
                            raise IntegrityError("record header does not match the index")
                        _verify_record(store, Record(key[0], codec, raw_len, n, key[1], check, at), payload)
                    except IntegrityError as exc:
                        raise GcRefused(
                            f"gc proof {pid[:7]} cannot be applied",
                            [f"live {KINDS[key[0]]} {key[1].hex()} is damaged: {exc} (run mstore fsck)"],
                        ) from None
                    if live_writer is None or live_writer.full:
                        if live_writer is not None:
                            live_writer.seal()
                        live_writer = new_writer(store.packs_dir)
                        live_index = len(writers) - 1
                    w, wi = live_writer, live_index
                moved_offset.append(w.add(key[0], key[1], check, codec, raw_len, payload))
                moved_rows.append(row)
                moved_writer.append(wi)
            del data
        if missing:
            raise GcRefused(
                f"gc proof {pid[:7]} cannot be applied",
                [
                    f"{len(missing)} indexed objects were not found in their packs (run mstore fsck); e.g. "
                    f"{KINDS[missing[0][0]]} {missing[0][1].hex()}"
                ],
            )
        for w in writers:
            if not w.sealed:
                w.seal()
        hook("after-copy")
        # In row order, which is key order: LMDB then touches each page once.
        order = np.argsort(np.asarray(moved_rows, dtype=np.int64), kind="stable").tolist()
        rows_in_order = [moved_rows[i] for i in order]
        old_packs = snap.pack[rows_in_order].tolist()
        old_offsets = snap.offset[rows_in_order].tolist()
        trashed = is_cand[rows_in_order].tolist()
        with store.index.write() as txn:
            if state_digest(txn) != doc["state_digest"]:
                raise GcRefused(f"gc proof {pid[:7]} cannot be applied", ["refs or reflog changed during apply"])
            numbers: dict[str, int] = {}
            for j, i in enumerate(order):
                row, w, off = moved_rows[i], writers[moved_writer[i]], moved_offset[i]
                key = (snap.kind(row), snap.digest(row))
                cur = txn.get_entry(*key)
                if cur is None or cur.pack != old_packs[j] or cur.offset != old_offsets[j]:
                    raise GcRefused(f"gc proof {pid[:7]} cannot be applied", ["the index changed during apply"])
                if trashed[j] and cur.stored_at >= grace_cut:
                    raise GcRefused(
                        f"gc proof {pid[:7]} cannot be applied",
                        [f"{KINDS[key[0]]} {key[1].hex()} was stored again during apply"],
                    )
                n = numbers.get(w.name)
                if n is None:
                    n = numbers[w.name] = txn.register_pack(w.name, now)
                    if w.path.parent == tdir:
                        txn.put_pack(n, {"name": w.name, "created": now, "dir": f"trash/{pid}"})
                new = Entry(n, off, cur.enc_len, cur.raw_len, cur.codec, cur.flags, cur.stored_at)
                if trashed[j]:
                    txn.delete_entry(*key)
                    txn.db_put("trash", key[0].encode() + key[1], new.pack_bytes() + pid.encode())
                    txn.db_put("collected", key[0].encode() + key[1], pid.encode())
                else:
                    txn.put_entry(key[0], key[1], new, overwrite=True)
            for num in rewrite:
                rec = dict(packs[num])
                rec["retired"] = pid
                txn.put_pack(num, rec)
            seq = txn.next_seq("gc_seq")
            txn.db_put(
                "gc_log",
                _U64BE.pack(seq),
                json.dumps(
                    {
                        "seq": seq,
                        "proof": pid,
                        "action": "applied",
                        "time": now,
                        "user": user,
                        "objects": len(cands),
                        "trashed_bytes": sum(o[3] for o in cands.values()),
                        "packs_rewritten": len(rewrite),
                    },
                    sort_keys=True,
                ).encode(),
            )
        hook("after-commit")
    except BaseException:
        for w in (live_writer, trash_writer):
            if w is not None and not w.sealed:
                w.abandon()
        # A refusal changes nothing on disk: the packs written so far are not registered (the
        # index transaction did not commit), so nothing can refer to them. (A crash leaves them
        # for the next apply, as docs/gc.md says.)
        _discard_unregistered(store, writers, tdir if made_tdir else None)
        raise
    store.forget_pack_names()
    removed = _cleanup_retired(store, hook)
    _remove_dead_packs(store, doc, now)
    after = _packs_bytes(store)
    return ApplyResult(pid, len(cands), sum(o[3] for o in cands.values()), len(rewrite), removed, before, after)


def _discard_unregistered(store: ObjectStore, writers: list[PackWriter], tdir: Path | None) -> None:
    """Unlink the packs an interrupted apply wrote that no index entry can name.

    Also removes ``tdir`` if that leaves it empty. Never raises: the caller is already handling
    an error.
    """
    try:
        with store.index.read() as txn:
            registered = {rec["name"] for _num, rec in txn.iter_packs()}
        for w in writers:
            if w.name not in registered:
                w.path.unlink(missing_ok=True)
        if tdir is not None and not any(tdir.iterdir()):
            tdir.rmdir()
            if not any(tdir.parent.iterdir()):
                tdir.parent.rmdir()
    except (OSError, MstoreError):
        pass


def _cleanup_retired(store: ObjectStore, hook: Callable[[str], None] | None = None) -> int:
    """Unlink pack files an applied proof retired, then forget them (idempotent)."""
    with store.index.read() as txn:
        retired = [(num, rec) for num, rec in txn.iter_packs() if rec.get("retired")]
    store.forget_pack_names()
    for _num, rec in retired:
        try:
            (store.packs_dir / rec["name"]).unlink()
        except FileNotFoundError:
            pass
        if hook:
            hook("unlinked-one")
    if retired:
        fsync_dir(store.packs_dir)
        with store.index.write() as txn:
            for num, _rec in retired:
                txn.delete_pack(num)
    return len(retired)


def _remove_dead_packs(store: ObjectStore, doc: dict[str, Any], now: float) -> None:
    """Delete unregistered pack files the proof listed, if still unregistered and old."""
    grace_cut = now - float(doc["policy"]["grace_days"]) * DAY
    with store.index.read() as txn:
        registered = {rec["name"] for _n, rec in txn.iter_packs()}
    for item in doc.get("dead_packs", []):
        path = store.packs_dir / item["pack"]
        if item["pack"] in registered or not path.exists():
            continue
        if path.stat().st_mtime < grace_cut:
            path.unlink()


# -- undo, purge ----------------------------------------------------------------------------


def undo(store: ObjectStore, pid: str, now: float, user: str) -> int:
    """Bring back everything an applied proof moved to trash; returns the object count.

    Raises:
        GcRefused: the proof was not applied, or was already undone or purged.
    """
    status = proof_status(store, pid)
    if status != "applied":
        raise GcRefused(f"gc proof {pid[:7]} cannot be undone", [f"its status is {status or 'not applied'}"])
    tdir = trash_dir(store.root) / pid
    with store.index.read() as txn:
        tpacks = [(num, rec) for num, rec in txn.iter_packs() if rec.get("dir") == f"trash/{pid}"]
        items = [(k, v) for k, v in txn.db_items("trash") if v[40:].decode() == pid]
    # Link every trash pack into packs/ first: a crash leaves both names, never neither.
    for _num, rec in tpacks:
        dst = store.packs_dir / rec["name"]
        if not dst.exists():
            os.link(tdir / rec["name"], dst)
    fsync_dir(store.packs_dir)
    with store.index.write() as txn:
        for num, rec in tpacks:
            txn.put_pack(num, {"name": rec["name"], "created": rec["created"]})
        for key, value in items:
            txn.put_entry(key[:1].decode(), key[1:], Entry.unpack(value[:_ENTRY_SIZE]), overwrite=False)
            txn.db_delete("trash", key)
            txn.db_delete("collected", key)
        seq = txn.next_seq("gc_seq")
        txn.db_put(
            "gc_log",
            _U64BE.pack(seq),
            json.dumps(
                {"seq": seq, "proof": pid, "action": "undone", "time": now, "user": user, "objects": len(items)},
                sort_keys=True,
            ).encode(),
        )
    store.forget_pack_names()
    shutil.rmtree(tdir, ignore_errors=True)
    return len(items)


def purge(
    store: ObjectStore, now: float, quarantine_days: float, user: str, dry_run: bool = False
) -> list[dict[str, Any]]:
    """Delete trash of proofs applied more than ``quarantine_days`` ago. The point of no return."""
    applied: dict[str, dict[str, Any]] = {}
    for e in audit_entries(store):
        if e["action"] == "applied":
            applied[e["proof"]] = e
        else:
            applied.pop(e["proof"], None)
    due = [e for e in applied.values() if now - e["time"] >= quarantine_days * DAY]
    out = []
    for e in due:
        pid = e["proof"]
        tdir = trash_dir(store.root) / pid
        size = sum(p.stat().st_size for p in tdir.glob("*")) if tdir.exists() else 0
        out.append({"proof": pid, "applied": e["time"], "objects": e.get("objects"), "bytes": size})
        if dry_run:
            continue
        with store.index.write() as txn:
            for key, value in list(txn.db_items("trash")):
                if value[_ENTRY_SIZE:].decode() == pid:
                    txn.db_delete("trash", key)
            for num, rec in list(txn.iter_packs()):
                if rec.get("dir") == f"trash/{pid}":
                    txn.delete_pack(num)
            seq = txn.next_seq("gc_seq")
            txn.db_put(
                "gc_log",
                _U64BE.pack(seq),
                json.dumps(
                    {"seq": seq, "proof": pid, "action": "purged", "time": now, "user": user, "bytes": size},
                    sort_keys=True,
                ).encode(),
            )
        shutil.rmtree(tdir, ignore_errors=True)
    return out


# -- pins and leases --------------------------------------------------------------------------


def pin(store: ObjectStore, cid: ObjectId, now: float, user: str, note: str = "") -> None:
    """Keep a commit (and everything it reaches) whatever refs do."""
    with store.index.write() as txn:
        txn.db_put("pins", cid.digest, json.dumps({"time": now, "user": user, "note": note}, sort_keys=True).encode())


def unpin(store: ObjectStore, cid: ObjectId) -> bool:
    """Remove a pin; True if there was one."""
    with store.index.write() as txn:
        return txn.db_delete("pins", cid.digest)


def pins(store: ObjectStore) -> list[dict[str, Any]]:
    """Every pin."""
    with store.index.read() as txn:
        return [{"id": k.hex(), **json.loads(v)} for k, v in txn.db_items("pins")]


def take_lease(store: ObjectStore, ids: list[str], now: float, ttl: float, note: str) -> str:
    """Record that a running job uses these commits; returns the lease id."""
    lease = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns():x}"
    with store.index.write() as txn:
        txn.db_put(
            "leases",
            lease.encode(),
            json.dumps(
                {
                    "ids": list(ids),
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "created": now,
                    "expires": now + ttl,
                    "note": note,
                },
                sort_keys=True,
            ).encode(),
        )
    return lease


def release_lease(store: ObjectStore, lease: str) -> None:
    """Drop a lease."""
    with store.index.write() as txn:
        txn.db_delete("leases", lease.encode())


def collected_by(store: ObjectStore, kind: str, oid: ObjectId) -> str | None:
    """The proof that collected an object, if one did."""
    with store.index.read() as txn:
        v = txn.db_get("collected", kind.encode() + oid.digest)
    return v.decode() if v is not None else None


__all__ = ["GcRefused", "POLICY_DEFAULTS", "apply", "plan", "purge", "undo", "verify"]
