"""Protobuf payloads of the Kafka topics: the one place they are (de)serialized,
and the one module of ``arbiter`` that imports generated protobuf code.

Every record carries its schema version twice: "MAJOR.MINOR" in a header and
MAJOR in the payload's ``schema_version`` field. Minor versions only add fields
(protobuf readers keep unknown fields), so any minor is read; an unknown major
is refused with SchemaVersionError instead of being misread.

Minor versions of major 1:

- 1.0: the first layout.
- 1.1: chats in ``PromptRecord`` and ``Preference`` are a ``Conversation`` (as
  in the RPCs) instead of parallel ``chat_roles``/``chat_contents`` lists;
  ``Rollout.reward_normalization_applied``. Records of 1.0 producers still
  decode: :func:`decode` moves their chat lists into ``conversation``, so a
  consumer sees one layout only; :func:`encode` writes the 1.1 layout only.

The record <-> core-type conversions of the prompts and preferences topics
are here too (:func:`prompt_to_record`, :func:`prompt_from_record`,
:func:`preference_to_row`), so no other module reads payload fields.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError, Message

from arbiter.errors import InvalidInput
from arbiter.stream import topics
from arbiter.stream.errors import PayloadError, SchemaVersionError
from arbiter.types import ChatMessage, Prompt
from arbiter.v1 import common_pb2, rollout_pb2

SCHEMA_MAJOR = 1
SCHEMA_MINOR = 1
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"
SUPPORTED_MAJORS = frozenset({SCHEMA_MAJOR})

_VERSION_RE = re.compile(r"^(\d{1,9})\.(\d{1,9})$")


def _chat_lists_to_conversation(message: Message, location: str) -> None:
    """Schema 1.0's chat layout (parallel ``chat_roles``/``chat_contents``) moved into ``conversation``."""
    roles, contents = message.chat_roles, message.chat_contents
    if not roles and not contents:
        return
    if len(roles) != len(contents):
        raise PayloadError(f"has {len(roles)} chat_roles but {len(contents)} chat_contents", location, "invalid_record")
    if message.conversation.messages:
        raise PayloadError(
            "sets both conversation and the 1.0 chat_roles/chat_contents; use conversation", location, "invalid_record"
        )
    message.conversation.messages.extend(
        common_pb2.ChatMessage(role=role, content=content) for role, content in zip(roles, contents)
    )
    del roles[:], contents[:]


@dataclass(frozen=True)
class PayloadSpec:
    message_type: type[Message]
    # The record key (and so the partition): e.g. all samples of a prompt land
    # in one partition, in order.
    key_field: str
    # Rewrites, in place, what an older minor version wrote into the current
    # layout (PayloadError when it cannot); run on every decoded and encoded message.
    upgrade: Callable[[Message, str], None] | None = None

    @property
    def type_name(self) -> str:
        return self.message_type.DESCRIPTOR.full_name


