"""Continuous batching: which generations decode together, and when.

Generations wait in one FIFO queue and join the batch of their version at a
step boundary while the KV-cache budget has room for them (rows and
reserved tokens, ``DecodingConfig``); each loop iteration is one call on the
model thread that advances every version's batch by one token (one forward
per version present, so no sample ever mixes weights), then hands the
tokens to the waiting requests on the event loop. Joining prompts are
prefilled at most ``prefill_chunk_tokens`` a step, beside the decoding rows
(chunked prefill, ``arbiter.policy.batch``). A generation that can
never fit the budget is refused before it queues; one that finds the queue
full is refused with a retryable error.

With ``continuous_batching`` off, every generation is a batch of its own:
concurrent requests then interleave one step at a time on the model thread,
never sharing a forward (the engine before continuous batching; the
benchmark's baseline).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

from arbiter.config import flag, require
from arbiter.errors import LimitExceeded, Overloaded, ShuttingDown
from arbiter.policy.batch import DecodeBatch
from arbiter.policy.model import Generation, PolicyModel
from arbiter.policy.prefix_cache import PrefixCache
from arbiter.policy.types import TokenEvent

log = logging.getLogger(__name__)

# Decoding steps one call on the model thread may run before it returns to
# the event loop even when nothing needs it there (metrics stay current).
_MAX_STEPS_PER_CALL = 32


@dataclass(frozen=True)
class DecodingConfig:
    """The decoding batch and its admission control; nested in the policy
    server's settings, so each field is also its flag.

    Admitted generations together hold at most ``max_batch_rows`` rows and
    ``max_batch_tokens`` reserved tokens (per row: its request's longest
    prompt plus ``max_new_tokens``). Each version's batch preallocates its
    cache as row slots (at most ``max_batch_rows``) x columns (at most about
    twice its longest sequence, plus a few), resized only when generations
    join or leave and freed when the batch empties."""

    continuous_batching: bool = field(default=True, metadata=flag(
        "--no-continuous-batching", help="decode each request as a batch of its own (no merging across requests)"))
    # The KV-cache budget, over every generation decoding at once.
    max_batch_rows: int = field(default=256, metadata=flag(help="samples decoding at once, over all requests"))
    max_batch_tokens: int = field(default=262144, metadata=flag(
        help="KV-cache tokens reserved at once: each sample's prompt plus its max_new_tokens, summed"))
    max_queued_generations: int = field(default=256, metadata=flag(
        help="requests waiting for room in the batch; more are refused (UNAVAILABLE, retryable)"))
    # Chunked prefill: what one step spends on joining prompts, so running
    # rows wait a bounded time per token however long the prompts that join.
    prefill_chunk_tokens: int = field(default=2048, metadata=flag(
        help="prompt tokens (samples x padded prompt columns) prefilled per decoding step; longer joins are "
             "prefilled over several steps while running samples keep decoding. 0: each join in one forward"))

    # Prompts of one step's joiners are left-padded to the longest in their
    # group: a short prompt beside a long one computes the long one's columns.
    prefill_group_cost_tokens: int = field(default=128, metadata=flag(
        help="what one more prefill forward costs, in prompt-token columns: prompts joining in one step are split "
             "into groups of similar length (each padded only to its own longest) where the padding saved exceeds "
             "this per extra group. 0: one group a step"))
    # Prefix caching (arbiter.policy.prefix_cache): per version, the keys
    # and values of prompt prefixes it prefilled, for prompts that repeat them.
    prefix_cache_tokens: int = field(default=8192, metadata=flag(
        help="prompt tokens whose keys and values each policy version keeps for later prompts beginning with them "
             "(a shared system prompt or chat template; a prompt seen before). Memory per token: layers x 2 x "
             "KV heads x head dim x dtype bytes. 0: no prefix caching"))
    prefix_cache_block_tokens: int = field(default=16, metadata=flag(
        help="prefix caching's unit: a prompt reuses whole blocks of this many tokens"))

    def __post_init__(self) -> None:
        for name in ("max_batch_rows", "max_batch_tokens", "max_queued_generations", "prefix_cache_block_tokens"):
            require(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        require(self.prefill_chunk_tokens >= 0, "prefill_chunk_tokens", "must be >= 0 (0: no chunking)",
                self.prefill_chunk_tokens)
        require(self.prefill_group_cost_tokens >= 0, "prefill_group_cost_tokens", "must be >= 0 (0: one group a step)",
                self.prefill_group_cost_tokens)
        require(self.prefix_cache_tokens == 0 or self.prefix_cache_tokens >= self.prefix_cache_block_tokens,
                "prefix_cache_tokens", f"must be 0 (off) or at least one block (prefix_cache_block_tokens="
                f"{self.prefix_cache_block_tokens})", self.prefix_cache_tokens)

    def prefix_caches(self, policy: PolicyModel, mask: PolicyModel | None) -> tuple[PrefixCache, ...] | None:
        """The prefix caches of a batch of ``policy`` (and its masking
        policy): each version's own, made at its first batch; None when off."""
        if self.prefix_cache_tokens == 0:
            return None
        caches = []
        for model in (policy,) if mask is None else (policy, mask):
            if model.prefix_cache is None:
                model.prefix_cache = PrefixCache(self.prefix_cache_tokens, self.prefix_cache_block_tokens)
            caches.append(model.prefix_cache)
        return tuple(caches)


