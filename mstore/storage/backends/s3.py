"""S3 backend (AWS S3, MinIO, Ceph, SeaweedFS) through boto3.

``s3://BUCKET/PREFIX`` with optional ``endpoint_url`` (path-style addressing, for MinIO and
friends), ``region`` and ``profile``. Credentials come only from boto3's standard chain
(environment, shared config/credentials files, instance roles) and are never part of a
message: botocore errors can carry request headers (the ``Authorization`` signature), so every
error raised here is rebuilt from the operation, the key, the S3 error code and the HTTP
status alone.

Remote refs move by conditional writes: ``IfNoneMatch="*"`` creates a document only if it does
not exist, ``IfMatch=ETAG`` replaces it only if it is unchanged; the server answers 412
(PreconditionFailed) or 409 (ConditionalRequestConflict) to the loser.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ...errors import InvalidName, MstoreError
from .base import Backend, BackendError, BackendNotFound, Progress, check_key, check_prefix

# boto3's own defaults for `aws s3 cp`-style transfers (8 MiB parts, 10 in flight); a remote
# pack of 64 MiB is eight parts, and push keeps two packs in flight.
PART_SIZE = 8 << 20
CONCURRENCY = 10

_CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
# Exceptions whose text is only a host, port or reason: safe to show.
_SAFE_TEXT = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "NoCredentialsError",
              "PartialCredentialsError", "ProfileNotFound", "ConnectionClosedError", "NoRegionError"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ``("bucket", "some/prefix")``.

    Raises:
        InvalidName: not an ``s3://`` URL with a bucket.
    """
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise InvalidName(f"{url!r} is not an s3://BUCKET[/PREFIX] URL")
    prefix = parsed.path.strip("/")
    if prefix:
        check_key(prefix)
    return parsed.netloc, prefix


