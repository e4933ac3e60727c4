"""The RLHF objective as small pure tensor functions.

PPO as in InstructGPT (Ouyang et al. 2022, "Training language models to follow
instructions with human feedback", eq. 2): the reward of a sample is the
reward model's score of the whole sequence minus a per-token KL penalty against
the frozen reference (SFT) policy,

    R(x, y) = r_θ(x, y) − β · log(π(y | x) / π_ref(y | x)),

spread over tokens as in Ziegler et al. 2019 ("Fine-Tuning Language Models from
Human Preferences"): every token t gets −β·KL_t and the last real token also
gets r_θ. A value head and GAE (Schulman et al. 2016) turn these into
advantages; the clipped surrogate (Schulman et al. 2017, PPO) with a clipped
value loss and an entropy bonus is optimized for a few minibatch epochs.
Optional pieces: the pretraining-mix term of PPO-ptx (Ouyang et al. 2022), an
adaptive KL coefficient (Ziegler et al. 2019), and two critic-free advantage
estimators on the same loop, RLOO (Ahmadian et al. 2024, "Back to Basics") and
GRPO (Shao et al. 2024, DeepSeekMath), and advantage actor-critic's
unclipped one-pass policy gradient (A2C; Mnih et al. 2016).

Shapes and conventions (every function below uses them):

* ``B`` sequences, ``T`` completion tokens, ``V`` vocabulary entries. Only the
  completion is scored; prompt tokens never appear in these tensors.
* ``mask`` (B, T): true on real completion tokens, false on the padding after
  the end of a completion. Completions are right-padded. Padded positions may
  hold anything finite; they never reach a result, and outputs are 0 there.
* ``logprobs[:, t] = log π(y_t | x, y_<t)``; ``values[:, t] = V(x, y_<t)`` is
  read from the same hidden position as the logits that predict ``y_t``.
* "old" log-probs are those of the policy that *sampled* the rollout (the
  behaviour policy); rollouts carry them (``Rollout.sampling_logprobs``).

Stale rollouts. Rollouts arrive asynchronously, so some were sampled by a
policy a few updates behind the one being trained. The trainer's policy:

1. Drop rollouts whose lag exceeds a bound, and rollouts from a policy version
   the trainer has not published (:func:`staleness_verdict`).
2. Within the bound, one of two objectives (``ppo.objective``):

   * ``clipped``: the rollout's own sampling log-probs are PPO's
     ``old_logprobs``. The ratio π_θ/π_behav *is* the importance correction
     and clipping bounds how far an update moves on off-policy data, but the
     trust region is then centred on a policy k versions old, so a stale
     rollout's ratio can start outside [1−ε, 1+ε] and be clipped (no
     gradient) before the update has moved at all.
   * ``decoupled``: decoupled PPO (Hilton et al. 2021, "Batch
     size-invariance for policy optimization"; the objective of
     AReaL, Fu et al. 2025). The trust region is centred on the
     *proximal* policy π_prox, the trained policy at the start of the update
     (its log-probs are recomputed once, before the minibatch epochs), and
     the off-policyness is corrected by a separate behaviour importance
     weight w = π_prox/π_behav that takes no gradient
     (:func:`behaviour_weights`, :func:`decoupled_policy_loss`). The weight
     is truncated at ``behaviour_weight_cap`` (min(w, c), the truncated
     importance sampling of IMPALA's V-trace, Espeholt et al. 2018, ρ̄):
     a token the behaviour policy sampled with a far smaller probability
     than π_prox would otherwise dominate the batch's gradient. AReaL zeroes
     such tokens instead (its ``behav_imp_weight_cap``); truncation keeps
     them at the cap. With π_prox = π_behav (fresh rollouts) w = 1 and the
     objective is exactly the clipped one.

Rewards and advantages depend on rollout data only: compute them
under ``torch.no_grad()``. The losses are differentiable in ``logprobs``,
``values`` and ``logits``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from enum import Enum
from typing import Any, NamedTuple

import torch
from torch import Tensor

from arbiter.errors import FailedPrecondition, InvalidInput
from arbiter.kl import KLEstimator, kl_from_log_ratio

LOSS_AGGREGATIONS = ("token", "sequence")


# ----------------------------------------------------------------------------
# Masked statistics


def _as_mask(mask: Tensor, like: Tensor, name: str = "mask") -> Tensor:
    if tuple(mask.shape) != tuple(like.shape):
        raise InvalidInput(name, f"has shape {tuple(mask.shape)}, expected {tuple(like.shape)}")
    return mask.bool()


def _check_shape(name: str, tensor: Tensor, shape: Sequence[int]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise InvalidInput(name, f"has shape {tuple(tensor.shape)}, expected {tuple(shape)}")


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` where ``mask`` is true.

    With ``dim=None`` a scalar, and an empty mask is an error (there is no mean).
    With ``dim`` given, rows with no selected element get 0 so a batch with an
    empty completion does not poison the rest.
    """
    m = _as_mask(mask, values)
    selected = torch.where(m, values, 0)
    if dim is None:
        count = int(m.sum())
        if count == 0:
            raise InvalidInput("mask", "selects no elements; a masked mean needs at least one")
        return selected.sum() / count
    return selected.sum(dim) / m.sum(dim).clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``values`` where ``mask`` is true (scalar).

    Unbiased (Bessel-corrected) by default, as in TRL's ``masked_var``.
    """
    m = _as_mask(mask, values)
    mean = masked_mean(values, m)
    var = masked_mean((values - mean) ** 2, m)
    if unbiased:
        n = int(m.sum())
        if n < 2:
            raise InvalidInput("mask", f"selects {n} element(s); the unbiased variance needs at least 2")
        var = var * (n / (n - 1))
    return var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(values − mean) / sqrt(var + eps) over the masked elements; 0 on padding.

    ``shift_mean=False`` keeps the mean and only rescales: that is how rewards
    are whitened (a constant reward offset still carries signal through the
    value baseline), whereas advantages are fully whitened.
    """
    m = _as_mask(mask, values)
    mean = masked_mean(values, m)
    var = masked_var(values, m)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, 0)


