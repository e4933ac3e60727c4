"""KL estimators (arbiter.kl) against values derived by hand from Schulman,
"Approximating KL Divergence" (2020). With d = log pi - log pi_ref = -log r:
k1 = d, k2 = d^2 / 2, k3 = (r - 1) - log r = e^-d - 1 + d."""

import math

import pytest
import torch

from arbiter.errors import InvalidInput
from arbiter.kl import ESTIMATOR_NAMES, KLEstimator, kl_from_log_ratio, parse_estimator, per_token_kl, sequence_kl

LN2 = math.log(2)


def one_token(estimator, logp, logp_ref):
    [value] = per_token_kl(estimator, [logp], [logp_ref])
    return value


def test_policy_more_likely_than_reference():
    # pi = 1/2, pi_ref = 1/4: d = ln(1/2) - ln(1/4) = ln 2, r = 1/2.
    logp, logp_ref = math.log(0.5), math.log(0.25)
    assert one_token(KLEstimator.K1, logp, logp_ref) == pytest.approx(LN2, abs=1e-15)
    assert one_token(KLEstimator.K2, logp, logp_ref) == pytest.approx(LN2**2 / 2, abs=1e-15)
    # (1/2 - 1) - ln(1/2) = ln 2 - 1/2
    assert one_token(KLEstimator.K3, logp, logp_ref) == pytest.approx(LN2 - 0.5, abs=1e-15)


def test_policy_less_likely_than_reference():
    # pi = 0.2, pi_ref = 0.4: d = ln(0.2 / 0.4) = -ln 2, r = 2. k1 is negative, k2 and k3 are not.
    logp, logp_ref = math.log(0.2), math.log(0.4)
    assert one_token(KLEstimator.K1, logp, logp_ref) == pytest.approx(-LN2, abs=1e-15)
    # (-ln 2)^2 / 2: k2 is even in d, the same as above.
    assert one_token(KLEstimator.K2, logp, logp_ref) == pytest.approx(LN2**2 / 2, abs=1e-15)
    # (2 - 1) - ln 2
    assert one_token(KLEstimator.K3, logp, logp_ref) == pytest.approx(1 - LN2, abs=1e-15)


def test_identical_models_give_zero():
    for estimator in KLEstimator:
        assert per_token_kl(estimator, [-0.1, -2.5, -7.0], [-0.1, -2.5, -7.0]) == [0.0, 0.0, 0.0]


def test_k3_keeps_precision_when_models_nearly_agree():
    # d = -1e-9: k3 = e^-d - 1 + d = d^2/2 + O(d^3) = 5e-19; naive exp(x) - 1 - x gives ~1e-16 noise.
    assert one_token(KLEstimator.K3, -1.0, -1.0 + 1e-9) == pytest.approx(5e-19, rel=1e-6)


def test_k1_and_k3_are_unbiased_and_k2_is_not():
    # Exact expectation under pi over a 3-token vocabulary vs the analytic KL(pi || pi_ref).
    pi = [0.5, 0.3, 0.2]
    ref = [0.2, 0.3, 0.5]
    # KL = 0.5 ln(0.5/0.2) + 0.3 ln 1 + 0.2 ln(0.2/0.5) = 0.5 ln 2.5 - 0.2 ln 2.5 = 0.3 ln 2.5
    kl = 0.3 * math.log(2.5)
    expect = {
        estimator: sum(
            p * v
            for p, v in zip(pi, per_token_kl(estimator, [math.log(p) for p in pi], [math.log(q) for q in ref]))
        )
        for estimator in KLEstimator
    }
    # E[k1] is the definition of KL; E[k3] = E[r - 1] + E[-log r] = (sum ref - sum pi) + KL = KL.
    assert expect[KLEstimator.K1] == pytest.approx(kl, abs=1e-15)
    assert expect[KLEstimator.K3] == pytest.approx(kl, abs=1e-15)
    # k2's is 1/2 E[d^2] = 1/2 (0.5 ln(2.5)^2 + 0.3 * 0 + 0.2 ln(0.4)^2) = 0.35 ln(2.5)^2 (0.294 vs 0.275): biased.
    assert expect[KLEstimator.K2] == pytest.approx(0.35 * math.log(2.5) ** 2, abs=1e-15)
    assert expect[KLEstimator.K2] != pytest.approx(kl, abs=1e-3)


