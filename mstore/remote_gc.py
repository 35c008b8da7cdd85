"""Remote gc: the plan / verify / apply protocol of local gc, against a remote's refs and packs.

(docs/remote-gc.md.) The unit of deletion on a remote is a *pack*: remote packs are immutable
and shared by nobody, so a pack whose every record is unreachable is deleted whole. A pack with
any live record is never rewritten or moved (readers hold pack locations); partly dead packs are
only reported, with their dead bytes.

* :func:`plan` reads the remote's refs and every remote reflog; the roots are the current refs
  and the old and new value of every reflog entry inside the retention window. It marks
  everything those reach (commit → parents → tree → file → chunk, and each delta chunk → its
  base, from every pack index that lists it), reading metadata through the verified reader the
  fetch path uses (local copies first, else the remote's, verified against their ids). A pack
  is a candidate if none of its records is live and it is older than the grace period (its
  name starts with the time it was created), or if it has no index at all (a push killed before
  it wrote one) and is older than the grace period. The proof, canonical JSON named by its
  BLAKE3, is stored locally beside local gc proofs. Plan deletes nothing, and refuses if the
  remote lacks or cannot serve any live object, or lists a pack index or reflog entry it cannot
  read (keep on doubt).
* :func:`verify` re-reads the remote's refs, reflogs and pack indexes and re-marks.
* :func:`apply` takes the remote's gc lock (mstore/remote_lock.py), re-verifies *under* it, and
  moves each candidate pack to ``trash/<proof>/packs/`` on the remote: copy the pack and its
  index there, delete the index from ``packs/`` (so no reader or pusher sees the pack's
  records any more), then the pack. :func:`undo` copies them back (pack before index, R1);
  :func:`purge` re-marks under the lock and deletes the trash of proofs applied longer ago than
  the quarantine period whose packs hold nothing live now.
"""

from __future__ import annotations

import json
import math
import re
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from .errors import IntegrityError, MstoreError, RemoteIntegrityError, RemoteNotFound, UserError
from .gc import (
    DAY,
    POLICY_DEFAULTS,
    PROOF_TYPE,
    PROOF_VERSION,
    REMOTE_PROOF_TYPE,
    GcRefused,
    Verdict,
    read_proof,
    store_proof,
)
from .hashing import ObjectId, is_full_id
from .objects import Commit, canonical_json
from .reachability import walk
from .refs import short_name
from .remote import (
    MAX_OBJECT,
    Catalog,
    RemoteRef,
    RemoteSource,
    catalog_pack,
    check_layout,
    list_packs,
    parse_index,
    read_ref,
    ref_from_key,
    remote_reflog,
)
from .remote_lock import gc_lock
from .storage.backends import Backend, BackendNotFound, open_backend
from .storage.index import KINDS
from .storage.packs import RECORD

REMOTE_PROOF_VERSION = 1
POLICY_KEYS = ("retention_days", "grace_days", "proof_max_age_seconds", "quarantine_days")
#: What this store's configured policy is a floor for: a proof may be stricter, never laxer
#: (quarantine needs none here: purge waits for the longer of the proof's and the configured one).
FLOOR_KEYS = ("retention_days", "grace_days")
# How far ahead of this machine's clock a proof's creation time may be (another machine's clock).
CLOCK_SKEW_SECONDS = 300.0
#: Remote pack names are ``<time_ns hex>-<pid hex>-<64 random bits hex>`` (fsutil.unique_name).
_PACK_NAME = re.compile(r"([0-9a-f]{1,16})-[0-9a-f]{1,16}-[0-9a-f]{16}")
_MARKERS = ("applied", "undone", "purged")
#: What ``log`` reads: ``started`` is written by apply once its re-check passed, before it moves
#: anything; a proof started but never applied or undone is an apply that did not finish.
_LOG_ACTIONS = ("started", *_MARKERS)

Hook = Callable[[str], None]


def _noop(_point: str) -> None:
    return None


def open_remote(settings: dict[str, Any]) -> Backend:
    """The backend of a remote's settings (a ``[remotes.NAME]`` table of config.toml)."""
    return open_backend(settings["url"], **{k: v for k, v in settings.items() if k != "url"})


