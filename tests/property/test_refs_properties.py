"""Ref names follow git's rules; ref moves are compare-and-swap and the reflog is their exact record."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mstore import Conflict, InvalidName
from mstore.refs import ANY, RefChange, check_ref_name, set_if_equals
from mstore.storage.index import Index

# Fragments that hit every rule of git-check-ref-format, plus ordinary characters.
FRAGMENTS = [
    "a", "b", "c", "x", "y", "z", "_", "é", "1", ".", "..", "/", "-", "@", "@{", "{", "}", "~", "^", ":", "?",
    "*", "[", "\\", " ", "\t", "\x01", "\x7f", "lock", ".lock", "refs/heads/",
]  # fmt: skip
ref_names = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=8).map("".join)


def git_accepts(name: str) -> bool:
    proc = subprocess.run(["git", "check-ref-format", "--allow-onelevel", name], capture_output=True, timeout=30)
    assert proc.returncode in (0, 1), proc.stderr.decode()
    return proc.returncode == 0


def mstore_accepts(name: str) -> bool:
    try:
        check_ref_name(name)
    except InvalidName:
        return False
    return True


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@settings(max_examples=200, deadline=None)
@given(ref_names)
@example('exp1')
@example('refs/heads/exp1')
@example('a.lock/b')
@example('a/.b')
@example('@')
@example('a@b')
@example('a.')
@example('x/')
@example('-x')
def test_check_ref_name_agrees_with_git_check_ref_format(name):
    ours = mstore_accepts(name)
    if name.startswith("-"):
        # Deliberately stricter than git: a leading dash would read as a command-line option
        # (git itself refuses it for branch names).
        assert not ours
        return
    assert ours == git_accepts(name), f"{name!r}: mstore {'accepts' if ours else 'refuses'}, git does not"


# -- compare-and-swap and the reflog --------------------------------------------------------------

REFS = ["refs/heads/a", "refs/heads/b", "refs/tags/t"]
VALUES = [bytes([i]) * 32 for i in (1, 2, 3)]
CHANGE = RefChange("tester", "test", "property")

operations = st.lists(
    st.tuples(
        st.sampled_from(REFS),
        st.sampled_from([*VALUES, None]),  # new value; None deletes
        st.sampled_from(["current", "stale", "any"]),  # what the caller believes the ref holds
        st.integers(0, 3),  # which stale value
    ),
    max_size=30,
)


def _hex(v: bytes | None) -> str | None:
    return v.hex() if v is not None else None


@settings(max_examples=100, deadline=None)
@given(operations)
def test_the_reflog_records_exactly_the_successful_changes_and_replays_to_the_current_refs(ops):
    with tempfile.TemporaryDirectory() as tmp:
        index = Index(Path(tmp) / "index.lmdb")
        try:
            model: dict[str, bytes] = {}
            expected_log: list[tuple[str, str | None, str | None]] = []
            for step, (ref, new, belief, k) in enumerate(ops):
                cur = model.get(ref)
                if belief == "current":
                    old = cur
                elif belief == "any":
                    old = ANY
                else:
                    stale = [v for v in [*VALUES, None] if v != cur]
                    old = stale[k % len(stale)]
                moves_a_tag = ref.startswith("refs/tags/") and cur is not None and cur != new
                try:
                    with index.write() as txn:
                        won, seen = set_if_equals(txn, ref, old, new, CHANGE, now=float(step))
                except Conflict:
                    assert moves_a_tag and belief != "stale", "only a tag move raises"
                    continue
                assert seen == cur
                assert won == (belief != "stale")
                assert not (won and moves_a_tag), "a tag moved"
                if won and cur != new:
                    expected_log.append((ref, _hex(cur), _hex(new)))
                    if new is None:
                        del model[ref]
                    else:
                        model[ref] = new

            with index.read() as txn:
                log = [e for _seq, e in txn.iter_reflog(newest_first=False)]
                refs = {name: _hex(d) for name, d in txn.iter_refs()}
                per_ref = {r: [e for _s, e in txn.iter_ref_reflog(r, newest_first=False)] for r in REFS}
        finally:
            index.close()

        assert [(e["ref"], e["old"], e["new"]) for e in log] == expected_log
        assert refs == {r: v.hex() for r, v in model.items()}
        replayed: dict[str, str] = {}
        for e in log:
            assert replayed.get(e["ref"]) == e["old"], "each entry starts where the last one ended"
            if e["new"] is None:
                del replayed[e["ref"]]
            else:
                replayed[e["ref"]] = e["new"]
        assert replayed == refs
        for r in REFS:
            assert per_ref[r] == [e for e in log if e["ref"] == r]
