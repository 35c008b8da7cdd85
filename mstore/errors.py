"""The one exception hierarchy of mstore.

Every error a user can cause or meet is an :class:`MstoreError`. Categories say what the caller
should do about it, and each carries the process exit code the CLI uses (mapped in one place,
``mstore.cli``). Builtin mixins let plain Python callers catch what they already expect
(``ObjectNotFound`` is also a ``LookupError``).

Deliberate non-relations, so nobody "simplifies" them away:

* ``IntegrityError`` is *not* a ``UserError``: corrupted bytes are never the user's input
  mistake, and a script must never retry them as if they were.
* ``Conflict`` is *not* an ``IntegrityError``: losing a compare-and-swap race is normal
  operation; the store is intact and the caller may fetch the new head and try again.
"""

from __future__ import annotations


class MstoreError(Exception):
    """Root of every error mstore raises on purpose.

    Attributes:
        exit_code: process exit status the CLI uses for this error.
        show_traceback: True only for errors that indicate a bug in mstore.
    """

    exit_code = 1
    show_traceback = False

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UserError(MstoreError):
    """The input was wrong: a bad name, a bad argument, a path that does not exist."""

    exit_code = 2


class FileChanged(UserError):
    """A file being committed changed size while it was read (another process rewrote it)."""


class InvalidName(UserError, ValueError):
    """A ref name, tree entry name or path component is not acceptable."""


class InvalidRevision(UserError, ValueError):
    """A revision expression (``REF~N``, ``REF@{N}``, an id prefix) cannot be parsed."""


class NotFound(MstoreError, LookupError):
    """Something named does not exist: a ref, an object, a path inside a commit."""

    exit_code = 3


class RefNotFound(NotFound):
    """No ref of that name exists."""


class ObjectNotFound(NotFound):
    """No object with that id is in the store."""

    def __init__(self, message: str, object_id: str | None = None):
        super().__init__(message)
        self.object_id = object_id


class PathNotFound(NotFound, FileNotFoundError):
    """A path does not exist (on disk, or inside a commit's tree)."""


class AmbiguousId(UserError):
    """An abbreviated id matches more than one object."""


class Conflict(MstoreError):
    """A compare-and-swap lost: someone else moved the ref first, or the target exists."""

    exit_code = 4


class RefConflict(Conflict):
    """A ref was not at the value the caller expected when it tried to move it."""

    def __init__(self, message: str, ref: str, expected: str | None, actual: str | None):
        super().__init__(message)
        self.ref = ref
        self.expected = expected
        self.actual = actual


class IntegrityError(MstoreError):
    """Stored bytes do not match their id or their framing: corruption, never silently returned."""

    exit_code = 5


class ChecksumMismatch(IntegrityError):
    """Bytes were read whose hash is not the id they were stored under."""

    def __init__(self, message: str, expected: str, got: str):
        super().__init__(message)
        self.expected = expected
        self.got = got


class FormatError(MstoreError):
    """A persistent structure is malformed, or of a version this mstore does not understand."""

    exit_code = 6


class MalformedObject(FormatError):
    """An object's bytes do not parse as the object they claim to be."""


class UnsupportedFormat(FormatError):
    """A store, pack or document has a format version outside what this mstore supports."""


class StorageError(MstoreError):
    """The storage underneath failed (disk full, permission denied, LMDB error)."""

    exit_code = 7


class Refused(MstoreError):
    """A safety rule refused the operation; an explicit flag can override it (and is recorded)."""

    exit_code = 8


class RegressionRefused(Refused):
    """A commit looks like a regression of its parent (see guards.py)."""

    def __init__(self, message: str, findings: list):
        super().__init__(message)
        self.findings = findings


class ProtectedRef(Refused):
    """Deleting or force-moving a protected ref needs --force-protected and --confirm NAME."""


class RepositoryNotFound(NotFound):
    """No mstore repository at or above the given directory."""


class RepositoryExists(Conflict):
    """``init`` was asked to create a repository where one already exists."""


# -- remotes (remote.py, storage/backends) ----------------------------------------------------


class RemoteNotFound(NotFound):
    """No remote of that name is configured."""


class PushRejected(Conflict):
    """A push did not move some remote refs: not a fast-forward, or another pusher won the race.

    The objects that were sent stay on the remote (a re-push sends nothing twice); fetch the
    new remote head, build on it, and push again.
    """

    def __init__(self, message: str, rejected: list):
        super().__init__(message)
        self.rejected = rejected


class Diverged(Conflict):
    """A pull cannot fast-forward: the local branch has commits the remote branch lacks."""


class RemoteIntegrityError(IntegrityError):
    """A remote served bytes that are wrong, truncated, malformed or hostile; nothing was taken in."""


class OversizedObject(RemoteIntegrityError):
    """A remote object is larger than the configured limit; refused before it is downloaded."""


class RemoteBusy(Conflict):
    """Another operation holds a lock on the remote; nothing was changed, retry later.

    A push meets a remote gc's lock, or a remote gc meets a push's or another gc's
    (docs/remote-gc.md).

    ``locks`` lists the other operations' lock documents (op, host, pid, user, time, key).
    """

    def __init__(self, message: str, locks: list):
        super().__init__(message)
        self.locks = locks
