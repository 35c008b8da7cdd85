"""From roots to the live set: commit → parents → tree → files → chunks.

Shared by fsck (what does a damaged object affect?), gc (what must never be deleted?) and push
(what does the other side lack?). The walk never guesses: an object it cannot read is reported,
and callers that delete (gc) must treat any such report as "keep everything".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .errors import MstoreError
from .hashing import ObjectId
from .objects import TREE_KIND, load_commit, load_file, load_tree


@dataclass
class LiveSet:
    """Everything reachable, by kind, plus what could not be read."""

    commits: set[ObjectId] = field(default_factory=set)
    trees: set[ObjectId] = field(default_factory=set)
    files: set[ObjectId] = field(default_factory=set)
    chunks: set[ObjectId] = field(default_factory=set)
    unreadable: dict[tuple[str, ObjectId], str] = field(default_factory=dict)

    def contains(self, kind: str, oid: ObjectId) -> bool:
        """True if the object is live."""
        return oid in {"m": self.commits, "t": self.trees, "f": self.files, "c": self.chunks}[kind]

    @property
    def complete(self) -> bool:
        """True if every reachable object could be read."""
        return not self.unreadable


def walk(
    store,
    roots: Iterable[ObjectId],
    follow_parents: bool = True,
    on_object: Callable[[str, ObjectId], None] | None = None,
    tree_roots: Iterable[ObjectId] = (),
    file_roots: Iterable[ObjectId] = (),
) -> LiveSet:
    """Mark everything reachable from the commit ids ``roots`` (and from extra trees and files)."""
    live = LiveSet()
    stack = [ObjectId(r) for r in roots]
    trees: list[ObjectId] = [ObjectId(t) for t in tree_roots]
    for fid in file_roots:
        fid = ObjectId(fid)
        if fid in live.files:
            continue
        live.files.add(fid)
        try:
            fobj = load_file(store, fid)
        except MstoreError as exc:
            live.unreadable[("f", fid)] = str(exc)
            continue
        for chunk_id, _n in fobj.chunks:
            live.chunks.add(chunk_id)
    while stack:
        cid = stack.pop()
        if cid in live.commits:
            continue
        live.commits.add(cid)
        if on_object:
            on_object("m", cid)
        try:
            commit = load_commit(store, cid)
        except MstoreError as exc:
            live.unreadable[("m", cid)] = str(exc)
            continue
        trees.append(commit.tree)
        if follow_parents:
            stack.extend(p for p in commit.parents if p not in live.commits)
    while trees:
        tid = trees.pop()
        if tid in live.trees:
            continue
        live.trees.add(tid)
        if on_object:
            on_object("t", tid)
        try:
            tree = load_tree(store, tid)
        except MstoreError as exc:
            live.unreadable[("t", tid)] = str(exc)
            continue
        for e in tree.entries:
            if e.kind == TREE_KIND:
                if e.id not in live.trees:
                    trees.append(e.id)
            elif e.id not in live.files:
                live.files.add(e.id)
                if on_object:
                    on_object("f", e.id)
                try:
                    fobj = load_file(store, e.id)
                except MstoreError as exc:
                    live.unreadable[("f", e.id)] = str(exc)
                    continue
                for chunk_id, _n in fobj.chunks:
                    live.chunks.add(chunk_id)
    return live
