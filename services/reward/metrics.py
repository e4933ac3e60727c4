"""Reward-service metrics, declared once."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Histogram

from services.common.metrics import RpcMetrics

SERVICE = "reward"
# Symmetric around 0: raw RM scores are unbounded logits of either sign.
SCORE_BUCKETS = (-10, -5, -3, -2, -1.5, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10)


class RewardMetrics(RpcMetrics):
    def __init__(self, registry: CollectorRegistry):
        super().__init__(registry, SERVICE)
        self.scores = Histogram(
            "arbiter_reward_score", "Raw reward scores served, per model version.",
            ["model_version"], buckets=SCORE_BUCKETS, registry=registry,
        )

    def on_scores(self, model_version: str, raw_scores: Sequence[float]) -> None:
        child = self.scores.labels(model_version)
        for score in raw_scores:
            child.observe(score)

    def on_version_removed(self, model_version: str) -> None:
        try:
            self.scores.remove(model_version)
        except KeyError:
            pass
