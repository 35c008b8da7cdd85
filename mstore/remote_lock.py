"""Locks on a remote, so a remote gc never deletes what a concurrent push is about to use.

A push decides what to upload by reading the remote's catalog: an object already in a remote
pack is not sent again, and the ref then moves to a commit that needs it. A remote gc that
deleted that pack between the push's catalog read and its ref swap would leave the remote ref
naming a missing object. Two kinds of lock documents prevent it (docs/remote-gc.md)::

    locks/push/<uuid>.json    held by a push from before it reads the catalog until its ref swap
    locks/gc/<uuid>.json      held by remote gc apply / undo / purge while it re-checks and deletes

The body is canonical JSON ``{"op", "host", "pid", "user", "time"}``.

**Write first, list second.** :func:`push_lock` puts its own document and only then lists
``locks/gc/``; :func:`gc_lock` puts its own and only then lists ``locks/push/`` and
``locks/gc/``. Whoever finds another live lock deletes its own and raises :class:`RemoteBusy`.
S3 (since 2020) and a directory give read-after-write consistent listings, so of two racing
operations the one that lists second sees the other's document: at least one of them backs
off (possibly both, which is safe: both retry). Hence while a gc holds its lock past the check,
no push is between its catalog read and its ref swap, and every push that starts later sees
the catalog after the gc.

A lock older than ``stale_after`` (24 h by default) is *stale*: its holder is presumed dead
(killed without running its clean-up) and it no longer blocks anyone. :func:`remove_locks`
removes stale locks, or fresh ones with ``force`` (``mstore gc unlock --remote NAME``); without
``force`` nothing younger than the stale age is removed, whatever ``older_than`` says.
A lock whose document cannot be parsed has no age: it blocks until removed with ``force``.

A holder checks, with :meth:`Held.refresh`, that its lock document is still the one it wrote
before each step it must not take unprotected (remote gc: before moving each pack); if someone
removed or replaced it, :class:`LockLost` is raised and the holder stops.

Ages are judged by the writers' clocks: a lock's time is its holder's clock, compared with the
reader's. A pusher whose clock is more than the stale age behind looks stale to a gc
(docs/remote-gc.md, "Clocks").
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .errors import RemoteBusy, UserError
from .objects import canonical_json
from .storage.backends import Backend, BackendNotFound

PUSH = "push"
GC = "gc"
OPS = (PUSH, GC)
#: A lock older than this no longer blocks anyone (its holder is presumed dead).
STALE_AFTER = 24 * 3600.0

Clock = Callable[[], float]


@dataclass(frozen=True)
class Lock:
    """One lock document on a remote."""

    key: str
    op: str
    host: str | None
    pid: int | None
    user: str | None
    time: float | None  # None: the document is malformed (no age, never stale)

    def age(self, now: float) -> float | None:
        """Seconds since it was taken (None if unknown)."""
        return None if self.time is None else now - self.time

    def stale(self, now: float, stale_after: float = STALE_AFTER) -> bool:
        """True if older than ``stale_after``; a malformed lock is never stale."""
        return self.time is not None and now - self.time >= stale_after

    def describe(self) -> str:
        """``gc by ada@host (pid 12) since 2026-12-01T11:00:00Z`` (for messages)."""
        if self.time is None:
            return f"an unreadable {self.op} lock {self.key}"
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time))
        return f"{self.op} by {self.user}@{self.host} (pid {self.pid}) since {since}"

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"key": self.key, "op": self.op, "host": self.host, "pid": self.pid, "user": self.user,
                "time": self.time}


def _body(op: str, user: str, now: float) -> bytes:
    return canonical_json({"op": op, "host": socket.gethostname(), "pid": os.getpid(), "user": user, "time": now})


def _parse(key: str, op: str, raw: bytes) -> Lock:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        doc = None
    ok = (
        isinstance(doc, dict)
        and doc.get("op") == op
        and isinstance(doc.get("time"), (int, float))
        and not isinstance(doc.get("time"), bool)
    )
    if not ok:
        return Lock(key, op, None, None, None, None)
    pid = doc.get("pid")
    return Lock(
        key, op, str(doc.get("host")), pid if isinstance(pid, int) else None, str(doc.get("user")), float(doc["time"])
    )


def list_locks(backend: Backend, ops: tuple[str, ...] = OPS) -> list[Lock]:
    """Every lock document of the given kinds now on the remote (one listing per kind)."""
    out = []
    for op in ops:
        prefix = f"locks/{op}/"
        for key, _size in backend.list(prefix):
            if key.count("/") != 2 or not key.endswith(".json"):
                continue
            try:
                raw = backend.get(key)
            except BackendNotFound:
                continue  # released between the listing and the read
            out.append(_parse(key, op, raw))
    return out


class LockLost(RemoteBusy):
    """The lock this process holds was removed or replaced (``gc unlock --force``, or taken for stale)."""


def _busy(mine: str, others: list[Lock], what: str) -> RemoteBusy:
    first = others[0]
    more = f" (and {len(others) - 1} more)" if len(others) > 1 else ""
    return RemoteBusy(
        f"the remote is busy: {what}; it is held by {first.describe()}{more} ({first.key}). Nothing was "
        f"changed; retry later. A lock older than {STALE_AFTER / 3600:.0f} h is stale (its holder died): "
        f"remove it with mstore gc unlock --remote NAME",
        [lk.to_dict() for lk in others],
    )


class Held:
    """A lock this process holds (what the context managers yield)."""

    def __init__(self, backend: Backend, key: str, op: str, user: str, clock: Clock):
        self.backend, self.key, self.op, self.user, self.clock = backend, key, op, user, clock
        self.time = clock()
        self.body = _body(op, user, self.time)  # what is at ``key`` while we hold it

    def check(self) -> None:
        """Raise :class:`LockLost` unless the lock document is still the one this holder wrote."""
        try:
            raw = self.backend.get(self.key)
        except BackendNotFound:
            raw = None
        if raw != self.body:
            what = "removed" if raw is None else "replaced"
            raise LockLost(
                f"this {self.op} lost its lock: {self.key} was {what} while it ran (gc unlock --force, or a "
                f"clock that made it look stale); it stopped before its next step. What it did so far is "
                f"consistent; run it again",
                [],
            )

    def refresh(self, every: float = 3600.0) -> None:
        """Check the lock is still ours, then re-write it with the current time if older than ``every`` s.

        A holder calls this before each step that needs the lock (and so, as it goes, nobody
        takes a long run for dead).

        Raises:
            LockLost: the lock document was removed or replaced; nothing is re-created.
        """
        self.check()
        now = self.clock()
        if now - self.time >= every:
            body = _body(self.op, self.user, now)
            self.backend.put(self.key, body)
            self.time, self.body = now, body


@contextmanager
def _hold(backend: Backend, op: str, user: str, against: tuple[str, ...], what: str,
          stale_after: float, clock: Clock) -> Iterator[Held]:
    held = Held(backend, f"locks/{op}/{uuid.uuid4().hex}.json", op, user, clock)
    backend.put(held.key, held.body)  # 1. write our own lock ...
    try:
        # 2. ... then list: of two racing operations, the one listing second sees the other.
        now = clock()
        others = [lk for lk in list_locks(backend, against) if lk.key != held.key and not lk.stale(now, stale_after)]
        if others:
            raise _busy(held.key, others, what)
        yield held
    finally:
        backend.delete(held.key)


def push_lock(backend: Backend, user: str, *, stale_after: float = STALE_AFTER, clock: Clock = time.time):
    """Hold a push lock from before reading the remote's catalog until the ref swaps are done.

    Takes ``locks/push/<uuid>.json``, then lists ``locks/gc/``; always removes its own lock on
    exit. Pushers do not exclude each other (their ref swaps are compare-and-swap).

    Raises:
        RemoteBusy: a remote gc holds a lock that is not stale (its host, user and start time
            are named); nothing was changed.
    """
    return _hold(backend, PUSH, user, (GC,), "a remote gc is deleting packs", stale_after, clock)


def gc_lock(backend: Backend, user: str, *, stale_after: float = STALE_AFTER, clock: Clock = time.time):
    """Hold the gc lock: for remote gc apply, undo and purge (which re-check refs under it).

    Takes ``locks/gc/<uuid>.json``, then lists ``locks/push/`` and ``locks/gc/``; always
    removes its own lock on exit.

    Raises:
        RemoteBusy: a push or another gc holds a lock that is not stale; nothing was changed.
    """
    return _hold(backend, GC, user, (PUSH, GC), "a push or another gc is running", stale_after, clock)


def remove_locks(
    backend: Backend,
    *,
    older_than: float = STALE_AFTER,
    force: bool = False,
    keys: list[str] | None = None,
    clock: Clock = time.time,
    stale_after: float = STALE_AFTER,
) -> list[Lock]:
    """Remove locks left by dead operations; returns the removed ones.

    Without ``force`` only locks older than both ``older_than`` and ``stale_after`` seconds are
    removed (a younger lock's holder may be alive: ``older_than`` can only raise the bar), and a
    request naming (``keys``) a fresher or unreadable one is refused. With ``force`` every lock
    named (or, without ``keys``, every lock) is removed: only when you know its holder is dead.

    Raises:
        UserError: a named key is not a lock on the remote, or is fresh and ``force`` is not given
            (nothing removed).
    """
    if not force:
        older_than = max(older_than, stale_after)
    now = clock()
    locks = list_locks(backend)
    if keys is not None:
        by_key = {lk.key: lk for lk in locks}
        unknown = [k for k in keys if k not in by_key]
        if unknown:
            raise UserError(f"no lock {unknown[0]} on the remote")
        chosen = [by_key[k] for k in keys]
        fresh = [lk for lk in chosen if not (lk.time is not None and now - lk.time >= older_than)]
        if fresh and not force:
            raise UserError(
                f"lock {fresh[0].key} ({fresh[0].describe()}) is not older than {older_than / 3600:g} h: "
                "its holder may be alive; remove it only with --force if you know it is not"
            )
    else:
        chosen = [lk for lk in locks if force or (lk.time is not None and now - lk.time >= older_than)]
    for lk in chosen:
        backend.delete(lk.key)
    return chosen


__all__ = [
    "GC", "PUSH", "STALE_AFTER", "Held", "Lock", "LockLost", "gc_lock", "list_locks", "push_lock", "remove_locks",
]
