"""Chunk encodings: pure ``bytes -> bytes`` functions, chosen per chunk and recorded with it.

An encoding is a storage detail, never identity: a chunk's id is always the hash of its raw
bytes, so a later repack may re-encode without changing any id.

Codec numbers are part of the on-disk format (docs/format.md); never renumber them.

* ``RAW`` (0): stored as is. Used when compression does not save at least ``MIN_SAVING``.
* ``ZSTD`` (1): one zstd frame that declares its content size.
* ``DELTA`` (3): XOR with another chunk of the same length (the same tensor in the parent
  checkpoint), the XOR encoded with one of the codecs above. Consecutive checkpoints share no
  identical tensors when every weight moves, but their sign/exponent bytes and top mantissa
  bits rarely change, so the XOR is mostly zero bytes in those planes. Payload::

      base id (32 bytes) | u8 depth | u8 codec of the XOR | encoded XOR

  The base is itself a chunk (possibly a delta: ``depth`` counts the chain, bounded by the
  writer), so only the store, which can fetch the base, decodes it; see :func:`decode_delta`.
* ``BYTEPLANE`` (2): for float tensors (element size 2, 4 or 8). Byte *i* of every element goes
  to plane *i*; each plane is zstd-compressed if that saves at least ``MIN_SAVING``, else stored
  raw. Weights barely compress as a whole (zstd: ~1.09× fp32, ~1.28× bf16) because the
  mantissa bytes are noise; the sign/exponent plane compresses ~3×. Splitting them gives
  ~1.21× fp32 and ~1.46× bf16 and is *faster* than zstd on the whole chunk, since the noise
  planes are copied instead of compressed. Payload::

      u8 element size | u8 bitmask of compressed planes | u32 encoded length per plane | planes

* ``FLOATPLANE`` (4): what new float pieces use. Like ``BYTEPLANE`` (same payload), but each
  element is first rotated left by one bit, so the sign bit moves to the bottom and the top
  byte holds exactly the exponent (bf16, f32; the top 8 exponent bits of f64). A whole
  exponent per byte has lower entropy than sign + 7 exponent bits: on all-MiniLM-L6-v2 the
  ratio goes from 1.457x to 1.504x in bf16 and from 1.206x to 1.222x in fp32.

Planes are compressed with zstd tuned towards pure entropy coding (fast strategy, tiny hash
tables, 7-byte minimum match): plane bytes have almost no long repeats, so match search at
level 1 costs time and, by splitting literal runs, ratio. Measured on all-MiniLM-L6-v2: 2x
the speed of level 1 and closer to the planes' order-0 entropy.

Why not a library codec: ZipNN (Huffman on the exponent) reaches the same ratio as these planes
on the real weights (fp32 1.220 vs 1.217, bf16 1.503 vs 1.503, see docs/bench.md) but is a
whole-buffer codec with no plane access, so chains could not be XORed in plane space. Blosc2
(SIMD shuffle + zstd, C threads) decodes about 1.8x faster but, without the rotation, packs the
sign with 7 exponent bits: 1.184 vs 1.203 on a full fine-tune's largest fp32 tensor, below the
1.21 target. Splitting and interleaving planes, with the rotation and (on the last level of a
chain) the XOR fused into the same pass, run in a small C extension (``mstore/_planes.c``, ~10 and
~16 GB/s per core on float32, GIL released) because the rotation is what no shuffle library
does and numpy needs several passes for it (~3 and ~4 GB/s). The extension is optional: where it
was not built, the numpy versions below produce the same bytes (the tests compare the two).

Decoding is bounded by the raw length recorded beside the chunk in the pack record: a frame
that declares a different size, or would expand past it, is refused before any large buffer is
allocated ("compression bomb").
"""

from __future__ import annotations

import importlib
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import zstandard

from .errors import IntegrityError

# The kernels this source needs (mstore/_planes.c KERNELS_VERSION): 2 = split with a fused XOR.
KERNELS_VERSION = 2

try:  # by name: the import linter cannot see into an extension module and would blame `mstore`
    _kernels: Any = importlib.import_module("mstore._planes")
except ImportError:  # built without a C compiler: the numpy versions below give the same bytes
    _kernels = None
if _kernels is not None and getattr(_kernels, "VERSION", 1) < KERNELS_VERSION:
    _kernels = None  # built from an older source (not rebuilt since): the numpy versions, not errors

RAW = 0
ZSTD = 1
BYTEPLANE = 2
DELTA = 3
FLOATPLANE = 4

# Only ever the inner codec of a DELTA payload (format >= 3): the XOR is taken against a
# low-rank prediction from the base, not against the base itself (see encode_lowrank_delta).
LOWRANK = 5

NAMES = {RAW: "raw", ZSTD: "zstd", BYTEPLANE: "byteplane", DELTA: "delta", FLOATPLANE: "floatplane", LOWRANK: "lowrank"}
PLANE_CODECS = (BYTEPLANE, FLOATPLANE)

# A delta payload: the base chunk's id, the chain depth (1 = the base is stored whole), the
# codec of the XOR bytes that follow (never DELTA itself).
DELTA_HEAD = struct.Struct("<32sBB")

