"""How far two reward-model versions agree, before one replaces the other.

Both versions score the same labelled examples (each a group of responses to
one prompt, best first by the human label). Reported:

- pairwise agreement: over every pair of responses to the same prompt, the
  fraction both versions order the same way (a tie in one version counts
  half). This is what RLHF consumes: a policy only sees which of its samples
  is better.
- Spearman rank correlation of all scores (scipy.stats.spearmanr): whether
  the versions agree on the global ordering, which normalization and reward
  thresholds depend on.
- each version's accuracy against the labels (held-out pairwise accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Agreement:
    examples: int
    pairs: int
    pairwise_agreement: float
    spearman: float
    spearman_pvalue: float
    active_accuracy: float
    candidate_accuracy: float

    def to_json(self) -> dict:
        return asdict(self)


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def agreement(active: Sequence[Sequence[float]], candidate: Sequence[Sequence[float]]) -> Agreement:
    """``active[i]`` and ``candidate[i]``: the two versions' scores of example
    i's responses, best first by label."""
    from scipy.stats import spearmanr

    if len(active) != len(candidate) or not active:
        raise ValueError("both versions must score the same, non-empty list of examples")
    agree = pairs = 0.0
    right = {"active": 0.0, "candidate": 0.0}
    for x, y in zip(active, candidate):
        if len(x) != len(y) or len(x) < 2:
            raise ValueError("every example needs the same >= 2 responses scored by both versions")
        for i in range(len(x)):
            for j in range(i + 1, len(x)):
                sx, sy = _sign(x[i] - x[j]), _sign(y[i] - y[j])
                agree += 1.0 if sx == sy else 0.5 if 0 in (sx, sy) else 0.0
                # i is labelled better than j.
                right["active"] += 1.0 if sx > 0 else 0.5 if sx == 0 else 0.0
                right["candidate"] += 1.0 if sy > 0 else 0.5 if sy == 0 else 0.0
                pairs += 1
    flat_x = [s for row in active for s in row]
    flat_y = [s for row in candidate for s in row]
    rho, pvalue = spearmanr(flat_x, flat_y)
    return Agreement(
        examples=len(active), pairs=int(pairs), pairwise_agreement=agree / pairs,
        spearman=float(rho), spearman_pvalue=float(pvalue),
        active_accuracy=right["active"] / pairs, candidate_accuracy=right["candidate"] / pairs,
    )
