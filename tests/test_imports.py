"""numpy is imported only when a commit or checkout needs it (its import is a third of a small commit)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = """
import sys
from mstore import Repo
repo = Repo.init(sys.argv[1])
repo.commit(sys.argv[2], "data", "v1")
repo.checkout("data", sys.argv[3])
print("numpy" in sys.modules)
"""


def test_committing_and_checking_out_text_files_never_imports_numpy(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"shard-{i}.jsonl").write_text("".join(f'{{"id": {j}, "text": "record {j}"}}\n' for j in range(2000)))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "store"), str(data), str(tmp_path / "out")],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "False"
    assert (tmp_path / "out" / "shard-1.jsonl").read_text() == (data / "shard-1.jsonl").read_text()


SERIES_SCRIPT = """
import sys
from mstore import Repo
repo = Repo.init(sys.argv[1])
for i, d in enumerate(sys.argv[2:-1]):
    repo.commit(d, "run", f"v{i}")
repo.checkout("run", sys.argv[-1])
print("numpy" in sys.modules)
"""


def test_a_bf16_checkpoint_series_is_committed_and_checked_out_without_numpy_given_the_c_kernels(tmp_path):
    from mstore import Repo, codecs

    if not codecs.have_kernels():
        pytest.skip("without the C kernels the plane codecs use numpy")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 96)).astype(np.float32)
    dirs = []
    for v in range(3):  # every weight moves: the later versions are deltas against the earlier
        w = w - 1e-3 * rng.standard_normal(w.shape).astype(np.float32)
        bf16 = (w.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # bf16 bit patterns
        header = json.dumps({"w": {"dtype": "BF16", "shape": list(w.shape), "data_offsets": [0, len(bf16)]}})
        d = tmp_path / f"v{v}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode() + bf16)
        dirs.append(d)
    out = subprocess.run(
        [sys.executable, "-c", SERIES_SCRIPT, str(tmp_path / "store"), *map(str, dirs), str(tmp_path / "out")],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "False"
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (dirs[-1] / "model.safetensors").read_bytes()
    with Repo.open(tmp_path / "store") as repo:  # the path that was taken: deltas of byte planes
        codecs_used = {entry.codec for _k, _oid, entry in repo.store.iter_entries("c")}
    assert codecs.DELTA in codecs_used and codecs.FLOATPLANE in codecs_used


BLAS_SCRIPT = """
import os, sys
import click
from mstore.cli import cli
ctx = click.Context(cli)
cli.get_command(ctx, sys.argv[1])
print(os.environ.get("OPENBLAS_NUM_THREADS", "unset"))
"""


def _blas_threads_after_choosing(command: str, **env: str) -> str:
    chosen = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")
    base = {k: v for k, v in os.environ.items() if k not in chosen}
    out = subprocess.run(
        [sys.executable, "-c", BLAS_SCRIPT, command], capture_output=True, text=True, check=True, env={**base, **env}
    )
    return out.stdout.strip()


def test_mstore_commands_start_openblas_with_one_thread_so_it_cannot_spin_beside_the_workers():
    assert _blas_threads_after_choosing("commit") == "1"
    assert _blas_threads_after_choosing("clone") == "1"


def test_a_thread_count_the_user_chose_is_kept():
    assert _blas_threads_after_choosing("commit", OMP_NUM_THREADS="3") == "unset"
    assert _blas_threads_after_choosing("commit", OPENBLAS_NUM_THREADS="4") == "4"


def test_mstore_run_leaves_the_environment_of_the_users_program_alone():
    assert _blas_threads_after_choosing("run") == "unset"


def test_lora_adapters_are_committed_without_numpy_as_their_matrices_are_too_thin_for_low_rank(tmp_path):
    from mstore import codecs
    from tests.conftest import write_safetensors

    if not codecs.have_kernels():
        pytest.skip("without the C kernels the plane codecs use numpy")
    rng = np.random.default_rng(1)
    dirs = []
    for v in range(3):  # new values every version: the XOR does not pay, so low rank would be next
        a, b = rng.standard_normal((16, 384)).astype(np.float32), rng.standard_normal((384, 16)).astype(np.float32)
        d = tmp_path / f"v{v}"
        write_safetensors(d / "adapter_model.safetensors", {"lora_A.weight": a, "lora_B.weight": b})
        dirs.append(d)
    out = subprocess.run(
        [sys.executable, "-c", SERIES_SCRIPT, str(tmp_path / "store"), *map(str, dirs), str(tmp_path / "out")],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "False"
    got = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    assert got == (dirs[-1] / "adapter_model.safetensors").read_bytes()
