"""Shadow scoring: how well a candidate reward-model version agrees with the
active one on live traffic, before anyone promotes it.

Every sampled request is scored by both versions; over a sliding window of
(active, candidate) score pairs we report pairwise agreement (the fraction of
item pairs both versions order the same way, ties counting half: what a PPO
policy actually consumes) and Spearman rank correlation (scipy).

The same pairs also feed a *paired* change detector: Page-Hinkley on the
difference of the two versions' standardised scores of each item. A shift of
the traffic that moves both versions alike (a policy in training moves its
own traffic) leaves the difference where it was; only a change in how the
two versions score the same items alarms. The reward-model loop watches a
promoted version this way against the version it replaced.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr


@dataclass(frozen=True)
class ShadowStats:
    active_version: str
    shadow_version: str
    samples: int
    pairwise_agreement: float
    spearman: float
    # Page-Hinkley alarms on z_active − z_shadow since the pairing began, and
    # whether its reference is learnt (before that nothing can alarm).
    paired_change_points: int = 0
    paired_detecting: bool = False


def pairwise_agreement(active: np.ndarray, candidate: np.ndarray) -> float:
    """Over all i < j: 1 if sign(a_i − a_j) == sign(c_i − c_j), ½ if exactly one is a tie, else 0."""
    a = np.sign(active[:, None] - active[None, :])
    c = np.sign(candidate[:, None] - candidate[None, :])
    upper = np.triu_indices(len(active), k=1)
    a, c = a[upper], c[upper]
    score = np.where(a == c, 1.0, np.where((a == 0) | (c == 0), 0.5, 0.0))
    return float(score.mean()) if score.size else float("nan")


# Items of the newest window agreement is measured on: a candidate's shadow
# sample count stops there.
WINDOW = 500


# Pairs whose moments standardise each version's scores for the paired detector.
PAIRED_REFERENCE = 100


class PairedChangeDetector:
    """Page-Hinkley (river) on d = z_a − z_b, each version's score standardised
    by its own mean and standard deviation over the first ``reference`` pairs
    (a constant version: by its mean alone). The detector learns the
    reference pairs first, so a shift right after them is a change, not the
    baseline. ``delta`` and ``threshold`` are in reference standard
    deviations, as the reward service's per-version drift detector's."""

    def __init__(self, delta: float, threshold: float, reference: int = PAIRED_REFERENCE):
        from river.drift import PageHinkley

        self._detector = PageHinkley(min_instances=30, delta=delta, threshold=threshold)
        self._reference_size = reference
        self._reference: list[tuple[float, float]] = []
        self._moments: tuple[float, float, float, float] | None = None
        self.change_points = 0

    @property
    def detecting(self) -> bool:
        return self._moments is not None

    def _difference(self, a: float, b: float) -> float:
        mean_a, std_a, mean_b, std_b = self._moments
        return (a - mean_a) / (std_a or 1.0) - (b - mean_b) / (std_b or 1.0)

    def _detect(self, a: float, b: float) -> None:
        self._detector.update(self._difference(a, b))
        if self._detector.drift_detected:
            self.change_points += 1

    def observe(self, a: float, b: float) -> None:
        if not (math.isfinite(a) and math.isfinite(b)):
            return
        if self._moments is not None:
            self._detect(a, b)
            return
        self._reference.append((a, b))
        if len(self._reference) >= self._reference_size:
            pairs = np.asarray(self._reference)
            self._moments = (float(pairs[:, 0].mean()), float(pairs[:, 0].std(ddof=1)),
                             float(pairs[:, 1].mean()), float(pairs[:, 1].std(ddof=1)))
            for pair in self._reference:
                self._detect(*pair)
            self._reference = []


class ShadowMonitor:
    def __init__(self, active_version: str, shadow_version: str, window: int = WINDOW, *,
                 ph_delta: float = 0.05, ph_threshold: float = 25.0, paired_reference: int = PAIRED_REFERENCE):
        self.active_version = active_version
        self.shadow_version = shadow_version
        self.window = window
        self._pairs: deque[tuple[float, float]] = deque(maxlen=window)
        self._paired = PairedChangeDetector(ph_delta, ph_threshold, paired_reference)
        self._lock = threading.Lock()

    def observe(self, active: Sequence[float], candidate: Sequence[float]) -> None:
        with self._lock:
            pairs = list(zip(active, candidate, strict=True))
            self._pairs.extend(pairs)
            for a, c in pairs:
                self._paired.observe(float(a), float(c))

    def stats(self) -> ShadowStats:
        with self._lock:
            pairs = np.asarray(self._pairs, dtype=float).reshape(-1, 2)
            paired = (self._paired.change_points, self._paired.detecting)
        n = len(pairs)
        if n < 2:
            return ShadowStats(self.active_version, self.shadow_version, n, float("nan"), float("nan"), *paired)
        rho = spearmanr(pairs[:, 0], pairs[:, 1]).statistic if np.ptp(pairs[:, 0]) and np.ptp(pairs[:, 1]) else float("nan")
        return ShadowStats(
            self.active_version, self.shadow_version, n, pairwise_agreement(pairs[:, 0], pairs[:, 1]), float(rho),
            *paired,
        )
