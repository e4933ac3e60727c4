"""Elo ratings of model versions from head-to-head outcomes.

The ratings are the maximum-likelihood Bradley-Terry strengths (Bradley &
Terry 1952), P(a beats b) = sigmoid(theta_a - theta_b), reported on the Elo
scale: R = 1000 + theta * 400 / ln 10, so a 400-point gap is 10:1 odds. Unlike
sequential Elo (kept here as ``sequential_elo``), the fit does not depend on
the order games were played in, which is arbitrary for offline comparisons
(the approach of Chatbot Arena, Chiang et al. 2024).

A weak Gaussian prior (``prior``: lambda/2 * sum theta^2) keeps ratings finite
when a version wins every game; it moves well-observed ratings by a fraction
of a point. Confidence intervals are percentile bootstrap intervals:
outcomes are resampled with replacement and the fit repeated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

ELO_PER_LOGIT = 400.0 / math.log(10.0)
BASE_RATING = 1000.0


@dataclass(frozen=True)
class Outcome:
    """One game: ``score`` is a's result (1 a won, 0 b won, 0.5 a tie)."""

    a: str
    b: str
    score: float = 1.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.a == self.b:
            raise ValueError(f"a game needs two different players, got {self.a!r} twice")
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score must be in [0, 1], got {self.score}")
        if not self.weight > 0:
            raise ValueError(f"weight must be > 0, got {self.weight}")


def win(winner: str, loser: str) -> Outcome:
    return Outcome(winner, loser, 1.0)


def tie(a: str, b: str) -> Outcome:
    return Outcome(a, b, 0.5)


def _players(outcomes: Sequence[Outcome], players: Sequence[str] | None) -> list[str]:
    seen = list(players or [])
    for o in outcomes:
        for p in (o.a, o.b):
            if p not in seen:
                seen.append(p)
    return seen


def _arrays(outcomes: Sequence[Outcome], index: dict[str, int]):
    a = np.array([index[o.a] for o in outcomes], dtype=np.int64)
    b = np.array([index[o.b] for o in outcomes], dtype=np.int64)
    s = np.array([o.score for o in outcomes], dtype=np.float64)
    w = np.array([o.weight for o in outcomes], dtype=np.float64)
    return a, b, s, w


def _fit(a, b, s, w, n: int, prior: float) -> np.ndarray:
    """MLE strengths theta (n,), mean 0."""
    from scipy.optimize import minimize
    from scipy.special import expit, log_expit

    def objective(theta: np.ndarray):
        d = theta[a] - theta[b]  # (G,)
        nll = -np.sum(w * (s * log_expit(d) + (1 - s) * log_expit(-d))) + 0.5 * prior * theta @ theta
        residual = w * (s - expit(d))  # d nll / d theta_b = residual, d theta_a = -residual
        grad = np.bincount(b, residual, n) - np.bincount(a, residual, n) + prior * theta
        return nll, grad

    result = minimize(objective, np.zeros(n), jac=True, method="L-BFGS-B",
                      options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-15})
    theta = result.x
    return theta - theta.mean()  # the likelihood only sees differences


@dataclass(frozen=True)
class Rating:
    player: str
    elo: float
    ci_low: float
    ci_high: float
    games: float
    # Wins plus half the ties.
    score: float

    @property
    def win_rate(self) -> float:
        return self.score / self.games if self.games else float("nan")


@dataclass(frozen=True)
class EloResult:
    ratings: list[Rating]  # best first
    confidence: float
    n_bootstrap: int
    prior: float
    outcomes: int
    # score[a][b]: a's wins (plus half ties) against b.
    head_to_head: dict[str, dict[str, float]] = field(default_factory=dict)

    def rating(self, player: str) -> Rating:
        for r in self.ratings:
            if r.player == player:
                return r
        raise KeyError(player)

    def to_json(self) -> dict:
        return {
            "method": "bradley-terry maximum likelihood, percentile bootstrap intervals",
            "scale": f"elo: {BASE_RATING:.0f} + 400/ln(10) per logit, mean {BASE_RATING:.0f}",
            "confidence": self.confidence,
            "bootstrap_samples": self.n_bootstrap,
            "prior": self.prior,
            "outcomes": self.outcomes,
            "ratings": [
                {"player": r.player, "elo": r.elo, "ci_low": r.ci_low, "ci_high": r.ci_high, "games": r.games,
                 "score": r.score, "win_rate": r.win_rate}
                for r in self.ratings
            ],
            "head_to_head": self.head_to_head,
        }


def fit_elo(
    outcomes: Iterable[Outcome],
    players: Sequence[str] | None = None,
    *,
    prior: float = 0.01,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> EloResult:
    """Bradley-Terry MLE ratings on the Elo scale (mean 1000) with bootstrap
    confidence intervals. ``players`` fixes the order (and includes players
    without games, rated at the mean)."""
    outcomes = list(outcomes)
    if not outcomes:
        raise ValueError("no outcomes to rate")
    if prior < 0:
        raise ValueError(f"prior must be >= 0, got {prior}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    names = _players(outcomes, players)
    index = {p: i for i, p in enumerate(names)}
    a, b, s, w = _arrays(outcomes, index)
    n = len(names)
    theta = _fit(a, b, s, w, n, prior)
    elo = BASE_RATING + ELO_PER_LOGIT * theta
    low, high = elo.copy(), elo.copy()
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        samples = np.empty((n_bootstrap, n))
        for i in range(n_bootstrap):
            pick = rng.integers(0, len(outcomes), len(outcomes))
            samples[i] = BASE_RATING + ELO_PER_LOGIT * _fit(a[pick], b[pick], s[pick], w[pick], n, prior)
        tail = 100 * (1 - confidence) / 2
        low, high = np.percentile(samples, tail, axis=0), np.percentile(samples, 100 - tail, axis=0)
    games = np.bincount(a, w, n) + np.bincount(b, w, n)
    score = np.bincount(a, w * s, n) + np.bincount(b, w * (1 - s), n)
    head: dict[str, dict[str, float]] = {p: {} for p in names}
    for o in outcomes:
        head[o.a][o.b] = head[o.a].get(o.b, 0.0) + o.weight * o.score
        head[o.b][o.a] = head[o.b].get(o.a, 0.0) + o.weight * (1 - o.score)
    ratings = [
        Rating(p, float(elo[i]), float(low[i]), float(high[i]), float(games[i]), float(score[i]))
        for i, p in enumerate(names)
    ]
    ratings.sort(key=lambda r: -r.elo)
    return EloResult(ratings, confidence, n_bootstrap, prior, len(outcomes), head)


def sequential_elo(
    outcomes: Iterable[Outcome], k: float = 32.0, initial: float = BASE_RATING
) -> dict[str, float]:
    """Classic online Elo (order-dependent): after each game,
    R_a += K (S_a - E_a) with E_a = 1 / (1 + 10^((R_b - R_a) / 400))."""
    ratings: dict[str, float] = {}
    for o in outcomes:
        ra, rb = ratings.setdefault(o.a, initial), ratings.setdefault(o.b, initial)
        expected = 1.0 / (1.0 + 10.0 ** ((rb - ra) / 400.0))
        delta = k * o.weight * (o.score - expected)
        ratings[o.a], ratings[o.b] = ra + delta, rb - delta
    return ratings
