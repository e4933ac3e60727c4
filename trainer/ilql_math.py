"""Implicit Language Q-Learning as small pure tensor functions.

ILQL (Snell et al. 2022, "Offline RL for Natural Language Generation with
Implicit Language Q Learning", §3-4) learns, from a fixed set of scored
samples and without ever querying a reward model, token-level value heads on
the language model's hidden states:

* Q(s, ·): one value per vocabulary entry at every state (the prefix up to a
  token), two of them (Q₁, Q₂; clipped double Q, Fujimoto et al. 2018), each
  with a target copy Q̂ᵢ that follows it by Polyak averaging;
* V(s): one value per state, fitted by expectile regression (IQL, Kostrikov
  et al. 2022) toward min(Q̂₁, Q̂₂)(s, a) over the actions *in the data*, so
  the Bellman backup never evaluates an unseen token:

      L_V = E[ |τ − 1(u < 0)| · u² ],   u = min_i Q̂ᵢ(s, a) − V(s)

  (τ > ½ makes V an upper expectile: an in-support maximum, not a mean);
* the Q heads regress onto the one-step target, V(s') taking no gradient
  and 0 after the last token (the episode ends there):

      L_Q = Σᵢ E[ (Qᵢ(s, a) − (r + γ·V(s')))² ]

* a conservative (CQL, Kumar et al. 2020) term that pushes Q down on tokens
  the data did not take: logsumexp over the vocabulary minus Q of the taken
  token, i.e. the cross-entropy of softmax(Qᵢ(s, ·)) against the data,

      L_CQL = Σᵢ E[ logsumexp_a' Qᵢ(s, a') − Qᵢ(s, a) ]

* and the policy π_β itself by plain next-token likelihood on the data (the
  paper's behaviour-cloned π_β; trlx calls it the AWAC term), optionally
  advantage-weighted by exp(β_awr · (min Q̂ − V)) (AWR, Peng et al. 2019).

Total: L = L_Q + L_V + α_cql · L_CQL + α_bc · L_BC. At decoding time the
policy samples from softmax(logits + β · (min_i Q̂ᵢ(s, ·) − V(s)))
(``arbiter.ilql.perturbed_logits``, the paper's eq. 4; logits and log π_β differ by
a per-row constant, which softmax ignores).

Shapes and conventions are those of :mod:`trainer.ppo_math`: ``B``
sequences, ``T`` completion tokens (right-padded, ``mask`` (B, T) true on
real tokens), ``V`` vocabulary entries. Position t of every (B, T) tensor is
the state *before* completion token ``actions[:, t]``: the hidden position
whose logits predict it, so ``values[:, t] = V(x, y_<t)``. Rewards are
per-token; a scored sample's score lands on its last real token
(:func:`terminal_rewards`). Every loss is a token mean over real tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from arbiter.errors import InvalidInput
from trainer.ppo_math import (
    _as_mask,
    _check_right_padded,
    _check_shape,
    last_token_index,
    masked_mean,
    token_logprobs,
)


def terminal_rewards(score: Tensor, mask: Tensor) -> Tensor:
    """(B,) sequence scores → (B, T) rewards: the score on each row's last
    real token, 0 elsewhere (a sample is judged only once it is complete)."""
    m = mask.bool()
    _check_shape("score", score, m.shape[:1])
    last = last_token_index(m)  # (B,)
    rewards = torch.zeros(m.shape, dtype=score.dtype, device=score.device)
    return rewards.scatter(1, last[:, None], score[:, None])


def next_state_values(values: Tensor, mask: Tensor) -> Tensor:
    """(B, T) V(s_{t+1}): ``values`` shifted left by one, 0 at and after each
    row's last real token (s_{T} is terminal: nothing follows the sample)."""
    m = _as_mask(mask, values)
    _check_right_padded(m)
    shifted = torch.cat([values[:, 1:], values.new_zeros(values.shape[0], 1)], dim=1)  # (B, T)
    # Real next state: position t+1 is a real token too.
    has_next = torch.cat([m[:, 1:], m.new_zeros(m.shape[0], 1)], dim=1)
    return torch.where(has_next, shifted, 0)


