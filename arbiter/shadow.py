"""Shadow scoring: how well a candidate reward-model version agrees with the
active one on live traffic, before anyone promotes it.

Every sampled request is scored by both versions; over a sliding window of
(active, candidate) score pairs we report pairwise agreement (the fraction of
item pairs both versions order the same way, ties counting half: what a PPO
policy actually consumes) and Spearman rank correlation (scipy).
"""

from __future__ import annotations

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


class ShadowMonitor:
    def __init__(self, active_version: str, shadow_version: str, window: int = WINDOW):
        self.active_version = active_version
        self.shadow_version = shadow_version
        self.window = window
        self._pairs: deque[tuple[float, float]] = deque(maxlen=window)
        self._lock = threading.Lock()

    def observe(self, active: Sequence[float], candidate: Sequence[float]) -> None:
        with self._lock:
            self._pairs.extend(zip(active, candidate, strict=True))

    def stats(self) -> ShadowStats:
        with self._lock:
            pairs = np.asarray(self._pairs, dtype=float).reshape(-1, 2)
        n = len(pairs)
        if n < 2:
            return ShadowStats(self.active_version, self.shadow_version, n, float("nan"), float("nan"))
        rho = spearmanr(pairs[:, 0], pairs[:, 1]).statistic if np.ptp(pairs[:, 0]) and np.ptp(pairs[:, 1]) else float("nan")
        return ShadowStats(
            self.active_version, self.shadow_version, n, pairwise_agreement(pairs[:, 0], pairs[:, 1]), float(rho)
        )
