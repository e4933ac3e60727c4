"""The in-process backend's forward passes in a child process of the service.

Why: in one process, the forward pass and everything else the service does
per request (gRPC, proto conversion, tokenizing, metrics) take turns on one
GIL, and a small model's forward is mostly Python (HF module calls), so the
handlers' work stretches every pass. Measured on 2 CPU cores (reward model,
16-token items, one torch thread), against the same service without it:
1.13x the items/s at 8 concurrent clients and 1.07x at 32, but 0.87-0.94x at
1 client, which pays two more hand-offs per request (README, "Model
processes"). vLLM's V1 engine moved its engine core out of the API server's
process for the same reason.

Each loaded version has its own child (``ModelProcessBackend``), started from
a fork server that has imported torch and transformers once, so a load costs
the weights' load, not another interpreter's imports. The child loads the
weights with the kind's own ``load_torch`` on the configured placement and
runs the kind's ``forward_torch``: the numbers are those of the in-process
backend. Tokenizing, validation, batching and versions stay in the service.

The fork server imports torch without initializing CUDA, so each child
sets up its own device context (a process forked after CUDA is initialized
cannot use it). The child is a daemon of the service and leaves when its
pipe closes, so a service that dies takes its children with it; it ignores
SIGINT (the service drains first, then stops it). A child that dies (killed,
out of memory) fails its batch with UNAVAILABLE and is started again on the
version's next batch.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from arbiter.backends import ModelKind
from arbiter.backends.placement import Placement
from arbiter.errors import ArbiterError, BackendError, BackendTimeout, BackendUnavailable, ModelLoadError
from arbiter.exits import describe_exit

log = logging.getLogger(__name__)

# What the fork server imports once, so that every child starts with them.
_PRELOAD = ["torch", "transformers", "arbiter.backends.model_process"]
_context_lock = threading.Lock()
_context: Any = None
# A child that does not leave within this after its pipe is closed is killed.
STOP_TIMEOUT_S = 10.0


def _fork_context():
    global _context
    with _context_lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(_PRELOAD)
            _context = context
        return _context


def _serve_model(conn, kind: ModelKind, root: str, base: str | None, placement: Placement, threads: int,
                 compile: bool) -> None:
    """The child: load, say ready (with what the parent needs to describe the
    version), then answer batches until the pipe closes."""
    import torch

    from arbiter.backends.placement import device_and_dtype

    # The service drains and stops its children; Ctrl-C in a terminal reaches the whole group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        model, tokenizer, config = kind.load_for_serving(Path(root), None if base is None else Path(base), placement,
                                                         compile)
        device, dtype = device_and_dtype(model)
        conn.send(("ready", (tokenizer, config, device, dtype, os.getpid())))
    except BaseException as err:  # noqa: BLE001 - every failure is the parent's to report
        conn.send(("error", _portable(err)))
        return
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        started = time.thread_time()
        try:
            results = kind.forward_torch(model, batch)
        except BaseException as err:  # noqa: BLE001
            conn.send(("error", _portable(err)))
            continue
        conn.send(("ok", (results, time.thread_time() - started)))


def _portable(err: BaseException) -> tuple[str, str]:
    """An exception as (class name in arbiter.errors or "", message): any
    exception pickles this way, whatever its constructor takes."""
    import arbiter.errors as errors

    name = type(err).__name__
    known = isinstance(err, ArbiterError) and getattr(errors, name, None) is type(err)
    return (name if known else "", str(err) if known else f"{type(err).__name__}: {err}")


def _rebuilt(portable: tuple[str, str], fallback: type[ArbiterError], where: str) -> ArbiterError:
    import arbiter.errors as errors

    name, message = portable
    cls = getattr(errors, name, None) if name else None
    try:
        if cls is not None and issubclass(cls, ArbiterError):
            return cls(message)
    except TypeError:  # a constructor with other arguments (InvalidInput)
        pass
    return fallback(f"{where}: {message}")


class ModelProcess:
    """One version's weights in a child process and the pipe to it; used from
    one thread at a time (the model thread), a lock makes sure."""

    def __init__(self, kind: ModelKind, root: Path, base: Path | None, placement: Placement,
                 timeout_s: float = 300.0, compile: bool = False):
        import torch

        self.kind = kind
        # A pass not answered within this is killed with its process (BackendTimeout).
        self.timeout_s = timeout_s
        self.root = str(root)
        self._base = None if base is None else str(base)
        self._placement = placement
        # Each child compiles its forward before it says ready (a restarted one too).
        self._compile = compile
        # The service's torch threads, for the child's passes.
        self.threads = torch.get_num_threads()
        self._lock = threading.Lock()
        self._conn = None
        self._process = None
        # Seconds of CPU the child's forward passes took, summed (the batcher's clock).
        self.cpu_seconds = 0.0
        self.tokenizer, self.config, self.device, self.dtype = self._start()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def alive(self) -> bool:
        process = self._process
        return process is not None and process.is_alive()

    def _start(self) -> tuple[Any, Any, str, str]:
        context = _fork_context()
        parent, child = context.Pipe()
        process = context.Process(
            target=_serve_model, args=(child, self.kind, self.root, self._base, self._placement, self.threads,
                                     self._compile),
            daemon=True, name=f"arbiter-{self.kind.name}-model")
        process.start()
        child.close()
        try:
            status, payload = parent.recv()
        except (EOFError, OSError):
            process.join(STOP_TIMEOUT_S)
            parent.close()
            raise ModelLoadError(f"the model process loading {self.root!r} {describe_exit(process.exitcode)} "
                                 "before it was ready") from None
        if status != "ready":
            process.join(STOP_TIMEOUT_S)
            parent.close()
            raise _rebuilt(payload, ModelLoadError, f"cannot load {self.root!r}")
        self._conn, self._process = parent, process
        # A version dropped without release() (a service stopped, not unloaded) still lets its child go.
        self._finalizer = weakref.finalize(self, parent.close)
        tokenizer, config, device, dtype, pid = payload
        log.info("%s model process %d serves %s", self.kind.name, pid, self.root)
        return tokenizer, config, device, dtype

    def forward(self, batch: list) -> list:
        with self._lock:
            if self._conn is None:
                # The last child died: this batch waits for a new one rather than failing too.
                log.warning("restarting the %s model process for %s", self.kind.name, self.root)
                try:
                    self._start()
                except ModelLoadError as err:
                    raise BackendUnavailable(f"the {self.kind.name} model process could not be restarted: {err}") \
                        from None
            try:
                self._conn.send(batch)
                if not self._conn.poll(self.timeout_s):
                    self._process.kill()
                    reason = self._lost()
                    raise BackendTimeout(
                        f"the {self.kind.name} model process for {self.root!r} did not finish this batch within "
                        f"{self.timeout_s:g}s (model_process_timeout_s); it was stopped ({reason}) and the next "
                        "batch starts a new one")
                status, payload = self._conn.recv()
            except (EOFError, OSError):
                reason = self._lost()
                raise BackendUnavailable(
                    f"the {self.kind.name} model process for {self.root!r} {reason} during this batch; it "
                    "restarts on the next one: retry") from None
        if status != "ok":
            raise _rebuilt(payload, BackendError, "the model's forward pass failed")
        results, cpu_seconds = payload
        self.cpu_seconds += cpu_seconds
        return results

    def _lost(self) -> str:
        self._finalizer.detach()
        process, self._process = self._process, None
        self._conn.close()
        self._conn = None
        process.join(STOP_TIMEOUT_S)
        return describe_exit(process.exitcode)

    def stop(self) -> None:
        """Close the pipe (the child leaves at its next read) and wait; kill a child that does not leave."""
        with self._lock:
            conn, process = self._conn, self._process
            self._conn = self._process = None
        if conn is None:
            return
        self._finalizer.detach()
        try:
            conn.send(None)
        except OSError:
            pass
        conn.close()
        process.join(STOP_TIMEOUT_S)
        if process.exitcode is None:
            log.warning("the %s model process %d did not stop; killing it", self.kind.name, process.pid)
            process.kill()
            process.join(STOP_TIMEOUT_S)


class ModelProcessBackend:
    """The in-process backend's contract over a ``ModelProcess``."""

    name = "torch"
    # Its forward passes use the child's cores, not the service's (ModelKernel gives it a relay thread).
    own_process = True

    def __init__(self, process: ModelProcess, info):
        self.process = process
        self.tokenizer = process.tokenizer
        self.info = info

    def forward(self, batch: list) -> list:
        return self.process.forward(batch)

    def batch_clock(self):
        """The child's CPU time in forward passes when it runs them on one
        thread of a CPU (what a batch size costs there, as the in-process
        backend's clock); else wall time, the pipe included."""
        if self.process.device == "cpu" and self.process.threads == 1:
            return lambda: self.process.cpu_seconds
        return time.perf_counter

    def release(self) -> None:
        self.process.stop()