def masked_aggregate(per_token: Tensor, mask: Tensor, aggregation: str = "token") -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    ``"token"``: mean over all real tokens of the batch (TRL's PPO; long
    completions weigh more). ``"sequence"``: mean over sequences of each
    sequence's token mean (GRPO, Shao et al. 2024 eq. 3; every sample weighs
    the same). Sequences with no real token are left out of the sequence mean.
    """
    m = _as_mask(mask, per_token)
    if aggregation == "token":
        return masked_mean(per_token, m)
    if aggregation == "sequence":
        per_sequence = masked_mean(per_token, m, dim=1)  # (B,)
        return masked_mean(per_sequence, m.any(dim=1))
    raise InvalidInput("aggregation", f"must be one of {LOSS_AGGREGATIONS}, got {aggregation!r}")


def _check_right_padded(mask: Tensor) -> None:
    # A real token after a padded one would let GAE bootstrap through a hole.
    if mask.shape[1] > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise InvalidInput("mask", "completions must be right-padded (no real token after a padded one)")


def last_token_index(mask: Tensor) -> Tensor:
    """(B,) index of the last real token of each row of a (B, T) mask."""
    m = mask.bool()
    if m.dim() != 2:
        raise InvalidInput("mask", f"must be 2-D (B, T), got shape {tuple(m.shape)}")
    empty = (~m.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise InvalidInput("mask", f"rows {empty} have no completion tokens to carry the score")
    T = m.shape[1]
    return T - 1 - m.flip(1).long().argmax(dim=1)


# ----------------------------------------------------------------------------
# KL penalty and rewards


class PenalizedRewards(NamedTuple):
    rewards: Tensor  # (B, T) −β·KL_t, plus the RM score on the last real token
    kl: Tensor  # (B, T) per-token KL estimate, 0 on padding


def kl_penalized_rewards(
    rm_score: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: KLEstimator | str = KLEstimator.K1,
) -> PenalizedRewards:
    """Per-token rewards r_t = −β·KL_t + [t = last] · r_θ (Ziegler et al. 2019).

    rm_score (B,) is the reward model's score of the full sample (InstructGPT
    scores only the finished sequence, so it lands on the last real token);
    logprobs, ref_logprobs, mask (B, T). KL_t is one of Schulman's estimators
    (:mod:`arbiter.kl`): k1 is InstructGPT's log-ratio. Critic-free
    estimators (RLOO, Ahmadian et al. 2024 §3) treat the completion as one
    action: their reward is ``rewards.sum(dim=1)``.
    """
    m = _as_mask(mask, logprobs)
    _check_shape("ref_logprobs", ref_logprobs, logprobs.shape)
    _check_shape("rm_score", rm_score, logprobs.shape[:1])
    if not kl_coef >= 0:
        raise InvalidInput("kl_coef", f"must be >= 0, got {kl_coef}")
    kl = torch.where(m, kl_from_log_ratio(estimator, logprobs - ref_logprobs), 0)  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    last = last_token_index(m)  # (B,)
    rewards = rewards.scatter_add(1, last[:, None], rm_score.to(rewards.dtype)[:, None])
    return PenalizedRewards(rewards=rewards, kl=kl)


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    estimator: KLEstimator | str = KLEstimator.K3,
    *,
    aggregation: str = "token",
) -> Tensor:
    """The KL to the reference as a loss term (GRPO, Shao et al. 2024, eq. 3,
    with Schulman's k3): the estimator at each sampled token between the
    trained policy's log-probs (differentiable) and the reference's, averaged
    like the policy loss. With k3 and d = log π_θ − log π_ref the gradient per
    token is (1 − e^−d)·∇log π_θ. All inputs (B, T); a scalar."""
    m = _as_mask(mask, logprobs)
    _check_shape("ref_logprobs", ref_logprobs, logprobs.shape)
    per_token = torch.where(m, kl_from_log_ratio(estimator, logprobs - ref_logprobs), 0)  # (B, T)
    return masked_aggregate(per_token, m, aggregation)


# ----------------------------------------------------------------------------
# Advantages


class Advantages(NamedTuple):
    advantages: Tensor  # (B, T), 0 on padding
    returns: Tensor  # (B, T) value targets A_t + V_t, 0 on padding


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> Advantages:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16).

    δ_t = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γλ A_{t+1},  returns = A + V.
    rewards, values, mask (B, T), right-padded. The episode ends at the last
    real token, so V and A after it are 0 (no bootstrap past EOS or a
    truncated completion: the RM score already judged what was generated).
    """
    m = _as_mask(mask, rewards)
    _check_shape("values", values, rewards.shape)
    _check_right_padded(m)
    if not 0 <= gamma <= 1:
        raise InvalidInput("gamma", f"must be in [0, 1], got {gamma}")
    if not 0 <= lam <= 1:
        raise InvalidInput("lam", f"must be in [0, 1], got {lam}")
    rewards = torch.where(m, rewards, 0)
    values = torch.where(m, values, 0)
    B, T = rewards.shape
    next_value = rewards.new_zeros(B)  # V_{t+1}
    next_advantage = rewards.new_zeros(B)  # A_{t+1}
    reversed_advantages = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        reversed_advantages.append(next_advantage)
        next_value = values[:, t]
    advantages = torch.stack(reversed_advantages[::-1], dim=1)  # (B, T)
    advantages = torch.where(m, advantages, 0)
    returns = torch.where(m, advantages + values, 0)
    return Advantages(advantages=advantages, returns=returns)


def _group_index(group_ids: Tensor | Sequence[Hashable], n: int) -> Tensor:
    """Map arbitrary group labels (e.g. ``Rollout.group_id`` strings) to 0..G-1."""
    if isinstance(group_ids, Tensor):
        if tuple(group_ids.shape) != (n,):
            raise InvalidInput("group_ids", f"has shape {tuple(group_ids.shape)}, expected ({n},)")
        return torch.unique(group_ids, return_inverse=True)[1]
    if len(group_ids) != n:
        raise InvalidInput("group_ids", f"has {len(group_ids)} entries, expected {n}")
    index: dict[Hashable, int] = {}
    return torch.tensor([index.setdefault(g, len(index)) for g in group_ids], dtype=torch.long)


def _group_moments(scores: Tensor, group_ids: Tensor | Sequence[Hashable] | None, who: str):
    """Per-sample group count, group mean and unbiased group variance.

    scores is (G, K) (row = group) with group_ids None, or (B,) with group_ids.
    Returns (scores, count, sum, mean, variance), each flat (N,) and per sample.
    """
    if not scores.is_floating_point():
        scores = scores.to(torch.get_default_dtype())
    if group_ids is None:
        if scores.dim() != 2:
            raise InvalidInput("scores", f"must be (G, K) without group_ids, got shape {tuple(scores.shape)}")
        G, K = scores.shape
        inverse = torch.arange(G, device=scores.device).repeat_interleave(K)
    else:
        if scores.dim() != 1:
            raise InvalidInput("scores", f"must be (B,) with group_ids, got shape {tuple(scores.shape)}")
        inverse = _group_index(group_ids, scores.shape[0]).to(scores.device)
    flat = scores.reshape(-1)
    n_groups = int(inverse.max()) + 1 if flat.numel() else 0
    zeros = flat.new_zeros(n_groups)
    counts = zeros.index_add(0, inverse, torch.ones_like(flat))
    if n_groups and int(counts.min()) < 2:
        raise InvalidInput(
            "group_ids" if group_ids is not None else "scores",
            f"every group needs at least 2 samples for {who}; smallest group has {int(counts.min())}",
        )
    sums = zeros.index_add(0, inverse, flat)
    means = sums / counts
    squares = zeros.index_add(0, inverse, (flat - means[inverse]) ** 2)
    variances = squares / (counts - 1)
    return flat, counts[inverse], sums[inverse], means[inverse], variances[inverse]


def rloo_advantages(scores: Tensor, group_ids: Tensor | Sequence[Hashable] | None = None) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, eq. 9): A_i = r_i − mean_{j≠i} r_j.

    scores (G, K) with one group of K samples per row, or (B,) plus group_ids
    (B,); the result has the shape of scores. Equivalently A_i = K/(K−1)·(r_i − r̄).
    """
    flat, counts, sums, _, _ = _group_moments(scores, group_ids, "RLOO's leave-one-out baseline")
    baseline = (sums - flat) / (counts - 1)
    return (flat - baseline).reshape(scores.shape)


def grpo_advantages(
    scores: Tensor,
    group_ids: Tensor | Sequence[Hashable] | None = None,
    eps: float = 1e-4,
    scale_by_std: bool = True,
) -> Tensor:
    """Group-relative advantage (Shao et al. 2024, §4.1.2): A_i = (r_i − mean(r)) / (std(r) + eps).

    The group std is unbiased, as in TRL's GRPOTrainer. ``scale_by_std=False``
    only centres (Liu et al. 2025, "Dr. GRPO": the std division up-weights
    groups that are nearly solved or nearly failed).
    """
    flat, _, _, means, variances = _group_moments(scores, group_ids, "GRPO's group statistics")
    advantages = flat - means
    if scale_by_std:
        advantages = advantages / (variances.sqrt() + eps)
    return advantages.reshape(scores.shape)


def broadcast_sequence_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """(B,) outcome advantages → (B, T): every real token of a sample gets its sample's advantage."""
    m = mask.bool()
    _check_shape("advantages", advantages, m.shape[:1])
    return torch.where(m, advantages[:, None], 0)


