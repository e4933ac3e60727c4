"""Rollout-worker metrics, declared once, on the worker's own registry."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from arbiter.stream import topics
from arbiter.stream.metrics import RejectedRecordsMetric
from services.common.metrics import LATENCY_BUCKETS

# Completion lengths in tokens.
LENGTH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Each stage's failures and time are counted under its own name; "wait_for_policy"
# is asking the policy for its version while the staleness bound (max_staleness) holds the worker.
STAGES = ("connect", "generate", "score", "reference", "produce", "commit", "wait_for_policy")
SKIP_REASONS = (
    "empty_completion", "prompt_rejected", "reward_rejected", "reference_rejected", "invalid_prompt_record",
)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.rollouts = Counter(
            "arbiter_worker_rollouts", "Rollouts acknowledged by the brokers (acks=all).", registry=registry,
        )
        self.prompts = Counter(
            "arbiter_worker_prompts", "Prompts sent to the policy (each yields samples_per_prompt samples).",
            registry=registry,
        )
        self.skipped = Counter(
            "arbiter_worker_samples_skipped", "Samples (or prompts) not turned into rollouts, by reason.",
            ["reason"], registry=registry,
        )
        self.errors = Counter(
            "arbiter_worker_errors",
            "Failed attempts of a pipeline stage (retried when transient, fatal otherwise).",
            ["stage"], registry=registry,
        )
        self.produce_errors = Counter(
            "arbiter_worker_produce_errors", "Rollout records the brokers did not acknowledge (re-sent).",
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "arbiter_worker_batch_seconds",
            "Wall time of one batch from generation to acknowledged (waiting for earlier batches included).",
            buckets=(*LATENCY_BUCKETS, 60.0, 120.0, 300.0), registry=registry,
        )
        self.stage_seconds = Histogram(
            "arbiter_worker_stage_seconds", "Wall time of one stage of a batch, retries included.",
            ["stage"], buckets=(*LATENCY_BUCKETS, 60.0, 120.0, 300.0), registry=registry,
        )
        self.batches_in_flight = Gauge(
            "arbiter_worker_batches_in_flight", "Batches taken and not yet settled (at most pipeline_depth).",
            registry=registry,
        )
        self.pipeline_wait_seconds = Counter(
            "arbiter_worker_pipeline_wait_seconds",
            "Time the worker waited for the oldest batch in flight before generating the next (the policy idle "
            "because scoring, reference log-probs or produce are behind).",
            registry=registry,
        )
        self.batches_dropped = Counter(
            "arbiter_worker_batches_dropped",
            "Batches taken but never produced (a fatal error, stopped during a retry, or after an earlier batch "
            "that was not produced); their prompts stay uncommitted.",
            registry=registry,
        )
        self.policy_version = Gauge(
            "arbiter_worker_last_policy_version",
            "1 for the policy version that generated the last batch (one series at a time).",
            ["model_version"], registry=registry,
        )
        self.waiting_for_policy = Gauge(
            "arbiter_worker_waiting_for_policy",
            "1 while the worker waits for the trainer: its staleness budget (max_staleness) is spent.",
            registry=registry,
        )
        self.staleness_budget = Gauge(
            "arbiter_worker_staleness_budget_rollouts",
            "Rollouts this worker may still generate before the trainer publishes a newer version "
            "(max_staleness; samples in flight count as generated).", registry=registry,
        )
        self.trainer_step = Gauge(
            "arbiter_worker_trainer_step",
            "Training step of the newest policy version this worker sampled on (from policy-updates).",
            registry=registry,
        )
        self.policy_wait_seconds = Counter(
            "arbiter_worker_policy_wait_seconds", "Time spent waiting for a new policy version.", registry=registry,
        )
        self.reward_mean = Gauge(
            "arbiter_worker_reward_mean", "Mean raw reward of the last batch.", registry=registry,
        )
        self.gold_score_mean = Gauge(
            "arbiter_worker_gold_score", "Mean gold score of the last batch (with a gold scorer).", registry=registry,
        )
        self.response_length = Histogram(
            "arbiter_worker_response_length_tokens", "Completion tokens per produced rollout.",
            buckets=LENGTH_BUCKETS, registry=registry,
        )
        # Records of the prompts topic skipped as unusable (also samples_skipped{reason="invalid_prompt_record"}).
        self.rejected_records = RejectedRecordsMetric(registry, [topics.PROMPTS])
        for reason in SKIP_REASONS:
            self.skipped.labels(reason)
        for stage in STAGES:
            self.errors.labels(stage)
        self._lock = threading.Lock()
        self._version: str | None = None

    def on_policy_version(self, version: str) -> None:
        with self._lock:
            if version == self._version:
                return
            if self._version is not None:
                try:
                    self.policy_version.remove(self._version)
                except KeyError:
                    pass
            self.policy_version.labels(version).set(1)
            self._version = version