def test_sequence_sum():
    # Token 1: d = ln(0.5/0.25) = ln 2; token 2: d = ln(0.2/0.4) = -ln 2; k1 sums to 0.
    per_token = per_token_kl(KLEstimator.K1, [math.log(0.5), math.log(0.2)], [math.log(0.25), math.log(0.4)])
    assert per_token == pytest.approx([LN2, -LN2], abs=1e-15)
    assert sequence_kl(per_token) == pytest.approx(0.0, abs=1e-15)
    # Three tokens at d = ln 2, each k3 = ln 2 - 1/2 (first test).
    assert sequence_kl(per_token_kl(KLEstimator.K3, [math.log(0.5)] * 3, [math.log(0.25)] * 3)) == pytest.approx(
        3 * (LN2 - 0.5), abs=1e-15
    )


def test_tensors_go_through_the_same_formulas():
    # The trainer's (B, T) log-ratios d = [0.5, -1, 0]:
    #   k1 = d; k2 = d^2 / 2 = [0.125, 0.5, 0]; k3 = e^-d - 1 + d = [e^-0.5 - 0.5, e - 2, 0].
    d = torch.tensor([[0.5, -1.0, 0.0]], dtype=torch.float64)
    expected = {
        KLEstimator.K1: [[0.5, -1.0, 0.0]],
        KLEstimator.K2: [[0.125, 0.5, 0.0]],
        KLEstimator.K3: [[math.exp(-0.5) - 0.5, math.e - 2, 0.0]],
    }
    for estimator, values in expected.items():
        tensor = kl_from_log_ratio(estimator, d)
        assert tensor.shape == (1, 3)
        torch.testing.assert_close(tensor, torch.tensor(values, dtype=torch.float64), rtol=0, atol=1e-15)
        # The float path (the reference service's) agrees token by token.
        assert [kl_from_log_ratio(estimator, x) for x in d[0].tolist()] == pytest.approx(values[0], abs=1e-15)
    assert kl_from_log_ratio("k3", d).min() >= 0


def test_estimates_beyond_float_range_are_inf_not_errors():
    # k3 at d = -100: e^100 - 1 - 100, where e^100 = 2.6881171418161356e43 swamps the rest.
    assert kl_from_log_ratio("k3", -100.0) == pytest.approx(2.6881171418161356e43, rel=1e-15)
    # e^715 is past float64 (e^709.78): inf, as torch gives it, where math.expm1 raised OverflowError.
    assert kl_from_log_ratio("k3", -715.0) == math.inf
    assert kl_from_log_ratio("k3", torch.tensor([-715.0], dtype=torch.float64)).item() == math.inf
    # k2 at d = -1e200: d^2 = 1e400 > 1.8e308; a float's d ** 2 raised OverflowError.
    assert kl_from_log_ratio("k2", -1e200) == math.inf
    # The other side stays small: at d = 715 (policy far likelier), k3 = e^-715 - 1 + 715 = 714.
    assert kl_from_log_ratio("k3", 715.0) == 714.0


def test_estimator_names_parse_and_unknown_ones_are_refused():
    assert ESTIMATOR_NAMES == ("k1", "k2", "k3")
    assert [parse_estimator(name) for name in ESTIMATOR_NAMES] == list(KLEstimator)
    assert parse_estimator(KLEstimator.K2) is KLEstimator.K2
    with pytest.raises(InvalidInput, match="^estimator: must be one of k1, k2, k3, got 'k4'$"):
        kl_from_log_ratio("k4", 0.5)


def test_length_mismatch_is_refused():
    with pytest.raises(ValueError, match="policy has 2 log-probs, reference 1"):
        per_token_kl(KLEstimator.K1, [-1.0, -2.0], [-1.0])
