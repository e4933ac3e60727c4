"""Hand-derived checks of the ILQL losses (trainer.ilql_math) and of the
perturbed decoding logits (arbiter.ilql). Every expected number is worked out
in the comment beside it; tensors are float64 so comparisons can be tight.
"""

import math

import pytest
import torch

from arbiter.errors import InvalidInput
from arbiter.ilql import perturbed_logits
from trainer.ilql_math import (
    awr_weights,
    bc_loss,
    cql_loss,
    expectile_loss,
    ilql_loss,
    next_state_values,
    polyak_update,
    q_loss,
    q_targets,
    terminal_rewards,
)

F64 = torch.float64


def t(data, **kw):
    return torch.tensor(data, dtype=F64, **kw)


def close(actual, expected, tol=1e-12):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64),
                               rtol=0, atol=tol)


MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_terminal_rewards_put_the_score_on_the_last_real_token():
    # Row 0 ends at t=1, row 1 at t=0.
    mask = torch.tensor([[True, True, False], [True, False, False]])
    close(terminal_rewards(t([2.0, -1.0]), mask), [[0, 2, 0], [-1, 0, 0]])


def test_next_state_values_shift_left_and_end_at_the_last_token():
    values = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    # Row 0: V(s1), V(s2), then terminal 0. Row 1 (2 tokens): V(s1), terminal 0,
    # padding 0 (the 6 is padding and must not leak into t=1).
    close(next_state_values(values, MASK), [[2, 3, 0], [5, 0, 0]])


def test_q_targets_are_reward_plus_discounted_next_value_without_gradient():
    values = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    targets = q_targets(rewards, values, MASK, gamma=0.5)
    # Row 0: 0 + .5·2, 0 + .5·3, 1 + 0.  Row 1: 0 + .5·5, 2 + 0, padding 0.
    close(targets, [[1.0, 1.5, 1.0], [2.5, 2.0, 0.0]])
    assert not targets.requires_grad


def test_q_loss_is_the_token_mean_squared_error():
    # (1−0)² and (2−4)² → (1 + 4)/2; the padded 100 is out.
    mask = torch.tensor([[True, True, False]])
    close(q_loss(t([[1.0, 2.0, 100.0]]), t([[0.0, 4.0, 0.0]]), mask), 2.5)