# A plane whose first SAMPLE bytes do not compress is stored raw without compressing the rest.
_SAMPLE = 64 * 1024

# Elements per block when splitting or interleaving planes. Each block costs a dozen numpy calls,
# and every call hands the GIL over: with 32 Ki-element blocks (fastest on one thread) two
# decoding threads were slower together than one alone. 1 Mi elements (4 MiB of float32):
# one thread 3.1-3.3 GB/s, two 5.4-6.0 GB/s (32 Ki: 2.7 and 2.4; whole 16 MiB chunks: 2.1, 3.9).
_BLOCK = 1 << 20

# Keep a compressed form only if it saves at least this fraction; below that, reading raw bytes
# is cheaper than decompressing them for a gain nobody would notice.
MIN_SAVING = 0.02

# A plane of a delta's XOR is compressed only if that saves at least this fraction of it. Each
# read of a version decodes every level of its chains, and a plane that is nearly noise decodes
# at ~1.7 GB/s for a few percent: the low plane of an fp32 XOR (sign bit + 7 noisy mantissa
# bits, ~0.89) cost a third of a chain's decode time for 2.8 % of its size. Planes of whole
# pieces, decoded once per read, keep MIN_SAVING (their ~0.93 mantissa plane is worth it).
DELTA_PLANE_MIN_SAVING = 0.15

DEFAULT_LEVEL = 3

# A LOWRANK delta: rows, columns and rank of the float32 factors that follow (u32, u32, u16).
LOWRANK_HEAD = struct.Struct("<IIH")
MAX_RANK = 64
_LR_OVERSAMPLE = 8  # extra random directions for the range finder beyond MAX_RANK
_LR_PROBE = 128  # side of the corner block whose rank decides whether to try at all
_LR_RELATIVE = 1e-5  # singular values below this fraction of the largest are rounding noise
_F32_TINY = 2.0**-126  # below this (non-zero) a float32 is subnormal

_local = threading.local()


def have_kernels() -> bool:
    """Whether the C byte-plane kernels are built: then plane codecs run without numpy."""
    return _kernels is not None


def _plane_compressor() -> zstandard.ZstdCompressor:
    comp = getattr(_local, "plane", None)
    if comp is None:
        params = zstandard.ZstdCompressionParameters(
            window_log=17, hash_log=6, chain_log=6, search_log=1, min_match=7, target_length=0,
            strategy=zstandard.STRATEGY_FAST, write_content_size=True,
        )
        comp = _local.plane = zstandard.ZstdCompressor(compression_params=params)
    return comp


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


def _scratch(slot: int, n: int) -> memoryview:
    """``n`` bytes of a buffer this thread reuses (contents undefined), one per ``slot``.

    Encoding splits planes and takes XORs of whole pieces; a fresh buffer for each costs page
    faults on every piece, where the encoded result is a new ``bytes`` anyway.
    """
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(slot)
    if buf is None or len(buf) < n:
        buf = bufs[slot] = bytearray(n)
    return memoryview(buf)[:n]


_XOR_SLOT = -1  # scratch slot of encode_delta's XOR; slots 8g..8g+7 hold the planes of group g

# An encoded payload: bytes, or (where the caller asked for ``parts``) a list of buffers whose
# concatenation it is. Planes left raw are then views of this thread's scratch buffers of
# that group, valid until the next encoding into the same group on the same thread: a commit
# worker writes them out at once, and skips copying every raw plane into one bytes first.
Payload = bytes | list
# Scratch groups (see ``parts`` of encode): group 0 is every joined encoding's.
WHOLE_PARTS = 1
DELTA_PARTS = 2


_BYTES_LIKE = (bytes, bytearray, memoryview)


def payload_len(payload: bytes | bytearray | memoryview | list) -> int:
    """Bytes in an encoded payload (see Payload); any sequence of buffers counts as parts."""
    if isinstance(payload, _BYTES_LIKE):
        return len(payload)
    return sum(len(p) for p in payload)


def payload_head(payload: bytes | bytearray | memoryview | list) -> bytes | bytearray | memoryview:
    """A payload's first bytes: all of it, or its first part (which holds any header)."""
    return payload if isinstance(payload, _BYTES_LIKE) else payload[0]


def payload_bytes(payload: bytes | bytearray | memoryview | list) -> bytes:
    """An encoded payload as one bytes object."""
    return bytes(payload) if isinstance(payload, _BYTES_LIKE) else b"".join(payload)


def xor_into(a: bytes | memoryview, b: bytes | memoryview, out: bytearray | memoryview) -> None:
    """``out[i] = a[i] ^ b[i]`` for every byte of ``a`` (``b`` and ``out`` at least as long)."""
    if _kernels is not None:
        _kernels.xor(a, b, out)
        return
    import numpy as np

    n = len(a)
    np.bitwise_xor(
        np.frombuffer(a, dtype=np.uint8),
        np.frombuffer(b, dtype=np.uint8, count=n),
        out=np.frombuffer(out, dtype=np.uint8, count=n),
    )


