"""Reward-service boundary: protobuf <-> core types."""

from __future__ import annotations

from collections.abc import Iterable

from arbiter.drift import DriftStats
from arbiter.errors import InvalidInput
from arbiter.limits import SizeBudget, utf8_size
from arbiter.types import RewardInput, ScoreBatch, ScoreOptions
from arbiter.v1 import reward_pb2
from services.common.convert import messages_from_pb, truncation_from_pb


# Sizes are checked as sent, before anything is converted (arbiter.limits).


def check_input_sizes(budget: SizeBudget, request) -> None:
    """A Score or ScoreStream request, and each of its inputs."""
    budget.request(request.ByteSize())
    for i, item in enumerate(request.inputs):
        budget.item(f"inputs[{i}]", item.ByteSize())


def check_response_sizes(budget: SizeBudget, request, responses: Iterable[tuple[str, str]]) -> None:
    """A Compare or SubmitPreference request: each of its ``(field, response)``
    with the request's context is one item (what is scored, or what RM
    training tokenizes)."""
    budget.request(request.ByteSize())
    # Every string fits the request, so sizes up to its limit are exact.
    cap = budget.request_limit
    if request.WhichOneof("context") == "conversation":
        where, context = "conversation", request.conversation.ByteSize()
    else:
        where, context = "prompt", utf8_size(request.prompt, cap)
    for field, response in responses:
        budget.item(f"{where} + {field}", context + utf8_size(response, cap))


def inputs_from_pb(inputs) -> list[RewardInput]:
    converted = []
    for i, item in enumerate(inputs):
        kind = item.WhichOneof("input")
        if kind == "text":
            converted.append(RewardInput(prompt=item.text.prompt, response=item.text.response, id=item.id))
        elif kind == "conversation":
            converted.append(RewardInput(messages=messages_from_pb(item.conversation), id=item.id))
        else:
            raise InvalidInput(f"inputs[{i}]", "sets neither text nor conversation")
    return converted


def options_from_pb(options: reward_pb2.ScoreOptions) -> ScoreOptions:
    return ScoreOptions(
        model_version=options.model_version,
        truncation=truncation_from_pb(options.truncation, "options.truncation"),
        normalize=options.normalize,
    )


def results_to_pb(batch: ScoreBatch) -> list[reward_pb2.ScoreResult]:
    return [
        reward_pb2.ScoreResult(
            score=r.score, raw_score=r.raw_score, num_tokens=r.num_tokens, truncated=r.truncated, id=r.id
        )
        for r in batch.results
    ]


def score_response_to_pb(batch: ScoreBatch) -> reward_pb2.ScoreResponse:
    return reward_pb2.ScoreResponse(
        results=results_to_pb(batch),
        model_name=batch.model_name,
        model_version=batch.model_version,
        normalized=batch.normalized,
    )


def stream_response_to_pb(correlation_id: str, batch: ScoreBatch) -> reward_pb2.ScoreStreamResponse:
    return reward_pb2.ScoreStreamResponse(
        correlation_id=correlation_id,
        results=results_to_pb(batch),
        model_name=batch.model_name,
        model_version=batch.model_version,
        normalized=batch.normalized,
    )


def compare_response_to_pb(probability: float, batch: ScoreBatch) -> reward_pb2.CompareResponse:
    a, b = batch.results
    return reward_pb2.CompareResponse(
        probability_a_preferred=probability,
        score_a=a.score,
        score_b=b.score,
        model_name=batch.model_name,
        model_version=batch.model_version,
    )


def drift_response_to_pb(
    version: str, reference_source: str, reference: list[float], window: list[float], stats: DriftStats
) -> reward_pb2.GetScoreDriftResponse:
    return reward_pb2.GetScoreDriftResponse(
        model_version=version,
        reference_source=reference_source,
        reference_scores=reference,
        window_scores=window,
        statistics=reward_pb2.DriftStatistics(
            ready=stats.ready,
            psi=stats.psi,
            ks_statistic=stats.ks_statistic,
            wasserstein=stats.wasserstein,
            js_distance=stats.js_distance,
            window_samples=stats.window_samples,
            window_mean=stats.window_mean,
            window_std=stats.window_std,
            reference_samples=stats.reference_samples,
            reference_mean=stats.reference_mean,
            reference_std=stats.reference_std,
            change_points=stats.change_points,
        ),
    )
