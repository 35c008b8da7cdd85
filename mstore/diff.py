"""What changed between two versions: files, and inside safetensors files, tensors.

Unchanged is decided by ids alone (a tensor whose chunk ids are equal has equal bytes), so
comparing two 10 GB checkpoints where little moved reads little. For a changed tensor of the
same dtype and shape, "how much" is computed by streaming both tensors in blocks through
NumPy (never torch): the largest absolute difference and the relative L2 norm
``||new - old|| / ||old||``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .chunking.safetensors import SafetensorsHeader, read_header
from .errors import FormatError
from .hashing import ObjectId
from .objects import FileObject

# Read changed tensors in blocks of this many bytes (bounded memory whatever the tensor size).
BLOCK = 8 << 20

_NUMPY_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "U16": "<u2",
    "U32": "<u4",
    "U64": "<u8",
    "BOOL": "u1",
}


@dataclass
class FileSide:
    """One side of a file comparison: its id, manifest and a way to read its bytes."""

    id: ObjectId
    fobj: FileObject
    open: Callable[[], BinaryIO]


@dataclass
class TensorChange:
    """How one tensor differs."""

    name: str
    status: str  # added | removed | changed | unchanged | shape_changed | dtype_changed
    old: dict[str, Any] | None = None
    new: dict[str, Any] | None = None
    max_abs_diff: float | None = None
    rel_l2: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        d: dict[str, Any] = {"name": self.name, "status": self.status}
        if self.old is not None:
            d["old"] = self.old
        if self.new is not None:
            d["new"] = self.new
        if self.max_abs_diff is not None:
            d["max_abs_diff"] = self.max_abs_diff
            d["rel_l2"] = self.rel_l2
        return d


@dataclass
class FileChange:
    """How one path differs."""

    path: str
    status: str  # added | removed | modified | unchanged
    old_size: int | None = None
    new_size: int | None = None
    old_id: str | None = None
    new_id: str | None = None
    tensors: list[TensorChange] = field(default_factory=list)
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        d: dict[str, Any] = {"path": self.path, "status": self.status}
        for k in ("old_size", "new_size", "old_id", "new_id", "note"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        if self.tensors:
            d["tensors"] = [t.to_dict() for t in self.tensors]
        return d


def _tensor_chunks(header: SafetensorsHeader, fobj: FileObject) -> dict[str, tuple[ObjectId, ...]]:
    """Chunk ids covering each tensor (chunks never straddle tensor boundaries)."""
    starts = []
    pos = 0
    for cid, n in fobj.chunks:
        starts.append((pos, pos + n, cid))
        pos += n
    out: dict[str, tuple[ObjectId, ...]] = {}
    for t in header.tensors:
        out[t.name] = tuple(cid for s, e, cid in starts if s >= t.start and e <= t.end and e > s)
    return out


def _as_float(buf: bytes, dtype: str):
    import numpy as np

    if dtype == "BF16":
        u = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
        return u.view(np.float32).astype(np.float64)
    return np.frombuffer(buf, dtype=_NUMPY_DTYPES[dtype]).astype(np.float64)


def tensor_magnitude(
    fa: BinaryIO, fb: BinaryIO, dtype: str, a_start: int, b_start: int, nbytes: int
) -> tuple[float | None, float | None]:
    """(max |b - a|, ||b - a|| / ||a||) streamed in blocks; (None, None) for dtypes NumPy lacks."""
    if dtype not in _NUMPY_DTYPES and dtype != "BF16":
        return None, None
    import numpy as np

    item = 2 if dtype == "BF16" else np.dtype(_NUMPY_DTYPES[dtype]).itemsize
    block = max(item, BLOCK // item * item)
    max_abs = 0.0
    sq_diff = 0.0
    sq_old = 0.0
    off = 0
    with np.errstate(invalid="ignore", over="ignore"):
        while off < nbytes:
            n = min(block, nbytes - off)
            fa.seek(a_start + off)
            fb.seek(b_start + off)
            a = _as_float(_read_exact(fa, n), dtype)
            b = _as_float(_read_exact(fb, n), dtype)
            d = b - a
            if d.size:
                max_abs = max(max_abs, float(np.max(np.abs(d))))
                sq_diff += float(np.dot(d, d))
                sq_old += float(np.dot(a, a))
            off += n
    rel = math.sqrt(sq_diff) / math.sqrt(sq_old) if sq_old > 0 else (0.0 if sq_diff == 0 else math.inf)
    return max_abs, rel


def _read_exact(f: BinaryIO, n: int) -> bytes:
    parts = []
    while n:
        b = f.read(n)
        if not b:
            raise FormatError("file ended inside a tensor")
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def _info(t) -> dict[str, Any]:
    return {"dtype": t.dtype, "shape": list(t.shape)}


def diff_safetensors(a: FileSide, b: FileSide, magnitudes: bool = True) -> list[TensorChange]:
    """Tensor-by-tensor comparison of two safetensors files.

    Raises:
        FormatError: a header is invalid (the caller reports the file as modified).
    """
    fa, fb = a.open(), b.open()
    try:
        ha, hb = read_header(fa, a.fobj.size), read_header(fb, b.fobj.size)
        ca, cb = _tensor_chunks(ha, a.fobj), _tensor_chunks(hb, b.fobj)
        ta, tb = ha.by_name(), hb.by_name()
        out = []
        for name in sorted(set(ta) | set(tb)):
            x, y = ta.get(name), tb.get(name)
            if y is None:
                out.append(TensorChange(name, "removed", old=_info(x)))
            elif x is None:
                out.append(TensorChange(name, "added", new=_info(y)))
            elif x.dtype != y.dtype:
                out.append(TensorChange(name, "dtype_changed", _info(x), _info(y)))
            elif x.shape != y.shape:
                out.append(TensorChange(name, "shape_changed", _info(x), _info(y)))
            elif ca[name] == cb[name]:
                out.append(TensorChange(name, "unchanged", _info(x), _info(y)))
            else:
                change = TensorChange(name, "changed", _info(x), _info(y))
                if magnitudes:
                    change.max_abs_diff, change.rel_l2 = tensor_magnitude(fa, fb, x.dtype, x.start, y.start, x.nbytes)
                out.append(change)
        return out
    finally:
        fa.close()
        fb.close()


def diff_files(old: dict[str, FileSide], new: dict[str, FileSide], magnitudes: bool = True) -> list[FileChange]:
    """Compare two path → file maps (sorted by path)."""
    out = []
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path), new.get(path)
        if b is None:
            out.append(FileChange(path, "removed", old_size=a.fobj.size, old_id=str(a.id)))
        elif a is None:
            out.append(FileChange(path, "added", new_size=b.fobj.size, new_id=str(b.id)))
        elif a.id == b.id:
            out.append(FileChange(path, "unchanged", a.fobj.size, b.fobj.size, str(a.id), str(b.id)))
        else:
            fc = FileChange(path, "modified", a.fobj.size, b.fobj.size, str(a.id), str(b.id))
            if a.fobj.chunker == "safetensors" and b.fobj.chunker == "safetensors":
                try:
                    fc.tensors = diff_safetensors(a, b, magnitudes)
                except FormatError as exc:
                    fc.note = f"tensor comparison unavailable: {exc}"
            out.append(fc)
    return out


def summarize(changes: list[FileChange]) -> dict[str, Any]:
    """Counts by status, for files and tensors."""
    files: dict[str, int] = {}
    tensors: dict[str, int] = {}
    for c in changes:
        files[c.status] = files.get(c.status, 0) + 1
        for t in c.tensors:
            tensors[t.status] = tensors.get(t.status, 0) + 1
    return {"files": files, "tensors": tensors}
