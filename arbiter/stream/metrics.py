"""The one Prometheus metric of the Kafka layer every consumer exports:
records it rejected (skipped), by topic and reason."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter

from arbiter.stream.errors import REJECT_REASONS
from arbiter.stream.types import ConsumerObserver, RejectedRecord


class RejectedRecordsMetric(ConsumerObserver):
    """``arbiter_stream_records_rejected_total{topic, reason}`` on ``registry``:
    pass it as a StreamConsumer's observer. ``topic`` is the logical topic
    name (``arbiter.stream.topics``, no prefix) and ``reason`` one of
    REJECT_REASONS, so the label set stays small; every pair of ``topics`` x
    REJECT_REASONS is exported from the start (0), so ``increase()`` sees the
    first rejection."""

    def __init__(self, registry: CollectorRegistry, topics: Iterable[str]):
        self.counter = Counter(
            "arbiter_stream_records_rejected",
            "Kafka records a consumer skipped because it cannot use them (poison), by topic and reason.",
            ["topic", "reason"], registry=registry,
        )
        for topic in topics:
            for reason in REJECT_REASONS:
                self.counter.labels(topic, reason)

    def on_rejected(self, record: RejectedRecord) -> None:
        self.counter.labels(record.logical_topic, record.reason).inc()
