"""Reference-service metrics, declared once."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from services.common.metrics import RpcMetrics

SERVICE = "reference"


class ReferenceMetrics(RpcMetrics):
    def __init__(self, registry: CollectorRegistry):
        super().__init__(registry, SERVICE)
        self.tokens = Counter(
            "arbiter_reference_scored_tokens", "Completion tokens given reference log-probs.", registry=registry,
        )

    def on_tokens(self, count: int) -> None:
        self.tokens.inc(count)