def encode(
    raw: bytes | memoryview,
    level: int = DEFAULT_LEVEL,
    item_size: int = 0,
    plane_min_saving: float = MIN_SAVING,
    rotate: bool = True,
    parts: int | None = None,
) -> tuple[int, Payload]:
    """Choose an encoding for ``raw`` and return ``(codec, encoded bytes)``.

    ``item_size`` (2, 4 or 8) says the bytes are float elements of that size (byte planes:
    FLOATPLANE, or with ``rotate=False`` BYTEPLANE, for stores older than format version 2);
    ``plane_min_saving`` is what a plane must save to be compressed. With ``parts`` (a scratch
    group, WHOLE_PARTS or DELTA_PARTS) the payload may be a list of buffers instead (see
    Payload), including ``raw`` itself when it is stored as it is.
    """
    n = len(raw)
    if n < 64:
        return RAW, bytes(raw)
    if _planes_fit(n, item_size):
        enc = _encode_planes(raw, item_size, plane_min_saving, rotate=rotate, parts=parts)
        if enc is not None:
            return (FLOATPLANE if rotate else BYTEPLANE), enc
        return RAW, ([raw] if parts else bytes(raw))
    enc = _compressor(level).compress(raw)
    if len(enc) <= n * (1 - MIN_SAVING):
        return ZSTD, enc
    return RAW, bytes(raw)


def _planes_fit(n: int, item_size: int) -> bool:
    """Whether ``n`` bytes of ``item_size``-byte floats are worth splitting into planes."""
    return item_size in (2, 4, 8) and n % item_size == 0 and n >= 16 * item_size and n >= 64


def split_planes(raw: bytes | memoryview, item: int, rotate: bool) -> list:
    """Plane ``i`` holds byte ``i`` of every ``item``-byte little-endian element (numpy uint8 arrays).

    With ``rotate`` each element is first rotated left by one bit (FLOATPLANE). Works in blocks
    that stay in the CPU cache and takes plane ``i`` as the low byte of the element shifted
    right: faster than a strided copy out of a rotated whole copy, with no second full-size
    buffer.
    """
    import numpy as np

    m = len(raw) // item
    planes = [np.empty(m, dtype=np.uint8) for _ in range(item)]
    if _kernels is not None:
        _kernels.split(raw, planes, item, rotate)
        return planes
    bits = 8 * item
    v = np.frombuffer(raw, dtype=f"<u{item}")
    tmp = np.empty(min(_BLOCK, m), dtype=v.dtype)
    tmp2 = np.empty_like(tmp)
    for s in range(0, m, _BLOCK):
        e = min(m, s + _BLOCK)
        vb, t = v[s:e], tmp[: e - s]
        first = 0
        if rotate:  # low byte of rotl1(v): (v << 1) | (v >> (bits - 1)); byte i > 0: v >> (8i - 1)
            t2 = tmp2[: e - s]
            np.left_shift(vb, 1, out=t)
            np.right_shift(vb, bits - 1, out=t2)
            np.bitwise_or(t, t2, out=t)
            np.copyto(planes[0][s:e], t, casting="unsafe")  # integer casts keep the low byte
            first = 1
        for i in range(first, item):
            np.right_shift(vb, 8 * i - (1 if rotate else 0), out=t)
            np.copyto(planes[i][s:e], t, casting="unsafe")
    return planes


def _split(
    raw: bytes | memoryview, item: int, rotate: bool, xor: bytes | memoryview | None = None, group: int = 0
) -> list[memoryview]:
    """:func:`split_planes` into this thread's scratch buffers of ``group`` (numpy arrays without the C kernels).

    With ``xor`` the planes are those of ``raw ^ xor``: the C kernel takes the XOR in the same
    pass, so a delta needs neither a buffer for it nor a pass over it.
    """
    if _kernels is None:
        if xor is not None:
            out = _scratch(_XOR_SLOT, len(raw))
            xor_into(raw, xor, out)
            raw = out
        return [a.data for a in split_planes(raw, item, rotate)]
    m = len(raw) // item
    planes = [_scratch(8 * group + i, m) for i in range(item)]
    _kernels.split(raw, planes, item, rotate, xor)
    return planes


def _encode_planes(
    raw: bytes | memoryview,
    item: int,
    min_saving: float = MIN_SAVING,
    rotate: bool = False,
    prefix: bytes = b"",
    xor: bytes | memoryview | None = None,
    parts: int | None = None,
) -> Payload | None:
    """Byte planes of ``raw`` (of ``raw ^ xor`` if given) after ``prefix``; None if no gain.

    Each plane is compressed where that pays. ``prefix`` (a delta's header) is joined in the
    same copy as the planes: prepending it to the result afterwards copied every delta payload
    once more, into fresh memory. With ``parts`` (a scratch group) the result is the list
    ``[prefix + header, plane, ...]``, raw planes being views of that group's scratch.
    """
    comp = _plane_compressor()
    mask = 0
    out: list = []
    for i, plane in enumerate(_split(raw, item, rotate, xor, parts or 0)):
        enc = _compress_plane(comp, plane, min_saving)
        if enc is None:
            out.append(plane)
        else:
            mask |= 1 << i
            out.append(enc)
    total = sum(len(p) for p in out)
    if total > len(raw) * (1 - MIN_SAVING):
        return None
    header = struct.pack(f"<BB{item}I", item, mask, *(len(p) for p in out))
    if parts:
        return [prefix + header, *out]
    # Raw planes in ``out`` are views of this thread's scratch buffers: the join copies them
    # into the new bytes returned; nothing else may keep them.
    return b"".join([prefix, header, *out])


