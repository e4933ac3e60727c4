"""Trainer metrics, declared once. Names are the contract of the alert rules in
infra/prometheus/rules/arbiter-alerts.yml (KL blow-up, stalled trainer, stale rollouts)."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from arbiter.stream import topics
from arbiter.stream.metrics import RejectedRecordsMetric
from trainer.step import UpdateStats

# mask_stale: NLPO, sampled under a masking policy the trainer no longer holds (nor the one before it).
ROLLOUT_OUTCOMES = ("trained", "duplicate", "stale", "unknown_version", "invalid", "incomplete_group", "mask_stale")


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.updates = Counter("arbiter_trainer_updates", "PPO updates completed.", registry=r)
        self.skipped_steps = Counter(
            "arbiter_trainer_skipped_steps", "Optimizer steps skipped for a non-finite loss or gradient.", registry=r
        )
        self.rollouts = Counter(
            "arbiter_trainer_rollouts", "Rollouts consumed, by what became of them.", ["outcome"], registry=r
        )
        for outcome in ROLLOUT_OUTCOMES:
            self.rollouts.labels(outcome)
        self.kl = Gauge("arbiter_trainer_kl", "Mean per-sequence KL(π‖π_ref) of the last batch (nats).", registry=r)
        self.kl_target = Gauge("arbiter_trainer_kl_target", "KL the adaptive controller steers to (nats).", registry=r)
        self.kl_coef = Gauge("arbiter_trainer_kl_coef", "KL penalty coefficient β.", registry=r)
        self.reward = Gauge("arbiter_trainer_reward", "Mean reward of the last batch.", ["kind"], registry=r)
        self.gold = Gauge("arbiter_trainer_gold_score", "Mean gold-scorer score of the last batch.", registry=r)
        self.entropy = Gauge("arbiter_trainer_entropy", "Mean per-token policy entropy (nats).", registry=r)
        self.clip_fraction = Gauge("arbiter_trainer_clip_fraction", "Fraction of tokens where the ratio was clipped.", registry=r)
        self.approx_kl = Gauge("arbiter_trainer_approx_kl", "Approximate KL(π_old‖π_θ) moved by the update.", registry=r)
        self.value_loss = Gauge("arbiter_trainer_value_loss", "Mean clipped value loss.", registry=r)
        self.explained_variance = Gauge(
            "arbiter_trainer_explained_variance",
            "1 - Var[returns - values] / Var[returns] of the last batch: how well the value head predicts returns.",
            registry=r,
        )
        self.policy_loss = Gauge("arbiter_trainer_policy_loss", "Mean clipped surrogate loss.", registry=r)
        self.policy_step = Gauge("arbiter_trainer_policy_step", "Training step of the newest policy.", registry=r)
        self.staleness = Gauge(
            "arbiter_trainer_rollout_staleness_versions",
            "Mean number of policy versions between sampling and training, last batch.", registry=r,
        )
        # Base unit: policy versions. Buckets at every lag a sane bound allows.
        self.trained_staleness = Histogram(
            "arbiter_trainer_trained_staleness_versions",
            "Policy versions between a trained rollout's sampling and its update (one observation per rollout).",
            buckets=(0, 1, 2, 3, 4, 6, 8, 16), registry=r,
        )
        self.response_length = Gauge(
            "arbiter_trainer_response_length_tokens", "Mean completion length of the last batch.", registry=r
        )
        self.iteration = Histogram(
            "arbiter_trainer_iteration_seconds", "Wall time of one PPO update (train + checkpoint + publish).",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r,
        )
        self.lag = Gauge("arbiter_trainer_consumer_lag_records", "Rollouts waiting in the topic.", registry=r)
        self.publish = Counter("arbiter_trainer_policy_publishes", "Policy versions published.", registry=r)
        self.bookkeeping = Histogram(
            "arbiter_trainer_bookkeeping_seconds",
            "Time an update's bookkeeping holds training up: the policy snapshot for the background publisher, "
            "and the checkpoint when one is due.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10), registry=r,
        )
        self.publish_write = Histogram(
            "arbiter_trainer_policy_write_seconds",
            "Time the background publisher took to write one policy version (beside training).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60), registry=r,
        )
        self.publish_superseded = Counter(
            "arbiter_trainer_policy_versions_superseded",
            "Versions never written because a newer one was ready before the publisher got to them.", registry=r,
        )
        self.checkpoints = Counter("arbiter_trainer_checkpoints", "Checkpoints written.", registry=r)
        self.commit_failures = Counter(
            "arbiter_trainer_offset_commit_failures",
            "Durable checkpoints whose offsets the consumer group did not take (committed with the next one).",
            registry=r,
        )
        # Rollout records skipped as unusable (also counted as rollouts{outcome="invalid"}).
        self.rejected_records = RejectedRecordsMetric(r, [topics.ROLLOUTS])

    def on_update(
        self, stats: UpdateStats, kl_target: float | None, staleness: float, gold: float | None,
        lags: Sequence[int] = (),
    ) -> None:
        self.updates.inc()
        self.skipped_steps.inc(stats.skipped_steps)
        self.kl.set(stats.kl)
        if kl_target is not None:
            self.kl_target.set(kl_target)
        self.kl_coef.set(stats.kl_coef)
        self.reward.labels("raw").set(stats.reward_raw)
        self.reward.labels("normalized").set(stats.reward_normalized)
        if gold is not None:
            self.gold.set(gold)
        for gauge, value in (
            (self.entropy, stats.entropy), (self.clip_fraction, stats.clip_fraction), (self.approx_kl, stats.approx_kl),
            (self.value_loss, stats.value_loss), (self.policy_loss, stats.policy_loss),
            (self.response_length, stats.response_length),
        ):
            gauge.set(value)
        if stats.explained_variance is not None:
            self.explained_variance.set(stats.explained_variance)
        self.staleness.set(staleness)
        for lag in lags:
            self.trained_staleness.observe(lag)
