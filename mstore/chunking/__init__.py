"""How files are cut into chunks, which decides what deduplicates.

* safetensors files: the header is one chunk and every tensor is its own chunk (tensors above
  ``tensor_max_chunk`` split, float32 matrices at whole rows), so an unchanged tensor is stored once
  whatever moved around it (:mod:`.safetensors`).
* PyTorch archives (``torch.save``'s zip: optimizer state, ``pytorch_model.bin``): every tensor
  storage entry its own piece(s), the archive's structure between them (:mod:`.torchzip`).
* everything else, and any file whose safetensors header is invalid or lies: content-defined
  chunking with FastCDC, ~64 KiB average, so an append or an edit in the middle re-uses the
  untouched chunks (:mod:`.cdc`).

The content of a file never makes a commit fail: a bad header only changes the chunker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import FileChanged, FormatError
from .cdc import CDC_NAME, cdc_chunks
from .safetensors import (
    SAFETENSORS_NAME,
    SafetensorsHeader,
    TensorInfo,
    plan_keyed_pieces,
    read_header,
)
from .torchzip import SUFFIXES as TORCH_SUFFIXES
from .torchzip import TORCHZIP_NAME, plan_zip_pieces
from .torchzip import is_candidate as is_torch_candidate


def may_hold_tensors(name: str) -> bool:
    """True if a file of this name may be chunked by tensor (safetensors, a torch archive).

    Only such files hold float pieces, the only ones whose codecs need numpy.
    """
    return name.endswith(".safetensors") or name.endswith(TORCH_SUFFIXES)

__all__ = [
    "CDC_NAME",
    "SAFETENSORS_NAME",
    "TORCHZIP_NAME",
    "ChunkPlan",
    "Extent",
    "SafetensorsHeader",
    "TensorInfo",
    "plan_file",
    "plan_keyed_pieces",
    "plan_zip_pieces",
    "read_header",
]


@dataclass
class ChunkPlan:
    """How one file will be chunked; iterate :meth:`sources` to read it."""

    f: BinaryIO
    size: int
    chunker: str
    header: SafetensorsHeader | None
    header_error: str | None
    cdc_avg: int
    tensor_max: int
    # torch archives: (offset, length, hint, key) of every piece (see .torchzip)
    zip_pieces: list | None = None
    matrix_rows: int = 0  # see safetensors.piece_size

    def _keyed(self) -> list:
        if self.header is not None:
            return plan_keyed_pieces(self.header, self.size, self.tensor_max, self.matrix_rows)
        return self.zip_pieces or []

    def piece_keys(self) -> list:
        """What each piece of :meth:`sources` is, in order.

        A tensor's piece is ``(name, dtype, shape, offset)``, a torch archive's storage entry's
        ``(name, "zip", (size,), offset)``; None for headers, padding and archive structure;
        empty for files chunked by content.
        """
        return [key for _o, _n, _h, key in self._keyed()]

    def sources(self) -> Iterator[tuple[bytes | Extent, int, int]]:
        """``(piece, length, float element size or 0)`` in order, without reading ahead.

        A piece planned by position (a tensor, an archive entry) comes as an :class:`Extent`,
        read by whichever thread encodes it, into a buffer of its choice; a content-defined
        chunk is found by reading, so it comes as bytes.
        """
        keyed = self._keyed()
        if not keyed:
            for data in cdc_chunks(self.f, self.cdc_avg):
                yield data, len(data), 0
            return
        fd = self.f.fileno()
        for offset, length, hint, _key in keyed:
            yield Extent(fd, offset, length), length, hint


@dataclass(frozen=True)
class Extent:
    """``length`` bytes of an open file at ``offset``, read when wanted."""

    fd: int
    offset: int
    length: int

    def read(self, into: bytearray | None = None) -> bytes | memoryview:
        """The bytes: new ones, or a view of the start of ``into`` (at least ``length`` long).

        Raises:
            FileChanged: the file ends before them (it was cut since it was planned).
        """
        if into is None:
            data = os.pread(self.fd, self.length, self.offset)
            got = len(data)
        else:
            view = memoryview(into)[: self.length]
            got = os.preadv(self.fd, [view], self.offset)
            data = view
        if got != self.length:
            raise FileChanged("file changed size while it was being read")
        return data


def plan_file(f: BinaryIO, size: int, name: str, cdc_avg: int, tensor_max: int, matrix_rows: int = 0) -> ChunkPlan:
    """Choose the chunker for an open file; never fails because of the file's content."""
    header = None
    error = None
    zip_pieces = None
    if name.endswith(".safetensors"):
        try:
            header = read_header(f, size)
        except FormatError as exc:
            error = str(exc)
        f.seek(0)
    elif is_torch_candidate(name, os.pread(f.fileno(), 4, 0)):
        try:
            zip_pieces = plan_zip_pieces(f, size, tensor_max)
        except FormatError:
            zip_pieces = None  # an ordinary file, then
        f.seek(0)
    if header is not None:
        chunker = SAFETENSORS_NAME
    elif zip_pieces is not None:
        chunker = TORCHZIP_NAME
    else:
        chunker = CDC_NAME
    return ChunkPlan(f, size, chunker, header, error, cdc_avg, tensor_max, zip_pieces, matrix_rows)