def remote_settings(remotes: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """The settings of remote ``name``.

    Raises:
        RemoteNotFound: no remote of that name is configured.
    """
    settings = remotes.get(name)
    if settings is None:
        known = ", ".join(remotes) or "none configured"
        raise RemoteNotFound(f"no remote {name!r} (remotes: {known}; add one with mstore remote add)")
    return settings


def pack_created(name: str) -> float | None:
    """When a remote pack was created, from its name (None if the name does not say)."""
    m = _PACK_NAME.fullmatch(name)
    return int(m.group(1), 16) / 1e9 if m else None


# -- the remote's state: refs and reflogs ------------------------------------------------------


@dataclass
class RemoteState:
    """Every remote ref (current document) and every remote reflog, as read now."""

    refs: dict[str, RemoteRef] = field(default_factory=dict)  # refs that point at a commit
    logs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # full ref -> entries, oldest first

    def digest(self) -> str:
        """BLAKE3 over every ref (name, id, change number) and every reflog entry."""
        doc = {
            "refs": {n: [str(r.id), r.seq] for n, r in sorted(self.refs.items())},
            "logs": {n: [[e.get("seq"), e.get("id"), e.get("old"), e.get("time")] for e in es]
                     for n, es in sorted(self.logs.items())},
        }
        return blake3.blake3(canonical_json(doc)).hexdigest()

    def roots(self, now: float, retention_days: float) -> dict[str, Any]:
        """``{"refs": {full: id}, "reflog": [[ref, seq, id, time], ...]}``.

        Reflog entries younger than the retention window give their old and new value; an
        entry whose time is not a number counts as young (keep on doubt).
        """
        cutoff = now - retention_days * DAY
        reflog = []
        for name, entries in sorted(self.logs.items()):
            for e in entries:
                t = e.get("time")
                young = not isinstance(t, (int, float)) or isinstance(t, bool) or t >= cutoff
                if not young:
                    continue
                for key in ("id", "old"):
                    if e.get(key):
                        reflog.append([name, e["seq"], e[key], t])
        return {"refs": {n: str(r.id) for n, r in sorted(self.refs.items())}, "reflog": reflog}


def read_state(backend: Backend) -> RemoteState:
    """Read every remote ref and reflog (deleted refs' reflogs included).

    Raises:
        RemoteIntegrityError: a ref or reflog key or document is malformed.
    """
    names: set[str] = set()
    listed: dict[str, set[int]] = {}  # full ref -> the reflog entries listed
    for prefix, strip in (("refs/", ""), ("logs/", "logs/")):
        for key, _size in backend.list(prefix):
            refkey = key[len(strip):]
            if strip:
                refkey, _, seq = refkey.rpartition("/")
            try:
                full = ref_from_key(refkey)
            except MstoreError as exc:
                raise RemoteIntegrityError(f"{backend.url}: {exc}") from None
            names.add(full)
            if strip and seq.isdigit():
                listed.setdefault(full, set()).add(int(seq))
    state = RemoteState()
    for full in sorted(names):
        ref = read_ref(backend, full)
        if ref is not None and ref.id is not None:
            state.refs[full] = ref
        state.logs[full] = remote_reflog(backend, full)
        # Entries are never deleted: one listed but not read is unreadable, and its values
        # may be roots (keep on doubt).
        lost = sorted(listed.get(full, set()) - {e.get("seq") for e in state.logs[full]})
        if lost:
            raise RemoteIntegrityError(
                f"{backend.url}: remote reflog entry {lost[0]} of {full} is listed but cannot be read"
                + (f" (and {len(lost) - 1} more)" if len(lost) > 1 else "")
                + ": remote gc cannot know what it names, so it deletes nothing"
            )
    return state


# -- the remote's packs ------------------------------------------------------------------------


@dataclass
class Survey:
    """Every pack on the remote: its size, its parsed index (if any), and the catalog they make."""

    sizes: dict[str, int] = field(default_factory=dict)  # pack name -> bytes
    indexes: dict[str, dict[str, Any]] = field(default_factory=dict)  # pack name -> parsed .idx
    index_digest: dict[str, str] = field(default_factory=dict)  # pack name -> BLAKE3 of its .idx bytes
    catalog: Catalog = field(default_factory=Catalog)
    bases: dict[bytes, set[bytes]] = field(default_factory=dict)  # delta chunk -> every base a record names
    unreadable: dict[str, str] = field(default_factory=dict)  # pack name -> why its listed .idx did not read

    @property
    def orphans(self) -> list[str]:
        """Packs without an index key (a push killed between its pack and its index, R1)."""
        return sorted(n for n in self.sizes if n not in self.indexes and n not in self.unreadable)

    def doubts(self) -> list[str]:
        """Why this view of the remote is incomplete: every listed index that did not read."""
        return [f"pack index packs/{n}.idx is listed but cannot be read ({why}): what its pack holds is "
                f"unknown, so nothing is safe to delete" for n, why in sorted(self.unreadable.items())]


def survey(backend: Backend, cache_dir: Path | None = None) -> Survey:
    """List ``packs/`` and read every pack index (from ``cache_dir`` when cached).

    Builds the same catalog as :func:`mstore.remote.load_catalog` from the same documents, so
    the packs judged and the catalog marked through are one view of the remote.

    An index that is listed but cannot be read or parsed is recorded in ``unreadable`` (never
    taken for a pack without index): callers refuse on it.
    """
    sv = Survey()
    sizes, names = list_packs(backend)
    sv.sizes.update(sizes)
    for name in names:
        try:
            raw = _read_index(backend, name, cache_dir)
            doc = parse_index(raw, name, MAX_OBJECT)
        except Exception as exc:  # noqa: BLE001 - any failure is doubt, recorded and refused on
            sv.unreadable[name] = f"{type(exc).__name__}: {exc}"
            continue
        actual = sizes.get(name)
        intact = catalog_pack(sv.catalog, name, doc, actual)
        if actual is None:
            continue  # nothing to judge: the pack file is gone
        sv.indexes[name] = doc
        sv.index_digest[name] = blake3.blake3(raw).hexdigest()
        if intact:
            for r in doc["records"]:
                if len(r) == 7:
                    sv.bases.setdefault(bytes.fromhex(r[1]), set()).add(bytes.fromhex(r[6]))
    return sv


def _read_index(backend: Backend, name: str, cache_dir: Path | None) -> bytes:
    cached = cache_dir / f"{name}.idx" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        raw = cached.read_bytes()
        try:
            parse_index(raw, name, MAX_OBJECT)
            return raw
        except MstoreError:
            pass  # a damaged cache: read the remote's copy
    return backend.get(f"packs/{name}.idx")  # BackendNotFound for a listed index: doubt, not absence


# -- marking -----------------------------------------------------------------------------------


@dataclass
class Marks:
    """What is live on the remote, and why marking is in doubt (if it is)."""

    live: set[tuple[str, bytes]]
    absent: list[str]  # reflog roots stored nowhere (collected before): no doubt
    problems: list[str]


class _OnTheRemote(RemoteSource):
    """The fetch path's verified reader, for objects the remote holds only.

    What the remote's refs reach is judged by what the remote has: an object it lacks is
    unreadable here even if this store has a copy (which is still what is read, verified, when
    the remote has it too: no download for what is local).
    """

    def _get(self, kind: str, oid: ObjectId) -> bytes:
        if (kind, oid.digest) not in self.cat.objects:
            self.locate(kind, oid)  # raises, naming a damaged pack if that is where it is
        return super()._get(kind, oid)


def mark(store: Any, backend: Backend, sv: Survey, roots: dict[str, Any]) -> Marks:
    """Mark everything the roots reach on the remote; list every live object it cannot serve."""
    src = _OnTheRemote(store, backend, sv.catalog, MAX_OBJECT)
    ref_ids = set(roots["refs"].values())
    ids = ref_ids | {r[2] for r in roots["reflog"]}
    bad = sorted(i for i in ids if not is_full_id(i))
    live_set = walk(src, [ObjectId(i) for i in sorted(ids) if is_full_id(i)])
    live: set[tuple[str, bytes]] = set()
    for kind, objs in (("m", live_set.commits), ("t", live_set.trees), ("f", live_set.files), ("c", live_set.chunks)):
        live.update((kind, o.digest) for o in objs)
    # Delta chunks keep their bases: every base any record of a live chunk names, down the chain.
    stack = [d for k, d in live if k == "c" and d in sv.bases]
    while stack:
        for base in sv.bases.get(stack.pop(), ()):
            if ("c", base) not in live:
                live.add(("c", base))
                stack.append(base)
    problems = [f"remote ref or reflog entry names {i!r}, which is not an id" for i in bad]
    # A reflog root whose commit is stored nowhere was collected by an earlier proof: no doubt,
    # unless something live still needs it as a parent (then the remote is damaged).
    gone = {
        oid for (kind, oid) in live_set.unreadable
        if kind == "m" and str(oid) in ids and str(oid) not in ref_ids
        and ("m", oid.digest) not in sv.catalog.objects and ("m", oid.digest) not in sv.catalog.damaged_keys
    }
    if gone:
        needed = walk(src, [ObjectId(i) for i in sorted(ids) if is_full_id(i) and i not in gone]).commits
        gone -= needed
    absent = sorted(str(o) for o in gone)
    for (kind, oid), err in sorted(live_set.unreadable.items()):
        if kind == "m" and oid in gone:
            live.discard(("m", oid.digest))
            continue
        problems.append(f"{KINDS[kind]} {oid}: {err}")
    unreadable = {(k, o.digest) for k, o in live_set.unreadable}
    for kind, digest in sorted(live - unreadable):
        if (kind, digest) not in sv.catalog.objects:
            where = sv.catalog.damaged_keys.get((kind, digest))
            why = f"only in pack {where}, which is {sv.catalog.damaged[where]}" if where else "not on the remote"
            problems.append(f"live {KINDS[kind]} {digest.hex()} is {why}")
    return Marks(live, absent, problems)


def _live_digest(live: set[tuple[str, bytes]]) -> str:
    h = blake3.blake3()
    for kind, digest in sorted(live):
        h.update(kind.encode() + digest)
    return h.hexdigest()


# -- plan ----------------------------------------------------------------------------------------


def _policy(policy: dict[str, Any]) -> dict[str, Any]:
    return {k: policy.get(k, POLICY_DEFAULTS[k]) for k in POLICY_KEYS}


def _bad_policy(policy: dict[str, Any]) -> list[str]:
    """Every policy value that is not a finite, non-negative number."""
    out = []
    for k in POLICY_KEYS:
        v = policy.get(k)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        if not ok:
            out.append(f"policy {k} is {v!r}: it must be a finite number, not negative")
    return out


def below_floor(policy: dict[str, Any], floor: dict[str, Any]) -> list[str]:
    """Every value of a proof's policy below this store's configured one (the floor)."""
    out = []
    for k in FLOOR_KEYS:
        want = float(floor.get(k, POLICY_DEFAULTS[k]))
        if float(policy[k]) < want:
            out.append(f"the proof's {k} is {float(policy[k]):g}, below this store's {want:g} ([gc] {k} in "
                       f"config.toml is the floor: a proof cannot lower it)")
    return out


def _dead_bytes(records: list[list[Any]]) -> int:
    return sum(RECORD.size + r[3] for r in records)


def plan(
    store: Any,
    backend: Backend,
    remote: str,
    url: str,
    now: float,
    policy: dict[str, Any],
    user: str,
    cache_dir: Path | None = None,
) -> tuple[str, dict[str, Any]]:
    """Compute and store a remote gc proof; returns ``(proof id, document)``. Deletes nothing.

    Raises:
        GcRefused: a live object cannot be read or is not on the remote, or a listed pack index
            cannot be read (all are listed); no proof is written.
        RemoteIntegrityError: a listed remote reflog entry cannot be read.
        UserError: the remote is not an mstore remote yet (nothing pushed), or a policy value is
            not a finite, non-negative number.
    """
    policy = _policy(policy)
    bad = _bad_policy(policy)
    if bad:
        raise UserError(f"remote gc plan for {remote!r}: {'; '.join(bad)}")
    if check_layout(backend) is None:
        raise UserError(f"remote {remote!r} ({url}) is empty: nothing to collect")
    state = read_state(backend)
    sv = survey(backend, cache_dir)
    roots = state.roots(now, float(policy["retention_days"]))
    marks = mark(store, backend, sv, roots)
    problems = sv.doubts() + marks.problems
    if problems:
        raise GcRefused(
            f"remote gc plan for {remote!r} refused: some live objects or pack indexes cannot be read, so nothing "
            f"is safe to delete",
            problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else []),
        )
    grace_cut = now - float(policy["grace_days"]) * DAY
    candidates, partial, young = [], [], 0
    dead_records: dict[str, list[list[Any]]] = {}
    for name in sorted(sv.sizes):
        created = pack_created(name)
        old_enough = created is not None and created < grace_cut
        doc = sv.indexes.get(name)
        if name in sv.catalog.damaged or name in sv.unreadable:
            continue  # reported below; never judged from an index its pack does not match
        if doc is None:
            if old_enough:
                candidates.append({
                    "pack": name, "bytes": sv.sizes[name], "records": None, "index": None, "meta": None,
                    "created": created, "refs": [],
                    "reason": "no index: left by a push killed before it finished; never visible to readers",
                })
            else:
                young += 1
            continue
        dead = [r for r in doc["records"] if (r[0], bytes.fromhex(r[1])) not in marks.live]
        if len(dead) < len(doc["records"]):
            if dead:  # reported, never rewritten or moved: it holds live records (docs/remote-gc.md)
                partial.append({"pack": name, "bytes": sv.sizes[name], "records": len(doc["records"]),
                                "dead_records": len(dead), "dead_bytes": _dead_bytes(dead)})
            continue
        if not old_enough:
            young += 1
            continue
        dead_records[name] = dead
        candidates.append({
            "pack": name, "bytes": sv.sizes[name], "records": len(dead), "index": sv.index_digest[name],
            "meta": bool(doc.get("meta")), "created": created, "refs": [], "reason": "",
        })
    commits = _attribute(store, backend, sv, state, roots, marks, candidates, dead_records, now, policy)
    doc = {
        "type": REMOTE_PROOF_TYPE,
        "version": REMOTE_PROOF_VERSION,
        "remote": {"name": remote, "url": url},
        "created": now,
        "created_by": f"{user}@{socket.gethostname()}",
        "policy": policy,
        "state_digest": state.digest(),
        "roots": {**roots, "absent": marks.absent},
        "live": {"objects": len(marks.live), "digest": _live_digest(marks.live)},
        "candidates": {
            "packs": len(candidates),
            "bytes": sum(c["bytes"] for c in candidates),
            "records": sum(c["records"] or 0 for c in candidates),
            "younger_than_grace": young,
            "partial_packs": len(partial),
            "partial_dead_bytes": sum(p["dead_bytes"] for p in partial),
        },
        "packs": candidates,
        "partial_packs": partial,
        "damaged_packs": [{"pack": n, "problem": p} for n, p in sorted(sv.catalog.damaged.items())],
        "dead_commits": commits,
    }
    return store_proof(store.root, doc), doc


def _attribute(store, backend, sv, state, roots, marks, candidates, dead_records, now, policy) -> list[dict[str, Any]]:
    """Say why each candidate pack is dead: which remote refs' old versions its records belong to.

    Walks, newest first, each reflog value outside the window (a version a ref had once); the
    first ref whose old versions reach a dead record claims it. What cannot be read here is only
    left unattributed: marking, not this, decides what is live.
    """
    if not candidates:
        return []
    dead_keys = {(r[0], bytes.fromhex(r[1])): name for name, rs in dead_records.items() for r in rs}
    in_window = {(r[0], r[1]) for r in roots["reflog"]}
    versions: list[tuple[float, str, int, str, dict]] = []
    for name, entries in state.logs.items():
        for e in entries:
            for key in ("id", "old"):
                v = e.get(key)
                if v and is_full_id(v) and (name, e["seq"]) not in in_window:
                    t = e.get("time") if isinstance(e.get("time"), (int, float)) else 0.0
                    versions.append((t, name, e["seq"], v, e))
    versions.sort(key=lambda x: (-x[0], x[1], -x[2]))
    last: dict[str, tuple[str, float]] = {}  # commit id -> (ref, time last referenced)
    for t, name, _seq, v, _e in versions:
        last.setdefault(v, (name, t))
    deleted = {n: es[-1].get("time") for n, es in state.logs.items() if n not in state.refs and es}
    claimed: dict[tuple[str, bytes], str] = {}
    src = _OnTheRemote(store, backend, sv.catalog, MAX_OBJECT)
    for ref in dict.fromkeys(name for _t, name, _s, _v, _e in versions):
        heads = [ObjectId(v) for _t, n, _s, v, _e in versions
                 if n == ref and ("m", ObjectId(v).digest) not in marks.live]
        if not heads:
            continue
        reached = walk(src, heads)
        for kind, objs in (("m", reached.commits), ("t", reached.trees), ("f", reached.files), ("c", reached.chunks)):
            for o in objs:
                claimed.setdefault((kind, o.digest), ref)
    for key in list(dead_keys):  # a dead delta's base belongs with it
        if key[0] == "c" and key in claimed:
            for base in sv.bases.get(key[1], ()):
                claimed.setdefault(("c", base), claimed[key])
    retention = policy["retention_days"]
    for c in candidates:
        if c["records"] is None:
            continue
        refs = sorted({claimed[k] for k in dead_keys if dead_keys[k] == c["pack"] and k in claimed})
        c["refs"] = [short_name(r) for r in refs]
        unclaimed = sum(1 for k in dead_keys if dead_keys[k] == c["pack"] and k not in claimed)
        parts = []
        for r in refs:
            if r in deleted and isinstance(deleted[r], (int, float)):
                parts.append(f"{short_name(r)} (deleted {(now - deleted[r]) / DAY:.0f} days ago)")
            else:
                t = max((v[0] for v in versions if v[1] == r), default=None)
                ago = f", last referenced {(now - t) / DAY:.0f} days ago" if t else ""
                parts.append(f"old versions of {short_name(r)}{ago}")
        what = f"holds only {', '.join(parts)}" if parts else "holds nothing any remote ref ever named"
        if parts and unclaimed:
            what += f", and {unclaimed} records no remote ref ever named"
        c["reason"] = (f"every record is unreachable from the remote's refs and reflog entries of the last "
                       f"{retention:g} days: {what}")
    commits = []
    for key, pack in sorted(dead_keys.items(), key=lambda kv: kv[0][1]):
        if key[0] != "m":
            continue
        cid = ObjectId.from_digest(key[1])
        info: dict[str, Any] = {"id": str(cid), "pack": pack}
        ref, t = last.get(str(cid), (None, None))
        info["ref"] = short_name(ref) if ref else None
        info["last_referenced"] = t
        try:
            commit = Commit.parse(src.get("m", cid))
            info.update(message=commit.message, time=commit.time, kind=commit.kind)
        except MstoreError:
            info.update(message=None, time=None, kind=None)
        commits.append(info)
    return commits


