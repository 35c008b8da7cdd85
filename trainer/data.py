"""Datasets from committed JSONL files, a deterministic resumable order, and the held-out split.

A dataset is a commit holding JSONL files (``mstore import-data``). Files are read through the
store's verified reader, never from a working copy. A record is a non-empty line; records are
numbered from 0 within each file.

The training order is a pure function of (dataset, seed, block size, held-out split): files in
path order are cut into blocks of ``block`` consecutive records; each epoch visits every
training block once, in an order shuffled by a BLAKE3-keyed Fisher-Yates permutation of
(seed, epoch), and reads a block's records in file order. The only run state the data order
needs is therefore one integer, the number of records consumed, which every checkpoint
records. Shuffling blocks rather than single records is what keeps the data ledger compact:
what a run has consumed is always a list of ranges (one per block at worst, merged as blocks
meet), never a list of records.

The held-out split (when no separate evaluation dataset is given) is a fixed set of blocks
chosen by the same permutation keyed on ``eval_seed`` (not the training seed, so runs with
different seeds are evaluated on the same records). Its id is the BLAKE3 of its records' bytes
joined by newlines, in file order.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from typing import Any

import blake3

from .errors import DataError
from .ledger import normalize

ORDER_VERSION = 1


@dataclass
class DataFile:
    """One JSONL file of a dataset commit and its records (raw lines)."""

    path: str
    id: str
    size: int
    records: list[bytes] = field(repr=False, default_factory=list)


@dataclass
class Dataset:
    """The JSONL files of one dataset commit, read and verified."""

    commit: str
    rev: str
    files: list[DataFile]

    @property
    def n_records(self) -> int:
        return sum(len(f.records) for f in self.files)

    @property
    def n_bytes(self) -> int:
        return sum(f.size for f in self.files)


def split_records(data: bytes) -> list[bytes]:
    """The records of a JSONL file: its non-empty lines, in order."""
    return [line for line in data.split(b"\n") if line.strip()]


def load_dataset(repo: Any, rev: str, commit_id: str | None = None) -> Dataset:
    """Read every ``*.jsonl`` file of a dataset commit through the verified reader.

    Raises:
        DataError: the commit holds no JSONL records, or its recorded counts disagree with its files.
        mstore.NotFound: the revision does not resolve.
        mstore.IntegrityError: stored bytes are damaged.
    """
    cid = commit_id or str(repo.resolve(rev))
    entries = [e for e in repo.ls(cid) if e.kind != "tree" and e.path.endswith(".jsonl")]
    if not entries:
        raise DataError(f"data {rev} ({cid[:7]}) holds no .jsonl files")
    files = []
    for e in sorted(entries, key=lambda e: e.path):
        with repo.open_file(f"{cid}:{e.path}") as f:
            raw = f.read()
        files.append(DataFile(e.path, str(e.id), e.size, split_records(raw)))
    ds = Dataset(cid, rev, files)
    if ds.n_records == 0:
        raise DataError(f"data {rev} ({cid[:7]}) has {len(files)} .jsonl files but no records")
    recorded = (repo.get_commit(cid).meta.get("data") or {}).get("files")
    if isinstance(recorded, dict):
        for f in files:
            n = recorded.get(f.path)
            if isinstance(n, int) and n != len(f.records):
                raise DataError(
                    f"data {rev} ({cid[:7]}): {f.path} has {len(f.records)} records but its commit records {n}"
                )
    return ds


def record_text(raw: bytes, text_field: str, where: str) -> str:
    """The training text of one record: ``text_field``, or ``prompt`` + ``completion``.

    Raises:
        DataError: the record is not a JSON object with that text.
    """
    try:
        rec = json.loads(raw)
    except ValueError as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from None
    if isinstance(rec, dict):
        value = rec.get(text_field)
        if isinstance(value, str):
            return value
        if isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
            return rec["prompt"] + rec["completion"]
    raise DataError(f"{where}: no string field {text_field!r} (nor prompt/completion)")


def permutation(n: int, key: bytes) -> list[int]:
    """A Fisher-Yates permutation of ``range(n)`` driven by BLAKE3(key) output.

    Portable by construction: it depends on no library's random-number stream, so a run
    resumes with the same order on any machine and any NumPy version.
    """
    if n <= 1:
        return list(range(n))
    stream = blake3.blake3(key).digest(length=8 * n)
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        r = int.from_bytes(stream[8 * i : 8 * i + 8], "little")
        j = r % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


@dataclass(frozen=True)
class Block:
    """Records ``[start, end)`` of file number ``file``."""

    file: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass
class EvalSplit:
    """The held-out records the validation metric is computed on."""

    records: list[tuple[DataFile, int]]
    desc: dict[str, Any]


class DataOrder:
    """The deterministic, resumable order in which a run consumes its training records."""

    def __init__(
        self,
        ds: Dataset,
        *,
        seed: int,
        block: int,
        eval_records: int,
        eval_seed: int = 0,
        eval_ds: Dataset | None = None,
    ):
        if block < 1:
            raise DataError("the shuffle block must hold at least one record")
        self.ds = ds
        self.seed = seed
        self.block = block
        blocks = [
            Block(i, s, min(s + block, len(f.records)))
            for i, f in enumerate(ds.files)
            for s in range(0, len(f.records), block)
        ]
        held: set[Block] = set()
        if eval_ds is None and eval_records > 0:
            need = eval_records
            for k in permutation(len(blocks), _key(b"heldout", eval_seed, block)):
                if need <= 0:
                    break
                held.add(blocks[k])
                need -= blocks[k].size
            if len(held) >= len(blocks):
                raise DataError(
                    f"data {ds.rev} has {ds.n_records} records in {len(blocks)} blocks of {block}: holding out "
                    f"{eval_records} for evaluation leaves nothing to train on "
                    "(lower --eval-records or --shuffle-block)"
                )
        self.train_blocks = [b for b in blocks if b not in held]
        self.heldout_blocks = [b for b in blocks if b in held]
        self.n_train = sum(b.size for b in self.train_blocks)
        self.eval_ds = eval_ds
        self._epoch_cache: tuple[int, list[Block], list[int]] | None = None

    # -- order -----------------------------------------------------------------------------
    def _epoch(self, epoch: int) -> tuple[list[Block], list[int]]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            perm = permutation(len(self.train_blocks), _key(b"order", self.seed, self.block, epoch))
            order = [self.train_blocks[k] for k in perm]
            starts, acc = [], 0
            for b in order:
                starts.append(acc)
                acc += b.size
            self._epoch_cache = (epoch, order, starts)
        return self._epoch_cache[1], self._epoch_cache[2]

    def take(self, pos: int, n: int) -> list[tuple[DataFile, int]]:
        """The ``n`` records at positions ``pos, pos+1, ...`` of the endless multi-epoch order."""
        out = []
        while len(out) < n:
            epoch, offset = divmod(pos, self.n_train)
            order, starts = self._epoch(epoch)
            k = bisect.bisect_right(starts, offset) - 1
            while k < len(order) and len(out) < n:
                b = order[k]
                i = b.start + (offset - starts[k])
                while i < b.end and len(out) < n:
                    out.append((self.ds.files[b.file], i))
                    i += 1
                    pos += 1
                k += 1
                offset = starts[k] if k < len(order) else 0
        return out

    def position(self, pos: int) -> dict[str, int]:
        """The data position a checkpoint records."""
        epoch, offset = divmod(pos, self.n_train)
        return {"records": pos, "epoch": epoch, "offset": offset}

    # -- ledger ------------------------------------------------------------------------------
    def planned(self) -> dict[str, list[list[int]]]:
        """Every training record, as ranges per file id (what preflight checks against the ledger)."""
        return self._ranges(self.train_blocks)

    def consumed(self, pos: int) -> dict[str, list[list[int]]]:
        """The training records consumed after ``pos`` records, as ranges per file id."""
        if pos >= self.n_train:
            return self.planned()
        order, starts = self._epoch(0)
        taken: list[Block] = []
        for b, s in zip(order, starts, strict=True):
            if s >= pos:
                break
            taken.append(Block(b.file, b.start, b.start + min(b.size, pos - s)))
        return self._ranges(taken)

    def _ranges(self, blocks: list[Block]) -> dict[str, list[list[int]]]:
        by_file: dict[str, list[list[int]]] = {}
        for b in blocks:
            by_file.setdefault(self.ds.files[b.file].id, []).append([b.start, b.end])
        return {fid: normalize(r) for fid, r in sorted(by_file.items())}

    def record_counts(self) -> dict[str, int]:
        """File id -> records in that file."""
        return {f.id: len(f.records) for f in self.ds.files}

    # -- evaluation ------------------------------------------------------------------------
    def eval_split(self) -> EvalSplit:
        """The held-out records, in file order, with the description a metric receipt records."""
        if self.eval_ds is not None:
            ds = self.eval_ds
            recs = [(f, i) for f in ds.files for i in range(len(f.records))]
            ranges = {f.id: [[0, len(f.records)]] for f in ds.files}
            source = "dataset"
        else:
            ds = self.ds
            blocks = sorted(self.heldout_blocks, key=lambda b: (b.file, b.start))
            recs = [(ds.files[b.file], i) for b in blocks for i in range(b.start, b.end)]
            ranges = self._ranges(blocks)
            source = "held out of the training data"
        h = blake3.blake3()
        for n, (f, i) in enumerate(recs):
            if n:
                h.update(b"\n")
            h.update(f.records[i])
        desc = {
            "id": h.hexdigest(),
            "data": ds.commit,
            "source": source,
            "records": len(recs),
            "ranges": ranges,
        }
        return EvalSplit(recs, desc)


def _key(tag: bytes, *numbers: int) -> bytes:
    return b"mstore-trainer/" + tag + b"/" + b"/".join(str(int(n)).encode() for n in numbers)
