"""Policy-service metrics, declared once."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from arbiter.policy.types import GeneratedSample
from services.common.metrics import RpcMetrics

SERVICE = "policy"


class PolicyMetrics(RpcMetrics):
    """``arbiter_batch_size`` / ``arbiter_batch_duration_seconds`` observe one
    decoding step each (rows in the step, its wall time)."""

    def __init__(self, registry: CollectorRegistry):
        super().__init__(registry, SERVICE)
        self.tokens = Counter(
            "arbiter_policy_generated_tokens", "Completion tokens generated.", registry=registry,
        )
        self.samples = Counter(
            "arbiter_policy_samples", "Samples generated, by finish reason.", ["finish_reason"], registry=registry,
        )
        self.active_generations = Gauge(
            "arbiter_policy_active_generations", "Generations holding a KV cache right now.", registry=registry,
        )
        self._known_versions: set[str] = set()

    def on_samples(self, samples: Sequence[GeneratedSample]) -> None:
        self.tokens.inc(sum(len(s.completion_token_ids) for s in samples))
        for sample in samples:
            self.samples.labels(sample.finish_reason.value).inc()

    def on_active_generations(self, count: int) -> None:
        self.active_generations.set(count)

    def set_versions(self, active: str | None, loaded: list[str], removed: list[str] = ()) -> None:
        # The engine also unloads old versions by itself after a swap; drop
        # their series too, not only the ones unloaded by RPC.
        stale = (self._known_versions - set(loaded)) | set(removed)
        self._known_versions = set(loaded)
        super().set_versions(active, loaded, sorted(stale))
