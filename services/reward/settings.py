from __future__ import annotations

from dataclasses import dataclass

from arbiter.drift import DriftConfig
from arbiter.reward.engine import RewardEngineConfig
from arbiter.stream import KafkaSettings
from services.common.backend import backend_config, batching_config, check_backend_settings, check_batching_settings
from arbiter.config import require
from services.common.settings import ServerSettings


@dataclass(frozen=True)
class RewardSettings(ServerSettings):
    model_dir: str = ""
    # Overrides the version label in the checkpoint's arbiter.json.
    model_version: str | None = None
    max_batch_size: int = 32
    # None: 2 ms in-process; 0 with Triton, whose own dynamic batcher does the
    # waiting (waiting twice only adds latency; while Arbiter's batches are in
    # flight, new items still accumulate into the next one).
    max_queue_delay_ms: float | None = None
    max_queue_size: int = 4096
    max_items_per_request: int = 256
    dynamic_batching: bool = True
    max_tokens: int | None = None
    # Requests of one ScoreStream processed concurrently; more wait (backpressure).
    stream_max_in_flight: int = 64
    # Reward drift: window of recent scores vs the version's calibration set
    # (when it ships >= drift_min_samples scores) or its first served scores.
    drift_window_size: int = 1000
    drift_reference_size: int = 1000
    drift_min_samples: int = 100
    # Where forward passes run (services/common/backend.py). With "triton",
    # model_dir is a version directory REPO/NAME/N of the exported repository.
    backend: str = "torch"
    triton_url: str = ""
    triton_model: str = ""
    triton_timeout_s: float = 30.0
    triton_retry_s: float = 10.0
    triton_max_in_flight: int = 2

    # SubmitPreference appends human preferences to the preferences topic
    # here (services/reward/feedback.py); None: that RPC is FAILED_PRECONDITION.
    kafka: KafkaSettings | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.kafka is None or isinstance(self.kafka, KafkaSettings), "kafka", "must be KafkaSettings or unset",
                self.kafka)
        for name in ("drift_window_size", "drift_reference_size", "drift_min_samples"):
            require(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        require(
            self.drift_min_samples <= min(self.drift_window_size, self.drift_reference_size),
            "drift_min_samples", "must be <= drift_window_size and drift_reference_size", self.drift_min_samples,
        )
        require(bool(self.model_dir), "model_dir", "must name a Hugging Face reward-model directory", self.model_dir)
        check_batching_settings(self)
        require(self.max_items_per_request >= 1, "max_items_per_request", "must be >= 1", self.max_items_per_request)
        if self.max_tokens is not None:
            require(self.max_tokens >= 1, "max_tokens", "must be >= 1 or unset", self.max_tokens)
        require(self.stream_max_in_flight >= 1, "stream_max_in_flight", "must be >= 1", self.stream_max_in_flight)
        check_backend_settings(self)

    def engine_config(self) -> RewardEngineConfig:
        return RewardEngineConfig(
            batching=batching_config(self),
            max_items_per_request=self.max_items_per_request,
            max_tokens=self.max_tokens,
            backend=backend_config(self),
        )

    def drift_config(self) -> DriftConfig:
        return DriftConfig(
            window_size=self.drift_window_size,
            reference_size=self.drift_reference_size,
            min_samples=self.drift_min_samples,
        )
