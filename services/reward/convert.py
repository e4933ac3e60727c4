"""Reward-service boundary: protobuf <-> core types."""

from __future__ import annotations

from collections.abc import Iterable

from arbiter.config import ConfigError
from arbiter.drift import DriftStats
from arbiter.errors import ArbiterError, InvalidInput
from arbiter.limits import SizeBudget, utf8_size
from arbiter.reward.composite import RewardSpec, parse_spec
from arbiter.types import RewardComponent, RewardInput, ScoreBatch, ScoreOptions
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
        reward_spec=spec_from_pb(options.reward_spec) if options.HasField("reward_spec") else None,
    )


_SIDES = {
    reward_pb2.LENGTH_PENALTY_SIDE_UNSPECIFIED: "both",
    reward_pb2.LENGTH_PENALTY_SIDE_BOTH: "both",
    reward_pb2.LENGTH_PENALTY_SIDE_OVER: "over",
    reward_pb2.LENGTH_PENALTY_SIDE_UNDER: "under",
}


def _term_mapping(term: reward_pb2.RewardTerm, field: str) -> dict:
    """A term as the mapping a YAML spec gives, so both are validated by
    ``arbiter.reward.composite.parse_spec``."""
    entry: dict = {"name": term.name, "weight": term.weight}
    source = term.WhichOneof("source")
    if source == "model":
        entry["model"] = {"version": term.model.version, "normalize": term.model.normalize}
    elif source == "ensemble":
        entry["ensemble"] = {"versions": list(term.ensemble.versions), "normalize": term.ensemble.normalize,
                             "uncertainty_penalty": term.ensemble.uncertainty_penalty}
    elif source == "length_penalty":
        side = term.length_penalty.side
        if side not in _SIDES:
            raise InvalidInput(f"{field}.length_penalty.side", f"{side} is not a LengthPenaltySide")
        entry["length_penalty"] = {"target_tokens": term.length_penalty.target_tokens, "side": _SIDES[side]}
    elif source == "regex":
        entry["regex"] = {"pattern": term.regex.pattern, "full_match": term.regex.full_match,
                          "ignore_case": term.regex.ignore_case}
    elif source == "repetition_penalty":
        entry["repetition_penalty"] = {"n": term.repetition_penalty.n}
    return entry


def spec_from_pb(spec: reward_pb2.RewardSpec) -> RewardSpec:
    where = "options.reward_spec"
    data = {"name": spec.name or "request",
            "terms": [_term_mapping(t, f"{where}.terms[{i}]") for i, t in enumerate(spec.terms)]}
    try:
        return parse_spec(data, where, allow_models=False)
    except ConfigError as err:
        raise InvalidSpec(err) from None


class InvalidSpec(InvalidInput):
    """A request's reward spec that does not validate (INVALID_ARGUMENT), its field named."""

    def __init__(self, err: ConfigError):
        ArbiterError.__init__(self, str(err))
        self.field = err.field


def _component_to_pb(c: RewardComponent) -> reward_pb2.RewardComponent:
    return reward_pb2.RewardComponent(
        name=c.name, weight=c.weight, value=c.value, raw_value=c.raw_value, versions=c.versions,
        member_scores=c.member_scores, mean=c.mean, std=c.std,
    )


def results_to_pb(batch: ScoreBatch) -> list[reward_pb2.ScoreResult]:
    return [
        reward_pb2.ScoreResult(
            score=r.score, raw_score=r.raw_score, num_tokens=r.num_tokens, truncated=r.truncated, id=r.id,
            components=[_component_to_pb(c) for c in r.components],
        )
        for r in batch.results
    ]


def score_response_to_pb(batch: ScoreBatch) -> reward_pb2.ScoreResponse:
    return reward_pb2.ScoreResponse(
        results=results_to_pb(batch),
        model_name=batch.model_name,
        model_version=batch.model_version,
        normalized=batch.normalized,
        reward_spec=batch.reward_spec,
    )


def stream_response_to_pb(correlation_id: str, batch: ScoreBatch) -> reward_pb2.ScoreStreamResponse:
    return reward_pb2.ScoreStreamResponse(
        correlation_id=correlation_id,
        results=results_to_pb(batch),
        model_name=batch.model_name,
        model_version=batch.model_version,
        normalized=batch.normalized,
        reward_spec=batch.reward_spec,
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
