"""Refs (branches, tags), their reflog, and revision expressions.

Names follow git's ``check-ref-format``: a branch ``exp1`` is stored as ``refs/heads/exp1``, a
tag ``v1`` as ``refs/tags/v1``. Every change — create, move, delete — appends a reflog entry in
the *same* LMDB transaction as the change, so the log can never miss a move; deleting a ref
never deletes its reflog.

A reflog entry::

    {"ref": "refs/heads/exp1", "old": "<id or null>", "new": "<id or null>", "time": 1763789457.12,
     "user": "ada", "command": "commit", "message": "step 100"}

Moves are compare-and-swap (:func:`set_if_equals`): the current value is re-read inside the
write transaction, so of two writers racing on one branch exactly one wins.

Revision expressions (:func:`parse_revision`)::

    exp1  refs/heads/exp1  v1  3f2a1c9  <64 hex>     a ref or an id (prefix of >= 7)
    exp1~2  exp1^  exp1^2                               first parent twice; first; second parent
    exp1@{3}  exp1@{2.days.ago}  exp1@{2026-11-20}      the ref's value 3 changes ago / at a time
"""

from __future__ import annotations

import re
import time as _time
from dataclasses import dataclass
from datetime import UTC, datetime

from .errors import Conflict, InvalidName, InvalidRevision
from .hashing import ObjectId
from .storage.index import Txn

HEADS = "refs/heads/"
TAGS = "refs/tags/"
REMOTES = "refs/remotes/"
NAMESPACES = (HEADS, TAGS, REMOTES)

_BAD_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def check_ref_name(name: str) -> str:
    """Validate a full or short ref name the way ``git check-ref-format`` does.

    Raises:
        InvalidName: naming the rule that the name breaks.
    """
    if not isinstance(name, str) or not name:
        raise InvalidName("ref name is empty")
    why = None
    if name.startswith("-"):
        why = "starts with '-'"
    elif name.startswith("/") or name.endswith("/") or "//" in name:
        why = "has an empty path component"
    elif ".." in name:
        why = "contains '..'"
    elif "@{" in name:
        why = "contains '@{'"
    elif name == "@":
        why = "is '@'"
    elif _BAD_CHARS.search(name):
        why = "contains a space, a control character or one of ~ ^ : ? * [ \\"
    elif name.endswith("."):
        why = "ends with '.'"
    else:
        for part in name.split("/"):
            if part.startswith("."):
                why = f"component {part!r} starts with '.'"
                break
            if part.endswith(".lock"):
                why = f"component {part!r} ends with '.lock'"
                break
    if why is None and len(name.encode("utf-8")) > 255:
        why = "is longer than 255 bytes"
    if why:
        raise InvalidName(f"invalid ref name {name!r}: {why}")
    return name


def branch_ref(name: str) -> str:
    """``exp1`` → ``refs/heads/exp1`` (validated; full names pass through)."""
    check_ref_name(name)
    return name if name.startswith(HEADS) else HEADS + name


def tag_ref(name: str) -> str:
    """``v1`` → ``refs/tags/v1`` (validated)."""
    check_ref_name(name)
    return name if name.startswith(TAGS) else TAGS + name


def short_name(full: str) -> str:
    """``refs/heads/exp1`` → ``exp1``; ``refs/tags/v1`` → ``v1``; ``refs/remotes/o/x`` → ``o/x``."""
    for ns in NAMESPACES:
        if full.startswith(ns):
            return full[len(ns) :]
    return full


@dataclass(frozen=True)
class RefChange:
    """Who and why, recorded in the reflog with every change."""

    user: str
    command: str
    message: str = ""


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()


def _hex(d: bytes | None) -> str | None:
    return d.hex() if d is not None else None


def set_if_equals(
    txn: Txn,
    name: str,
    old: bytes | None | _Any,
    new: bytes | None,
    change: RefChange,
    now: float | None = None,
    allow_tag_change: bool = False,
) -> tuple[bool, bytes | None]:
    """Compare-and-swap one ref inside a write transaction, logging the change.

    ``old`` is the value the caller saw (None: must not exist; ``ANY``: no check). ``new`` None
    deletes the ref. A tag, once created, is never moved or deleted unless ``allow_tag_change``
    (a forced and confirmed deletion of a protected ref).

    Returns:
        (won, current): whether the ref was changed, and the value it had.
    """
    current = txn.get_ref(name)
    if old is not ANY and current != old:
        return False, current
    if name.startswith(TAGS) and current is not None and current != new and not allow_tag_change:
        raise Conflict(f"tag {short_name(name)} already exists and tags never move")
    if current == new:
        return True, current
    if new is None:
        txn.delete_ref(name)
    else:
        txn.put_ref(name, new)
    txn.append_reflog(
        name,
        {
            "ref": name,
            "old": _hex(current),
            "new": _hex(new),
            "time": _time.time() if now is None else now,
            "user": change.user,
            "command": change.command,
            "message": change.message,
        },
    )
    return True, current


