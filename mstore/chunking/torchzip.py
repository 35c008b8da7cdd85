"""Chunking of PyTorch checkpoint archives (``torch.save``'s zip format) without torch.

``torch.save`` writes a zip archive whose entries are stored uncompressed: a pickle
(``<name>/data.pkl``), a few small records, and one entry per tensor storage
(``<name>/data/<key>``) holding the raw tensor bytes. Optimizer state (Adam moments) is twice
the size of the model, and FastCDC over the whole archive sees only noise. Cutting the archive
instead at its entries — every storage its own piece(s), keyed by entry name — lets an
unchanged storage deduplicate, the float planes codec see aligned elements, and a changed
storage be stored as a delta against the same entry of the parent version.

Only the zip's own directory is parsed (the standard library's :mod:`zipfile`); pickles are
never loaded. Anything unexpected — not a zip, a compressed entry among the storages,
overlapping or out-of-bounds entries, too many entries — makes the file an ordinary one
(FastCDC): the content of a file never makes a commit fail.
"""

from __future__ import annotations

import re
import struct
import zipfile
from typing import BinaryIO

from ..errors import FormatError

TORCHZIP_NAME = "torchzip"

SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_LOCAL = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length
_LOCAL_SIG = b"PK\x03\x04"
_STORAGE = re.compile(r"(^|/)data/[^/]+$")
MAX_ENTRIES = 100_000

# (entry name, "zip", (entry size,), offset inside the entry): like a safetensors piece key.
PieceKey = tuple[str, str, tuple[int, ...], int]


def is_candidate(name: str, prefix: bytes) -> bool:
    """True if a file of this name starting with these bytes may be a torch archive."""
    return name.endswith(SUFFIXES) and prefix.startswith(_LOCAL_SIG)


# What zipfile and struct raise on archives they cannot read (versions they do not support,
# negative or huge offsets, bad headers): any of them makes the file an ordinary one.
_ZIP_ERRORS = (
    zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, struct.error, NotImplementedError,
    OverflowError, KeyError, IndexError, UnicodeDecodeError, MemoryError,
)


def plan_zip_pieces(f: BinaryIO, size: int, max_chunk: int) -> list[tuple[int, int, int, PieceKey | None]]:
    """See :func:`_plan`; any way the archive cannot be read raises FormatError.

    Raises:
        FormatError: not a torch archive this chunker handles (the caller uses FastCDC).
    """
    try:
        return _plan(f, size, max_chunk)
    except _ZIP_ERRORS as exc:
        raise FormatError(f"not a readable torch archive: {type(exc).__name__}: {exc}") from None


def _plan(f: BinaryIO, size: int, max_chunk: int) -> list[tuple[int, int, int, PieceKey | None]]:
    """Pieces ``(offset, length, float element size or 0, key or None)`` covering the archive.

    Storage entries become pieces keyed by name, split at ``max_chunk`` on 4-byte boundaries,
    with a float hint of 4 when their size is a multiple of 4 (optimizer state and most weights
    are fp32; the hint only chooses a codec, never changes bytes). Everything between them
    (local headers, the pickle, the central directory) becomes unkeyed pieces.

    Raises:
        FormatError: not a torch archive this chunker handles (the caller uses FastCDC).
    """
    infos = zipfile.ZipFile(f).infolist()
    if len(infos) > MAX_ENTRIES:
        raise FormatError(f"zip archive with {len(infos)} entries")
    spans = []
    for info in infos:
        if not _STORAGE.search(info.filename) or info.file_size < 64:
            continue
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise FormatError(f"zip entry {info.filename!r} is compressed")
        f.seek(info.header_offset)
        head = f.read(_LOCAL.size)
        if len(head) != _LOCAL.size:
            raise FormatError("zip local header truncated")
        sig, name_len, extra_len = _LOCAL.unpack(head)
        if sig != _LOCAL_SIG:
            raise FormatError(f"zip entry {info.filename!r}: no local header at its offset")
        start = info.header_offset + _LOCAL.size + name_len + extra_len
        spans.append((start, start + info.file_size, info.filename))
    spans.sort()
    pieces: list[tuple[int, int, int, PieceKey | None]] = []
    pos = 0
    step = max(4, max_chunk // 4 * 4)
    for start, end, name in spans:
        if start < pos or end > size:
            raise FormatError(f"zip entry {name!r} overlaps another or lies outside the file")
        _gap(pieces, pos, start, step)
        hint = 4 if (end - start) % 4 == 0 else 0
        off = start
        while off < end:
            n = min(step, end - off)
            pieces.append((off, n, hint, (name, "zip", (end - start,), off - start)))
            off += n
        pos = end
    if not spans:
        raise FormatError("zip archive without tensor storages")
    _gap(pieces, pos, size, step)
    return pieces


def _gap(pieces: list, start: int, end: int, step: int) -> None:
    off = start
    while off < end:
        n = min(step, end - off)
        pieces.append((off, n, 0, None))
        off += n
