r"""Pack files: append-only containers of encoded objects, sealed when full.

Layout (all integers little-endian)::

    header   b"MSTPACK\\0"  u32 format version (1)  u32 reserved (0)              16 bytes
    record*  b"MSRC" kind:u8 codec:u8 reserved:u16 raw_len:u64 enc_len:u64
             id:32 bytes  check:32 bytes (BLAKE3 of the raw payload)             88 bytes
             payload: enc_len bytes
    footer   b"MSFT" u32 reserved  u64 record count
             BLAKE3 of every byte before the footer                              48 bytes

A pack without a footer is one whose writer is still running or was killed; its records are
still valid individually (each carries its own check). A sealed pack is never modified again.
Each writing process appends only to packs it created (names are unique), so concurrent
writers never share a file.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import blake3

from .. import codecs
from ..errors import IntegrityError, StorageError, UnsupportedFormat
from ..fsutil import fsync_dir, pread_exact, start_writeback, unique_name, write_all

Buffer = bytes | bytearray | memoryview

PACK_MAGIC = b"MSTPACK\0"
PACK_VERSION = 1
HEADER = struct.Struct("<8sII")
RECORD = struct.Struct("<4sBBHQQ32s32s")
RECORD_MAGIC = b"MSRC"
FOOTER = struct.Struct("<4sIQ32s")
FOOTER_MAGIC = b"MSFT"
SUFFIX = ".pack"

# Records at least this large are read through a memory map of their stretch of the pack rather
# than copied into a buffer: decoding reads the page cache in place. Measured on a checkout of
# float32 checkpoints stored as byte planes and delta chains: 21 % less decoding CPU. Below this,
# one pread costs less than setting up and tearing down a mapping.
MAP_MIN = 1 << 20

# Ask the kernel to start writing a pack to disk every this many bytes (fsync still decides
# durability): the disk then works while the writer goes on, instead of all at the fsync.
_WRITEBACK_STEP = 8 << 20

# Small records are gathered into a buffer of this much (allocated once per pack) before a
# write(2): large enough to amortise syscalls, small enough that a chunk never waits long in
# memory. Payloads of at least _DIRECT_MIN (or larger than the buffer) go out as they are: a
# write per record costs less than copying it into the buffer first (tensor pieces are up
# to 4 MiB; growing a bytearray by concatenation also reallocated it into fresh pages).
_WRITE_BUFFER = 1 << 20
_DIRECT_MIN = 128 << 10


@dataclass(frozen=True)
class Record:
    """One record as read from a pack."""

    kind: str
    codec: int
    raw_len: int
    enc_len: int
    id: bytes
    check: bytes
    offset: int

    @property
    def end(self) -> int:
        """Offset of the byte after this record's payload."""
        return self.offset + RECORD.size + self.enc_len


def parse_record_header(buf: bytes, offset: int) -> Record:
    """Parse the fixed record header that starts at ``offset``.

    Raises:
        IntegrityError: wrong magic or an unknown kind.
    """
    magic, kind, codec, _res, raw_len, enc_len, oid, check = RECORD.unpack(buf)
    if magic != RECORD_MAGIC:
        raise IntegrityError(f"no record at pack offset {offset} (bad magic)")
    try:
        kind_s = bytes([kind]).decode("ascii")
    except UnicodeDecodeError:
        raise IntegrityError(f"record at pack offset {offset} has a bad kind byte") from None
    if kind_s not in "cftm":
        raise IntegrityError(f"record at pack offset {offset} has unknown kind {kind_s!r}")
    return Record(kind_s, codec, raw_len, enc_len, oid, check, offset)


