"""safetensors headers, parsed directly (8-byte little-endian length + JSON), without torch.

Format (https://github.com/huggingface/safetensors)::

    u64 N | N bytes of JSON {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                             "__metadata__": {"k": "v"}} | data

``data_offsets`` are relative to the first byte after the header. Everything in the header is
untrusted: lengths past the end, offsets that overlap or disagree with shape × dtype, unknown
dtypes, non-JSON — each raises :class:`MalformedSafetensors` naming the problem.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import FormatError

SAFETENSORS_NAME = "safetensors"

# The reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER = 100_000_000

# Bits per element of every dtype the safetensors library writes.
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


class MalformedSafetensors(FormatError):
    """A file named like safetensors whose header is invalid or does not match its data."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in the header; ``start``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data."""
        return self.end - self.start

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def item_size(self) -> int:
        """Bytes per element for alignment (1 for sub-byte dtypes)."""
        return max(1, DTYPE_BITS[self.dtype] // 8)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header."""

    header_len: int
    tensors: tuple[TensorInfo, ...]  # sorted by start offset
    metadata: dict[str, str] | None

    @property
    def data_start(self) -> int:
        """File offset of the first data byte."""
        return 8 + self.header_len

    def by_name(self) -> dict[str, TensorInfo]:
        """Tensors keyed by name."""
        return {t.name: t for t in self.tensors}

    @property
    def parameters(self) -> int:
        """Total number of elements."""
        return sum(t.numel for t in self.tensors)


def parse_header(prefix: bytes, file_size: int) -> SafetensorsHeader:
    """Validate a header given the file's first ``8 + N`` bytes and its total size.

    Raises:
        MalformedSafetensors: with the reason.
    """
    if file_size < 8 or len(prefix) < 8:
        raise MalformedSafetensors("file is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER:
        raise MalformedSafetensors(f"header length {n} exceeds the {MAX_HEADER} byte limit")
    if 8 + n > file_size:
        raise MalformedSafetensors(f"header length {n} runs past the end of the file ({file_size} bytes)")
    if len(prefix) < 8 + n:
        raise MalformedSafetensors("header is truncated")
    try:
        doc = json.loads(prefix[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers too long to convert; RecursionError
        # deeply nested arrays. A hostile header must never crash a commit.
        raise MalformedSafetensors(f"header is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise MalformedSafetensors("header is not a JSON object")
    data_start = 8 + n
    data_len = file_size - data_start
    metadata = doc.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise MalformedSafetensors("__metadata__ must map strings to strings")
    tensors = []
    for name, info in doc.items():
        if not isinstance(info, dict):
            raise MalformedSafetensors(f"tensor {name!r}: entry is not an object")
        dtype = info.get("dtype")
        if dtype not in DTYPE_BITS:
            raise MalformedSafetensors(f"tensor {name!r}: unknown dtype {dtype!r}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise MalformedSafetensors(f"tensor {name!r}: shape must be a list of non-negative integers")
        offs = info.get("data_offsets")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise MalformedSafetensors(f"tensor {name!r}: data_offsets must be [begin, end]")
        begin, end = offs
        if not 0 <= begin <= end <= data_len:
            raise MalformedSafetensors(f"tensor {name!r}: data_offsets {offs} outside the data ({data_len} bytes)")
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            raise MalformedSafetensors(
                f"tensor {name!r}: {end - begin} bytes of data, but shape {shape} of {dtype} needs {bits / 8:g}"
            )
        tensors.append(TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end))
    tensors.sort(key=lambda t: (t.start, t.end))
    prev_end = data_start
    prev_name = None
    for t in tensors:
        if t.start < prev_end and t.nbytes:
            raise MalformedSafetensors(f"tensors {prev_name!r} and {t.name!r} overlap")
        if t.nbytes:
            prev_end, prev_name = t.end, t.name
    return SafetensorsHeader(n, tuple(tensors), metadata)


def read_header(f: BinaryIO, file_size: int) -> SafetensorsHeader:
    """Read and validate the header of an open file.

    Raises:
        MalformedSafetensors: with the reason.
    """
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise MalformedSafetensors("file is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > file_size:
        return parse_header(head, file_size)  # raises with the precise reason
    return parse_header(head + f.read(n), file_size)


def plan_ranges(
    header: SafetensorsHeader, file_size: int, max_chunk: int, matrix_rows: int = 0
) -> list[tuple[int, int]]:
    """Byte ranges ``(offset, length)`` covering the file: header, then each tensor, then gaps.

    Tensors larger than their piece size (:func:`piece_size`) are cut; empty tensors contribute
    nothing. Bytes between or after tensors (padding) become chunks of their own.
    """
    return [(off, n) for off, n, _item in plan_pieces(header, file_size, max_chunk, matrix_rows)]


def plan_pieces(
    header: SafetensorsHeader, file_size: int, max_chunk: int, matrix_rows: int = 0
) -> list[tuple[int, int, int]]:
    """Like :func:`plan_ranges`, plus the element size of a float tensor's piece.

    The third field is 2, 4 or 8 for pieces of F16/BF16/F32/F64 tensors (what the byte-plane
    codec needs), 0 for anything else.
    """
    return [(off, n, hint) for off, n, hint, _key in plan_keyed_pieces(header, file_size, max_chunk, matrix_rows)]


PieceKey = tuple[str, str, tuple[int, ...], int]

# A float32 matrix's pieces may grow up to this many times ``max_chunk`` to hold more rows
# (up to ``matrix_rows``).
MATRIX_STRETCH = 2


def piece_size(t: TensorInfo, max_chunk: int, matrix_rows: int = 0) -> int:
    """How many bytes of tensor ``t`` go in each of its pieces (the last may hold fewer).

    ``matrix_rows`` 0: ``max_chunk`` rounded down to whole elements (how every store made
    before the ``matrix_rows`` setting existed cuts). Otherwise a 2-D float32 tensor is cut into
    equal pieces of whole rows, so that each piece may be stored as a low-rank delta (which
    needs rows x columns): at least as many rows as fit in ``max_chunk``, and more, up to
    ``matrix_rows``, while they fit in ``MATRIX_STRETCH`` x ``max_chunk``, so the V factor a
    low-rank delta stores in every piece (rank x columns) stays a small part of it. The tensor's rows are spread
    evenly over the pieces that takes, so no piece is a sliver. A matrix whose single row is
    longer than ``max_chunk`` is cut at elements.
    """
    item = t.item_size
    row = t.shape[1] * 4 if t.dtype == "F32" and len(t.shape) == 2 else 0
    if matrix_rows > 0 and 0 < row <= max_chunk and t.shape[0]:
        rows = max(max_chunk // row, min(matrix_rows, MATRIX_STRETCH * max_chunk // row), 1)
        if rows < t.shape[0]:
            pieces = -(-t.shape[0] // rows)
            rows = -(-t.shape[0] // pieces)
        return min(rows, t.shape[0]) * row
    return max(item, max_chunk // item * item)


def plan_keyed_pieces(
    header: SafetensorsHeader, file_size: int, max_chunk: int, matrix_rows: int = 0
) -> list[tuple[int, int, int, PieceKey | None]]:
    """:func:`plan_pieces` plus what each piece is: ``(tensor, dtype, shape, offset in tensor)``.

    The key is None for the header and padding. Two versions of a file whose tensor has the
    same key hold the same part of the same tensor: what a delta is computed against.
    """
    pieces: list[tuple[int, int, int, PieceKey | None]] = [(0, header.data_start, 0, None)]
    pos = header.data_start
    for t in header.tensors:
        if not t.nbytes:
            continue
        if t.start > pos:
            pieces.append((pos, t.start - pos, 0, None))
        step = piece_size(t, max_chunk, matrix_rows)
        hint = t.item_size if t.dtype in FLOAT_DTYPES else 0
        off = t.start
        while off < t.end:
            n = min(step, t.end - off)
            pieces.append((off, n, hint, (t.name, t.dtype, t.shape, off - t.start)))
            off += n
        pos = t.end
    if pos < file_size:
        pieces.append((pos, file_size - pos, 0, None))
    return pieces
