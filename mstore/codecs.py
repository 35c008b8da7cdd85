"""Chunk encodings: pure ``bytes -> bytes`` functions, chosen per chunk and recorded with it.

An encoding is a storage detail, never identity: a chunk's id is always the hash of its raw
bytes, so a later repack may re-encode without changing any id.

Codec numbers are part of the on-disk format (docs/format.md); never renumber them.

* ``RAW`` (0): stored as is. Used when compression does not save at least ``MIN_SAVING``.
* ``ZSTD`` (1): one zstd frame that declares its content size.

Decoding is bounded by the raw length recorded beside the chunk in the pack record: a frame
that declares a different size, or would expand past it, is refused before any large buffer is
allocated ("compression bomb").
"""

from __future__ import annotations

import threading

import zstandard

from .errors import IntegrityError

RAW = 0
ZSTD = 1

NAMES = {RAW: "raw", ZSTD: "zstd"}

# Keep a compressed form only if it saves at least this fraction; below that, reading raw bytes
# is cheaper than decompressing them for a gain nobody would notice.
MIN_SAVING = 0.02

DEFAULT_LEVEL = 3

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstandard objects are not thread safe; keep one per thread and level.
    cache = getattr(_local, "c", None)
    if cache is None:
        cache = _local.c = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def encode(raw: bytes | memoryview, level: int = DEFAULT_LEVEL) -> tuple[int, bytes]:
    """Choose an encoding for ``raw`` and return ``(codec, encoded bytes)``."""
    n = len(raw)
    if n < 64:
        return RAW, bytes(raw)
    enc = _compressor(level).compress(raw)
    if len(enc) <= n * (1 - MIN_SAVING):
        return ZSTD, enc
    return RAW, bytes(raw)


def decode(codec: int, data: bytes | memoryview, raw_len: int) -> bytes:
    """Decode ``data`` stored with ``codec`` into exactly ``raw_len`` bytes.

    Raises:
        IntegrityError: unknown codec, a frame whose declared size is not ``raw_len``, or
            output of the wrong length.
    """
    if codec == RAW:
        if len(data) != raw_len:
            raise IntegrityError(f"raw chunk has {len(data)} bytes, record says {raw_len}")
        return bytes(data)
    if codec == ZSTD:
        try:
            params = zstandard.get_frame_parameters(data)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"zstd frame header unreadable: {exc}") from None
        if params.content_size != raw_len:
            raise IntegrityError(
                f"zstd frame declares {params.content_size} bytes, record says {raw_len}: refusing to decompress"
            )
        try:
            out = _decompressor().decompress(data, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"zstd frame does not decompress: {exc}") from None
        if len(out) != raw_len:
            raise IntegrityError(f"zstd frame gave {len(out)} bytes, record says {raw_len}")
        return out
    raise IntegrityError(f"unknown codec {codec}")
