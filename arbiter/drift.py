"""Reward drift: is a model version handing out a different distribution of
scores than it did at first (or than on its calibration set)?

Statistics come from scipy (PSI as the symmetrised KL divergence over the
reference's quantile bins, two-sample KS, Wasserstein-1, Jensen-Shannon
distance); sudden shifts are caught by river's Page-Hinkley detector on
scores standardised with the reference's mean and std.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy, ks_2samp, wasserstein_distance

from arbiter.config import flag, require

# Keeps PSI finite when a bin is empty on one side (a common convention).
_BIN_FLOOR = 1e-4


@dataclass(frozen=True)
class DriftConfig:
    """Nested in the reward server's settings; each field is its flag (``--drift-window-size``)."""

    # Current window: the last N served scores of a version.
    window_size: int = field(default=1000, metadata=flag(
        "--drift-window-size", help="recent scores compared to the reference"))
    # Reference when the version ships no calibration set (>= min_samples
    # scores in arbiter.json): its first N served scores.
    reference_size: int = field(default=1000, metadata=flag(
        "--drift-reference-size", help="first served scores used as reference"))
    # Both sides need this many samples before statistics are reported.
    min_samples: int = field(default=100, metadata=flag(
        "--drift-min-samples", help="samples on both sides before drift statistics are reported"))
    bins: int = field(default=10, metadata=flag("--drift-bins", help="histogram bins of PSI and JS"))
    # Page-Hinkley on standardised scores: tolerated drift per sample, and the
    # cumulative deviation (in reference standard deviations) that alarms.
    ph_delta: float = field(default=0.05, metadata=flag("--drift-ph-delta", help="Page-Hinkley tolerance per sample"))
    ph_threshold: float = field(default=25.0, metadata=flag(
        "--drift-ph-threshold", help="Page-Hinkley alarm threshold (reference standard deviations)"))

    def __post_init__(self) -> None:
        for name in ("window_size", "reference_size", "min_samples"):
            require(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        require(self.bins >= 2, "bins", "must be >= 2", self.bins)
        require(self.min_samples <= min(self.window_size, self.reference_size), "min_samples",
                f"must be <= window_size ({self.window_size}) and reference_size ({self.reference_size})",
                self.min_samples)


@dataclass(frozen=True)
class DriftStats:
    ready: bool
    psi: float
    ks_statistic: float
    wasserstein: float
    js_distance: float
    window_samples: int
    window_mean: float
    window_std: float
    reference_samples: int
    reference_mean: float
    reference_std: float
    change_points: int


def bin_proportions(reference: np.ndarray, current: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Histogram proportions of both samples over the reference's quantile bins."""
    edges = np.unique(np.quantile(reference, np.linspace(0.0, 1.0, bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    if len(edges) < 3:  # a constant reference: split at its value
        value = float(reference[0])
        edges = np.array([-np.inf, value, np.inf])
    p = np.histogram(reference, edges)[0].astype(float)
    q = np.histogram(current, edges)[0].astype(float)
    p = np.maximum(p / p.sum(), _BIN_FLOOR)
    q = np.maximum(q / q.sum(), _BIN_FLOOR)
    return p / p.sum(), q / q.sum()


def population_stability_index(p: np.ndarray, q: np.ndarray) -> float:
    """PSI = Σ (q − p) ln(q / p) = KL(q‖p) + KL(p‖q)."""
    return float(entropy(q, p) + entropy(p, q))


def drift_statistics(reference: Sequence[float], current: Sequence[float], bins: int = 10) -> dict[str, float]:
    ref = np.asarray(reference, dtype=float)
    cur = np.asarray(current, dtype=float)
    p, q = bin_proportions(ref, cur, bins)
    return {
        "psi": population_stability_index(p, q),
        "ks_statistic": float(ks_2samp(ref, cur).statistic),
        "wasserstein": float(wasserstein_distance(ref, cur)),
        "js_distance": float(jensenshannon(p, q, base=2)),
    }


class ScoreDriftMonitor:
    """Reference + sliding window of one version's served scores. Thread-safe:
    scores arrive on the serving loop, statistics are read by the metrics scrape."""

    def __init__(self, config: DriftConfig, calibration_scores: Sequence[float] | None = None):
        from river.drift import PageHinkley

        self.config = config
        self._lock = threading.Lock()
        self._window: deque[float] = deque(maxlen=config.window_size)
        if calibration_scores is not None and len(calibration_scores) >= config.min_samples:
            self.reference_source = "calibration"
            self._reference = [float(s) for s in calibration_scores]
        else:
            self.reference_source = "first_served"
            self._reference = []
        self._detector = PageHinkley(min_instances=30, delta=config.ph_delta, threshold=config.ph_threshold)
        self._change_points = 0
        self._reference_moments: tuple[float, float] | None = None
        if self._reference_full():
            self._freeze_reference()

    def _reference_full(self) -> bool:
        return self.reference_source == "calibration" or len(self._reference) >= self.config.reference_size

    @staticmethod
    def _moments(values: Sequence[float]) -> tuple[float, float]:
        arr = np.asarray(values, dtype=float)
        return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0

    def _freeze_reference(self) -> None:
        """Standardise with the reference's moments and let the detector learn
        the reference first, so a shift right after it is a change, not its baseline."""
        self._reference_moments = self._moments(self._reference)
        for score in self._reference:
            self._detect(score)

    def _detect(self, score: float) -> None:
        mean, std = self._reference_moments
        self._detector.update((score - mean) / std if std > 0 else score - mean)
        if self._detector.drift_detected:
            self._change_points += 1

    def observe(self, scores: Sequence[float]) -> None:
        with self._lock:
            for score in scores:
                if not math.isfinite(score):
                    continue
                self._window.append(score)
                if self._reference_moments is not None:
                    self._detect(score)
                    continue
                self._reference.append(score)
                if self._reference_full():
                    self._freeze_reference()

    def samples(self) -> tuple[list[float], list[float]]:
        with self._lock:
            return list(self._reference), list(self._window)

    def stats(self) -> DriftStats:
        with self._lock:
            reference, window = list(self._reference), list(self._window)
            change_points = self._change_points
        ref_mean, ref_std = self._moments(reference) if reference else (0.0, 0.0)
        win_mean, win_std = self._moments(window) if window else (0.0, 0.0)
        ready = len(reference) >= self.config.min_samples and len(window) >= self.config.min_samples
        values = drift_statistics(reference, window, self.config.bins) if ready else {}
        return DriftStats(
            ready=ready,
            psi=values.get("psi", 0.0),
            ks_statistic=values.get("ks_statistic", 0.0),
            wasserstein=values.get("wasserstein", 0.0),
            js_distance=values.get("js_distance", 0.0),
            window_samples=len(window),
            window_mean=win_mean,
            window_std=win_std,
            reference_samples=len(reference),
            reference_mean=ref_mean,
            reference_std=ref_std,
            change_points=change_points,
        )


class DriftTracker:
    """One monitor per loaded model version."""

    def __init__(self, config: DriftConfig):
        self.config = config
        self._monitors: dict[str, ScoreDriftMonitor] = {}
        # observe_on's keys -> the basis their monitor was started on.
        self._bases: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def add_version(self, version: str, calibration_scores: Sequence[float] | None = None) -> None:
        with self._lock:
            self._monitors[version] = ScoreDriftMonitor(self.config, calibration_scores)

    def remove_version(self, version: str) -> None:
        with self._lock:
            self._monitors.pop(version, None)

    def monitor(self, version: str) -> ScoreDriftMonitor | None:
        with self._lock:
            return self._monitors.get(version)

    def observe(self, version: str, scores: Sequence[float]) -> None:
        monitor = self.monitor(version)
        if monitor is not None:
            monitor.observe(scores)

    def observe_on(self, key: str, basis: tuple, scores: Sequence[float]) -> None:
        """Scores of a series that is not one version (a reward spec's
        component or total) computed from ``basis`` (the versions behind it):
        when the basis changes (a promotion), the series starts afresh with a
        new first-served reference, so a swap is not reported as drift; the
        versions' own monitors see the swap."""
        with self._lock:
            if self._bases.get(key) != basis or key not in self._monitors:
                self._monitors[key] = ScoreDriftMonitor(self.config)
                self._bases[key] = basis
            monitor = self._monitors[key]
        monitor.observe(scores)

    def snapshot(self) -> dict[str, DriftStats]:
        with self._lock:
            monitors = dict(self._monitors)
        return {version: monitor.stats() for version, monitor in monitors.items()}
