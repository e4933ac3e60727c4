from __future__ import annotations

from dataclasses import dataclass, field

from arbiter.config import ConfigError, flag, require, require_choice
from arbiter.drift import DriftConfig
from arbiter.limits import MiB, SizeLimits
from arbiter.reward.composite import RewardSpec, load_spec_file
from arbiter.reward.engine import RewardEngineConfig
from arbiter.reward.ensemble import STACK_MODES
from arbiter.reward.convention import TEXT_CONVENTIONS
from arbiter.stream import KafkaSettings
from services.common.settings import BatchedModelServerSettings


@dataclass(frozen=True)
class RewardSettings(BatchedModelServerSettings):
    model_dir: str = field(default="", metadata=flag(
        "--model", help="Hugging Face reward-model directory (num_labels=1); with --backend triton, REPO/NAME/N"))
    max_items_per_request: int = field(default=256, metadata=flag(help="items in one Score request"))
    # How plain text is built for versions whose checkpoint does not say
    # (arbiter.json's text_convention always wins): "auto" detects TRL's
    # RewardTrainer checkpoints (end token appended) and leaves others as given.
    text_convention: str = field(default="auto", metadata=flag(
        choices=TEXT_CONVENTIONS,
        help="for checkpoints whose arbiter.json has no text_convention: auto (detect TRL RewardTrainer "
             "checkpoints), append_eos (TRL's: prompt + response + end token), plain (prompt + response)"))
    # Bytes per item and per request as sent, checked before converting a request.
    sizes: SizeLimits = SizeLimits()
    # Requests are text (max_request_bytes of it, plus framing) and responses
    # a few numbers per item: gRPC refuses a bigger message before it is
    # parsed (RESOURCE_EXHAUSTED); other servers take 64 MiB.
    max_message_bytes: int = field(default=20 * MiB, metadata=flag(
        help="largest gRPC message either way; a bigger request is refused before it is parsed (RESOURCE_EXHAUSTED)"))
    # Requests of one ScoreStream processed concurrently; more wait (backpressure).
    stream_max_in_flight: int = field(default=64, metadata=flag(help="ScoreStream messages scored at once"))
    stream_max_messages: int = field(default=0, metadata=flag(help="messages in one ScoreStream (0: no limit)"))
    # Reward drift monitoring of served scores, per version.
    drift: DriftConfig = DriftConfig()
    # A composite reward (arbiter.reward.composite): a YAML file of weighted
    # terms (model versions, ensembles, rules) and the checkpoints to load for
    # them at startup. Requests that pin no version are scored with it.
    reward_spec_file: str | None = field(default=None, metadata=flag(
        help="YAML reward spec: a weighted sum of reward-model versions, ensembles (mean - k*std) and rule terms "
             "(length, regex, repetition); Score returns the total and each component"))
    # The same spec given directly (e.g. by a stack configuration); the file, when set, fills it.
    reward_spec: RewardSpec | None = field(default=None, metadata=flag(None))
    # Ensembles of interchangeable versions as one stacked forward pass (a
    # copy of their weights): auto stacks on CUDA only, where fewer, larger
    # kernels pay; on CPU the stacked pass measured slower at batch 16.
    stack_ensembles: str = field(default="auto", metadata=flag(
        choices=STACK_MODES, help="configured ensembles of one architecture as one stacked forward pass: auto "
                                  "(on CUDA), always, never (member by member; no stacked copy of their weights)"))
    # SubmitPreference appends human preferences to the preferences topic
    # here (services/reward/feedback.py); None: that RPC is FAILED_PRECONDITION.
    kafka: KafkaSettings | None = field(default=None, metadata=flag(None))

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.kafka is None or isinstance(self.kafka, KafkaSettings), "kafka", "must be KafkaSettings or unset",
                self.kafka)
        require_choice(self.text_convention, "text_convention", TEXT_CONVENTIONS)
        require_choice(self.stack_ensembles, "stack_ensembles", STACK_MODES)
        require(self.max_items_per_request >= 1, "max_items_per_request", "must be >= 1", self.max_items_per_request)
        require(self.stream_max_in_flight >= 1, "stream_max_in_flight", "must be >= 1", self.stream_max_in_flight)
        require(self.stream_max_messages >= 0, "stream_max_messages", "must be >= 0 (0: no limit)",
                self.stream_max_messages)
        self.sizes.require_within(self.max_message_bytes)
        if self.reward_spec_file is not None:
            try:
                spec = load_spec_file(self.reward_spec_file)
            except ConfigError as err:
                raise err.under("reward_spec_file") from None
            require(self.reward_spec in (None, spec), "reward_spec", "set it or reward_spec_file, not both",
                    self.reward_spec)
            object.__setattr__(self, "reward_spec", spec)
        if self.reward_spec is not None:
            require(isinstance(self.reward_spec, RewardSpec), "reward_spec", "must be a RewardSpec", self.reward_spec)
            # --model plus the spec's models, all kept loaded (they are pinned).
            needed = 1 + len(self.reward_spec.models)
            require(not self.max_loaded_versions or self.max_loaded_versions >= needed, "max_loaded_versions",
                    f"must be >= {needed} (--model and the reward spec's {needed - 1} models; one more leaves room "
                    "for a candidate) or 0", self.max_loaded_versions)

    @property
    def max_receive_bytes(self) -> int:
        return self.sizes.receive_limit(self.max_message_bytes)

    def engine_config(self) -> RewardEngineConfig:
        return RewardEngineConfig(**self.engine_fields(), max_items_per_request=self.max_items_per_request,
                                  text_convention=self.text_convention, sizes=self.sizes,
                                  reward_spec=self.reward_spec, stack_ensembles=self.stack_ensembles)
