"""A local S3-protocol server whose objects live on disk: the durable storage
under the local Tansu broker (``LocalBroker(storage="s3")``).

moto's server (PyPI ``moto[s3]`` + flask) speaks the S3 protocol Tansu needs
(conditional puts included), but keeps everything in memory and has no
persistence option. This process runs moto's WSGI app behind a write-through
mirror: after every mutating request (PUT, POST, DELETE) the touched object's
state is read back from moto and written to ``data_dir`` (atomic rename)
BEFORE the response goes out, so whatever Tansu was told is stored survives
a kill -9 of this process, of the broker, or of the whole stack; on start the
directory is loaded back into moto. Not fsynced: like a single Kafka broker
with the default flush policy, a power loss can lose the newest writes.

Layout: ``data_dir/BUCKET/SHA256(key)``, each file ``MAGIC, u32 key length,
key, object bytes``. Loopback only; no authentication (a dev broker's store).

Listing (ListObjectsV2 without a delimiter) is answered here from a sorted
index of each bucket's keys that the same write-through keeps, not by moto:
Tansu lists a partition's record batches on every fetch, and moto walks
every key of the bucket and renders them through its serializer each time,
so a stack's store cost grew with every batch ever produced (a demo's
rollouts fell from 104 to 10 a second over 6 minutes, the store taking 70 %
of a core). The index answers in time proportional to the keys returned.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import hashlib
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote
from xml.sax.saxutils import escape

from arbiter.net import LOOPBACK, free_port
from arbiter.stream.errors import BrokerError

log = logging.getLogger(__name__)

BUCKET = "tansu"
# What Tansu (the object_store crate) needs to talk to it; moto accepts any credentials.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ALLOW_HTTP": "true"}
_MAGIC = b"ARBS3\x01"
_MUTATING = ("PUT", "POST", "DELETE")


def _object_file(bucket_dir: Path, key: str) -> Path:
    return bucket_dir / hashlib.sha256(key.encode()).hexdigest()


def _read_key(path: Path) -> str | None:
    """The object key stored in ``path`` (None: not one of ours)."""
    with open(path, "rb") as f:
        head = f.read(len(_MAGIC) + 4)
        if len(head) < len(_MAGIC) + 4 or not head.startswith(_MAGIC):
            return None
        (length,) = struct.unpack(">I", head[len(_MAGIC):])
        return f.read(length).decode()


def _write_atomically(path: Path, key: str, value: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    encoded = key.encode()
    with open(tmp, "wb") as f:
        f.write(_MAGIC + struct.pack(">I", len(encoded)) + encoded)
        f.write(value)
    tmp.replace(path)


def load_objects(bucket_dir: Path) -> Iterable[tuple[str, bytes]]:
    for path in sorted(bucket_dir.iterdir()):
        if path.name.startswith("."):  # a write cut short by a kill: never acknowledged
            path.unlink(missing_ok=True)
            continue
        data = path.read_bytes()
        if not data.startswith(_MAGIC):
            log.warning("object store: ignoring %s (not an object file)", path)
            continue
        (length,) = struct.unpack(">I", data[len(_MAGIC):len(_MAGIC) + 4])
        start = len(_MAGIC) + 4
        yield data[start:start + length].decode(), data[start + length:]


# S3's page size when a request names none.
DEFAULT_MAX_KEYS = 1000
_LIST_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"


class ListIndex:
    """One bucket's keys in order, with what a listing reports of each
    (ETag as S3 quotes it, size, last modified in ISO 8601)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.meta: dict[str, tuple[str, int, str]] = {}

    def put(self, key: str, etag: str, size: int, last_modified: str) -> None:
        if key not in self.meta:
            bisect.insort(self.keys, key)
        self.meta[key] = (etag, size, last_modified)

    def delete(self, key: str) -> None:
        if self.meta.pop(key, None) is not None:
            del self.keys[bisect.bisect_left(self.keys, key)]

    def page(self, prefix: str, after: str, max_keys: int) -> tuple[list[tuple[str, tuple[str, int, str]]], bool]:
        """Up to ``max_keys`` keys starting with ``prefix`` and greater than
        ``after``, in order, and whether more follow."""
        start = max(bisect.bisect_left(self.keys, prefix), bisect.bisect_right(self.keys, after) if after else 0)
        out: list[tuple[str, tuple[str, int, str]]] = []
        for key in self.keys[start:start + max_keys + 1]:
            if not key.startswith(prefix):
                break
            out.append((key, self.meta[key]))
        return out[:max_keys], len(out) > max_keys


