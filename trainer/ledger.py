"""The data ledger: which records of which dataset files a lineage has trained on.

Every checkpoint carries the ledger of its whole lineage (its own run plus everything its base
model was trained on), so "has this model, or any of its ancestors, already seen this data?"
is a lookup, not an investigation (incident 4). Files are named by their content id, so the
same shard inside a newer dataset version is still recognised. Consumption is stored as
half-open record ranges ``[start, end)``, not record lists.

The ledger is a file in the checkpoint, ``trainer_state/ledger.json``, one line per dataset
file, so a ledger of 50,000 files costs each new checkpoint only the lines that changed (the
store chunks it by content) and never bloats the commit object::

    {"v": 1,
     "datasets": {"<data commit id>": {"epochs": 0, "files": 20, "records": 80000, "trained": 64000}},
     "files": {
      "<file id>": {"records": 4000, "seen": [[0, 1600], [2000, 3600]]},
      "<file id>": {"records": 4000, "seen": [[0, 4000]]}
     }}

The commit's ``meta.ledger`` holds the summary (``file``, ``files``, ``datasets``), which is
what ``mstore show`` and ``jq`` see. A record is a non-empty line of a JSONL file, numbered
from 0 in file order (the rule ``mstore import-data`` counts by). ``mstore seen`` reads both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

LEDGER_VERSION = 1
LEDGER_FILE = "trainer_state/ledger.json"

Range = tuple[int, int]


def normalize(ranges: Iterable[Iterable[int]]) -> list[list[int]]:
    """Sort and merge half-open ranges; empty ranges vanish.

    >>> normalize([[5, 8], [0, 2], [2, 3], [7, 9]])
    [[0, 3], [5, 9]]
    """
    items = sorted((int(a), int(b)) for a, b in ranges if int(b) > int(a))
    out: list[list[int]] = []
    for a, b in items:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def count(ranges: Iterable[Iterable[int]]) -> int:
    """How many records the (normalized) ranges cover."""
    return sum(b - a for a, b in normalize(ranges))


def intersect(a: Iterable[Iterable[int]], b: Iterable[Iterable[int]]) -> list[list[int]]:
    """The records both range lists cover."""
    left, right = normalize(a), normalize(b)
    out: list[list[int]] = []
    i = j = 0
    while i < len(left) and j < len(right):
        lo = max(left[i][0], right[j][0])
        hi = min(left[i][1], right[j][1])
        if lo < hi:
            out.append([lo, hi])
        if left[i][1] < right[j][1]:
            i += 1
        else:
            j += 1
    return out


def empty() -> dict[str, Any]:
    """A ledger that has seen nothing."""
    return {"v": LEDGER_VERSION, "files": {}, "datasets": {}}


def to_bytes(ledger: dict[str, Any]) -> bytes:
    """The ledger file: canonical JSON with one line per dataset file (chunks well, diffs well)."""
    head = json.dumps({"v": LEDGER_VERSION, "datasets": ledger.get("datasets", {})}, sort_keys=True)
    lines = [f" {json.dumps(fid)}: {json.dumps(e, sort_keys=True)}" for fid, e in sorted(ledger["files"].items())]
    return (head[:-1] + ',\n "files": {\n' + ",\n".join(lines) + "\n }}\n").encode("utf-8")


def summary(ledger: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint's ``meta.ledger`` records: where the ledger is, and per-dataset totals."""
    return {"v": LEDGER_VERSION, "file": LEDGER_FILE, "files": len(ledger["files"]),
            "datasets": ledger.get("datasets", {})}


def load(repo: Any, rev: str) -> dict[str, Any]:
    """The ledger of a commit: its ledger file, an inline ledger, or an empty one if it has none."""
    commit = repo.get_commit(rev)
    led = commit.meta.get("ledger")
    if isinstance(led, dict) and isinstance(led.get("file"), str):
        with repo.open_file(f"{repo.resolve(rev)}:{led['file']}") as f:
            return parse(json.loads(f.read()))
    return parse(led)


def parse(led: Any) -> dict[str, Any]:
    """A ledger from its JSON form (an empty one for anything else)."""
    if not isinstance(led, dict) or not isinstance(led.get("files"), dict):
        return empty()
    return {
        "v": LEDGER_VERSION,
        "files": {
            fid: {"records": int(e.get("records", 0)), "seen": normalize(e.get("seen", []))}
            for fid, e in led["files"].items()
            if isinstance(e, dict)
        },
        "datasets": {k: dict(v) for k, v in (led.get("datasets") or {}).items() if isinstance(v, dict)},
    }


def merge(base: dict[str, Any], run_files: dict[str, list[list[int]]], records: dict[str, int],
          datasets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``base`` (the inherited lineage ledger) plus what this run consumed.

    Args:
        base: the ledger of the lineage before this run.
        run_files: file id -> ranges this run has trained on so far.
        records: file id -> the file's record count.
        datasets: data commit id -> summary for this run's dataset(s).
    """
    out = {"v": LEDGER_VERSION, "files": {}, "datasets": dict(base.get("datasets", {}))}
    for fid, e in base.get("files", {}).items():
        out["files"][fid] = {"records": e["records"], "seen": normalize(e["seen"])}
    for fid, ranges in run_files.items():
        prev = out["files"].get(fid, {"records": records.get(fid, 0), "seen": []})
        out["files"][fid] = {
            "records": max(prev["records"], records.get(fid, 0)),
            "seen": normalize(prev["seen"] + ranges),
        }
    out["datasets"].update(datasets)
    out["files"] = dict(sorted(out["files"].items()))
    out["datasets"] = dict(sorted(out["datasets"].items()))
    return out


def overlap(ledger: dict[str, Any], planned: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
    """Per file id, the planned records the ledger says were already trained on."""
    out = {}
    for fid, ranges in planned.items():
        seen = ledger.get("files", {}).get(fid)
        if not seen:
            continue
        both = intersect(seen["seen"], ranges)
        if both:
            out[fid] = both
    return out


def fmt_ranges(ranges: list[list[int]], limit: int = 4) -> str:
    """``[[0, 10], [20, 25]]`` -> ``0-9, 20-24`` (inclusive record numbers, as people count)."""
    parts = [f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in ranges[:limit]]
    if len(ranges) > limit:
        parts.append(f"... ({len(ranges) - limit} more ranges)")
    return ", ".join(parts)
