from __future__ import annotations

from dataclasses import dataclass

from arbiter.batching import BatchingConfig
from arbiter.reference.engine import ReferenceEngineConfig
from services.common.backend import backend_config, check_backend_settings
from services.common.settings import ServerSettings, require


@dataclass(frozen=True)
class ReferenceSettings(ServerSettings):
    model_dir: str = ""
    # Overrides the version label in the checkpoint's arbiter.json.
    model_version: str | None = None
    max_batch_size: int = 16
    # None: 2 ms in-process; 0 with Triton, whose own dynamic batcher does the
    # waiting (while Arbiter's batches are in flight, new sequences still
    # accumulate into the next one).
    max_queue_delay_ms: float | None = None
    max_queue_size: int = 4096
    max_sequences_per_request: int = 256
    dynamic_batching: bool = True
    max_tokens: int | None = None
    # Where forward passes run (services/common/backend.py). With "triton",
    # model_dir is a version directory REPO/NAME/N of the exported repository.
    backend: str = "torch"
    triton_url: str = ""
    triton_model: str = ""
    triton_timeout_s: float = 30.0
    triton_retry_s: float = 10.0
    triton_max_in_flight: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.model_dir), "model_dir", "must name a Hugging Face causal-LM directory", self.model_dir)
        require(self.max_batch_size >= 1, "max_batch_size", "must be >= 1", self.max_batch_size)
        if self.max_queue_delay_ms is not None:
            require(
                self.max_queue_delay_ms >= 0, "max_queue_delay_ms", "must be >= 0 or unset", self.max_queue_delay_ms
            )
        require(
            self.max_queue_size >= self.max_batch_size,
            "max_queue_size", f"must be >= max_batch_size ({self.max_batch_size})", self.max_queue_size,
        )
        require(
            self.max_sequences_per_request >= 1, "max_sequences_per_request", "must be >= 1",
            self.max_sequences_per_request,
        )
        if self.max_tokens is not None:
            require(self.max_tokens >= 1, "max_tokens", "must be >= 1 or unset", self.max_tokens)
        check_backend_settings(self)

    def queue_delay_ms(self) -> float:
        if self.max_queue_delay_ms is not None:
            return self.max_queue_delay_ms
        return 0.0 if self.backend == "triton" else 2.0

    def engine_config(self) -> ReferenceEngineConfig:
        return ReferenceEngineConfig(
            batching=BatchingConfig(
                max_batch_size=self.max_batch_size,
                max_queue_delay_s=self.queue_delay_ms() / 1000.0,
                max_queue_size=self.max_queue_size,
                enabled=self.dynamic_batching,
            ),
            max_sequences_per_request=self.max_sequences_per_request,
            max_tokens=self.max_tokens,
            base_model_dir=self.model_dir,
            backend=backend_config(self),
        )