class _BufferReader(io.RawIOBase):
    """A read-only, seekable file over a buffer, for multipart uploads.

    ``io.BytesIO`` would copy a bytearray or a memoryview whole before the upload copies each
    part out of it again.
    """

    def __init__(self, data: bytes | bytearray | memoryview):
        self.view = memoryview(data).cast("B")
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: len(self.view)}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = len(self.view) if n is None or n < 0 else min(len(self.view), self.pos + n)
        out = bytes(self.view[self.pos : end])
        self.pos = max(self.pos, end)
        return out

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class S3Backend(Backend):
    """Objects under ``s3://bucket/prefix/``."""

    def __init__(
        self,
        url: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        client: Any = None,
    ):
        self.url = url.rstrip("/")
        self.bucket, prefix = parse_s3_url(url)
        self.prefix = prefix + "/" if prefix else ""
        self.endpoint_url = endpoint_url
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise BackendError("S3 remotes need boto3: pip install boto3") from None
            try:
                session = boto3.session.Session(profile_name=profile, region_name=region)
                client = session.client(
                    "s3",
                    endpoint_url=endpoint_url,
                    config=Config(
                        s3={"addressing_style": "path"} if endpoint_url else {},
                        retries={"max_attempts": 5, "mode": "standard"},
                        max_pool_connections=CONCURRENCY * 2,
                    ),
                )
            except Exception as exc:  # ProfileNotFound, bad endpoint URL, ...
                raise self._error("connect", "", exc) from None
        self.client = client
        from boto3.s3.transfer import TransferConfig

        self.transfer = TransferConfig(
            multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE, max_concurrency=CONCURRENCY,
            use_threads=True,
        )

    # -- errors ------------------------------------------------------------------------------
    def _error(self, op: str, key: str, exc: BaseException) -> MstoreError:
        if isinstance(exc, MstoreError):  # an invalid key, refused before any request
            return exc
        where = f"{self.url}/{key}" if key else self.url
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", "?"))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            hint = ""
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
                hint = " (check the credentials in the AWS environment variables or profile)"
            elif code == "NoSuchBucket":
                hint = " (create the bucket first)"
            return BackendError(f"S3 {op} {where} failed: {code} (HTTP {status}){hint}")
        name = type(exc).__name__
        text = f": {exc}" if name in _SAFE_TEXT else ""
        return BackendError(f"S3 {op} {where} failed: {name}{text}")

    @staticmethod
    def _code(exc: BaseException) -> str:
        response = getattr(exc, "response", None)
        if not isinstance(response, dict):
            return ""
        code = str(response.get("Error", {}).get("Code", ""))
        status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return code if code not in ("", "None") else status

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    # -- reading -----------------------------------------------------------------------------
    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except Exception as exc:
            if self._code(exc) in _MISSING:
                raise BackendNotFound(f"{self.url}: no {key}") from None
            raise self._error("get", key, exc) from None

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            resp = self.client.get_object(
                Bucket=self.bucket, Key=self._key(key), Range=f"bytes={offset}-{offset + length - 1}"
            )
            return resp["Body"].read()
        except Exception as exc:
            code = self._code(exc)
            if code in _MISSING:
                raise BackendNotFound(f"{self.url}: no {key}") from None
            if code in ("InvalidRange", "416"):
                return b""
            raise self._error("get", key, exc) from None

    def get_file(self, key: str, dest: Path, progress: Progress | None = None) -> None:
        try:
            self.client.download_file(self.bucket, self._key(key), str(dest), Config=self.transfer, Callback=progress)
        except Exception as exc:
            if self._code(exc) in _MISSING:
                raise BackendNotFound(f"{self.url}: no {key}") from None
            raise self._error("download", key, exc) from None

    def stat(self, key: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except Exception as exc:
            if self._code(exc) in _MISSING:
                return None
            raise self._error("head", key, exc) from None

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        check_prefix(prefix)
        out: list[tuple[str, int]] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    out.append((item["Key"][len(self.prefix) :], int(item["Size"])))
        except Exception as exc:
            raise self._error("list", prefix, exc) from None
        for key, _size in out:
            try:
                check_key(key)
            except InvalidName as exc:
                raise BackendError(f"{self.url}: listing returned an invalid key: {exc}") from None
        yield from sorted(out)

    # -- writing -----------------------------------------------------------------------------
    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        try:
            if len(data) > PART_SIZE:  # multipart, parts in parallel
                self.client.upload_fileobj(_BufferReader(data), self.bucket, self._key(key), Config=self.transfer)
            else:
                body = data if isinstance(data, bytes) else bytes(data)
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body)
        except Exception as exc:
            raise self._error("put", key, exc) from None

    def put_file(self, key: str, path: Path, progress: Progress | None = None) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer, Callback=progress)
        except Exception as exc:
            raise self._error("upload", key, exc) from None

    def put_if_absent(self, key: str, data: bytes) -> bool:
        return self.put_if_version(key, data, None)

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return resp["Body"].read(), resp["ETag"]
        except Exception as exc:
            if self._code(exc) in _MISSING:
                return None
            raise self._error("get", key, exc) from None

    def put_if_version(self, key: str, data: bytes, version: str | None) -> bool:
        cond = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        for attempt in range(6):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **cond)
                return True
            except Exception as exc:
                code = self._code(exc)
                if code in _CONFLICT:
                    return False
                if version is not None and code in _MISSING:
                    return False  # it was deleted meanwhile: not at the version we saw
                status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if not (isinstance(status, int) and status >= 500) or attempt == 5:
                    raise self._error("conditional put", key, exc) from None
            # A 5xx leaves it open whether the write happened (some servers, SeaweedFS among
            # them, answer 500 while a new bucket settles): look before trying again.
            time.sleep(0.05 * 2**attempt)
            now = self.read_versioned(key)
            if now is not None and now[0] == data:
                return True  # our write landed (the documents carry seq, time and user)
            if (now is None) != (version is None) or (now is not None and now[1] != version):
                return False  # someone else's write landed
        return False

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            if self._code(exc) in _MISSING:
                return
            raise self._error("delete", key, exc) from None

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass
