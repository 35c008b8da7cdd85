"""push and clone of a checkpoint series to a local SeaweedFS, against plain boto3 in the same run.

Targets (issue 8): push and clone at >= 70 % of the throughput of boto3 ``upload_file`` /
``download_file`` (what ``aws s3 cp`` does) of the same bytes; an incremental push of a
checkpoint in which half the tensors changed transfers <= its new stored bytes + 5 %.

The series: a base checkpoint of float32 tensors (16 MiB each, values like trained weights),
then checkpoints in which half the tensors moved, committed with the public API. What is
compared:

* push: ``Repo.push`` of the whole series to an empty prefix vs ``upload_file`` of one file
  holding exactly as many bytes as the push sent (random bytes, so nothing can compress
  them away), alternating, medians of ``--runs``;
* clone: ``Repo.clone`` of that prefix (download, verify every record, index, check each
  file's id against its content) vs ``download_file`` of the baseline file;
* the same figures per logical byte (the checkpoint files' total), which is what a user
  waiting for a copy sees;
* an incremental push: the series' next checkpoint, bytes sent vs its commit's stored bytes;
* the peak RSS and CPU of one more clone, run as ``mstore clone`` in a fresh process (forked
  by bench_store's small wrapper, so the figure is the clone's own).

Ratios are reported two ways: the median of each run's own ratio (mstore and boto3 measured
back to back, so load from other work on the machine hits both) and the ratio of the medians.
The load average is printed before and after.

The SeaweedFS server is started by the test helper (tests/remote/s3_server.py) on 127.0.0.1.
``--quick`` runs a small series once, for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench_store  # noqa: E402

from mstore import Repo  # noqa: E402
from tests.remote import s3_server  # noqa: E402

TENSOR = (2048, 2048)  # float32: 16 MiB, four pieces of 512 rows in a new store (one in an older)


def write_checkpoint(path: Path, step: int, tensors: int, base: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1000 + step)
    out = dict(base)
    if step:
        names = sorted(base)
        for name in names[(step % 2) :: 2]:  # half of them moved (alternating halves)
            out[name] = (base[name] + rng.standard_normal(TENSOR, dtype=np.float32) * 1e-3).astype(np.float32)
        base.update(out)
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path / "model.safetensors"), metadata={"step": str(step)})


def settle_memory(nbytes: int) -> None:
    """Before each timed step, untimed: write back dirty pages, then back fresh memory.

    Both sides write the same bytes into the page cache (the server into its volumes for a
    push, the client into packs or the downloaded file for a clone); ``nbytes`` is at least
    that. As in bench_store, this VM hands memory freed a few seconds ago back to the host,
    and whichever step first writes into such pages pays a host fault per 4 KiB page; see
    bench_store.warm_free_memory.
    """
    os.sync()
    bench_store.warm_free_memory(nbytes)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=32, help="tensors per checkpoint (16 MiB each)")
    ap.add_argument("--checkpoints", type=int, default=2, help="checkpoints in the series")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a small series, one run")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()
    bench_store.installed_bytecode()
    if args.quick:
        args.tensors, args.checkpoints, args.runs = 8, 2, 1
    tmp = Path(tempfile.mkdtemp(prefix="mstore-bench-remote-"))
    server = s3_server.start(tmp / "seaweedfs")
    os.environ.update(server.env())
    figures: dict = {}
    load_before = os.getloadavg()
    try:
        client = server.client()
        client.create_bucket(Bucket="bench")
        rng = np.random.default_rng(7)
        base = {f"model.layers.{i}.weight": (rng.standard_normal(TENSOR, dtype=np.float32) * 0.02)
                for i in range(args.tensors)}
        repo = Repo.init(tmp / "store")
        logical = 0
        for step in range(args.checkpoints):
            ck = tmp / f"ck{step}"
            write_checkpoint(ck, step, args.tensors, base)
            logical += (ck / "model.safetensors").stat().st_size
            repo.commit(ck, "series", f"step {step}", kind="checkpoint", allow_regression=True)
            shutil.rmtree(ck)
        stored = sum(e.enc_len for _k, _o, e in repo.store.iter_entries())
        print(f"series: {args.checkpoints} checkpoints, {logical / 1e9:.2f} GB logical, {stored / 1e9:.2f} GB stored")

        push_s, up_s, clone_s, down_s, sent = [], [], [], [], 0
        for run in range(args.runs):
            first_boto = run % 2 == 1  # alternate which of the pair goes first
            prefix = f"s3://bench/run{run}"
            repo.remote_add(f"r{run}", prefix, endpoint_url=server.endpoint)
            blob = tmp / "baseline.bin"
            if run == 0:  # the push's wire size: a dry push to a throw-away prefix
                repo.remote_add("sizing", "s3://bench/sizing", endpoint_url=server.endpoint)
                repo.push("sizing", ["series"])
                wire = sum(size for key, size in _list(client, "sizing/packs/"))
                with open(blob, "wb") as f:
                    left = wire
                    while left:
                        n = min(left, 64 << 20)
                        f.write(os.urandom(n))
                        left -= n

            def do_push() -> None:
                settle_memory(2 * wire)  # noqa: B023
                t0 = time.perf_counter()
                pushed.append(repo.push(f"r{run}", ["series"]))  # noqa: B023
                push_s.append(time.perf_counter() - t0)

            def do_upload() -> None:
                settle_memory(2 * wire)  # noqa: B023
                t0 = time.perf_counter()
                client.upload_file(str(blob), "bench", f"baseline/run{run}.bin")  # noqa: B023
                up_s.append(time.perf_counter() - t0)

            pushed: list = []
            for step in ((do_upload, do_push) if first_boto else (do_push, do_upload)):
                step()
            res = pushed[0]
            sent = sum(size for key, size in _list(client, f"run{run}/packs/"))
            assert sent == blob.stat().st_size, "the baseline must move the bytes the push sent"

            def do_clone() -> None:
                dest = tmp / f"clone{run}"  # noqa: B023
                settle_memory(2 * wire)  # noqa: B023
                t0 = time.perf_counter()
                c = Repo.clone(prefix, dest, endpoint_url=server.endpoint)  # noqa: B023
                clone_s.append(time.perf_counter() - t0)
                assert c.head("series") == repo.head("series")
                c.close()
                shutil.rmtree(dest)

            def do_download() -> None:
                settle_memory(2 * wire)  # noqa: B023
                t0 = time.perf_counter()
                client.download_file("bench", f"baseline/run{run}.bin", str(tmp / "down.bin"))  # noqa: B023
                down_s.append(time.perf_counter() - t0)
                os.unlink(tmp / "down.bin")

            for step in ((do_download, do_clone) if first_boto else (do_clone, do_download)):
                step()
            print(f"run {run}: push {push_s[-1]:.2f} s (upload_file {up_s[-1]:.2f} s), "
                  f"clone {clone_s[-1]:.2f} s (download_file {down_s[-1]:.2f} s), {res.bytes / 1e6:.0f} MB records")

        # One more clone as a fresh `mstore clone` process: its own peak RSS and CPU.
        child = bench_store.run_child(
            [sys.executable, "-m", "mstore", "clone", "s3://bench/run0", str(tmp / "clone-child"),
             "--endpoint-url", server.endpoint, "-q"],
            ROOT, dict(os.environ), sync=False,
        )
        assert child.rc == 0, child.stderr
        shutil.rmtree(tmp / "clone-child")

        # Incremental: the next checkpoint, half of its tensors changed.
        ck = tmp / "ck-next"
        write_checkpoint(ck, args.checkpoints, args.tensors, base)
        committed = repo.commit(ck, "series", "next", kind="checkpoint", allow_regression=True)
        before = sum(size for _k, size in _list(client, "run0/"))
        inc = repo.push("r0", ["series"])
        after = sum(size for _k, size in _list(client, "run0/"))
        figures = {
            "logical_bytes": logical,
            "stored_bytes": stored,
            "wire_bytes": sent,
            "push_s": median(push_s),
            "upload_file_s": median(up_s),
            "push_vs_upload_file": median(up_s) / median(push_s),
            "push_vs_upload_file_runs": [u / p for u, p in zip(up_s, push_s, strict=True)],
            "push_vs_upload_file_median_of_runs": median([u / p for u, p in zip(up_s, push_s, strict=True)]),
            "push_MBps": sent / median(push_s) / 1e6,
            "upload_file_MBps": sent / median(up_s) / 1e6,
            "push_logical_MBps": logical / median(push_s) / 1e6,
            "clone_s": median(clone_s),
            "download_file_s": median(down_s),
            "clone_vs_download_file": median(down_s) / median(clone_s),
            "clone_vs_download_file_runs": [d / c for d, c in zip(down_s, clone_s, strict=True)],
            "clone_vs_download_file_median_of_runs": median([d / c for d, c in zip(down_s, clone_s, strict=True)]),
            "clone_process_wall_s": child.wall,
            "clone_process_cpu_s": child.cpu,
            "clone_process_peak_rss_MB": child.maxrss_mb,
            "clone_MBps": sent / median(clone_s) / 1e6,
            "download_file_MBps": sent / median(down_s) / 1e6,
            "incremental_stored_bytes": committed.stored_bytes,
            "incremental_record_bytes": inc.bytes,
            "incremental_bucket_growth": after - before,
            "incremental_ratio": (after - before) / committed.stored_bytes,
            "runs": args.runs,
            "load_before": load_before,
            "load_after": os.getloadavg(),
        }
        print(json.dumps(figures, indent=2))
        print(
            f"push  {figures['push_MBps']:.0f} MB/s vs upload_file {figures['upload_file_MBps']:.0f} MB/s: "
            f"{figures['push_vs_upload_file']:.0%}, median of runs "
            f"{figures['push_vs_upload_file_median_of_runs']:.0%} (target >= 70%)\n"
            f"clone {figures['clone_MBps']:.0f} MB/s vs download_file {figures['download_file_MBps']:.0f} MB/s: "
            f"{figures['clone_vs_download_file']:.0%}, median of runs "
            f"{figures['clone_vs_download_file_median_of_runs']:.0%} (target >= 70%)\n"
            f"clone as a process: {child.wall:.2f} s, {child.cpu:.2f} s CPU, peak RSS {child.maxrss_mb:.0f} MB\n"
            f"load average {load_before[0]:.2f} before, {figures['load_after'][0]:.2f} after\n"
            f"incremental push: bucket grew {figures['incremental_bucket_growth'] / 1e6:.1f} MB for "
            f"{figures['incremental_stored_bytes'] / 1e6:.1f} MB newly stored: {figures['incremental_ratio']:.3f}x "
            "(target <= 1.05)"
        )
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _list(client, prefix: str):
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=prefix):
        for item in page.get("Contents", []):
            yield item["Key"], item["Size"]


if __name__ == "__main__":
    main()
