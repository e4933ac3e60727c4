"""Where published policy versions live: ``file:///dir`` or ``s3://bucket/prefix``.

One small contract (put/get a file or bytes, does a key exist) over a local
directory and over any S3-protocol store. S3 credentials, region and endpoint
come from the environment as every AWS tool reads them (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``,
profiles, instance roles; ``AWS_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL_S3`` for
a store other than AWS, e.g. MinIO or the local one ``arbiter up`` starts).
Large files go up and down in parts (boto3's managed transfer: multipart above
``multipart_threshold``, parts transferred in parallel).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from arbiter.errors import ArbiterError

MiB = 1 << 20


class StoreError(ArbiterError):
    """The store could not be reached, refused the request, or lacks the key."""


@dataclass(frozen=True)
class TransferSettings:
    # S3 parts are 5 MiB .. 5 GiB, at most 10 000 per object: 64 MiB parts carry 640 GB.
    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 64 * MiB
    max_concurrency: int = 8


def split_uri(uri: str) -> tuple[str, str]:
    """``(scheme, rest)`` of a weights URI, refusing what no store serves."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"weights URI {uri!r}: s3:// needs a bucket (s3://BUCKET/PREFIX)")
        return "s3", f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"weights URI {uri!r}: file:// takes a local absolute path (file:///dir)")
        return "file", unquote(parsed.path)
    raise StoreError(f"weights URI {uri!r}: the scheme must be s3:// or file://")


def join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def open_store(uri: str, transfer: TransferSettings | None = None) -> Store:
    scheme, rest = split_uri(uri)
    if scheme == "file":
        return FileStore(Path(rest))
    bucket, _, prefix = rest.partition("/")
    return S3Store(bucket, prefix, transfer or TransferSettings())


class Store:
    """Keys are relative paths under the store's root (``VERSION/NAME``)."""

    uri: str

    def put_file(self, key: str, path: Path) -> None:
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get_file(self, key: str, path: Path) -> None:
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def local_path(self, key: str) -> Path | None:
        """The key's file when the store is a local directory (read in place)."""
        return None


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the store shares the trainer's filesystem: a
    published version's files are never rewritten in place, so the store
    needs no second copy of the bytes (the publish cost stays one write)."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(source, target)


class FileStore(Store):
    """A directory (local disk, or a shared volume mounted on every machine)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / key

    def put_file(self, key: str, path: Path) -> None:
        self._write(key, lambda tmp: _link_or_copy(path, tmp))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda tmp: tmp.write_bytes(data))

    def _write(self, key: str, fill) -> None:
        # Whole files or nothing: a reader never sees a half-copied key.
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            fill(tmp)
            tmp.replace(target)
        except OSError as err:
            raise StoreError(f"cannot write {target}: {err}") from err

    def get_file(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except OSError as err:
            raise StoreError(f"cannot read {self._path(key)}: {err}") from err

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except OSError as err:
            raise StoreError(f"cannot read {self._path(key)}: {err}") from err

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str, transfer: TransferSettings):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = join_uri(f"s3://{bucket}", self.prefix) if self.prefix else f"s3://{bucket}"
        # An endpoint given by address (a local or in-cluster store) has no
        # bucket subdomains: path-style requests work against every server.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        # No per-request CRC on top of TLS/TCP: every file is checked end to
        # end against the manifest's sha256, which a per-request checksum
        # cannot replace (it would pass a wrong but intact object).
        config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                        s3={"addressing_style": "path" if endpoint else "auto"},
                        request_checksum_calculation="when_required", response_checksum_validation="when_required")
        self._client = boto3.client("s3", endpoint_url=endpoint or None, config=config)
        self._transfer = TransferConfig(
            multipart_threshold=transfer.multipart_threshold, multipart_chunksize=transfer.multipart_chunksize,
            max_concurrency=transfer.max_concurrency,
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, what: str, key: str, err: Exception) -> StoreError:
        return StoreError(f"{what} s3://{self.bucket}/{self._key(key)} failed: {err}")

    def put_file(self, key: str, path: Path) -> None:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.upload_file(str(path), self.bucket, self._key(key), Config=self._transfer)
        except (BotoCoreError, ClientError, S3UploadFailedError) as err:
            raise self._fail("upload to", key, err) from err

    def put_bytes(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (BotoCoreError, ClientError) as err:
            raise self._fail("upload to", key, err) from err

    def get_file(self, key: str, path: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.download_file(self.bucket, self._key(key), str(path), Config=self._transfer)
        except (BotoCoreError, ClientError) as err:
            raise self._fail("download of", key, err) from err

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except (BotoCoreError, ClientError) as err:
            raise self._fail("download of", key, err) from err

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail("looking up", key, err) from err
        except BotoCoreError as err:
            raise self._fail("looking up", key, err) from err

    def head(self, key: str) -> dict:
        """The object's metadata (ETag, size): the tests read multipart ETags here."""
        return self._client.head_object(Bucket=self.bucket, Key=self._key(key))
