from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

from arbiter.policy.engine import PolicyEngineConfig
from arbiter.stream import KafkaSettings
from arbiter.config import require
from services.common.settings import ServerSettings

_REPLICA_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


@dataclass(frozen=True)
class PolicySettings(ServerSettings):
    model_dir: str = ""
    # Overrides the version label in the checkpoint's arbiter.json.
    model_version: str | None = None
    max_prompts_per_request: int = 64
    max_samples_per_prompt: int = 16
    max_rows_per_request: int = 256
    # Upper limit a request may ask for; requests without one get the default.
    max_new_tokens: int = 1024
    default_max_new_tokens: int = 64
    max_stop_strings: int = 8
    max_concurrent_generations: int = 8
    max_loaded_versions: int = 2
    max_tokens: int | None = None
    # Follow the policy-updates topic: load and activate each new version.
    follow_updates: bool = False
    # Names this replica's consumer group; must differ between replicas
    # (default: HOST-PID).
    replica_id: str = ""
    kafka: KafkaSettings | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.replica_id:
            default = re.sub(r"[^A-Za-z0-9._-]", "-", f"{socket.gethostname()}-{os.getpid()}")[-100:]
            object.__setattr__(self, "replica_id", default)
        require(
            _REPLICA_ID_RE.match(self.replica_id) is not None, "replica_id",
            "may only use letters, digits, '.', '_' and '-' (1..100 characters)", self.replica_id,
        )
        if self.follow_updates:
            require(
                isinstance(self.kafka, KafkaSettings), "kafka",
                "follow_updates needs KafkaSettings (--kafka-bootstrap-servers or ARBITER_KAFKA_*)", self.kafka,
            )
        require(bool(self.model_dir), "model_dir", "must name a Hugging Face causal-LM directory", self.model_dir)
        for name in (
            "max_prompts_per_request", "max_samples_per_prompt", "max_rows_per_request", "max_new_tokens",
            "default_max_new_tokens", "max_concurrent_generations", "max_loaded_versions",
        ):
            require(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        require(self.max_stop_strings >= 0, "max_stop_strings", "must be >= 0", self.max_stop_strings)
        require(
            self.default_max_new_tokens <= self.max_new_tokens,
            "default_max_new_tokens", f"must be <= max_new_tokens ({self.max_new_tokens})",
            self.default_max_new_tokens,
        )
        if self.max_tokens is not None:
            require(self.max_tokens >= 1, "max_tokens", "must be >= 1 or unset", self.max_tokens)

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
