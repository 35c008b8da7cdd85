"""fsck: verify every index entry, object, ref and reflog entry; say what damage affects.

A damaged object is reported with the files (by path) and commits (by id and the refs that
reach them) it affects, so a user knows which versions to restore from a backup and which are
safe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import MstoreError
from .hashing import ObjectId
from .objects import TREE_KIND, load_commit, load_file, load_tree
from .refs import short_name
from .storage.index import KINDS
from .storage.packs import SUFFIX
from .storage.store import ObjectStore


@dataclass
class FsckReport:
    """What fsck found; ``ok`` only if nothing is damaged or dangling."""

    objects: int = 0
    bytes: int = 0
    damaged: list[dict[str, Any]] = field(default_factory=list)
    refs: list[dict[str, Any]] = field(default_factory=list)
    reflog: list[dict[str, Any]] = field(default_factory=list)
    orphan_packs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True if the store is consistent (orphan packs are harmless leftovers, not damage)."""
        return not (self.damaged or self.refs or self.reflog)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "ok": self.ok,
            "objects_checked": self.objects,
            "bytes_checked": self.bytes,
            "damaged": self.damaged,
            "refs": self.refs,
            "reflog": self.reflog,
            "orphan_packs": self.orphan_packs,
        }


def fsck(store: ObjectStore, progress: Callable[[int], None] | None = None) -> FsckReport:
    """Check the whole store; never raises for damage, reports it."""
    report = FsckReport()
    # A fresh look at the disk: cached descriptors would keep reading a pack that was deleted.
    store.forget_pack_names()
    bad: dict[tuple[str, ObjectId], str] = {}
    for kind, oid, entry in store.iter_entries():
        report.objects += 1
        report.bytes += entry.raw_len
        try:
            store.get(kind, oid, entry)
        except MstoreError as exc:
            bad[(kind, oid)] = str(exc)
        if progress:
            progress(entry.raw_len)

    with store.index.read() as txn:
        refs = [(name, ObjectId.from_digest(d)) for name, d in txn.iter_refs()]
        reflog = [(seq, e) for seq, e in txn.iter_reflog(newest_first=False)]
        registered = {rec["name"] for _n, rec in txn.iter_packs()}
        # Commits an applied gc proof collected: reflog entries may name them; that is history,
        # not damage.
        collected = {k[1:].hex(): v.decode() for k, v in txn.db_items("collected", b"m")}

    # Refs and reflog: every target must be an intact commit whose whole history is readable.
    roots: dict[ObjectId, list[str]] = {}
    for name, oid in refs:
        roots.setdefault(oid, []).append(short_name(name))
        if not store.has("m", oid):
            report.refs.append({"ref": name, "id": oid, "problem": "points at a commit that is not in the store"})
    for seq, e in reflog:
        for key in ("old", "new"):
            val = e.get(key)
            if val is None:
                continue
            oid = ObjectId(val)
            if oid in collected and not store.has("m", oid):
                continue
            roots.setdefault(oid, [])
            if not store.has("m", oid):
                report.reflog.append(
                    {
                        "seq": seq,
                        "ref": e.get("ref"),
                        "field": key,
                        "id": val,
                        "problem": "names a commit that is not in the store",
                    }
                )

    # Reachability from every root: objects that are missing (not merely damaged) also count.
    affected = _affected(store, roots, bad)
    for (kind, oid), err in sorted(bad.items()):
        files, commits = affected.get((kind, oid), (set(), {}))
        report.damaged.append(
            {
                "kind": KINDS[kind],
                "id": oid,
                "error": err,
                "files": sorted(files),
                "commits": [{"id": c, "refs": sorted(set(r))} for c, r in sorted(commits.items())],
            }
        )
    for (kind, oid), (files, commits) in sorted(affected.items()):
        if (kind, oid) in bad:
            continue
        report.damaged.append(
            {
                "kind": KINDS[kind],
                "id": oid,
                "error": "missing: referenced but not in the store",
                "files": sorted(files),
                "commits": [{"id": c, "refs": sorted(set(r))} for c, r in sorted(commits.items())],
            }
        )

    for path in sorted(store.packs_dir.glob("*" + SUFFIX)):
        if path.name not in registered:
            report.orphan_packs.append({"pack": path.name, "bytes": path.stat().st_size})
    return report


def _affected(
    store: ObjectStore, roots: dict[ObjectId, list[str]], bad: dict[tuple[str, ObjectId], str]
) -> dict[tuple[str, ObjectId], tuple[set[str], dict[str, list[str]]]]:
    """Map each damaged or missing object to (paths, {commit id: refs}) that it breaks."""
    out: dict[tuple[str, ObjectId], tuple[set[str], dict[str, list[str]]]] = {}
    tree_memo: dict[ObjectId, list[tuple[str, tuple[str, ObjectId]]]] = {}

    def problem(kind: str, oid: ObjectId) -> bool:
        return (kind, oid) in bad or not store.has(kind, oid)

    def broken_in_tree(tid: ObjectId) -> list[tuple[str, tuple[str, ObjectId]]]:
        if tid in tree_memo:
            return tree_memo[tid]
        found: list[tuple[str, tuple[str, ObjectId]]] = []
        tree_memo[tid] = found
        if problem("t", tid):
            found.append(("", ("t", tid)))
            return found
        try:
            tree = load_tree(store, tid)
        except MstoreError:
            found.append(("", ("t", tid)))
            return found
        for e in tree.entries:
            if e.kind == TREE_KIND:
                for sub, key in broken_in_tree(e.id):
                    found.append((f"{e.name}/{sub}" if sub else e.name, key))
            elif problem("f", e.id):
                found.append((e.name, ("f", e.id)))
            else:
                try:
                    fobj = load_file(store, e.id)
                except MstoreError:
                    found.append((e.name, ("f", e.id)))
                    continue
                for cid, _n in fobj.chunks:
                    if problem("c", cid):
                        found.append((e.name, ("c", cid)))
        return found

    # Pass 1: which refs reach each commit (walk parents from every ref tip first, so the
    # labels are complete before any damage is attributed).
    labels: dict[ObjectId, set[str]] = {}
    parents: dict[ObjectId, tuple[ObjectId, ...]] = {}
    for tip, refs in roots.items():
        stack = [tip]
        while stack:
            cid = stack.pop()
            have = labels.setdefault(cid, set())
            if cid in parents and set(refs) <= have:
                continue
            have.update(refs)
            if cid not in parents:
                try:
                    parents[cid] = load_commit(store, cid).parents if not problem("m", cid) else ()
                except MstoreError:
                    parents[cid] = ()
            stack.extend(parents[cid])
    # Pass 2: attribute every broken object to the commits (and refs) that contain it.
    for cid in labels:
        if problem("m", cid):
            out.setdefault(("m", cid), (set(), {}))[1].setdefault(cid, []).extend(sorted(labels[cid]))
            continue
        try:
            commit = load_commit(store, cid)
        except MstoreError:
            continue
        for path, key in broken_in_tree(commit.tree):
            files, commits = out.setdefault(key, (set(), {}))
            if path:
                files.add(path)
            commits.setdefault(cid, []).extend(sorted(labels[cid]))
    return out
