"""`mstore lineage` and `mstore seen`: answers read from what the trainer recorded in its commits."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from mstore.cli import State  # noqa: E402
from mstore.cli.lineage import lineage, seen  # noqa: E402
from tests.trainer.helpers import config  # noqa: E402


@pytest.fixture
def chain(store):
    """models/base -> runs/a (on data/syllo) -> runs/b (on data/extra), full fine-tuning."""
    from trainer import train

    train(config(lora=None, steps=4, save_every=4), store.repo)
    train(config(lora=None, base="runs/a", branch="runs/b", data="data/extra", steps=4, save_every=4,
                 eval_records=16), store.repo)
    return store


def _run(store, command, *args):
    r = CliRunner().invoke(command, list(args), obj=State(str(store.root)))
    assert r.exit_code == 0, (r.output, r.exception)
    return r.output


def test_lineage_shows_a_checkpoint_back_to_its_base_model_and_every_dataset(chain):
    out = _run(chain, lineage, "runs/b")
    lines = out.splitlines()
    assert lines[0].startswith("runs/b, runs/b.best ") and "step 4/4" in lines[0] and "(verified)" in lines[0]
    assert lines[1].startswith("├── base: runs/a, runs/a.best ")
    assert any(line.startswith("│   ├── base: models/base ") for line in lines)
    assert any(line.startswith("│   └── data: data/syllo ") and "600 records" in line for line in lines)
    assert any(line.startswith("└── data: data/extra ") for line in lines)


def test_lineage_json_nests_inputs_by_id(chain):
    tree = json.loads(_run(chain, lineage, "runs/b", "--json"))
    assert tree["id"] == str(chain.repo.resolve("runs/b"))
    inputs = {i["name"]: i for i in tree["inputs"]}
    assert inputs["base"]["node"]["id"] == str(chain.repo.resolve("runs/a"))
    assert inputs["base"]["rev"] == "runs/a"
    grand = {i["name"]: i["node"]["id"] for i in inputs["base"]["node"]["inputs"]}
    assert grand == {"base": chain.base, "data": chain.data}
    assert inputs["data"]["node"]["kind"] == "dataset" and inputs["data"]["node"]["inputs"] == []


def test_lineage_dot_is_a_graphviz_digraph_with_an_edge_per_input(chain):
    out = _run(chain, lineage, "runs/b", "--dot")
    assert out.startswith("digraph lineage {") and out.rstrip().endswith("}")
    a, b = str(chain.repo.resolve("runs/a")), str(chain.repo.resolve("runs/b"))
    assert f'"{a}" -> "{b}" [label="base"];' in out
    assert f'"{chain.base}" -> "{a}" [label="base"];' in out
    assert out.count("->") == 4


def test_lineage_follows_inputs_after_the_branches_that_named_them_are_gone(chain):
    chain.repo.delete_branch("runs/a")
    chain.repo.delete_branch("runs/a.best")
    tree = json.loads(_run(chain, lineage, "runs/b", "--json"))
    base = tree["inputs"][0]
    assert base["name"] == "base" and base["node"]["refs"] == [] and base["rev"] == "runs/a"
    assert {i["name"] for i in base["node"]["inputs"]} == {"base", "data"}


def test_seen_by_a_checkpoint_counts_what_its_whole_lineage_trained_on(chain):
    res = json.loads(_run(chain, seen, "data/syllo", "--by", "runs/b", "--json"))
    (by,) = res["by"]
    trained = chain.repo.get_commit("runs/a").meta["data_position"]["records"]
    assert by["records_seen"] == trained == 16  # runs/b inherited runs/a's ledger
    assert res["data"] == {"rev": "data/syllo", "id": chain.data, "files": 3, "records": 600}
    assert sum(len(f["ranges"]) for f in by["files"]) <= 2  # two blocks of 8: ranges, not records


def test_seen_without_by_lists_every_branch_that_trained_on_the_data(chain):
    res = json.loads(_run(chain, seen, "data/syllo", "--json"))
    assert {c["ref"] for c in res["by"]} == {"runs/a", "runs/a.best", "runs/b", "runs/b.best"}
    extra = json.loads(_run(chain, seen, "data/extra", "--json"))
    assert {c["ref"] for c in extra["by"]} == {"runs/b", "runs/b.best"}


def test_seen_for_one_file_of_a_dataset(chain):
    res = json.loads(_run(chain, seen, "data/syllo:shard-00001.jsonl", "--by", "runs/a", "--json"))
    (f,) = res["by"][0]["files"]
    assert f["path"] == "shard-00001.jsonl" and res["data"]["files"] == 1
    assert f["seen"] == sum(b - a for a, b in f["ranges"])


def test_seen_text_names_the_branch_and_the_share_seen(chain):
    out = _run(chain, seen, "data/syllo", "--by", "runs/a")
    assert "runs/a" in out and "16 of 600 records (2.7 %)" in out


def test_seen_by_a_model_without_a_ledger_says_so(chain):
    out = _run(chain, seen, "data/syllo", "--by", "models/base")
    assert "no data ledger" in out