def q_targets(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """(B, T) r_t + γ·V(s_{t+1}), without gradient (the target of L_Q), 0 on padding."""
    m = _as_mask(mask, rewards)
    _check_shape("values", values, rewards.shape)
    if not 0 <= gamma <= 1:
        raise InvalidInput("gamma", f"must be in [0, 1], got {gamma}")
    target = rewards + gamma * next_state_values(values.detach(), m)
    return torch.where(m, target, 0)


def taken(q: Tensor, actions: Tensor) -> Tensor:
    """(B, T, V) Q(s, ·) and (B, T) taken tokens → (B, T) Q(s, a)."""
    return q.gather(-1, actions.long()[..., None]).squeeze(-1)


def q_loss(q_taken: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """E[(Q(s, a) − target)²] over real tokens, for one Q head (scalar)."""
    m = _as_mask(mask, q_taken)
    _check_shape("targets", targets, q_taken.shape)
    return masked_mean((q_taken - targets.detach()) ** 2, m)


def expectile_loss(target_q: Tensor, values: Tensor, mask: Tensor, tau: float) -> Tensor:
    """L_V = E[|τ − 1(u < 0)|·u²], u = Q̂(s, a) − V(s) (IQL eq. 5; ILQL eq. 2).

    ``target_q`` (B, T) is min over the target heads at the taken token and
    takes no gradient; only V learns here.
    """
    m = _as_mask(mask, values)
    _check_shape("target_q", target_q, values.shape)
    if not 0 < tau < 1:
        raise InvalidInput("tau", f"must be in (0, 1), got {tau}")
    u = target_q.detach() - values  # (B, T)
    weight = (tau - (u < 0).to(u.dtype)).abs()  # |τ − 1(u < 0)|
    return masked_mean(weight * u**2, m)


def cql_loss(q: Tensor, actions: Tensor, mask: Tensor) -> Tensor:
    """E[logsumexp_a' Q(s, a') − Q(s, a)] over real tokens, for one Q head:
    (B, T, V), (B, T), (B, T) → scalar (CQL(H), Kumar et al. 2020 eq. 4)."""
    m = _as_mask(mask, actions)
    _check_shape("q", q, (*actions.shape, q.shape[-1]))
    per_token = torch.logsumexp(q, dim=-1) - taken(q, actions)  # (B, T)
    return masked_mean(per_token, m)


def bc_loss(logits: Tensor, actions: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """E[−w · log π_β(a | s)] over real tokens: the policy's own likelihood of
    the data, w = 1 (behaviour cloning) or advantage weights (no gradient)."""
    m = _as_mask(mask, actions)
    nll = -token_logprobs(logits, actions)  # (B, T)
    if weights is not None:
        _check_shape("weights", weights, actions.shape)
        nll = nll * weights.detach()
    return masked_mean(nll, m)


def awr_weights(target_q: Tensor, values: Tensor, beta: float, max_weight: float = 100.0) -> Tensor:
    """exp(β·(Q̂ − V)), capped (AWR, Peng et al. 2019; trlx's ILQL ``beta``):
    β = 0 gives 1 everywhere, plain behaviour cloning."""
    return torch.exp(beta * (target_q - values).detach()).clamp(max=max_weight)


class ILQLLoss(NamedTuple):
    loss: Tensor  # scalar, differentiable
    q: Tensor  # Σ_i L_Q(Q_i)
    v: Tensor  # L_V
    cql: Tensor  # Σ_i L_CQL(Q_i)
    bc: Tensor  # L_BC


def ilql_loss(
    logits: Tensor,
    qs: tuple[Tensor, ...],
    target_qs: tuple[Tensor, ...],
    values: Tensor,
    actions: Tensor,
    rewards: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    tau: float,
    cql_coef: float,
    bc_coef: float,
    awr_beta: float = 0.0,
) -> ILQLLoss:
    """L = Σᵢ L_Q(Qᵢ) + L_V + α_cql·Σᵢ L_CQL(Qᵢ) + α_bc·L_BC.

    logits, each of ``qs`` and ``target_qs`` (B, T, V); values, actions,
    rewards, mask (B, T). The target heads take no gradient.
    """
    m = _as_mask(mask, actions)
    if not qs or len(qs) != len(target_qs):
        raise InvalidInput("target_qs", f"needs one target per Q head ({len(qs)}), got {len(target_qs)}")
    target_q = torch.stack([taken(q, actions) for q in target_qs]).amin(dim=0).detach()  # (B, T)
    targets = q_targets(rewards, values, m, gamma)  # (B, T)
    l_q = sum(q_loss(taken(q, actions), targets, m) for q in qs)
    l_v = expectile_loss(target_q, values, m, tau)
    l_cql = sum(cql_loss(q, actions, m) for q in qs)
    weights = awr_weights(target_q, values, awr_beta) if awr_beta else None
    l_bc = bc_loss(logits, actions, m, weights)
    total = l_q + l_v + cql_coef * l_cql + bc_coef * l_bc
    return ILQLLoss(total, l_q, l_v, l_cql, l_bc)


@torch.no_grad()
def polyak_update(target: Tensor, online: Tensor, alpha: float) -> None:
    """target ← α·online + (1 − α)·target, in place (α = 1: a hard copy)."""
    if not 0 < alpha <= 1:
        raise InvalidInput("alpha", f"must be in (0, 1], got {alpha}")
    target.mul_(1 - alpha).add_(online, alpha=alpha)
