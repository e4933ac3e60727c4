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

``ensemble_diversity`` asks the same of K versions meant to serve together as
an ensemble: how often they disagree, and whether their spread is large where
their mean is wrong (what an uncertainty penalty needs).
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


def order_credit(margin: float) -> float:
    """1 for a pair scored the labelled way round, 0.5 for a tie, 0 otherwise."""
    return 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0


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
                right["active"] += order_credit(sx)
                right["candidate"] += order_credit(sy)
                pairs += 1
    flat_x = [s for row in active for s in row]
    flat_y = [s for row in candidate for s in row]
    rho, pvalue = spearmanr(flat_x, flat_y)
    return Agreement(
        examples=len(active), pairs=int(pairs), pairwise_agreement=agree / pairs,
        spearman=float(rho), spearman_pvalue=float(pvalue),
        active_accuracy=right["active"] / pairs, candidate_accuracy=right["candidate"] / pairs,
    )


@dataclass(frozen=True)
class EnsembleDiversity:
    """Whether an ensemble's spread says where its mean is wrong, measured on
    gold-labelled pairs without any policy training (``ensemble_diversity``)."""

    members: int
    pairs: int
    # Each member's pairwise accuracy against the gold label (ties half).
    member_accuracy: tuple[float, ...]
    # Over member pairs, the mean fraction of labelled pairs the two order
    # differently (a tie in one counts half): 0 for copies.
    disagreement: float
    mean_accuracy: float
    # Accuracy of mean - penalty * std, what a penalized ensemble term serves.
    penalized_accuracy: float
    penalty: float
    # Pearson correlation, over responses, of the ensemble std with how far
    # the mean over-scores the response (mean minus gold, each standardized
    # over these responses): > 0 when the spread is large where the proxy is
    # too high, which is what subtracting it corrects.
    std_overestimate_corr: float
    # Probability that a pair the mean orders wrongly (a tie is not wrong)
    # has a larger spread of member margins than one it orders rightly (ties
    # half): 0.5 when the spread carries no information about the mean's errors.
    wrong_pair_auc: float

    def to_json(self) -> dict:
        return asdict(self)


def _pearson(x, y) -> float:
    import numpy as np

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _standardized(values):
    import numpy as np

    values = np.asarray(values, dtype=float)
    sd = values.std()
    return (values - values.mean()) / sd if sd > 0 else values * 0.0


def ensemble_diversity(
    scores: Sequence[Sequence[float]], pairs: Sequence[tuple[int, int]], gold: Sequence[float], penalty: float
) -> EnsembleDiversity:
    """``scores[j][r]``: member j's score of response r, on the scale the
    ensemble combines (each member normalized by its own statistics);
    ``pairs``: (better, worse) response indices by the gold label; ``gold[r]``:
    the gold score. Mean and std across members are the service's
    (population std, ``arbiter.reward.rules.ensemble_moments``)."""
    import numpy as np

    z = np.asarray(scores, dtype=float)  # (K, R)
    if z.ndim != 2 or z.shape[0] < 2 or not pairs:
        raise ValueError("need >= 2 members' scores of the same responses and >= 1 labelled pair")
    if z.shape[1] != len(gold):
        raise ValueError(f"{z.shape[1]} scored responses but {len(gold)} gold scores")
    better = np.array([b for b, _ in pairs])
    worse = np.array([w for _, w in pairs])
    mean, std = z.mean(axis=0), z.std(axis=0)  # (R,), population std
    margins = z[:, better] - z[:, worse]  # (K, P)
    k = len(z)
    member_accuracy = tuple(float(np.mean([order_credit(m) for m in row])) for row in margins)
    signs = np.sign(margins)
    disagreement = np.mean([np.mean(np.abs(signs[a] - signs[b]) / 2)
                            for a in range(k) for b in range(a + 1, k)])
    penalized = mean - penalty * std
    mean_margin = mean[better] - mean[worse]
    spread = margins.std(axis=0)  # (P,)
    wrong = mean_margin < 0
    auc = float("nan")
    if wrong.any() and (~wrong).any():
        a, b = spread[wrong][:, None], spread[~wrong][None, :]
        auc = float(np.mean((a > b) + 0.5 * (a == b)))
    return EnsembleDiversity(
        members=k, pairs=len(pairs), member_accuracy=member_accuracy, disagreement=float(disagreement),
        mean_accuracy=float(np.mean([order_credit(m) for m in mean_margin])),
        penalized_accuracy=float(np.mean([order_credit(m) for m in penalized[better] - penalized[worse]])),
        penalty=penalty,
        std_overestimate_corr=_pearson(std, _standardized(mean) - _standardized(gold)),
        wrong_pair_auc=auc,
    )
