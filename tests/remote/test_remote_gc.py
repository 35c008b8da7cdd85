"""Remote gc (docs/remote-gc.md): plan / verify / apply against a remote's refs and reflog, a
trash on the remote, and the lock protocol that keeps it from racing a push.

Every test runs against a ``file://`` remote and the real SeaweedFS S3 server.
"""

from __future__ import annotations

import json

import pytest

from mstore.errors import RemoteBusy, UserError
from mstore.remote_lock import STALE_AFTER, gc_lock, list_locks, push_lock, remove_locks
from mstore.storage.backends import open_backend


def _backend(settings: dict):
    return open_backend(settings["url"], **{k: v for k, v in settings.items() if k != "url"})


# -- the lock protocol -------------------------------------------------------------------------


def test_push_lock_raises_remote_busy_while_a_gc_lock_is_held_and_leaves_no_lock(remote):
    backend = _backend(remote)
    with gc_lock(backend, "gc-user"):
        with pytest.raises(RemoteBusy) as info, push_lock(backend, "pusher"):
            pass
        assert "gc by gc-user@" in str(info.value) and "retry later" in str(info.value)
        assert [lk.op for lk in list_locks(backend)] == ["gc"]  # the pusher removed its own
    assert list_locks(backend) == []


def test_gc_lock_raises_remote_busy_while_a_push_lock_is_held(remote):
    backend = _backend(remote)
    with push_lock(backend, "pusher"):
        with pytest.raises(RemoteBusy, match="push by pusher@"), gc_lock(backend, "gc-user"):
            pass
        with push_lock(backend, "another pusher"):  # pushers do not exclude each other
            assert sorted(lk.op for lk in list_locks(backend)) == ["push", "push"]
    assert list_locks(backend) == []


def test_a_stale_lock_does_not_block_and_unlock_removes_only_stale_locks_without_force(remote):
    backend = _backend(remote)
    dead = "locks/push/" + "0" * 32 + ".json"
    backend.put(dead, json.dumps({"op": "push", "host": "h", "pid": 1, "user": "u", "time": 1.0}).encode())
    with gc_lock(backend, "gc-user") as mine:  # the dead pusher's lock is decades old
        with pytest.raises(UserError, match="may be alive"):
            remove_locks(backend, keys=[mine.key])
        assert [lk.key for lk in remove_locks(backend)] == [dead]
        assert [lk.key for lk in list_locks(backend)] == [mine.key]
    assert STALE_AFTER == 24 * 3600


def test_an_unreadable_lock_blocks_until_forced_away(remote):
    backend = _backend(remote)
    junk = "locks/gc/" + "1" * 32 + ".json"
    backend.put(junk, b"not json")
    with pytest.raises(RemoteBusy, match="unreadable"), push_lock(backend, "pusher"):
        pass
    assert remove_locks(backend) == []
    assert [lk.key for lk in remove_locks(backend, force=True)] == [junk]
    with push_lock(backend, "pusher"):
        pass
