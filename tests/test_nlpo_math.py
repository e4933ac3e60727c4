"""Hand-derived checks of NLPO's action mask (Ramamurthy et al. 2022): the
top-p set of the masking policy, the policy renormalised over it (as the
policy service samples it and as the trainer recomputes it), and the clipped
loss on those log-probs. Every expected number is worked out in a comment."""

import math

import torch

from arbiter.policy.sampling import draw, sampling_logprobs, top_p_set
from trainer.ppo_math import entropy_from_logprobs, nlpo_action_mask, nlpo_logprobs, policy_loss

# The masking policy π_ψ: probabilities 0.5, 0.3, 0.15, 0.05.
MASK = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64).log()
# The policy π_θ: 0.1, 0.2, 0.3, 0.4 (its most likely tokens are the mask's least likely).
POLICY = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64).log()
NEG_INF = float("-inf")


def test_top_p_set_keeps_a_token_while_the_mass_above_it_is_below_p():
    # Mass ranked above each token: 0, 0.5, 0.8, 0.95.
    # p=0.4: only token 0 (0 < 0.4; 0.5 is not).
    assert top_p_set(MASK, 0.4).tolist() == [[True, False, False, False]]
    # p=0.7: tokens 0 and 1 (0.5 < 0.7; 0.8 is not).
    assert top_p_set(MASK, 0.7).tolist() == [[True, True, False, False]]
    # p=0.9: tokens 0, 1, 2 (0.8 < 0.9; 0.95 is not).
    assert top_p_set(MASK, 0.9).tolist() == [[True, True, True, False]]
    # p=1: every token (0.95 < 1).
    assert top_p_set(MASK, 1.0).tolist() == [[True, True, True, True]]
    # The set does not depend on the order of the vocabulary: reversed logits, reversed set.
    assert top_p_set(MASK.flip(-1), 0.7).tolist() == [[False, False, True, True]]


def test_policy_is_renormalised_over_the_mask():
    allowed = top_p_set(MASK, 0.7)  # tokens 0, 1
    # T=1: 0.1 and 0.2 over their sum 0.3 -> 1/3, 2/3; tokens 2 and 3 (the
    # policy's favourites) cannot be drawn.
    got = sampling_logprobs(POLICY, 1.0, allowed=allowed)
    assert torch.allclose(got[:, :2], torch.tensor([[math.log(1 / 3), math.log(2 / 3)]], dtype=torch.float64))
    assert got[0, 2] == NEG_INF and got[0, 3] == NEG_INF
    # T=2: probabilities ∝ sqrt(p): √0.1 : √0.2 = 1 : √2 -> 1/(1+√2) = √2−1 and 2−√2.
    got = sampling_logprobs(POLICY, 2.0, allowed=allowed)
    assert torch.allclose(got[:, :2].exp(), torch.tensor([[math.sqrt(2) - 1, 2 - math.sqrt(2)]], dtype=torch.float64))
    # The trainer's recomputation is the same distribution (float64 in, float64 out).
    trainer = nlpo_logprobs(POLICY, nlpo_action_mask(MASK, 0.7), 2.0)
    assert torch.allclose(trainer[:, :2], got[:, :2]) and torch.equal(torch.isinf(trainer), torch.isinf(got))
    # The trainer keeps a sampled token in the set even where its own nucleus
    # (rounding) left it out: token 2 sampled -> set {0, 1, 2}.
    assert nlpo_action_mask(MASK, 0.7, torch.tensor([2])).tolist() == [[True, True, True, False]]
    # top-k after the mask: k=1 keeps the policy's best allowed token, 1, with probability 1.
    got = sampling_logprobs(POLICY, 1.0, top_k=1, allowed=allowed)
    assert got.tolist() == [[NEG_INF, 0.0, NEG_INF, NEG_INF]]
    # top-p after the mask: over {1/3, 2/3}, p=0.5 keeps token 1 (mass above 0), not token 0 (2/3 >= 0.5).
    assert sampling_logprobs(POLICY, 1.0, top_p=0.5, allowed=allowed).tolist() == [[NEG_INF, 0.0, NEG_INF, NEG_INF]]
    # Greedy: the argmax over the allowed tokens (1), not over all (3).
    assert sampling_logprobs(POLICY, 0.0, allowed=allowed).tolist() == [[NEG_INF, 0.0, NEG_INF, NEG_INF]]


def test_draws_stay_inside_the_mask():
    allowed = top_p_set(MASK, 0.7)
    dist = sampling_logprobs(POLICY.expand(5, 4), 1.0, allowed=allowed.expand(5, 4))
    # CDF over the allowed tokens: 1/3, 1, 1, 1 -> u < 1/3 draws 0, else 1; u = 1 must not reach a removed token.
    tokens = draw(dist, torch.tensor([0.0, 0.3, 0.34, 0.99, 1.0], dtype=torch.float64))
    assert tokens.tolist() == [0, 0, 1, 1, 1]


def test_masked_entropy_and_loss():
    allowed = nlpo_action_mask(MASK, 0.7)
    logp = nlpo_logprobs(POLICY, allowed, 1.0)[:, None, :]  # (B=1, T=1, V)
    mask = torch.ones(1, 1, dtype=torch.bool)
    # Entropy over {1/3, 2/3}: −(1/3 ln 1/3 + 2/3 ln 2/3) = ln 3 − (2/3) ln 2; removed tokens add 0, not NaN.
    expected = math.log(3) - 2 / 3 * math.log(2)
    assert math.isclose(float(entropy_from_logprobs(logp, mask)), expected, rel_tol=1e-12)
    # The sampler drew token 0 with probability 1/3 under the mask. The updated
    # policy has probabilities 0.2, 0.2, 0.3, 0.3: under the same mask 0.2/0.4 = 1/2.
    # ratio = (1/2)/(1/3) = 1.5; A = 1, ε = 0.2: −min(1.5·1, 1.2·1) = −1.2, clipped.
    new_logits = torch.tensor([[0.2, 0.2, 0.3, 0.3]], dtype=torch.float64).log().requires_grad_()
    new = nlpo_logprobs(new_logits, allowed, 1.0)[:, None, 0]  # (1, 1): token 0
    out = policy_loss(new, torch.tensor([[math.log(1 / 3)]], dtype=torch.float64),
                      torch.ones(1, 1, dtype=torch.float64), mask, 0.2)
    assert math.isclose(float(out.loss.detach()), -1.2, rel_tol=1e-12)
    assert float(out.clipfrac) == 1.0
    # An unclipped case for the gradient: A = −1 at ratio 1.5 is not clipped,
    # L = 1.5 = ratio = exp(log π(0)) / (1/3) with log π(0) = z0 − logsumexp(z0, z1);
    # ∂L/∂z0 = 3·π(0)·(1 − π(0)) = 3·(1/2)(1/2) = 0.75, ∂L/∂z1 = −0.75, and the
    # removed tokens get no gradient at all (not NaN).
    out = policy_loss(new, torch.tensor([[math.log(1 / 3)]], dtype=torch.float64),
                      -torch.ones(1, 1, dtype=torch.float64), mask, 0.2)
    assert math.isclose(float(out.loss.detach()), 1.5, rel_tol=1e-12)
    out.loss.backward()
    assert torch.allclose(new_logits.grad, torch.tensor([[0.75, -0.75, 0.0, 0.0]], dtype=torch.float64))
