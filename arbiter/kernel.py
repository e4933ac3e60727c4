"""The versioned-model kernel: what the reward, reference and policy services
share about holding models, so ``ModelService`` behaves the same on all three.

A service's engine owns one ``ModelKernel`` and gives it a ``ModelSpec``: how
to load (and validate) one version of its kind, how a version runs a batch
(the reward and reference kinds put a ``DynamicBatcher`` in front of it; the
policy schedules generation itself), and what makes a new version a drop-in
replacement for the serving one. The kernel owns the rest, once:

- **Loading**: one load at a time (each holds a full copy of the weights), on
  a thread of its own so serving goes on; a label that is already loaded is
  refused before any weights are read; a version that fails to load, to
  validate or to match the serving one is released and nothing changes. A
  load, once started, is carried out even if its caller goes away (the
  caller can see the outcome in the version list). A batched kind's version
  measures its batch caps (``DynamicBatcher.calibrate``) before it serves.
- **Load timeout**: a load still running after ``load_timeout_s`` fails
  (``LoadTimeout``) and the next load may start. Python cannot interrupt a
  thread blocked in a read (a FIFO, a hung network filesystem), so the
  thread is abandoned, not stopped: it is a daemon (it never holds up the
  process's exit), and if it ever finishes, the version it loaded is
  released, never served. Until then it keeps whatever it had read.
- **Activation** swaps one pointer (``arbiter.versions.ModelVersions``): a
  request takes its version once and keeps it to its end, so it never mixes
  two versions; in-flight requests finish on the version they started with.
- **Unloading** refuses the active version; the version's batcher drains what
  it queued, then its backend is released (for Triton: unloaded there).
- **Eviction**: with ``max_loaded_versions``, loading past the limit unloads
  the oldest inactive versions, exactly as ``UnloadModelVersion`` would.
- **Compatibility**: the spec's ``check_compatible`` refuses a version that
  cannot replace the serving one (the policy and the reference: the same
  tokenizer and architecture; reward versions may change both, since the
  service tokenizes text with each version's own tokenizer).
- **Observers** hear of every load, activation and removal (metrics, drift
  monitors, the reward service's shadow scoring).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any, Generic, Protocol, TypeVar

from arbiter.backends import BackendConfig
from arbiter.batching import BatchingConfig, BatchObserver, DynamicBatcher, ItemShape
from arbiter.errors import FailedPrecondition, LoadTimeout
from arbiter.types import ModelInfo
from arbiter.versions import ModelVersions

log = logging.getLogger(__name__)


class ServedModel(Protocol):
    info: ModelInfo

    def release(self) -> None: ...


M = TypeVar("M", bound=ServedModel)

# A version's batch function and how many batches it may have outstanding
# (more than one only for a remote backend, whose function is a coroutine).
BatchFunction = tuple[Callable[[list], Sequence[Any]] | Callable[[list], Awaitable[Sequence[Any]]], int]


@dataclass(frozen=True)
class ModelSpec(Generic[M]):
    kind: str
    # (path, version label or None) -> a loaded, validated version. Blocking.
    load: Callable[[str, str | None], M]
    # The function a version's batcher runs; None: the kind batches itself.
    batch: Callable[[M], BatchFunction] | None = None
    # (new, serving) -> raises ModelLoadError unless new can replace serving.
    check_compatible: Callable[[M, M], None] | None = None
    # How the batcher sizes a version's items and makes calibration items;
    # None: every item counts alike and the batch cap is not measured.
    items: Callable[[M], ItemShape] | None = None
    # The clock a version's batcher times its forward passes with (the
    # batch sizes are chosen from those times); None: wall time.
    clock: Callable[[M], Callable[[], float]] | None = None


@dataclass(frozen=True)
class KernelConfig:
    # The batchers' settings (queue delay resolved for the backend); unused
    # when the spec has no batch function.
    batching: BatchingConfig = BatchingConfig()
    # Loaded versions kept; loading past it unloads the oldest inactive. 0: no limit.
    max_loaded_versions: int = 3
    # A load still running after this long fails and is abandoned.
    load_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.max_loaded_versions < 0:
            raise ValueError(f"max_loaded_versions must be >= 0, got {self.max_loaded_versions}")
        if not self.load_timeout_s > 0:
            raise ValueError(f"load_timeout_s must be > 0, got {self.load_timeout_s}")


@dataclass(frozen=True)
class EngineConfig:
    """What every batched model engine (reward, reference) is configured
    with; each adds its own request limits."""

    batching: BatchingConfig = BatchingConfig()
    # Caps the model's own limit (never raises it).
    max_tokens: int | None = None
    # Where forward passes run: in-process torch (default) or Triton.
    backend: BackendConfig = BackendConfig()
    # Loaded versions kept (0: no limit).
    max_loaded_versions: int = 3
    load_timeout_s: float = 600.0

    def kernel_config(self) -> KernelConfig:
        return KernelConfig(self.batching.for_backend(self.backend.kind), self.max_loaded_versions,
                            self.load_timeout_s)


class VersionObserver:
    """Hooks on version changes; override what you need. Called on the event loop."""

    def on_version_loaded(self, model: Any) -> None:
        pass

    def on_version_activated(self, version: str, previous: str | None) -> None:
        pass

    def on_version_removed(self, version: str) -> None:
        pass

    def on_versions_changed(self, active: str | None, loaded: list[str], removed: list[str]) -> None:
        pass


@dataclass
class LoadedVersion(Generic[M]):
    model: M
    batcher: DynamicBatcher | None
    # The thread relaying this version's batches to a model process of its
    # own (None: it shares the kernel's model thread).
    relay: concurrent.futures.ThreadPoolExecutor | None = None

    async def close_batcher(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        if self.relay is not None:
            self.relay.shutdown(wait=False)

    async def run(self, items: Sequence[Any]) -> list:
        """Results for ``items`` through this version's batcher."""
        if self.batcher is None:
            raise TypeError(f"model kind {self.model.info.kind!r} has no batcher")
        return await self.batcher.submit(items)


