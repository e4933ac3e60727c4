"""Server-side dynamic batching.

Concurrent requests are split into items and queued; one loop coalesces them
into model batches of up to ``max_batch_size`` items, waiting at most
``max_queue_delay_s`` after the oldest queued item arrived (Triton's policy).
The model runs on an executor thread, never on the event loop that serves RPCs.
A remote model (an async ``run_batch``, e.g. a Triton client) is awaited on the
loop instead, with up to ``max_in_flight`` batches outstanding so the network
round trip overlaps the server's compute.
A cancelled request (client cancel, deadline) cancels its futures, and
cancelled items are skipped when the next batch is formed, so they free their
slot instead of costing a forward pass.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Generic, Protocol, TypeVar

from arbiter.config import flag, require
from arbiter.errors import Overloaded, ShuttingDown

T = TypeVar("T")
R = TypeVar("R")


class BatchObserver(Protocol):
    def on_batch(self, size: int, seconds: float) -> None: ...

    def on_queue_depth(self, depth: int) -> None: ...


class _NullObserver:
    def on_batch(self, size: int, seconds: float) -> None:
        pass

    def on_queue_depth(self, depth: int) -> None:
        pass


# Arbiter-side queue delay by backend when none is set: Triton's own dynamic
# batcher does the waiting (waiting twice only adds latency; while Arbiter's
# batches are in flight, new items still accumulate into the next one).
DEFAULT_QUEUE_DELAY_MS = {"torch": 2.0, "triton": 0.0}


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = field(default=32, metadata=flag(help="items per model forward pass"))
    # None: the backend's default (DEFAULT_QUEUE_DELAY_MS).
    max_queue_delay_ms: float | None = field(default=None, metadata=flag(
        help="wait for a batch to fill (default: 2 ms in-process, 0 with Triton, which batches itself)"))
    # Items waiting, across all requests; beyond it requests get Overloaded.
    max_queue_size: int = field(default=4096, metadata=flag(help="items waiting across requests"))
    # Off: each request is run as its own batch(es), never merged with others.
    enabled: bool = field(default=True, metadata=flag("--no-dynamic-batching", help="run each request as its own batch"))

    def __post_init__(self) -> None:
        require(self.max_batch_size >= 1, "max_batch_size", "must be >= 1", self.max_batch_size)
        if self.max_queue_delay_ms is not None:
            require(self.max_queue_delay_ms >= 0, "max_queue_delay_ms", "must be >= 0 or unset",
                    self.max_queue_delay_ms)
        require(self.max_queue_size >= self.max_batch_size, "max_queue_size",
                f"must be >= max_batch_size ({self.max_batch_size})", self.max_queue_size)

    def for_backend(self, backend: str) -> BatchingConfig:
        """With the queue delay resolved for ``backend`` when unset."""
        if self.max_queue_delay_ms is not None:
            return self
        return replace(self, max_queue_delay_ms=DEFAULT_QUEUE_DELAY_MS.get(backend, DEFAULT_QUEUE_DELAY_MS["torch"]))

    @property
    def max_queue_delay_s(self) -> float:
        delay = self.max_queue_delay_ms
        return (DEFAULT_QUEUE_DELAY_MS["torch"] if delay is None else delay) / 1000.0


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    enqueued_at: float


class DynamicBatcher(Generic[T, R]):
    """``run_batch(items) -> results`` (same length, same order) is called on
    ``executor``, or awaited when it is a coroutine function; ``submit`` awaits
    the results of its own items."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]] | Callable[[list[T]], Awaitable[Sequence[R]]],
        config: BatchingConfig,
        executor: Executor,
        observer: BatchObserver | None = None,
        max_in_flight: int = 1,
    ):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._run_batch = run_batch
        self._is_async = inspect.iscoroutinefunction(run_batch)
        # A local forward owns the cores: batches run one at a time.
        self._max_in_flight = max_in_flight if self._is_async else 1
        self._config = config
        self._executor = executor
        self._observer = observer or _NullObserver()
        self._queue: deque[_Pending[T]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._slot_freed: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._batch_tasks: set[asyncio.Task] = set()
        self._closed = False
        self._in_flight = 0

    @property
    def queue_depth(self) -> int:
        return sum(1 for p in self._queue if not p.future.done())

    async def submit(self, items: Sequence[T]) -> list[R]:
        if self._closed:
            raise ShuttingDown("the model version is being unloaded or the server is stopping; retry")
        if not items:
            return []
        if not self._config.enabled:
            return await self._run_unbatched(list(items))
        if self.queue_depth + len(items) > self._config.max_queue_size:
            raise Overloaded(
                f"queue is full ({self._config.max_queue_size} items waiting); retry with backoff"
            )
        loop = asyncio.get_running_loop()
        self._ensure_loop()
        now = loop.time()
        pending = [_Pending(item, loop.create_future(), now) for item in items]
        self._queue.extend(pending)
        self._observer.on_queue_depth(self.queue_depth)
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(p.future for p in pending)))
        except asyncio.CancelledError:
            for p in pending:
                p.future.cancel()
            raise

    async def _run_unbatched(self, items: list[T]) -> list[R]:
        loop = asyncio.get_running_loop()
        size = self._config.max_batch_size
        results: list[R] = []
        self._in_flight += 1
        try:
            for start in range(0, len(items), size):
                chunk = items[start : start + size]
                started = time.perf_counter()
                if self._is_async:
                    results.extend(await self._run_batch(chunk))
                else:
                    results.extend(await loop.run_in_executor(self._executor, self._run_batch, chunk))
                self._observer.on_batch(len(chunk), time.perf_counter() - started)
        finally:
            self._in_flight -= 1
        return results

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._slot_freed = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._batch_loop(), name="dynamic-batcher")

    def _drop_done(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    def _take_batch(self) -> list[_Pending[T]]:
        batch: list[_Pending[T]] = []
        while self._queue and len(batch) < self._config.max_batch_size:
            p = self._queue.popleft()
            if not p.future.done():
                batch.append(p)
        return batch

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self._config
        while True:
            # Wait for a free slot before forming a batch, so items that arrive
            # meanwhile join it instead of waiting for the one after.
            while self._is_async and self._in_flight >= self._max_in_flight:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            self._drop_done()
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = self._queue[0].enqueued_at + cfg.max_queue_delay_s
            while len(self._queue) < cfg.max_batch_size and not self._closed:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take_batch()
            self._observer.on_queue_depth(self.queue_depth)
            if not batch:
                continue
            if self._is_async:
                self._in_flight += 1
                task = loop.create_task(self._run_async_batch(batch), name="dynamic-batcher-batch")
                self._batch_tasks.add(task)
                task.add_done_callback(self._batch_tasks.discard)
                continue
            started = time.perf_counter()
            self._in_flight += 1
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, [p.item for p in batch])
            except Exception as err:
                _fail(batch, err)
                continue
            finally:
                self._in_flight -= 1
            self._observer.on_batch(len(batch), time.perf_counter() - started)
            _deliver(batch, results)

    async def _run_async_batch(self, batch: list[_Pending[T]]) -> None:
        started = time.perf_counter()
        try:
            results = await self._run_batch([p.item for p in batch])
        except Exception as err:
            _fail(batch, err)
            return
        finally:
            self._in_flight -= 1
            self._slot_freed.set()
        self._observer.on_batch(len(batch), time.perf_counter() - started)
        _deliver(batch, results)

    async def close(self) -> None:
        """Stop taking work, finish what is queued, then stop the loop."""
        self._closed = True
        if self._task is not None and not self._task.done():
            self._wakeup.set()
            await self._task
        while self._in_flight:
            await asyncio.sleep(0.01)


def _fail(batch: list[_Pending], err: Exception) -> None:
    """The model failed: this batch's requests fail, the batcher keeps serving."""
    for p in batch:
        if not p.future.done():
            p.future.set_exception(err)


def _deliver(batch: list[_Pending], results: Sequence) -> None:
    """Results to the requests still waiting (a cancelled one no longer is)."""
    for p, result in zip(batch, results, strict=True):
        if not p.future.done():
            p.future.set_result(result)