def test_expectile_loss_weighs_under_and_over_estimates_asymmetrically():
    target_q = t([[3.0, 0.0, 9.0]], requires_grad=True)
    values = t([[1.0, 2.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    loss = expectile_loss(target_q, values, mask, tau=0.7)
    # u = Q̂ − V = 2 (V too low: weight τ = .7) and −2 (V too high: 1 − τ = .3):
    # (.7·4 + .3·4)/2 = 2.
    close(loss, 2.0)
    loss.backward()
    # dL/dV_t = −2·w_t·u_t / 2: −.7·2 = −1.4 and −.3·(−2) = .6; padding 0.
    close(values.grad, [[-1.4, 0.6, 0.0]])
    assert target_q.grad is None  # the targets take no gradient


def test_cql_loss_is_logsumexp_minus_the_taken_q():
    # Two states over a 2-token vocabulary with Q(s, ·) = (0, ln 3):
    # action 0: ln(1 + 3) − 0 = ln 4; action 1: ln 4 − ln 3. A padded third
    # state with huge values must not count.
    q = t([[[0.0, math.log(3)], [0.0, math.log(3)], [50.0, -50.0]]])
    actions = torch.tensor([[0, 1, 1]])
    mask = torch.tensor([[True, True, False]])
    close(cql_loss(q, actions, mask), (math.log(4) + math.log(4 / 3)) / 2)


def test_bc_loss_is_the_policy_nll_optionally_weighted():
    logits = torch.zeros(1, 2, 4, dtype=F64)  # uniform over 4 tokens: −log π = ln 4
    actions = torch.tensor([[1, 3]])
    mask = torch.tensor([[True, True]])
    close(bc_loss(logits, actions, mask), math.log(4))
    # Weights 1 and 3: (ln 4 + 3 ln 4)/2 = 2 ln 4.
    close(bc_loss(logits, actions, mask, t([[1.0, 3.0]])), 2 * math.log(4))


def test_awr_weights():
    # exp(β(Q̂ − V)) with β = 1, Q̂ − V = ln 2 → 2; β = 0 → 1 (plain BC); capped.
    close(awr_weights(t([math.log(2)]), t([0.0]), beta=1.0), [2.0])
    close(awr_weights(t([5.0]), t([0.0]), beta=0.0), [1.0])
    close(awr_weights(t([50.0]), t([0.0]), beta=1.0, max_weight=10.0), [10.0])


def test_ilql_loss_adds_the_four_terms():
    # One sequence, one token (the last: V(s') = 0), vocabulary of 2, action 1,
    # reward 1, so every Q head's target is 1.
    logits = t([[[0.0, 0.0]]], requires_grad=True)
    q1 = t([[[0.0, 1.0]]], requires_grad=True)
    q2 = t([[[0.0, 2.0]]], requires_grad=True)
    tq1, tq2 = t([[[0.0, 3.0]]], requires_grad=True), t([[[0.0, 0.5]]], requires_grad=True)
    values = t([[0.0]], requires_grad=True)
    out = ilql_loss(logits, (q1, q2), (tq1, tq2), values, torch.tensor([[1]]), t([[1.0]]), torch.tensor([[True]]),
                    gamma=0.9, tau=0.8, cql_coef=0.5, bc_coef=2.0)
    # L_Q = (1 − 1)² + (2 − 1)² = 1.
    close(out.q, 1.0)
    # Q̂ = min(3, .5) = .5, u = .5 − 0 > 0: τ·u² = .8·.25 = .2.
    close(out.v, 0.2)
    # CQL: [ln(1 + e) − 1] + [ln(1 + e²) − 2].
    cql = math.log(1 + math.e) - 1 + math.log(1 + math.e**2) - 2
    close(out.cql, cql)
    # BC: −log ½ = ln 2.
    close(out.bc, math.log(2))
    close(out.loss, 1.0 + 0.2 + 0.5 * cql + 2.0 * math.log(2))
    out.loss.backward()
    assert tq1.grad is None and tq2.grad is None
    # dL/dQ2(a) = 2(Q2 − 1) + α_cql·(softmax(Q2)(a) − 1) = 2 + .5·(e²/(1+e²) − 1).
    close(q2.grad[0, 0, 1], 2 + 0.5 * (math.e**2 / (1 + math.e**2) - 1))


def test_polyak_update():
    target, online = t([0.0, 4.0]), t([2.0, 0.0])
    # .25·online + .75·target = (.5, 3).
    polyak_update(target, online, 0.25)
    close(target, [0.5, 3.0])
    polyak_update(target, online, 1.0)  # a hard copy
    close(target, [2.0, 0.0])


def test_perturbed_logits_add_beta_times_min_target_q_minus_v():
    logits = t([[1.0, 1.0, 1.0]])
    tq1, tq2 = t([[1.0, 2.0, 3.0]]), t([[2.0, 0.0, 3.0]])
    # min Q̂ = (1, 0, 3), V = 1: advantage (0, −1, 2); logits + 2·adv = (1, −1, 5).
    close(perturbed_logits(logits, (tq1, tq2), t([1.0]), beta=2.0), [[1.0, -1.0, 5.0]])
    assert perturbed_logits(logits, (tq1, tq2), t([1.0]), beta=0.0) is logits


@pytest.mark.parametrize("call, field", [
    (lambda: expectile_loss(t([[1.0]]), t([[1.0]]), torch.tensor([[True]]), tau=1.0), "tau"),
    (lambda: q_targets(t([[1.0]]), t([[1.0]]), torch.tensor([[True]]), gamma=1.5), "gamma"),
    (lambda: polyak_update(t([0.0]), t([1.0]), 0.0), "alpha"),
    (lambda: next_state_values(t([[1.0, 2.0]]), torch.tensor([[False, True]])), "mask"),
    (lambda: q_loss(t([[1.0]]), t([[1.0, 2.0]]), torch.tensor([[True]])), "targets"),
])
def test_bad_arguments_name_the_field(call, field):
    with pytest.raises(InvalidInput) as err:
        call()
    assert err.value.field == field
