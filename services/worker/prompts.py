"""The worker's prompt sources: a JSON-lines file (``arbiter.prompts`` reads
it) or ``PromptRecord`` payloads from the prompts topic, and the two
conversions between ``Prompt`` and ``PromptRecord``.

A source hands out ``PromptBatch``es; the worker calls ``acknowledge()`` once
every rollout of the batch was acknowledged by the brokers, which is when the
topic source commits its offsets (at-least-once).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from arbiter.prompts import as_prompts
from arbiter.stream import (
    CommitError,
    ConsumerObserver,
    KafkaSettings,
    PayloadError,
    RecordBatch,
    StreamConsumer,
    StreamError,
    StreamProducer,
    codec,
    topics,
)
from arbiter.types import Prompt
from arbiter.v1 import rollout_pb2
from services.worker.retry import WorkerError

log = logging.getLogger(__name__)


def publish_prompts(kafka: KafkaSettings, prompts: Iterable[Prompt | str | Mapping[str, Any]]) -> int:
    """Produce prompts to the prompts topic (acks=all); returns how many.
    For feeding ``arbiter worker --prompts-topic`` from a script or a test."""
    records = [codec.prompt_to_record(p) for p in as_prompts(prompts)]
    with StreamProducer(kafka) as producer:
        for record in records:
            producer.send(topics.PROMPTS, record)
        producer.flush()
    return len(records)


@dataclass(frozen=True)
class PromptBatch:
    prompts: list[Prompt]
    # Called once every rollout of these prompts is acknowledged.
    acknowledge: Callable[[], None] = lambda: None


class PromptSource(Protocol):
    def next_batch(self, limit: int) -> PromptBatch | None:
        """At most ``limit`` prompts (maybe none yet); None when the source is exhausted."""

    def close(self) -> None: ...


class FilePrompts:
    """``passes`` over a file's prompts (0: forever), each pass reshuffled
    with ``shuffle`` (seeded: concurrent workers should get different seeds)."""

    def __init__(self, prompts: list[Prompt], passes: int, shuffle: bool, seed: int | None):
        self._prompts = prompts
        self._passes = passes
        self._shuffle = shuffle
        self._rng = random.Random(seed)
        self._order: list[Prompt] = []
        self._position = 0
        self._started = 0

    def next_batch(self, limit: int) -> PromptBatch | None:
        if self._position >= len(self._order):
            if self._passes and self._started >= self._passes:
                return None
            self._order = list(self._prompts)
            if self._shuffle:
                self._rng.shuffle(self._order)
            self._position, self._started = 0, self._started + 1
        batch = self._order[self._position:self._position + limit]
        self._position += limit
        return PromptBatch(batch)

    def close(self) -> None:
        pass


class TopicPrompts:
    """The prompts topic, its partitions split between the workers of
    ``ROLLOUT_WORKERS_GROUP``. Records that are not usable prompts (poison of
    any kind: see ``StreamConsumer``) are skipped, never retried: logged,
    counted with ``skip`` and by ``observer`` (per reason), dead-lettered with
    ``kafka.dead_letter``, and committed past with their batch. A failed
    commit is counted with ``failed("commit")`` and the partition's next
    owner processes those prompts again."""

    def __init__(
        self, kafka: KafkaSettings, skip: Callable[[str], None], failed: Callable[[str], None],
        observer: ConsumerObserver | None = None,
    ):
        try:
            self._consumer = StreamConsumer(
                kafka, [topics.PROMPTS], topics.ROLLOUT_WORKERS_GROUP, skip_invalid=True, observer=observer,
            )
        except StreamError as err:
            raise WorkerError(f"kafka: cannot consume the prompts topic: {err}") from None
        self._skip = skip
        self._failed = failed

    def next_batch(self, limit: int) -> PromptBatch:
        try:
            return self._next_batch(limit)
        except StreamError as err:
            # A dead-letter copy went unacknowledged: nothing was committed, so
            # these records are read again by whoever consumes the partition next.
            raise WorkerError(f"kafka: {err}") from None

    def _next_batch(self, limit: int) -> PromptBatch:
        polled = self._consumer.poll(timeout_s=0.5, max_records=limit)
        if not polled.records and not polled.rejected:
            return PromptBatch([])
        for _ in polled.rejected:  # the consumer logged each
            self._skip("invalid_prompt_record")
        prompts = []
        for record in polled.records:
            try:
                where = f"{record.topic}[{record.partition}]@{record.offset}"
                prompts.append(codec.prompt_from_record(record.message, where))
            except PayloadError as err:
                self._consumer.reject(record, err.reason, err)
                self._skip("invalid_prompt_record")
        return PromptBatch(prompts, lambda: self._commit(polled))

    def _commit(self, polled: RecordBatch[rollout_pb2.PromptRecord]) -> None:
        try:
            self._consumer.commit(polled.next_offsets())
        except CommitError as err:
            self._failed("commit")
            log.warning("%s; the partition's next owner processes these prompts again", err)

    def close(self) -> None:
        self._consumer.close()
