"""In-memory backend: a first-class implementation for tests and dry runs, not a mock."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import blake3

from .base import Backend, BackendNotFound, Properties, check_key, check_prefix


class MemoryBackend(Backend):
    """Keys in a dict, guarded by one lock (so compare-and-swap is real across threads)."""

    properties = Properties(persistent=False)

    def __init__(self, url: str = "memory://"):
        self.url = url
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes:
        check_key(key)
        with self._lock:
            try:
                return self._data[key]
            except KeyError:
                raise BackendNotFound(f"{self.url}: no {key}") from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self.get(key)[offset : offset + length]

    def stat(self, key: str) -> int | None:
        check_key(key)
        with self._lock:
            data = self._data.get(key)
        return None if data is None else len(data)

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        check_prefix(prefix)
        with self._lock:
            items = sorted((k, len(v)) for k, v in self._data.items() if k.startswith(prefix))
        yield from items

    def put(self, key: str, data: bytes) -> None:
        check_key(key)
        with self._lock:
            self._data[key] = bytes(data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        check_key(key)
        with self._lock:
            if key in self._data:
                return False
            self._data[key] = bytes(data)
            return True

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        check_key(key)
        with self._lock:
            data = self._data.get(key)
        return None if data is None else (data, blake3.blake3(data).hexdigest())

    def put_if_version(self, key: str, data: bytes, version: str | None) -> bool:
        check_key(key)
        with self._lock:
            cur = self._data.get(key)
            cur_version = None if cur is None else blake3.blake3(cur).hexdigest()
            if cur_version != version:
                return False
            self._data[key] = bytes(data)
            return True

    def delete(self, key: str) -> None:
        check_key(key)
        with self._lock:
            self._data.pop(key, None)
