"""Built-in rule terms of a reward spec (``arbiter.reward.composite``): small
pure functions of one response, each documented by its formula. A term's
weight (possibly negative) scales its value into the total.

- length penalty, n tokens against a target T > 0:
    both:  -|n - T| / T        over: -max(0, n - T) / T        under: -max(0, T - n) / T
  0 at the target, -1 one target length away (the unit is the target itself,
  so one weight means the same for short and long targets).
- format check: 1 if the response matches a regular expression, else 0.
- repetition penalty over the response's M = w - n + 1 word n-grams (w words
  split on whitespace, compared exactly): -(M - distinct) / M, the fraction
  of n-grams that repeat an earlier one, negated; 0 with fewer than n words.
"""

from __future__ import annotations

from collections.abc import Sequence

LENGTH_SIDES = ("both", "over", "under")


def length_penalty(num_tokens: int, target_tokens: int, side: str = "both") -> float:
    if target_tokens < 1:
        raise ValueError(f"target_tokens must be >= 1, got {target_tokens}")
    if side == "both":
        excess = abs(num_tokens - target_tokens)
    elif side == "over":
        excess = max(0, num_tokens - target_tokens)
    elif side == "under":
        excess = max(0, target_tokens - num_tokens)
    else:
        raise ValueError(f"side must be one of {', '.join(LENGTH_SIDES)}, got {side!r}")
    return -excess / target_tokens


def format_check(matched: bool) -> float:
    """The regex term's value; matching runs in ``composite`` (compiled
    once, with a time limit), so this stays a function of its outcome."""
    return 1.0 if matched else 0.0


def repeated_ngram_fraction(words: Sequence[str], n: int) -> float:
    """(M - distinct) / M over the M word n-grams; 0 when M < 1."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


def repetition_penalty(text: str, n: int) -> float:
    return -repeated_ngram_fraction(text.split(), n)


def ensemble_moments(scores: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (divisor K) of K member scores.
    Population, not sample: the K members are the whole ensemble being
    described, not draws used to estimate a wider population's spread, and
    it keeps the penalty's scale independent of K (for K = 2 the std is half
    the members' gap; the sample std would be sqrt(2) times that)."""
    if not scores:
        raise ValueError("an ensemble needs at least one member score")
    mean = sum(scores) / len(scores)
    variance = sum((s - mean) ** 2 for s in scores) / len(scores)
    return mean, variance ** 0.5


def penalized_mean(scores: Sequence[float], k: float) -> float:
    """mean - k * std (population std): a pessimistic ensemble reward that
    pays less where the members disagree (Coste et al. 2023)."""
    mean, std = ensemble_moments(scores)
    return mean - k * std
