from __future__ import annotations

from dataclasses import dataclass

from arbiter.policy.engine import PolicyEngineConfig
from services.common.settings import ServerSettings, require


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

    def __post_init__(self) -> None:
        super().__post_init__()
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
