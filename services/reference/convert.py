"""Reference-service boundary: protobuf <-> core types."""

from __future__ import annotations

from arbiter.errors import InvalidInput
from arbiter.kl import KLEstimator
from arbiter.reference.engine import KLInput, KLResult, LogProbsResult
from arbiter.reference.model import TokenSequence
from arbiter.v1 import reference_pb2

# Unspecified means k1, the per-token penalty of InstructGPT-style PPO.
_ESTIMATOR_FROM_PB = {
    reference_pb2.KL_ESTIMATOR_UNSPECIFIED: KLEstimator.K1,
    reference_pb2.KL_ESTIMATOR_K1: KLEstimator.K1,
    reference_pb2.KL_ESTIMATOR_K2: KLEstimator.K2,
    reference_pb2.KL_ESTIMATOR_K3: KLEstimator.K3,
}
_ESTIMATOR_TO_PB = {
    KLEstimator.K1: reference_pb2.KL_ESTIMATOR_K1,
    KLEstimator.K2: reference_pb2.KL_ESTIMATOR_K2,
    KLEstimator.K3: reference_pb2.KL_ESTIMATOR_K3,
}


def sequence_from_pb(sequence: reference_pb2.TokenSequence) -> TokenSequence:
    return TokenSequence(tuple(sequence.prompt_token_ids), tuple(sequence.completion_token_ids))


def estimator_from_pb(value: int) -> KLEstimator:
    try:
        return _ESTIMATOR_FROM_PB[value]
    except KeyError:
        allowed = ", ".join(reference_pb2.KLEstimator.Name(v) for v in _ESTIMATOR_FROM_PB)
        raise InvalidInput("estimator", f"unknown value {value}; allowed: {allowed}") from None


def kl_inputs_from_pb(inputs) -> list[KLInput]:
    return [KLInput(sequence_from_pb(item.sequence), tuple(item.policy_logprobs)) for item in inputs]


def logprobs_response_to_pb(result: LogProbsResult) -> reference_pb2.LogProbsResponse:
    return reference_pb2.LogProbsResponse(
        results=[reference_pb2.TokenLogProbs(logprobs=lps) for lps in result.logprobs],
        model_version=result.model_version,
        tokenizer_fingerprint=result.tokenizer_fingerprint,
    )


def kl_response_to_pb(result: KLResult) -> reference_pb2.KLResponse:
    return reference_pb2.KLResponse(
        results=[
            reference_pb2.KLResult(kl=r.kl, kl_sum=r.kl_sum, reference_logprobs=r.reference_logprobs)
            for r in result.results
        ],
        estimator=_ESTIMATOR_TO_PB[result.estimator],
        model_version=result.model_version,
    )