# -- loading proofs --------------------------------------------------------------------------------


def load_proof(root: Path, prefix: str) -> tuple[str, dict[str, Any]]:
    """A stored remote gc proof by id or prefix, checked (not edited, well formed).

    Raises:
        UserError, NotFound, IntegrityError (edited, or malformed: a hostile document), or
        UnsupportedFormat (see :func:`mstore.gc.read_proof`).
    """
    pid, doc = read_proof(root, prefix, {REMOTE_PROOF_TYPE: REMOTE_PROOF_VERSION})
    _check_shape(pid, doc)
    return pid, doc


def proof_type(root: Path, prefix: str) -> tuple[str, str | None]:
    """``(proof id, remote name)`` of a stored proof (remote None for a local gc proof)."""
    pid, doc = read_proof(root, prefix, {PROOF_TYPE: PROOF_VERSION, REMOTE_PROOF_TYPE: REMOTE_PROOF_VERSION})
    if doc["type"] != REMOTE_PROOF_TYPE:
        return pid, None
    _check_shape(pid, doc)
    return pid, doc["remote"]["name"]


def _check_shape(pid: str, doc: dict[str, Any]) -> None:
    """Refuse a proof whose fields are not what plan writes (a hash only says it was not edited)."""

    def num(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    ok = (
        isinstance(doc.get("remote"), dict)
        and isinstance(doc["remote"].get("name"), str)
        and isinstance(doc["remote"].get("url"), str)
        and num(doc.get("created"))
        and isinstance(doc.get("policy"), dict)
        and all(num(doc["policy"].get(k)) for k in POLICY_KEYS)
        and isinstance(doc.get("packs"), list)
        and isinstance(doc.get("state_digest"), str)
    )
    # What `gc show` and an interactive apply print (so a well-hashed proof without it is
    # refused here, not met as a traceback there).
    cand, roots = doc.get("candidates"), doc.get("roots")
    ok = (
        ok
        and isinstance(doc.get("created_by"), str)
        and isinstance(cand, dict)
        and all(num(cand.get(k)) for k in ("packs", "bytes", "records"))
        and isinstance(roots, dict)
        and isinstance(roots.get("refs"), (dict, list))
        and all(isinstance(n, str) for n in roots["refs"])
        and isinstance(roots.get("reflog"), list)
        and all(isinstance(e, (list, tuple)) and len(e) >= 2 for e in roots["reflog"])
        and isinstance(doc.get("partial_packs"), list)
        and all(isinstance(p, dict) and num(p.get("dead_bytes")) for p in doc["partial_packs"])
        and isinstance(doc.get("damaged_packs"), list)
        and all(isinstance(p, dict) and isinstance(p.get("pack"), str) and isinstance(p.get("problem"), str)
                for p in doc["damaged_packs"])
        and isinstance(doc.get("dead_commits"), list)
        and all(isinstance(c, dict) and isinstance(c.get("id"), str) for c in doc["dead_commits"])
    )
    # A proof from when remote gc repacked partly dead packs: it is never applied (plan again).
    ok = ok and not doc.get("repack")
    if ok:
        for p in doc["packs"]:
            if not (
                isinstance(p, dict)
                and isinstance(p.get("pack"), str)
                and _PACK_NAME.fullmatch(p["pack"])
                and isinstance(p.get("bytes"), int)
                and (p.get("index") is None or (isinstance(p["index"], str) and is_full_id(p["index"])))
                and (p.get("records") is None or num(p["records"]))
                and isinstance(p.get("reason"), str)
            ):
                ok = False
                break
        names = [p["pack"] for p in doc["packs"]]
        ok = ok and len(set(names)) == len(names)
    if not ok:
        raise IntegrityError(f"remote gc proof {pid[:7]} is malformed: refusing it")


# -- status on the remote -----------------------------------------------------------------------


def _trash(pid: str) -> str:
    return f"trash/{pid}/"


def proof_status(backend: Backend, pid: str) -> str | None:
    """``applied``, ``undone`` or ``purged`` (from the markers under ``trash/<proof>/``), or None."""
    status = None
    for action in _MARKERS:
        if backend.stat(f"{_trash(pid)}{action}.json") is not None:
            status = action
    return status


def _put_marker(backend: Backend, pid: str, action: str, now: float, user: str, **extra: Any) -> None:
    body = {"proof": pid, "action": action, "time": now, "user": user, "host": socket.gethostname(), **extra}
    backend.put(f"{_trash(pid)}{action}.json", canonical_json(body))


def log(backend: Backend) -> list[dict[str, Any]]:
    """The remote gc audit log: every proof started, applied, undone or purged here, oldest first.

    A ``started`` entry with no later ``applied`` or ``undone`` of its proof gets
    ``"unfinished": true``: an apply was interrupted (run it again to finish, or undo it).
    """
    out = []
    for key, _size in backend.list("trash/"):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] in {f"{a}.json" for a in _LOG_ACTIONS}:
            try:
                e = json.loads(backend.get(key))
            except (ValueError, BackendNotFound):
                continue
            ok = (isinstance(e, dict) and e.get("proof") == parts[1] and f"{e.get('action')}.json" == parts[2]
                  and isinstance(e.get("time"), (int, float)) and not isinstance(e.get("time"), bool)
                  and math.isfinite(e["time"]) and isinstance(e.get("user", ""), str))
            if ok:  # a marker that is not what apply, undo or purge wrote is no audit entry
                out.append(e)
    out.sort(key=lambda e: (e["time"], _LOG_ACTIONS.index(e["action"])))
    ended = {e["proof"] for e in out if e["action"] in ("applied", "undone")}
    for e in out:
        if e["action"] == "started":
            e["unfinished"] = e["proof"] not in ended
    return out