def _compress_plane(comp: zstandard.ZstdCompressor, plane: memoryview, min_saving: float) -> bytes | None:
    """One zstd frame of ``plane`` if it saves ``min_saving``, judged on its first _SAMPLE bytes.

    A plane no larger than the sample is compressed once (the sample is the plane; compressing
    it again for the frame doubled the work on every small tensor). Up to 16 samples, the
    sample is the frame's first block, flushed and judged, and the rest follows into the same
    frame (a separate sample cost up to 45 % more on a model's 150-400 KB planes, the flush
    ~6 %). Larger planes: a separate sample, then the frame in one call (1.5 % more).
    """
    n = len(plane)
    keep = 1 - min_saving
    if n <= _SAMPLE:
        enc = comp.compress(plane)
        return enc if len(enc) <= n * keep else None
    if n <= 16 * _SAMPLE:
        cobj = comp.compressobj(size=n)
        head = cobj.compress(plane[:_SAMPLE]) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        if len(head) > _SAMPLE * keep:
            return None
        enc = b"".join([head, cobj.compress(plane[_SAMPLE:]), cobj.flush()])
    else:
        if len(comp.compress(plane[:_SAMPLE])) > _SAMPLE * keep:
            return None
        enc = comp.compress(plane)
    return enc if len(enc) <= n * keep else None


def byte_planes(data: bytes | memoryview, raw_len: int) -> tuple[int, list[bytes | memoryview]]:
    """The planes of a BYTEPLANE payload: ``(element size, planes)``; raw planes are views of ``data``.

    Raises:
        IntegrityError: a damaged header, plane lengths that do not add up, a bad frame.
    """
    view = memoryview(data)
    if len(view) < 2:
        raise IntegrityError("byte-plane chunk too short")
    item, mask = view[0], view[1]
    if item not in (2, 4, 8) or raw_len % item:
        raise IntegrityError(f"byte-plane chunk: element size {item} does not divide {raw_len} bytes")
    head = 2 + 4 * item
    if len(view) < head:
        raise IntegrityError("byte-plane chunk header truncated")
    lengths = struct.unpack_from(f"<{item}I", view, 2)
    if head + sum(lengths) != len(view):
        raise IntegrityError("byte-plane chunk: plane lengths do not add up")
    n = raw_len // item
    planes: list[bytes | memoryview] = []
    pos = head
    for i, length in enumerate(lengths):
        part = view[pos : pos + length]
        pos += length
        if mask & (1 << i):
            planes.append(decode(ZSTD, part, n))
        else:
            if length != n:
                raise IntegrityError(f"byte-plane chunk: raw plane {i} has {length} bytes, expected {n}")
            planes.append(part)
    return item, planes


def interleave(planes: list, raw_len: int, into: memoryview | bytearray | None = None, rotate: bool = False) -> bytes:
    """Byte ``i`` of every element from plane ``i``: the inverse of :func:`split_planes`.

    With ``rotate`` each element is also rotated right by one bit (undoing FLOATPLANE's
    rotation) in the same pass. Writes into ``into`` (and returns b"") when given, else returns
    new bytes. Elements are composed in cache-sized blocks as ``sum(plane_i << 8i)`` (for
    FLOATPLANE: ``(p0 >> 1) | (p0 << bits-1) | sum(plane_i << 8i-1)``): faster than strided
    byte stores followed by a separate rotation pass.
    """
    item = len(planes)
    m = raw_len // item
    buf = bytearray(raw_len) if into is None else into
    if _kernels is not None:
        _kernels.join(planes, buf, m, rotate)
        return b"" if into is not None else bytes(buf)
    import numpy as np

    v = np.frombuffer(buf, dtype=f"<u{item}", count=m)
    ps = [np.frombuffer(p, dtype=np.uint8, count=m) for p in planes]
    bits = 8 * item
    tmp = np.empty(min(_BLOCK, m), dtype=v.dtype)
    for s in range(0, m, _BLOCK):
        e = min(m, s + _BLOCK)
        vb, t = v[s:e], tmp[: e - s]
        np.copyto(vb, ps[0][s:e])
        if rotate:
            np.copyto(t, ps[0][s:e])
            np.left_shift(t, bits - 1, out=t)  # bit 0 of p0 (the sign) back to the top
            np.right_shift(vb, 1, out=vb)
            np.bitwise_or(vb, t, out=vb)
        for i in range(1, item):
            np.copyto(t, ps[i][s:e])
            np.left_shift(t, 8 * i - (1 if rotate else 0), out=t)
            np.bitwise_or(vb, t, out=vb)
    return b"" if into is not None else bytes(buf)


def _decode_planes(data: bytes | memoryview, raw_len: int, into: memoryview | None = None) -> bytes:
    _item, planes = byte_planes(data, raw_len)
    return interleave(planes, raw_len, into)


