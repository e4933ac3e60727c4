"""``arbiter train ilql --config FILE``: one YAML file, validated up front.

Errors name the field by its path in the file (``ilql.tau``, ``data.jsonl``)
and what it accepts, as ``trainer/config.py`` does for PPO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arbiter.config import config_from_mapping, load_config_file, require, require_choice
from trainer.config import REWARD_SOURCES


@dataclass(frozen=True)
class ILQLLossConfig:
    """The objective (trainer/ilql_math.py). Defaults follow Snell et al.
    2022 and trlx's ILQL: τ = 0.7, γ = 0.99, α_cql = 0.1, α_bc = 1."""

    # Discount of V(s') in the Q target r + γ·V(s').
    gamma: float = 0.99
    # Expectile of the V loss: > 0.5 fits V to an in-support maximum of Q.
    tau: float = 0.7
    # Weight of the CQL term (logsumexp Q − Q of the data's token).
    cql_coef: float = 0.1
    # Weight of the policy's own likelihood of the data (π_β).
    bc_coef: float = 1.0
    # > 0: the likelihood term is weighted by exp(β·(min Q̂ − V)) (AWR); 0: plain BC.
    awr_beta: float = 0.0
    # Target heads follow Q by Polyak averaging: Q̂ ← α·Q + (1 − α)·Q̂ ...
    polyak_alpha: float = 0.005
    # ... every this many optimizer steps.
    target_update_every: int = 1

    def validate(self, prefix: str) -> None:
        require(0 <= self.gamma <= 1, f"{prefix}.gamma", "must be in [0, 1]", self.gamma)
        require(0 < self.tau < 1, f"{prefix}.tau", "must be in (0, 1) (0.5 is a plain mean; ILQL uses 0.7-0.9)",
                self.tau)
        for name in ("cql_coef", "bc_coef", "awr_beta"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, f"{prefix}.{name}", "must be a finite number >= 0", value)
        require(0 < self.polyak_alpha <= 1, f"{prefix}.polyak_alpha", "must be in (0, 1] (1: hard copy)",
                self.polyak_alpha)
        require(self.target_update_every >= 1, f"{prefix}.target_update_every", "must be >= 1",
                self.target_update_every)


@dataclass(frozen=True)
class ILQLDataConfig:
    """Where the scored samples come from: exactly one of the two."""

    # JSON lines of {"prompt": str, "completion": str, "reward": number}.
    jsonl: str | None = None
    # true: replay the rollouts topic from its beginning (the Kafka settings
    # are the top-level ``kafka``); the replay ends once every partition has
    # been read to its end and no record came for ``replay_idle_s``.
    rollouts: bool = False
    replay_idle_s: float = 3.0
    # Rollouts only: which score is the reward (as ppo.reward_source).
    reward_source: str = "raw"
    # JSONL only: end every completion with the tokenizer's end-of-sequence
    # token, so the policy learns where a sample stops (rollouts carry theirs),
    # except rows marked "truncated": true (cut at a length limit, not ended).
    append_eos: bool = True

    def validate(self, prefix: str) -> None:
        require((self.jsonl is not None) != self.rollouts, f"{prefix}.jsonl",
                f"give exactly one source: {prefix}.jsonl (a file) or {prefix}.rollouts: true", self.jsonl)
        if self.jsonl is not None:
            require(Path(self.jsonl).is_file(), f"{prefix}.jsonl", "must be an existing JSON-lines file", self.jsonl)
        require(math.isfinite(self.replay_idle_s) and self.replay_idle_s > 0, f"{prefix}.replay_idle_s",
                "must be > 0 seconds", self.replay_idle_s)
        require_choice(self.reward_source, f"{prefix}.reward_source", REWARD_SOURCES)


@dataclass(frozen=True)
class ILQLConfig:
    # The initial policy: a Hugging Face causal-LM directory (one with ILQL
    # heads continues training them).
    model_dir: str = ""
    # output_dir/policy: the trained policy (a Hugging Face directory) with
    # its heads beside it; output_dir/checkpoints: one per epoch.
    output_dir: str = "runs/ilql"
    # The version label written into the policy's arbiter.json.
    version: str = "ilql"
    epochs: int = 4
    batch_size: int = 8
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    torch_threads: int | None = None
    keep_checkpoints: int = 2
    ilql: ILQLLossConfig = field(default_factory=ILQLLossConfig)
    data: ILQLDataConfig = field(default_factory=ILQLDataConfig)
    # arbiter.stream.KafkaSettings for data.rollouts; ARBITER_KAFKA_* fill the rest.
    kafka: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(bool(self.model_dir), "model_dir", "must name the initial policy's Hugging Face directory",
                self.model_dir)
        require(bool(self.version) and "/" not in self.version, "version", "must be non-empty, without '/'",
                self.version)
        for name in ("epochs", "batch_size", "keep_checkpoints"):
            require(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        require(self.learning_rate > 0, "learning_rate", "must be > 0", self.learning_rate)
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        require(self.max_grad_norm > 0, "max_grad_norm", "must be > 0", self.max_grad_norm)
        if self.torch_threads is not None:
            require(self.torch_threads >= 1, "torch_threads", "must be >= 1 or null", self.torch_threads)
        self.ilql.validate("ilql")
        self.data.validate("data")


def load_ilql_config(path: str | Path, **overrides: Any) -> ILQLConfig:
    return load_config_file(ILQLConfig, path, "ILQL config", **overrides)


def ilql_config_from_dict(data: dict[str, Any]) -> ILQLConfig:
    return config_from_mapping(ILQLConfig, data)