# -- verify ------------------------------------------------------------------------------------


def _check_remote(doc: dict[str, Any], remote: str, url: str) -> list[str]:
    r = doc["remote"]
    if r["name"] != remote or r["url"] != url:
        return [f"the proof is for remote {r['name']!r} ({r['url']}), not {remote!r} ({url})"]
    return []


def verify(
    store: Any, backend: Backend, pid: str, doc: dict[str, Any], now: float, remote: str, url: str,
    cache_dir: Path | None = None, floor: dict[str, Any] | None = None,
) -> Verdict:
    """Re-read the remote's refs, reflogs and packs, re-mark, and list every reason the proof fails.

    ``floor`` is this store's configured gc policy (default: the built-in one): a proof whose
    retention or grace period is below it is refused, whatever it says.
    """
    return _verify(store, backend, pid, doc, now, remote, url, cache_dir, floor)[0]


def _verify(store, backend, pid, doc, now, remote, url, cache_dir=None, floor=None) -> tuple[Verdict, Marks | None]:
    reasons = _check_remote(doc, remote, url)
    if reasons:  # never judge one remote's packs by another's proof
        return Verdict(pid, False, reasons, None), None
    policy = doc["policy"]
    reasons = _bad_policy(policy)
    if reasons:  # a NaN retention would make every reflog entry old
        return Verdict(pid, False, reasons, None), None
    reasons = below_floor(policy, POLICY_DEFAULTS if floor is None else floor)
    status = proof_status(backend, pid)
    if status is not None:
        reasons.append(f"the proof was already {status}")
    created = float(doc["created"])
    # The configured proof age is a ceiling, as retention and grace are floors: a proof cannot
    # raise it, nor claim to be made in the future (more than a clock's skew ahead).
    max_age = min(
        float(policy["proof_max_age_seconds"]),
        float((POLICY_DEFAULTS if floor is None else floor).get(
            "proof_max_age_seconds", POLICY_DEFAULTS["proof_max_age_seconds"])),
    )
    age = now - created
    if not math.isfinite(created) or created > now + CLOCK_SKEW_SECONDS:
        reasons.append(f"the proof says it was made at {created!r}, after now ({now:.0f}): plan again")
    elif age > max_age:
        reasons.append(f"the proof is {age / 60:.0f} minutes old; the limit is {max_age / 60:.0f} (plan again)")
    state = read_state(backend)
    sv = survey(backend, cache_dir)
    roots = state.roots(now, float(policy["retention_days"]))
    marks = mark(store, backend, sv, roots)
    reasons += sv.doubts()
    if marks.problems:
        reasons.append(f"{len(marks.problems)} live objects cannot be read; nothing is safe to delete "
                       f"(e.g. {marks.problems[0]})")
    grace_cut = now - float(policy["grace_days"]) * DAY
    reachable: list[str] = []
    for p in doc["packs"]:
        name = p["pack"]
        created = pack_created(name)
        if created is None or created >= grace_cut:
            reasons.append(f"pack {name} is younger than the {policy['grace_days']:g}-day grace period")
        moved = _moved_copy(backend, pid, name, p)
        if name not in sv.sizes and not moved:
            reasons.append(f"pack {name} is no longer on the remote")
            continue
        if name in sv.sizes and sv.sizes[name] != p["bytes"]:
            reasons.append(f"pack {name} is {sv.sizes[name]:,} bytes, not {p['bytes']:,} as planned")
            continue
        if p["index"] is None:
            if name in sv.indexes or name in sv.unreadable:
                reasons.append(f"pack {name} has an index now (a push finished it)")
            continue
        idx = _index_of(backend, pid, name, p, sv)
        if idx is None:
            reasons.append(f"the index of pack {name} changed or vanished since the plan")
            continue
        live = [r for r in idx["records"] if (r[0], bytes.fromhex(r[1])) in marks.live]
        if live:
            reachable.append(f"pack {name}: {KINDS[live[0][0]]} {live[0][1]}")
    if reachable:
        reasons.append(f"{len(reachable)} candidate packs hold objects reachable from the remote's current refs "
                       f"and reflog (e.g. {reachable[0]})")
    return Verdict(pid, not reasons, reasons, status), marks


