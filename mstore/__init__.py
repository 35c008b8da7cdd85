"""mstore: git for model weights and datasets.

The public Python API. Everything a user (or the bundled trainer) needs is importable from here;
modules below are internals whose names may change.

Names are loaded on first use (PEP 562), so ``mstore --help`` does not pay for the store's
imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_ERRORS = (
    "AmbiguousId", "ChecksumMismatch", "Conflict", "FormatError", "IntegrityError", "InvalidName",
    "InvalidRevision", "MalformedObject", "MstoreError", "NotFound", "ObjectNotFound", "PathNotFound",
    "RefConflict", "RefNotFound", "Refused", "RegressionRefused", "ProtectedRef", "RepositoryExists",
    "RepositoryNotFound", "StorageError",
    "UnsupportedFormat", "UserError",
)
_REPO = ("CommitResult", "DiffResult", "LogEntry", "LsEntry", "RefChangeResult", "RefInfo", "Repo")

__all__ = sorted((*_ERRORS, *_REPO, "ObjectId"))

if TYPE_CHECKING:  # pragma: no cover
    from .errors import *  # noqa: F403
    from .hashing import ObjectId  # noqa: F401
    from .repo import CommitResult, DiffResult, LogEntry, LsEntry, RefInfo, Repo  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _ERRORS:
        module = "errors"
    elif name in _REPO:
        module = "repo"
    elif name == "ObjectId":
        module = "hashing"
    else:
        raise AttributeError(f"module 'mstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