# ----------------------------------------------------------------------------
# Losses


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[tokens]: (B, T, V), (B, T) → (B, T)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.long()[..., None]).squeeze(-1)


class PolicyLoss(NamedTuple):
    loss: Tensor  # scalar, differentiable in logprobs
    clipfrac: Tensor  # fraction of real tokens where the clipped term was chosen (detached)
    approx_kl: Tensor  # k3 estimate of KL(π_old ‖ π_θ) (detached); decoupled: KL(π_prox ‖ π_θ)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_coef: float,
    *,
    aggregation: str = "token",
) -> PolicyLoss:
    """Clipped surrogate (Schulman et al. 2017, eq. 7), negated into a loss.

    ratio = π_θ/π_old,  L = −min(ratio·A, clip(ratio, 1−ε, 1+ε)·A) per token;
    for A > 0 the min caps the gain at ratio 1+ε, for A < 0 at 1−ε, and a
    ratio that moved the wrong way is never clipped. All inputs (B, T).
    approx_kl is cleanrl's (ratio − 1) − log ratio.
    """
    return _surrogate(logprobs, old_logprobs, advantages, mask, clip_coef, None, aggregation)


def _surrogate(
    logprobs: Tensor, anchor_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_coef: float,
    weights: Tensor | None, aggregation: str,
) -> PolicyLoss:
    """The clipped surrogate with its ratio against ``anchor_logprobs``, each
    token's term scaled by ``weights`` (B, T) when given."""
    m = _as_mask(mask, logprobs)
    _check_shape("old_logprobs", anchor_logprobs, logprobs.shape)
    _check_shape("advantages", advantages, logprobs.shape)
    if not clip_coef > 0:
        raise InvalidInput("clip_coef", f"must be > 0, got {clip_coef}")
    log_ratio = logprobs - anchor_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    per_token = torch.maximum(unclipped, clipped)  # (B, T) = −min(·, ·)
    if weights is not None:
        per_token = weights * per_token
    loss = masked_aggregate(per_token, m, aggregation)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), m)
        approx_kl = masked_mean((ratio - 1) - log_ratio, m)
    return PolicyLoss(loss=loss, clipfrac=clipfrac, approx_kl=approx_kl)