class DecodeObserver(Protocol):
    # One decoding step of one version: rows sampled, wall time.
    def on_batch(self, size: int, seconds: float) -> None: ...

    # Generations (requests) whose rows shared that step.
    def on_decode_step(self, generations: int) -> None: ...

    # The KV-cache budget in use: rows, reserved tokens, generations admitted.
    def on_budget(self, rows: int, tokens: int, generations: int) -> None: ...

    # Admitted rows whose prompts are still being prefilled (chunked prefill).
    def on_prefilling(self, rows: int) -> None: ...

    # Prompt tokens whose prefill started, those of them found in a prefix cache (not computed), and the
    # tokens the prefix caches of the versions decoding now hold.
    def on_prefix_cache(self, prompt_tokens: int, cached_tokens: int, held_tokens: int) -> None: ...

    # Generations waiting for room in the batch.
    def on_queue_depth(self, depth: int) -> None: ...


class Ticket:
    """A generation's place in the scheduler, on the event loop: its token
    events (a stream's) and its end."""

    def __init__(self, generation: Generation):
        self.generation = generation
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # A caller that went away leaves no "exception never retrieved" behind.
        self.finished.add_done_callback(lambda f: f.cancelled() or f.exception())
        # One list of events per step, then None at the end.
        self._steps: asyncio.Queue[list[TokenEvent] | None] | None = (
            asyncio.Queue() if generation.stream else None)
        # Called when the caller goes away early (a remote decoder stops its stream).
        self.on_cancel: Callable[[], None] | None = None

    def _cancel(self) -> None:
        self.generation.cancel()
        if self.on_cancel is not None:
            self.on_cancel()

    def _deliver(self) -> None:
        if self._steps is not None:
            events = self.generation.take_events()
            if events:
                self._steps.put_nowait(events)
        if self.generation.done:
            self._end(None)

    def _end(self, err: BaseException | None) -> None:
        if self.finished.done():
            return
        if err is None:
            self.finished.set_result(None)
        elif isinstance(err, asyncio.CancelledError):
            self.finished.cancel()
        else:
            self.finished.set_exception(err)
        if self._steps is not None:
            self._steps.put_nowait(None)

    async def wait(self) -> None:
        """Until the generation ends; a caller cancelled meanwhile cancels it."""
        try:
            await asyncio.shield(self.finished)
        finally:
            if not self.finished.done():
                self._cancel()

    async def steps(self) -> AsyncIterator[list[TokenEvent]]:
        """A stream's events, one list per decoding step; closing the
        iterator early cancels the generation."""
        try:
            while (events := await self._steps.get()) is not None:
                yield events
            self.finished.result()
        finally:
            if not self.finished.done():
                self._cancel()


