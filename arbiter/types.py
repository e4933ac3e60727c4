"""Plain data types shared by the core library and the service boundaries."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class Truncation(enum.Enum):
    REJECT = "reject"
    LEFT = "left"
    RIGHT = "right"


@dataclass(frozen=True)
class Prompt:
    """What a policy is prompted with: plain ``text``, or chat ``messages``
    rendered with the policy's own chat template (and generation prompt).
    ``id`` names it in rollouts and results (optional for one-off calls)."""

    text: str = ""
    messages: tuple[ChatMessage, ...] | None = None
    id: str = ""

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True)
class RewardInput:
    """Either ``prompt`` + ``response`` (plain text) or ``messages`` (a full
    conversation whose last turn is the assistant response being scored)."""

    prompt: str = ""
    response: str = ""
    messages: tuple[ChatMessage, ...] | None = None
    id: str = ""


@dataclass(frozen=True)
class ScoreOptions:
    model_version: str = ""
    truncation: Truncation = Truncation.REJECT
    normalize: bool = False
    # An arbiter.reward.composite.RewardSpec for this request (None: the
    # service's configured one, if any, unless model_version pins a version).
    reward_spec: Any = None


@dataclass(frozen=True)
class RewardComponent:
    """One term of a reward spec for one item (arbiter.reward.composite)."""

    name: str
    weight: float
    # As it enters the total; raw_value: the same with raw model scores.
    value: float
    raw_value: float
    # Model and ensemble terms: the versions that scored, their scores (as
    # used), and for ensembles their mean and population std.
    versions: tuple[str, ...] = ()
    member_scores: tuple[float, ...] = ()
    mean: float = 0.0
    std: float = 0.0


@dataclass(frozen=True)
class ScoreResult:
    score: float
    raw_score: float
    num_tokens: int
    truncated: bool
    id: str = ""
    components: tuple[RewardComponent, ...] = ()


@dataclass(frozen=True)
class ScoreBatch:
    results: list[ScoreResult]
    model_name: str
    model_version: str
    normalized: bool
    # The reward spec's name when one scored, else "".
    reward_spec: str = ""


@dataclass(frozen=True)
class NormalizationStats:
    mean: float
    std: float
    sample_count: int = 0

    def apply(self, raw: float) -> float:
        return (raw - self.mean) / self.std


@dataclass(frozen=True)
class ModelInfo:
    kind: str
    name: str
    version: str
    tokenizer_fingerprint: str
    max_tokens: int
    vocab_size: int
    source_path: str
    backend: str = "torch"
    normalization: NormalizationStats | None = None
    # Where the weights run and their dtype ("cuda:0", "bfloat16"); for a
    # Triton backend, what the config Triton runs says.
    device: str = ""
    dtype: str = ""
    loaded_at: float = 0.0
    active: bool = False
    extra: dict[str, str] = field(default_factory=dict)