def a2c_policy_loss(
    logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cap: float | None,
    *,
    aggregation: str = "token",
) -> PolicyLoss:
    """Advantage actor-critic's policy gradient (Mnih et al. 2016, "Asynchronous
    Methods for Deep Reinforcement Learning", §4: ∇ log π(a|s)·A), negated into
    a loss, with no ratio and no clipping:

        L = −w · A · log π_θ,   w = min(π_θ/π_behav, cap), no gradient through w,

    per token. On-policy w = 1 and this is A2C's −A·log π exactly; a rollout
    sampled a few versions back gets the truncated importance weight of
    IMPALA's V-trace policy gradient (Espeholt et al. 2018, ρ_t = min(ρ̄,
    π/μ)), so ∇L = −min(π_θ/π_behav, cap)·A·∇log π_θ. All inputs (B, T).
    clipfrac is the fraction of real tokens whose weight was truncated;
    approx_kl is KL(π_behav ‖ π_θ) as in :func:`policy_loss`.
    """
    m = _as_mask(mask, logprobs)
    _check_shape("advantages", advantages, logprobs.shape)
    # The same truncated weight as decoupled PPO's, with the trained policy in place of π_prox.
    weights = behaviour_weights(logprobs.detach(), behaviour_logprobs, m, cap)
    per_token = -weights.weights * advantages * logprobs  # (B, T)
    loss = masked_aggregate(per_token, m, aggregation)
    with torch.no_grad():
        log_ratio = torch.where(m, logprobs - behaviour_logprobs, 0)  # (B, T)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, m)
    return PolicyLoss(loss=loss, clipfrac=weights.truncated_fraction, approx_kl=approx_kl)


