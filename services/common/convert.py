"""Conversions shared by every service boundary (protobuf <-> core types)."""

from __future__ import annotations

from arbiter.errors import InvalidInput
from arbiter.types import ChatMessage, ModelInfo, Truncation
from arbiter.v1 import common_pb2

_TRUNCATION = {
    common_pb2.TRUNCATION_UNSPECIFIED: Truncation.REJECT,
    common_pb2.TRUNCATION_REJECT: Truncation.REJECT,
    common_pb2.TRUNCATION_LEFT: Truncation.LEFT,
    common_pb2.TRUNCATION_RIGHT: Truncation.RIGHT,
}


def truncation_from_pb(value: int, field: str) -> Truncation:
    try:
        return _TRUNCATION[value]
    except KeyError:
        allowed = ", ".join(common_pb2.Truncation.Name(v) for v in _TRUNCATION)
        raise InvalidInput(field, f"unknown value {value}; allowed: {allowed}") from None


def messages_from_pb(conversation: common_pb2.Conversation) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(m.role, m.content) for m in conversation.messages)


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
    )
    if info.normalization is not None:
        msg.normalization.mean = info.normalization.mean
        msg.normalization.std = info.normalization.std
        msg.normalization.sample_count = info.normalization.sample_count
    if info.loaded_at:
        msg.loaded_at.FromNanoseconds(int(info.loaded_at * 1e9))
    return msg
