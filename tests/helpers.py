"""What the test files share: a server on its own event-loop thread, waiting
for a condition (never a fixed sleep), and the checks of gRPC errors,
metrics and stream contents that many files make."""

from __future__ import annotations

import asyncio
import collections
import math
import subprocess
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from arbiter.stream import StreamConsumer
    from services.common.server import RunningServer

T = TypeVar("T")


class BackgroundServer:
    """An async server run on its own event-loop thread, so a test drives it
    with ordinary blocking gRPC clients."""

    def __init__(self, create: Callable[[], Awaitable[tuple[RunningServer, int]]], start_timeout_s: float = 300.0):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="server-loop", daemon=True)
        self._thread.start()
        try:
            self.running, self.port = self.run(create(), timeout=start_timeout_s)
        except BaseException:
            self._close_loop()
            raise

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def engine(self) -> Any:
        return self.running.engine

    def run(self, coro: Awaitable[T], timeout: float | None = 60.0) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float | None = None) -> None:
        try:
            self.run(self.running.stop(grace), timeout=None)
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def hold_model_thread(server: BackgroundServer) -> Callable[[], None]:
    """Occupy the server's model thread (every version's forward passes run
    there, one at a time) until the returned function is called: the next
    batch waits on it, and items sent after that queue in the batcher, which
    runs an idle model's work at once and so never holds items itself."""
    entered, gate = threading.Event(), threading.Event()

    def occupy() -> None:
        entered.set()
        gate.wait(60)

    held = server.engine.models.executor.submit(occupy)
    if not entered.wait(30):
        gate.set()
        raise AssertionError("the model thread did not become free within 30s")

    def release() -> None:
        gate.set()
        held.result(timeout=30)

    return release


# -- waiting ------------------------------------------------------------------


def _timed_out(timeout_s: float, what: str | Callable[[], str]) -> AssertionError:
    return AssertionError(f"timed out after {timeout_s}s waiting for {what() if callable(what) else what}")


def wait_until(
    condition: Callable[[], T], timeout_s: float = 30.0, what: str | Callable[[], str] = "condition",
    interval_s: float = 0.05,
) -> T:
    """Poll ``condition`` until it returns something truthy and return that;
    fail the test, naming ``what`` (a callable is asked at the time, so it can
    report progress), if ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() >= deadline:
            raise _timed_out(timeout_s, what)
        time.sleep(interval_s)
    return value


async def wait_until_async(
    condition: Callable[[], T], timeout_s: float = 10.0, what: str = "condition", interval_s: float = 0.001
) -> T:
    """``wait_until`` for a test running on an event loop: polls without
    blocking the loop, so the tasks it waits on make progress."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() >= deadline:
            raise _timed_out(timeout_s, what)
        await asyncio.sleep(interval_s)
    return value


def drain(consumer: StreamConsumer, expected: int, timeout_s: float = 30.0, idle_polls: int = 1) -> list:
    """Poll until ``expected`` records arrived, then ``idle_polls`` more polls
    (so an extra record would be seen)."""
    records = []
    deadline = time.monotonic() + timeout_s
    while len(records) < expected:
        assert time.monotonic() < deadline, f"got {len(records)} of {expected} records in {timeout_s}s"
        records.extend(consumer.poll(timeout_s=0.5).records)
    for _ in range(idle_polls):
        records.extend(consumer.poll(timeout_s=0.5).records)
    return records


# -- checks -------------------------------------------------------------------


def expect_error(call: Callable[[], Any], code: grpc.StatusCode, *fragments: str) -> str:
    """``call()`` fails with ``code`` and details containing every fragment;
    returns the details. A streaming call's responses are read, since its
    error arrives with them."""
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    details = info.value.details()
    assert info.value.code() == code, details
    for fragment in fragments:
        assert fragment in details, details
    return details


def sample_value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A metric sample read in-process; 0 for one never observed."""
    return registry.get_sample_value(name, labels) or 0.0


def metrics_text(server: BackgroundServer) -> str:
    """The server's /metrics page, as a scraper gets it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.running.metrics_port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric_value(server: BackgroundServer, name: str, **labels: str) -> float | None:
    """One sample from the server's /metrics page, matched on its name and
    exact labels; None when the page does not have it."""
    for family in text_string_to_metric_families(metrics_text(server)):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


class Traffic:
    """Client threads calling ``call`` back to back while a test changes the
    server under them (a version swap): ``seen`` counts the answers by what
    ``call`` returns (the version that answered), ``failures`` keeps every
    RPC error. ``wait_for(key, n)`` waits until ``n`` more answers came from
    ``key``."""

    def __init__(self, call: Callable[[], Any], clients: int = 1):
        self.call = call
        self.seen: collections.Counter = collections.Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, name=f"traffic-{i}") for i in range(clients)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.seen[self.call()] += 1
            except grpc.RpcError as err:
                self.failures.append(f"{err.code().name}: {err.details()}")

    def wait_for(self, key: Any, more: int = 3, timeout_s: float = 60.0) -> None:
        target = self.seen[key] + more
        wait_until(lambda: self.seen[key] >= target, timeout_s, f"{more} more answers from {key!r}")

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


