"""Errors of the streaming layer; messages say what to fix."""

from __future__ import annotations

from arbiter.errors import ArbiterError


class StreamError(ArbiterError):
    """Base class for everything the streaming layer raises."""


class TopicError(StreamError):
    """A topic is missing or has the wrong shape (e.g. too few partitions)."""


class PayloadError(StreamError):
    """A record cannot be decoded as the payload its topic carries.

    ``location`` is "topic[partition]@offset" when the record came from Kafka.
    """

    def __init__(self, message: str, location: str = ""):
        super().__init__(f"{location}: {message}" if location else message)
        self.location = location


class SchemaVersionError(PayloadError):
    """The record was written with a schema major version this code does not know.

    Never skipped silently: reading it as the current schema could misread fields.
    """


class ProduceError(StreamError):
    """Records were not acknowledged by the brokers (acks=all)."""


class CommitError(StreamError):
    """Offsets were not committed (e.g. the group rebalanced); the group keeps its previous commit."""


class BrokerError(StreamError):
    """The local development broker could not be found, started or stopped."""
