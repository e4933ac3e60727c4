"""Plain data types of the streaming layer (no Kafka client types leak out)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

M = TypeVar("M")


class TopicPartition(NamedTuple):
    """A partition of a topic as named on the wire (topic prefix included)."""

    topic: str
    partition: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]"


# Kafka's commit convention throughout: the value is the offset of the NEXT
# record to read (last processed offset + 1).
Offsets = Mapping[TopicPartition, int]


@dataclass(frozen=True)
class ConsumedRecord(Generic[M]):
    topic: str
    partition: int
    offset: int
    key: str | None
    timestamp_ms: int
    # "MAJOR.MINOR" the producer wrote.
    schema_version: str
    message: M
    headers: Mapping[str, bytes] = field(default_factory=dict)
    size_bytes: int = 0
    # The raw value, for a dead-letter copy if the caller rejects the record.
    value: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @property
    def next_offset(self) -> int:
        return self.offset + 1


@dataclass(frozen=True)
class RejectedRecord:
    """A record the consumer skipped (it failed to decode, or the caller
    refused it with ``StreamConsumer.reject``): returned only by consumers
    that skip invalid records."""

    topic: str
    partition: int
    offset: int
    # A PayloadError: its ``reason`` is one of arbiter.stream.errors.REJECT_REASONS.
    error: Exception
    # The topic's name in arbiter.stream.topics (``topic`` without the prefix).
    logical_topic: str = ""
    # The raw record, for a dead-letter copy.
    key: bytes | None = field(default=None, repr=False)
    value: bytes | None = field(default=None, repr=False)
    headers: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    @property
    def reason(self) -> str:
        return getattr(self.error, "reason", "undecodable")


@dataclass(frozen=True)
class RecordBatch(Generic[M]):
    """What one ``poll`` delivered, in offset order within each partition."""

    records: list[ConsumedRecord[M]]
    rejected: list[RejectedRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def next_offsets(self) -> dict[TopicPartition, int]:
        """Offsets to commit once everything in this batch (rejected records
        included, so they are not redelivered) has been durably processed."""
        return next_offsets([*self.records, *self.rejected])


def next_offsets(records: Iterable[Any]) -> dict[TopicPartition, int]:
    """{partition: last offset + 1} over records (ConsumedRecord or RejectedRecord).

    Commit this only for records that are a per-partition prefix of what the
    consumer delivered: a gap (a record skipped by the caller) would be lost.
    """
    out: dict[TopicPartition, int] = {}
    for record in records:
        tp = TopicPartition(record.topic, record.partition)
        out[tp] = max(out.get(tp, 0), record.offset + 1)
    return out


def merge_offsets(*maps: Offsets) -> dict[TopicPartition, int]:
    """Per-partition maximum: the position after everything in all maps."""
    out: dict[TopicPartition, int] = {}
    for offsets in maps:
        for tp, offset in offsets.items():
            tp = TopicPartition(*tp)
            out[tp] = max(out.get(tp, offset), offset)
    return out


def offsets_to_json(offsets: Offsets) -> dict[str, dict[str, int]]:
    """{topic: {partition: offset}} with string keys, for a checkpoint's JSON metadata."""
    out: dict[str, dict[str, int]] = {}
    for tp, offset in sorted(offsets.items()):
        out.setdefault(tp[0], {})[str(tp[1])] = int(offset)
    return out


def offsets_from_json(data: Mapping[str, Mapping[str, int]]) -> dict[TopicPartition, int]:
    """Inverse of ``offsets_to_json``."""
    out: dict[TopicPartition, int] = {}
    for topic, partitions in data.items():
        for partition, offset in partitions.items():
            offset = int(offset)
            if offset < 0:
                raise ValueError(f"offsets[{topic!r}][{partition}]: must be >= 0, got {offset}")
            out[TopicPartition(topic, int(partition))] = offset
    return out


@dataclass(frozen=True)
class Delivery:
    """A record acknowledged by all in-sync replicas."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


# -- observability -----------------------------------------------------------
# Subclass and override what you need (e.g. to feed Prometheus counters).
# Producer callbacks run on the Kafka client's I/O thread: keep them cheap and
# thread-safe.


class ProducerObserver:
    def on_delivered(self, topic: str, partition: int, size_bytes: int, latency_s: float) -> None:
        pass

    def on_failed(self, topic: str, error: BaseException) -> None:
        pass


class ConsumerObserver:
    def on_records(self, topic: str, partition: int, count: int, size_bytes: int) -> None:
        pass

    # Every record skipped: undecodable ones and those the caller rejected.
    def on_rejected(self, record: RejectedRecord) -> None:
        pass

    def on_commit(self, offsets: Offsets, latency_s: float) -> None:
        pass

    def on_commit_failed(self, error: BaseException) -> None:
        pass

    # Called on the client's I/O thread during a rebalance.
    def on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        pass

    def on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        pass


@dataclass(frozen=True)
class ProducerStats:
    sent: int = 0
    delivered: int = 0
    failed: int = 0
    delivered_bytes: int = 0
    # Times the client was replaced after a fatal error (see StreamProducer).
    rebuilds: int = 0

    @property
    def in_flight(self) -> int:
        return self.sent - self.delivered - self.failed


@dataclass(frozen=True)
class ConsumerStats:
    records: int = 0
    record_bytes: int = 0
    rejected: int = 0
    # {reason: records} of ``rejected``.
    rejected_reasons: Mapping[str, int] = field(default_factory=dict)
    commits: int = 0
    commit_failures: int = 0
    rebalances: int = 0
    assigned: frozenset[TopicPartition] = frozenset()
