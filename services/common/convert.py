"""Conversions shared by every service boundary (protobuf <-> core types)."""

from __future__ import annotations

from collections.abc import Iterable

from arbiter.errors import InvalidInput
from arbiter.types import ChatMessage, ModelInfo, Truncation
from arbiter.v1 import common_pb2

_TRUNCATION_TO_PB = {
    Truncation.REJECT: common_pb2.TRUNCATION_REJECT,
    Truncation.LEFT: common_pb2.TRUNCATION_LEFT,
    Truncation.RIGHT: common_pb2.TRUNCATION_RIGHT,
}
# Unspecified (a caller that never set it) means reject: nothing is cut silently.
_TRUNCATION_FROM_PB = {common_pb2.TRUNCATION_UNSPECIFIED: Truncation.REJECT} | {
    pb: t for t, pb in _TRUNCATION_TO_PB.items()
}


def truncation_from_pb(value: int, field: str) -> Truncation:
    try:
        return _TRUNCATION_FROM_PB[value]
    except KeyError:
        allowed = ", ".join(common_pb2.Truncation.Name(v) for v in _TRUNCATION_FROM_PB)
        raise InvalidInput(field, f"unknown value {value}; allowed: {allowed}") from None


def truncation_to_pb(truncation: Truncation) -> int:
    return _TRUNCATION_TO_PB[truncation]


def messages_from_pb(conversation: common_pb2.Conversation) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(m.role, m.content) for m in conversation.messages)


def conversation_to_pb(messages: Iterable[ChatMessage]) -> common_pb2.Conversation:
    return common_pb2.Conversation(messages=[common_pb2.ChatMessage(role=m.role, content=m.content) for m in messages])


def model_info_to_pb(info: ModelInfo) -> common_pb2.ModelInfo:
    msg = common_pb2.ModelInfo(
        kind=info.kind,
        name=info.name,
        version=info.version,
        tokenizer_fingerprint=info.tokenizer_fingerprint,
        max_tokens=info.max_tokens,
        backend=info.backend,
        active=info.active,
        source_path=info.source_path,
        vocab_size=info.vocab_size,
        device=info.device,
        dtype=info.dtype,
        model_process=info.extra.get("model_process") == "true",
        compiled=info.extra.get("compiled") == "true",
    )
    if info.normalization is not None:
        msg.normalization.mean = info.normalization.mean
        msg.normalization.std = info.normalization.std
        msg.normalization.sample_count = info.normalization.sample_count
    if info.loaded_at:
        msg.loaded_at.FromNanoseconds(int(info.loaded_at * 1e9))
    return msg
