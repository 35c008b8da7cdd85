"""Remote storage backends: one narrow interface (base.py), three implementations.

:func:`open_backend` is the only place that picks a concrete backend from a URL:

    file:///mnt/other-disk/store     local.py (a second disk; atomic rename, flock for CAS)
    s3://bucket/prefix               s3.py    (boto3; conditional writes for CAS)
    memory://name                    memory.py (tests, dry runs)
"""

from __future__ import annotations

import threading
from typing import Any

from ...errors import InvalidName
from .base import Backend, BackendError, BackendNotFound, Properties, check_key
from .memory import MemoryBackend

# memory:// backends live as long as the process; the same URL opens the same one.
_memory: dict[str, MemoryBackend] = {}
_memory_lock = threading.Lock()


def check_url(url: str) -> None:
    """Validate a remote URL without opening anything (no client, no I/O).

    Raises:
        InvalidName: an unknown scheme or a malformed URL.
    """
    if not isinstance(url, str) or "://" not in url:
        raise InvalidName(f"{url!r} is not a remote URL (file:///PATH, s3://BUCKET/PREFIX or memory://NAME)")
    scheme = url.split("://", 1)[0]
    if scheme == "file":
        from .local import path_from_url

        path_from_url(url)
    elif scheme == "s3":
        from .s3 import parse_s3_url

        parse_s3_url(url)
    elif scheme != "memory":
        raise InvalidName(f"unknown remote scheme {scheme!r} in {url!r} (use file://, s3:// or memory://)")


def open_backend(url: str, **options: Any) -> Backend:
    """The backend a URL names; ``options``: ``endpoint_url``, ``region``, ``profile`` (S3 only).

    Raises:
        InvalidName: an unknown scheme or a malformed URL.
        BackendError: the backend could not be set up (no boto3, a bad profile).
    """
    if not isinstance(url, str) or "://" not in url:
        raise InvalidName(f"{url!r} is not a remote URL (file:///PATH, s3://BUCKET/PREFIX or memory://NAME)")
    scheme = url.split("://", 1)[0]
    if scheme == "file":
        from .local import LocalBackend, path_from_url

        return LocalBackend(path_from_url(url), url)
    if scheme == "s3":
        from .s3 import S3Backend

        known = {k: v for k, v in options.items() if k in ("endpoint_url", "region", "profile") and v}
        return S3Backend(url, **known)
    if scheme == "memory":
        with _memory_lock:
            return _memory.setdefault(url, MemoryBackend(url))
    raise InvalidName(f"unknown remote scheme {scheme!r} in {url!r} (use file://, s3:// or memory://)")


__all__ = [
    "Backend", "BackendError", "BackendNotFound", "MemoryBackend", "Properties", "check_key", "check_url",
    "open_backend",
]
