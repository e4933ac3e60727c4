"""Reward-model losses as pure functions of scores.

Scores are the RM's scalar outputs r(x, y). Shapes are in the comments:
B examples, K responses per example (best first).

- Bradley-Terry (Bradley & Terry 1952; the RM loss of Ouyang et al. 2022,
  TRL's RewardTrainer): P(chosen > rejected) = sigmoid(r_c - r_r), so the loss
  is -log sigmoid(r_c - r_r - m) with an optional margin m (Touvron et al.
  2023, Llama 2 section 3.2.2): the pair must be separated by at least m before
  the loss flattens.
- Plackett-Luce (Plackett 1975; Luce 1959) for a full ranking y_1 > ... > y_K:
  the ranking is drawn by repeatedly picking the best of what remains,
  P = prod_{k=1}^{K-1} exp(r_k) / sum_{j>=k} exp(r_j). For K = 2 it is exactly
  Bradley-Terry, so pairs and rankings train one model under one likelihood.
- All-pairs Bradley-Terry (Ouyang et al. 2022, eq. 1): the K(K-1)/2 pairs of a
  ranking, each a BT term, averaged per ranking. Offered for comparison; see
  ``arbiter.rm.config`` for why Plackett-Luce is the default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_REDUCTIONS = ("mean", "sum", "none")


def _reduce(per_example: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    if reduction == "none":
        return per_example
    raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """-log sigmoid(r_c - r_r - m). chosen, rejected, margin: (B,)."""
    diff = chosen - rejected  # (B,)
    if margin is not None:
        diff = diff - margin
    # logsigmoid is stable for large |diff|, unlike log(sigmoid(.)).
    return _reduce(-F.logsigmoid(diff), reduction)


def _check_ranking(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, K), got shape {tuple(scores.shape)}")
    if mask is None:
        return torch.ones_like(scores, dtype=torch.bool)
    if mask.shape != scores.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from scores shape {tuple(scores.shape)}")
    mask = mask.bool()
    # Valid entries must be a prefix of each row: padding only at the end.
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("mask must mark a prefix of each row (variable K is padded at the end)")
    if (mask.sum(dim=1) < 2).any():
        raise ValueError("every ranking needs at least 2 valid responses")
    return mask


def plackett_luce_loss(
    scores: torch.Tensor, mask: torch.Tensor | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """Negative Plackett-Luce log-likelihood of rankings.

    scores: (B, K), each row ordered best first; mask: (B, K) bool, True for
    real responses (a prefix of each row), for rankings of different K.
    Per example: sum_{k=1}^{K_i - 1} [logsumexp(r_k..r_{K_i}) - r_k].
    """
    mask = _check_ranking(scores, mask)
    masked = scores.masked_fill(~mask, float("-inf"))  # (B, K)
    # Suffix log-sum-exp: logsumexp over j >= k, via a cumulative sum of the reversed row.
    suffix = torch.logcumsumexp(masked.flip(1), dim=1).flip(1)  # (B, K)
    # The last valid position's term is log(exp(r_K)) - r_K = 0; padded ones are excluded.
    lengths = mask.sum(dim=1, keepdim=True)  # (B, 1)
    positions = torch.arange(scores.shape[1], device=scores.device)[None, :]  # (1, K)
    counted = positions < (lengths - 1)  # (B, K)
    terms = torch.where(counted, suffix - scores, torch.zeros_like(scores))  # (B, K)
    return _reduce(terms.sum(dim=1), reduction)


def all_pairs_bradley_terry_loss(
    scores: torch.Tensor, mask: torch.Tensor | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """Mean BT loss over the K(K-1)/2 ordered pairs (i better than j, i < j)
    of each ranking. scores, mask: (B, K) as for ``plackett_luce_loss``."""
    mask = _check_ranking(scores, mask)
    k = scores.shape[1]
    diff = scores[:, :, None] - scores[:, None, :]  # (B, K, K): r_i - r_j
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=scores.device), diagonal=1)  # i < j
    pairs = upper[None] & mask[:, :, None] & mask[:, None, :]  # (B, K, K)
    losses = torch.where(pairs, -F.logsigmoid(diff), torch.zeros_like(diff))
    per_example = losses.sum(dim=(1, 2)) / pairs.sum(dim=(1, 2))  # (B,)
    return _reduce(per_example, reduction)


def pairwise_accuracy(scores: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, int]:
    """(correctly ordered pairs, pairs) summed over rankings; a tie counts half.
    scores, mask: (B, K) best first. For pairs (K = 2) this is the usual
    held-out accuracy: the fraction with r_chosen > r_rejected."""
    mask = _check_ranking(scores, mask)
    k = scores.shape[1]
    diff = scores[:, :, None] - scores[:, None, :]  # (B, K, K)
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=scores.device), diagonal=1)
    pairs = upper[None] & mask[:, :, None] & mask[:, None, :]
    credit = (diff > 0).float() + 0.5 * (diff == 0).float()
    return float((credit * pairs).sum()), int(pairs.sum())
