"""The data order is deterministic and resumable from one integer; the ledger it yields is ranges."""

from __future__ import annotations

import json

import pytest

from trainer import ledger
from trainer.data import DataFile, DataOrder, Dataset, permutation, split_records
from trainer.errors import DataError


def _dataset(sizes=(100, 37, 250), commit="c" * 64) -> Dataset:
    files = []
    for i, n in enumerate(sizes):
        records = [json.dumps({"text": f"file {i} record {k}"}).encode() for k in range(n)]
        files.append(DataFile(f"shard-{i}.jsonl", f"{i:064x}", 0, records))
    return Dataset(commit, "data/x", files)


def _order(**kw) -> DataOrder:
    args = {"seed": 3, "block": 8, "eval_records": 20}
    args.update(kw)
    return DataOrder(_dataset(), **args)


def test_records_are_the_non_empty_lines():
    assert split_records(b'{"a":1}\n\n  \n{"a":2}\r\n{"a":3}') == [b'{"a":1}', b'{"a":2}\r', b'{"a":3}']


def test_the_order_is_the_same_for_the_same_seed_and_differs_for_another():
    a = [(f.path, i) for f, i in _order().take(0, 300)]
    assert a == [(f.path, i) for f, i in _order().take(0, 300)]
    assert a != [(f.path, i) for f, i in _order(seed=4).take(0, 300)]


def test_reading_from_any_position_continues_the_same_order():
    full = [(f.path, i) for f, i in _order().take(0, 900)]  # more than two epochs
    for pos in (0, 1, 7, 8, 150, 359, 360, 361, 700):
        assert [(f.path, i) for f, i in _order().take(pos, 50)] == full[pos : pos + 50]


def test_an_epoch_visits_every_training_record_exactly_once():
    o = _order()
    epoch = [(f.path, i) for f, i in o.take(0, o.n_train)]
    assert len(set(epoch)) == len(epoch) == o.n_train == 387 - sum(b.size for b in o.heldout_blocks)


def test_the_held_out_split_is_never_trained_on():
    o = _order()
    held = {(f.path, i) for f, i in o.eval_split().records}
    assert len(held) >= 20
    assert not held & {(f.path, i) for f, i in o.take(0, 3 * o.n_train)}


def test_the_held_out_split_depends_on_the_eval_seed_not_the_training_seed():
    assert _order(seed=1).eval_split().desc == _order(seed=2).eval_split().desc
    assert _order(eval_seed=1).eval_split().desc["id"] != _order().eval_split().desc["id"]


def test_consumption_is_a_few_ranges_and_a_full_epoch_is_one_range_per_file():
    o = _order()
    mid = o.consumed(100)
    assert ledger.count(r for rs in mid.values() for r in rs) == 100
    assert sum(len(rs) for rs in mid.values()) <= 100 // 8 + 1  # at most one range per block
    full = o.consumed(o.n_train)
    assert full == o.planned()
    no_holdout = _order(eval_records=0)
    assert no_holdout.consumed(no_holdout.n_train) == {f.id: [[0, len(f.records)]] for f in no_holdout.ds.files}


def test_consumed_ranges_are_exactly_the_records_taken():
    o = _order()
    for pos in (1, 13, 64, 200):
        taken: dict[str, list[list[int]]] = {}
        for f, i in o.take(0, pos):
            taken.setdefault(f.id, []).append([i, i + 1])
        assert o.consumed(pos) == {k: ledger.normalize(v) for k, v in sorted(taken.items())}


def test_holding_out_everything_is_refused():
    with pytest.raises(DataError, match="leaves nothing to train on"):
        DataOrder(_dataset((10,)), seed=0, block=8, eval_records=10)


def test_the_permutation_is_a_permutation_and_fixed_by_its_key():
    p = permutation(1000, b"k")
    assert sorted(p) == list(range(1000)) and p == permutation(1000, b"k") and p != permutation(1000, b"j")
    assert permutation(5, b"x") == [3, 2, 0, 1, 4]  # pinned: the order must not change between versions


def test_ranges_merge_intersect_and_count():
    assert ledger.normalize([[5, 8], [0, 2], [2, 3], [7, 9], [4, 4]]) == [[0, 3], [5, 9]]
    assert ledger.intersect([[0, 10], [20, 30]], [[5, 25]]) == [[5, 10], [20, 25]]
    assert ledger.count([[0, 3], [2, 5]]) == 5
    merged = ledger.merge(ledger.empty(), {"f": [[0, 4]]}, {"f": 10}, {})
    merged = ledger.merge(merged, {"f": [[4, 6], [8, 10]]}, {"f": 10}, {})
    assert merged["files"]["f"] == {"records": 10, "seen": [[0, 6], [8, 10]]}
    assert ledger.overlap(merged, {"f": [[5, 9]], "g": [[0, 1]]}) == {"f": [[5, 6], [8, 9]]}