class TritonServiceCase:
    """A model service under test with its forward passes in the session's
    Triton (``triton_server``), against the same exported directory served
    in-process. ``settings(repo, triton, version, retry_s, **overrides)``
    builds the service's settings; ``fixtures()`` the module fixtures
    ``triton`` (this model unloaded from the shared server afterwards),
    ``control`` (a TritonModel on it), ``service``, ``in_process`` and stubs on
    plain channels (no client-side retries to hide a failed request): assign
    them to the test module's globals."""

    def __init__(self, model: str, settings_class: type, create_server: Callable, stub_class: type,
                 **service_options: Any):
        self.model = model
        self.settings_class = settings_class
        self.create_server = create_server
        self.stub_class = stub_class
        self.service_options = service_options

    def settings(self, repo, triton, version: int = 1, retry_s: float = 10.0, **overrides: Any):
        from arbiter.backends import BackendConfig

        backend = BackendConfig(kind="triton", triton_url=triton.url, triton_model=self.model, triton_retry_s=retry_s)
        # The tests load checkpoints from all over pytest's base temp, which holds the repository.
        roots = (str(repo.parent),)
        return self.settings_class(model_dir=str(repo / self.model / str(version)), port=0, metrics_port=0,
                                   backend=backend, model_roots=roots, **overrides)

    def swap_version_2_in(self, traffic: Traffic, models_stub, control, repo, label: str = "") -> str:
        """While ``traffic`` runs against version 1 (Arbiter's "v0"): load
        Triton version 2 beside it (as ``label``, or its arbiter.json label),
        activate it, unload v0; Triton holds {1, 2} then {2} and the traffic
        keeps being answered throughout. Returns the new version's label."""
        from arbiter.v1 import common_pb2

        traffic.wait_for("v0")
        loaded = models_stub.LoadModelVersion(common_pb2.LoadModelVersionRequest(
            path=str(repo / self.model / "2"), version=label, activate=False), timeout=300).info
        assert (loaded.backend, loaded.active) == ("triton", False)
        assert control.ready_versions() == {1, 2}
        models_stub.ActivateModelVersion(common_pb2.ActivateModelVersionRequest(version=loaded.version), timeout=10)
        traffic.wait_for(loaded.version)
        models_stub.UnloadModelVersion(common_pb2.UnloadModelVersionRequest(version="v0"), timeout=300)
        assert control.ready_versions() == {2}
        traffic.wait_for(loaded.version)
        return loaded.version

    def fixtures(self) -> tuple:
        from arbiter.v1 import common_pb2_grpc

        def serve(make):
            with BackgroundServer(lambda: self.create_server(make())) as srv:
                yield srv

        def stub_on(server, cls):
            with grpc.insecure_channel(server.target) as channel:
                yield cls(channel)

        def triton(repo, triton_server):
            import tritonclient.grpc as grpcclient

            yield triton_server
            with grpcclient.InferenceServerClient(triton_server.url) as client:
                try:
                    client.unload_model(self.model)
                except Exception:  # not loaded (a restart test may end with it gone)
                    pass

        def control(triton):
            from arbiter.backends.triton import TritonModel

            with TritonModel(triton.url, self.model) as model:
                yield model

        def fixture(name, function):
            return pytest.fixture(function, scope="module", name=name)

        in_process = self.settings_class
        return (
            fixture("triton", triton),
            fixture("control", control),
            fixture("service", lambda repo, triton: (
                yield from serve(lambda: self.settings(repo, triton, **self.service_options)))),
            # The in-process backend serving the same exported directory.
            fixture("in_process", lambda repo: (
                yield from serve(lambda: in_process(model_dir=str(repo / self.model / "1"), port=0)))),
            fixture("stub", lambda service: (yield from stub_on(service, self.stub_class))),
            fixture("models_stub", lambda service: (yield from stub_on(service, common_pb2_grpc.ModelServiceStub))),
            fixture("in_process_stub", lambda in_process: (yield from stub_on(in_process, self.stub_class))),
        )


# -- half precision ----------------------------------------------------------------

# Relative rounding error of one rounding to nearest: half a unit in the last
# place of a significand of 8 bits (bfloat16) or 11 (float16).
UNIT_ROUNDOFF = {"bfloat16": 2.0**-9, "float16": 2.0**-12}


def head_tolerance(head, dtype: str, roundings: int = 8) -> float:
    """How far a half-precision forward may move an output read off a linear
    ``head`` (rows w) over the final layer-normed hidden state h. Each output
    is w.h; a relative error u in w, in h or in the result moves it by at
    most u * |w| * |h| (Cauchy-Schwarz). |h| = sqrt(width): an untrained
    LayerNorm (gain 1, bias 0) gives unit variance. ``roundings`` counts the
    roundings allowed to pile up: the weights', the result's, and h's through
    the residual stream of the tiny models' two blocks (attention, MLP, two
    LayerNorms each, plus the final one: about six)."""
    width = head.shape[-1]
    return roundings * UNIT_ROUNDOFF[dtype] * float(head.detach().float().norm(dim=-1).max()) * math.sqrt(width)


# -- test certificates ----------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(pki: Path, name: str, ca: str, extensions: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=pki)
    (pki / f"{name}.ext").write_text(extensions + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=pki)


def make_pki(path: Path) -> Path:
    """Certificates in ``path`` (NAME.pem, NAME.key), made with the openssl
    command: CAs 'ca' and 'rogue'; 'server' (for 127.0.0.1 and localhost)
    and 'client' signed by 'ca'; 'intruder', a client signed by 'rogue'."""
    for ca in ("ca", "rogue"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
                 f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}", cwd=path)
    _issue(path, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    _issue(path, "client", "ca", "extendedKeyUsage=clientAuth")
    _issue(path, "intruder", "rogue", "extendedKeyUsage=clientAuth")
    return path