def _moved_copy(backend: Backend, pid: str, name: str, p: dict[str, Any]) -> bool:
    """True if an interrupted apply of this proof already put the pack into its trash."""
    return backend.stat(f"{_trash(pid)}packs/{name}.pack") == p["bytes"]


def _index_of(backend: Backend, pid: str, name: str, p: dict[str, Any], sv: Survey) -> dict[str, Any] | None:
    """The candidate's index as planned (from ``packs/``, or this proof's trash), read from the remote."""
    for key in (f"packs/{name}.idx", f"{_trash(pid)}packs/{name}.idx"):
        try:
            raw = backend.get(key)  # not from a cache: what is deleted is judged by what is there
        except BackendNotFound:
            continue
        if blake3.blake3(raw).hexdigest() != p["index"]:
            return None
        return parse_index(raw, name, MAX_OBJECT)
    return None


# -- apply, undo, purge ---------------------------------------------------------------------------


@dataclass
class RemoteApplyResult:
    """What an applied remote proof did."""

    proof: str
    remote: str
    packs: int  # dead packs moved to the trash
    bytes: int  # their size
    kept: list[str] = field(default_factory=list)  # candidates without index that have one now: not moved

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"proof": self.proof, "remote": self.remote, "packs": self.packs, "bytes": self.bytes,
                "kept": self.kept, "trash": _trash(self.proof)}


def _copy(backend: Backend, src: str, dst: str, size: int, tmp: Path) -> None:
    """Copy one remote object to another key through a local temporary file; check its size.

    Raises:
        IntegrityError: the copy is not the size it must be (nothing is deleted then).
    """
    path = tmp / "copy"
    backend.get_file(src, path)
    if path.stat().st_size != size:
        raise IntegrityError(f"remote {src} is {path.stat().st_size:,} bytes, not {size:,}: not moving it")
    backend.put_file(dst, path)
    if backend.stat(dst) != size:
        raise IntegrityError(f"the copy of remote {src} at {dst} is not {size:,} bytes: not deleting the original")
    path.unlink()