def _delta_planes(payload: bytes | memoryview, raw_len: int, base: list, codec: int) -> list | None:
    """The XOR planes of a DELTA payload when they are planes of ``codec`` and ``base``'s element size."""
    delta_base(payload)
    if delta_inner(payload) != codec:
        return None
    item, planes = byte_planes(memoryview(payload)[DELTA_HEAD.size :], raw_len)
    if item != len(base):
        return None
    return planes


def xor_delta_planes(
    payload: bytes | memoryview, raw_len: int, base: list, out: bytearray, codec: int = BYTEPLANE
) -> list | None:
    """The planes of a DELTA chunk from its base's planes, XORed plane by plane into ``out``.

    XOR commutes with splitting into planes (and with rotating bits), so a chain of deltas is
    decoded without interleaving at every level: only the final planes are interleaved once.
    ``codec`` is the plane codec of the base planes; returns None when the XOR is not planes of
    that codec and the base's element size (the caller then decodes level by level).

    Raises:
        IntegrityError: a damaged header or XOR encoding.
    """
    planes = _delta_planes(payload, raw_len, base, codec)
    if planes is None:
        return None
    item = len(planes)
    n = raw_len // item
    if len(out) < raw_len:
        raise ValueError("output buffer too small")
    view = memoryview(out)
    res = [view[i * n : (i + 1) * n] for i in range(item)]
    for i in range(item):
        xor_into(planes[i], base[i], res[i])
    return res


