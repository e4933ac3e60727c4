"""``arbiter train rm --from-topic``: preferences from the Kafka topic as training examples.

Two ways to read (``TopicConfig.replay``):

- incremental (default): the consumer group ``arbiter-reward-trainer`` gets
  the preferences it has not trained on; their offsets are committed only
  after the new version is in the registry, so a failed run trains on them
  again next time and a successful one never does (at-least-once; duplicates
  within a run are dropped by preference id).
- replay: every preference on the topic, no group, nothing committed.

A record that is not a usable preference (poison of any kind, see
``StreamConsumer``; a preference the training format refuses; or one the
model cannot take, e.g. over its window with ``truncation: reject``, found
when training encodes it: ``TopicBatch.usable``) is skipped, logged and
counted by reason (``TopicBatch.skipped_reasons``), dead-lettered with
``kafka.dead_letter``, and committed past with the rest; with
``topic.skip_invalid: false`` it stops the run instead, naming the record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from arbiter.rm.config import TopicConfig
from arbiter.rm.data import DataError, DatasetError, RankedExample, TooLong, dedupe, parse_row
from arbiter.stream import KafkaSettings, StreamConsumer, codec, merge_offsets, topics
from arbiter.stream.types import ConsumedRecord, RecordBatch, TopicPartition


def preference_example(preference, where: str) -> RankedExample:
    """A decoded Preference payload -> a training example; DataError names ``where`` and the field."""
    return parse_row(codec.preference_to_row(preference), where)


@dataclass
class TopicBatch:
    """Preferences read for one training run, and what to commit once the
    version trained on them is published."""

    examples: list[RankedExample]
    records: int
    skipped: list[str] = field(default_factory=list)
    # {reject reason (arbiter.stream.REJECT_REASONS): records} of ``skipped``.
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    replay: bool = False
    skip_invalid: bool = True
    # Open until close(): rejects found while training are counted and
    # dead-lettered through it, and (incremental mode) it commits.
    _consumer: StreamConsumer | None = None
    _offsets: dict[TopicPartition, int] = field(default_factory=dict)
    # The record of each example, by its source (topic[partition]@offset).
    _records: dict[str, ConsumedRecord] = field(default_factory=dict, repr=False)

    # {partition: first offset read} and {partition: next offset} of what
    # this batch read: the offsets a version trained on it covers.
    first_offsets: dict[TopicPartition, int] = field(default_factory=dict)

    def take(self, polled: RecordBatch) -> list[DataError]:
        """Add what one poll delivered: each preference as an example, each
        poison record (already skipped by the consumer) and each preference
        the training format refuses (rejected here as ``invalid_record``)
        to ``skipped``, naming its topic[partition]@offset. Returns the
        refusals instead when ``skip_invalid`` is off."""
        errors: list[DataError] = []
        for rejected in polled.rejected:
            self.skipped.append(f"{rejected.topic}[{rejected.partition}]@{rejected.offset}: {rejected.error}")
        for record in [*polled.records, *polled.rejected]:
            tp = TopicPartition(record.topic, record.partition)
            self.first_offsets[tp] = min(self.first_offsets.get(tp, record.offset), record.offset)
        self._offsets = merge_offsets(self._offsets, polled.next_offsets())
        for record in polled.records:
            self.records += 1
            where = f"{record.topic}[{record.partition}]@{record.offset}"
            try:
                self.examples.append(preference_example(record.message, where))
                self._records[where] = record
            except DataError as err:
                if self.skip_invalid:
                    self._consumer.reject(record, "invalid_record", err)
                    self.skipped.append(str(err))
                else:
                    errors.append(err)
        self.skipped_reasons = dict(self._consumer.stats().rejected_reasons)
        return errors

    def settle(self) -> None:
        """Once reading is done: a client retrying a SubmitPreference it saw
        no answer to produces the same preference id twice, trained on once."""
        unique = dedupe(self.examples)
        self.duplicates += len(self.examples) - len(unique)
        self.examples = unique

    def offsets(self) -> dict[TopicPartition, int]:
        """{partition: next offset} after everything this batch read."""
        return dict(self._offsets)

    def row(self, example: RankedExample) -> dict[str, Any]:
        """The training-format row of an example read by this batch."""
        return codec.preference_to_row(self._records[example.source].message)

    def usable(self, examples: Sequence[RankedExample],
               encode: Callable[[RankedExample], Any]) -> list[RankedExample]:
        """``examples`` without those from this batch that ``encode`` refuses
        (DataError): each of those is rejected like any poison record (reason
        ``too_long`` or ``invalid_record``), so one preference the model
        cannot take does not stop training. Examples from elsewhere (the data
        files) pass unchecked: their errors are the caller's to report. With
        ``skip_invalid`` off, the first refusal raises DatasetError naming it."""
        kept = []
        for example in examples:
            if example.source in self._records:
                try:
                    encode(example)
                except DataError as err:
                    self.reject(example, err)
                    continue
            kept.append(example)
        return kept

    def reject(self, example: RankedExample, error: DataError) -> None:
        if not self.skip_invalid:
            raise DatasetError([error])
        reason = "too_long" if isinstance(error, TooLong) else "invalid_record"
        self._consumer.reject(self._records.pop(example.source), reason, error)
        self.skipped.append(str(error))
        self.skipped_reasons = dict(self._consumer.stats().rejected_reasons)
        self.examples = [e for e in self.examples if e.source != example.source]

    def note(self) -> dict[str, Any]:
        """What a registry version trained from this batch records about it."""
        return {"from_topic": {"records": self.records, "examples": len(self.examples),
                               "duplicates": self.duplicates, "skipped": len(self.skipped),
                               "skipped_reasons": self.skipped_reasons, "replay": self.replay}}

    def commit(self) -> None:
        """Mark everything read as trained on (incremental mode only)."""
        if self._consumer is not None and not self.replay and self._offsets:
            self._consumer.commit(self._offsets)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def __enter__(self) -> TopicBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_preferences(kafka: KafkaSettings, config: TopicConfig, join_timeout_s: float = 60.0) -> TopicBatch:
    """Read until ``config.idle_timeout_s`` passes without a record (or
    ``max_records``). The returned batch holds the group membership until
    closed; commit it after publishing."""
    group = None if config.replay else topics.REWARD_TRAINER_GROUP
    # Training happens between this poll and the commit: the group must not
    # evict the consumer meanwhile.
    settings = kafka.with_overrides(max_poll_interval_ms=int(config.max_train_seconds * 1000))
    consumer: StreamConsumer = StreamConsumer(settings, [topics.PREFERENCES], group,
                                              skip_invalid=config.skip_invalid)
    batch = TopicBatch([], 0, replay=config.replay, skip_invalid=config.skip_invalid, _consumer=consumer)
    try:
        if group:
            consumer.wait_for_assignment(join_timeout_s)
        errors: list[DataError] = []
        last = time.monotonic()
        while time.monotonic() - last < config.idle_timeout_s:
            remaining = None if config.max_records is None else config.max_records - batch.records
            if remaining is not None and remaining <= 0:
                break
            polled = consumer.poll(timeout_s=min(1.0, config.idle_timeout_s), max_records=remaining)
            if not polled.records and not polled.rejected:
                continue
            last = time.monotonic()
            errors += batch.take(polled)
        if errors:
            raise DatasetError(errors)
        batch.settle()
        return batch
    except BaseException:
        consumer.close()
        raise
