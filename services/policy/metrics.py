"""Policy-service metrics, declared once."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from arbiter.policy.types import GeneratedSample
from arbiter.stream import topics
from arbiter.stream.metrics import RejectedRecordsMetric
from services.common.metrics import BATCH_BUCKETS, RpcMetrics

SERVICE = "policy"
# Publish-to-serving latency of a policy update: hashing and loading a
# checkpoint takes from well under a second (tiny) to minutes (large).
UPDATE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class PolicyMetrics(RpcMetrics):
    """``arbiter_batch_size`` / ``arbiter_batch_duration_seconds`` observe one
    decoding step of one version each (rows in the step, its wall time);
    ``arbiter_queue_depth`` counts requests waiting for room in the batch."""

    def __init__(self, registry: CollectorRegistry):
        super().__init__(registry, SERVICE)
        self.tokens = Counter(
            "arbiter_policy_generated_tokens", "Completion tokens generated.", registry=registry,
        )
        self.samples = Counter(
            "arbiter_policy_samples", "Samples generated, by finish reason.", ["finish_reason"], registry=registry,
        )
        self.active_generations = Gauge(
            "arbiter_policy_active_generations", "Generations (requests) admitted to the decoding batch.",
            registry=registry,
        )
        self.active_rows = Gauge(
            "arbiter_policy_active_rows", "Samples (rows) in the decoding batch.", registry=registry,
        )
        self.reserved_tokens = Gauge(
            "arbiter_policy_kv_reserved_tokens",
            "KV-cache tokens reserved by admitted generations (prompt + max_new_tokens per row).", registry=registry,
        )
        self.prefilling_rows = Gauge(
            "arbiter_policy_prefilling_rows",
            "Admitted samples (rows) whose prompts are still being prefilled, a chunk a step (--prefill-chunk-tokens).",
            registry=registry,
        )
        self.prefill_prompt_tokens = Counter(
            "arbiter_policy_prefill_prompt_tokens",
            "Prompt tokens of the distinct prompts whose prefill started (rows sharing a prompt count it once).",
            registry=registry,
        )
        self.prefix_cache_hit_tokens = Counter(
            "arbiter_policy_prefix_cache_hit_tokens",
            "Of those, tokens not computed: keys and values copied from the version's prefix cache "
            "(--prefix-cache-tokens), less what a beginning shared by prompts of one step cost to compute once.",
            registry=registry,
        )
        self.prefix_cache_tokens = Gauge(
            "arbiter_policy_prefix_cache_tokens",
            "Prompt tokens whose keys and values the prefix caches of the versions last prefilling hold "
            "(--prefix-cache-tokens per version).", registry=registry,
        )
        self.step_generations = Histogram(
            "arbiter_policy_decode_batch_generations", "Generations (requests) whose rows shared one decoding step.",
            buckets=BATCH_BUCKETS, registry=registry,
        )
        # Following the policy-updates topic (--follow-updates).
        self.policy_updates = Counter(
            "arbiter_policy_updates", "PolicyUpdate events handled, by outcome (applied|skipped|refused|failed).",
            ["outcome"], registry=registry,
        )
        self.policy_update_refusals = Counter(
            "arbiter_policy_update_refusals",
            "PolicyUpdate events refused (the serving version stays), by reason: download, manifest, sha256, "
            "parent (a delta's parent missing or different), outside_roots, adapter_mismatch, invalid_record.",
            ["reason"], registry=registry,
        )
        self.policy_update_apply_seconds = Histogram(
            "arbiter_policy_update_apply_seconds",
            "From a PolicyUpdate's created_at (the trainer published it) to the new version serving.",
            buckets=UPDATE_BUCKETS, registry=registry,
        )
        self.policy_update_step = Gauge(
            "arbiter_policy_update_training_step", "training_step of the last policy update applied.",
            registry=registry,
        )
        # Records of the policy-updates topic skipped as unusable (each is also a "refused" update).
        self.rejected_records = RejectedRecordsMetric(registry, [topics.POLICY_UPDATES])
        self._known_versions: set[str] = set()

    def on_samples(self, samples: Sequence[GeneratedSample]) -> None:
        self.tokens.inc(sum(len(s.completion_token_ids) for s in samples))
        for sample in samples:
            self.samples.labels(sample.finish_reason.value).inc()

    def on_decode_step(self, generations: int) -> None:
        self.step_generations.observe(generations)

    def on_budget(self, rows: int, tokens: int, generations: int) -> None:
        self.active_rows.set(rows)
        self.reserved_tokens.set(tokens)
        self.active_generations.set(generations)

    def on_prefilling(self, rows: int) -> None:
        self.prefilling_rows.set(rows)

    def on_prefix_cache(self, prompt_tokens: int, cached_tokens: int, held_tokens: int) -> None:
        self.prefill_prompt_tokens.inc(prompt_tokens)
        self.prefix_cache_hit_tokens.inc(cached_tokens)
        self.prefix_cache_tokens.set(held_tokens)

    def set_versions(self, active: str | None, loaded: list[str], removed: list[str] = ()) -> None:
        # The engine also unloads old versions by itself after a swap; drop
        # their series too, not only the ones unloaded by RPC.
        stale = (self._known_versions - set(loaded)) | set(removed)
        self._known_versions = set(loaded)
        super().set_versions(active, loaded, sorted(stale))
