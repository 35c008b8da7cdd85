"""The Repo facade: every user-visible operation as one Python call.

The CLI is a thin layer over this class, and the trainer uses nothing else. It composes the
modules below it and holds no algorithms of its own.

    >>> repo = Repo.init("/data/store")
    >>> c = repo.commit("runs/exp1/checkpoint-100", branch="exp1", message="step 100",
    ...                 kind="checkpoint", meta={"lr": 3e-4})
    >>> [e.id for e in repo.log("exp1")]
    >>> repo.checkout("exp1~2", "restored/")
"""

from __future__ import annotations

import fnmatch
import heapq
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import codecs
from .errors import (
    AmbiguousId,
    Conflict,
    InvalidRevision,
    MstoreError,
    ObjectNotFound,
    PathNotFound,
    ProtectedRef,
    RefConflict,
    RefNotFound,
    RegressionRefused,
    RepositoryExists,
    RepositoryNotFound,
    UserError,
)
from .format import (
    INDEX_DIR,
    PACKS_DIR,
    TMP_DIR,
    Config,
    default_config,
    read_config,
    write_config,
)
from .hashing import ObjectId, is_full_id, is_id_prefix
from .objects import COMMIT_KINDS, TREE_KIND, Commit, FileObject, load_commit, load_file, load_tree
from .refs import (
    ANY,
    HEADS,
    TAGS,
    RefChange,
    branch_ref,
    check_ref_name,
    parse_revision,
    ref_candidates,
    reflog_value,
    set_if_equals,
    short_name,
    tag_ref,
)
from .storage.index import KINDS
from .storage.store import ObjectStore

if TYPE_CHECKING:
    from .diff import FileChange, FileSide
    from .fsck import FsckReport
    from .mount import Mount, MountInfo
    from .run import RunResult
    from .snapshot import Checkout, FileReader

# snapshot (thread pools, FastCDC), diff (NumPy), fsck and provenance (subprocess, package
# metadata) are imported inside the methods that use them: `mstore log` must start in well under
# 0.15 s, and it needs none of them.

STORE_DIRNAME = ".mstore"

Progress = Callable[[int], None]


@dataclass(frozen=True)
class LogEntry:
    """A commit as listed by :meth:`Repo.log`."""

    id: ObjectId
    commit: Commit


@dataclass(frozen=True)
class CommitResult:
    """What :meth:`Repo.commit` did (or, with ``dry_run``, would do: ``id`` and ``commit`` None)."""

    id: ObjectId | None
    commit: Commit | None
    branch: str
    parent: ObjectId | None
    new_bytes: int
    stored_bytes: int
    overridden: list = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False


@dataclass(frozen=True)
class RefChangeResult:
    """What a ref change did (or would do): the ref, its value before and after."""

    name: str
    full_name: str
    old: ObjectId | None
    new: ObjectId | None
    dry_run: bool = False
    forced: bool = False
    dependents: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "ref": self.name,
            "full_name": self.full_name,
            "old": self.old,
            "new": self.new,
            "dry_run": self.dry_run,
            "forced": self.forced,
            "dependents": self.dependents,
        }


@dataclass(frozen=True)
class RefInfo:
    """A branch or tag and where it points."""

    name: str
    full_name: str
    id: ObjectId


@dataclass
class LsEntry:
    """One file or directory in a commit."""

    path: str
    kind: str
    size: int
    id: ObjectId
    mode: int
    safetensors: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        d: dict[str, Any] = {
            "path": self.path,
            "kind": self.kind,
            "size": self.size,
            "id": str(self.id),
            "mode": oct(self.mode),
        }
        if self.safetensors is not None:
            d["safetensors"] = self.safetensors
        return d


@dataclass
class DiffResult:
    """The outcome of :meth:`Repo.diff` or :meth:`Repo.status`."""

    old: str | None
    new: str
    files: list[FileChange] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        from .diff import summarize

        return {
            "old": self.old,
            "new": self.new,
            "summary": summarize(self.files),
            "files": [f.to_dict() for f in self.files],
        }


def _now_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class RemoteGc:
    """Remote gc of one configured remote, with this store's clock, user and gc policy as floor.

    The same protocol as local gc (plan, verify, apply, undo, purge, log) against the remote's
    refs and reflogs, under the remote's gc lock; see :mod:`mstore.remote_gc`.
    """

    def __init__(self, repo: Repo, name: str):
        from . import remote_gc

        self.repo, self.name, self._rg = repo, name, remote_gc
        self.settings = remote_gc.remote_settings(repo.remotes(), name)
        self.url = self.settings["url"]

    @contextmanager
    def _backend(self) -> Iterator[Any]:
        b = self._rg.open_remote(self.settings)
        try:
            yield b
        finally:
            b.close()

    def plan(self, retention_days: float | None = None, grace_days: float | None = None) -> tuple[str, dict]:
        """Write a proof of the remote's dead packs (moves nothing): ``(proof id, document)``."""
        policy = self.repo.gc_policy(retention_days=retention_days, grace_days=grace_days)
        with self._backend() as b:
            return self._rg.plan(self.repo.store, b, self.name, self.url, self.repo.clock(), policy, self.repo.user)

    def verify(self, pid: str, doc: dict) -> Any:
        """Re-check a proof against the remote as it is now."""
        with self._backend() as b:
            return self._rg.verify(self.repo.store, b, pid, doc, self.repo.clock(), self.name, self.url,
                                   floor=self.repo.gc_policy())

    def apply(self, pid: str, doc: dict) -> Any:
        """Re-check under the gc lock, then move the proof's packs to the remote's trash."""
        with self._backend() as b:
            return self._rg.apply(self.repo.store, b, pid, doc, self.repo.clock(), self.repo.user, self.name,
                                  self.url, floor=self.repo.gc_policy())

    def undo(self, pid: str) -> Any:
        """Bring an applied proof's packs back from the remote's trash."""
        with self._backend() as b:
            return self._rg.undo(self.repo.store, b, pid, self.repo.clock(), self.repo.user)

    def purge(self, quarantine_days: float | None = None, dry_run: bool = False) -> Any:
        """Delete the remote's trash older than the quarantine: the point of no return."""
        policy = self.repo.gc_policy(quarantine_days=quarantine_days)
        with self._backend() as b:
            return self._rg.purge(self.repo.store, b, self.repo.clock(), float(policy["quarantine_days"]),
                                  self.repo.user, dry_run, retention_days=float(policy["retention_days"]))

    def log(self) -> Any:
        """The remote's gc audit log."""
        with self._backend() as b:
            return self._rg.log(b)

    def locks(self) -> list[Any]:
        """The push and gc locks now on the remote (``remote_lock.Lock``)."""
        from .remote_lock import list_locks

        with self._backend() as b:
            return list_locks(b)

    def unlock(self, keys: list[str] | None = None, older_than: float = 24 * 3600.0, force: bool = False) -> list[Any]:
        """Remove locks a killed push or remote gc left behind; returns the ones removed.

        Without ``force`` only locks older than ``older_than`` seconds and past the stale age
        (24 h) go; with it, every lock named (or every lock): only when their holders are dead.

        Raises:
            UserError: a named key is no lock there, or is fresh and ``force`` is not given
                (nothing removed).
        """
        from .remote_lock import remove_locks

        with self._backend() as b:
            return remove_locks(b, older_than=older_than, force=force, keys=keys, clock=self.repo.clock)


