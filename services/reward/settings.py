from __future__ import annotations

from dataclasses import dataclass, field

from arbiter.config import flag, require
from arbiter.drift import DriftConfig
from arbiter.reward.engine import RewardEngineConfig
from arbiter.stream import KafkaSettings
from services.common.settings import BatchedModelServerSettings


@dataclass(frozen=True)
class RewardSettings(BatchedModelServerSettings):
    model_dir: str = field(default="", metadata=flag(
        "--model", help="Hugging Face reward-model directory (num_labels=1); with --backend triton, REPO/NAME/N"))
    max_items_per_request: int = field(default=256, metadata=flag(help="items in one Score request"))
    # Requests of one ScoreStream processed concurrently; more wait (backpressure).
    stream_max_in_flight: int = field(default=64, metadata=flag(help="ScoreStream messages scored at once"))
    # Reward drift: window of recent scores vs the version's calibration set
    # (when it ships >= drift_min_samples scores) or its first served scores.
    drift_window_size: int = field(default=1000, metadata=flag(help="recent scores compared to the reference"))
    drift_reference_size: int = field(default=1000, metadata=flag(help="first served scores used as reference"))
    drift_min_samples: int = 100
    # SubmitPreference appends human preferences to the preferences topic
    # here (services/reward/feedback.py); None: that RPC is FAILED_PRECONDITION.
    kafka: KafkaSettings | None = field(default=None, metadata=flag(None))

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
        require(self.max_items_per_request >= 1, "max_items_per_request", "must be >= 1", self.max_items_per_request)
        require(self.stream_max_in_flight >= 1, "stream_max_in_flight", "must be >= 1", self.stream_max_in_flight)

    def engine_config(self) -> RewardEngineConfig:
        return RewardEngineConfig(**self.engine_fields(), max_items_per_request=self.max_items_per_request)

    def drift_config(self) -> DriftConfig:
        return DriftConfig(
            window_size=self.drift_window_size,
            reference_size=self.drift_reference_size,
            min_samples=self.drift_min_samples,
        )
