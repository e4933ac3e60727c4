"""Server-side dynamic batching.

Concurrent requests are split into items and queued; one loop coalesces them
into model batches. The model runs on an executor thread, never on the event
loop that serves RPCs.

- **An idle model runs at once.** A local model runs one batch at a time:
  when it is free, whatever is queued (up to the cap) goes now; items that
  arrive while a batch runs wait for it and form the next batch. A lone
  caller therefore never pays a queue delay: its item, finding the model
  idle and nothing queued, runs at once as batching off would. The next
  batch is formed on the model thread the moment a pass ends, not on the
  event loop: the loop is then answering the callers just served and holds
  the GIL a waking model thread would wait for (measured: ~1.3 ms of idle
  model between batches of 16-token items at 8 clients on 2 cores, 0.2 ms
  once the model thread forms them).
- **A remote model** (an async ``run_batch``, e.g. a Triton client) is awaited
  on the loop with up to ``max_in_flight`` batches outstanding, so the network
  round trip overlaps the server's compute. While a batch is in flight, the
  next one waits up to ``max_queue_delay_ms`` to fill; with none in flight it
  goes at once.
- **The cap is measured, per length** (``batch_size_policy=auto``): which
  batch size gives the most items/s depends on the hardware and on the
  sequence length (on a CPU a padded batch of 32 long items can be slower per
  item than batches of 2; on a GPU the opposite), so no fixed number is right
  everywhere. ``BatchSizer`` keeps, per length bucket (powers of two of
  tokens) and batch size, the seconds per token of the items: measured by a
  short calibration when the version loads (``DynamicBatcher.calibrate``),
  then refined from the batches actually served (whose padding counts
  against them), with a batch one size above or below the cap now and then
  to keep the neighbours' figures current. The cap of a bucket is the
  smallest size within 1 % of the best. Passes are timed on the model
  thread, by the backend's clock (CPU time of a pass on one CPU thread). ``max_batch_size`` is the upper
  bound; ``fixed`` always uses it. A remote backend batches again on its
  side (Triton's own dynamic batcher), so it always gets the bound. The caps
  are exported as ``arbiter_batch_size_cap{service,model_version,tokens}``.
- **Items of like length share a batch**: a batch is the oldest item plus the
  queued items closest to it in length, no item in it shorter than half the
  longest (items up to ``MIN_BUCKET_TOKENS`` count as that long: there, the
  fixed cost of a forward pass dominates), so batches carry little padding.

A cancelled request (client cancel, deadline) cancels its futures, and
cancelled items are skipped when the next batch is formed, so they free their
slot instead of costing a forward pass.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Generic, Protocol, TypeVar

from arbiter.config import flag, require, require_choice
from arbiter.errors import Overloaded, ShuttingDown

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatchObserver(Protocol):
    def on_batch(self, size: int, seconds: float) -> None: ...

    def on_queue_depth(self, depth: int) -> None: ...

    def on_batch_cap(self, model_version: str, tokens: int, cap: int) -> None: ...


class _NullObserver:
    def on_batch(self, size: int, seconds: float) -> None:
        pass

    def on_queue_depth(self, depth: int) -> None:
        pass

    def on_batch_cap(self, model_version: str, tokens: int, cap: int) -> None:
        pass


# Arbiter-side queue delay by backend when none is set. Only a remote model
# waits (while a batch is in flight with slots to spare); Triton's own dynamic
# batcher does the waiting there (waiting twice only adds latency; while
# Arbiter's batches are in flight, new items still accumulate into the next
# one). An in-process model never waits: idle, it runs what came at once;
# busy, what comes forms its next batch.
DEFAULT_QUEUE_DELAY_MS = {"torch": 2.0, "triton": 0.0}
BATCH_SIZE_POLICIES = ("auto", "fixed")


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = field(default=32, metadata=flag(
        help="items per model forward pass (with --batch-size-policy auto: the most it may choose)"))
    # auto: the cap is measured per model version and item length (BatchSizer);
    # fixed: always max_batch_size.
    batch_size_policy: str = field(default="auto", metadata=flag(
        choices=BATCH_SIZE_POLICIES,
        help="auto: measure the best batch size per model version and item length, up to --max-batch-size; "
             "fixed: always --max-batch-size"))
    # None: the backend's default (DEFAULT_QUEUE_DELAY_MS). Only waited while
    # a batch is in flight at a remote backend: an idle model runs at once.
    max_queue_delay_ms: float | None = field(default=None, metadata=flag(
        help="with --backend triton, how long the next batch waits to fill while one is in flight (default 0: "
             "Triton batches itself); an in-process model never waits: idle, it runs a request at once"))
    # Forward-pass time a new version spends measuring batch sizes before it
    # serves (auto policy); what it leaves unmeasured, served batches measure.
    batch_calibration_s: float = field(default=0.5, metadata=flag(
        help="forward-pass time a loading version spends measuring batch sizes (--batch-size-policy auto; "
             "0: learn only from served batches)"))
    # Items waiting, across all requests; beyond it requests get Overloaded.
    max_queue_size: int = field(default=4096, metadata=flag(help="items waiting across requests"))
    # Off: each request is run as its own batch(es), never merged with others.
    enabled: bool = field(default=True, metadata=flag("--no-dynamic-batching", help="run each request as its own batch"))

    def __post_init__(self) -> None:
        require(self.max_batch_size >= 1, "max_batch_size", "must be >= 1", self.max_batch_size)
        require_choice(self.batch_size_policy, "batch_size_policy", BATCH_SIZE_POLICIES)
        require(self.batch_calibration_s >= 0, "batch_calibration_s", "must be >= 0 (0: no calibration)",
                self.batch_calibration_s)
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


@dataclass(frozen=True)
class ItemShape(Generic[T]):
    """How a batcher sees its kind's items: ``tokens(item)``, the tokens the
    forward pass reads for it (called once per submitted item: keep it cheap),
    and ``sample(tokens)``, an item of that many tokens to calibrate with."""

    tokens: Callable[[T], int]
    sample: Callable[[int], T]
    # The longest item the model takes (ModelInfo.max_tokens).
    max_tokens: int


# Items up to this long share one length bucket: the fixed cost of a forward
# pass dominates there, so padding them to one another costs little.
MIN_BUCKET_TOKENS = 16
# A size within this fraction of the best items/s counts as good as the best;
# the smallest such size is the cap (lower latency at the same throughput).
# Kept small: a saturated service runs at the cap, so every per cent given
# away here is a per cent of its throughput (on a CPU, batches of 8 short
# items cost ~5 % more per item than batches of 32); the noise a wider band
# absorbed is small now that a forward pass on one CPU thread is timed by
# that thread's CPU time (``arbiter.backends.inprocess``).
CAP_TOLERANCE = 0.01
# A size's served figure is the median of its last this many batches: one
# slow batch (a garbage collection, a co-tenant's burst, a GPU library's
# first call at a new shape) moves it for at most one batch (not at all once
# the size has 2 figures), while a lasting change shows within 3 batches.
OBSERVED_WINDOW = 5
# A batch counts as a grid size when it holds at least this fraction of it.
RECORDED_FILL = 0.8
# Every this many batches of a bucket with enough like items waiting, one is
# formed a size above or below the cap (alternately).
EXPLORE_EVERY = 16
# Batches are formed from this many caps' worth of the oldest queued items
# (bounds the work of forming one under a long queue).
SCAN_WINDOW = 16
# A calibration cell (one size at one length) is skipped once a forward pass
# there would take longer than this (estimated from the smaller size).
CALIBRATION_MAX_BATCH_S = 0.5


def _grid(limit: int, start: int) -> list[int]:
    """start, 2*start, 4*start, ... below limit, then limit itself."""
    values, value = [], start
    while value < limit:
        values.append(value)
        value *= 2
    values.append(limit)
    return values


class BatchSizer:
    """The batch cap per length bucket, from seconds per token measured per
    (bucket, batch size). Pure bookkeeping: ``DynamicBatcher`` feeds it.

    Calibration figures give the curve's shape; the batches served give its
    level: a size never served is estimated as its calibration figure times
    the bucket's ratio of served to calibrated figures, so the two sources
    compare fairly (served batches carry real lengths and real contention)."""

    def __init__(self, max_batch_size: int, max_tokens: int, auto: bool = True):
        self.auto = auto
        self.max_batch_size = max_batch_size
        self.sizes = _grid(max_batch_size, 1)
        self._index_of = [0] + [self._nearest(size) for size in range(1, max_batch_size + 1)]
        self.lengths = _grid(max_tokens, MIN_BUCKET_TOKENS) if max_tokens > MIN_BUCKET_TOKENS else [max_tokens]
        shape = (len(self.lengths), len(self.sizes))
        self._calibrated: list[list[float | None]] = [[None] * shape[1] for _ in range(shape[0])]
        self._observed: list[list[float | None]] = [[None] * shape[1] for _ in range(shape[0])]
        self._recent = [[deque(maxlen=OBSERVED_WINDOW) for _ in range(shape[1])] for _ in range(shape[0])]
        # Per bucket: the number of sizes that can run (a failed size and all above it cannot).
        self._feasible = [shape[1]] * shape[0]
        self._turns = [0] * shape[0]
        self._caps = [self._choose(b) for b in range(shape[0])]

    # -- lookups -----------------------------------------------------------

    def bucket(self, tokens: int) -> int:
        """The index of the shortest length bucket holding ``tokens``."""
        for i, length in enumerate(self.lengths):
            if tokens <= length:
                return i
        return len(self.lengths) - 1

    def cap(self, tokens: int) -> int:
        return self._caps[self.bucket(tokens)]

    def caps(self) -> dict[int, int]:
        """{bucket's longest item in tokens: cap}."""
        return dict(zip(self.lengths, self._caps, strict=True))

    def size_for(self, tokens: int, waiting: int) -> int:
        """How many of ``waiting`` like items the next batch takes: up to the
        cap; but the size above it if that many are waiting and no batch that
        large was served at this length yet (calibration on a busy machine
        may have misjudged it), or a larger size nothing was measured for at
        this length (calibration's budget ran out before it, or it stopped on
        a plateau: on a CPU, 4 and 8 sequences of 96 tokens can cost the same
        per item and 16 less); and else every ``EXPLORE_EVERY``-th time the
        size above or below it when that many are waiting, so that their
        figures follow the load and the cap can move."""
        bucket = self.bucket(tokens)
        cap = self._caps[bucket]
        if not self.auto:
            return min(cap, waiting)
        index = self.sizes.index(cap)
        above = index + 1 if index + 1 < self._feasible[bucket] and self.sizes[index + 1] <= waiting else None
        below = index - 1 if index > 0 and self.sizes[index - 1] < waiting else None
        if above is not None and not self.observed(bucket, above):
            return self.sizes[above]
        for larger in range(index + 2, self._feasible[bucket]):
            if self.sizes[larger] > waiting:
                break
            if self._calibrated[bucket][larger] is None and not self.observed(bucket, larger):
                return self.sizes[larger]
        if above is None and below is None:
            return min(cap, waiting)
        self._turns[bucket] += 1
        turn = self._turns[bucket] % EXPLORE_EVERY
        if turn == 0 and above is not None:
            return self.sizes[above]
        if turn == EXPLORE_EVERY // 2 and below is not None:
            return self.sizes[below]
        return min(cap, waiting)

    # -- measurements --------------------------------------------------------

    def record(self, size: int, longest: int, seconds: float, tokens: int | None = None,
               calibration: bool = False) -> list[tuple[int, int]]:
        """A batch of ``size`` items, the longest ``longest`` tokens, together
        ``tokens`` (default: all as long as the longest), took ``seconds``;
        returns the (bucket length, cap) pairs that changed. The figure is
        per token of the items, so a size that carries more padding in the
        traffic served pays for it. A batch counts for the grid size it
        (nearly) fills, 26 to 32 items for 32: one further below says how many
        items were left more than what the size costs."""
        index = self._size_index(size) if size >= 1 else 0
        if not self.auto or seconds <= 0 or not RECORDED_FILL * self.sizes[index] <= size <= self.sizes[index]:
            return []
        bucket = self.bucket(longest)
        cost = seconds / max(tokens if tokens is not None else size * longest, 1)
        compared = self._compares(bucket)
        if calibration:
            self._calibrated[bucket][index] = cost
        else:
            recent = self._recent[bucket][index]
            recent.append(cost)
            self._observed[bucket][index] = statistics.median(recent)
        if compared and self._choose(bucket) == self._caps[bucket]:
            # Other lengths only follow this one's cap, or its first comparable figures.
            return []
        return self._update()

    def record_failure(self, size: int, tokens: int) -> list[tuple[int, int]]:
        """A batch this large (e.g. out of memory) failed at this length:
        never that large again here, nor at longer lengths."""
        if not self.auto:
            return []
        bucket, index = self.bucket(tokens), self._size_index(size)
        for b in range(bucket, len(self.lengths)):
            self._feasible[b] = max(1, min(self._feasible[b], index))
        return self._update()

    def observed(self, bucket: int, index: int) -> bool:
        """Whether batches of this size have been served at this length."""
        return self._observed[bucket][index] is not None

    def feasible(self, bucket: int, index: int) -> bool:
        return index < self._feasible[bucket]

    # -- internals -----------------------------------------------------------

    def _size_index(self, size: int) -> int:
        """The grid size nearest ``size`` in ratio (a batch of 31 counts as 32);
        looked up for sizes up to the bound (every served batch asks)."""
        if size < len(self._index_of):
            return self._index_of[size]
        return self._nearest(size)

    def _nearest(self, size: int) -> int:
        return min(range(len(self.sizes)), key=lambda i: (abs(math.log2(self.sizes[i] / size)), i))

    def _estimates(self, bucket: int) -> list[float | None]:
        calibrated, observed = self._calibrated[bucket], self._observed[bucket]
        ratios = [o / c for c, o in zip(calibrated, observed, strict=True) if c is not None and o is not None]
        level = sum(ratios) / len(ratios) if ratios else 1.0
        return [
            (o if o is not None else c * level if c is not None else None) if i < self._feasible[bucket] else None
            for i, (c, o) in enumerate(zip(calibrated, observed, strict=True))
        ]

    def _choose(self, bucket: int) -> int:
        if not self.auto:
            return self.max_batch_size
        known = self._known(bucket)
        if len(known) >= 2:
            best = min(cost for cost, _ in known)
            return self.sizes[min(i for cost, i in known if cost <= best * (1 + CAP_TOLERANCE))]
        # Too little measured at this length to compare sizes: the nearest
        # such length's tokens per batch (what fits a cache or a device), at
        # this length; with none, the bound (what the fixed policy runs).
        for distance in range(1, len(self.lengths)):
            for other in (bucket - distance, bucket + distance):
                if 0 <= other < len(self.lengths) and len(self._known(other)) >= 2:
                    tokens = self._choose(other) * self.lengths[other]
                    wanted = max(1.0, tokens / self.lengths[bucket])
                    index = min(self._size_index(round(wanted)), self._feasible[bucket] - 1)
                    return self.sizes[index]
        return self.sizes[self._feasible[bucket] - 1]

    def _compares(self, bucket: int) -> bool:
        """Whether this length has figures for two sizes or more (cheap: every served batch asks)."""
        figures = zip(self._calibrated[bucket][: self._feasible[bucket]], self._observed[bucket])
        return sum(c is not None or o is not None for c, o in figures) >= 2

    def _known(self, bucket: int) -> list[tuple[float, int]]:
        """(estimate, size index) of the sizes with a figure at this length."""
        return [(cost, i) for i, cost in enumerate(self._estimates(bucket)) if cost is not None]

    def _update(self) -> list[tuple[int, int]]:
        changed = []
        for bucket in range(len(self.lengths)):
            cap = self._choose(bucket)
            if cap != self._caps[bucket]:
                self._caps[bucket] = cap
                changed.append((self.lengths[bucket], cap))
        return changed


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    enqueued_at: float
    tokens: int


def _span(tokens: int) -> float:
    """log2 of an item's length as batching compares it (short ones alike)."""
    return math.log2(max(tokens, MIN_BUCKET_TOKENS))


class DynamicBatcher(Generic[T, R]):
    """``run_batch(items) -> results`` (same length, same order) is called on
    ``executor``, or awaited when it is a coroutine function; ``submit`` awaits
    the results of its own items. ``shape`` gives items their lengths (without
    it every item counts as one token: no length grouping, no calibration);
    ``label`` names the model version in the cap metric; ``clock`` times
    batches (seconds)."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]] | Callable[[list[T]], Awaitable[Sequence[R]]],
        config: BatchingConfig,
        executor: Executor,
        observer: BatchObserver | None = None,
        max_in_flight: int = 1,
        shape: ItemShape[T] | None = None,
        label: str = "",
        clock: Callable[[], float] = time.perf_counter,
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
        self._shape = shape
        self._label = label
        self._clock = clock
        # A remote backend batches again itself: it gets the bound, as
        # configured; so do items without a shape (nothing to calibrate with).
        auto = config.batch_size_policy == "auto" and not self._is_async and shape is not None
        self.sizer = BatchSizer(config.max_batch_size, shape.max_tokens if shape else 1, auto=auto)
        self._queue: deque[_Pending[T]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._slot_freed: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._batch_tasks: set[asyncio.Task] = set()
        self._closed = False
        self._in_flight = 0
        self._reporting = False
        # A local model's queue is shared with the model thread, which forms
        # each next batch: the lock guards the queue and ``_in_flight``.
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set (on the loop) when a local model has nothing left to run.
        self._idle = asyncio.Event()

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return self._depth()

    def _depth(self) -> int:
        return sum(1 for p in self._queue if not p.future.done())

    @property
    def in_flight(self) -> int:
        """Batches handed to the model and not yet answered."""
        return self._in_flight

    async def submit(self, items: Sequence[T]) -> list[R]:
        if self._closed:
            raise ShuttingDown("the model version is being unloaded or the server is stopping; retry")
        if not items:
            return []
        if not self._config.enabled:
            return await self._run_unbatched(list(items))
        # The queue's length bounds its depth: the exact count (a walk) only near the limit.
        if (len(self._queue) + len(items) > self._config.max_queue_size
                and self.queue_depth + len(items) > self._config.max_queue_size):
            raise Overloaded(
                f"queue is full ({self._config.max_queue_size} items waiting); retry with backoff"
            )
        loop = self._loop = asyncio.get_running_loop()
        tokens = self._shape.tokens if self._shape else (lambda item: 1)
        now = loop.time()
        pending = [_Pending(item, loop.create_future(), now, tokens(item)) for item in items]
        if self._is_async:
            self._ensure_loop()
            if len(pending) == 1 and not self._in_flight and not self._queue:
                # Nothing out at the remote model: a lone item goes now.
                self._start_async_batch(pending)
            else:
                self._queue.extend(pending)
                self._observer.on_queue_depth(self.queue_depth)
                self._wakeup.set()
        else:
            # An idle model runs what is queued now (a lone item: as batching
            # off would); a busy one forms its next batch from the queue
            # itself, the moment the running one ends.
            self._start_next(finished=False, queued=pending)
        try:
            if len(pending) == 1:  # most callers: no gathering future to build and wake
                return [await pending[0].future]
            return list(await asyncio.gather(*(p.future for p in pending)))
        except asyncio.CancelledError:
            for p in pending:
                p.future.cancel()
            raise

    def _hand_to_model(self, batch: list[_Pending[T]], longest: int) -> None:
        try:
            self._executor.submit(self._serve, batch, longest)
        except RuntimeError:  # the executor was shut down: nothing will run again
            with self._lock:
                self._in_flight -= 1
                stranded = batch + list(self._queue)
                self._queue.clear()
            self._post(_fail, stranded, ShuttingDown("the model is shutting down; retry"))
            self._post(self._idle.set)

    def _serve(self, batch: list[_Pending[T]], longest: int) -> None:
        """On the model thread: run a batch; then form the next from what
        queued meanwhile and hand it on, before the results go to the loop.
        Forming it here rather than on the loop keeps the model busy: the
        loop thread, answering the callers just served, holds the GIL that a
        waking model thread needs. And this thread's bookkeeping is done
        before the loop wakes, so the two do not contend for the GIL then
        (a lone caller's answer would wait for it). The next batch goes
        through the executor, behind any other version's work queued there."""
        results: Sequence[R] | None = None
        error: Exception | None = None
        try:
            results, wall, cost = self._timed([p.item for p in batch])
        except Exception as err:
            error = err
        else:
            self._observer.on_batch(len(batch), wall)
            self._caps_changed(self.sizer.record(len(batch), longest, cost, sum(p.tokens for p in batch)))
        finally:
            started = self._start_next(finished=True)
            self._post(self._settle_batch, batch, results, error, not started)

    def _start_next(self, finished: bool, queued: Sequence[_Pending[T]] = ()) -> bool:
        """Queue ``queued``; then, if the model is free (or ``finished`` its
        batch just now), hand it the next batch from the queue. Whether one
        was started."""
        with self._lock:
            self._queue.extend(queued)
            if finished:
                self._in_flight -= 1
            batch, longest = self._take_batch() if not self._in_flight else ([], 0)
            if batch:
                self._in_flight += 1
            depth = self._depth()
        self._observer.on_queue_depth(depth)
        if batch:
            self._hand_to_model(batch, longest)
        return bool(batch)

    def _settle_batch(self, batch: list[_Pending[T]], results: Sequence[R] | None, error: Exception | None,
                      idle: bool) -> None:
        """On the loop: a batch's outcome to its callers."""
        if results is None:  # the pass raised (or was interrupted: the model thread is going away)
            _fail(batch, error or ShuttingDown("the model pass was interrupted; retry"))
        else:
            _deliver(batch, results)
        if idle:
            self._idle.set()

    def _post(self, callback: Callable, *args) -> None:
        """``callback(*args)`` on the loop, from the model thread."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody waits
            pass

    def _on_model_thread(self, items: list[T]) -> asyncio.Future:
        """``_timed(items)`` on the executor (calibration and unbatched
        requests); its outcome comes in the future returned, set from the
        model thread in one loop wake-up (``run_in_executor`` under
        ``shield`` chains three futures, each done-callback a trip through
        the loop). Cancelling the future does not stop the pass."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def work() -> None:
            try:
                outcome, error = self._timed(items), None
            except BaseException as err:  # delivered to the awaiting side, as run_in_executor does
                outcome, error = None, err
            try:
                loop.call_soon_threadsafe(_settle, future, outcome, error)
            except RuntimeError:  # the loop is closed: nobody waits
                pass

        self._executor.submit(work)
        return future

    def _timed(self, items: list[T]) -> tuple[Sequence[R], float, float]:
        """A local forward pass, its wall seconds and its cost by the
        batcher's clock, both taken on the model thread: the hand-offs to and
        from that thread (waiting for a core, then for the event loop; on a
        loaded machine often longer than the pass) say nothing about a batch
        size, and would be counted against it."""
        started, cost_started = time.perf_counter(), self._clock()
        results = self._run_batch(items)
        return results, time.perf_counter() - started, self._clock() - cost_started

    async def _timed_async(self, items: list[T]) -> tuple[Sequence[R], float, float]:
        """A remote forward pass and its round trip, which is what it costs here."""
        started, cost_started = time.perf_counter(), self._clock()
        results = await self._run_batch(items)
        return results, time.perf_counter() - started, self._clock() - cost_started

    async def calibrate(self) -> None:
        """Measure seconds per batch over the grid of sizes x lengths, each
        length from one item up until doubling the size stops paying (items/s
        up by less than ``CAP_TOLERANCE``), for up to ``batch_calibration_s``
        of forward passes (sizes left unmeasured are reached by the exploring batches as
        they are served). Runs on the model thread, one forward at a time,
        between the batches of versions already serving. A size that fails
        (out of memory, say) is never used at that length or longer ones.
        Reports nothing: ``report_caps`` does, once the version serves."""
        sizer = self.sizer
        budget_s = self._config.batch_calibration_s
        if not sizer.auto or not self._config.enabled or not budget_s:
            return
        spent = 0.0

        async def forward(size: int, tokens: int) -> float | None:
            nonlocal spent
            items = [self._shape.sample(tokens)] * size
            started = self._clock()
            try:
                _, _, elapsed = await self._on_model_thread(items)
                failed = None
            except Exception as err:
                failed, elapsed = err, self._clock() - started
            spent += elapsed
            if failed is not None:
                log.warning("calibrating %r: a batch of %d x %d tokens failed (%s); batches stay below that",
                            self._label, size, tokens, failed)
                sizer.record_failure(size, tokens)
                return None
            return elapsed

        await forward(1, sizer.lengths[0])  # warm-up: first passes allocate
        single: tuple[int, float] | None = None  # (tokens, seconds) of one item, at the last length measured
        for bucket, tokens in enumerate(sizer.lengths):
            tokens = min(tokens, self._shape.max_tokens)
            # Each length gets an equal share of what is left, so long ones
            # are measured too (at small sizes, where their best usually is).
            length_ends_at = spent + (budget_s - spent) / (len(sizer.lengths) - bucket)
            previous: tuple[int, float] | None = None  # (size, seconds) measured last at this length
            for index, size in enumerate(sizer.sizes):
                if not sizer.feasible(bucket, index):
                    break
                if previous is not None:
                    expected = previous[1] * size / previous[0]
                else:
                    expected = single[1] * tokens / single[0] if single is not None else 0.0
                if expected > CALIBRATION_MAX_BATCH_S or spent + expected > length_ends_at:
                    break
                seconds = await forward(size, tokens)
                if seconds is None:
                    break
                if size == 1 and (again := await forward(size, tokens)) is not None:
                    # One item, twice: the cheapest figure, which the others are predicted from.
                    seconds = min(seconds, again)

                def gains(seconds: float) -> bool:
                    """Whether items/s beat the size before by more than the cap's tolerance."""
                    return previous is None or seconds / size < (1 - CAP_TOLERANCE) * previous[1] / previous[0]

                if not gains(seconds):
                    # Measured again before it is believed: noise only ever adds time.
                    again = await forward(size, tokens)
                    seconds = seconds if again is None else min(seconds, again)
                sizer.record(size, tokens, seconds, calibration=True)
                if size == 1:
                    single = (tokens, seconds)
                if not gains(seconds):
                    # The knee: sizes above it are left to the exploring batches.
                    break
                previous = (size, seconds)
        log.info("batch caps of %r by item length (tokens: cap): %s, after %.2fs of calibration", self._label,
                 sizer.caps(), spent)

    def report_caps(self) -> None:
        """Tell the observer every length bucket's cap (later, each change);
        the kernel calls it once the version is registered."""
        if self._config.enabled:
            self._reporting = True
            self._caps_changed(list(self.sizer.caps().items()))

    def _caps_changed(self, changed: list[tuple[int, int]]) -> None:
        if not self._reporting:
            return
        for tokens, cap in changed:
            self._observer.on_batch_cap(self._label, tokens, cap)

    async def _run_unbatched(self, items: list[T]) -> list[R]:
        size = self._config.max_batch_size
        results: list[R] = []
        self._in_flight += 1
        try:
            for start in range(0, len(items), size):
                chunk = items[start : start + size]
                if self._is_async:
                    done, wall, _ = await self._timed_async(chunk)
                else:
                    done, wall, _ = await self._on_model_thread(chunk)
                results.extend(done)
                self._observer.on_batch(len(chunk), wall)
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

    def _take_batch(self) -> tuple[list[_Pending[T]], int]:
        """The oldest item and the queued items nearest it in length (none
        shorter than half the longest), as many as the sizer says; and the
        batch's longest item in tokens."""
        self._drop_done()
        if not self._queue:
            return [], 0
        anchor = self._queue[0]
        if len(self._queue) == 1:  # a lone caller: the common case at low load
            self._queue.clear()
            return [anchor], anchor.tokens
        centre = _span(anchor.tokens)
        # Nearest in length first; among equals, oldest first.
        window = itertools.islice(self._queue, 1, SCAN_WINDOW * self._config.max_batch_size)
        candidates = sorted(
            (abs(_span(p.tokens) - centre), order, p)
            for order, p in enumerate(window)
            if not p.future.done() and abs(_span(p.tokens) - centre) <= 1.0
        )
        size = self.sizer.size_for(anchor.tokens, 1 + len(candidates))
        batch, low, high = [anchor], _span(anchor.tokens), _span(anchor.tokens)
        longest = anchor.tokens
        for _, _, p in candidates:
            if len(batch) >= size:
                break
            span = _span(p.tokens)
            if max(high, span) - min(low, span) > 1.0:
                continue  # padding to the longest would more than double it
            if p.tokens > longest and len(batch) >= self.sizer.cap(p.tokens):
                continue  # the longer batch has a smaller cap
            batch.append(p)
            low, high, longest = min(low, span), max(high, span), max(longest, p.tokens)
        taken = {id(p) for p in batch}
        self._queue = deque(p for p in self._queue if id(p) not in taken and not p.future.done())
        return batch, longest

    async def _batch_loop(self) -> None:
        """A remote model's batches: formed on the loop, up to ``max_in_flight`` out."""
        loop = asyncio.get_running_loop()
        cfg = self._config
        while True:
            # Wait for a free slot before forming a batch, so items that arrive
            # meanwhile join it instead of waiting for the one after.
            while self._in_flight >= self._max_in_flight:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            self._drop_done()
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._in_flight:
                # With a batch in flight, the next may wait a little to fill;
                # with none, it goes now.
                await self._fill(loop, cfg.max_queue_delay_s)
            batch, _ = self._take_batch()
            self._observer.on_queue_depth(self.queue_depth)
            if batch:
                self._start_async_batch(batch)

    def _start_async_batch(self, batch: list[_Pending[T]]) -> None:
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run_async_batch(batch), name="dynamic-batcher-batch")
        self._batch_tasks.add(task)
        task.add_done_callback(self._batch_tasks.discard)

    async def _fill(self, loop: asyncio.AbstractEventLoop, delay_s: float) -> None:
        """Wait until the queue could fill a batch, a slot's worth of time
        after its oldest item arrived at most."""
        deadline = self._queue[0].enqueued_at + delay_s
        while len(self._queue) < self.sizer.cap(self._queue[0].tokens) and not self._closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    async def _run_async_batch(self, batch: list[_Pending[T]]) -> None:
        try:
            results, wall, _ = await self._timed_async([p.item for p in batch])
        except Exception as err:
            _fail(batch, err)
            return
        finally:
            self._in_flight -= 1
            self._slot_freed.set()
        self._observer.on_batch(len(batch), wall)
        _deliver(batch, results)

    async def close(self) -> None:
        """Stop taking work, finish what is queued, then stop the loop."""
        self._closed = True
        if self._task is not None and not self._task.done():
            self._wakeup.set()
            await self._task
        if not self._is_async and self._config.enabled:
            while True:
                with self._lock:
                    if not self._in_flight:  # the model thread ran the queue dry
                        break
                    # Cleared while the model thread cannot yet post the next set.
                    self._idle.clear()
                await self._idle.wait()
        while self._in_flight:  # requests run unbatched, or batches out at a remote model
            await asyncio.sleep(0.01)


def _settle(future: asyncio.Future, outcome, error: BaseException | None) -> None:
    """On the loop: a model-thread pass ended (``DynamicBatcher._on_model_thread``)."""
    if future.done():  # the caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(outcome)


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
