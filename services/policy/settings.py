from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import dataclass, field

from arbiter.config import flag, require
from arbiter.limits import MiB
from arbiter.policy.engine import GenerationLimits, PolicyEngineConfig
from arbiter.policy.scheduler import DecodingConfig
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
    limits: GenerationLimits = GenerationLimits()
    decoding: DecodingConfig = DecodingConfig()
    # Requests are text (limits.sizes.max_request_bytes of it); responses echo
    # prompt token ids, so 256 rows of 32k-token prompts (~24 MiB) still fit.
    # gRPC refuses a bigger message before it is parsed (RESOURCE_EXHAUSTED).
    max_message_bytes: int = field(default=32 * MiB, metadata=flag(
        help="largest gRPC message either way; a bigger request is refused before it is parsed (RESOURCE_EXHAUSTED)"))
    # Follow the policy-updates topic: load and activate each new version.
    follow_updates: bool = field(default=False, metadata=flag(
        help="load and activate each new version published on the policy-updates topic (needs --kafka-*)"))
    # Names this replica's consumer group; must differ between replicas
    # (default: HOST-PID).
    replica_id: str = field(default="", metadata=flag(
        help="this replica's consumer-group suffix, unique per replica (default: HOST-PID)"))
    # Where versions announced with a weights_uri (s3:// or file://) are
    # downloaded and verified before loading (default: a new temporary directory).
    weights_cache_dir: str = field(default="", metadata=flag(
        help="directory for versions fetched from a weights store (default: a temporary directory)"))
    # The store locations an update's weights_uri may name (the object-storage
    # analogue of model_roots): s3://bucket/prefix or file:///dir, prefixes
    # matched at a "/" boundary. Empty: any s3:// URI, file:// only under
    # model_roots. Set it wherever the policy-updates topic is writable by
    # more than the trainer.
    weights_uri_prefixes: tuple[str, ...] = field(default=(), metadata=flag(
        "--weights-uri-prefix", action="append", metavar="URI",
        help="a store location updates may fetch weights from (repeatable; default: any s3:// URI)"))
    kafka: KafkaSettings | None = field(default=None, metadata=flag(None))
    # Versions shipping ILQL heads (`arbiter train ilql`) sample with
    # logits + β·(min Q̂ − V); unset, this server refuses them.
    ilql_beta: float | None = field(default=None, metadata=flag(
        help="β of ILQL's perturbed sampling for versions that ship ILQL heads (unset: such versions are refused)"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.replica_id:
            default = re.sub(r"[^A-Za-z0-9._-]", "-", f"{socket.gethostname()}-{os.getpid()}")[-100:]
            object.__setattr__(self, "replica_id", default)
        require(
            _REPLICA_ID_RE.match(self.replica_id) is not None, "replica_id",
            "may only use letters, digits, '.', '_' and '-' (1..100 characters)", self.replica_id,
        )
        self.limits.sizes.require_within(self.max_message_bytes)
        if self.backend.remote:
            # Triton runs the engine with the budget it was exported with; a
            # service-side value would be silently ignored.
            for name, value in vars(self.decoding).items():
                default = getattr(DecodingConfig(), name)
                require(value == default, name,
                        f"with --backend triton the decoding budget is the exported model's: set it with `arbiter "
                        f"triton export --kind policy --{name.replace('_', '-')}` (leave it unset here)", value)
        # Generation's decode scheduler and KV cache live on the policy's model thread, not behind a batch forward.
        require(not self.backend.model_process, "model_process",
                "applies to the reward and reference services (the policy engine decodes in the service process)",
                self.backend.model_process)
        require(not self.backend.compile, "compile",
                "applies to the reward and reference services (the policy engine's decode steps are not compiled)",
                self.backend.compile)
        if self.ilql_beta is not None:
            require(math.isfinite(self.ilql_beta) and self.ilql_beta >= 0, "ilql_beta",
                    "must be a finite number >= 0 (0 samples the policy alone)", self.ilql_beta)
            require(not self.backend.remote, "ilql_beta",
                    "needs --backend inprocess: the Triton policy backend decodes without the ILQL heads", self.ilql_beta)
        object.__setattr__(self, "weights_uri_prefixes", tuple(p.rstrip("/") for p in self.weights_uri_prefixes))
        for prefix in self.weights_uri_prefixes:
            require(prefix.startswith(("s3://", "file:///")), "weights_uri_prefixes",
                    "must be s3://BUCKET[/PREFIX] or file:///DIR", prefix)
        if self.follow_updates:
            require(
                isinstance(self.kafka, KafkaSettings), "kafka",
                "follow_updates needs KafkaSettings (--kafka-bootstrap-servers or ARBITER_KAFKA_*)", self.kafka,
            )

    @property
    def max_receive_bytes(self) -> int:
        return self.limits.sizes.receive_limit(self.max_message_bytes)

    def engine_config(self) -> PolicyEngineConfig:
        return PolicyEngineConfig(self.limits, self.decoding, self.max_loaded_versions, self.max_tokens,
                                  base_model_dir=self.model_dir, load_timeout_s=self.load_timeout_s,
                                  placement=self.backend.placement(), backend=self.backend,
                                  ilql_beta=self.ilql_beta)
