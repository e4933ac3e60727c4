"""Rollout-worker settings: validated when constructed; errors name the field."""

from __future__ import annotations

import math
import os
import socket
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path

from arbiter.config import flag, require, require_choice
from arbiter.stream import KafkaSettings
from arbiter.types import Truncation
from services.worker.gold import GOLD_SCORERS

TRUNCATIONS = tuple(t.value for t in Truncation)
# Past a few batches more depth buys nothing (generation cannot run further
# ahead than scoring keeps up) and each one holds a thread and its prompts.
MAX_PIPELINE_DEPTH = 16


def default_worker_id() -> str:
    # Unique per process, readable in logs: several workers may share a host.
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


@dataclass(frozen=True)
class WorkerSettings:
    # gRPC targets (HOST:PORT, or several replicas: ipv4:H:P,H:P / dns:///name).
    policy_target: str = field(default="", metadata=flag("--policy", help="HOST:PORT of the policy service"))
    reward_target: str = field(default="", metadata=flag("--reward", help="HOST:PORT of the reward service"))
    reference_target: str = field(default="", metadata=flag(
        "--reference", help="HOST:PORT of the reference service"))
    # The prompt source of run(): a JSON-lines file, or the prompts topic
    # (run_once takes its prompts as an argument and needs neither).
    # Their flags (--prompts FILE | --prompts-topic) are one required choice: services/worker/main.py.
    prompts_file: str | None = field(default=None, metadata=flag(None))
    prompts_topic: bool = field(default=False, metadata=flag(None))
    # File source: passes over the file (0: forever), reshuffled each pass.
    passes: int = field(default=0, metadata=flag(help="passes over --prompts (0: loop forever)"))
    shuffle: bool = field(default=False, metadata=flag(help="shuffle --prompts every pass (with --seed)"))
    # Stop once this many rollouts were produced (None: never). Groups are
    # never split, so the last batch may overshoot by < samples_per_prompt.
    max_rollouts: int | None = field(default=None, metadata=flag(help="stop after producing this many rollouts"))
    # Asynchronous generation with a bounded staleness (services/worker/
    # staleness.py, AReaL's rule): the worker generates while the trainer
    # trains, but no further ahead than lets its rollouts be trained at most
    # max_staleness policy versions after the one that sampled them. Needs
    # trainer_batch_size (the trainer's ppo.batch_size); the budget is the
    # topic's, so several workers share it without knowing of each other. Set
    # the trainer's ppo.max_staleness to the same bound. None: unbounded.
    max_staleness: int | None = field(default=None, metadata=flag(
        help="policy versions a rollout may lag when trained: generate ahead of the trainer only this far"))
    trainer_batch_size: int | None = field(default=None, metadata=flag(
        help="the trainer's ppo.batch_size (with --max-staleness)"))
    # Replaced by max_staleness; setting it is refused with what to set instead.
    max_rollouts_per_version: int | None = field(default=None, metadata=flag(
        help="removed: use --max-staleness and --trainer-batch-size"))
    # Batches in flight at once: the worker generates the next batch while
    # the reward and reference services work on the previous ones (both at
    # once), so the policy is not idle waiting for them. 1: one batch and one
    # call at a time. Each batch in flight holds its prompts uncommitted and
    # a thread or two.
    pipeline_depth: int = field(default=2, metadata=flag(
        help="batches in flight: generate the next while earlier ones are scored (1: one call at a time)"))
    # How often a worker waiting for the trainer (max_staleness) asks the
    # policy for its active version. An Info call is cheap; at 0.5 s the worker
    # found each new version ~0.25 s late on average, half a demo update, while
    # the trainer ran out of rollouts.
    version_poll_s: float = field(default=0.05, metadata=flag(help="how often a waiting worker asks for the version"))
    # Sampling. One Generate call = prompts_per_call prompts x samples_per_prompt.
    samples_per_prompt: int = field(default=4, metadata=flag(help="samples per prompt (one group)"))
    prompts_per_call: int = field(default=8, metadata=flag(help="prompts per Generate call"))
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = field(default=0, metadata=flag(help="0: off"))
    top_p: float = field(default=1.0, metadata=flag(help="1: off"))
    stop: tuple[str, ...] = field(default=(), metadata=flag(action="append", help="stop string (repeatable)"))
    # NLPO (the trainer's ppo.nlpo.top_p): sample under the action mask the
    # trainer announces with each version (PolicyUpdate.mask_version), from
    # the policy's serving version at start until the first announcement.
    nlpo_top_p: float | None = field(default=None, metadata=flag(
        help="NLPO: sample under the trainer's action mask with this top-p (its ppo.nlpo.top_p)"))
    # Seeds the shuffle and every Generate call (seed + call number), for
    # reproducible runs; give concurrent workers different seeds. None: random.
    seed: int | None = field(default=None, metadata=flag(
        help="seeds the shuffle and generation (seed + call number)"))
    # What the reward service does with a sample longer than the RM's limit
    # (a Truncation or its name). LEFT keeps the end of the response, where a
    # last-token RM head reads.
    reward_truncation: Truncation = field(default=Truncation.LEFT, metadata=flag(
        help="samples longer than the RM's limit: keep the end (left), the start (right), or fail"))
    # Held-out scorer of the completion text, stored as Rollout.gold_score.
    gold: str | None = field(default=None, metadata=flag(
        choices=sorted(GOLD_SCORERS), help="also store a gold score of each completion"))
    worker_id: str = field(default_factory=default_worker_id, metadata=flag(help="default: HOST-PID-random"))
    kafka: KafkaSettings = field(default_factory=KafkaSettings, metadata=flag(None))
    # Create the rollouts (and prompts) topics if missing, with their final
    # partition counts; off by default: production topics are provisioned.
    create_topics: bool = field(default=False, metadata=flag(
        help="create missing topics (final partition counts)"))
    metrics_host: str = "127.0.0.1"
    # None: no /metrics endpoint. 0: any free port.
    metrics_port: int | None = field(default=None, metadata=flag(help="serve Prometheus /metrics on this port"))
    # Deadline of one RPC; a Generate of prompts_per_call x n samples must fit.
    rpc_timeout_s: float = field(default=120.0, metadata=flag("--rpc-timeout", help="deadline per RPC, seconds"))
    # How long start() waits for the three services to answer.
    connect_timeout_s: float = field(default=120.0, metadata=flag(
        "--connect-timeout", help="wait this long for the services"))
    # Backoff between attempts of a stage that failed transiently
    # (UNAVAILABLE / DEADLINE_EXCEEDED after the channel's own retries).
    retry_initial_backoff_s: float = field(default=0.5, metadata=flag(
        "--retry-initial-backoff", help="first wait between retries, seconds"))
    retry_max_backoff_s: float = field(default=10.0, metadata=flag(
        "--retry-max-backoff", help="longest wait between retries, seconds"))
    tls_ca_file: str | None = field(default=None, metadata=flag(help="CA bundle for TLS services"))
    # This worker's certificate, for services that require one (mTLS).
    tls_cert_file: str | None = field(default=None, metadata=flag(help="client certificate for mTLS services"))
    tls_key_file: str | None = field(default=None, metadata=flag(help="key of --tls-cert-file"))
    auth_token: str | None = field(default=None, repr=False, metadata=flag(None))

    def __post_init__(self) -> None:
        for name in ("policy_target", "reward_target", "reference_target"):
            require(bool(getattr(self, name)), name, "must be HOST:PORT of the service", getattr(self, name))
        require(
            self.prompts_file is None or not self.prompts_topic,
            "prompts_file/prompts_topic", "set one prompt source: a JSON-lines file or the prompts topic, not both",
            (self.prompts_file, self.prompts_topic),
        )
        require(self.passes >= 0, "passes", "must be >= 0 (0 loops over the file forever)", self.passes)
        if self.max_rollouts is not None:
            require(self.max_rollouts >= 1, "max_rollouts", "must be >= 1 or unset", self.max_rollouts)
        require(
            self.max_rollouts_per_version is None, "max_rollouts_per_version",
            "was removed: it held generation to one batch per policy version, so generation never overlapped "
            "training. Set max_staleness (policy versions a rollout may lag when trained, e.g. 1; the trainer's "
            "ppo.max_staleness) and trainer_batch_size (the trainer's ppo.batch_size) instead",
            self.max_rollouts_per_version,
        )
        if self.max_staleness is not None:
            require(
                isinstance(self.max_staleness, int) and self.max_staleness >= 1, "max_staleness",
                "must be an integer >= 1 or unset: the worker generates while the trainer trains, so a rollout is "
                "at least one version old when trained (0 would allow nothing to be generated during an update)",
                self.max_staleness,
            )
            require(
                self.trainer_batch_size is not None and self.trainer_batch_size >= 1, "trainer_batch_size",
                "must be the trainer's ppo.batch_size (>= 1) when max_staleness is set: the budget is counted "
                "in training batches", self.trainer_batch_size,
            )
        require(
            isinstance(self.pipeline_depth, int) and 1 <= self.pipeline_depth <= MAX_PIPELINE_DEPTH, "pipeline_depth",
            f"must be an integer in 1..{MAX_PIPELINE_DEPTH} (1: one batch at a time)", self.pipeline_depth,
        )
        require(self.version_poll_s > 0, "version_poll_s", "must be > 0", self.version_poll_s)
        require(self.samples_per_prompt >= 1, "samples_per_prompt", "must be >= 1", self.samples_per_prompt)
        require(self.prompts_per_call >= 1, "prompts_per_call", "must be >= 1", self.prompts_per_call)
        require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1", self.max_new_tokens)
        require(
            math.isfinite(self.temperature) and self.temperature > 0, "temperature",
            "must be > 0: RL trains on samples of the policy's distribution (0 would be greedy decoding)",
            self.temperature,
        )
        require(self.top_k >= 0, "top_k", "must be >= 0 (0: no top-k filtering)", self.top_k)
        require(
            math.isfinite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1] (1: no nucleus filtering)",
            self.top_p,
        )
        if self.nlpo_top_p is not None:
            require(math.isfinite(self.nlpo_top_p) and 0 < self.nlpo_top_p <= 1, "nlpo_top_p",
                    "must be in (0, 1] (the trainer's ppo.nlpo.top_p), or unset", self.nlpo_top_p)
        object.__setattr__(self, "stop", tuple(self.stop))
        require(all(bool(s) for s in self.stop), "stop", "stop strings must be non-empty", self.stop)
        if not isinstance(self.reward_truncation, Truncation):
            require_choice(self.reward_truncation, "reward_truncation", TRUNCATIONS)
            object.__setattr__(self, "reward_truncation", Truncation(self.reward_truncation))
        if self.gold is not None:
            require(
                self.gold in GOLD_SCORERS, "gold", f"must be one of {', '.join(sorted(GOLD_SCORERS))} or unset",
                self.gold,
            )
        require(bool(self.worker_id.strip()), "worker_id", "must not be empty", self.worker_id)
        require(isinstance(self.kafka, KafkaSettings), "kafka", "must be KafkaSettings", type(self.kafka).__name__)
        if self.metrics_port is not None:
            require(0 <= self.metrics_port <= 65535, "metrics_port", "must be in 0..65535 or unset", self.metrics_port)
        for name in ("rpc_timeout_s", "connect_timeout_s", "retry_initial_backoff_s"):
            require(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        require(
            self.retry_max_backoff_s >= self.retry_initial_backoff_s, "retry_max_backoff_s",
            f"must be >= retry_initial_backoff_s ({self.retry_initial_backoff_s})", self.retry_max_backoff_s,
        )
        require((self.tls_cert_file is None) == (self.tls_key_file is None), "tls_cert_file/tls_key_file",
                "set both or neither", (self.tls_cert_file, self.tls_key_file))
        for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            if getattr(self, name) is not None:
                require(Path(getattr(self, name)).is_file(), name, "must be an existing file", getattr(self, name))
        if self.auth_token is not None:
            require(len(self.auth_token) >= 16, "auth_token", "must be at least 16 characters", "<hidden>")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
