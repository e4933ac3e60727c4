"""Hand-derived checks of the PPO / RLOO / GRPO math in trainer.ppo_math.

Every expected number is worked out in the comment next to it; tensors are
float64 so the comparisons can be tight.
"""

import math

import pytest
import torch

from arbiter.errors import FailedPrecondition, InvalidInput
from trainer.ppo_math import (
    kl_loss,
    a2c_policy_loss,
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    Staleness,
    behaviour_weights,
    broadcast_sequence_advantages,
    decoupled_policy_loss,
    entropy_from_logits,
    entropy_from_logprobs,
    explained_variance,
    gae,
    grpo_advantages,
    kl_controller_from_state_dict,
    kl_penalized_rewards,
    last_token_index,
    masked_aggregate,
    masked_mean,
    masked_var,
    masked_whiten,
    minibatch_indices,
    policy_loss,
    ppo_total_loss,
    ptx_loss,
    rloo_advantages,
    staleness_verdict,
    token_entropy,
    token_logprobs,
    value_loss,
)

F64 = torch.float64


def t(data, dtype=F64):
    return torch.tensor(data, dtype=dtype)


def close(actual, expected, tol=1e-12):
    actual, expected = torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64)
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol)


# ---------------------------------------------------------------- masked stats

# Real entries 1, 2, 3 | 4, 5; the rest is padding and must not matter.
VALUES = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, 99.0]])
MASK = t([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)


def test_masked_mean_and_var_ignore_padding():
    # mean = 15 / 5 = 3; squared deviations 4, 1, 0, 1, 4 sum to 10
    close(masked_mean(VALUES, MASK), 3.0)
    close(masked_var(VALUES, MASK, unbiased=False), 10 / 5)  # 2.0
    close(masked_var(VALUES, MASK), 10 / 4)  # Bessel: 2.5
    # Per-row means: (1+2+3)/3 = 2, (4+5)/2 = 4.5
    close(masked_mean(VALUES, MASK, dim=1), [2.0, 4.5])
    # Non-finite padding is still ignored.
    poisoned = VALUES.masked_fill(~MASK, math.inf)
    close(masked_mean(poisoned, MASK), 3.0)
    close(masked_var(poisoned, MASK), 2.5)


def test_masked_mean_of_an_empty_row_is_zero_but_empty_mask_is_an_error():
    mask = t([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    close(masked_mean(t([[1.0, 3.0, 9.0], [5.0, 5.0, 5.0]]), mask, dim=1), [2.0, 0.0])
    with pytest.raises(InvalidInput, match="mask: selects no elements"):
        masked_mean(t([1.0, 2.0]), t([0, 0], dtype=torch.bool))
    with pytest.raises(InvalidInput, match=r"mask: selects 1 element\(s\); the unbiased variance needs at least 2"):
        masked_var(t([1.0, 2.0]), t([1, 0], dtype=torch.bool))
    with pytest.raises(InvalidInput, match=r"mask: has shape \(2,\), expected \(3,\)"):
        masked_mean(t([1.0, 2.0, 3.0]), t([1, 0], dtype=torch.bool))


def test_masked_whiten_uses_only_real_tokens():
    # (x − 3) / sqrt(2.5): deviations −2, −1, 0 | 1, 2; padding → 0
    s = math.sqrt(2.5)
    close(masked_whiten(VALUES, MASK, eps=0.0), [[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]])
    # shift_mean=False adds the mean back: 3 + deviation / s
    close(
        masked_whiten(VALUES, MASK, shift_mean=False, eps=0.0),
        [[3 - 2 / s, 3 - 1 / s, 3.0, 0.0], [3 + 1 / s, 3 + 2 / s, 0.0, 0.0]],
    )
    # Whitened real entries have mean 0 and unbiased variance 1.
    w = masked_whiten(VALUES, MASK, eps=0.0)
    close(masked_mean(w, MASK), 0.0)
    close(masked_var(w, MASK), 1.0)


def test_masked_aggregate_token_vs_sequence():
    # Row 0 losses 1, 3 (mean 2); row 1 loss −2 (mean −2); row 2 has no tokens.
    per_token = t([[1.0, 3.0], [-2.0, 50.0], [7.0, 7.0]])
    mask = t([[1, 1], [1, 0], [0, 0]], dtype=torch.bool)
    close(masked_aggregate(per_token, mask, "token"), (1 + 3 - 2) / 3)  # 2/3
    close(masked_aggregate(per_token, mask, "sequence"), (2 + -2) / 2)  # 0; empty row left out
    with pytest.raises(InvalidInput, match="aggregation: must be one of"):
        masked_aggregate(per_token, mask, "batch")


def test_last_token_index():
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert last_token_index(mask).tolist() == [2, 0, 3]
    with pytest.raises(InvalidInput, match=r"mask: rows \[1\] have no completion tokens"):
        last_token_index(t([[1, 0], [0, 0]], dtype=torch.bool))


# ---------------------------------------------------------------- KL rewards

LOGPROBS = t([[-1.0, -2.0, -0.5]])
REF_LOGPROBS = t([[-1.5, -1.0, -0.5]])
# log π/π_ref per token = 0.5, −1.0, 0.0


def test_kl_penalized_rewards_1x3():
    # β = 0.1, k1 KL = [0.5, −1.0, 0.0] → −βKL = [−0.05, 0.1, 0.0]; RM score 2.0 on the last token.
    out = kl_penalized_rewards(t([2.0]), LOGPROBS, REF_LOGPROBS, torch.ones(1, 3, dtype=torch.bool), kl_coef=0.1)
    close(out.kl, [[0.5, -1.0, 0.0]])
    close(out.rewards, [[-0.05, 0.1, 2.0]])
    # Sequence-level reward for RLOO / GRPO (the trainer sums the row): −0.05 + 0.1 + 2.0 = 2.05
    close(out.rewards.sum(dim=1), [2.05])
    # k3 (arbiter.kl) per token: e^{−0.5} − 1 + 0.5, e^{1} − 1 − 1 = e − 2, 0; −β·k3 with the score on the last token.
    k3 = kl_penalized_rewards(t([2.0]), LOGPROBS, REF_LOGPROBS, torch.ones(1, 3, dtype=torch.bool), 0.1, "k3")
    close(k3.kl, [[math.exp(-0.5) - 0.5, math.e - 2, 0.0]])
    close(k3.rewards, [[-0.1 * (math.exp(-0.5) - 0.5), -0.1 * (math.e - 2), 2.0]])


def test_kl_penalized_rewards_puts_the_score_on_each_rows_last_real_token():
    # Row 0: 3 real tokens (as above) + 1 pad; row 1: 1 real token, KL 0.2 − 0 = 0.2 → −0.02 + 1.0 = 0.98.
    logprobs = t([[-1.0, -2.0, -0.5, 123.0], [0.2, 9.0, 9.0, 9.0]])
    ref = t([[-1.5, -1.0, -0.5, -4.0], [0.0, 0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    out = kl_penalized_rewards(t([2.0, 1.0]), logprobs, ref, mask, kl_coef=0.1)
    close(out.rewards, [[-0.05, 0.1, 2.0, 0.0], [0.98, 0.0, 0.0, 0.0]])
    close(out.kl, [[0.5, -1.0, 0.0, 0.0], [0.2, 0.0, 0.0, 0.0]])


def test_kl_penalized_rewards_rejects_bad_input():
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(InvalidInput, match=r"rm_score: has shape \(2,\), expected \(1,\)"):
        kl_penalized_rewards(t([1.0, 2.0]), LOGPROBS, REF_LOGPROBS, mask, 0.1)
    with pytest.raises(InvalidInput, match="kl_coef: must be >= 0"):
        kl_penalized_rewards(t([1.0]), LOGPROBS, REF_LOGPROBS, mask, -0.1)
    with pytest.raises(InvalidInput, match=r"ref_logprobs: has shape \(1, 2\)"):
        kl_penalized_rewards(t([1.0]), LOGPROBS, REF_LOGPROBS[:, :2], mask, 0.1)
    with pytest.raises(InvalidInput, match="estimator: must be one of k1, k2, k3, got 'k4'"):
        kl_penalized_rewards(t([1.0]), LOGPROBS, REF_LOGPROBS, mask, 0.1, "k4")


# ---------------------------------------------------------------- GAE


def test_gae_three_steps_by_hand():
    # γ = 0.9, λ = 0.8 (γλ = 0.72); r = [1, 0, 2], V = [0.5, 1.0, 1.5], V after the end = 0.
    #   t=2: δ = 2 + 0.9·0   − 1.5 = 0.5    A2 = 0.5
    #   t=1: δ = 0 + 0.9·1.5 − 1.0 = 0.35   A1 = 0.35 + 0.72·0.5  = 0.71
    #   t=0: δ = 1 + 0.9·1.0 − 0.5 = 1.4    A0 = 1.4  + 0.72·0.71 = 1.9112
    # returns = A + V = [2.4112, 1.71, 2.0]
    # Row 1 has one real token: A = 3 − 1 = 2, return 3; its padding holds junk.
    rewards = t([[1.0, 0.0, 2.0], [3.0, 50.0, -8.0]])
    values = t([[0.5, 1.0, 1.5], [1.0, 40.0, 7.0]])
    mask = t([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    out = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(out.advantages, [[1.9112, 0.71, 0.5], [2.0, 0.0, 0.0]])
    close(out.returns, [[2.4112, 1.71, 2.0], [3.0, 0.0, 0.0]])


def test_gae_limits():
    rewards, values = t([[1.0, 0.0, 2.0]]), t([[0.5, 1.0, 1.5]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # λ = 1: returns are discounted reward-to-go, G2 = 2, G1 = 0.9·2 = 1.8, G0 = 1 + 0.9·1.8 = 2.62
    close(gae(rewards, values, mask, gamma=0.9, lam=1.0).returns, [[2.62, 1.8, 2.0]])
    # λ = 0: A is the one-step TD error δ = [1.4, 0.35, 0.5]
    close(gae(rewards, values, mask, gamma=0.9, lam=0.0).advantages, [[1.4, 0.35, 0.5]])


def test_gae_rejects_left_padding_and_bad_coefficients():
    x = torch.zeros(1, 3, dtype=F64)
    with pytest.raises(InvalidInput, match="mask: completions must be right-padded"):
        gae(x, x, t([[1, 0, 1]], dtype=torch.bool), 1.0, 0.95)
    with pytest.raises(InvalidInput, match=r"gamma: must be in \[0, 1\]"):
        gae(x, x, torch.ones(1, 3, dtype=torch.bool), 1.5, 0.95)
    with pytest.raises(InvalidInput, match=r"lam: must be in \[0, 1\]"):
        gae(x, x, torch.ones(1, 3, dtype=torch.bool), 1.0, -0.1)


def test_rewards_then_gae_with_unit_gamma_lambda_and_zero_values_is_reward_to_go():
    # Per-token rewards [−0.05, 0.1, 2.0] (from the 1x3 KL example) → to-go [2.05, 2.1, 2.0].
    mask = torch.ones(1, 3, dtype=torch.bool)
    rewards = kl_penalized_rewards(t([2.0]), LOGPROBS, REF_LOGPROBS, mask, 0.1).rewards
    close(gae(rewards, torch.zeros_like(rewards), mask, 1.0, 1.0).advantages, [[2.05, 2.1, 2.0]])


# ---------------------------------------------------------------- policy loss


def test_policy_loss_clipping_branches_by_hand():
    # ε = 0.2. Per token: (A, ratio) → −min(ratio·A, clip(ratio)·A)
    #   a: (+1, 1.5): −min(1.5, 1.2)  = −1.2  clipped (gain capped at 1+ε)
    #   b: (+1, 0.5): −min(0.5, 0.8)  = −0.5  unclipped (moved the wrong way: never clipped)
    #   c: (−1, 0.5): −min(−0.5, −0.8) = 0.8  clipped (gain capped at 1−ε)
    #   d: (−1, 1.5): −min(−1.5, −1.2) = 1.5  unclipped
    # loss = (−1.2 − 0.5 + 0.8 + 1.5) / 4 = 0.15, clipfrac = 2/4
    # approx_kl = mean((r − 1) − log r): r=1.5 → 0.5 − ln 1.5 = 0.09453489189,
    #   r=0.5 → −0.5 + ln 2 = 0.19314718056; mean = 0.14384103622
    # The 5th column is padding with a huge ratio and advantage.
    ratios = [1.5, 0.5, 0.5, 1.5, 1e6]
    logprobs = torch.log(t([ratios])).requires_grad_(True)
    old = torch.zeros(1, 5, dtype=F64)
    adv = t([[1.0, 1.0, -1.0, -1.0, 1e9]])
    mask = t([[1, 1, 1, 1, 0]], dtype=torch.bool)
    out = policy_loss(logprobs, old, adv, mask, clip_coef=0.2)
    close(out.loss, 0.15)
    close(out.clipfrac, 0.5)
    close(out.approx_kl, ((0.5 - math.log(1.5)) + (-0.5 + math.log(2))) / 2)
    # Gradient flows only through unclipped tokens: d(−A·r)/d log r = −A·r, over 4 tokens.
    #   b: −1·0.5/4 = −0.125; d: +1·1.5/4 = 0.375; a, c and padding: 0
    out.loss.backward()
    close(logprobs.grad, [[0.0, -0.125, 0.0, 0.375, 0.0]])


def test_policy_loss_sequence_aggregation():
    # ratio = 1 everywhere, so per-token loss = −A.
    old = torch.zeros(2, 2, dtype=F64)
    adv = t([[1.0, 3.0], [-2.0, 0.0]])
    mask = t([[1, 1], [1, 0]], dtype=torch.bool)
    # token mean: −(1 + 3 − 2)/3 = −2/3; sequence mean: mean(−2, +2) = 0
    close(policy_loss(old, old, adv, mask, 0.2).loss, -2 / 3)
    close(policy_loss(old, old, adv, mask, 0.2, aggregation="sequence").loss, 0.0)
    with pytest.raises(InvalidInput, match="clip_coef: must be > 0"):
        policy_loss(old, old, adv, mask, 0.0)
    with pytest.raises(InvalidInput, match=r"advantages: has shape \(2,\), expected \(2, 2\)"):
        policy_loss(old, old, adv[:, 0], mask, 0.2)


# ---------------------------------------------------------------- A2C


def test_a2c_policy_loss_by_hand():
    # cap 2. Per token: π_behav, π_θ, A → w = min(π_θ/π_behav, 2), term = −w·A·log π_θ
    #   a: 0.5, 0.5,  +1: w = 1              → −ln 0.5        = +0.69314718
    #   b: 0.2, 0.6,  +1: w = min(3, 2) = 2  → −2·ln 0.6      = +1.02165125 (truncated)
    #   c: 0.5, 0.25, −2: w = 0.5            → −0.5·(−2)·ln ¼ = −1.38629436
    # loss = 0.32850406 / 3 = 0.10950135; truncated fraction 1/3
    # approx_kl = mean((r − 1) − ln r) = (0 + (2 − ln 3) + (−0.5 + ln 2)) / 3
    # The 4th column is padding with a huge ratio and advantage.
    behaviour = torch.log(t([[0.5, 0.2, 0.5, 1e-9]]))
    logprobs = torch.log(t([[0.5, 0.6, 0.25, 0.9]])).requires_grad_(True)
    adv = t([[1.0, 1.0, -2.0, 1e9]])
    mask = t([[1, 1, 1, 0]], dtype=torch.bool)
    out = a2c_policy_loss(logprobs, behaviour, adv, mask, cap=2.0)
    close(out.loss, (-math.log(0.5) - 2 * math.log(0.6) + math.log(0.25)) / 3)
    close(out.clipfrac, 1 / 3)
    close(out.approx_kl, ((2 - math.log(3)) + (-0.5 + math.log(2))) / 3)
    # No ratio in the graph: ∂L/∂log π_θ = −w·A/3 → a: −1/3, b: −2/3, c: +1/3, padding 0.
    out.loss.backward()
    close(logprobs.grad, [[-1 / 3, -2 / 3, 1 / 3, 0.0]])
    # Untruncated, b's weight is the full ratio 3.
    close(a2c_policy_loss(logprobs.detach(), behaviour, adv, mask, cap=None).loss,
          (-math.log(0.5) - 3 * math.log(0.6) + math.log(0.25)) / 3)
    with pytest.raises(InvalidInput, match="cap: must be >= 1 or None"):
        a2c_policy_loss(logprobs, behaviour, adv, mask, cap=0.5)


def test_a2c_and_ppo_take_the_same_first_step_on_policy():
    # At π_θ = π_behav the clipped ratio is 1, inside [1 − ε, 1 + ε]: PPO's
    # first gradient is the vanilla policy gradient −A·∇log π, A2C's own.
    logprobs = torch.log(t([[0.3, 0.7, 0.1], [0.9, 0.4, 0.2]]))
    adv = t([[0.5, -1.0, 2.0], [1.5, 0.0, -0.25]])
    mask = t([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    grads = []
    for loss in (lambda x: a2c_policy_loss(x, logprobs, adv, mask, cap=2.0).loss,
                 lambda x: policy_loss(x, logprobs, adv, mask, clip_coef=0.2).loss):
        x = logprobs.clone().requires_grad_(True)
        loss(x).backward()
        grads.append(x.grad)
    close(grads[0], grads[1])
    close(grads[0], -adv * mask / 5)


# ---------------------------------------------------------------- decoupled PPO


def test_decoupled_policy_loss_by_hand():
    # ε = 0.2, cap 2. Per token: π_behav, π_prox, π_θ, A →
    #   w = min(π_prox/π_behav, 2), r = π_θ/π_prox, term = −w·min(r·A, clip(r)·A)
    #   a: 0.5, 0.6,   0.66,  +1: w = 1.2,            r = 1.1 → −1.2·min(1.1, 1.1)   = −1.32 (unclipped)
    #   b: 0.2, 0.6,   0.9,   +1: w = min(3, 2) = 2,  r = 1.5 → −2·min(1.5, 1.2)     = −2.4  (clipped, truncated)
    #   c: 0.5, 0.25,  0.225, −2: w = 0.5,            r = 0.9 → −0.5·min(−1.8, −1.8) = +0.9  (unclipped)
    # loss = (−1.32 − 2.4 + 0.9) / 3 = −0.94; clipfrac 1/3; truncated 1/3; mean w = (1.2 + 2 + 0.5)/3
    # The 4th column is padding with huge probabilities ratios and advantage.
    behaviour = torch.log(t([[0.5, 0.2, 0.5, 1e-9]]))
    proximal = torch.log(t([[0.6, 0.6, 0.25, 0.9]]))
    logprobs = torch.log(t([[0.66, 0.9, 0.225, 0.9]])).requires_grad_(True)
    adv = t([[1.0, 1.0, -2.0, 1e9]])
    mask = t([[1, 1, 1, 0]], dtype=torch.bool)
    weights = behaviour_weights(proximal, behaviour, mask, cap=2.0)
    close(weights.weights, [[1.2, 2.0, 0.5, 0.0]])
    close(weights.truncated_fraction, 1 / 3)
    assert not weights.weights.requires_grad
    out = decoupled_policy_loss(logprobs, proximal, weights.weights, adv, mask, clip_coef=0.2)
    close(out.loss, -0.94)
    close(out.clipfrac, 1 / 3)
    # approx_kl against π_prox: mean((r − 1) − ln r) over r = 1.1, 1.5, 0.9.
    close(out.approx_kl, ((0.1 - math.log(1.1)) + (0.5 - math.log(1.5)) + (-0.1 - math.log(0.9))) / 3)
    # d(−w·A·r)/d log π_θ = −w·A·r over 3 tokens, unclipped tokens only:
    #   a: −1.2·1·1.1/3 = −0.44; c: −0.5·(−2)·0.9/3 = +0.3; b (clipped) and padding: 0
    out.loss.backward()
    close(logprobs.grad, [[-0.44, 0.0, 0.3, 0.0]])
    # Untruncated, token b weighs 3: loss = (−1.32 − 3·1.2 + 0.9) / 3 = −1.34.
    untruncated = behaviour_weights(proximal, behaviour, mask, cap=None)
    close(untruncated.truncated_fraction, 0.0)
    close(decoupled_policy_loss(logprobs.detach(), proximal, untruncated.weights, adv, mask, 0.2).loss, -1.34)


def test_decoupled_loss_is_the_clipped_loss_on_fresh_rollouts_and_keeps_the_gradient_of_stale_ones():
    # Fresh: π_prox = π_behav, so w = 1 and both objectives are one function.
    behaviour = torch.log(t([[0.5, 0.2, 0.4]]))
    logprobs = torch.log(t([[0.7, 0.1, 0.4]]))
    adv = t([[1.0, -1.0, 0.5]])
    mask = t([[1, 1, 1]], dtype=torch.bool)
    fresh = behaviour_weights(behaviour, behaviour, mask, cap=2.0).weights
    close(fresh, [[1.0, 1.0, 1.0]])
    close(decoupled_policy_loss(logprobs, behaviour, fresh, adv, mask, 0.2).loss,
          policy_loss(logprobs, behaviour, adv, mask, 0.2).loss)
    # Stale: sampled at π_behav = 0.5, the policy has since moved to 0.9 (= π_prox = π_θ at the
    # update's start), A = +1. Clipped PPO's ratio 0.9/0.5 = 1.8 > 1 + ε: clipped, no gradient at all.
    # Decoupled: r = 1, w = 1.8: loss −1.8, gradient −w·A·r = −1.8.
    behaviour, proximal = torch.log(t([[0.5]])), torch.log(t([[0.9]]))
    one = t([[1]], dtype=torch.bool)
    clipped_lp = proximal.clone().requires_grad_(True)
    policy_loss(clipped_lp, behaviour, t([[1.0]]), one, 0.2).loss.backward()
    close(clipped_lp.grad, [[0.0]])
    decoupled_lp = proximal.clone().requires_grad_(True)
    w = behaviour_weights(proximal, behaviour, one, cap=2.0).weights
    out = decoupled_policy_loss(decoupled_lp, proximal, w, t([[1.0]]), one, 0.2)
    close(out.loss, -1.8)
    out.loss.backward()
    close(decoupled_lp.grad, [[-1.8]])


def test_behaviour_weights_and_decoupled_loss_reject_bad_input():
    lp = torch.zeros(2, 3, dtype=F64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(InvalidInput, match="cap: must be >= 1 or None, got 0.5"):
        behaviour_weights(lp, lp, mask, cap=0.5)
    with pytest.raises(InvalidInput, match=r"behaviour_logprobs: has shape \(2, 2\), expected \(2, 3\)"):
        behaviour_weights(lp, lp[:, :2], mask, cap=2.0)
    with pytest.raises(InvalidInput, match=r"behaviour_weights: has shape \(2,\), expected \(2, 3\)"):
        decoupled_policy_loss(lp, lp, lp[:, 0], lp, mask, 0.2)


# ---------------------------------------------------------------- value loss


def test_value_loss_clipping_by_hand():
    # ε_v = 0.2, V_old = 1 everywhere.
    #   1: V=1.5, R=2: unclipped (−0.5)² = 0.25; clipped V=1.2 → (−0.8)² = 0.64 → 0.64 (clipped)
    #   2: V=1.5, R=1: unclipped 0.25;           clipped (0.2)² = 0.04          → 0.25
    #   3: V=0.9, R=0: inside the clip range, both 0.81                        → 0.81
    # loss = ½·(0.64 + 0.25 + 0.81)/3 = 0.28333…; clipfrac = 1/3; unclipped: ½·1.31/3
    values = t([[1.5, 1.5, 0.9, 77.0]], dtype=F64).requires_grad_(True)
    old = t([[1.0, 1.0, 1.0, 0.0]])
    returns = t([[2.0, 1.0, 0.0, -5.0]])
    mask = t([[1, 1, 1, 0]], dtype=torch.bool)
    out = value_loss(values, old, returns, mask, clip_coef_vf=0.2)
    close(out.loss, 0.5 * 1.7 / 3)
    close(out.clipfrac, 1 / 3)
    # Token 1 took the clipped branch (constant in V): no gradient. Token 2: ½·2(V−R)/3 = 0.5/3; token 3: 0.9/3.
    out.loss.backward()
    close(values.grad, [[0.0, 0.5 / 3, 0.9 / 3, 0.0]])
    unclipped = value_loss(values.detach(), old, returns, mask, clip_coef_vf=None)
    close(unclipped.loss, 0.5 * 1.31 / 3)
    close(unclipped.clipfrac, 0.0)
    with pytest.raises(InvalidInput, match="clip_coef_vf: must be > 0 or None"):
        value_loss(values, old, returns, mask, clip_coef_vf=0.0)


# ---------------------------------------------------------------- entropy, log-probs, ptx


def test_entropy_from_logits_by_hand():
    # Uniform over 2: ln 2. p = (1/4, 3/4) from logits (0, ln 3): ¼ ln 4 + ¾ ln(4/3) = 0.56233514461
    # The padded position (a near one-hot) is ignored.
    logits = t([[[0.0, 0.0], [0.0, math.log(3)], [0.0, 100.0]]])
    mask = t([[1, 1, 0]], dtype=torch.bool)
    h2 = 0.25 * math.log(4) + 0.75 * math.log(4 / 3)
    close(token_entropy(logits)[0, :2], [math.log(2), h2])
    close(entropy_from_logits(logits, mask), (math.log(2) + h2) / 2)
    # The same from the log-softmax the trainer already has for the tokens' log-probs.
    close(entropy_from_logprobs(torch.log_softmax(logits, dim=-1), mask), (math.log(2) + h2) / 2)


def test_token_logprobs_and_ptx_loss_by_hand():
    # logits (0, 0) → log p = −ln 2 each; logits (0, ln 3) → log p = (ln ¼, ln ¾).
    logits = t([[[0.0, 0.0], [0.0, math.log(3)], [5.0, -5.0]]])
    close(token_logprobs(logits[:, :2], torch.tensor([[1, 0]])), [[-math.log(2), math.log(0.25)]])
    # Next-token NLL of input_ids [0, 1, 1]: position 0 predicts 1 (−ln ½ = ln 2),
    # position 1 predicts 1 (−ln ¾); position 2 predicts nothing. Mean = (ln 2 − ln ¾)/2.
    ids = torch.tensor([[0, 1, 1]])
    close(ptx_loss(logits, ids, torch.ones(1, 3, dtype=torch.long)), (math.log(2) - math.log(0.75)) / 2)
    # Last token padded: only the first prediction counts.
    close(ptx_loss(logits, ids, torch.tensor([[1, 1, 0]])), math.log(2))


def test_kl_loss_k3_by_hand():
    # d = log π_θ − log π_ref; k3 = e^−d − 1 + d; ∂k3/∂log π_θ = 1 − e^−d.
    #   a: π_θ 0.5,  π_ref 0.25: d = ln 2  → k3 = ½ − 1 + ln 2 = 0.19314718, grad 1 − ½ = ½
    #   b: π_θ 0.25, π_ref 0.5:  d = −ln 2 → k3 = 2 − 1 − ln 2 = 0.30685282, grad 1 − 2 = −1
    # token mean over a, b = (0.19314718 + 0.30685282) / 2 = ¼; gradients /2 → ¼, −½; padding 0.
    logprobs = torch.log(t([[0.5, 0.25, 1e-9]])).requires_grad_(True)
    ref = torch.log(t([[0.25, 0.5, 0.9]]))
    mask = t([[1, 1, 0]], dtype=torch.bool)
    out = kl_loss(logprobs, ref, mask, "k3")
    close(out, 0.25)
    out.backward()
    close(logprobs.grad, [[0.25, -0.5, 0.0]])
    # k1 is the plain log-ratio: (ln 2 − ln 2)/2 = 0.
    close(kl_loss(logprobs.detach(), ref, mask, "k1"), 0.0)
    # In the total loss it is priced at β.
    close(ppo_total_loss(t(1.0), kl_loss=t(0.5), kl_coef=0.1), 1.05)


def test_ppo_total_loss():
    # 1 + 0.1·2 − 0.01·3 + 0.5·4 = 1 + 0.2 − 0.03 + 2 = 3.17
    total = ppo_total_loss(
        t(1.0), vf_loss=t(2.0), vf_coef=0.1, entropy=t(3.0), ent_coef=0.01, ptx_loss=t(4.0), ptx_coef=0.5,
    )  # fmt: skip
    close(total, 3.17)
    # Critic-free, no ptx; an entropy given only for logging (coef 0) adds nothing.
    close(ppo_total_loss(t(1.0), entropy=t(3.0)), 1.0)
    with pytest.raises(InvalidInput, match="ptx_loss: is required when its coefficient is 0.5"):
        ppo_total_loss(t(1.0), ptx_coef=0.5)
    with pytest.raises(InvalidInput, match="vf_loss: coefficient must be >= 0"):
        ppo_total_loss(t(1.0), vf_loss=t(1.0), vf_coef=-1.0)


def test_explained_variance():
    mask = t([[1, 1, 1, 0]], dtype=torch.bool)
    returns = t([[1.0, 2.0, 3.0, 9.0]])  # real returns 1, 2, 3: Var = 2/3 (the padded 9 must not count)
    close(explained_variance(returns, returns, mask), 1.0)
    # values = mean → Var[R − V] = Var[R] → 0
    close(explained_variance(t([[2.0, 2.0, 2.0, 0.0]]), returns, mask), 0.0)
    # values 1, 1, 1: R − V = 0, 1, 2, Var = 2/3 → 0 (a constant offset explains nothing either)
    close(explained_variance(t([[1.0, 1.0, 1.0, 5.0]]), returns, mask), 0.0)
    # values 3, 2, 1: R − V = −2, 0, 2, Var = 8/3 → 1 − (8/3)/(2/3) = −3 (worse than a constant)
    close(explained_variance(t([[3.0, 2.0, 1.0, 0.0]]), returns, mask), -3.0)
    # values 1.5, 2, 2.5: R − V = −0.5, 0, 0.5, Var = 1/6 → 1 − (1/6)/(2/3) = 0.75
    close(explained_variance(t([[1.5, 2.0, 2.5, 0.0]]), returns, mask), 0.75)
    # Constant returns: nothing to explain. One real token is such a case.
    assert math.isnan(explained_variance(returns, t([[4.0, 4.0, 4.0, 1.0]]), mask))
    assert math.isnan(explained_variance(returns, returns, t([[1, 0, 0, 0]], dtype=torch.bool)))


def test_minibatch_indices_cover_the_batch_once():
    g = torch.Generator().manual_seed(0)
    batches = minibatch_indices(10, 4, generator=g)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    with pytest.raises(InvalidInput, match="minibatch_size: must be >= 1"):
        minibatch_indices(10, 0)


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_by_hand():
    # Ziegler et al.: β=0.2, target 6, horizon 10000.
    c = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    # KL 9: e = 9/6 − 1 = 0.5 → clipped 0.2; β = 0.2·(1 + 0.2·256/10000) = 0.2·1.00512 = 0.201024
    close(c.update(9.0, n_steps=256), 0.201024)
    # KL 5.7: e = 0.95 − 1 = −0.05; β = 0.201024·(1 − 0.05·1000/10000) = 0.201024·0.995 = 0.20001888
    close(c.update(5.7, n_steps=1000), 0.20001888)
    # KL 0: e = −1 → clipped −0.2; β = 0.20001888·(1 − 0.2·0.5) = 0.180016992
    close(c.update(0.0, n_steps=5000), 0.180016992)
    assert c.value == pytest.approx(0.180016992, abs=1e-15)


def test_kl_controllers_round_trip_through_state_dict():
    c = AdaptiveKLController(0.1, 6.0, 10_000)
    c.update(8.0, 512)
    state = c.state_dict()
    assert state == {"kind": "adaptive", "value": c.value, "target": 6.0, "horizon": 10_000.0}
    restored = kl_controller_from_state_dict(state)
    assert isinstance(restored, AdaptiveKLController) and restored.state_dict() == state
    # Both continue identically.
    assert restored.update(3.0, 64) == c.update(3.0, 64)

    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 512) == 0.05
    assert kl_controller_from_state_dict(fixed.state_dict()).state_dict() == {"kind": "fixed", "value": 0.05}
    with pytest.raises(InvalidInput, match="kind: state is for a 'adaptive' KL controller, not 'fixed'"):
        fixed.load_state_dict(state)
    with pytest.raises(InvalidInput, match="kind: unknown KL controller 'pid'"):
        kl_controller_from_state_dict({"kind": "pid"})


def test_kl_controller_validation():
    with pytest.raises(InvalidInput, match="target: must be > 0"):
        AdaptiveKLController(0.1, 0.0, 10_000)
    with pytest.raises(InvalidInput, match="init_kl_coef: must be > 0"):
        AdaptiveKLController(0.0, 6.0, 10_000)
    with pytest.raises(InvalidInput, match="kl_coef: must be >= 0"):
        FixedKLController(-1.0)
    c = AdaptiveKLController(0.1, 6.0, 100)
    with pytest.raises(InvalidInput, match=r"n_steps: must be in \[0, horizon=100\], got 101"):
        c.update(1.0, 101)
    with pytest.raises(InvalidInput, match="current_kl: must be finite"):
        c.update(math.nan, 10)


# ---------------------------------------------------------------- RLOO / GRPO


def test_rloo_by_hand():
    # Group [1, 2, 6]: leave-one-out baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5
    #   → A = [−3, −1.5, 4.5]  (= 3/2·(r − 3)); group [0, 4] → [−4, 4]
    close(rloo_advantages(t([[1.0, 2.0, 6.0]])), [[-3.0, -1.5, 4.5]])
    # Same groups interleaved in a flat batch with string group ids.
    scores = t([1.0, 0.0, 2.0, 6.0, 4.0])
    close(rloo_advantages(scores, ["a", "b", "a", "a", "b"]), [-3.0, -4.0, -1.5, 4.5, 4.0])
    close(rloo_advantages(scores, torch.tensor([7, 3, 7, 7, 3])), [-3.0, -4.0, -1.5, 4.5, 4.0])


def test_grpo_by_hand():
    # Group [1, 2, 6]: mean 3, unbiased var (4 + 1 + 9)/2 = 7 → A = [−2, −1, 3]/√7
    # Group [0, 4]: mean 2, var (4 + 4)/1 = 8 → A = [−2, 2]/(2√2) = ∓1/√2
    s7 = math.sqrt(7)
    close(grpo_advantages(t([[1.0, 2.0, 6.0]]), eps=0.0), [[-2 / s7, -1 / s7, 3 / s7]])
    scores = t([1.0, 0.0, 2.0, 6.0, 4.0])
    ids = ["a", "b", "a", "a", "b"]
    close(grpo_advantages(scores, ids, eps=0.0), [-2 / s7, -(2**-0.5), -1 / s7, 3 / s7, 2**-0.5])
    # Dr. GRPO (centre only): [−2, −2, −1, 3, 2]
    close(grpo_advantages(scores, ids, scale_by_std=False), [-2.0, -2.0, -1.0, 3.0, 2.0])
    # A group where every sample scored the same carries no signal: 0/(0 + eps) = 0.
    close(grpo_advantages(t([[5.0, 5.0]])), [[0.0, 0.0]])


def test_group_estimators_reject_singleton_groups_and_bad_shapes():
    with pytest.raises(InvalidInput, match="group_ids: every group needs at least 2 samples for RLOO"):
        rloo_advantages(t([1.0, 2.0, 3.0]), ["a", "a", "b"])
    with pytest.raises(InvalidInput, match="scores: every group needs at least 2 samples for GRPO"):
        grpo_advantages(t([[1.0], [2.0]]))
    with pytest.raises(InvalidInput, match="group_ids: has 2 entries, expected 3"):
        rloo_advantages(t([1.0, 2.0, 3.0]), ["a", "a"])
    with pytest.raises(InvalidInput, match=r"scores: must be \(G, K\) without group_ids"):
        rloo_advantages(t([1.0, 2.0, 3.0]))


def test_broadcast_sequence_advantages():
    mask = t([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    close(broadcast_sequence_advantages(t([1.5, -2.0]), mask), [[1.5, 1.5, 0.0], [-2.0, 0.0, 0.0]])


# ---------------------------------------------------------------- running moments


def test_running_moments_match_the_whole_batch():
    # [1, 2, 3] then [4, 5] (padding masked out): mean 3, population var 2, unbiased std √2.5
    rm = RunningMoments()
    rm.update(t([1.0, 2.0, 3.0]))
    rm.update(t([[4.0, 5.0, 1e9]]), mask=t([[1, 1, 0]], dtype=torch.bool))
    assert rm.count == 5
    close(rm.mean, 3.0)
    close(rm.var, 2.0)
    close(rm.std, math.sqrt(2.5))
    # (5 − 3)/√2.5 = 1.26491106407; scaling only: 5/√2.5 = 3.16227766017
    close(rm.normalize(t([5.0]), eps=0.0), [2 / math.sqrt(2.5)])
    close(rm.normalize(t([5.0]), shift_mean=False, eps=0.0), [5 / math.sqrt(2.5)])
    close(rm.normalize(t([100.0]), clip=3.0), [3.0])
    restored = RunningMoments()
    restored.load_state_dict(rm.state_dict())
    assert restored.state_dict() == rm.state_dict() == {"mean": 3.0, "var": 2.0, "count": 5}


def test_running_moments_need_two_values_before_normalizing():
    rm = RunningMoments()
    rm.update(t([1.0]))
    assert math.isnan(rm.std)
    with pytest.raises(FailedPrecondition, match="reward statistics have 1 value"):
        rm.normalize(t([1.0]))
    with pytest.raises(InvalidInput, match="xs: contains non-finite values"):
        rm.update(t([math.nan]))


# ---------------------------------------------------------------- staleness


def test_staleness_verdicts():
    # Trainer at step 10, bound 2: lags 0 and 2 kept, 3 dropped as stale.
    assert staleness_verdict(10, 10, max_lag=2) is Staleness.KEEP
    assert staleness_verdict(8, 10, max_lag=2) is Staleness.KEEP
    assert staleness_verdict(7, 10, max_lag=2) is Staleness.STALE
    assert staleness_verdict(9, 10, max_lag=0) is Staleness.STALE
    # A version the trainer never published, or one from a later step (lag −1): unknown.
    assert staleness_verdict(None, 10, max_lag=2) is Staleness.UNKNOWN_VERSION
    assert staleness_verdict(11, 10, max_lag=2) is Staleness.UNKNOWN_VERSION
    # The verdicts are the trainer's rollout outcome labels.
    assert [v.value for v in (Staleness.STALE, Staleness.UNKNOWN_VERSION)] == ["stale", "unknown_version"]
    with pytest.raises(InvalidInput, match="max_lag: must be >= 0"):
        staleness_verdict(1, 1, -1)