def _token(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode()


def _untoken(token: str) -> str | None:
    try:
        return base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return None


def list_objects_v2_xml(bucket: str, index: ListIndex, query: dict[str, list[str]]) -> tuple[int, bytes]:
    """(HTTP status, body) of ListObjectsV2 on ``index`` (no delimiter), in
    the shape S3 and moto answer it."""
    prefix = query.get("prefix", [""])[0]
    start_after = query.get("start-after", [""])[0]
    token = query.get("continuation-token", [None])[0]
    encoding = query.get("encoding-type", [""])[0]
    try:
        max_keys = int(query.get("max-keys", [DEFAULT_MAX_KEYS])[0])
        if max_keys < 0:
            raise ValueError
    except ValueError:
        return 400, _error_xml("InvalidArgument", "max-keys must be an integer >= 0")
    after = start_after
    if token is not None:
        after = _untoken(token)
        if after is None or token == "":
            return 400, _error_xml("InvalidArgument", "The continuation token provided is incorrect")
    items, truncated = index.page(prefix, after, max_keys)

    def name(key: str) -> str:
        return escape(quote(key, safe="/") if encoding == "url" else key)

    parts = [f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="{_LIST_XMLNS}">',
             f"<Name>{escape(bucket)}</Name><Prefix>{name(prefix)}</Prefix><MaxKeys>{max_keys}</MaxKeys>",
             f"<KeyCount>{len(items)}</KeyCount><IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"]
    if encoding:
        parts.append(f"<EncodingType>{escape(encoding)}</EncodingType>")
    if token is not None:
        parts.append(f"<ContinuationToken>{escape(token)}</ContinuationToken>")
    if truncated:
        parts.append(f"<NextContinuationToken>{_token(items[-1][0])}</NextContinuationToken>")
    if token is None and start_after:
        parts.append(f"<StartAfter>{name(start_after)}</StartAfter>")
    for key, (etag, size, modified) in items:
        parts.append(f"<Contents><Key>{name(key)}</Key><LastModified>{modified}</LastModified>"
                     f"<ETag>{escape(etag, {chr(34): '&quot;'})}</ETag><Size>{size}</Size>"
                     "<StorageClass>STANDARD</StorageClass></Contents>")
    parts.append("</ListBucketResult>")
    return 200, "".join(parts).encode()


def _error_xml(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{escape(message)}</Message>'
            "</Error>").encode()


def _bucket_and_key(environ: dict) -> tuple[str, str, str]:
    """(bucket, "/", key) of a path-style request; PEP 3333: PATH_INFO is the
    URL-decoded path as latin-1 text."""
    path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
    return path.lstrip("/").partition("/")


class DiskMirror:
    """Keeps ``data_dir`` equal to moto's S3 state for every object a request touched."""

    def __init__(self, data_dir: Path):
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import FakeKey, s3_backends

        self.data_dir = data_dir
        self._backends = s3_backends
        self._key_type = FakeKey
        self._default = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        self.indexes: dict[str, ListIndex] = {}
        # One lock over "read moto's state, write the file": the last sync of a
        # key always writes its newest state, whatever order requests finish in.
        self._lock = threading.Lock()

    def load(self, buckets: Iterable[str]) -> int:
        """Recreate the buckets on disk (and ``buckets``) in moto; returns the object count."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        names = {p.name for p in self.data_dir.iterdir() if p.is_dir()} | set(buckets)
        count = 0
        for name in sorted(names):
            (self.data_dir / name).mkdir(exist_ok=True)
            self._default.create_bucket(name, CREDENTIALS["AWS_DEFAULT_REGION"])
            index = self.indexes[name] = ListIndex()
            for key, value in load_objects(self.data_dir / name):
                self._default.put_object(name, key, value, disable_notification=True)
                self._index_put(index, key, self._default.buckets[name].keys.get(key))
                count += 1
        return count

    def _index_put(self, index: ListIndex, key: str, found: Any) -> None:
        index.put(key, found.etag, found.size, found.last_modified_ISO8601)

    def _backend(self, bucket: str) -> Any | None:
        owner = self._backends.bucket_accounts.get(bucket)
        if owner is None:
            return None
        partition, account = owner
        return self._backends[account][partition]

    def sync(self, bucket: str, key: str, multi_delete: bool) -> None:
        with self._lock:
            backend = self._backend(bucket)
            bucket_dir = self.data_dir / bucket
            if backend is None or bucket not in backend.buckets:
                shutil.rmtree(bucket_dir, ignore_errors=True)
                self.indexes.pop(bucket, None)
                return
            bucket_dir.mkdir(exist_ok=True)
            index = self.indexes.setdefault(bucket, ListIndex())
            if multi_delete:
                # POST ?delete names its keys in the body: reconcile the bucket instead.
                live = backend.buckets[bucket].keys
                for path in bucket_dir.iterdir():
                    stored = _read_key(path) if not path.name.startswith(".") else None
                    if stored is not None and stored not in live:
                        path.unlink(missing_ok=True)
                for gone in [k for k in index.keys if not isinstance(live.get(k), self._key_type)]:
                    index.delete(gone)
                return
            if not key:
                return
            found = backend.buckets[bucket].keys.get(key)
            path = _object_file(bucket_dir, key)
            if not isinstance(found, self._key_type):  # gone (or a delete marker)
                path.unlink(missing_ok=True)
                index.delete(key)
            else:
                _write_atomically(path, key, found.value)
                self._index_put(index, key, found)

    def list_response(self, bucket: str, query: dict[str, list[str]]) -> tuple[int, bytes] | None:
        """ListObjectsV2 from the index; None where moto must answer (a
        delimiter, an unknown bucket: moto's NoSuchBucket)."""
        if "delimiter" in query:
            return None
        with self._lock:
            index = self.indexes.get(bucket)
            if index is None:
                return None
            return list_objects_v2_xml(bucket, index, query)

    def wrap(self, app: Callable) -> Callable:
        def mirrored(environ: dict, start_response: Callable) -> Any:
            if environ.get("REQUEST_METHOD") == "GET":
                bucket, _, key = _bucket_and_key(environ)
                query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
                if bucket and not key and query.get("list-type") == ["2"]:
                    answered = self.list_response(bucket, query)
                    if answered is not None:
                        status, body = answered
                        start_response("200 OK" if status == 200 else "400 Bad Request",
                                       [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
                        return [body]
            response = app(environ, start_response)
            if environ.get("REQUEST_METHOD") in _MUTATING:
                bucket, _, key = _bucket_and_key(environ)
                if bucket:
                    multi = environ["REQUEST_METHOD"] == "POST" and "delete" in parse_qs(
                        environ.get("QUERY_STRING", ""), keep_blank_values=True)
                    self.sync(bucket, key, multi)
            return response

        return mirrored


def serve(host: str, port: int, data_dir: Path, buckets: Iterable[str], ready_file: Path | None) -> int:
    """Run until SIGTERM/SIGINT (the ``python -m arbiter.stream.objectstore`` process)."""
    try:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server
    except ImportError as err:
        print(f"object store: moto's server is not installed ({err}): install requirements.lock (moto[s3], flask, "
              "flask-cors), or use the broker's memory storage", file=sys.stderr)
        return 3
    mirror = DiskMirror(data_dir)
    started = time.monotonic()
    count = mirror.load(buckets)
    server = make_server(host, port, mirror.wrap(DomainDispatcherApplication(create_backend_app)), threaded=True,
                         request_handler=MotoRequestHandler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    signal.signal(signal.SIGINT, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"object store on http://{host}:{port}: {count} objects loaded from {data_dir} in "
          f"{time.monotonic() - started:.2f}s", flush=True)
    if ready_file:
        tmp = ready_file.with_name(ready_file.name + ".tmp")
        tmp.write_text(f"http://{host}:{port}\n")
        tmp.replace(ready_file)
    server.serve_forever()
    return 0


class LocalObjectStore:
    """The object store as a child process on a fixed port (kept across
    restarts, so the broker's endpoint never changes)."""

    def __init__(self, data_dir: str | Path, log_path: Path, *, host: str = LOOPBACK, start_timeout_s: float = 60.0,
                 buckets: Iterable[str] = ()):
        self.data_dir = Path(data_dir).resolve()
        # Created at start (besides Tansu's), e.g. the policy weights' bucket.
        self.buckets = tuple(buckets)
        self.log_path = log_path
        self.host = host
        self.port: int | None = None
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def env(self) -> dict[str, str]:
        """What a client's environment needs to use this store: Tansu's
        object_store crate reads AWS_ENDPOINT, boto3 AWS_ENDPOINT_URL."""
        return {**CREDENTIALS, "AWS_ENDPOINT": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint}

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def returncode(self) -> int | None:
        return self._process.poll() if self._process else None

    def start(self) -> LocalObjectStore:
        if self.running():
            return self
        self.port = self.port or free_port(self.host)
        ready = self.data_dir.parent / f".{self.data_dir.name}.ready"
        ready.unlink(missing_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "arbiter.stream.objectstore", "--host", self.host, "--port", str(self.port),
                 "--data-dir", str(self.data_dir), "--ready-file", str(ready),
                 *(arg for bucket in self.buckets for arg in ("--bucket", bucket))],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout_s
        while not ready.exists():
            code = self._process.poll()
            if code is not None:
                self._process = None
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise BrokerError(f"the object store exited with status {code} while starting ({self.log_path}):\n"
                                  + "\n".join(tail))
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"the object store was not ready within {self.start_timeout_s}s; see {self.log_path}")
            time.sleep(0.05)
        ready.unlink(missing_ok=True)
        log.info("object store (pid %d) on %s, data in %s", self._process.pid, self.endpoint, self.data_dir)
        return self

    def stop(self, timeout_s: float = 10.0) -> int | None:
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arbiter.stream.objectstore", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--bucket", action="append", default=[BUCKET], help="create this bucket too (repeatable)")
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("ARBITER_LOG_LEVEL", "WARNING"))
    # One access-log line per request would bury everything else (Tansu polls constantly).
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    return serve(args.host, args.port, args.data_dir, args.bucket, args.ready_file)


if __name__ == "__main__":
    sys.exit(main())
