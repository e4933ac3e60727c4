"""KL estimators against values derived by hand (Schulman, "Approximating KL
Divergence", 2020), with r = pi_ref / pi."""

import math

import pytest

from arbiter.kl import KLEstimator, k1, k2, k3, per_token_kl, sequence_kl

LN2 = 0.6931471805599453


def test_policy_more_likely_than_reference():
    # pi = 1/2, pi_ref = 1/4: log pi - log pi_ref = ln 2, r = 1/2.
    logp, logp_ref = math.log(0.5), math.log(0.25)
    assert k1(logp, logp_ref) == pytest.approx(LN2, abs=1e-15)  # ln 2 = 0.693147
    assert k2(logp, logp_ref) == pytest.approx(0.5 * LN2**2, abs=1e-15)  # 0.240227
    assert k3(logp, logp_ref) == pytest.approx(-0.5 + LN2, abs=1e-15)  # (1/2 - 1) - ln(1/2) = 0.193147


def test_policy_less_likely_than_reference():
    # pi = 0.2, pi_ref = 0.4: r = 2; k1 is negative, k2 and k3 are not.
    logp, logp_ref = math.log(0.2), math.log(0.4)
    assert k1(logp, logp_ref) == pytest.approx(-LN2, abs=1e-15)
    assert k2(logp, logp_ref) == pytest.approx(0.24022650695910071, abs=1e-15)
    assert k3(logp, logp_ref) == pytest.approx(1 - LN2, abs=1e-15)  # (2 - 1) - ln 2 = 0.306853


def test_identical_models_give_zero():
    for estimator in KLEstimator:
        assert per_token_kl(estimator, [-0.1, -2.5, -7.0], [-0.1, -2.5, -7.0]) == [0.0, 0.0, 0.0]


def test_k3_keeps_precision_when_models_nearly_agree():
    # log r = 1e-9: k3 = e^x - 1 - x = x^2/2 + O(x^3) = 5e-19; naive exp(x) - 1 - x gives ~1e-16 noise.
    assert k3(-1.0, -1.0 + 1e-9) == pytest.approx(5e-19, rel=1e-6)


def test_k1_and_k3_are_unbiased_and_k2_is_not():
    # Exact expectation under pi over a 3-token vocabulary vs the analytic KL(pi || pi_ref).
    pi = [0.5, 0.3, 0.2]
    ref = [0.2, 0.3, 0.5]
    kl = sum(p * math.log(p / q) for p, q in zip(pi, ref))  # 0.5 ln 2.5 + 0.2 ln 0.4 = 0.274887
    assert kl == pytest.approx(0.2748872195622465, abs=1e-15)
    expect = {
        estimator: sum(
            p * v
            for p, v in zip(pi, per_token_kl(estimator, [math.log(p) for p in pi], [math.log(q) for q in ref]))
        )
        for estimator in KLEstimator
    }
    assert expect[KLEstimator.K1] == pytest.approx(kl, abs=1e-15)
    assert expect[KLEstimator.K3] == pytest.approx(kl, abs=1e-15)
    # k2's is 1/2 E[(log r)^2] = 1/2 (0.5 ln(0.4)^2 + 0.3 * 0 + 0.2 ln(2.5)^2) = 0.35 ln(2.5)^2: biased.
    assert expect[KLEstimator.K2] == pytest.approx(0.35 * math.log(2.5) ** 2, abs=1e-15)
    assert expect[KLEstimator.K2] != pytest.approx(kl, abs=1e-3)


def test_sequence_sum():
    per_token = per_token_kl(KLEstimator.K1, [math.log(0.5), math.log(0.2)], [math.log(0.25), math.log(0.4)])
    assert per_token == pytest.approx([LN2, -LN2], abs=1e-15)
    assert sequence_kl(per_token) == pytest.approx(0.0, abs=1e-15)
    assert sequence_kl(per_token_kl(KLEstimator.K3, [math.log(0.5)] * 3, [math.log(0.25)] * 3)) == pytest.approx(
        3 * (LN2 - 0.5), abs=1e-15
    )


def test_length_mismatch_is_refused():
    with pytest.raises(ValueError, match="policy has 2 log-probs, reference 1"):
        per_token_kl(KLEstimator.K1, [-1.0, -2.0], [-1.0])
