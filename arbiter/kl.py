"""Per-token KL estimators between the policy and the frozen reference: the
one home of k1/k2/k3, used by the reference service (``ReferenceService.KL``),
the PPO trainer's reward shaping and its config validation.

Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html.
With tokens x sampled from the policy pi and r = pi_ref(x) / pi(x), written
in terms of the log-ratio d = log pi - log pi_ref = -log r:

    k1 = -log r             = d                   unbiased, high variance, can be < 0
    k2 = 1/2 (log r)^2      = d^2 / 2             biased, low variance, >= 0
    k3 = (r - 1) - log r    = (e^-d - 1) + d      unbiased, low variance, >= 0

Each is an estimate of KL(pi || pi_ref) at one token; their sum over a
completion estimates the sequence-level KL. Inputs are log-probabilities of
the sampled tokens only, never full distributions.

:func:`kl_from_log_ratio` is written once for Python floats and tensors alike
(anything with ``.expm1()``), so the service's per-token values and the
trainer's (B, T) penalty are the same formulas. Neither raises: an estimate
beyond float64 is ``inf``, as IEEE arithmetic (and torch) gives it. Only k3
grows that fast, e^-d once the policy's log-prob is far below the
reference's: e^-d passes float32's range (3.4e38, the wire type of
``KLResult.kl``) at d < -88.7 and float64's at d < -709.8. No rewriting keeps
such a value finite, so the reference service refuses the token instead.
"""

from __future__ import annotations

import enum
import math
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

from arbiter.errors import InvalidInput

X = TypeVar("X")


class KLEstimator(enum.Enum):
    K1 = "k1"
    K2 = "k2"
    K3 = "k3"


# The names a config file or flag may use ("k1", "k2", "k3").
ESTIMATOR_NAMES: tuple[str, ...] = tuple(e.value for e in KLEstimator)


def parse_estimator(estimator: KLEstimator | str) -> KLEstimator:
    """``KLEstimator.K3`` or ``"k3"`` -> ``KLEstimator.K3``; anything else is InvalidInput."""
    try:
        return KLEstimator(estimator)
    except ValueError:
        raise InvalidInput("estimator", f"must be one of {', '.join(ESTIMATOR_NAMES)}, got {estimator!r}") from None


# math.expm1 raises OverflowError past this (e^x > the largest float); the result is inf there.
_EXPM1_MAX = math.log(sys.float_info.max)


def _expm1(x: Any) -> Any:
    if isinstance(x, int | float):
        return math.expm1(x) if x <= _EXPM1_MAX else math.inf
    return x.expm1()


def kl_from_log_ratio(estimator: KLEstimator | str, log_ratio: X) -> X:
    """The estimate at each token from d = log pi - log pi_ref (a float, or a tensor of any shape)."""
    estimator = parse_estimator(estimator)
    if estimator is KLEstimator.K1:
        return log_ratio
    if estimator is KLEstimator.K2:
        # d * d overflows to inf; a float's d ** 2 raises OverflowError instead.
        return 0.5 * (log_ratio * log_ratio)
    # expm1 keeps (r - 1) exact when r is close to 1, i.e. when the two
    # models agree, which is exactly where k3 is tiny and must not be noise.
    return _expm1(-log_ratio) + log_ratio


def per_token_kl(
    estimator: KLEstimator, policy_logprobs: Sequence[float], reference_logprobs: Sequence[float]
) -> list[float]:
    """(T,) policy and reference log-probs of the same sampled tokens -> (T,) KL estimates."""
    if len(policy_logprobs) != len(reference_logprobs):
        raise ValueError(
            f"policy has {len(policy_logprobs)} log-probs, reference {len(reference_logprobs)}; they must match"
        )
    return [
        kl_from_log_ratio(estimator, float(p) - float(q))
        for p, q in zip(policy_logprobs, reference_logprobs, strict=True)
    ]


def sequence_kl(per_token: Sequence[float]) -> float:
    """Sum over the completion's tokens: the sequence-level KL estimate."""
    return math.fsum(per_token)