class BehaviourWeights(NamedTuple):
    weights: Tensor  # (B, T) min(π_prox/π_behav, cap), 0 on padding; no gradient
    truncated_fraction: Tensor  # fraction of real tokens whose weight was above the cap (detached)


def behaviour_weights(
    proximal_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, cap: float | None,
) -> BehaviourWeights:
    """Decoupled PPO's behaviour importance weight w_t = π_prox(y_t)/π_behav(y_t)
    (Hilton et al. 2021), truncated: min(w_t, cap) (Espeholt et al. 2018,
    V-trace's ρ̄; ``cap=None`` leaves it untruncated).

    proximal_logprobs: the trained policy's at the start of the update;
    behaviour_logprobs: the sampler's (``Rollout.sampling_logprobs``); both
    (B, T). Computed from data only: the result carries no gradient.
    """
    m = _as_mask(mask, proximal_logprobs)
    _check_shape("behaviour_logprobs", behaviour_logprobs, proximal_logprobs.shape)
    if cap is not None and not cap >= 1:
        # Below 1 even an on-policy token (w = 1) would be down-weighted.
        raise InvalidInput("cap", f"must be >= 1 or None, got {cap}")
    with torch.no_grad():
        raw = torch.exp(torch.where(m, proximal_logprobs - behaviour_logprobs, 0))  # (B, T)
        weights = raw if cap is None else torch.clamp(raw, max=cap)
        truncated = masked_mean((raw > weights).to(raw.dtype), m)
        return BehaviourWeights(weights=torch.where(m, weights, 0), truncated_fraction=truncated)


def decoupled_policy_loss(
    logprobs: Tensor,
    proximal_logprobs: Tensor,
    behaviour_weights: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_coef: float,
    *,
    aggregation: str = "token",
) -> PolicyLoss:
    """Decoupled clipped surrogate (Hilton et al. 2021; AReaL, Fu et al. 2025):

        L = −w · min(r·A, clip(r, 1−ε, 1+ε)·A),  r = π_θ/π_prox,  w = π_prox/π_behav (truncated),

    per token, aggregated like :func:`policy_loss`. The trust region is
    around the proximal policy (the trained one at the start of this update),
    so a stale rollout's tokens are not clipped merely for being stale; w
    (from :func:`behaviour_weights`, no gradient) corrects for sampling them
    under π_behav. All inputs (B, T); clipfrac and approx_kl are against π_prox.
    """
    _check_shape("behaviour_weights", behaviour_weights, logprobs.shape)
    return _surrogate(logprobs, proximal_logprobs, advantages, mask, clip_coef, behaviour_weights.detach(),
                      aggregation)


class ValueLoss(NamedTuple):
    loss: Tensor  # scalar, differentiable in values
    clipfrac: Tensor  # fraction of real tokens where the clipped error was larger (detached)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_coef_vf: float | None,
) -> ValueLoss:
    """½·max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²), masked mean.

    The clipped value objective of the PPO baselines (and TRL / InstructGPT
    implementations): the pessimistic max keeps the value head from moving far
    from the values the advantages were computed with. ``clip_coef_vf=None``
    gives the plain ½(V − R)². All inputs (B, T).
    """
    m = _as_mask(mask, values)
    _check_shape("old_values", old_values, values.shape)
    _check_shape("returns", returns, values.shape)
    unclipped = (values - returns) ** 2  # (B, T)
    if clip_coef_vf is None:
        return ValueLoss(loss=0.5 * masked_mean(unclipped, m), clipfrac=values.new_zeros(()))
    if not clip_coef_vf > 0:
        raise InvalidInput("clip_coef_vf", f"must be > 0 or None, got {clip_coef_vf}")
    values_clipped = old_values + torch.clamp(values - old_values, -clip_coef_vf, clip_coef_vf)
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), m)
    return ValueLoss(loss=loss, clipfrac=clipfrac)


