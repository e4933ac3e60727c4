"""Kafka streaming layer: topics, protobuf payloads, producer, consumer, local broker.

All Kafka protocol code is in ``arbiter.stream.kafka``; names shared by every
component (topics, groups, headers) in ``arbiter.stream.topics``; payload
(de)serialization, schema versions and the prompt / preference record <->
core-type conversions in ``arbiter.stream.codec``.
"""

from arbiter.stream.errors import (
    REJECT_REASONS,
    BrokerError,
    CommitError,
    PayloadError,
    ProduceError,
    SchemaVersionError,
    StreamError,
    TopicError,
)
from arbiter.stream.kafka import (
    StreamConsumer,
    StreamProducer,
    cluster_id,
    delete_topics,
    ensure_topics,
    group_offsets,
    list_topics,
    partition_count,
)
from arbiter.stream.settings import KafkaSettings, add_kafka_arguments, kafka_settings_from_args
from arbiter.stream.types import (
    ConsumedRecord,
    ConsumerObserver,
    ConsumerStats,
    Delivery,
    ProducerObserver,
    ProducerStats,
    RecordBatch,
    RejectedRecord,
    TopicPartition,
    merge_offsets,
    next_offsets,
    offsets_from_json,
    offsets_to_json,
)

__all__ = [
    "REJECT_REASONS", "BrokerError", "CommitError", "ConsumedRecord", "ConsumerObserver", "ConsumerStats", "Delivery",
    "KafkaSettings", "PayloadError", "ProduceError", "ProducerObserver", "ProducerStats",
    "RecordBatch", "RejectedRecord", "SchemaVersionError", "StreamConsumer", "StreamError", "StreamProducer",
    "TopicError", "TopicPartition", "add_kafka_arguments", "cluster_id", "delete_topics", "ensure_topics",
    "group_offsets", "kafka_settings_from_args", "list_topics", "merge_offsets", "next_offsets", "offsets_from_json",
    "offsets_to_json", "partition_count",
]
