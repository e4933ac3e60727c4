from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field

from arbiter.config import flag, require
from arbiter.policy.engine import PolicyEngineConfig
from arbiter.stream import KafkaSettings
from services.common.settings import ModelServerSettings

_REPLICA_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


@dataclass(frozen=True)
class PolicySettings(ModelServerSettings):
    port: int = 50052
    model_dir: str = field(default="", metadata=flag(
        "--model", help="Hugging Face causal-LM directory (the initial policy)"))
    # A new version per trainer update: keep the serving one and its predecessor.
    max_loaded_versions: int = field(default=2, metadata=flag(
        help="loaded versions kept; older inactive ones are unloaded (0: no limit)"))
    max_prompts_per_request: int = 64
    max_samples_per_prompt: int = field(default=16, metadata=flag(help="limit on sampling.n"))
    max_rows_per_request: int = field(default=256, metadata=flag(help="limit on prompts x n"))
    # Upper limit a request may ask for; requests without one get the default.
    max_new_tokens: int = field(default=1024, metadata=flag(help="limit on sampling.max_new_tokens"))
    default_max_new_tokens: int = 64
    max_stop_strings: int = 8
    max_concurrent_generations: int = 8
    # Follow the policy-updates topic: load and activate each new version.
    follow_updates: bool = field(default=False, metadata=flag(
        help="load and activate each new version published on the policy-updates topic (needs --kafka-*)"))
    # Names this replica's consumer group; must differ between replicas
    # (default: HOST-PID).
    replica_id: str = field(default="", metadata=flag(
        help="this replica's consumer-group suffix, unique per replica (default: HOST-PID)"))
    kafka: KafkaSettings | None = field(default=None, metadata=flag(None))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.replica_id:
            default = re.sub(r"[^A-Za-z0-9._-]", "-", f"{socket.gethostname()}-{os.getpid()}")[-100:]
            object.__setattr__(self, "replica_id", default)
        require(
            _REPLICA_ID_RE.match(self.replica_id) is not None, "replica_id",
            "may only use letters, digits, '.', '_' and '-' (1..100 characters)", self.replica_id,
        )
        require(self.backend.kind == "torch", "backend",
                "policy generation runs in-process only (torch); Triton generation is not supported", self.backend.kind)
        if self.follow_updates:
            require(
                isinstance(self.kafka, KafkaSettings), "kafka",
                "follow_updates needs KafkaSettings (--kafka-bootstrap-servers or ARBITER_KAFKA_*)", self.kafka,
            )
        for name in (
            "max_prompts_per_request", "max_samples_per_prompt", "max_rows_per_request", "max_new_tokens",
            "default_max_new_tokens", "max_concurrent_generations",
        ):
            require(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        require(self.max_stop_strings >= 0, "max_stop_strings", "must be >= 0", self.max_stop_strings)
        require(
            self.default_max_new_tokens <= self.max_new_tokens,
            "default_max_new_tokens", f"must be <= max_new_tokens ({self.max_new_tokens})",
            self.default_max_new_tokens,
        )

    def engine_config(self) -> PolicyEngineConfig:
        return PolicyEngineConfig(
            max_prompts_per_request=self.max_prompts_per_request,
            max_samples_per_prompt=self.max_samples_per_prompt,
            max_rows_per_request=self.max_rows_per_request,
            max_new_tokens_limit=self.max_new_tokens,
            default_max_new_tokens=self.default_max_new_tokens,
            max_stop_strings=self.max_stop_strings,
            max_concurrent_generations=self.max_concurrent_generations,
            max_loaded_versions=self.max_loaded_versions,
            max_tokens=self.max_tokens,
            base_model_dir=self.model_dir,
        )
