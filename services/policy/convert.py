"""Policy-service boundary: protobuf <-> core types."""

from __future__ import annotations

from arbiter.errors import InvalidInput
from arbiter.policy.types import ActionMask, FinishReason, GeneratedSample, GenerateResult, SamplingParams, TokenEvent
from arbiter.types import Prompt
from arbiter.v1 import policy_pb2
from services.common.convert import messages_from_pb

FINISH_REASON_TO_PB = {
    FinishReason.LENGTH: policy_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: policy_pb2.FINISH_REASON_STOP,
    FinishReason.EOS: policy_pb2.FINISH_REASON_EOS,
}


def prompt_from_pb(item: policy_pb2.PromptInput, field: str) -> Prompt:
    kind = item.WhichOneof("input")
    if kind == "text":
        return Prompt(text=item.text, id=item.id)
    if kind == "conversation":
        return Prompt(messages=messages_from_pb(item.conversation), id=item.id)
    raise InvalidInput(field, "sets neither text nor conversation")


def prompts_from_pb(prompts) -> list[Prompt]:
    return [prompt_from_pb(item, f"prompts[{i}]") for i, item in enumerate(prompts)]


def sampling_from_pb(sampling: policy_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        n=sampling.n,
        stop=tuple(sampling.stop),
        seed=sampling.seed if sampling.HasField("seed") else None,
    )


def action_mask_from_pb(request) -> ActionMask | None:
    """A Generate(Stream)Request's NLPO mask fields; None when neither is set
    (the engine refuses one set without the other)."""
    if not request.mask_model_version and not request.mask_top_p:
        return None
    return ActionMask(request.mask_model_version, request.mask_top_p)


def sample_to_pb(sample: GeneratedSample) -> policy_pb2.Sample:
    return policy_pb2.Sample(
        prompt_index=sample.prompt_index,
        sample_index=sample.sample_index,
        prompt_token_ids=sample.prompt_token_ids,
        completion_token_ids=sample.completion_token_ids,
        text=sample.text,
        logprobs=sample.logprobs,
        finish_reason=FINISH_REASON_TO_PB[sample.finish_reason],
        policy_version=sample.policy_version,
        prompt_id=sample.prompt_id,
    )


def generate_response_to_pb(result: GenerateResult) -> policy_pb2.GenerateResponse:
    return policy_pb2.GenerateResponse(
        samples=[sample_to_pb(s) for s in result.samples],
        policy_version=result.policy_version,
        tokenizer_fingerprint=result.tokenizer_fingerprint,
    )


def stream_event_to_pb(
    event: TokenEvent, policy_version: str, prompt_token_ids: list[int] | None
) -> policy_pb2.GenerateStreamResponse:
    msg = policy_pb2.GenerateStreamResponse(
        sample_index=event.sample_index,
        token_ids=[event.token_id],
        text_delta=event.text_delta,
        logprobs=[event.logprob],
        policy_version=policy_version,
    )
    if event.finish_reason is not None:
        msg.finish_reason = FINISH_REASON_TO_PB[event.finish_reason]
    if prompt_token_ids is not None:
        msg.prompt_token_ids.extend(prompt_token_ids)
    return msg