def _tmpdir(store: Any):
    base = Path(store.root) / "tmp"
    return tempfile.TemporaryDirectory(dir=base if base.is_dir() else None, prefix="remote-gc-")


def apply(
    store: Any, backend: Backend, pid: str, doc: dict[str, Any], now: float, user: str, remote: str, url: str,
    crash_hook: Hook | None = None, floor: dict[str, Any] | None = None,
) -> RemoteApplyResult:
    """Under the remote's gc lock, re-verify the proof and move its candidate packs to the trash.

    For each pack: check the lock is still ours, copy the pack and then its index to
    ``trash/<proof>/packs/``, delete the index from ``packs/`` (from then on no reader or pusher
    counts its records), then the pack. A candidate planned without an index whose ``.idx`` key
    exists now (read directly, not from a listing) stays. A crash leaves each pack either in
    ``packs/`` (maybe also copied) or in the trash (maybe without its index in ``packs/`` any
    more): applying again finishes; undo brings all back. ``trash/<proof>/started.json`` records
    that an apply began, so ``log`` shows one that never finished.

    Raises:
        RemoteBusy: a push or another gc holds a lock, or this gc's lock was removed or replaced
            while it ran (LockLost); nothing more is moved.
        GcRefused: the proof is not valid now (every reason listed); nothing changed.
    """
    hook = crash_hook or _noop
    raw = canonical_json(doc)
    with gc_lock(backend, user) as lock:
        hook("locked")
        verdict, marks = _verify(store, backend, pid, doc, now, remote, url, floor=floor)  # under the lock
        if not verdict.valid:
            raise GcRefused(f"remote gc proof {pid[:7]} cannot be applied", verdict.reasons)
        backend.put_if_absent(f"{_trash(pid)}proof.json", raw)
        _put_marker(backend, pid, "started", now, user, packs=len(doc["packs"]))
        kept: list[str] = []
        moved = 0
        with _tmpdir(store) as tmp:
            for p in doc["packs"]:
                name, size = p["pack"], p["bytes"]
                tkey = f"{_trash(pid)}packs/{name}"
                if p["index"] is None and backend.stat(f"packs/{name}.idx") is not None:
                    kept.append(name)  # a push finished it after the listing: never judged, kept
                    continue
                lock.refresh()  # still ours? (copying terabytes may also outlast the stale age)
                if backend.stat(f"{tkey}.pack") != size:
                    _copy(backend, f"packs/{name}.pack", f"{tkey}.pack", size, Path(tmp))
                hook("pack-copied")
                if p["index"] is not None:
                    isize = backend.stat(f"packs/{name}.idx")
                    if isize is not None and backend.stat(f"{tkey}.idx") != isize:
                        _copy(backend, f"packs/{name}.idx", f"{tkey}.idx", isize, Path(tmp))
                    hook("index-copied")
                    lock.refresh()
                    backend.delete(f"packs/{name}.idx")  # first: nobody dedups against it any more
                    hook("index-deleted")
                backend.delete(f"packs/{name}.pack")
                hook("pack-deleted")
                moved += 1
        total = sum(p["bytes"] for p in doc["packs"] if p["pack"] not in kept)
        _put_marker(backend, pid, "applied", now, user, packs=moved, bytes=total, kept=kept)
    return RemoteApplyResult(pid, remote, moved, total, kept)


def _trash_packs(backend: Backend, pid: str) -> dict[str, dict[str, int]]:
    """What the proof's trash holds: pack name -> {"pack": size, "idx": size}."""
    out: dict[str, dict[str, int]] = {}
    prefix = f"{_trash(pid)}packs/"
    for key, size in backend.list(prefix):
        name = key[len(prefix):]
        for ext in ("pack", "idx"):
            if name.endswith(f".{ext}") and _PACK_NAME.fullmatch(name[: -len(ext) - 1]):
                out.setdefault(name[: -len(ext) - 1], {})[ext] = size
    return out


def undo(store: Any, backend: Backend, pid: str, now: float, user: str) -> int:
    """Under the gc lock, move an applied (or interrupted) proof's packs back; returns the pack count.

    Each pack is copied back before its index (R1), then the trash copies are deleted. Undo
    deletes nothing under ``packs/``.

    Raises:
        RemoteBusy: a push or another gc holds a lock (or this one's lock was lost). GcRefused:
            nothing to undo (the proof was not applied here, or was undone or purged).
    """
    with gc_lock(backend, user) as lock:
        status = proof_status(backend, pid)
        held = _trash_packs(backend, pid)
        if status not in ("applied", None) or (status is None and not held):
            raise GcRefused(f"remote gc proof {pid[:7]} cannot be undone", [f"its status is {status or 'not applied'}"])
        with _tmpdir(store) as tmp:
            for name, sizes in sorted(held.items()):
                tkey = f"{_trash(pid)}packs/{name}"
                if "pack" not in sizes:
                    continue
                lock.refresh()
                if backend.stat(f"packs/{name}.pack") != sizes["pack"]:
                    _copy(backend, f"{tkey}.pack", f"packs/{name}.pack", sizes["pack"], Path(tmp))
                if "idx" in sizes and backend.stat(f"packs/{name}.idx") != sizes["idx"]:
                    _copy(backend, f"{tkey}.idx", f"packs/{name}.idx", sizes["idx"], Path(tmp))
                backend.delete(f"{tkey}.idx")
                backend.delete(f"{tkey}.pack")
        _put_marker(backend, pid, "undone", now, user, packs=len(held))
    return len(held)


