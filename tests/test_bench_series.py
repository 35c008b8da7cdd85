"""The checkpoint-series workloads of bench/bench_series.py: deterministic, and shaped as documented."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import series_workloads as wl  # noqa: E402

TINY = wl.ModelSpec(vocab=256, hidden=32, layers=4, heads=2, intermediate=64, seq=16, batch=2, versions=3, steps=1,
                    lora_versions=2, lora_r=4)
TINY_JSONL = wl.JsonlSpec(shards=3, records_per_shard=200)
BUILDERS = {
    "full_ft": lambda: (wl.asdict(TINY), wl.build_full_ft(TINY)),
    "partial_ft": lambda: (wl.asdict(TINY), wl.build_partial_ft(TINY)),
    "lora": lambda: (wl.asdict(TINY), wl.build_lora(TINY)),
    "jsonl": lambda: (wl.asdict(TINY_JSONL), wl.build_jsonl(TINY_JSONL)),
}


def generate(cache: Path, name: str) -> tuple[wl.Series, bool]:
    params, build = BUILDERS[name]()
    return wl.cached(cache, name, params, build)


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> dict[str, wl.Series]:
    cache = tmp_path_factory.mktemp("cache")
    return {name: generate(cache, name)[0] for name in BUILDERS}


def tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    """name -> (dtype, raw bytes) of every tensor, read straight from the safetensors layout."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for k, info in header.items():
        if k != "__metadata__":
            a, b = info["data_offsets"]
            out[k] = (info["dtype"], raw[8 + n + a : 8 + n + b])
    return out


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_series_generated_twice_has_the_same_bytes(series, tmp_path, name):
    again, fresh = generate(tmp_path, name)
    assert fresh
    assert again.files == series[name].files
    assert again.sizes == series[name].sizes


def test_a_finished_series_is_taken_from_the_cache(series, tmp_path):
    first, fresh1 = generate(tmp_path, "jsonl")
    second, fresh2 = generate(tmp_path, "jsonl")
    assert (fresh1, fresh2) == (True, False)
    assert second.root == first.root and second.files == first.files


def test_generating_drops_copies_written_by_other_generator_code(tmp_path):
    stale = tmp_path / "jsonl-0123456789abcdef"
    stale.mkdir()
    (stale / "DONE.json").write_text(json.dumps({"code": "older generator"}))
    other = tmp_path / "lora-0123456789abcdef"  # another series: not touched
    other.mkdir()
    generate(tmp_path, "jsonl")
    assert not stale.exists() and other.exists()
    assert [p.name.split("-")[0] for p in tmp_path.glob("jsonl-*")] == ["jsonl"]


def test_other_parameters_get_another_cache_entry(tmp_path):
    a = wl.cache_key("jsonl", wl.asdict(TINY_JSONL))
    b = wl.cache_key("jsonl", wl.asdict(wl.JsonlSpec(shards=3, records_per_shard=201)))
    assert a != b


def test_full_fine_tune_versions_hold_weights_and_optimizer_state_that_all_move(series):
    import torch

    s = series["full_ft"]
    assert len(s.versions) == TINY.versions
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(s.files[0])
    t0, t1 = tensors(s.versions[0] / "model.safetensors"), tensors(s.versions[1] / "model.safetensors")
    assert {d for d, _ in t0.values()} == {"F32"}
    assert all(t0[k][1] != t1[k][1] for k in t0 if "norm" not in k)  # every trained matrix moved
    opt = torch.load(s.versions[1] / "optimizer.pt", weights_only=True)
    assert all({"exp_avg", "exp_avg_sq"} <= set(st) for st in opt["state"].values())
    assert s.files[0]["optimizer.pt"] != s.files[1]["optimizer.pt"]


def test_partial_fine_tune_is_bf16_with_the_lower_half_byte_identical(series):
    s = series["partial_ft"]
    first, last = tensors(s.versions[0] / "model.safetensors"), tensors(s.versions[-1] / "model.safetensors")
    assert {d for d, _ in first.values()} == {"BF16"}
    lower = [k for k in first if k.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1."))]
    upper = [k for k in first if k.startswith(("model.layers.2.", "model.layers.3.")) and k.endswith("proj.weight")]
    assert lower and upper
    assert all(first[k] == last[k] for k in lower)
    assert all(first[k][1] != last[k][1] for k in upper)


def test_lora_series_is_base_then_adapters_then_merged(series):
    s = series["lora"]
    assert len(s.versions) == TINY.lora_versions + 2
    assert "model.safetensors" in s.files[0] and "model.safetensors" in s.files[-1]
    for files in s.files[1:-1]:
        assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    base, merged = tensors(s.versions[0] / "model.safetensors"), tensors(s.versions[-1] / "model.safetensors")
    assert set(base) == set(merged)
    assert base["model.layers.0.self_attn.q_proj.weight"] != merged["model.layers.0.self_attn.q_proj.weight"]
    assert base["model.layers.0.mlp.up_proj.weight"] == merged["model.layers.0.mlp.up_proj.weight"]


def test_jsonl_versions_append_edit_in_the_middle_and_delete_a_shard(series):
    s = series["jsonl"]
    v = [{n: (d / n).read_text().splitlines() for n in s.files[i]} for i, d in enumerate(s.versions)]
    n = TINY_JSONL.records_per_shard
    for name, lines in v[0].items():
        assert len(lines) == n
        assert v[1][name][:n] == lines and len(v[1][name]) == n + n // 10  # appended at the end
        changed = [i for i, (a, b) in enumerate(zip(v[1][name], v[2][name], strict=True)) if a != b]
        assert len(changed) == (n + n // 10) // 100
        assert min(changed) > len(lines) // 4 and max(changed) < 3 * len(lines) // 4  # in the middle
    assert len(v[3]) == len(v[2]) - 1
    assert all(v[3][k] == v[2][k] for k in v[3])


def test_the_bench_flags_a_checkout_with_one_wrong_byte(series, tmp_path):
    import shutil

    from bench_series import check_tree

    s = series["jsonl"]
    dest = tmp_path / "out"
    shutil.copytree(s.versions[0], dest)
    assert check_tree(dest, s.files[0]) is None
    f = dest / "shard-00001.jsonl"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 1
    f.write_bytes(bytes(raw))
    assert "shard-00001.jsonl" in check_tree(dest, s.files[0])