class Repo:
    """An opened mstore repository."""

    def __init__(self, root: str | os.PathLike, clock: Callable[[], float] = time.time):
        """Open the repository whose store directory is ``root``.

        Raises:
            RepositoryNotFound: ``root`` is not a repository.
            UnsupportedFormat: the repository's format is newer or older than supported.
        """
        self.root = Path(root).resolve()
        if not (self.root / "config.toml").is_file():
            raise RepositoryNotFound(f"no mstore repository at {self.root}")
        self.config: Config = read_config(self.root)
        self.clock = clock
        self.store = ObjectStore(self.root, self.config, clock)
        self.user = _current_user()
        self._pool: Any = None  # worker threads, started by the first commit or checkout
        self._results: Any = None  # commits' and checkouts' buffers (snapshot.ResultBuffers), beside them
        self._pool_pid = 0
        self._pool_lock = threading.Lock()
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------
    @classmethod
    def init(cls, root: str | os.PathLike, clock: Callable[[], float] = time.time) -> Repo:
        """Create a repository whose store directory is ``root`` (created if missing).

        Raises:
            RepositoryExists: there is already a repository there.
        """
        root = Path(root)
        if (root / "config.toml").exists():
            raise RepositoryExists(f"{root.resolve()} is already an mstore repository")
        if root.exists() and any(root.iterdir()):
            raise Conflict(f"{root.resolve()} exists and is not empty; refusing to create a repository in it")
        for sub in ("", PACKS_DIR, INDEX_DIR, TMP_DIR):
            (root / sub).mkdir(parents=True, exist_ok=True)
        write_config(root, default_config())  # written last: its presence marks a complete init
        return cls(root, clock)

    @classmethod
    def open(cls, root: str | os.PathLike, clock: Callable[[], float] = time.time) -> Repo:
        """Open an existing repository (its store directory)."""
        return cls(root, clock)

    @classmethod
    def discover(cls, start: str | os.PathLike = ".", env: dict[str, str] | None = None) -> Repo:
        """Find the repository: ``env["MSTORE_DIR"]`` if given, else ``.mstore`` at or above ``start``.

        Raises:
            RepositoryNotFound: none found.
        """
        if env and env.get("MSTORE_DIR"):
            return cls(env["MSTORE_DIR"])
        here = Path(start).resolve()
        for d in (here, *here.parents):
            if (d / STORE_DIRNAME / "config.toml").is_file():
                return cls(d / STORE_DIRNAME)
        raise RepositoryNotFound(
            f"no {STORE_DIRNAME} repository at or above {here} (run 'mstore init' or set MSTORE_DIR)"
        )

    def close(self) -> None:
        """Stop the worker threads, release the index and open files.

        The workers (one per core this process may run on, at most MAX_WORKERS) are kept from
        the first commit or checkout until here, with their decode and encode buffers: up to
        about ten times the largest chunk (8 MiB in a new store, 16 MiB in one made before the
        ``matrix_rows`` setting) per worker, once it has both
        checked out and committed deltas, plus the buffers checkouts decode into and commits
        read pieces into (at most 16 kept free; in use at once, per checkout one chunk per
        worker plus two and more up to 64 MiB in all, per commit up to 64 MiB of pieces and one
        more piece per worker). A repository used for many
        commits or checkouts in one process allocates them once. Close a repository before it
        is used no more; do not close it while another thread is committing or checking out
        with it.
        """
        with self._pool_lock:
            pool, self._pool = self._pool, None
            self._results = None
            self._closed = True
        if pool is not None and self._pool_pid == os.getpid():
            pool.shutdown(wait=True)
        self.store.close()

    def _worker_pool(self) -> Any:
        """The repository's worker threads (a ThreadPoolExecutor), started on first use.

        A process forked from one that had started them gets its own: the parent's threads do
        not exist in the child, and a task submitted to their pool would wait forever.
        """
        with self._pool_lock:
            if self._closed:
                raise UserError(f"the repository at {self.root} is closed")
            if self._pool is None or self._pool_pid != os.getpid():
                from concurrent.futures import ThreadPoolExecutor

                try:
                    cores = len(os.sched_getaffinity(0))  # the cores this process may use, not the host's
                except (AttributeError, OSError):
                    cores = os.cpu_count() or 1
                # At most MAX_WORKERS: each keeps its buffers (~100 MiB once it has committed and
                # checked out) for as long as the repository is open, in a trainer all run long.
                self._pool = ThreadPoolExecutor(max(1, min(cores, MAX_WORKERS)), thread_name_prefix="mstore-worker")
                self._pool_pid = os.getpid()
                self._results = None  # a forked child's own too (the parent's lock may be held)
            return self._pool

    def _buffers(self) -> Any:
        """The buffers (snapshot.ResultBuffers) commits read pieces into, checkouts decode into.

        Kept beside the workers, for every operation: fresh memory costs a page fault per 4 KiB.
        """
        from .snapshot import ResultBuffers

        self._worker_pool()  # a forked child's are its own
        with self._pool_lock:
            if self._results is None:
                self._results = ResultBuffers()
            return self._results

    def __enter__(self) -> Repo:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def format_version(self) -> int:
        """The on-disk format version."""
        return self.config.version

    # -- revisions --------------------------------------------------------------------------
    def _find_ref(self, txn, name: str) -> str | None:
        for full in ref_candidates(name):
            if txn.get_ref(full) is not None:
                return full
        return None

    def _find_logged_ref(self, txn, name: str) -> str | None:
        for full in ref_candidates(name):
            if next(txn.iter_ref_reflog(full), None) is not None:
                return full
        return None

    def resolve(self, rev: str) -> ObjectId:
        """The commit id a revision expression names.

        Raises:
            InvalidRevision: unparsable, or navigation past the first commit.
            RefNotFound: no such ref or id.
            AmbiguousId: an id prefix matching several commits.
        """
        if isinstance(rev, ObjectId):
            return rev
        r = parse_revision(rev, self.clock())
        with self.store.index.read() as txn:
            steps = list(r.steps)
            oid: ObjectId | None = None
            if steps and steps[0][0] in ("reflog", "at"):
                full = self._find_ref(txn, r.base) or self._find_logged_ref(txn, r.base)
                if full is None:
                    raise RefNotFound(f"no ref {r.base!r} (and no reflog for one)")
                oid = reflog_value(txn, full, steps.pop(0))
                if oid is None:
                    raise InvalidRevision(f"{rev}: {r.base} did not exist at that point")
            else:
                full = self._find_ref(txn, r.base)
                if full is not None:
                    oid = ObjectId.from_digest(txn.get_ref(full))
        if oid is None:
            oid = self._resolve_id(r.base)
        for kind, arg in steps:
            if kind in ("reflog", "at"):
                raise InvalidRevision(f"{rev}: @{{...}} must come right after a ref name")
            n = int(arg)  # type: ignore[arg-type]
            if kind == "parent":
                if n == 0:
                    continue
                commit = load_commit(self.store, oid)
                if len(commit.parents) < n:
                    raise InvalidRevision(f"{rev}: commit {oid.short} has no parent #{n}")
                oid = commit.parents[n - 1]
            else:
                for _ in range(n):
                    commit = load_commit(self.store, oid)
                    if not commit.parents:
                        raise InvalidRevision(f"{rev}: history of {r.base} is shorter than that")
                    oid = commit.parents[0]
        return oid

    def _resolve_id(self, text: str) -> ObjectId:
        if is_full_id(text):
            oid = ObjectId(text)
            if not self.store.has("m", oid):
                raise RefNotFound(f"no commit {text}")
            return oid
        if is_id_prefix(text):
            found = self.store.find_prefix("m", text, limit=2)
            if len(found) > 1:
                raise AmbiguousId(f"{text} is ambiguous: matches several commits; give more characters")
            if found:
                return found[0]
        raise RefNotFound(f"no branch, tag or commit called {text!r}")

    def _split_path(self, spec: str) -> tuple[str, str]:
        rev, sep, path = spec.partition(":")
        return rev, path if sep else ""

    # -- reading ----------------------------------------------------------------------------
    def get_commit(self, rev: str) -> Commit:
        """The commit a revision names."""
        return load_commit(self.store, self.resolve(rev))

    def log(self, rev: str, limit: int | None = None) -> list[LogEntry]:
        """Commits reachable from ``rev``, newest first (by commit time)."""
        start = self.resolve(rev)
        out: list[LogEntry] = []
        seen = {start}
        first = load_commit(self.store, start)
        heap: list[tuple[str, str, ObjectId, Commit]] = [(_neg(first.time), start, start, first)]
        while heap and (limit is None or len(out) < limit):
            _t, _k, oid, commit = heapq.heappop(heap)
            out.append(LogEntry(oid, commit))
            for p in commit.parents:
                if p not in seen:
                    seen.add(p)
                    pc = load_commit(self.store, p)
                    heapq.heappush(heap, (_neg(pc.time), p, p, pc))
        return out

    def show(self, rev: str) -> dict[str, Any]:
        """A commit with its id and the refs that point at it, as a JSON-ready dict."""
        oid = self.resolve(rev)
        commit = load_commit(self.store, oid)
        d = {"id": str(oid), **commit.to_dict()}
        d.pop("v", None)
        d["refs"] = [short_name(n) for n, target in self._iter_refs() if target == oid]
        return d

    def ls(self, spec: str, recursive: bool = True) -> list[LsEntry]:
        """Files (and directories) of ``REV[:PATH]`` with sizes; safetensors summarised."""
        from .snapshot import resolve_path

        rev, path = self._split_path(spec)
        oid = self.resolve(rev)
        commit = load_commit(self.store, oid)
        entry = resolve_path(self.store, commit.tree, path)
        out: list[LsEntry] = []
        if entry.kind != TREE_KIND:
            out.append(self._ls_entry(path, entry))
            return out
        self._ls_tree(entry.id, path.strip("/") + "/" if path.strip("/") else "", recursive, out)
        return out

    def _ls_tree(self, tid: ObjectId, prefix: str, recursive: bool, out: list[LsEntry]) -> None:
        for e in load_tree(self.store, tid).entries:
            out.append(self._ls_entry(prefix + e.name, e))
            if e.kind == TREE_KIND and recursive:
                self._ls_tree(e.id, prefix + e.name + "/", recursive, out)

    def _ls_entry(self, path: str, e) -> LsEntry:
        from .chunking import SAFETENSORS_NAME, read_header
        from .snapshot import FileReader

        item = LsEntry(path, e.kind, e.size, e.id, e.mode)
        if e.kind != TREE_KIND:
            fobj = load_file(self.store, e.id)
            if fobj.chunker == SAFETENSORS_NAME:
                with FileReader(self.store, e.id, fobj, path) as f:
                    h = read_header(f, fobj.size)
                dtypes: dict[str, int] = {}
                for t in h.tensors:
                    dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
                item.safetensors = {"tensors": len(h.tensors), "parameters": h.parameters, "dtypes": dtypes}
        return item

    def open_file(self, spec: str, path: str | None = None) -> FileReader:
        """A seekable, verified binary stream of a file in a commit.

        ``repo.open_file("exp1:model.safetensors")`` or ``repo.open_file("exp1", "model.safetensors")``.
        A commit of a single file can omit the path.

        Raises:
            PathNotFound: no such file, or the path is a directory.
        """
        from .snapshot import FileReader, resolve_path

        rev, inner = self._split_path(spec) if path is None else (spec, path)
        commit = load_commit(self.store, self.resolve(rev))
        if not inner:
            tree = load_tree(self.store, commit.tree)
            files = [e for e in tree.entries if e.kind != TREE_KIND]
            if len(tree.entries) != 1 or len(files) != 1:
                raise PathNotFound(f"{rev} holds a directory; name a file as {rev}:PATH")
            inner = files[0].name
        entry = resolve_path(self.store, commit.tree, inner)
        if entry.kind == TREE_KIND:
            raise PathNotFound(f"{inner} is a directory in {rev}")
        return FileReader(self.store, entry.id, load_file(self.store, entry.id), inner)

    # -- refs --------------------------------------------------------------------------------
    def _iter_refs(self, prefix: str = "refs/") -> list[tuple[str, ObjectId]]:
        with self.store.index.read() as txn:
            return [(n, ObjectId.from_digest(d)) for n, d in txn.iter_refs(prefix)]

    def branches(self) -> list[RefInfo]:
        """Every branch, sorted by name."""
        return [RefInfo(short_name(n), n, oid) for n, oid in self._iter_refs(HEADS)]

    def tags(self) -> list[RefInfo]:
        """Every tag, sorted by name."""
        return [RefInfo(short_name(n), n, oid) for n, oid in self._iter_refs(TAGS)]

    def head(self, branch: str) -> ObjectId | None:
        """The commit a branch points at, or None if it does not exist."""
        full = branch_ref(branch)
        with self.store.index.read() as txn:
            d = txn.get_ref(full)
        return ObjectId.from_digest(d) if d is not None else None

    def _update_ref(
        self, full: str, old, new: ObjectId | None, command: str, message: str, allow_tag_change: bool = False
    ) -> None:
        change = RefChange(self.user, command, message)
        with self.store.index.write() as txn:
            won, actual = set_if_equals(
                txn, full, old, new.digest if new is not None else None, change, self.clock(), allow_tag_change
            )
        if not won:
            raise RefConflict(
                f"{short_name(full)} moved to {actual.hex()[:7] if actual else 'nothing'} meanwhile; "
                "nothing was changed",
                full,
                None if old is ANY or old is None else old.hex(),
                actual.hex() if actual else None,
            )

    # -- protection ------------------------------------------------------------------------
    def is_protected(self, full: str) -> bool:
        """True if a ref matches a ``[protect] patterns`` entry (short or full name)."""
        patterns = self.config.get("protect", "patterns", []) or []
        short = short_name(full)
        return any(fnmatch.fnmatchcase(full, p) or fnmatch.fnmatchcase(short, p) for p in patterns)

    def _check_protection(self, full: str, action: str, force_protected: bool, confirm: str | None) -> bool:
        """Refuse a destructive change of a protected ref unless forced and confirmed by name."""
        if not self.is_protected(full):
            return False
        short = short_name(full)
        if not force_protected or confirm not in (short, full):
            raise ProtectedRef(f"{short} is protected; {action} it only with --force-protected --confirm {short}")
        return True

    # -- branches and tags -------------------------------------------------------------------
    def create_branch(self, name: str, rev: str, *, dry_run: bool = False) -> ObjectId:
        """Create branch ``name`` at ``rev``.

        Raises:
            InvalidName: bad branch name.
            Conflict: the branch exists.
        """
        full = branch_ref(name)
        oid = self.resolve(rev)
        if dry_run:
            if self.head(name) is not None:
                raise Conflict(f"branch {name} already exists")
            return oid
        try:
            self._update_ref(full, None, oid, "branch", f"created from {rev}")
        except RefConflict:
            raise Conflict(f"branch {name} already exists") from None
        return oid

    def delete_branch(
        self, name: str, *, dry_run: bool = False, force_protected: bool = False, confirm: str | None = None
    ) -> RefChangeResult:
        """Delete a branch; its reflog stays, so :meth:`restore` brings it back.

        Raises:
            RefNotFound: no such branch.
            ProtectedRef: the branch is protected and not forced and confirmed.
        """
        full = branch_ref(name)
        with self.store.index.read() as txn:
            cur = txn.get_ref(full)
        if cur is None:
            raise RefNotFound(f"no branch {name}")
        forced = self._check_protection(full, "delete", force_protected, confirm)
        was = ObjectId.from_digest(cur)
        dependents = self.dependents(name)
        if not dry_run:
            msg = f"deleted {name}" + (" (protected; forced and confirmed)" if forced else "")
            self._update_ref(full, cur, None, "branch -d", msg)
        return RefChangeResult(name, full, was, None, dry_run, forced, dependents)

    def create_tag(self, name: str, rev: str, message: str = "", *, dry_run: bool = False) -> ObjectId:
        """Create an immutable tag.

        Raises:
            Conflict: the tag exists (tags never move).
        """
        full = tag_ref(name)
        oid = self.resolve(rev)
        with self.store.index.read() as txn:
            exists = txn.get_ref(full) is not None
        if exists:
            raise Conflict(f"tag {name} already exists and tags never move")
        if not dry_run:
            try:
                self._update_ref(full, None, oid, "tag", message or f"tagged {rev}")
            except RefConflict:
                raise Conflict(f"tag {name} already exists and tags never move") from None
        return oid

    def delete_tag(
        self, name: str, *, dry_run: bool = False, force_protected: bool = False, confirm: str | None = None
    ) -> RefChangeResult:
        """Delete a tag (tags are protected by default: needs ``force_protected`` and ``confirm``).

        Raises:
            RefNotFound: no such tag.
            ProtectedRef: not forced and confirmed.
        """
        full = tag_ref(name)
        with self.store.index.read() as txn:
            cur = txn.get_ref(full)
        if cur is None:
            raise RefNotFound(f"no tag {name}")
        forced = self._check_protection(full, "delete", force_protected, confirm)
        if not dry_run:
            self._update_ref(
                full,
                cur,
                None,
                "tag -d",
                f"deleted tag {name}" + (" (forced)" if forced else ""),
                allow_tag_change=True,
            )
        return RefChangeResult(name, full, ObjectId.from_digest(cur), None, dry_run, forced, [])

    def restore(
        self,
        spec: str,
        *,
        as_name: str | None = None,
        dry_run: bool = False,
        force_protected: bool = False,
        confirm: str | None = None,
    ) -> RefChangeResult:
        """Bring back a deleted or moved ref from its reflog: ``exp1``, ``exp1@{3}``, ``exp1@{2.days.ago}``.

        Without ``@{...}`` the ref is recreated at the value it had before it was deleted (it must
        not exist). With ``as_name`` a new branch of that name is created instead. The restore is
        itself a reflogged change, so it can be undone too.

        Raises:
            RefNotFound: no reflog for that name.
            InvalidRevision: a bad ``@{...}``, or a reflog shorter than asked.
            Conflict: the target exists (``--as`` an existing name, or ``exp1`` without ``@{}`` while it exists).
            ProtectedRef: moving a protected ref without force and confirmation.
        """
        r = parse_revision(spec, self.clock())
        if r.steps and (len(r.steps) != 1 or r.steps[0][0] not in ("reflog", "at")):
            raise InvalidRevision(f"restore takes REF, REF@{{N}} or REF@{{TIME}}, not {spec!r}")
        with self.store.index.read() as txn:
            full = self._find_ref(txn, r.base) or self._find_logged_ref(txn, r.base)
            if full is None:
                check_ref_name(r.base)
                raise RefNotFound(f"nothing to restore: {r.base} has no reflog")
            current = txn.get_ref(full)
            if r.steps:
                target = reflog_value(txn, full, r.steps[0])
                if target is None:
                    raise InvalidRevision(f"{spec}: {r.base} did not exist at that point; pick another entry")
            else:
                if current is not None and as_name is None:
                    raise Conflict(
                        f"{short_name(full)} exists (at {current.hex()[:7]}); "
                        f"name an earlier state: mstore restore {short_name(full)}@{{1}}"
                    )
                target = None
                for _seq, e in txn.iter_ref_reflog(full):
                    val = e["new"] or e["old"]
                    if val is not None:
                        target = ObjectId(val)
                        break
                if target is None:
                    raise RefNotFound(f"{r.base}'s reflog records no commit to restore")
        if not self.store.has("m", target):
            from .gc import collected_by

            proof = collected_by(self.store, "m", target)
            hint = (
                f": collected by gc proof {proof[:7]} (mstore gc undo {proof[:7]} until it is purged)" if proof else ""
            )
            raise ObjectNotFound(f"commit {target.short} of {spec} is no longer in the store{hint}", target)
        if as_name is not None:
            dest = branch_ref(as_name)
            with self.store.index.read() as txn:
                if txn.get_ref(dest) is not None:
                    raise Conflict(f"branch {as_name} already exists; choose another --as name")
            old = None
            forced = False
        else:
            dest = full
            if dest.startswith(TAGS) and current is not None and current != target.digest:
                raise Conflict(f"tag {short_name(dest)} exists and tags never move")
            old = current
            forced = current is not None and self._check_protection(dest, "move", force_protected, confirm)
        prev = ObjectId.from_digest(old) if old is not None else None
        if not dry_run:
            self._update_ref(dest, old, target, "restore", f"restored from {spec}")
        return RefChangeResult(short_name(dest), dest, prev, target, dry_run, forced, [])

    def dependents(self, branch: str) -> list[str]:
        """Other branches whose commits record a commit of ``branch`` as an input (``inputs`` or ``meta.base``)."""
        try:
            own = {e.id for e in self.log(branch)}
        except MstoreError:
            return []
        out = []
        for b in self.branches():
            if b.name == branch:
                continue
            for e in self.log(b.full_name):
                if _input_ids(e.commit) & own:
                    out.append(b.name)
                    break
        return out

    def branches_info(self) -> list[dict[str, Any]]:
        """Every branch with what it is: kind, created, last moved, size, lineage, step, metrics."""
        out = []
        with self.store.index.read() as txn:
            refs = [(n, ObjectId.from_digest(d)) for n, d in txn.iter_refs(HEADS)]
            times = {}
            for name, _oid in refs:
                first, last = txn.ref_reflog_bounds(name)
                times[name] = (first["time"] if first else None, last["time"] if last else None)
        commits: dict[ObjectId, Commit] = {}
        for name, oid in refs:
            c = commits.get(oid)
            if c is None:
                c = commits[oid] = load_commit(self.store, oid)
            created, moved = times[name]
            base = c.inputs.get("base") or c.meta.get("base")
            metrics = {
                **{k: v for k, v in c.meta.items() if _is_metric(k, v)},
                **{k: v for k, v in c.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            }
            out.append(
                {
                    "name": short_name(name),
                    "id": str(oid),
                    "kind": c.kind,
                    "message": c.message,
                    "commit_time": c.time,
                    "created": created,
                    "moved": moved,
                    "bytes": c.stats.get("bytes"),
                    "files": c.stats.get("files"),
                    "parameters": c.stats.get("parameters"),
                    "base": base,
                    "inputs": c.inputs,
                    "step": c.meta.get("step", c.metrics.get("step")),
                    "metrics": metrics,
                }
            )
        return out

    def reflog(self, ref: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Reflog entries, newest first: all refs, or one (deleted refs included)."""
        out = []
        with self.store.index.read() as txn:
            if ref is None:
                it = txn.iter_reflog()
            else:
                full = self._find_ref(txn, ref) or self._find_logged_ref(txn, ref)
                if full is None:
                    check_ref_name(ref)
                    raise RefNotFound(f"no reflog for {ref}")
                it = txn.iter_ref_reflog(full)
            for seq, e in it:
                out.append({"seq": seq, **e})
                if limit is not None and len(out) >= limit:
                    break
        return out

    # -- writing -----------------------------------------------------------------------------
    def commit(
        self,
        path: str | os.PathLike,
        branch: str,
        message: str,
        *,
        kind: str = "other",
        meta: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        provenance: dict[str, Any] | None = None,
        argv: list[str] | None = None,
        cwd: str | os.PathLike | None = None,
        expected_head: ObjectId | None | object = ANY,
        allow_regression: bool = False,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> CommitResult:
        """Snapshot a file or directory as a new commit on ``branch``.

        Before a byte is stored, the commit guards compare the new version with the branch head
        (sizes, tensors, vocabulary, metrics); a regression is refused unless
        ``allow_regression``, and the override is recorded in the commit's provenance.

        The branch moves by compare-and-swap from the head this commit was built on (or from
        ``expected_head`` if given): if another writer moved it meanwhile, the objects stay
        stored but the branch does not move, and :class:`RefConflict` says so.

        With ``dry_run`` nothing is stored: the result says what would be committed
        (``id`` is None; ``new_bytes`` counts data the store does not hold yet).

        Raises:
            InvalidName: bad branch name; PathNotFound: ``path`` missing;
            UserError: bad kind; MalformedObject: metadata that cannot be stored (NaN);
            RegressionRefused: a guard tripped; RefConflict: lost the race.
        """
        from . import provenance as _prov
        from .guards import check, numeric_metrics
        from .objects import canonical_json
        from .snapshot import Ingest, import_numpy_meanwhile, scan, stored_summary, walk_files

        full = branch_ref(branch)
        if kind not in COMMIT_KINDS:
            raise UserError(f"unknown kind {kind!r}; choose one of {', '.join(COMMIT_KINDS)}")
        for value in (meta, metrics, params, inputs):
            canonical_json(value or {})  # refuse NaN and the like before anything is stored
        path = Path(path)
        with self.store.index.read() as txn:
            cur = txn.get_ref(full)
        parent = ObjectId.from_digest(cur) if cur is not None else None
        if expected_head is not ANY and expected_head != parent:
            raise RefConflict(
                f"{branch} is at {parent.short if parent else 'nothing'}, not the expected head",
                full,
                str(expected_head) if expected_head else None,
                parent,
            )
        child = scan(path)
        if child.tensor_files and not codecs.have_kernels():
            # Without the C kernels every float piece needs numpy. With them only a low-rank
            # delta does, tried only where a float32 matrix's XOR does not pay (a merged LoRA
            # adapter): the worker trying one imports numpy then (once per process, ~0.1 s),
            # rather than every commit of a fine-tune importing it for nothing (~0.05 s of CPU
            # on two busy cores, 5-8 % of such a commit).
            import_numpy_meanwhile()
        findings = []
        previous: dict[str, tuple[int, ObjectId]] = {}
        ancestors: list[ObjectId] = []
        if parent is not None:
            pc = load_commit(self.store, parent)
            previous = {p: (e.size, e.id) for p, e in walk_files(self.store, pc.tree)}
            ancestors = _first_parent_trees(self.store, pc, DELTA_LOOKBACK)
            before = stored_summary(self.store, pc.tree, pc.stats)
            before.metrics = numeric_metrics(pc.meta, pc.metrics)
            child.metrics = numeric_metrics(meta or {}, metrics or {})
            findings = check(before, child, self.config.data.get("guards"))
        if findings and not allow_regression:
            raise RegressionRefused(_refusal_text(branch, parent, findings, dry_run), findings)
        cwd = Path(cwd) if cwd is not None else Path.cwd()
        progress = progress or (lambda n: None)
        if dry_run:
            with Ingest(self.store, None, progress, previous=previous) as ingest:
                ingest.ingest_root(path)
            stats = ingest.stats.to_dict()
            if child.vocab_size is not None:
                stats["vocab_size"] = child.vocab_size
            return CommitResult(None, None, branch, parent, ingest.new_bytes, 0, findings, stats, True)
        pending = _prov.Capture(cwd, argv, provenance)  # git runs while the files are ingested
        with (
            self.store.batch() as batch,
            Ingest(
                self.store,
                batch,
                progress,
                previous=previous,
                ancestors=ancestors,
                pool=self._worker_pool(),
                buffers=self._buffers(),
            ) as ingest,
        ):
            tree_id = ingest.ingest_root(path)
            prov = pending.result()
            if findings:
                prov["guards_overridden"] = [f.to_dict() for f in findings]
            stats = ingest.stats.to_dict()
            if child.vocab_size is not None:
                stats["vocab_size"] = child.vocab_size
            now = self.clock()
            commit = Commit(
                tree=tree_id,
                parents=(parent,) if parent else (),
                author=self.user,
                time=_now_iso(now),
                message=message,
                kind=kind,
                meta=dict(meta or {}),
                metrics=dict(metrics or {}),
                params=dict(params or {}),
                inputs=dict(inputs or {}),
                provenance=prov,
                stats=stats,
            )
            raw = commit.to_bytes()
            cid = commit.id
            batch.add("m", cid, raw)
            change = RefChange(self.user, "commit", message)

            def move(txn):
                return set_if_equals(txn, full, cur, cid.digest, change, now)

            won, actual = batch.commit(move)
        if not won:
            raise RefConflict(
                f"{branch} moved to {actual.hex()[:7] if actual else 'nothing'} while committing; "
                f"commit {cid.short} is stored but not on the branch (fetch the new head and commit again)",
                full,
                parent,
                actual.hex() if actual else None,
            )
        return CommitResult(cid, commit, branch, parent, batch.new_bytes, batch.stored_bytes, findings, stats, False)

    def checkout(
        self, rev: str, dest: str | os.PathLike, *, force: bool = False, progress: Progress | None = None
    ) -> Checkout:
        """Write the commit's files (or ``REV:PATH``'s subtree or file) into ``dest``, verified.

        Raises:
            Conflict: ``dest`` is not empty (without ``force``).
            IntegrityError: damaged data; no damaged file is ever created under its final name.
        """
        from .chunking import may_hold_tensors
        from .snapshot import Checkout, import_numpy_meanwhile, resolve_path, walk_files

        rev_s, inner = self._split_path(rev)
        commit = load_commit(self.store, self.resolve(rev_s))
        entry = resolve_path(self.store, commit.tree, inner)
        if entry.kind == TREE_KIND:
            names = (p for p, _e in walk_files(self.store, entry.id))
        else:
            names = iter([inner or entry.name])
        if not codecs.have_kernels() and any(may_hold_tensors(n) for n in names):
            import_numpy_meanwhile()  # with the C kernels only low-rank deltas need numpy: rare
        co = Checkout(self.store, progress or (lambda n: None), pool=self._worker_pool(), buffers=self._buffers())
        try:
            co.run(entry, Path(dest), force=force)
        finally:
            co.close()
        return co

    # -- comparing -----------------------------------------------------------------------------
    def _sides(self, tree_id: ObjectId) -> dict[str, FileSide]:
        from .diff import FileSide
        from .snapshot import walk_files

        out = {}
        for path, e in walk_files(self.store, tree_id):
            fobj = load_file(self.store, e.id)
            out[path] = FileSide(e.id, fobj, _opener(self.store, e.id, fobj, path))
        return out

    def diff(self, a: str, b: str, magnitudes: bool = True) -> DiffResult:
        """Files and tensors added, removed and changed from ``a`` to ``b``."""
        from .diff import diff_files

        ca, cb = self.resolve(a), self.resolve(b)
        ta, tb = load_commit(self.store, ca).tree, load_commit(self.store, cb).tree
        return DiffResult(str(ca), str(cb), diff_files(self._sides(ta), self._sides(tb), magnitudes))

    def status(self, path: str | os.PathLike, branch: str, magnitudes: bool = True) -> DiffResult:
        """What committing ``path`` to ``branch`` would change, without storing anything."""
        from .diff import FileSide, diff_files
        from .snapshot import Ingest

        path = Path(path)
        head = self.head(branch)
        with Ingest(self.store, None) as ingest:
            ingest.ingest_root(path)
            files = ingest.files
        base = path if path.is_dir() else path.parent
        new = {}
        for rel, (fid, fobj) in files.items():
            new[rel] = FileSide(fid, fobj, _disk_opener(base / rel))
        old = self._sides(load_commit(self.store, head).tree) if head is not None else {}
        return DiffResult(str(head) if head else None, str(path), diff_files(old, new, magnitudes))

    # -- checking ------------------------------------------------------------------------------
    def fsck(self, progress: Progress | None = None) -> FsckReport:
        """Verify every object, ref and reflog entry; report damage with what it affects."""
        from .fsck import fsck

        return fsck(self.store, progress)

    # -- garbage collection (gc.py; docs/gc.md) -------------------------------------------------
    def gc_policy(self, **overrides: Any) -> dict[str, Any]:
        """The effective gc policy: defaults, ``[gc]`` in config.toml, then ``overrides``."""
        from .gc import policy_from

        return policy_from(self.config.data.get("gc"), **overrides)

    def gc_plan(
        self,
        *,
        retention_days: float | None = None,
        grace_days: float | None = None,
        verify_data: bool = False,
        require_remote: str | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """Write a reachability proof of what gc would delete; deletes nothing.

        With ``require_remote`` (or ``[gc] require_remote`` in config.toml), every candidate
        must already be on that remote, so the copy gc deletes is never the last one; the proof
        records the check and apply repeats it.

        Returns:
            (proof id, proof document).

        Raises:
            GcRefused: a live object cannot be read (nothing is safe to delete), or the
                required remote lacks candidates (they are named).
            NotFound: no such remote.
        """
        from .gc import plan

        policy = self.gc_policy(retention_days=retention_days, grace_days=grace_days, require_remote=require_remote)
        return plan(self.store, self.clock(), policy, self.user, progress, verify_data, self._gc_remote_check(policy))

    def _gc_remote_check(self, policy: dict[str, Any]):
        """What gc calls to ask the policy's required remote which candidates it lacks."""
        remote = policy.get("require_remote")
        if not remote:
            return None
        self._remote_settings(remote)  # an unknown remote is an error before any marking
        return lambda keys: self.remote_lacks(remote, keys)

    def gc_show(self, proof: str) -> tuple[str, dict[str, Any]]:
        """Load a proof by id or prefix, checking it was not edited."""
        from .gc import load_proof

        return load_proof(self.root, proof)

    def gc_verify(self, proof: str):
        """Re-check a proof now; the verdict lists every reason it no longer holds."""
        from .gc import load_proof, verify

        pid, doc = load_proof(self.root, proof)
        return verify(self.store, pid, doc, self.clock(), self._gc_remote_check(doc["policy"]))

    def gc_apply(self, proof: str, *, crash_hook: Callable[[str], None] | None = None):
        """Re-check a proof and move its candidates to trash (undo with :meth:`gc_undo` until purge).

        Raises:
            GcRefused: the proof is not valid now; nothing changed.
        """
        from .gc import apply, load_proof

        pid, doc = load_proof(self.root, proof)
        return apply(self.store, pid, doc, self.clock(), self.user, crash_hook, self._gc_remote_check(doc["policy"]))

    def gc_undo(self, proof: str) -> int:
        """Bring back everything an applied proof moved to trash; returns the object count."""
        from .gc import load_proof, undo

        pid, _doc = load_proof(self.root, proof)
        return undo(self.store, pid, self.clock(), self.user)

    def gc_purge(self, *, quarantine_days: float | None = None, dry_run: bool = False) -> list[dict[str, Any]]:
        """Delete trash older than the quarantine period: after this, those versions are gone."""
        from .gc import purge

        q = self.gc_policy(quarantine_days=quarantine_days)["quarantine_days"]
        return purge(self.store, self.clock(), float(q), self.user, dry_run)

    def gc_log(self) -> list[dict[str, Any]]:
        """The gc audit log (applied, undone, purged), oldest first."""
        from .gc import audit_entries

        return audit_entries(self.store)

    def remote_gc(self, remote: str) -> RemoteGc:
        """Garbage collection of a configured remote's dead packs (docs/remote-gc.md).

        ``g = repo.remote_gc("origin"); pid, doc = g.plan(); g.verify(pid, doc); g.apply(pid, doc)``;
        then ``g.undo(pid)`` until ``g.purge()``. Proofs are stored beside local ones.
        """
        return RemoteGc(self, remote)

    def pin(self, rev: str, note: str = "") -> ObjectId:
        """Keep a commit whatever happens to refs (a gc root)."""
        from .gc import pin

        oid = self.resolve(rev)
        pin(self.store, oid, self.clock(), self.user, note)
        return oid

    def unpin(self, rev: str) -> bool:
        """Remove a pin."""
        from .gc import unpin

        return unpin(self.store, self.resolve(rev))

    def pins(self) -> list[dict[str, Any]]:
        """Every pinned commit."""
        from .gc import pins

        return pins(self.store)

    @contextmanager
    def lease(self, revs: list[str], note: str = "", ttl: float = 86400.0) -> Iterator[str]:
        """Hold a gc lease on commits while a job uses them (a mount, a run)."""
        from .gc import release_lease, take_lease

        ids = [str(self.resolve(r)) for r in revs]
        lease = take_lease(self.store, ids, self.clock(), ttl, note)
        try:
            yield lease
        finally:
            release_lease(self.store, lease)

    # -- mount and run (mount.py, run.py; docs/mount.md) -------------------------------------
    def mount(self, rev: str, mountpoint: str | os.PathLike, **options: Any) -> Mount:
        """Mount a version read-only through FUSE: ``with repo.mount("models/base", "/mnt/base") as m:``.

        Served by a child process; returns once the mount answers. The mount ends at the end of
        the ``with`` block, on ``m.umount()``, or when this process exits (unless ``detach=True``);
        with ``foreground=True`` this process serves it until it is unmounted. Options: see
        :func:`mstore.mount.mount_commit`.
        """
        from .mount import mount_commit

        return mount_commit(self, rev, mountpoint, **options)

    def mount_remote(
        self, remote: str, rev: str, mountpoint: str | os.PathLike, *, keep: bool = False, **options: Any
    ) -> Mount:
        """Mount a remote's branch, tag or commit lazily, without fetching (docs/mount.md).

        Only the commit's metadata is read up front; each chunk is fetched and verified on its
        first read. ``keep=True`` also indexes the verified chunks locally (no ref moves).
        Options: see :func:`mstore.remote_mount.mount_remote`.
        """
        from .remote_mount import mount_remote

        return mount_remote(self, remote, rev, mountpoint, keep=keep, **options)

    def umount(self, mountpoint: str | os.PathLike, *, lazy: bool = False) -> MountInfo | None:
        """Unmount a mount of this store (also a dead one) and wait for its process to exit."""
        from .mount import umount

        return umount(self.root, mountpoint, lazy=lazy)

    def mounts(self) -> list[MountInfo]:
        """The mounts of this store; entries of dead mount processes are cleaned."""
        from .mount import list_mounts

        return list_mounts(self.root)

    def run(self, argv: list[str], **options: Any) -> RunResult:
        """Mount inputs, run a command, commit its output with lineage: :func:`mstore.run.run_job`."""
        from .run import run_job

        return run_job(self, argv, **options)

    def object_bytes(self) -> int:
        """Raw (uncompressed) bytes of every indexed object."""
        return sum(e.raw_len for _k, _i, e in self.store.iter_entries())

    def size_of(self, spec: str) -> int:
        """Logical bytes of ``REV[:PATH]`` (a file's size, or a directory's total)."""
        from .snapshot import resolve_path

        rev, inner = self._split_path(spec)
        commit = load_commit(self.store, self.resolve(rev))
        return resolve_path(self.store, commit.tree, inner).size or commit.stats.get("bytes", 0)

    def stored_bytes(self) -> int:
        """Bytes of all pack files on disk."""
        return sum(p.stat().st_size for p in (self.root / PACKS_DIR).iterdir() if p.is_file())

    # -- remotes (remote.py, storage/backends; docs/remotes.md) ---------------------------------
    def remotes(self) -> dict[str, dict[str, Any]]:
        """The configured remotes: ``{name: {"url": ..., "endpoint_url": ...}}``."""
        return {n: dict(v) for n, v in sorted((self.config.data.get("remotes") or {}).items())}

    def remote_add(
        self,
        name: str,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
    ) -> dict[str, Any]:
        """Configure a remote (``file:///other/disk``, ``s3://bucket/prefix``, ``memory://x``).

        Raises:
            InvalidName: a bad remote name or URL.
            Conflict: a remote of that name exists.
        """
        from .remote import check_remote_name
        from .storage.backends import check_url

        check_remote_name(name)
        if name in self.remotes():
            raise Conflict(f"remote {name} exists (remove it first: mstore remote remove {name})")
        settings = {k: v for k, v in (("url", url), ("endpoint_url", endpoint_url), ("region", region),
                                      ("profile", profile)) if v}
        # Validate the URL without building a client: an S3 client costs ~0.3 s of botocore
        # model loading, which clone paid twice (here, then again to fetch).
        check_url(url)
        data = dict(self.config.data)
        data["remotes"] = {**(data.get("remotes") or {}), name: settings}
        self.config = Config(data)
        write_config(self.root, self.config)
        return settings

    def _set_chunking(self, chunking: dict[str, int]) -> None:
        """Replace ``[chunking]`` (only while the store holds nothing: clone)."""
        data = dict(self.config.data)
        data["chunking"] = dict(chunking)
        self.config = Config(data)
        self.store.config = self.config
        write_config(self.root, self.config)

    def remote_remove(self, name: str) -> int:
        """Forget a remote and its tracking refs (their reflog stays). Returns how many refs went."""
        self._remote_settings(name)
        data = dict(self.config.data)
        data["remotes"] = {k: v for k, v in (data.get("remotes") or {}).items() if k != name}
        self.config = Config(data)
        write_config(self.root, self.config)
        change = RefChange(self.user, "remote remove", f"removed remote {name}")
        n = 0
        with self.store.index.write() as txn:
            for ref, digest in list(txn.iter_refs(f"refs/remotes/{name}/")):
                set_if_equals(txn, ref, digest, None, change, self.clock())
                n += 1
        return n

    def _remote_settings(self, name: str) -> dict[str, Any]:
        from .errors import RemoteNotFound

        settings = self.remotes().get(name)
        if settings is None:
            known = ", ".join(self.remotes()) or "none configured"
            raise RemoteNotFound(f"no remote {name!r} (remotes: {known}; add one with mstore remote add)")
        return settings

    def _backend(self, name: str):
        from .storage.backends import open_backend

        settings = self._remote_settings(name)
        return open_backend(settings["url"], **{k: v for k, v in settings.items() if k != "url"})

    def _remote_cache(self, name: str) -> Path:
        import blake3

        url = self._remote_settings(name)["url"]
        return self.root / TMP_DIR / "remote-cache" / blake3.blake3(url.encode()).hexdigest()[:16]

    def _push_specs(self, refs: list[str], all_branches: bool, tags: bool, force: bool) -> list[tuple[str, str, bool]]:
        specs: list[tuple[str, str, bool]] = []
        with self.store.index.read() as txn:
            for spec in refs:
                src, sep, dst = spec.partition(":")
                local = self._find_ref(txn, src)
                if local is None or local.startswith("refs/remotes/"):
                    raise RefNotFound(f"no local branch or tag {src!r} to push")
                if sep:
                    remote = (TAGS if local.startswith(TAGS) else HEADS) + dst if not dst.startswith("refs/") else dst
                else:
                    remote = local
                check_ref_name(remote)
                specs.append((local, remote, force))
            if all_branches:
                specs += [(n, n, force) for n, _d in txn.iter_refs(HEADS)]
            if tags:
                specs += [(n, n, False) for n, _d in txn.iter_refs(TAGS)]
        if not specs:
            raise UserError("nothing to push: name a branch or tag, or use --all / --tags")
        return list(dict.fromkeys(specs))

    def push(
        self,
        remote: str,
        refs: list[str] = (),
        *,
        all_branches: bool = False,
        tags: bool = False,
        force: bool = False,
        progress: Progress | None = None,
        on_total: Callable[[int], None] | None = None,
        crash_hook: Callable[[str], None] | None = None,
        pack_target: int | None = None,
        delete: bool = False,
    ):
        """Send what ``remote`` lacks and move its refs by compare-and-swap: ``repo.push("origin", ["exp1"])``.

        ``refs`` are branch or tag names, or ``LOCAL:REMOTE``. A remote branch moves only by
        fast-forward unless ``force``; remote tags never move. Every ref that can move moves;
        then, if any could not, :class:`PushRejected` lists them (its ``result`` attribute has
        the whole :class:`~mstore.remote.TransferResult`).

        With ``delete``, ``refs`` name remote branches to delete instead (``git push --delete``;
        see :func:`mstore.remote.delete_refs`): by compare-and-swap, logged in the remote
        reflog, the tracking ref ``REMOTE/BRANCH`` removed. Tags, branches someone moved since
        you last fetched them and branches you never fetched are deleted only with ``force``;
        every ref is checked before any is deleted.

        Raises:
            RemoteNotFound: no such remote. RefNotFound: no such local ref (with ``delete``: no
                such remote ref; nothing changed).
            PushRejected: a ref was not a fast-forward, or another pusher moved it first.
            IntegrityError: a local object to send is damaged (nothing moved).
        """
        from .errors import PushRejected
        from .remote import PACK_TARGET, delete_refs, push

        if delete:
            if not refs or all_branches or tags:
                raise UserError("push --delete takes the remote branches to delete, and neither --all nor --tags")
            specs = list(refs)
        else:
            specs = self._push_specs(list(refs), all_branches, tags, force)
        target = pack_target or int(self._remote_settings(remote).get("pack_size", PACK_TARGET))
        backend = self._backend(remote)
        try:
            if delete:
                result = delete_refs(
                    self.store, backend, remote, specs, self.user, force=force, crash_hook=crash_hook, now=self.clock
                )
            else:
                result = push(
                    self.store, backend, remote, specs, self.user, progress=progress, on_total=on_total,
                    crash_hook=crash_hook, pack_target=target, cache_dir=self._remote_cache(remote), now=self.clock,
                )
        finally:
            backend.close()
        if result.rejected:
            lines = [f"  {r.local} -> {remote}/{r.remote}: {r.reason}" for r in result.rejected]
            exc = PushRejected(f"push to {remote} rejected:\n" + "\n".join(lines), result.rejected)
            exc.result = result
            raise exc
        return result

    def fetch(
        self,
        remote: str,
        refs: list[str] = (),
        *,
        progress: Progress | None = None,
        on_total: Callable[[int], None] | None = None,
        max_object: int | None = None,
        crash_hook: Callable[[str], None] | None = None,
    ):
        """Receive the remote's branches (all, or ``refs``) and tags, verified; update ``REMOTE/BRANCH`` refs.

        Raises:
            RemoteNotFound, RefNotFound: no such remote or remote ref.
            RemoteIntegrityError: the remote served wrong, truncated or hostile data (nothing
                unverified was indexed and no ref moved).
            OversizedObject: a remote object above the limit.
        """
        from .remote import MAX_OBJECT, fetch

        wanted = None
        if refs:
            wanted = [r if r.startswith("refs/") else (TAGS + r if r in self._remote_tag_names(remote) else HEADS + r)
                      for r in refs]
        backend = self._backend(remote)
        try:
            return fetch(
                self.store, backend, remote, wanted, self.user, progress=progress, on_total=on_total,
                max_object=max_object or MAX_OBJECT, cache_dir=self._remote_cache(remote), crash_hook=crash_hook,
            )
        finally:
            backend.close()

    def _remote_tag_names(self, remote: str) -> set[str]:
        from .remote import list_refs

        backend = self._backend(remote)
        try:
            return {short_name(n) for n in list_refs(backend) if n.startswith(TAGS)}
        finally:
            backend.close()

    def pull(
        self,
        remote: str,
        branch: str,
        *,
        progress: Progress | None = None,
        on_total: Callable[[int], None] | None = None,
    ):
        """Fetch ``branch`` from ``remote`` and fast-forward the local branch of that name to it.

        Returns:
            (fetch result, RefChangeResult of the local branch).

        Raises:
            Diverged: the local branch has commits the remote one lacks (nothing moved locally
                except the tracking ref).
        """
        from .errors import Diverged
        from .remote import is_ancestor, tracking_ref

        full = branch_ref(branch)
        result = self.fetch(remote, [full], progress=progress, on_total=on_total)
        with self.store.index.read() as txn:
            theirs = ObjectId.from_digest(txn.get_ref(tracking_ref(remote, full)))
            cur = txn.get_ref(full)
        mine = ObjectId.from_digest(cur) if cur is not None else None
        if mine == theirs:
            return result, RefChangeResult(branch, full, mine, theirs)
        if mine is not None and not is_ancestor(self.store, mine, theirs):
            raise Diverged(
                f"{branch} has commits that {remote}/{branch} lacks: cannot fast-forward "
                f"({mine.short} vs {theirs.short}); push them to another branch, or restore from the reflog"
            )
        self._update_ref(full, cur, theirs, "pull", f"fast-forward to {remote}/{branch}")
        return result, RefChangeResult(branch, full, mine, theirs)

    @classmethod
    def clone(
        cls,
        url: str,
        dest: str | os.PathLike,
        *,
        name: str = "origin",
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        progress: Progress | None = None,
        on_total: Callable[[int], None] | None = None,
    ) -> Repo:
        """Create a repository at ``dest`` from a remote: every branch (tracked and local) and tag.

        Raises:
            RepositoryExists, Conflict: ``dest`` exists and is not empty.
            RemoteIntegrityError: bad data from the remote; the new repository is removed.
        """
        import shutil

        dest = Path(dest)
        created = not dest.exists()
        repo = cls.init(dest)
        try:
            repo.remote_add(name, url, endpoint_url=endpoint_url, region=region, profile=profile)
            from .errors import RemoteNotFound
            from .remote import MAX_OBJECT, check_layout, fetch, marker_chunking

            # One backend for the check and the fetch: an S3 client costs ~0.2 s of botocore
            # model loading, a tenth of a 1 GB clone.
            backend = repo._backend(name)
            try:
                marker = check_layout(backend)
                if marker is None:
                    raise RemoteNotFound(f"{url} is not an mstore remote (no mstore-remote.json): nothing to clone")
                # Cut new versions as the history being fetched was cut, or they share nothing with it.
                repo._set_chunking(marker_chunking(backend, marker))
                fetch(
                    repo.store, backend, name, None, repo.user, progress=progress, on_total=on_total,
                    max_object=MAX_OBJECT, cache_dir=repo._remote_cache(name),
                )
            finally:
                backend.close()
            change = RefChange(repo.user, "clone", f"cloned from {url}")
            with repo.store.index.write() as txn:
                for ref, digest in list(txn.iter_refs(f"refs/remotes/{name}/")):
                    set_if_equals(txn, HEADS + ref[len(f"refs/remotes/{name}/"):], None, digest, change, repo.clock())
        except BaseException:
            repo.close()
            if created:
                shutil.rmtree(dest, ignore_errors=True)
            else:
                for child in dest.iterdir():
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
            raise
        return repo

    def remote_refs(self, remote: str) -> list[dict[str, Any]]:
        """The remote's branches and tags as they are now (like ``git ls-remote``)."""
        from .remote import list_refs

        backend = self._backend(remote)
        try:
            return [
                {"ref": short_name(n), "full_name": n, "id": str(r.id), "seq": r.seq, "time": r.doc.get("time"),
                 "user": r.doc.get("user")}
                for n, r in sorted(list_refs(backend).items())
            ]
        finally:
            backend.close()

    def remote_reflog(self, remote: str, ref: str) -> list[dict[str, Any]]:
        """Every change of a remote ref, oldest first (the remote's own reflog)."""
        from .remote import remote_reflog

        full = ref if ref.startswith("refs/") else HEADS + ref
        backend = self._backend(remote)
        try:
            return remote_reflog(backend, full)
        finally:
            backend.close()

    def remote_lacks(self, remote: str, keys) -> set:
        """Which ``(kind, digest)`` keys the remote does not hold intact (for gc ``--require-remote``)."""
        from .remote import lacks

        backend = self._backend(remote)
        try:
            return lacks(backend, keys, self._remote_cache(remote))
        finally:
            backend.close()

    def fsck_repair(self, remote: str, progress: Progress | None = None) -> dict[str, Any]:
        """fsck, then replace every damaged or missing object with a verified copy from ``remote``.

        Returns:
            ``{"repaired": [...], "failed": [...], "before": report, "after": report}``.
        """
        from .fsck import fsck
        from .remote import repair

        before = fsck(self.store, progress)
        keys = []
        inverse = {v: k for k, v in KINDS.items()}
        for d in before.damaged:
            keys.append((inverse[d["kind"]], ObjectId(d["id"])))
        for r in before.refs:
            keys.append(("m", ObjectId(r["id"])))
        keys = list(dict.fromkeys(keys))
        repaired: list = []
        failed: dict = {}
        if keys:
            backend = self._backend(remote)
            try:
                # A delta is verified through its base: if the base was damaged too, it is
                # repaired in an earlier round and the delta in the next.
                todo = keys
                for _round in range(8):
                    done, failed = repair(self.store, backend, todo, self._remote_cache(remote))
                    repaired += done
                    todo = list(failed)
                    if not failed or not done:
                        break
            finally:
                backend.close()
        after = fsck(self.store) if keys else before
        return {
            "remote": remote,
            "repaired": [{"kind": KINDS[k], "id": str(o)} for k, o in repaired],
            "failed": [{"kind": KINDS[k], "id": str(o), "error": e} for (k, o), e in failed.items()],
            "before": before.to_dict(),
            "after": after.to_dict(),
            "ok": after.ok,
        }


# A file the parent lacks is looked for this many commits further back as a delta source: a
# LoRA run commits the base, then adapters only, then the merged model, which should be a delta
# against the base two commits earlier.
DELTA_LOOKBACK = 8

# Worker threads a repository keeps for its commits and checkouts (see Repo._worker_pool).
MAX_WORKERS = 8


def _first_parent_trees(store: ObjectStore, commit: Commit, n: int) -> list[ObjectId]:
    """Root trees of up to ``n`` first-parent ancestors of ``commit`` (not itself), nearest first."""
    out: list[ObjectId] = []
    c = commit
    while c.parents and len(out) < n:
        try:
            c = load_commit(store, c.parents[0])
        except MstoreError:
            break  # an unreadable ancestor only means fewer delta sources
        out.append(c.tree)
    return out


def _refusal_text(branch: str, parent: ObjectId | None, findings: list, dry_run: bool) -> str:
    lines = [
        f"refusing to commit to {branch}{' (dry run)' if dry_run else ''}: this version looks like a "
        f"regression of its parent {parent.short if parent else ''}"
    ]
    for f in findings:
        if isinstance(f.new, (int, float)) and isinstance(f.old, (int, float)) and not isinstance(f.new, bool):
            lines.append(f"  {f.what:<28} {_fmt_num(f.new)}  (parent {_fmt_num(f.old)}, {f.detail})")
        else:
            lines.append(f"  {f.what:<28} {f.detail}")
    lines.append("commit with --allow-regression to record it anyway (the override is recorded in the commit)")
    return "\n".join(lines)


def _fmt_num(v: float) -> str:
    if isinstance(v, float) and not v.is_integer():
        return f"{v:.4g}"
    return f"{int(v):,}"


def _input_ids(c: Commit) -> set[str]:
    ids = set()
    for v in list(c.inputs.values()) + [c.meta.get("base")]:
        if isinstance(v, str) and is_full_id(v):
            ids.add(v)
        elif isinstance(v, dict) and isinstance(v.get("id"), str):
            ids.add(v["id"])
    return ids


def _is_metric(key: str, value: Any) -> bool:
    from .guards import direction

    return isinstance(value, (int, float)) and not isinstance(value, bool) and direction(key) is not None


def _current_user() -> str:
    import os
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without a passwd entry (containers)
        return f"uid{os.getuid()}"


def _neg(iso: str) -> str:
    # Max-heap on ISO times via a min-heap on their character complements.
    return "".join(chr(0x10FFFF - ord(ch)) for ch in iso)


def _opener(store: ObjectStore, fid: ObjectId, fobj: FileObject, path: str):
    from .snapshot import FileReader

    return lambda: FileReader(store, fid, fobj, path)


def _disk_opener(path: Path):
    return lambda: open(path, "rb")


__all__ = ["CommitResult", "DiffResult", "LogEntry", "LsEntry", "RefChangeResult", "RefInfo", "Repo", "STORE_DIRNAME"]
