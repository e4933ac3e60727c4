from __future__ import annotations

from dataclasses import dataclass

from arbiter.reference.engine import ReferenceEngineConfig
from services.common.backend import backend_config, batching_config, check_backend_settings, check_batching_settings
from arbiter.config import require
from services.common.settings import ServerSettings


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
        check_batching_settings(self)
        require(
            self.max_sequences_per_request >= 1, "max_sequences_per_request", "must be >= 1",
            self.max_sequences_per_request,
        )
        if self.max_tokens is not None:
            require(self.max_tokens >= 1, "max_tokens", "must be >= 1 or unset", self.max_tokens)
        check_backend_settings(self)

    def engine_config(self) -> ReferenceEngineConfig:
        return ReferenceEngineConfig(
            batching=batching_config(self),
            max_sequences_per_request=self.max_sequences_per_request,
            max_tokens=self.max_tokens,
            base_model_dir=self.model_dir,
            backend=backend_config(self),
        )