PAYLOADS: Mapping[str, PayloadSpec] = {
    topics.ROLLOUTS: PayloadSpec(rollout_pb2.Rollout, "prompt_id"),
    topics.POLICY_UPDATES: PayloadSpec(rollout_pb2.PolicyUpdate, "policy_version"),
    topics.PROMPTS: PayloadSpec(rollout_pb2.PromptRecord, "prompt_id", _chat_lists_to_conversation),
    topics.PREFERENCES: PayloadSpec(rollout_pb2.Preference, "preference_id", _chat_lists_to_conversation),
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
        raise PayloadError(f"header {topics.HEADER_SCHEMA_VERSION}={text!r} is not MAJOR.MINOR", reason="bad_headers")
    return int(match.group(1)), int(match.group(2))


def encode(topic: str, message: Message, producer: str = "") -> EncodedRecord:
    """Key, value and headers of ``message`` for the logical ``topic``.

    ``schema_version`` 0 (unset) is stamped with the current major; any other
    value must be the current major: a producer never writes a schema it does
    not implement. For the same reason a message in an older minor's layout
    is written in the current one. Both happen on a copy; the caller's
    message is not modified.
    """
    spec = payload_spec(topic)
    if not isinstance(message, spec.message_type):
        raise InvalidInput("message", f"topic {topic!r} carries {spec.type_name}, got {type(message).__name__}")
    if message.schema_version not in (0, SCHEMA_MAJOR):
        raise InvalidInput(
            "schema_version", f"this build writes schema major {SCHEMA_MAJOR}, message has {message.schema_version}"
        )
    if message.schema_version == 0 or spec.upgrade is not None:
        written = spec.message_type()
        written.CopyFrom(message)
        written.schema_version = SCHEMA_MAJOR
        if spec.upgrade is not None:
            try:
                spec.upgrade(written, "")
            except PayloadError as err:
                raise InvalidInput("message", str(err)) from None
        message = written
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
        raise PayloadError(f"missing header {name!r}: not written by an Arbiter producer?", location, "bad_headers")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise PayloadError(f"header {name!r} is not UTF-8", location, "bad_headers") from None


def decode(
    topic: str, value: bytes | None, headers: Mapping[str, bytes], location: str = ""
) -> tuple[Message, str]:
    """(message, "MAJOR.MINOR") of a record read from the logical ``topic``,
    in the current minor's layout whatever minor wrote it.

    Raises SchemaVersionError for an unknown major version and PayloadError
    for anything else that would make the payload ambiguous.
    """
    spec = payload_spec(topic)
    content_type = _header(headers, topics.HEADER_CONTENT_TYPE, location)
    if content_type != topics.CONTENT_TYPE_PROTOBUF:
        raise PayloadError(
            f"content type {content_type!r}, expected {topics.CONTENT_TYPE_PROTOBUF!r}", location, "bad_headers"
        )
    type_name = _header(headers, topics.HEADER_MESSAGE_TYPE, location)
    if type_name != spec.type_name:
        raise PayloadError(f"topic {topic!r} carries {spec.type_name}, record is {type_name}", location, "wrong_type")
    version = _header(headers, topics.HEADER_SCHEMA_VERSION, location)
    try:
        major, _minor = parse_schema_version(version)
    except PayloadError as err:
        raise PayloadError(str(err), location, err.reason) from None
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
    if spec.upgrade is not None:
        spec.upgrade(message, location)
    return message, version


# -- prompts and preferences <-> core types ------------------------------------


def _conversation(messages: Iterable[ChatMessage]) -> common_pb2.Conversation:
    return common_pb2.Conversation(messages=[common_pb2.ChatMessage(role=m.role, content=m.content) for m in messages])


def prompt_to_record(prompt: Prompt) -> rollout_pb2.PromptRecord:
    """The prompts-topic payload of ``prompt``; its ``id`` is the record's
    ``prompt_id`` (and key). The schema version is stamped by :func:`encode`."""
    if prompt.messages is None:
        return rollout_pb2.PromptRecord(prompt_id=prompt.id, text=prompt.text)
    return rollout_pb2.PromptRecord(prompt_id=prompt.id, conversation=_conversation(prompt.messages))


def prompt_from_record(record: rollout_pb2.PromptRecord, where: str = "") -> Prompt:
    """A prompts-topic payload (as :func:`decode` returns it) -> ``Prompt``.

    PayloadError, prefixed with ``where`` (default: the record's prompt id),
    for a record a worker cannot use: no prompt_id, both text and a
    conversation or neither, a message with an empty role or content, or a
    conversation that ends with an assistant turn (the completion is that turn).
    """
    where = where or f"prompt record {record.prompt_id!r}"
    if not record.prompt_id:
        raise PayloadError("prompt_id is empty", where, "invalid_record")
    messages = record.conversation.messages
    if not messages:
        if not record.text.strip():
            raise PayloadError("has neither text nor a conversation", where, "invalid_record")
        return Prompt(text=record.text, id=record.prompt_id)
    if record.text:
        raise PayloadError("sets both text and a conversation; use one", where, "invalid_record")
    for j, message in enumerate(messages):
        if not message.role.strip() or not message.content.strip():
            raise PayloadError(f"conversation.messages[{j}] has an empty role or content", where, "invalid_record")
    if messages[-1].role == "assistant":
        raise PayloadError(
            "the conversation ends with an assistant turn; end with the turn to answer", where, "invalid_record"
        )
    return Prompt(messages=tuple(ChatMessage(m.role, m.content) for m in messages), id=record.prompt_id)


def preference_to_row(record: rollout_pb2.Preference) -> dict[str, Any]:
    """A preferences-topic payload (as :func:`decode` returns it) as a row of
    the reward-model training format (``arbiter.rm.data``: TRL's pair format,
    or a K-wise ranking), which validates it: the one reader of both."""
    messages = record.conversation.messages
    prompt: Any = [{"role": m.role, "content": m.content} for m in messages] if messages else record.prompt
    row: dict[str, Any] = {"prompt": prompt, "id": record.preference_id}
    if record.ranked_responses:
        responses = list(record.ranked_responses)
        row.update(responses=responses, ranking=list(range(len(responses))))
    else:
        row.update(chosen=record.chosen, rejected=record.rejected)
    return row