def _trashed_proof(backend: Backend, pid: str) -> tuple[dict[str, Any] | None, str]:
    """The proof apply copied to ``trash/<proof>/proof.json``, checked; or None and why not."""
    try:
        raw = backend.get(f"{_trash(pid)}proof.json")
    except BackendNotFound:
        return None, "its proof is not in its trash (trash/PROOF/proof.json)"
    if blake3.blake3(raw).hexdigest() != pid:
        return None, "the proof in its trash does not hash to its id"
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, "the proof in its trash is not JSON"
    if not isinstance(doc, dict) or not isinstance(doc.get("policy"), dict) or not isinstance(doc.get("packs"), list):
        return None, "the proof in its trash is malformed"
    bad = _bad_policy(doc["policy"])
    if bad:
        return None, bad[0]
    return doc, ""


def _live_in_trash(backend: Backend, pid: str, pdoc: dict[str, Any], held: dict[str, dict[str, int]],
                   live: set[tuple[str, bytes]]) -> str:
    """Why the trash of proof ``pid`` must not be purged now ("" if it may)."""
    planned = {p.get("pack"): p for p in pdoc["packs"] if isinstance(p, dict)}
    for name, sizes in sorted(held.items()):
        p = planned.get(name)
        if p is None:
            return f"its trash holds pack {name}, which its proof does not list"
        if "idx" not in sizes:
            if p.get("index") is None:
                continue  # planned without index: never visible to any reader
            return f"pack {name} is in its trash without its index"
        try:
            idx = parse_index(backend.get(f"{_trash(pid)}packs/{name}.idx"), name, MAX_OBJECT)
        except Exception as exc:  # noqa: BLE001 - unreadable is doubt
            return f"the index of pack {name} in its trash cannot be read ({type(exc).__name__}: {exc})"
        for r in idx["records"]:
            if (r[0], bytes.fromhex(r[1])) in live:
                return f"pack {name} in its trash holds {KINDS[r[0]]} {r[1]}, which is live now"
    return ""


def purge(store: Any, backend: Backend, now: float, quarantine_days: float, user: str,
          dry_run: bool = False, retention_days: float = POLICY_DEFAULTS["retention_days"]) -> list[dict[str, Any]]:
    """Under the gc lock, delete for good the trash of proofs applied over the quarantine period ago.

    The point of no return on the remote: afterwards the remote reflog entries that named those
    versions lead nowhere. So first, under the lock, the refs and reflogs are read again and
    everything marked again (retention: the larger of ``retention_days`` and each due proof's);
    a proof whose trash holds a record live now is skipped (listed with ``skipped``), and purge
    refuses outright if a live object cannot be read. A proof is due when both its own
    quarantine and ``quarantine_days`` have passed since it was applied.

    Raises:
        RemoteBusy: a push or another gc holds a lock (or this one's lock was lost).
        GcRefused: a live object is unreadable or missing, or a listed index cannot be read
            (perhaps its only copy is in a trash: ``gc undo`` brings it back); nothing deleted.
        RemoteIntegrityError: a listed remote reflog entry cannot be read; nothing deleted.
    """
    if _bad_policy({**POLICY_DEFAULTS, "quarantine_days": quarantine_days, "retention_days": retention_days}):
        raise UserError(f"quarantine {quarantine_days!r} and retention {retention_days!r} days must be finite, "
                        "not negative")
    with gc_lock(backend, user) as lock:
        applied: dict[str, dict[str, Any]] = {}
        for e in log(backend):
            if e.get("action") == "applied":
                applied[e["proof"]] = e
            elif e.get("action") in ("undone", "purged"):
                applied.pop(e.get("proof"), None)
        out: list[dict[str, Any]] = []
        due: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        for pid, e in sorted(applied.items()):
            if not is_full_id(pid):
                continue
            pdoc, why = _trashed_proof(backend, pid)
            quarantine = max(float(quarantine_days), float(pdoc["policy"]["quarantine_days"]) if pdoc else 0.0)
            if now - float(e["time"]) < quarantine * DAY:
                continue
            if pdoc is None:
                out.append({"proof": pid, "applied": e["time"], "packs": 0, "bytes": 0, "skipped": why})
                continue
            due.append((pid, e, pdoc))
        if not due:
            return out
        retention = max([float(retention_days)] + [float(d["policy"]["retention_days"]) for _p, _e, d in due])
        state = read_state(backend)
        sv = survey(backend)
        marks = mark(store, backend, sv, state.roots(now, retention))
        problems = sv.doubts() + marks.problems
        if problems:
            raise GcRefused("remote gc purge refused: some live objects or pack indexes cannot be read (a trash may "
                            "hold their only copy: gc undo PROOF brings it back); nothing was deleted", problems[:20])
        for pid, e, pdoc in due:
            held = _trash_packs(backend, pid)
            size = sum(s.get("pack", 0) + s.get("idx", 0) for s in held.values())
            item = {"proof": pid, "applied": e["time"], "packs": len(held), "bytes": size, "skipped": None}
            out.append(item)
            why = _live_in_trash(backend, pid, pdoc, held, marks.live)
            if why:
                item["skipped"] = why
                continue
            if dry_run:
                continue
            for name in held:
                lock.refresh()  # the point of no return: only while the lock is still ours
                backend.delete(f"{_trash(pid)}packs/{name}.idx")
                backend.delete(f"{_trash(pid)}packs/{name}.pack")
            _put_marker(backend, pid, "purged", now, user, packs=len(held), bytes=size)
    return sorted(out, key=lambda i: i["proof"])


__all__ = [
    "REMOTE_PROOF_TYPE",
    "RemoteApplyResult",
    "RemoteState",
    "Survey",
    "apply",
    "below_floor",
    "load_proof",
    "log",
    "mark",
    "open_remote",
    "plan",
    "proof_status",
    "proof_type",
    "purge",
    "read_state",
    "remote_settings",
    "survey",
    "undo",
    "verify",
]
