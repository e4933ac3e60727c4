"""Errors of the streaming layer; messages say what to fix."""

from __future__ import annotations

from arbiter.errors import ArbiterError


class StreamError(ArbiterError):
    """Base class for everything the streaming layer raises."""


class TopicError(StreamError):
    """A topic is missing or has the wrong shape (e.g. too few partitions)."""


# Why a consumer refused a record: the ``reason`` label of
# arbiter_stream_records_rejected_total, so a fixed, small set.
REJECT_REASONS = (
    "oversize",  # value larger than KafkaSettings.max_record_bytes (checked before decoding)
    "bad_headers",  # a header missing or unreadable, an unknown content type or schema version syntax
    "wrong_type",  # the message-type header names another payload than the topic carries
    "schema_version",  # a schema major version this build cannot read
    "undecodable",  # the value is not a payload of the topic's type (garbage, tombstone, contradictions)
    "invalid_record",  # decodes, but a field the consumer needs is missing or inconsistent
    "out_of_vocab",  # token ids outside the model's vocabulary (would index no embedding row)
    "too_long",  # more tokens than the model's positions
)


class PayloadError(StreamError):
    """A record cannot be decoded as the payload its topic carries, or the
    consumer cannot use what it decoded.

    ``location`` is "topic[partition]@offset" when the record came from Kafka;
    ``reason`` is one of REJECT_REASONS.
    """

    default_reason = "undecodable"

    def __init__(self, message: str, location: str = "", reason: str | None = None):
        super().__init__(f"{location}: {message}" if location else message)
        self.location = location
        self.reason = reason or self.default_reason
        if self.reason not in REJECT_REASONS:
            raise ValueError(f"reason {self.reason!r} is not one of {', '.join(REJECT_REASONS)}")


class SchemaVersionError(PayloadError):
    """The record was written with a schema major version this code does not know.

    Never misread: reading it as the current schema could misread fields. A
    consumer refuses it (or, skipping invalid records, counts and logs it).
    """

    default_reason = "schema_version"


class ProduceError(StreamError):
    """Records were not acknowledged by the brokers (acks=all)."""


class CommitError(StreamError):
    """Offsets were not committed (e.g. the group rebalanced); the group keeps its previous commit."""


class BrokerError(StreamError):
    """The local development broker could not be found, started or stopped."""