def finish_delta_planes(
    payload: bytes | memoryview, raw_len: int, base: list, out: bytearray, into: memoryview | bytearray, codec: int
) -> bool:
    """The last level of a plane chain: :func:`xor_delta_planes` then :func:`finish_planes`.

    With the C kernels the XOR, the interleave and the rotation are one pass into ``into``;
    otherwise ``out`` holds the XORed planes first. False (nothing written) when the XOR is not
    planes of ``codec``, as for :func:`xor_delta_planes`.

    Raises:
        IntegrityError: a damaged header or XOR encoding.
    """
    if _kernels is None:
        res = xor_delta_planes(payload, raw_len, base, out, codec)
        if res is None:
            return False
        finish_planes(res, raw_len, into, codec)
        return True
    planes = _delta_planes(payload, raw_len, base, codec)
    if planes is None:
        return False
    _kernels.join(planes, into, raw_len // len(planes), codec == FLOATPLANE, base)
    return True


def decode_into(codec: int, data: bytes | memoryview, raw_len: int, out: bytearray) -> memoryview:
    """Decode like :func:`decode`, into ``out`` where a copy is needed; returns the raw bytes.

    The result is a view of ``data`` itself (raw chunks: no copy) or of ``out`` (at least
    ``raw_len`` bytes), valid until either is reused. Checkout decodes every chunk through one
    reusable buffer per thread: allocating and copying a fresh ``bytes`` per chunk cost more
    than decoding it. The same bounds and errors as :func:`decode`.
    """
    if codec == RAW:
        if len(data) != raw_len:
            raise IntegrityError(f"raw chunk has {len(data)} bytes, record says {raw_len}")
        return memoryview(data)
    if len(out) < raw_len:
        raise ValueError("output buffer too small")
    view = memoryview(out)[:raw_len]
    if codec in PLANE_CODECS:
        item, planes = byte_planes(data, raw_len)
        finish_planes(planes, raw_len, view, codec)
        return view
    view[:] = decode(codec, data, raw_len)
    return view


def finish_planes(planes: list, raw_len: int, into: memoryview | bytearray, codec: int) -> None:
    """Interleave planes of ``codec`` into ``into`` and undo the codec's bit rotation."""
    interleave(planes, raw_len, into, rotate=codec == FLOATPLANE)


def encode_delta(
    raw: bytes | memoryview,
    base: bytes | memoryview,
    base_id: bytes,
    depth: int,
    level: int,
    item_size: int,
    parts: int | None = None,
) -> Payload:
    """The DELTA payload of ``raw`` against ``base`` (same length), at chain ``depth`` (>= 1).

    ``parts``: as for :func:`encode` (a list of buffers may come back, see Payload).
    """
    if len(raw) != len(base):
        raise ValueError("a delta needs a base of the same length")
    if not 1 <= depth <= 255:
        raise ValueError("delta depth out of range")
    planes = _planes_fit(len(raw), item_size)
    if planes:  # what encode() of the XOR chooses first, the XOR taken while splitting
        head = DELTA_HEAD.pack(base_id, depth, FLOATPLANE)
        enc = _encode_planes(raw, item_size, DELTA_PLANE_MIN_SAVING, True, head, xor=base, parts=parts)
        if enc is not None:
            return enc
    xor = _scratch(_XOR_SLOT, len(raw))
    xor_into(raw, base, xor)
    # Planes that do not pay leave the XOR raw, as encode() would; else encode() chooses.
    codec, enc = (RAW, bytes(xor)) if planes else encode(xor, level, item_size, DELTA_PLANE_MIN_SAVING)
    return DELTA_HEAD.pack(base_id, depth, codec) + enc


def delta_inner(payload: bytes | memoryview) -> int:
    """The codec of a DELTA payload's XOR bytes: its header's last byte (not validated here)."""
    return payload[DELTA_HEAD.size - 1]


def delta_base(payload: bytes | memoryview) -> tuple[bytes, int]:
    """``(base id, depth)`` named by a DELTA payload.

    Raises:
        IntegrityError: the payload is too short, names depth 0, or nests a delta.
    """
    if len(payload) < DELTA_HEAD.size:
        raise IntegrityError("delta chunk too short for its header")
    base, depth, inner = DELTA_HEAD.unpack_from(payload)
    if depth < 1:
        raise IntegrityError("delta chunk names chain depth 0")
    if inner not in (RAW, ZSTD, BYTEPLANE, FLOATPLANE, LOWRANK):
        raise IntegrityError(f"delta chunk: the XOR has codec {inner}, which a delta cannot use")
    return base, depth


def decode_delta(payload: bytes | memoryview, raw_len: int, base: bytes | memoryview) -> bytes:
    """Decode a DELTA payload given its base's raw bytes (``raw_len`` of them)."""
    out = bytearray(raw_len)
    decode_delta_into(payload, raw_len, base, out)
    return bytes(out)


def decode_delta_into(
    payload: bytes | memoryview, raw_len: int, base: bytes | memoryview, out: bytearray
) -> memoryview:
    """Decode a DELTA payload into ``out`` given its base's raw bytes; returns the view.

    Raises:
        IntegrityError: a damaged header, a base of the wrong length, or a bad XOR encoding.
    """
    delta_base(payload)
    if len(base) != raw_len:
        raise IntegrityError(f"delta base has {len(base)} bytes, the chunk {raw_len}")
    inner = memoryview(payload)[DELTA_HEAD.size :]
    if delta_inner(payload) == LOWRANK:
        return _decode_lowrank_into(inner, raw_len, base, out)
    xor = decode_into(delta_inner(payload), inner, raw_len, out)
    view = memoryview(out)[:raw_len]
    xor_into(xor, base, view)  # in place where the XOR was decoded into ``out``: same positions
    return view


def _predicted_blocks(base: bytes | memoryview, rows: int, cols: int, u, v) -> Iterator[tuple[int, int, Any]]:
    """``(start, end, float32 prediction of rows start:end)``, in row blocks of ~64 Ki elements."""
    import numpy as np

    b = np.frombuffer(base, dtype="<f4", count=rows * cols).reshape(rows, cols)
    u64 = np.asarray(u, dtype=np.float64)
    v64 = np.asarray(v, dtype=np.float64)
    step = max(1, (1 << 16) // max(1, cols))
    acc = np.empty((min(step, rows), cols), dtype=np.float64)
    term = np.empty_like(acc)
    pred = np.empty(acc.shape, dtype=np.float32)
    for s in range(0, rows, step):
        e = min(rows, s + step)
        a, t, p = acc[: e - s], term[: e - s], pred[: e - s]
        a[:] = b[s:e]
        for k in range(u64.shape[1]):
            np.multiply(u64[s:e, k, None], v64[None, k, :], out=t)
            np.add(a, t, out=a)
        p[:] = a
        yield s, e, p


def lowrank_predict(base: bytes | memoryview, rows: int, cols: int, u, v, out) -> None:
    """``float32(base + u @ v)`` into ``out`` (float32, rows x cols), identically everywhere.

    The decoder must reproduce the encoder's prediction bit for bit on any machine, so no BLAS
    (whose summation order and fused multiply-adds vary by CPU): each product of two float32
    values is exact in float64, the rank-1 terms are added in a fixed order with plain IEEE
    additions (numpy never fuses them), and the sum is rounded to float32 once. Bases, factors
    and predictions with subnormal or non-finite values are never encoded this way (a thread
    that flushes subnormals would compute something else); with every input a normal float32,
    no float64 intermediate is subnormal. Works in row blocks of ~64 Ki elements.
    """
    for s, e, p in _predicted_blocks(base, rows, cols, u, v):
        out[s:e] = p


def _decode_lowrank_into(body: memoryview, raw_len: int, base: bytes | memoryview, out: bytearray) -> memoryview:
    import numpy as np

    if len(body) < LOWRANK_HEAD.size:
        raise IntegrityError("low-rank delta header truncated")
    rows, cols, rank = LOWRANK_HEAD.unpack_from(body)
    if rows * cols * 4 != raw_len or not 1 <= rank <= MAX_RANK:
        raise IntegrityError(f"low-rank delta of {rows}x{cols}, rank {rank} does not fit {raw_len} bytes")
    if min(rows, cols) <= MAX_RANK + _LR_OVERSAMPLE:  # never written; bounds the decoder's memory
        raise IntegrityError(f"low-rank delta of {rows}x{cols}: a side of at most {MAX_RANK + _LR_OVERSAMPLE}")
    pos = LOWRANK_HEAD.size
    nu, nv = rows * rank * 4, rank * cols * 4
    if len(body) < pos + nu + nv + 1:
        raise IntegrityError("low-rank delta factors truncated")
    u = np.frombuffer(body, dtype="<f4", count=rows * rank, offset=pos).reshape(rows, rank)
    v = np.frombuffer(body, dtype="<f4", count=rank * cols, offset=pos + nu).reshape(rank, cols)
    if _has_tiny_or_nonfinite(u) or _has_tiny_or_nonfinite(v):
        raise IntegrityError("low-rank delta factors are not finite normal numbers")
    rcodec = body[pos + nu + nv]
    if rcodec in (DELTA, LOWRANK):
        raise IntegrityError(f"low-rank delta residual has codec {rcodec}")
    if len(out) < raw_len:
        raise ValueError("output buffer too small")
    resid = decode_into(rcodec, body[pos + nu + nv + 1 :], raw_len, out)  # a view of out or of body
    r32 = np.frombuffer(resid, dtype="<u4", count=rows * cols).reshape(rows, cols)
    o32 = np.frombuffer(out, dtype="<u4", count=rows * cols).reshape(rows, cols)
    for s, e, p in _predicted_blocks(base, rows, cols, u, v):
        np.bitwise_xor(p.view("<u4"), r32[s:e], out=o32[s:e])  # same positions: safe in place
    return memoryview(out)[:raw_len]


def _has_tiny_or_nonfinite(x) -> bool:
    import numpy as np

    a = np.abs(x)
    return bool((~np.isfinite(x)).any() or ((a < _F32_TINY) & (a > 0)).any())


def lowrank_possible(rows: int, cols: int) -> bool:
    """Whether a ``rows`` x ``cols`` float32 matrix may be stored as a low-rank delta at all.

    Both sides must exceed the range finder's width (MAX_RANK + oversampling): a thinner
    matrix is never tried (a LoRA adapter's own A and B, say).
    """
    return min(rows, cols) > MAX_RANK + _LR_OVERSAMPLE


def encode_lowrank_delta(
    raw: bytes | memoryview, base: bytes | memoryview, base_id: bytes, depth: int, cols: int, level: int
) -> bytes | None:
    """A DELTA payload of float32 matrix ``raw`` as ``base + U @ V`` plus an XOR residual, or None.

    A merged LoRA model differs from its base by ``scale * B @ A``, a matrix of rank r (8-64),
    and its plain XOR with the base barely compresses (the update is ~4 % of the weights: a
    sixth of the exponents change). Storing U (rows x r) and V (r x cols) as float32, the
    prediction ``float32(base + U @ V)`` (computed by :func:`lowrank_predict`) matches the
    merged weights but for rounding, so the XOR residual is nearly all zero bits. None when
    the difference is not of low rank (decided on a 128 x 128 corner first, ~1 ms), or when a
    subnormal or non-finite value would make the prediction machine-dependent.
    """
    n = len(raw)
    if cols < 1 or n % (4 * cols) or len(base) != n:
        return None
    rows = n // (4 * cols)
    k = MAX_RANK + _LR_OVERSAMPLE
    if not lowrank_possible(rows, cols) or not 1 <= depth <= 255:
        return None  # decided before numpy is imported: adapters' own thin matrices never need it
    import numpy as np

    a = np.frombuffer(raw, dtype="<f4").reshape(rows, cols)
    b = np.frombuffer(base, dtype="<f4").reshape(rows, cols)
    if _has_tiny_or_nonfinite(a) or _has_tiny_or_nonfinite(b):
        return None
    try:
        return _lowrank_payload(a, b, base, base_id, depth, rows, cols, k, level)
    except np.linalg.LinAlgError:
        return None


_blas_lock = threading.Lock()
_blas_controller: list = []


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run the BLAS of numpy on one thread (threadpoolctl), one encoder at a time.

    Commit workers already keep every core busy; OpenBLAS threads that spin beside them made
    one merged-LoRA commit take 11.9 s instead of 0.97 s. The limit is process-wide, so
    encoders take turns finding factors (the prediction and its check run outside) and the
    previous limit comes back.
    """
    with _blas_lock:
        if not _blas_controller:
            try:
                from threadpoolctl import ThreadpoolController
            except ImportError:  # pragma: no cover - a dependency; without it only slower
                _blas_controller.append(None)
            else:
                _blas_controller.append(ThreadpoolController())
        controller = _blas_controller[0]
        if controller is None:  # pragma: no cover
            yield
            return
        with controller.limit(limits=1, user_api="blas"):
            yield


def _lowrank_factors(a, b, rows: int, cols: int, k: int) -> tuple[Any, Any] | None:
    """Float32 factors U, V with ``a - b ~ U @ V`` (rank <= MAX_RANK), or None if of higher rank."""
    import numpy as np

    p = min(_LR_PROBE, rows, cols)  # > MAX_RANK + 8: a full-rank corner shows more than MAX_RANK
    corner = a[:p, :p].astype(np.float64) - b[:p, :p]
    s = np.linalg.svd(corner, compute_uv=False)
    if s[0] == 0 or int((s > s[0] * _LR_RELATIVE).sum()) > MAX_RANK:
        return None  # the corner alone is not of low rank: neither is the matrix
    # Randomized range finder (Halko, Martinsson & Tropp 2011) on D = a - b, row block by row
    # block so no full float64 copy of D is made. Only the encoder runs it; BLAS here is fine.
    g = np.random.default_rng(0).standard_normal((cols, k))
    step = max(1, (1 << 18) // cols)
    y = np.empty((rows, k))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        y[r0:r1] = (a[r0:r1].astype(np.float64) - b[r0:r1]) @ g
    q, _ = np.linalg.qr(y)
    bm = np.zeros((k, cols))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        bm += q[r0:r1].T @ (a[r0:r1].astype(np.float64) - b[r0:r1])
    ub, sv, vt = np.linalg.svd(bm, full_matrices=False)
    rank = int((sv > sv[0] * _LR_RELATIVE).sum()) if sv[0] > 0 else 0
    if not 1 <= rank <= MAX_RANK:
        return None
    return (q @ (ub[:, :rank] * sv[:rank])).astype(np.float32), vt[:rank].astype(np.float32)


def _lowrank_payload(a, b, base, base_id: bytes, depth: int, rows: int, cols: int, k: int, level: int) -> bytes | None:
    import numpy as np

    with _one_blas_thread():
        factors = _lowrank_factors(a, b, rows, cols, k)
    if factors is None:
        return None
    u, v = factors
    if not (np.isfinite(u).all() and np.isfinite(v).all()):
        return None
    for f in (u, v):  # a subnormal factor reads as 0 where a thread flushes subnormals
        f[np.abs(f) < _F32_TINY] = 0
    pred = np.empty((rows, cols), dtype=np.float32)
    lowrank_predict(base, rows, cols, u, v, pred)
    # AArch64 with flush-to-zero detects tininess before rounding: keep clear of that edge too.
    tiny = np.abs(pred)
    if (~np.isfinite(pred)).any() or ((tiny < 2 * _F32_TINY) & (tiny > 0)).any():
        return None
    resid = np.bitwise_xor(pred.view("<u4"), a.view("<u4")).reshape(-1).view(np.uint8)
    rcodec, renc = encode(resid.data, level, 4, DELTA_PLANE_MIN_SAVING)
    payload = b"".join(
        (DELTA_HEAD.pack(base_id, depth, LOWRANK), LOWRANK_HEAD.pack(rows, cols, len(v)), u.tobytes(), v.tobytes(),
         bytes([rcodec]), renc)
    )
    n = rows * cols * 4
    if bytes(decode_delta_into(payload, n, base, bytearray(n))) != a.tobytes():  # never store what
        return None  # this machine cannot read back
    return payload


def decode_prefix(
    codec: int, data: bytes | memoryview, raw_len: int, n: int, into: bytearray | None = None
) -> bytes | memoryview | None:
    """The first ``n`` bytes of a chunk stored with ``codec``, decoding no more than they need.

    For RAW, ZSTD and the plane codecs (each plane's first ``n / element size`` bytes); None for
    a delta, whose prefix needs its base's, or an ``n`` that is not a whole number of elements.
    A guess's input (is a delta worth trying at all?), so the result is not checked against
    anything; the damage it cannot see is reported by whoever decodes the chunk whole. With
    ``into`` (at least ``n`` bytes) planes are interleaved there and a view of it comes back:
    a commit probes a prefix of most pieces, and fresh memory for each cost page faults.

    Raises:
        IntegrityError: a header or frame that does not parse.
    """
    if not 0 <= n <= raw_len:
        return None
    if codec == RAW:
        return bytes(memoryview(data)[:n]) if len(data) == raw_len else None
    if codec == ZSTD:
        out = _read_prefix(data, n)
        if len(out) != n:
            raise IntegrityError(f"zstd frame gave {len(out)} bytes, fewer than {n}")
        return out
    if codec not in PLANE_CODECS:
        return None
    view = memoryview(data)
    if len(view) < 2 + 4 * 2:
        raise IntegrityError("byte-plane chunk too short")
    item, mask = view[0], view[1]
    if item not in (2, 4, 8) or raw_len % item or n % item or len(view) < 2 + 4 * item:
        return None
    lengths = struct.unpack_from(f"<{item}I", view, 2)
    m = n // item
    planes: list[bytes | memoryview] = []
    pos = 2 + 4 * item
    for i, length in enumerate(lengths):
        part = view[pos : pos + length]
        pos += length
        plane = _read_prefix(part, m) if mask & (1 << i) else part[:m]
        if len(plane) != m:
            raise IntegrityError(f"byte-plane chunk: plane {i} is shorter than {m} bytes")
        planes.append(plane)
    if into is not None:
        interleave(planes, n, into, rotate=codec == FLOATPLANE)
        return memoryview(into)[:n]
    out = bytearray(n)
    interleave(planes, n, out, rotate=codec == FLOATPLANE)
    return bytes(out)


def _read_prefix(frame: bytes | memoryview, n: int) -> bytes:
    """The first ``n`` bytes a zstd frame decompresses to (fewer if it is shorter)."""
    try:
        with _decompressor().stream_reader(frame) as reader:
            return reader.read(n)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"zstd frame does not decompress: {exc}") from None


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
    if codec == BYTEPLANE:
        return _decode_planes(data, raw_len)
    if codec == FLOATPLANE:
        out = bytearray(raw_len)
        decode_into(codec, data, raw_len, out)
        return bytes(out)
    if codec == DELTA:
        raise IntegrityError("a delta chunk decodes only through the store, which supplies its base")
    raise IntegrityError(f"unknown codec {codec}")
