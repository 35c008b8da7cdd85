"""How files are cut into chunks, which decides what deduplicates.

* safetensors files: the header is one chunk and every tensor is its own chunk (tensors above
  ``tensor_max_chunk`` split at element boundaries), so an unchanged tensor is stored once
  whatever moved around it (:mod:`.safetensors`).
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

from ..errors import FormatError
from .cdc import CDC_NAME, cdc_chunks
from .safetensors import (
    SAFETENSORS_NAME,
    SafetensorsHeader,
    TensorInfo,
    plan_keyed_pieces,
    plan_pieces,
    read_header,
)

__all__ = [
    "CDC_NAME",
    "SAFETENSORS_NAME",
    "ChunkPlan",
    "SafetensorsHeader",
    "TensorInfo",
    "plan_file",
    "plan_keyed_pieces",
    "read_header",
]


@dataclass
class ChunkPlan:
    """How one file will be chunked; iterate :meth:`chunks` to read it."""

    f: BinaryIO
    size: int
    chunker: str
    header: SafetensorsHeader | None
    header_error: str | None
    cdc_avg: int
    tensor_max: int

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes, chunk by chunk, in order (bounded memory)."""
        for data, _hint in self.pieces():
            yield data

    def piece_keys(self) -> list:
        """What each piece of :meth:`pieces` is: (tensor, dtype, shape, offset), in order.

        None for headers and padding; empty for files chunked by content (no tensors).
        """
        if self.header is None:
            return []
        return [key for _o, _n, _h, key in plan_keyed_pieces(self.header, self.size, self.tensor_max)]

    def pieces(self) -> Iterator[tuple[bytes, int]]:
        """``(chunk bytes, float element size or 0)`` in order: the hint selects the codec."""
        if self.header is None:
            for data in cdc_chunks(self.f, self.cdc_avg):
                yield data, 0
            return
        fd = self.f.fileno()
        for offset, length, hint in plan_pieces(self.header, self.size, self.tensor_max):
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise FormatError("file changed size while it was being read")
            yield data, hint


def plan_file(f: BinaryIO, size: int, name: str, cdc_avg: int, tensor_max: int) -> ChunkPlan:
    """Choose the chunker for an open file; never fails because of the file's content."""
    header = None
    error = None
    if name.endswith(".safetensors"):
        try:
            header = read_header(f, size)
        except FormatError as exc:
            error = str(exc)
        f.seek(0)
    chunker = SAFETENSORS_NAME if header is not None else CDC_NAME
    return ChunkPlan(f, size, chunker, header, error, cdc_avg, tensor_max)
