"""The worker's batches in flight between generation and commit.

The worker generates batch k+1 while batch k is being scored and its
reference log-probs computed, so the policy service is not idle while the
reward and reference services work. ``InFlight`` holds the batches taken
from the prompt source and not yet settled, oldest first (the worker lets
at most ``pipeline_depth`` in), runs each one's downstream part on a thread
of its own, and keeps the guarantees of one batch at a time:

- produced in order: batch k+1's scoring and reference overlap batch k's,
  but it is produced only once batch k was;
- settled in order: ``finished`` hands out only the oldest batch, once it is
  done, so the worker counts and commits batches in the order it took them
  and a commit never passes a batch still in flight;
- a batch that ends without being produced (a fatal error, or the worker
  stopped while it waited on a retry) drops every batch after it before they
  produce anything (``Dropped``): their prompts stay uncommitted, so the
  prompts topic hands them out again and none is produced twice.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from arbiter.types import Prompt
from services.worker.stages import Generation

Prepared = TypeVar("Prepared")
Done = TypeVar("Done")


class StageObserver(Protocol):
    """Told when a stage of a batch starts and ends (batches are numbered from
    0 in the order taken; stages: generate, score, reference, produce,
    commit). Called from the worker's threads: implementations must be
    thread-safe, and quick: a stage waits for its observer."""

    def stage_started(self, batch: int, stage: str) -> None: ...

    def stage_finished(self, batch: int, stage: str) -> None: ...


class NoObserver:
    def stage_started(self, batch: int, stage: str) -> None:
        pass

    def stage_finished(self, batch: int, stage: str) -> None:
        pass


class Dropped(Exception):
    """Not produced because an earlier batch was not."""


@dataclass(eq=False)
class Batch:
    """Prompts taken together: one Generate call's worth."""

    # 0, 1, ... in the order taken; -1 for a poll that brought no prompts (it
    # is settled in order all the same: it may commit skipped records).
    number: int
    prompts: list[Prompt]
    # Commits the prompts' offsets (topic source); called when settled.
    acknowledge: Callable[[], None]
    started: float = field(default_factory=time.perf_counter)
    generations: list[Generation] = field(default_factory=list)

    def versions(self) -> Counter[str]:
        """Samples generated per policy version."""
        return Counter(g.sample.policy_version for g in self.generations)


class InFlight(Generic[Prepared, Done]):
    """``submit(batch)`` runs ``prepare(batch)`` on a thread of its own, then,
    once the batch before it was produced, ``produce(batch, prepared)``.
    ``finished()`` yields the oldest batches that are done, in order, with
    their futures. Use as a context manager: leaving waits for the threads."""

    def __init__(self, depth: int, prepare: Callable[[Batch], Prepared], produce: Callable[[Batch, Prepared], Done]):
        self.depth = depth
        self._prepare = prepare
        self._produce = produce
        # One thread per batch in flight: the worker admits at most depth.
        self._threads = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="rollout-batch")
        self._queue: deque[tuple[Batch, Future[Done]]] = deque()
        # The last batch submitted, settled or not: the next one is produced after it.
        self._last: Future[Done] | None = None
        self._next_number = 0

    def __len__(self) -> int:
        return len(self._queue)

    def __enter__(self) -> InFlight[Prepared, Done]:
        return self

    def __exit__(self, *exc: object) -> None:
        self._threads.shutdown(wait=True)

    def new_batch(self, prompts: list[Prompt], acknowledge: Callable[[], None]) -> Batch:
        if not prompts:
            return Batch(-1, prompts, acknowledge)
        batch = Batch(self._next_number, prompts, acknowledge)
        self._next_number += 1
        return batch

    def submit(self, batch: Batch) -> None:
        future = self._threads.submit(self._finish, batch, self._last)
        self._queue.append((batch, future))
        self._last = future

    def add_failed(self, batch: Batch, error: BaseException) -> None:
        """A batch that failed before it was submitted (in generate): the
        batches after it are dropped like after any other failure."""
        future: Future[Done] = Future()
        future.set_exception(error)
        self._queue.append((batch, future))
        self._last = future

    def _finish(self, batch: Batch, previous: Future[Done] | None) -> Done:
        prepared = self._prepare(batch)
        if previous is not None:
            wait([previous])
            if previous.exception() is not None:
                raise Dropped("an earlier batch was not produced")
        return self._produce(batch, prepared)

    def failed(self) -> bool:
        """Whether a batch in flight failed (those after it will be dropped)."""
        return any(done.done() and done.exception() is not None for _, done in self._queue)

    def generated(self) -> int:
        """Samples generated by the batches in flight (rollouts they may still become)."""
        return sum(len(batch.generations) for batch, _ in self._queue)

    def finished(self, block: bool = False) -> Iterator[tuple[Batch, Future[Done]]]:
        """The oldest batches that are done, in order, each removed as it is
        yielded; with ``block``, the oldest is waited for first."""
        if block and self._queue:
            wait([self._queue[0][1]])
        while self._queue and self._queue[0][1].done():
            yield self._queue.popleft()
