from __future__ import annotations

from dataclasses import dataclass, field

from arbiter.batching import BatchingConfig
from arbiter.config import flag, require
from arbiter.limits import MiB
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
    # Requests are token ids, 2-3 bytes each as sent (256 LogProbs sequences
    # of ~20k tokens fit; KL adds 4 bytes of policy log-prob per completion
    # token). gRPC refuses a bigger request before it is parsed (parsing
    # holds the event loop; see arbiter.limits). Responses, 4 bytes of
    # log-prob per token, are bounded by max_message_bytes.
    max_request_bytes: int = field(default=16 * MiB, metadata=flag(
        help="bytes of one request as sent; a bigger one is refused before it is parsed (RESOURCE_EXHAUSTED)"))

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.max_sequences_per_request >= 1, "max_sequences_per_request", "must be >= 1",
            self.max_sequences_per_request,
        )
        require(1024 <= self.max_request_bytes <= self.max_message_bytes, "max_request_bytes",
                f"must be in 1024..max_message_bytes ({self.max_message_bytes})", self.max_request_bytes)

    @property
    def max_receive_bytes(self) -> int:
        return self.max_request_bytes

    def engine_config(self) -> ReferenceEngineConfig:
        return ReferenceEngineConfig(
            **self.engine_fields(),
            max_sequences_per_request=self.max_sequences_per_request,
            # LoRA adapters loaded later apply to the server's base model.
            base_model_dir=self.model_dir,
        )