class PackWriter:
    """Appends records to one pack file owned by this process."""

    def __init__(self, packs_dir: Path, max_size: int):
        self.name = unique_name(suffix=SUFFIX)
        self.path = packs_dir / self.name
        self.max_size = max_size
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        except OSError as exc:
            raise StorageError(f"cannot create pack {self.path}: {exc.strerror}") from exc
        self._buf = memoryview(bytearray(_WRITE_BUFFER))
        self._fill = 0  # bytes of _buf in use
        self._hash = blake3.blake3()
        self._written = 0  # bytes handed to write(2)
        self._writeback_from = 0  # where the disk has not been asked to start writing yet
        self.number: int | None = None  # set once the index has registered this pack
        self.size = 0
        self.records = 0
        self.sealed = False
        self._dir_synced = False
        # Set by the first failed write: the file no longer holds what offsets say, so nothing
        # more may be appended, synced or sealed (an index entry could point past its bytes).
        self._broken: str | None = None
        self._append(HEADER.pack(PACK_MAGIC, PACK_VERSION, 0))

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise StorageError(f"pack {self.path} is unusable after an earlier write error: {self._broken}")

    def _write(self, data: bytes | memoryview) -> None:
        # Hashed here, where bytes leave in file order, rather than record by record: each
        # update releases and retakes the GIL, and a commit's workers contend for it.
        self._hash.update(data)
        try:
            write_all(self.fd, data)
        except OSError as exc:
            self._broken = exc.strerror or str(exc)
            raise StorageError(f"cannot write pack {self.path}: {exc.strerror}") from exc
        self._written += len(data)
        if self._written - self._writeback_from >= _WRITEBACK_STEP:
            start_writeback(self.fd, self._writeback_from, self._written - self._writeback_from)
            self._writeback_from = self._written

    def _append(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        n = len(data)
        if n >= _DIRECT_MIN or n > len(self._buf):  # out as it is: no copy into the buffer
            self._drain()
            self._write(data)
            return
        if self._fill + n > len(self._buf):
            self._drain()
        self._buf[self._fill : self._fill + n] = data
        self._fill += n

    def _drain(self) -> None:
        if self._fill:
            self._write(self._buf[: self._fill])
            self._fill = 0

    def add(
        self, kind: str, oid: bytes, check: bytes, codec: int, raw_len: int, payload: bytes | Sequence[Buffer]
    ) -> int:
        """Append one encoded object; returns the record's offset.

        ``payload`` is the encoded bytes, or a sequence of buffers they are the concatenation
        of (written in turn: an encoder's planes need not be joined into one copy first).

        Raises:
            StorageError: the disk refused, now or at an earlier write of this pack.
        """
        self._check_usable()
        offset = self.size
        parts = (payload,) if isinstance(payload, (bytes, bytearray, memoryview)) else payload
        length = sum(len(p) for p in parts)
        self._append(RECORD.pack(RECORD_MAGIC, ord(kind), codec, 0, raw_len, length, oid, check))
        for part in parts:
            self._append(part)
        self.records += 1
        return offset

    @property
    def full(self) -> bool:
        """True once the pack has reached its size bound."""
        return self.size >= self.max_size

    def sync(self) -> None:
        """Make every appended byte durable (write, fsync the file, and the directory once).

        Raises:
            StorageError: the disk refused (now, or at an earlier write of this pack).
        """
        self._check_usable()
        self._drain()
        try:
            os.fsync(self.fd)
            if not self._dir_synced:
                fsync_dir(self.path.parent)
                self._dir_synced = True
        except OSError as exc:
            self._broken = exc.strerror or str(exc)  # what reached the disk is unknown: no retry
            raise StorageError(f"cannot fsync pack {self.path}: {exc.strerror}") from exc

    def seal(self) -> None:
        """Write the footer, make it durable and close. Nothing is appended afterwards."""
        if self.sealed:
            return
        self._check_usable()
        self._drain()
        digest = self._hash.digest()
        self._write(FOOTER.pack(FOOTER_MAGIC, 0, self.records, digest))
        self.size += FOOTER.size
        self.sync()
        os.close(self.fd)
        self.sealed = True

    def abandon(self) -> None:
        """Close without sealing (an error path); the file stays for compaction to reclaim."""
        if not self.sealed:
            try:
                if self._broken is None:
                    self._drain()
            finally:
                os.close(self.fd)
                self.sealed = True


class PackReader:
    """Random access to records in pack files, with an LRU of open descriptors."""

    # A store with thousands of small packs must not run into the descriptor limit (often 1024).
    MAX_OPEN = 128

    def __init__(self, packs_dir: Path, resolve_base: Callable[[bytes, int, int], bytes] | None = None):
        self.packs_dir = packs_dir
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        # (base digest, raw length, chain position) -> the base chunk's verified raw bytes: how
        # decode() reaches the base of a delta record (the store supplies it from the index).
        self.resolve_base = resolve_base

    def _fd(self, name: str) -> int:
        # Caller holds self._lock.
        fd = self._fds.get(name)
        if fd is not None:
            self._fds.move_to_end(name)
            return fd
        try:
            fd = os.open(self.packs_dir / name, os.O_RDONLY)
        except FileNotFoundError:
            raise IntegrityError(f"pack {name} is missing") from None
        self._fds[name] = fd
        while len(self._fds) > self.MAX_OPEN:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def read(self, name: str, offset: int, enc_len: int) -> tuple[Record, bytes]:
        """Read the record at ``offset`` and its payload (not yet decoded or verified).

        Raises:
            IntegrityError: the pack is missing, truncated or the record header is damaged.
        """
        try:
            # Under the lock, so the LRU never closes a descriptor that a thread is reading.
            with self._lock:
                buf = pread_exact(self._fd(name), RECORD.size + enc_len, offset)
        except StorageError:
            raise IntegrityError(f"pack {name} is truncated at offset {offset}") from None
        rec = parse_record_header(buf[: RECORD.size], offset)
        if rec.enc_len != enc_len:
            raise IntegrityError(f"pack {name} offset {offset}: record length {rec.enc_len} != indexed {enc_len}")
        return rec, buf[RECORD.size :]

    def read_head(self, name: str, offset: int, n: int) -> bytes:
        """The first ``n`` payload bytes of the record at ``offset`` (header checked).

        Raises:
            IntegrityError: the pack is missing or truncated, or the record header is damaged.
        """
        try:
            with self._lock:
                buf = pread_exact(self._fd(name), RECORD.size + n, offset)
        except StorageError:
            raise IntegrityError(f"pack {name} is truncated at offset {offset}") from None
        rec = parse_record_header(buf[: RECORD.size], offset)
        if rec.enc_len < n:
            raise IntegrityError(f"pack {name} offset {offset}: record too short")
        return buf[RECORD.size :]

    def read_into(self, name: str, offset: int, enc_len: int, buf: bytearray) -> tuple[Record, memoryview]:
        """Like :meth:`read`, into ``buf`` (at least ``RECORD.size + enc_len`` bytes): no allocation.

        The payload returned is a view of ``buf``, valid until ``buf`` is reused.

        Raises:
            IntegrityError: the pack is missing, truncated or the record header is damaged.
        """
        total = RECORD.size + enc_len
        view = memoryview(buf)[:total]
        got = 0
        # A duplicate descriptor, so the read runs outside the lock (threads read in parallel)
        # and the LRU may close the cached one meanwhile.
        with self._lock:
            fd = os.dup(self._fd(name))
        try:
            while got < total:
                n = os.preadv(fd, [view[got:]], offset + got)
                if n <= 0:
                    raise IntegrityError(f"pack {name} is truncated at offset {offset}")
                got += n
        finally:
            os.close(fd)
        rec = parse_record_header(bytes(view[: RECORD.size]), offset)
        if rec.enc_len != enc_len:
            raise IntegrityError(f"pack {name} offset {offset}: record length {rec.enc_len} != indexed {enc_len}")
        return rec, view[RECORD.size :]

    def map_record(self, name: str, offset: int, enc_len: int) -> tuple[Record, memoryview]:
        """Like :meth:`read`, the payload as a read-only view of a memory map of the pack.

        The map covers only this record and lives as long as a view of it does (dropping the
        last view unmaps it), so memory use is bounded by what the caller holds. Sealed packs
        never change and an open pack only grows, so a mapped record cannot move; the size
        check below refuses a pack already cut short. A pack cut short while mapped, or a disk
        read error under the map, faults (SIGBUS) instead of raising: what ``git`` accepts
        for its mapped packs too; nothing in mstore truncates an indexed record.

        Raises:
            IntegrityError: the pack is missing, truncated or the record header is damaged.
        """
        total = RECORD.size + enc_len
        with self._lock:
            fd = os.dup(self._fd(name))
        try:
            if os.fstat(fd).st_size < offset + total:
                raise IntegrityError(f"pack {name} is truncated at offset {offset}")
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            try:
                m = mmap.mmap(fd, offset + total - start, access=mmap.ACCESS_READ, offset=start)
            except OSError:  # a file system that cannot map files: read it instead
                return self.read_into(name, offset, enc_len, bytearray(total))
        finally:
            os.close(fd)
        view = memoryview(m)[offset - start :]
        rec = parse_record_header(bytes(view[: RECORD.size]), offset)
        if rec.enc_len != enc_len:
            raise IntegrityError(f"pack {name} offset {offset}: record length {rec.enc_len} != indexed {enc_len}")
        return rec, view[RECORD.size :]

    def decode(self, rec: Record, payload: bytes, chain: int = 0) -> bytes:
        """Decode a payload and check it against the record's check hash.

        A delta record's base is fetched through ``resolve_base`` (at chain position
        ``chain + 1``, so a reader can bound chains).

        Raises:
            IntegrityError: the payload does not decode, its base is unreadable, or its hash is
                wrong.
        """
        if rec.codec == codecs.DELTA:
            if rec.kind != "c" or self.resolve_base is None:
                raise IntegrityError("a delta record outside a store's chunks")
            base_digest, _depth = codecs.delta_base(payload)
            base = self.resolve_base(base_digest, rec.raw_len, chain + 1)
            raw = codecs.decode_delta(payload, rec.raw_len, base)
        else:
            raw = codecs.decode(rec.codec, payload, rec.raw_len)
        if blake3.blake3(raw).digest() != rec.check:
            raise IntegrityError("payload hash does not match its record")
        return raw

    def close(self) -> None:
        """Close every cached descriptor."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def scan_pack(path: Path) -> tuple[list[Record], bool, int]:
    """Walk a pack's records without trusting any index.

    Returns:
        (records, sealed, bytes_scanned): the records whose headers parse and whose payload
        lies inside the file; whether a valid footer ends the pack; how far the scan got.

    Raises:
        UnsupportedFormat: the pack header names a version this mstore does not read.
        IntegrityError: the file is not a pack.
    """
    size = path.stat().st_size
    records: list[Record] = []
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
        if len(head) < HEADER.size:
            raise IntegrityError(f"pack {path.name} is shorter than its header")
        magic, version, _ = HEADER.unpack(head)
        if magic != PACK_MAGIC:
            raise IntegrityError(f"{path.name} is not a pack file")
        if version != PACK_VERSION:
            raise UnsupportedFormat(f"pack {path.name} has version {version}; this mstore reads {PACK_VERSION}")
        h = blake3.blake3(head)
        offset = HEADER.size
        while offset + 4 <= size:
            f.seek(offset)
            peek = f.read(4)
            if peek == FOOTER_MAGIC and offset + FOOTER.size == size:
                f.seek(offset)
                _m, _r, count, digest = FOOTER.unpack(f.read(FOOTER.size))
                return records, (count == len(records) and digest == h.digest()), size
            hdr = peek + f.read(RECORD.size - 4)
            if len(hdr) < RECORD.size:
                break
            try:
                rec = parse_record_header(hdr, offset)
            except IntegrityError:
                break
            if rec.end > size:
                break
            payload = f.read(rec.enc_len)
            h.update(hdr)
            h.update(payload)
            records.append(rec)
            offset = rec.end
    return records, False, offset
