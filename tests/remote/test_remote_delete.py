"""push --delete: remote refs deleted by compare-and-swap, logged, against a directory and real S3."""

from __future__ import annotations

import pytest

from mstore import Repo
from mstore.errors import PushRejected, RefNotFound, RemoteBusy
from mstore.remote_lock import gc_lock
from mstore.storage.backends import open_backend
from tests.remote.conftest import add_remote, checkpoint


def _tracking(repo: Repo, branch: str = "exp1"):
    """The remote-tracking ref origin/BRANCH (None if it does not exist)."""
    try:
        return repo.resolve(f"origin/{branch}")
    except RefNotFound:
        return None


def _backend(remote):
    return open_backend(remote["url"], endpoint_url=remote.get("endpoint_url"))


def _everything(remote) -> dict[str, bytes]:
    """Every key on the remote and its bytes (to show that nothing changed)."""
    backend = _backend(remote)
    try:
        return {key: backend.get(key) for key, _size in backend.list("")}
    finally:
        backend.close()


def _pushed(repo: Repo, work, remote, steps=(0, 1), branch="exp1"):
    ids = []
    for step in steps:
        ids.append(repo.commit(checkpoint(work / f"{branch}-{step}", step), branch, f"step {step}").id)
        repo.push("origin", [branch])
    return ids


def test_delete_removes_the_branch_logs_it_and_drops_the_tracking_ref(repo, work, tmp_path, remote):
    add_remote(repo, remote)
    ids = _pushed(repo, work, remote)
    _pushed(repo, work, remote, steps=(5,), branch="keep")
    assert _tracking(repo) == ids[-1]

    res = repo.push("origin", ["exp1"], delete=True)

    assert [(r.remote, r.status, r.old, r.new) for r in res.refs] == [("exp1", "ok", ids[-1], None)]
    assert [r["ref"] for r in repo.remote_refs("origin")] == ["keep"]
    assert _tracking(repo) is None  # the tracking ref went
    assert repo.head("exp1") == ids[-1]  # the local branch stays
    log = repo.remote_reflog("origin", "exp1")
    assert [e["seq"] for e in log] == [1, 2, 3]  # the reflog survives, the deletion is change 3
    assert (log[-1]["id"], log[-1]["old"], log[-1]["command"]) == (None, str(ids[-1]), "delete")
    assert log[-1]["user"] == repo.user

    # Readers see no branch: a clone gets only `keep`; a later push re-creates exp1 as change 4.
    clone = Repo.clone(remote["url"], tmp_path / "clone", endpoint_url=remote.get("endpoint_url"))
    assert [b.name for b in clone.branches()] == ["keep"]
    clone.close()
    again = repo.push("origin", ["exp1"])
    assert (again.refs[0].status, again.refs[0].old) == ("ok", None)
    log = repo.remote_reflog("origin", "exp1")
    assert [(e["seq"], e["old"], e["id"]) for e in log[2:]] == [(3, str(ids[-1]), None), (4, None, str(ids[-1]))]


def test_a_delete_of_a_branch_someone_moved_since_the_last_fetch_is_rejected(repo, work, tmp_path, remote):
    add_remote(repo, remote)
    _pushed(repo, work, remote)
    other = Repo.clone(remote["url"], tmp_path / "other", endpoint_url=remote.get("endpoint_url"))
    theirs = other.commit(checkpoint(work / "theirs", 7), "exp1", "theirs").id
    other.push("origin", ["exp1"])
    before = _everything(remote)

    with pytest.raises(PushRejected, match="fetch first"):
        repo.push("origin", ["exp1"], delete=True)

    assert _everything(remote) == before  # not even a log entry
    assert other.remote_refs("origin")[0]["id"] == theirs
    repo.fetch("origin")  # now this store has seen their commit: the delete goes through
    repo.push("origin", ["exp1"], delete=True)
    assert repo.remote_refs("origin") == []
    other.close()


def test_a_push_that_lands_between_the_read_and_the_swap_makes_the_delete_lose(repo, work, tmp_path, remote):
    add_remote(repo, remote)
    _pushed(repo, work, remote)
    other = Repo.clone(remote["url"], tmp_path / "other", endpoint_url=remote.get("endpoint_url"))
    theirs = other.commit(checkpoint(work / "theirs", 7), "exp1", "theirs").id
    mine = repo.head("exp1")

    def race(point: str) -> None:
        if point == "delete-read":  # the deleter has read the ref; another pusher moves it now
            other.push("origin", ["exp1"])

    with pytest.raises(PushRejected, match="someone else pushed"):
        repo.push("origin", ["exp1"], delete=True, crash_hook=race)

    assert other.remote_refs("origin")[0]["id"] == theirs  # the racer's commit stands
    assert _tracking(repo) == mine  # the tracking ref was not dropped
    log = repo.remote_reflog("origin", "exp1")
    assert [(e["seq"], e["id"]) for e in log] == [(1, log[0]["id"]), (2, str(mine)), (3, str(theirs))]
    other.close()


