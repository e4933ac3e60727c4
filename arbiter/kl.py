"""Per-token KL estimators between the policy and the frozen reference.

Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html.
With tokens x sampled from the policy pi and r = pi_ref(x) / pi(x):

    k1 = log pi - log pi_ref = -log r            unbiased, high variance, can be < 0
    k2 = 1/2 (log pi - log pi_ref)^2 = 1/2 (log r)^2   biased, low variance, >= 0
    k3 = (r - 1) - log r                         unbiased, low variance, >= 0

Each is an estimate of KL(pi || pi_ref) at one token; their sum over a
completion estimates the sequence-level KL. Inputs are log-probabilities of
the sampled tokens only, never full distributions.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence


class KLEstimator(enum.Enum):
    K1 = "k1"
    K2 = "k2"
    K3 = "k3"


def k1(logp: float, logp_ref: float) -> float:
    return logp - logp_ref


def k2(logp: float, logp_ref: float) -> float:
    return 0.5 * (logp - logp_ref) ** 2


def k3(logp: float, logp_ref: float) -> float:
    log_r = logp_ref - logp
    # expm1 keeps (r - 1) exact when r is close to 1, i.e. when the two
    # models agree, which is exactly where k3 is tiny and must not be noise.
    return math.expm1(log_r) - log_r


_ESTIMATORS = {KLEstimator.K1: k1, KLEstimator.K2: k2, KLEstimator.K3: k3}


def per_token_kl(
    estimator: KLEstimator, policy_logprobs: Sequence[float], reference_logprobs: Sequence[float]
) -> list[float]:
    """(T,) policy and reference log-probs of the same sampled tokens -> (T,) KL estimates."""
    if len(policy_logprobs) != len(reference_logprobs):
        raise ValueError(
            f"policy has {len(policy_logprobs)} log-probs, reference {len(reference_logprobs)}; they must match"
        )
    fn = _ESTIMATORS[estimator]
    return [fn(float(p), float(q)) for p, q in zip(policy_logprobs, reference_logprobs, strict=True)]


def sequence_kl(per_token: Sequence[float]) -> float:
    """Sum over the completion's tokens: the sequence-level KL estimate."""
    return math.fsum(per_token)
