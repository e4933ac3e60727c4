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

from arbiter.jsonl import JsonlError
from arbiter.prompts import as_prompts, prompt_from_row
from arbiter.stream import CommitError, KafkaSettings, RecordBatch, StreamConsumer, StreamError, StreamProducer, topics
from arbiter.types import Prompt
from arbiter.v1 import rollout_pb2
from services.worker.retry import WorkerError

log = logging.getLogger(__name__)


def prompt_record(prompt: Prompt) -> rollout_pb2.PromptRecord:
    """The prompts-topic payload of a prompt."""
    record = rollout_pb2.PromptRecord(prompt_id=prompt.id, text=prompt.text)
    for m in prompt.messages or ():
        record.chat_roles.append(m.role)
        record.chat_contents.append(m.content)
    return record


def prompt_from_record(record: rollout_pb2.PromptRecord, where: str) -> Prompt:
    """A prompts-topic payload -> Prompt, checked as a file's row would be
    (``JsonlError`` naming ``where`` when unusable)."""
    if record.chat_roles or record.chat_contents:
        if len(record.chat_roles) != len(record.chat_contents):
            raise JsonlError(where, "chat_contents", f"has {len(record.chat_contents)} entries for "
                                                     f"{len(record.chat_roles)} chat_roles")
        if record.text:
            raise JsonlError(where, "text", "is set beside a chat; use one")
        chat = [{"role": r, "content": c} for r, c in zip(record.chat_roles, record.chat_contents)]
        return prompt_from_row({"id": record.prompt_id, "messages": chat}, where)
    return prompt_from_row({"id": record.prompt_id, "prompt": record.text}, where)


def publish_prompts(kafka: KafkaSettings, prompts: Iterable[Prompt | str | Mapping[str, Any]]) -> int:
    """Produce prompts to the prompts topic (acks=all); returns how many.
    For feeding ``arbiter worker --prompts-topic`` from a script or a test."""
    records = [prompt_record(p) for p in as_prompts(prompts)]
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
    ``ROLLOUT_WORKERS_GROUP``. Invalid records are skipped and counted with
    ``skip``; a failed commit is counted with ``failed("commit")`` and the
    partition's next owner processes those prompts again."""

    def __init__(self, kafka: KafkaSettings, skip: Callable[[str], None], failed: Callable[[str], None]):
        try:
            self._consumer = StreamConsumer(kafka, [topics.PROMPTS], topics.ROLLOUT_WORKERS_GROUP, skip_invalid=True)
        except StreamError as err:
            raise WorkerError(f"kafka: cannot consume the prompts topic: {err}") from None
        self._skip = skip
        self._failed = failed

    def next_batch(self, limit: int) -> PromptBatch:
        polled = self._consumer.poll(timeout_s=0.5, max_records=limit)
        if not polled.records and not polled.rejected:
            return PromptBatch([])
        for _ in polled.rejected:  # the consumer logged each
            self._skip("invalid_prompt_record")
        prompts = []
        for record in polled.records:
            try:
                prompts.append(prompt_from_record(record.message, f"{record.topic}[{record.partition}]@{record.offset}"))
            except JsonlError as err:
                log.warning("skipping prompt record: %s", err)
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
