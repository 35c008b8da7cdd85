"""PyTorch archives (torch.save's zip) are cut at their tensor storages, never failing a commit.

Optimizer state is twice the size of the model it trains. Cut at its storage entries, an
unchanged storage deduplicates, float storages get the float-plane codec, and a changed storage
becomes a delta against the same entry of the parent version.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import blake3
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mstore import Repo
from mstore.chunking.torchzip import TORCHZIP_NAME
from mstore.codecs import DELTA
from tests.conftest import tree_bytes


def optimizer_state(seed: int, n: int = 6, shape=(64, 96)) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "state": {
            i: {"step": torch.tensor(10.0), "exp_avg": torch.randn(shape, generator=g) * 1e-3,
                "exp_avg_sq": torch.rand(shape, generator=g) * 1e-6}
            for i in range(n)
        },
        "param_groups": [{"lr": 3e-4, "params": list(range(n))}],
    }


def save(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def manifest(repo: Repo, rev: str, name: str = "optimizer.pt"):
    with repo.open_file(f"{rev}:{name}") as f:
        return f.fobj


def test_a_torch_archive_is_cut_at_its_storages_and_round_trips_bit_exact(repo, work, tmp_path):
    state = optimizer_state(0)
    save(state, work / "v0" / "optimizer.pt")
    repo.commit(work / "v0", "run", "v0")

    fobj = manifest(repo, "run")
    assert fobj.chunker == TORCHZIP_NAME
    ids = {str(cid) for cid, _n in fobj.chunks}
    for slot in state["state"].values():  # every storage's raw bytes are a chunk of their own
        assert blake3.blake3(slot["exp_avg"].numpy().tobytes()).hexdigest() in ids
    repo.checkout("run", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(work / "v0")
    loaded = torch.load(tmp_path / "out" / "optimizer.pt")
    assert torch.equal(loaded["state"][3]["exp_avg_sq"], state["state"][3]["exp_avg_sq"])


def test_unchanged_storages_of_a_later_version_are_stored_once(repo, work):
    state = optimizer_state(1)
    save(state, work / "v0" / "optimizer.pt")
    repo.commit(work / "v0", "run", "v0")
    before = repo.stored_bytes()
    state["state"][0]["exp_avg"] = state["state"][0]["exp_avg"] + 1.0  # one storage of 12 changes
    save(state, work / "v1" / "optimizer.pt")

    repo.commit(work / "v1", "run", "v1")

    changed = state["state"][0]["exp_avg"].numel() * 4
    assert repo.stored_bytes() - before < changed + 8192


def test_a_changed_storage_is_stored_as_a_delta_against_the_parent_entry(repo, work, tmp_path):
    state = optimizer_state(2)
    save(state, work / "v0" / "optimizer.pt")
    repo.commit(work / "v0", "run", "v0")
    for slot in state["state"].values():
        slot["exp_avg_sq"] = slot["exp_avg_sq"] * 1.0001  # every second moment moves a little
    save(state, work / "v1" / "optimizer.pt")
    repo.commit(work / "v1", "run", "v1")

    codecs_used = {repo.store.entry("c", cid).codec for cid, _n in manifest(repo, "run").chunks}
    assert DELTA in codecs_used
    for i, rev in enumerate(("run~1", "run")):
        repo.checkout(rev, tmp_path / f"o{i}")
        assert tree_bytes(tmp_path / f"o{i}") == tree_bytes(work / f"v{i}")


def _deflated_archive() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"pickle" * 10)
        z.writestr("archive/data/0", bytes(range(256)) * 64)
    return buf.getvalue()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"PK\x03\x04" + b"\x00" * 200, id="zip-signature-then-garbage"),
        pytest.param(None, id="truncated-archive"),
        pytest.param(_deflated_archive(), id="compressed-storage"),
        pytest.param(b"not a zip at all" * 100, id="not-a-zip"),
    ],
)
def test_a_pt_file_that_is_not_a_clean_torch_archive_is_stored_as_ordinary_bytes(repo, work, tmp_path, content):
    if content is None:
        buf = io.BytesIO()
        torch.save(optimizer_state(3), buf)
        content = buf.getvalue()[: len(buf.getvalue()) // 2]
    (work / "odd").mkdir(parents=True)
    (work / "odd" / "optimizer.pt").write_bytes(content)

    repo.commit(work / "odd", "odd", "odd")

    assert manifest(repo, "odd").chunker != TORCHZIP_NAME
    repo.checkout("odd", tmp_path / "out")
    assert (tmp_path / "out" / "optimizer.pt").read_bytes() == content


def _archive() -> bytes:
    buf = io.BytesIO()
    torch.save({"a": torch.randn(50, 50, generator=torch.Generator().manual_seed(0)), "b": torch.arange(30.0)}, buf)
    return buf.getvalue()


ARCHIVE = _archive()
DIRECTORY = ARCHIVE.rfind(b"PK\x01\x02") - 200  # mostly mutate the headers and central directory


EDITS = st.lists(
    st.tuples(st.integers(max(0, DIRECTORY), len(ARCHIVE) - 1), st.integers(0, 255)), min_size=1, max_size=4
)


@settings(max_examples=300, deadline=None)
@given(EDITS)
def test_a_mutated_archive_is_either_cut_into_pieces_that_tile_it_or_refused_as_format_error(edits):
    from mstore.chunking.torchzip import plan_zip_pieces
    from mstore.errors import FormatError

    data = bytearray(ARCHIVE)
    for pos, value in edits:
        data[pos] = value
    try:
        pieces = plan_zip_pieces(io.BytesIO(bytes(data)), len(data), 1 << 24)
    except FormatError:
        return
    assert pieces[0][0] == 0 and sum(n for _o, n, _h, _k in pieces) == len(data)
    assert all(a[0] + a[1] == b[0] for a, b in zip(pieces, pieces[1:], strict=False))


def test_an_archive_needing_a_newer_zip_version_is_stored_as_ordinary_bytes(repo, work, tmp_path):
    data = bytearray(ARCHIVE)
    at = data.find(b"PK\x01\x02")  # the first central directory entry: "version needed" = 10.3
    data[at + 6 : at + 8] = (103).to_bytes(2, "little")
    (work / "v").mkdir(parents=True)
    (work / "v" / "optimizer.pt").write_bytes(bytes(data))

    repo.commit(work / "v", "odd", "newer zip")

    assert manifest(repo, "odd").chunker != TORCHZIP_NAME
    repo.checkout("odd", tmp_path / "out")
    assert (tmp_path / "out" / "optimizer.pt").read_bytes() == bytes(data)