class ModelKernel(Generic[M]):
    def __init__(
        self,
        spec: ModelSpec[M],
        config: KernelConfig,
        *,
        executor: Executor,
        loader: Executor,
        batch_observer: BatchObserver | None = None,
    ):
        self.spec = spec
        self.config = config
        self._executor = executor
        self._loader = loader
        self._batch_observer = batch_observer
        self._versions: ModelVersions[LoadedVersion[M]] = ModelVersions()
        self._observers: list[VersionObserver] = []
        self._load_lock = asyncio.Lock()
        self._loads: set[asyncio.Task] = set()
        # Versions a service's configuration uses (a reward spec): never
        # evicted or unloaded. version -> why, for the refusal.
        self._pinned: dict[str, str] = {}

    @property
    def executor(self) -> Executor:
        """The model thread: every version's forward passes, one at a time."""
        return self._executor

    def add_observer(self, observer: VersionObserver) -> None:
        self._observers.append(observer)

    # -- queries ----------------------------------------------------------

    @property
    def active_version(self) -> str | None:
        return self._versions.active_version

    def get(self, version: str = "") -> LoadedVersion[M]:
        """The entry of ``version`` (empty: the active one), or VersionNotFound."""
        return self._versions.get(version)

    def info(self, version: str = "") -> ModelInfo:
        info = self._versions.get(version).model.info
        return replace(info, active=self._versions.is_active(info.version))

    def list_versions(self) -> list[ModelInfo]:
        return [self.info(version) for version in self._versions.versions()]

    # -- changes ----------------------------------------------------------

    def pin(self, versions, reason: str) -> None:
        """Keep ``versions`` loaded: eviction skips them and unloading them is
        refused with ``reason`` (what uses them)."""
        self._pinned.update(dict.fromkeys(versions, reason))

    def unpin(self, versions) -> None:
        """``versions`` may be evicted or unloaded again (the next load evicts past the limit)."""
        for version in versions:
            self._pinned.pop(version, None)

    async def load_version(self, path: str, version: str = "", activate: bool = True) -> ModelInfo:
        """Load, validate and register a version; activate it when asked (or
        when nothing is active yet). Returns its info. The load goes on if
        the caller is cancelled (one load at a time, never two copies read
        at once because a client gave up and retried)."""
        task = asyncio.get_running_loop().create_task(self._load_version(path, version, activate))
        self._loads.add(task)
        task.add_done_callback(self._load_done)
        return await asyncio.shield(task)

    def _load_done(self, task: asyncio.Task) -> None:
        self._loads.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Read here too, for a caller that went away (it is still raised to a caller that waits).
            log.debug("%s load failed: %s", self.spec.kind, task.exception())

    async def _load_version(self, path: str, version: str, activate: bool) -> ModelInfo:
        loop = asyncio.get_running_loop()
        async with self._load_lock:
            if version and version in self._versions.versions():
                raise FailedPrecondition(
                    f"model version {version!r} is already loaded; unload it first or pick another version label"
                )
            model = await self._read(path, version or None)
            relay = None
            try:
                if self.spec.check_compatible is not None and self._versions.active_version is not None:
                    self.spec.check_compatible(model, self._versions.get().model)
                relay = self._relay(model)
                entry = LoadedVersion(model, self._batcher(model, relay or self._executor), relay)
                if entry.batcher is not None:
                    # Each version (and so each swap) measures its own batch caps.
                    await entry.batcher.calibrate()
                previous = self._versions.add(model.info.version, entry, activate)
            except BaseException:
                if relay is not None:
                    relay.shutdown(wait=False)
                await loop.run_in_executor(self._loader, model.release)
                raise
            label = model.info.version
            if entry.batcher is not None:
                entry.batcher.report_caps()
            for observer in self._observers:
                observer.on_version_loaded(model)
            if self._versions.is_active(label) and previous != label:
                for observer in self._observers:
                    observer.on_version_activated(label, previous)
            removed = await self._evict(keep=label)
            self._changed(removed)
            return self.info(label)

    def activate(self, version: str) -> tuple[ModelInfo, str | None]:
        previous = self._versions.activate(version)
        for observer in self._observers:
            observer.on_version_activated(version, previous)
        self._changed([])
        return self.info(version), previous

    async def unload(self, version: str) -> None:
        if version in self._pinned:
            raise FailedPrecondition(f"model version {version!r} is {self._pinned[version]}; it stays loaded")
        entry = self._versions.remove(version)
        await self._drop(version, entry)
        self._changed([version])

    async def close(self) -> None:
        """Stop serving: batchers drain what they queued; a load in progress
        is abandoned. Versions stay loaded in a remote backend (Triton),
        where a restarting service or its other replicas keep using them."""
        for task in list(self._loads):
            task.cancel()
        for _, entry in self._versions.items():
            await entry.close_batcher()

    # -- internals ----------------------------------------------------------

    async def _read(self, path: str, version: str | None) -> M:
        """``spec.load`` on a daemon thread of its own, awaited up to the load
        timeout; past it (or if cancelled) the thread is abandoned and what it
        loads, if it ever finishes, is released."""
        outcome: concurrent.futures.Future = concurrent.futures.Future()
        outcome.set_running_or_notify_cancel()

        def run() -> None:
            try:
                outcome.set_result(self.spec.load(path, version))
            except BaseException as err:  # delivered to the awaiting side
                outcome.set_exception(err)

        threading.Thread(target=run, name=f"{self.spec.kind}-load", daemon=True).start()
        waited = asyncio.wrap_future(outcome)
        try:
            return await asyncio.wait_for(asyncio.shield(waited), self.config.load_timeout_s)
        except (TimeoutError, asyncio.CancelledError) as err:
            waited.add_done_callback(lambda f: f.cancelled() or f.exception())  # nothing left to raise it to
            outcome.add_done_callback(functools.partial(self._discard_abandoned, path))
            if isinstance(err, TimeoutError):
                raise LoadTimeout(
                    f"loading {path!r} did not finish within {self.config.load_timeout_s:g}s (load_timeout_s); it "
                    "was abandoned and nothing changed. A load blocks like this on a file that never delivers "
                    "its data (a FIFO, a hung network filesystem)"
                ) from None
            raise

    def _discard_abandoned(self, path: str, outcome: concurrent.futures.Future) -> None:
        """An abandoned load ended: never serve what it loaded."""
        if outcome.exception() is not None:
            log.warning("%s load of %r, abandoned earlier, failed: %s", self.spec.kind, path, outcome.exception())
            return
        log.warning("%s load of %r finished after it was abandoned; releasing it", self.spec.kind, path)
        try:
            outcome.result().release()
        except Exception:
            log.warning("releasing the abandoned %s load of %r failed", self.spec.kind, path, exc_info=True)

    def _relay(self, model: M) -> concurrent.futures.ThreadPoolExecutor | None:
        """A thread of its own for a version whose forward runs in a model
        process of its own: the kernel's one model thread keeps local
        forwards from sharing the cores, which a child's do not use, so
        another version's passes (an ensemble's members, a shadow) need not
        wait for this one's."""
        if self.spec.batch is None or not getattr(model, "runs_apart", False):
            return None
        return concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{self.spec.kind}-{model.info.version}-relay")

    def _batcher(self, model: M, executor: Executor) -> DynamicBatcher | None:
        if self.spec.batch is None:
            return None
        run_batch, max_in_flight = self.spec.batch(model)
        shape = self.spec.items(model) if self.spec.items is not None else None
        clock = {} if self.spec.clock is None else {"clock": self.spec.clock(model)}
        return DynamicBatcher(run_batch, self.config.batching, executor, self._batch_observer,
                              max_in_flight=max_in_flight, shape=shape, label=model.info.version, **clock)

    async def _evict(self, keep: str) -> list[str]:
        limit = self.config.max_loaded_versions
        removed: list[str] = []
        while limit and len(self._versions.versions()) > limit:
            # Oldest first: versions() is in load order.
            victims = [v for v in self._versions.versions()
                       if v != keep and not self._versions.is_active(v) and v not in self._pinned]
            if not victims:
                break
            entry = self._versions.remove(victims[0])
            await self._drop(victims[0], entry)
            removed.append(victims[0])
        return removed

    async def _drop(self, version: str, entry: LoadedVersion[M]) -> None:
        """Requests still running on the version hold their own reference and
        finish; its batcher drains, then the backend lets go."""
        await entry.close_batcher()
        for observer in self._observers:
            observer.on_version_removed(version)
        try:
            await asyncio.get_running_loop().run_in_executor(self._loader, entry.model.release)
        except Exception:  # the version is gone from this service either way
            log.warning("%s model version %r unloaded, but its backend did not release it", self.spec.kind, version,
                        exc_info=True)

    def _changed(self, removed: list[str]) -> None:
        loaded = self._versions.versions()
        for observer in self._observers:
            observer.on_versions_changed(self._versions.active_version, loaded, removed)