def test_deleting_a_ref_the_remote_lacks_is_a_named_error_and_changes_nothing(repo, work, remote):
    add_remote(repo, remote)
    _pushed(repo, work, remote, steps=(0,))
    before = _everything(remote)
    with pytest.raises(RefNotFound, match="no-such-branch"):
        repo.push("origin", ["exp1", "no-such-branch"], delete=True)  # all resolved before any change
    assert _everything(remote) == before
    assert _tracking(repo) is not None

    repo.push("origin", ["exp1"], delete=True)
    after = _everything(remote)
    with pytest.raises(RefNotFound, match="exp1"):  # a deleted branch is missing too
        repo.push("origin", ["exp1"], delete=True)
    assert _everything(remote) == after


def test_remote_tags_are_deleted_only_when_forced(repo, work, remote):
    add_remote(repo, remote)
    ids = _pushed(repo, work, remote, steps=(0,))
    repo.create_tag("v1", str(ids[0]))
    repo.push("origin", ["v1"])
    before = _everything(remote)
    with pytest.raises(PushRejected, match="tags are not deleted unless forced"):
        repo.push("origin", ["v1"], delete=True)
    assert _everything(remote) == before
    repo.push("origin", ["v1"], delete=True, force=True)
    assert [r["ref"] for r in repo.remote_refs("origin")] == ["exp1"]
    assert repo.remote_reflog("origin", "refs/tags/v1")[-1]["id"] is None
    assert repo.resolve("v1") == ids[0]  # the local tag is not touched


def test_a_delete_waits_for_no_gc_it_meets_a_gc_lock_and_changes_nothing(repo, work, remote):
    add_remote(repo, remote)
    _pushed(repo, work, remote, steps=(0,))
    backend = _backend(remote)
    try:
        with gc_lock(backend, "gc-user"):
            before = _everything(remote)
            with pytest.raises(RemoteBusy):
                repo.push("origin", ["exp1"], delete=True)
            assert _everything(remote) == before
    finally:
        backend.close()
    assert [r["ref"] for r in repo.remote_refs("origin")] == ["exp1"]


def test_a_delete_of_a_branch_never_fetched_needs_force(repo, work, tmp_path, remote):
    add_remote(repo, remote)
    ids = _pushed(repo, work, remote, steps=(0,))
    stranger = Repo.init(tmp_path / "stranger")  # has never fetched: no origin/exp1
    add_remote(stranger, remote)
    before = _everything(remote)

    with pytest.raises(PushRejected, match="never fetched"):
        stranger.push("origin", ["exp1"], delete=True)

    assert _everything(remote) == before  # not even a log entry
    assert repo.remote_refs("origin")[0]["id"] == ids[0]
    stranger.push("origin", ["exp1"], delete=True, force=True)
    assert repo.remote_refs("origin") == []
    stranger.close()


def test_a_multi_ref_delete_checks_every_ref_before_deleting_any(repo, work, tmp_path, remote):
    add_remote(repo, remote)
    _pushed(repo, work, remote, steps=(0,))
    _pushed(repo, work, remote, steps=(5,), branch="keep")
    other = Repo.clone(remote["url"], tmp_path / "other", endpoint_url=remote.get("endpoint_url"))
    other.commit(checkpoint(work / "theirs", 7), "keep", "theirs")
    other.push("origin", ["keep"])  # moved since this store last fetched
    before = _everything(remote)

    with pytest.raises(PushRejected) as err:
        repo.push("origin", ["exp1", "keep"], delete=True)

    assert {r.remote: r.status for r in err.value.result.refs} == {"exp1": "rejected", "keep": "rejected"}
    assert "fetch first" in str(err.value) and "another ref of this deletion was refused" in str(err.value)
    assert _everything(remote) == before  # exp1 was not deleted either
    assert _tracking(repo) is not None
    repo.fetch("origin")
    repo.push("origin", ["exp1", "keep"], delete=True)
    assert repo.remote_refs("origin") == []
    other.close()


def test_a_fetch_keeps_the_tracking_ref_of_a_branch_deleted_on_the_remote(repo, work, tmp_path, remote):
    """As documented (git without --prune): another store's origin/exp1 stays where it last was."""
    add_remote(repo, remote)
    ids = _pushed(repo, work, remote, steps=(0,))
    other = Repo.clone(remote["url"], tmp_path / "other", endpoint_url=remote.get("endpoint_url"))
    repo.push("origin", ["exp1"], delete=True)
    other.fetch("origin")
    assert _tracking(other) == ids[0]
    assert other.remote_refs("origin") == []
    other.close()
