from __future__ import annotations

from dataclasses import dataclass, field

from arbiter.batching import BatchingConfig
from arbiter.config import flag, require
from arbiter.reference.engine import ReferenceEngineConfig
from services.common.settings import BatchedModelServerSettings


@dataclass(frozen=True)
class ReferenceSettings(BatchedModelServerSettings):
    port: int = 50053
    model_dir: str = field(default="", metadata=flag(
        "--model", help="Hugging Face causal-LM directory (the frozen reference); with --backend triton, REPO/NAME/N"))
    # Reference sequences are prompt + completion: longer than reward items.
    batching: BatchingConfig = BatchingConfig(max_batch_size=16)
    max_sequences_per_request: int = field(default=256, metadata=flag(help="sequences in one request"))

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.max_sequences_per_request >= 1, "max_sequences_per_request", "must be >= 1",
            self.max_sequences_per_request,
        )

    def engine_config(self) -> ReferenceEngineConfig:
        return ReferenceEngineConfig(
            **self.engine_fields(),
            max_sequences_per_request=self.max_sequences_per_request,
            # LoRA adapters loaded later apply to the server's base model.
            base_model_dir=self.model_dir,
        )
