"""The narrow interface every remote storage backend implements (restic's ``Backend``).

A backend stores immutable byte strings under keys like ``packs/18c2...e1.pack`` and small
mutable documents (remote refs) that change only by compare-and-swap. It knows nothing about
packs, objects or refs: ``mstore.remote`` builds those on top, so one contract test suite
(``tests/remote/test_backend_contract.py``) runs unchanged against every implementation.

Keys are validated when given *and* when listed back ("no crap in, no crap out"): ``/``-separated
components of ``[A-Za-z0-9._-]``, none empty, ``.`` or ``..``, none starting with ``.``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ...errors import InvalidName, NotFound, StorageError

_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")
MAX_KEY = 900

Progress = Callable[[int], None]


class BackendNotFound(NotFound):
    """A key does not exist on the backend."""


class BackendError(StorageError):
    """The backend failed (network, permission, disk); the message never carries credentials."""


def check_key(key: str) -> str:
    """Validate a backend key.

    Raises:
        InvalidName: an empty, absolute, traversing or otherwise odd key.
    """
    if not isinstance(key, str) or not key or len(key) > MAX_KEY:
        raise InvalidName(f"invalid backend key {key!r}")
    for part in key.split("/"):
        if not _COMPONENT.match(part) or part.endswith(".lock") or part.endswith(".tmp"):
            raise InvalidName(f"invalid backend key {key!r}: bad component {part!r}")
    return key


def check_prefix(prefix: str) -> str:
    """Validate a listing prefix (``""`` or a key followed by ``/``)."""
    if prefix:
        if not prefix.endswith("/"):
            raise InvalidName(f"listing prefix {prefix!r} must end with '/'")
        check_key(prefix[:-1])
    return prefix


@dataclass(frozen=True)
class Properties:
    """What a backend guarantees (restic declares these; callers rely on them)."""

    #: ``put`` makes an object appear whole or not at all.
    atomic_put: bool = True
    #: ``put_if_version`` is a real compare-and-swap against concurrent writers.
    conditional_writes: bool = True
    #: the bytes survive the process (memory backends do not).
    persistent: bool = True


class Backend(ABC):
    """Keys to immutable bytes, plus compare-and-swap documents. See the module docstring."""

    url: str
    properties: Properties = Properties()

    # -- reading -------------------------------------------------------------------------
    @abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object.

        Raises:
            BackendNotFound: no such key.
            BackendError: the backend failed.
        """

    @abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer only if the object ends first).

        Raises:
            BackendNotFound: no such key.
        """

    @abstractmethod
    def stat(self, key: str) -> int | None:
        """The object's size, or None if it does not exist."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(key, size) of every object under ``prefix``, sorted by key; each key validated.

        Raises:
            BackendError: the listing failed or named an invalid key.
        """

    def get_file(self, key: str, dest: Path, progress: Progress | None = None) -> None:
        """Download an object into ``dest`` (big objects: ranged or parallel where supported)."""
        data = self.get(key)
        dest.write_bytes(data)
        if progress:
            progress(len(data))

    # -- writing -------------------------------------------------------------------------
    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (replacing it), atomically: readers see all or nothing.

        ``data`` may be any bytes-like object (a push hands a memoryview of the pack it built);
        a backend that keeps it must copy it.
        """

    def put_file(self, key: str, path: Path, progress: Progress | None = None) -> None:
        """Upload a local file (big objects: multipart where supported)."""
        data = Path(path).read_bytes()
        self.put(key, data)
        if progress:
            progress(len(data))

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create ``key`` unless it exists; True if this call created it."""

    @abstractmethod
    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """A CAS document and its version token (an ETag), or None if it does not exist."""

    @abstractmethod
    def put_if_version(self, key: str, data: bytes, version: str | None) -> bool:
        """Compare-and-swap: write only if the document is still at ``version``.

        ``version`` None means "only if it does not exist". Returns False (and changes
        nothing) if someone else changed the document first.
        """

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove a key (no error if it is already gone)."""

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release connections."""