# -- revision expressions -----------------------------------------------------------------

_SUFFIX = re.compile(r"(~\d*|\^\d*|@\{[^}]*\})")
_AGO = re.compile(r"^(\d+)[. ]?(second|minute|hour|day|week|month|year)s?[. ]ago$", re.IGNORECASE)
_UNIT_SECONDS = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "week": 7 * 86400,
    "month": 30 * 86400,
    "year": 365 * 86400,
}


@dataclass(frozen=True)
class Revision:
    """A parsed revision: a base name, then navigation steps in order."""

    base: str
    steps: tuple[tuple[str, object], ...]  # ("parent", n) | ("ancestor", n) | ("reflog", n) | ("at", t)


def parse_time_spec(spec: str, now: float | None = None) -> float:
    """``2.days.ago``, ``3 hours ago``, ``2026-11-20`` or ``2026-11-20T10:00`` → unix time.

    Raises:
        InvalidRevision: not a time this parser knows.
    """
    now = _time.time() if now is None else now
    m = _AGO.match(spec.strip())
    if m:
        return now - int(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()]
    try:
        dt = datetime.fromisoformat(spec.strip())
    except ValueError:
        raise InvalidRevision(
            f"cannot read {spec!r} as a time (try 2.days.ago, '3 hours ago' or 2026-11-20T10:00)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def parse_revision(text: str, now: float | None = None) -> Revision:
    """Split ``exp1~2@{1}`` into a base and steps.

    Raises:
        InvalidRevision: an empty base, a malformed suffix or ``@{...}``.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidRevision("empty revision")
    m = re.search(r"[~^]|@\{", text)
    base = text if m is None else text[: m.start()]
    rest = "" if m is None else text[m.start() :]
    if not base:
        raise InvalidRevision(f"revision {text!r} has no ref or id before its suffix")
    steps: list[tuple[str, object]] = []
    pos = 0
    while pos < len(rest):
        sm = _SUFFIX.match(rest, pos)
        if not sm:
            raise InvalidRevision(f"cannot parse {rest[pos:]!r} in revision {text!r}")
        tok = sm.group(0)
        if tok[0] == "~":
            steps.append(("ancestor", int(tok[1:]) if len(tok) > 1 else 1))
        elif tok[0] == "^":
            steps.append(("parent", int(tok[1:]) if len(tok) > 1 else 1))
        else:
            inner = tok[2:-1].strip()
            if not inner:
                raise InvalidRevision(f"empty @{{}} in revision {text!r}")
            if inner.isdigit():
                steps.append(("reflog", int(inner)))
            elif inner.startswith("-"):
                raise InvalidRevision(f"@{{{inner}}}: reflog positions are 0 or more")
            else:
                steps.append(("at", parse_time_spec(inner, now)))
        pos = sm.end()
    return Revision(base, tuple(steps))


def ref_candidates(name: str) -> list[str]:
    """Full ref names a short name could mean, in precedence order (like git's rules)."""
    if name.startswith("refs/"):
        return [name]
    return [HEADS + name, TAGS + name, REMOTES + name]


def reflog_value(txn: Txn, ref: str, step: tuple[str, object]) -> ObjectId | None:
    """The ref's value ``@{N}`` changes ago, or at a time; None if it did not exist then.

    Raises:
        InvalidRevision: the reflog is shorter than N, or has nothing that old.
    """
    kind, arg = step
    entries = [e for _s, e in txn.iter_ref_reflog(ref)]
    if not entries:
        raise InvalidRevision(f"{short_name(ref)} has no reflog")
    if kind == "reflog":
        n = int(arg)  # type: ignore[arg-type]
        if n >= len(entries):
            raise InvalidRevision(f"{short_name(ref)}@{{{n}}}: its reflog has only {len(entries)} entries")
        val = entries[n]["new"]
    else:
        t = float(arg)  # type: ignore[arg-type]
        for e in entries:
            if e["time"] <= t:
                val = e["new"]
                break
        else:
            raise InvalidRevision(f"{short_name(ref)} did not exist at that time (its reflog starts later)")
    return ObjectId(val) if val is not None else None