def token_entropy(logits: Tensor) -> Tensor:
    """H(softmax(logits)) per position: (B, T, V) → (B, T); logsumexp − Σ p·logit is stable."""
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(dim=-1)


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean policy entropy over real completion tokens (scalar); logits (B, T, V), mask (B, T)."""
    if logits.dim() != 3:
        raise InvalidInput("logits", f"must be (B, T, V), got shape {tuple(logits.shape)}")
    return masked_mean(token_entropy(logits), mask)


def entropy_from_logprobs(logprobs: Tensor, mask: Tensor) -> Tensor:
    """Mean policy entropy −Σ p·log p over real completion tokens (scalar),
    from log-probabilities over the vocabulary (B, T, V) (a log-softmax already
    computed for the tokens' log-probs: no second softmax); mask (B, T)."""
    if logprobs.dim() != 3:
        raise InvalidInput("logprobs", f"must be (B, T, V), got shape {tuple(logprobs.shape)}")
    # Tokens an action mask removed (NLPO) are -inf: their 0·log 0 is 0, not NaN.
    finite = logprobs.masked_fill(torch.isinf(logprobs), 0.0)
    return masked_mean(-(logprobs.exp() * finite).sum(dim=-1), mask)


def nlpo_action_mask(mask_logits: Tensor, top_p: float, tokens: Tensor | None = None) -> Tensor:
    """NLPO's action set (Ramamurthy et al. 2022): the top-p nucleus of the
    masking policy π_ψ's own distribution (temperature 1), (..., V) bool, by
    the rule the policy service samples under (``top_p_set``). ``tokens``
    (...): the tokens actually sampled stay in the set: they were drawn from
    it, and a float rounding that moved one across the nucleus's edge here
    must not make its log-prob -inf (a NaN ratio)."""
    from arbiter.policy.sampling import top_p_set

    allowed = top_p_set(mask_logits.detach(), top_p)
    if tokens is not None:
        allowed.scatter_(-1, tokens.long()[..., None], True)
    return allowed


def nlpo_logprobs(logits: Tensor, allowed: Tensor, temperature: float) -> Tensor:
    """log π_θ at ``temperature`` renormalised over the action set
    ``allowed`` (``nlpo_action_mask``); tokens outside it are -inf. The
    distribution the policy service samples a masked request from
    (``sampling_logprobs`` with ``allowed``)."""
    return torch.log_softmax((logits / temperature).masked_fill(~allowed, float("-inf")), dim=-1)


def ptx_loss(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Pretraining LM loss for PPO-ptx (Ouyang et al. 2022, eq. 2: + γ·E_pretrain[log π(x)]).

    Mean next-token negative log-likelihood: logits (B, T, V) are the policy's
    outputs on input_ids (B, T), position t predicting token t+1;
    attention_mask (B, T) marks real tokens.
    """
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
        raise InvalidInput(
            "logits", f"must be (B, T, V) over input_ids {tuple(input_ids.shape)}, got {tuple(logits.shape)}"
        )
    _check_shape("attention_mask", attention_mask, input_ids.shape)
    logp = token_logprobs(logits[:, :-1], input_ids[:, 1:])  # (B, T-1)
    return -masked_mean(logp, attention_mask[:, 1:])


def ppo_total_loss(
    pg_loss: Tensor,
    *,
    vf_loss: Tensor | None = None,
    vf_coef: float = 0.0,
    entropy: Tensor | None = None,
    ent_coef: float = 0.0,
    ptx_loss: Tensor | None = None,
    ptx_coef: float = 0.0,
    kl_loss: Tensor | None = None,
    kl_coef: float = 0.0,
) -> Tensor:
    """pg + c_vf·vf − c_ent·H + γ_ptx·ptx (+ β·KL with ``kl.penalty: loss``).

    The entropy is a bonus, hence the minus. A term whose coefficient is
    non-zero must be given; a term given with a zero coefficient (e.g. an
    entropy computed only for logging) contributes nothing. Critic-free runs
    leave vf_loss out. The KL to the reference is in the reward
    (:func:`kl_penalized_rewards`) unless ``kl.penalty`` is ``loss``
    (:func:`kl_loss`).
    """
    total = pg_loss
    for name, term, coef, sign in (
        ("vf_loss", vf_loss, vf_coef, 1.0),
        ("entropy", entropy, ent_coef, -1.0),
        ("ptx_loss", ptx_loss, ptx_coef, 1.0),
        ("kl_loss", kl_loss, kl_coef, 1.0),
    ):
        if coef < 0:
            raise InvalidInput(name, f"coefficient must be >= 0, got {coef}")
        if coef == 0:
            continue
        if term is None:
            raise InvalidInput(name, f"is required when its coefficient is {coef}")
        total = total + sign * coef * term
    return total


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 − Var[R − V] / Var[R] over real tokens, as cleanrl's ppo.py logs it.

    values: the value head's estimates the advantages were computed with,
    returns: their GAE targets, both (B, T). 1 is a perfect critic, 0 is no
    better than predicting the mean return, < 0 is worse. NaN when the returns
    do not vary (nothing to explain). The ratio of variances is the same
    biased or not, so one real token is enough.
    """
    var_returns = float(masked_var(returns, mask, unbiased=False))
    if var_returns == 0:
        return math.nan
    return 1.0 - float(masked_var(returns - values, mask, unbiased=False)) / var_returns


def minibatch_indices(n: int, minibatch_size: int, *, generator: torch.Generator | None = None) -> list[Tensor]:
    """One epoch's minibatches: a random permutation of range(n) in chunks (the last may be short)."""
    if n < 1:
        raise InvalidInput("n", f"must be >= 1, got {n}")
    if minibatch_size < 1:
        raise InvalidInput("minibatch_size", f"must be >= 1, got {minibatch_size}")
    return list(torch.randperm(n, generator=generator).split(minibatch_size))


# ----------------------------------------------------------------------------
# KL coefficient controllers (checkpointed with the trainer)


class FixedKLController:
    """A constant β."""

    kind = "fixed"

    def __init__(self, kl_coef: float):
        if not kl_coef >= 0:
            raise InvalidInput("kl_coef", f"must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.__init__(state["value"])


class AdaptiveKLController:
    """Proportional controller driving the measured KL toward a target (Ziegler et al. 2019, §2.2).

    e_t = clip(KL_t / KL_target − 1, −0.2, 0.2),  β ← β · (1 + e_t · n_steps / horizon).

    ``current_kl`` is the batch's mean per-sequence KL (Σ_t KL_t averaged over
    samples) and ``n_steps`` the number of samples since the last update, so
    ``horizon`` is measured in samples (Ziegler et al. use 10,000).
    """

    kind = "adaptive"

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if not init_kl_coef > 0:
            raise InvalidInput("init_kl_coef", f"must be > 0 for the adaptive controller, got {init_kl_coef}")
        if not target > 0:
            raise InvalidInput("target", f"must be > 0, got {target}")
        if not horizon > 0:
            raise InvalidInput("horizon", f"must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise InvalidInput("current_kl", f"must be finite, got {current_kl}")
        # Beyond one horizon per update, a clipped error of −0.2 could drive β
        # to zero or below; a proportional step that large is a config error.
        if not 0 <= n_steps <= self.horizon:
            raise InvalidInput("n_steps", f"must be in [0, horizon={self.horizon:g}], got {n_steps}")
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.__init__(state["value"], state["target"], state["horizon"])


KLController = FixedKLController | AdaptiveKLController


def _check_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise InvalidInput("kind", f"state is for a {state.get('kind')!r} KL controller, not {kind!r}")


def kl_controller_from_state_dict(state: dict[str, Any]) -> KLController:
    """Rebuild whichever controller wrote ``state`` (for resuming a checkpoint)."""
    kind = state.get("kind")
    if kind == FixedKLController.kind:
        controller: KLController = FixedKLController(0.0)
    elif kind == AdaptiveKLController.kind:
        controller = AdaptiveKLController(1.0, 1.0, 1.0)
    else:
        raise InvalidInput("kind", f"unknown KL controller {kind!r}; expected 'fixed' or 'adaptive'")
    controller.load_state_dict(state)
    return controller


# ----------------------------------------------------------------------------
# Reward normalization across batches


class RunningMoments:
    """Running mean and variance of everything seen so far (Chan et al. 1979 parallel update).

    Used to normalize reward-model scores across batches (TRL's
    ``use_score_scaling`` / ``use_score_norm``): a fixed scale keeps β and the
    value head meaningful while the policy drifts. Statistics are float64
    Python numbers so the state round-trips exactly through a checkpoint.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 0.0  # population variance (M2 / count)
        self.count = 0

    def update(self, xs: Tensor, mask: Tensor | None = None) -> None:
        """Fold in the elements of xs (where mask is true, if given)."""
        if mask is not None:
            xs = xs[_as_mask(mask, xs)]
        xs = xs.detach().reshape(-1).to(torch.float64)
        n_b = xs.numel()
        if n_b == 0:
            return
        if not bool(torch.isfinite(xs).all()):
            raise InvalidInput("xs", "contains non-finite values")
        mean_b = float(xs.mean())
        var_b = float(((xs - mean_b) ** 2).mean())
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self.mean
        m2 = self.var * n_a + var_b * n_b + delta * delta * n_a * n_b / n
        self.mean += delta * n_b / n
        self.var = m2 / n
        self.count = n

    @property
    def std(self) -> float:
        """Unbiased standard deviation; NaN until two values were seen."""
        if self.count < 2:
            return math.nan
        return math.sqrt(self.var * self.count / (self.count - 1))

    def normalize(self, xs: Tensor, shift_mean: bool = True, eps: float = 1e-8, clip: float | None = None) -> Tensor:
        """(xs − mean) / (std + eps), or xs / (std + eps) without shift_mean; optionally clipped to ±clip."""
        if self.count < 2:
            raise FailedPrecondition(f"reward statistics have {self.count} value(s); normalizing needs at least 2")
        out = (xs - self.mean if shift_mean else xs) / (self.std + eps)
        if clip is not None:
            out = out.clamp(-clip, clip)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        count = int(state["count"])
        if count < 0 or float(state["var"]) < 0:
            raise InvalidInput("state", f"count and var must be >= 0, got count={count} var={state['var']}")
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), count


class VersionedMoments:
    """Running moments of raw reward-model scores, one ``RunningMoments`` per
    reward-model version (``Rollout.reward_model_version``).

    A reward model promoted mid-run (``arbiter rm loop``) scores on its own
    scale: its scores normalized with statistics gathered under the previous
    version would hand PPO a reward shifted by the difference between the two
    scales, a jump in advantages and in the value head's targets. Normalized
    with its own version's moments, every score is a z-score of its version,
    so the value head and the KL controller (which only sees KL) keep one
    scale across the swap. A batch mixing versions (rollouts sampled before
    and after a promotion) is normalized row by row, each row with its own
    version's moments after they took that version's scores of the batch. A
    version's first lone score normalizes to 0 (no reward signal) until a
    second one arrives. A checkpoint written before per-version moments
    holds one set: the first version seen after resuming adopts it.
    """

    # The key of a checkpoint's moments from before per-version moments.
    LEGACY = "\0legacy"

    def __init__(self) -> None:
        self.versions: dict[str, RunningMoments] = {}

    @property
    def count(self) -> int:
        return sum(m.count for key, m in self.versions.items() if key != self.LEGACY)

    @staticmethod
    def _rows(versions: Sequence[str]) -> dict[str, Tensor]:
        rows: dict[str, list[int]] = {}
        for i, version in enumerate(versions):
            rows.setdefault(version, []).append(i)
        return {version: torch.tensor(index) for version, index in rows.items()}

    def update(self, xs: Tensor, versions: Sequence[str]) -> None:
        """Fold each element of xs (B,) into the moments of its version (B names)."""
        if len(versions) != xs.numel():
            raise InvalidInput("versions", f"names {len(versions)} versions for {xs.numel()} scores")
        for version, index in self._rows(versions).items():
            if version not in self.versions and self.LEGACY in self.versions:
                self.versions[version] = self.versions.pop(self.LEGACY)
            self.versions.setdefault(version, RunningMoments()).update(xs[index])

    def normalize(self, xs: Tensor, versions: Sequence[str], eps: float = 1e-8) -> Tensor:
        out = torch.empty_like(xs)
        for version, index in self._rows(versions).items():
            moments = self.versions.get(version)
            if moments is None:
                raise FailedPrecondition(f"no reward statistics of reward-model version {version!r}: update first")
            out[index] = moments.normalize(xs[index], eps=eps) if moments.count >= 2 else xs[index] - moments.mean
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"versions": {version: m.state_dict() for version, m in self.versions.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        legacy = {} if "versions" in state or not state else {self.LEGACY: state}
        self.versions = {}
        for version, moments in {**state.get("versions", {}), **legacy}.items():
            self.versions[version] = RunningMoments()
            self.versions[version].load_state_dict(moments)


# ----------------------------------------------------------------------------
# Staleness of asynchronous rollouts


class Staleness(str, Enum):
    """What becomes of a rollout; a dropped one is counted under its verdict's value (the metrics' outcome label)."""

    KEEP = "keep"
    STALE = "stale"  # sampled more than max_lag policy updates ago
    UNKNOWN_VERSION = "unknown_version"  # a policy version this trainer has not published (by this step)


def staleness_verdict(behaviour_step: int | None, current_step: int, max_lag: int) -> Staleness:
    """Keep a rollout iff 0 ≤ current_step − behaviour_step ≤ max_lag.

    Steps are the training steps at which the policy versions were published
    (``PolicyUpdate.training_step``); the trainer maps a rollout's
    ``policy_version`` to its step, None when it never published that
    version (another run's, or one published after the checkpoint it
    restarted from). A version from a later step than the current one is
    unknown too. max_lag=0 is strictly on-policy.
    """
    if max_lag < 0:
        raise InvalidInput("max_lag", f"must be >= 0, got {max_lag}")
    if behaviour_step is None or behaviour_step > current_step:
        return Staleness.UNKNOWN_VERSION
    return Staleness.KEEP if current_step - behaviour_step <= max_lag else Staleness.STALE
