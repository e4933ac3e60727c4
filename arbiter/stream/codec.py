"""Protobuf payloads of the Kafka topics: the one place they are (de)serialized.

Every record carries its schema version twice: "MAJOR.MINOR" in a header and
MAJOR in the payload's ``schema_version`` field. Minor versions only add fields
(protobuf readers keep unknown fields), so any minor is read; an unknown major
is refused with SchemaVersionError instead of being misread.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf.message import DecodeError, Message

from arbiter.errors import InvalidInput
from arbiter.stream import topics
from arbiter.stream.errors import PayloadError, SchemaVersionError
from arbiter.v1 import rollout_pb2

SCHEMA_MAJOR = 1
SCHEMA_MINOR = 0
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"
SUPPORTED_MAJORS = frozenset({SCHEMA_MAJOR})

_VERSION_RE = re.compile(r"^(\d{1,9})\.(\d{1,9})$")


@dataclass(frozen=True)
class PayloadSpec:
    message_type: type[Message]
    # The record key (and so the partition): e.g. all samples of a prompt land
    # in one partition, in order.
    key_field: str

    @property
    def type_name(self) -> str:
        return self.message_type.DESCRIPTOR.full_name


PAYLOADS: Mapping[str, PayloadSpec] = {
    topics.ROLLOUTS: PayloadSpec(rollout_pb2.Rollout, "prompt_id"),
    topics.POLICY_UPDATES: PayloadSpec(rollout_pb2.PolicyUpdate, "policy_version"),
    topics.PROMPTS: PayloadSpec(rollout_pb2.PromptRecord, "prompt_id"),
    topics.PREFERENCES: PayloadSpec(rollout_pb2.Preference, "preference_id"),
}


@dataclass(frozen=True)
class EncodedRecord:
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def payload_spec(topic: str) -> PayloadSpec:
    """The payload of a logical topic name (see ``arbiter.stream.topics``)."""
    try:
        return PAYLOADS[topic]
    except KeyError:
        raise ValueError(f"unknown topic {topic!r}; known: {', '.join(sorted(PAYLOADS))}") from None


def parse_schema_version(text: str) -> tuple[int, int]:
    match = _VERSION_RE.match(text)
    if not match:
        raise PayloadError(f"header {topics.HEADER_SCHEMA_VERSION}={text!r} is not MAJOR.MINOR")
    return int(match.group(1)), int(match.group(2))


def encode(topic: str, message: Message, producer: str = "") -> EncodedRecord:
    """Key, value and headers of ``message`` for the logical ``topic``.

    ``schema_version`` 0 (unset) is stamped with the current major (on a copy;
    the caller's message is not modified); any other value must be the current
    major: a producer never writes a schema it does not implement.
    """
    spec = payload_spec(topic)
    if not isinstance(message, spec.message_type):
        raise InvalidInput("message", f"topic {topic!r} carries {spec.type_name}, got {type(message).__name__}")
    if message.schema_version == 0:
        stamped = spec.message_type()
        stamped.CopyFrom(message)
        stamped.schema_version = SCHEMA_MAJOR
        message = stamped
    elif message.schema_version != SCHEMA_MAJOR:
        raise InvalidInput(
            "schema_version", f"this build writes schema major {SCHEMA_MAJOR}, message has {message.schema_version}"
        )
    key = getattr(message, spec.key_field)
    if not key:
        raise InvalidInput(spec.key_field, f"required: it is the record key of topic {topic!r}")
    headers = [
        (topics.HEADER_CONTENT_TYPE, topics.CONTENT_TYPE_PROTOBUF.encode()),
        (topics.HEADER_SCHEMA_VERSION, SCHEMA_VERSION.encode()),
        (topics.HEADER_MESSAGE_TYPE, spec.type_name.encode()),
    ]
    if producer:
        headers.append((topics.HEADER_PRODUCER, producer.encode()))
    return EncodedRecord(key.encode(), message.SerializeToString(), headers)


def _header(headers: Mapping[str, bytes], name: str, location: str) -> str:
    raw = headers.get(name)
    if raw is None:
        raise PayloadError(f"missing header {name!r}: not written by an Arbiter producer?", location)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise PayloadError(f"header {name!r} is not UTF-8", location) from None


def decode(
    topic: str, value: bytes | None, headers: Mapping[str, bytes], location: str = ""
) -> tuple[Message, str]:
    """(message, "MAJOR.MINOR") of a record read from the logical ``topic``.

    Raises SchemaVersionError for an unknown major version and PayloadError
    for anything else that would make the payload ambiguous.
    """
    spec = payload_spec(topic)
    content_type = _header(headers, topics.HEADER_CONTENT_TYPE, location)
    if content_type != topics.CONTENT_TYPE_PROTOBUF:
        raise PayloadError(f"content type {content_type!r}, expected {topics.CONTENT_TYPE_PROTOBUF!r}", location)
    type_name = _header(headers, topics.HEADER_MESSAGE_TYPE, location)
    if type_name != spec.type_name:
        raise PayloadError(f"topic {topic!r} carries {spec.type_name}, record is {type_name}", location)
    version = _header(headers, topics.HEADER_SCHEMA_VERSION, location)
    try:
        major, _minor = parse_schema_version(version)
    except PayloadError as err:
        raise PayloadError(str(err), location) from None
    if major not in SUPPORTED_MAJORS:
        raise SchemaVersionError(
            f"{spec.type_name} schema version {version} is not readable by this build (reads major "
            f"{', '.join(map(str, sorted(SUPPORTED_MAJORS)))}, writes {SCHEMA_VERSION}): upgrade the consumer",
            location,
        )
    if value is None:
        raise PayloadError("record has no value (tombstone)", location)
    message = spec.message_type()
    try:
        message.ParseFromString(value)
    except DecodeError as err:
        raise PayloadError(f"invalid {spec.type_name} payload: {err}", location) from None
    if message.schema_version != major:
        raise PayloadError(
            f"payload schema_version {message.schema_version} contradicts header "
            f"{topics.HEADER_SCHEMA_VERSION}={version}",
            location,
        )
    return message, version
