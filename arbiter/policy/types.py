"""Plain data types of the policy service's core."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop string appeared in the text
    EOS = "eos"  # the model sampled an end-of-sequence token


@dataclass(frozen=True)
class SamplingParams:
    """As the caller sent them; 0 means "unset" for every number (proto3
    defaults), resolved by ``PolicyEngine``: max_new_tokens -> the server's
    default, temperature 0 -> greedy, top_p -> 1 (off), top_k -> 0 (off),
    n -> 1."""

    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    n: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class ActionMask:
    """NLPO's action mask, as the caller sent it: draw only from the top-p
    nucleus (``top_p``) of the loaded policy version ``model_version`` (the
    masking policy), renormalised (``arbiter.policy.sampling``)."""

    model_version: str
    top_p: float


@dataclass(frozen=True)
class ResolvedSampling:
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float  # in (0, 1]; 1: off
    top_k: int  # 0: off
    n: int
    stop: tuple[str, ...]
    seed: int

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token of one sample, as a generation step produces it."""

    row: int
    prompt_index: int
    sample_index: int
    token_id: int
    logprob: float
    # Text that became final with this token (held back while it could still
    # turn into a stop string or is an incomplete UTF-8 sequence).
    text_delta: str
    finish_reason: FinishReason | None


@dataclass(frozen=True)
class GeneratedSample:
    prompt_index: int
    sample_index: int
    prompt_id: str
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    text: str
    # One per completion token, under the sampling distribution.
    logprobs: list[float]
    finish_reason: FinishReason
    policy_version: str


@dataclass(frozen=True)
class GenerateResult:
    samples: list[GeneratedSample]
    policy_version: str
    tokenizer_fingerprint: str
