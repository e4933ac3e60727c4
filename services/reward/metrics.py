"""Reward-service metrics, declared once."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from arbiter.drift import DriftConfig, DriftTracker
from arbiter.reward.composite import TOTAL, RewardSpec, Scored
from arbiter.shadow import ShadowMonitor
from services.common.metrics import RpcMetrics

SERVICE = "reward"
# Symmetric around 0: raw RM scores are unbounded logits of either sign.
# (With a negative first bound prometheus-client exports no _sum, so the
# window mean/std are exported as gauges below.)
SCORE_BUCKETS = (-10, -5, -3, -2, -1.5, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10)

# name -> (help, DriftStats field); exported only once the version's reference
# and window both hold min_samples scores.
DRIFT_GAUGES = {
    "arbiter_reward_drift_psi": ("Population stability index of served scores vs the reference.", "psi"),
    "arbiter_reward_drift_ks_statistic": ("Two-sample KS statistic, served scores vs the reference.", "ks_statistic"),
    "arbiter_reward_drift_wasserstein": ("Wasserstein-1 distance, served scores vs the reference.", "wasserstein"),
    "arbiter_reward_drift_js_distance": ("Jensen-Shannon distance (base 2) over PSI's bins.", "js_distance"),
}
WINDOW_GAUGES = {
    "arbiter_reward_window_samples": ("Scores in the current drift window.", "window_samples"),
    "arbiter_reward_window_mean": ("Mean raw score in the current drift window.", "window_mean"),
    "arbiter_reward_window_std": ("Standard deviation of raw scores in the current drift window.", "window_std"),
    "arbiter_reward_reference_samples": ("Scores in the drift reference.", "reference_samples"),
    "arbiter_reward_reference_mean": ("Mean raw score of the drift reference.", "reference_mean"),
    "arbiter_reward_reference_std": ("Standard deviation of the drift reference.", "reference_std"),
}


class _DriftCollector:
    """Computes drift statistics at scrape time, so they cost nothing between
    scrapes. Per model version (``arbiter_reward_drift_psi{model_version}``),
    or per reward-spec component with ``prefix="arbiter_reward_component"``
    and ``label="component"`` (``arbiter_reward_component_drift_psi{component}``)."""

    def __init__(self, tracker: DriftTracker, prefix: str = "arbiter_reward", label: str = "model_version"):
        self._tracker = tracker
        self._prefix = prefix
        self._label = label

    def describe(self) -> list[Metric]:
        return []

    def _name(self, name: str) -> str:
        return self._prefix + name.removeprefix("arbiter_reward")

    def collect(self) -> Iterator[Metric]:
        snapshot = self._tracker.snapshot()
        gauges = {
            name: GaugeMetricFamily(self._name(name), help_text, labels=[self._label])
            for name, (help_text, _) in {**DRIFT_GAUGES, **WINDOW_GAUGES}.items()
        }
        changes = CounterMetricFamily(
            self._name("arbiter_reward_drift_change_points"),
            "Page-Hinkley change alarms on standardised served scores.",
            labels=[self._label],
        )
        for key, stats in snapshot.items():
            for name, (_, field) in WINDOW_GAUGES.items():
                gauges[name].add_metric([key], getattr(stats, field))
            if stats.ready:
                for name, (_, field) in DRIFT_GAUGES.items():
                    gauges[name].add_metric([key], getattr(stats, field))
            changes.add_metric([key], stats.change_points)
        yield from gauges.values()
        yield changes


class _ShadowCollector:
    """Agreement of the shadow candidate with the active version, at scrape time."""

    def __init__(self, metrics: RewardMetrics):
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        labels = ["model_version", "shadow_version"]
        agreement = GaugeMetricFamily(
            "arbiter_reward_shadow_pairwise_agreement",
            "Fraction of served item pairs the shadow candidate orders like the active version.", labels=labels,
        )
        spearman = GaugeMetricFamily(
            "arbiter_reward_shadow_spearman", "Spearman rank correlation, shadow candidate vs active.", labels=labels
        )
        samples = GaugeMetricFamily(
            "arbiter_reward_shadow_samples", "Items in the shadow agreement window.", labels=labels
        )
        paired = CounterMetricFamily(
            "arbiter_reward_shadow_paired_change_points",
            "Page-Hinkley alarms on the difference of the two versions' standardised scores of the same items.",
            labels=labels,
        )
        monitor = self._metrics.shadow_monitor
        if monitor is not None:
            stats = monitor.stats()
            key = [stats.active_version, stats.shadow_version]
            samples.add_metric(key, stats.samples)
            if stats.samples >= 2:
                agreement.add_metric(key, stats.pairwise_agreement)
                spearman.add_metric(key, stats.spearman)
            paired.add_metric(key, stats.paired_change_points)
        yield from (agreement, spearman, samples, paired)


class RewardMetrics(RpcMetrics):
    def __init__(self, registry: CollectorRegistry, drift: DriftConfig | None = None):
        super().__init__(registry, SERVICE)
        self.scores = Histogram(
            "arbiter_reward_score", "Raw reward scores served, per model version.",
            ["model_version"], buckets=SCORE_BUCKETS, registry=registry,
        )
        # Per loaded version (``_loaded``), bound once.
        self._score_children: dict[str, object] = {}
        self.drift = DriftTracker(drift or DriftConfig())
        registry.register(_DriftCollector(self.drift))
        self.shadow_monitor: ShadowMonitor | None = None
        self.shadow_errors = Counter(
            "arbiter_reward_shadow_errors", "Shadow scoring attempts that failed (callers unaffected).",
            ["shadow_version"], registry=registry,
        )
        registry.register(_ShadowCollector(self))
        # The configured reward spec (arbiter.reward.composite): its
        # components by name (from the configuration, never from requests)
        # and "total"; drift on the total and each model/ensemble term.
        self.components = Histogram(
            "arbiter_reward_component_value",
            "Values of the configured reward spec's terms as they enter the total (component=total: the weighted sum).",
            ["component"], buckets=SCORE_BUCKETS, registry=registry,
        )
        self.component_drift = DriftTracker(drift or DriftConfig())
        registry.register(_DriftCollector(self.component_drift, "arbiter_reward_component", "component"))
        self.spec_requests = Counter(
            "arbiter_reward_spec_requests", "Requests scored with a reward spec: the configured one or the request's own.",
            ["spec"], registry=registry,
        )
        self.ensemble_passes = Counter(
            "arbiter_reward_ensemble_passes",
            "Ensemble scorings: stacked (one forward pass for all members) or sequential (member by member).",
            ["mode"], registry=registry,
        )

    def on_composite(self, configured: bool, spec: RewardSpec, resolved: Sequence[tuple[str, ...]],
                     scored: Sequence[Scored]) -> None:
        self.spec_requests.labels("configured" if configured else "request").inc()
        if not configured:
            return  # a request's own spec names its components freely: no labels from it
        for t, (term, versions) in enumerate(zip(spec.terms, resolved)):
            values = [item.components[t].value for item in scored]
            child = self.components.labels(term.name)
            for value in values:
                child.observe(value)
            if versions:
                self.component_drift.observe_on(term.name, versions, values)
        totals = [item.total for item in scored]
        for total in totals:
            self.components.labels(TOTAL).observe(total)
        self.component_drift.observe_on(TOTAL, tuple(resolved), totals)

    def on_ensemble_pass(self, mode: str) -> None:
        self.ensemble_passes.labels(mode).inc()

    def _loaded(self, *versions: str) -> bool:
        """Label values are versions loaded now: a late callback (a shadow
        score finishing after its version was unloaded) must not bring back
        a series nobody removes."""
        return all(self.drift.monitor(version) is not None for version in versions)

    def on_shadow(self, active_version: str, shadow_version: str, active: Sequence[float], shadow: Sequence[float]) -> None:
        if not self._loaded(active_version, shadow_version):
            return
        monitor = self.shadow_monitor
        if monitor is None or (monitor.active_version, monitor.shadow_version) != (active_version, shadow_version):
            # A new pairing starts a fresh window: agreement of another pair says nothing.
            monitor = self.shadow_monitor = ShadowMonitor(active_version, shadow_version,
                                                          ph_delta=self.drift.config.ph_delta,
                                                          ph_threshold=self.drift.config.ph_threshold)
        monitor.observe(active, shadow)

    def on_shadow_error(self, shadow_version: str) -> None:
        if self._loaded(shadow_version):
            self.shadow_errors.labels(shadow_version).inc()

    def on_shadow_cleared(self) -> None:
        self.shadow_monitor = None

    def on_version_added(self, model_version: str, calibration_scores: Sequence[float] | None) -> None:
        self.drift.add_version(model_version, calibration_scores)

    def on_scores(self, model_version: str, raw_scores: Sequence[float]) -> None:
        if not self._loaded(model_version):
            return
        child = self._score_children.get(model_version)
        if child is None:
            child = self._score_children[model_version] = self.scores.labels(model_version)
        for score in raw_scores:
            child.observe(score)
        self.drift.observe(model_version, raw_scores)

    def on_version_removed(self, model_version: str) -> None:
        self.drift.remove_version(model_version)
        self._score_children.pop(model_version, None)
        for metric in (self.scores, self.shadow_errors):
            try:
                metric.remove(model_version)
            except KeyError:
                pass