class DecodeScheduler:
    def __init__(self, config: DecodingConfig, executor: Executor, observer: DecodeObserver):
        self.config = config
        self._executor = executor
        self._observer = observer
        self._queue: deque[Ticket] = deque()
        self._batches: dict[object, DecodeBatch] = {}
        self._tickets: dict[int, Ticket] = {}
        self._rows = 0
        self._tokens = 0
        self._wakeup = asyncio.Event()
        # Set on the loop, read on the model thread (a bool: atomic).
        self._arrived = False
        self._task: asyncio.Task | None = None
        self._closed = False

    def check_fits(self, generation: Generation) -> None:
        """Refuses, at once, a generation the budget could never hold."""
        rows, cfg = len(generation.rows), self.config
        if rows > cfg.max_batch_rows:
            raise LimitExceeded(
                f"prompts x sampling.n = {rows} samples, over the {cfg.max_batch_rows} samples the server decodes at "
                "once (max_batch_rows); split the request or lower n"
            )
        if generation.reserved_tokens > cfg.max_batch_tokens:
            raise LimitExceeded(
                f"{rows} samples x (longest prompt + sampling.max_new_tokens="
                f"{generation.params.max_new_tokens}){' x 2 (an action mask)' if generation.mask else ''} = "
                f"{generation.reserved_tokens} KV-cache tokens, over the "
                f"server's budget of {cfg.max_batch_tokens} (max_batch_tokens); lower sampling.max_new_tokens or n, "
                "shorten the prompts or split the request"
            )

    def submit(self, generation: Generation) -> Ticket:
        if self._closed:
            raise ShuttingDown("the server is stopping; retry on another replica")
        self.check_fits(generation)
        if len(self._queue) >= self.config.max_queued_generations:
            # Requests whose callers went away wait no longer.
            for ticket in [t for t in self._queue if t.generation.cancelled]:
                self._queue.remove(ticket)
                ticket._end(asyncio.CancelledError())
        if len(self._queue) >= self.config.max_queued_generations:
            raise Overloaded(
                f"the queue of requests waiting for room in the decoding batch is full ({len(self._queue)}, "
                "max_queued_generations); retry with backoff"
            )
        ticket = Ticket(generation)
        self._queue.append(ticket)
        self._arrived = True
        self._observer.on_queue_depth(len(self._queue))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="policy-decode")
        self._wakeup.set()
        return ticket

    async def close(self) -> None:
        """New generations are refused; waiting and running ones fail (the
        server has drained its RPCs before this). Returns after the step in
        progress, if any: the batches are not touched while it runs."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._shut(ShuttingDown("the server is stopping; retry on another replica"))

    def _shut(self, err: BaseException) -> None:
        for ticket in [*self._queue, *self._tickets.values()]:
            ticket._end(err)
        self._queue.clear()
        self._tickets.clear()
        for batch in self._batches.values():
            batch.release()
        self._batches.clear()
        self._rows = self._tokens = 0

    # -- the loop ------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._closed:
                if not self._batches and not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                work = self._admit()
                if work:
                    self._arrived = False
                    results = await loop.run_in_executor(
                        self._executor, _run_steps, work, self._interrupted, _MAX_STEPS_PER_CALL)
                    self._after(work, results)
        except Exception as err:
            # A bug, not a request's fault: its requests fail, the next one starts a new loop.
            log.exception("the decoding loop failed")
            self._shut(err)
        finally:
            self._task = None

    def _admit(self) -> list[tuple[DecodeBatch, list[Generation]]]:
        joining: dict[object, list[Generation]] = {}
        cfg = self.config
        while self._queue:
            ticket = self._queue[0]
            generation = ticket.generation
            if generation.cancelled:
                self._queue.popleft()
                ticket._end(asyncio.CancelledError())
                continue
            rows, tokens = len(generation.rows), generation.reserved_tokens
            if self._rows + rows > cfg.max_batch_rows or self._tokens + tokens > cfg.max_batch_tokens:
                break  # first come, first served: nothing overtakes the head
            self._queue.popleft()
            self._rows += rows
            self._tokens += tokens
            self._tickets[id(generation)] = ticket
            # Masked generations (NLPO) batch with those of the same masking
            # policy: one batch runs one mask forward, unmasked ones run none.
            mask = None if generation.mask is None else generation.mask.policy
            key = (generation.policy, mask) if cfg.continuous_batching else generation
            if key not in self._batches:
                self._batches[key] = DecodeBatch(generation.policy, cfg.max_batch_rows, mask,
                                                 cfg.prefill_chunk_tokens, cfg.prefix_caches(generation.policy, mask),
                                                 cfg.prefill_group_cost_tokens)
            joining.setdefault(key, []).append(generation)
        self._observer.on_queue_depth(len(self._queue))
        return [(batch, joining.get(key, [])) for key, batch in self._batches.items()]

    def _interrupted(self) -> bool:
        """Read on the model thread: a request arrived, or the server stops."""
        return self._arrived or self._closed

    def _after(self, work, results: list[_BatchResult]) -> None:
        for result in results:
            if result.error is not None:
                log.error("decoding step failed; its %d generations fail", len(result.generations),
                          exc_info=result.error)
            for rows, seconds, sharing in result.steps:
                self._observer.on_batch(rows, seconds)
                self._observer.on_decode_step(sharing)
            for generation in result.generations.values():
                ticket = self._tickets.get(id(generation))
                if ticket is None:
                    continue
                if result.error is not None:
                    ticket._end(result.error)
                else:
                    ticket._deliver()
                if result.error is not None or generation.done or generation.cancelled:
                    self._leave(ticket)
        prompt_tokens = cached_tokens = 0
        caches = {}
        for batch, _ in work:
            prompt_tokens += batch.prompt_tokens
            cached_tokens += batch.cached_tokens
            batch.prompt_tokens = batch.cached_tokens = 0
            caches.update((id(cache), cache) for cache in batch.prefix_caches or ())
        if prompt_tokens:
            self._observer.on_prefix_cache(prompt_tokens, cached_tokens,
                                           sum(cache.held_tokens for cache in caches.values()))
        for key in [key for key, batch in self._batches.items() if batch.empty]:
            del self._batches[key]
        self._observer.on_budget(self._rows, self._tokens, len(self._tickets))
        self._observer.on_prefilling(sum(batch.prefilling_rows for batch in self._batches.values()))

    def _leave(self, ticket: Ticket) -> None:
        generation = ticket.generation
        if self._tickets.pop(id(generation), None) is None:
            return
        self._rows -= len(generation.rows)
        self._tokens -= generation.reserved_tokens
        if generation.cancelled:
            ticket._end(asyncio.CancelledError())


@dataclass
class _BatchResult:
    """What one call on the model thread did to one batch."""

    # (rows sampled, seconds, generations sharing the forward) per step.
    steps: list[tuple[int, float, int]] = field(default_factory=list)
    # Every generation the steps concerned (for their callers).
    generations: dict[int, Generation] = field(default_factory=dict)
    error: BaseException | None = None


def _run_steps(work: Sequence[tuple[DecodeBatch, list[Generation]]], interrupted: Callable[[], bool],
               max_steps: int) -> list[_BatchResult]:
    """On the model thread: steps of every batch, the joiners in the first.
    More than one only while nothing needs the event loop: no request is
    waiting to join, none has ended, no stream has a token to send (each hop
    to the loop and back costs about what a small batch's forward does)."""
    results = [_BatchResult() for _ in work]
    for step in range(max_steps):
        needs_loop = False
        for (batch, joining), result in zip(work, results, strict=True):
            if result.error is not None:
                continue
            present = batch.members
            result.generations.update(present)
            # Rows of a cancelled generation leave in this step: its budget frees on the loop.
            needs_loop = needs_loop or any(g.cancelled for g in present.values())
            started = time.perf_counter()
            try:
                stepped = batch.step(joining if step == 0 else ())
            except Exception as err:  # noqa: BLE001 - reported to the generations' callers, logged on the loop
                result.generations.update((id(g), g) for g in joining)
                batch.release()
                result.error = err
                needs_loop = True
                continue
            seconds = time.perf_counter() - started
            sampled = {id(row.generation): row.generation for row in stepped}
            result.generations.update(sampled)
            if stepped:
                result.steps.append((len(stepped), seconds, len(sampled)))
            needs_loop = needs_loop or any(g.done or g.cancelled or g.stream for g in sampled.values())
        if needs_loop or interrupted() or all(batch.empty for batch, _ in work):
            break
    return results
