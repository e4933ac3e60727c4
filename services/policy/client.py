"""A policy-service client."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property

from arbiter.policy.types import ActionMask, SamplingParams
from arbiter.types import ChatMessage, Prompt
from arbiter.v1 import policy_pb2, policy_pb2_grpc
from services.common.client import ModelServiceClient
from services.common.convert import conversation_to_pb

# A Prompt, a string, a list of {"role", "content"} chat messages, or the message itself.
PromptLike = Prompt | str | Sequence[Mapping[str, str]] | policy_pb2.PromptInput


def prompt_input(prompt: PromptLike, prompt_id: str = "") -> policy_pb2.PromptInput:
    """``prompt`` as a PromptInput; ``prompt_id`` names a string or chat (a
    Prompt carries its own id)."""
    if isinstance(prompt, policy_pb2.PromptInput):
        return prompt
    if isinstance(prompt, str):
        return policy_pb2.PromptInput(text=prompt, id=prompt_id)
    if not isinstance(prompt, Prompt):
        prompt = Prompt(messages=tuple(ChatMessage(m["role"], m["content"]) for m in prompt), id=prompt_id)
    if prompt.messages is None:
        return policy_pb2.PromptInput(text=prompt.text, id=prompt.id)
    return policy_pb2.PromptInput(conversation=conversation_to_pb(prompt.messages), id=prompt.id)


def sampling_to_pb(sampling: SamplingParams) -> policy_pb2.SamplingParams:
    params = policy_pb2.SamplingParams(
        max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k, n=sampling.n, stop=list(sampling.stop),
    )
    if sampling.seed is not None:
        params.seed = sampling.seed
    return params


def _mask_fields(mask: ActionMask | None) -> dict:
    """NLPO's action mask as a request's fields (none without a mask)."""
    return {} if mask is None else {"mask_model_version": mask.model_version, "mask_top_p": mask.top_p}


class PolicyClient(ModelServiceClient):
    SERVICE = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"]
    DEFAULT_TIMEOUT_S = 60.0

    @cached_property
    def policy(self) -> policy_pb2_grpc.PolicyServiceStub:
        return policy_pb2_grpc.PolicyServiceStub(self.channel)

    def generate(
        self, prompts: Iterable[PromptLike], sampling: SamplingParams = SamplingParams(), *, model_version: str = "",
        mask: ActionMask | None = None,
        **overrides,
    ) -> policy_pb2.GenerateResponse:
        """``overrides``: fields of ``sampling`` (max_new_tokens, temperature,
        top_p, top_k, n, stop, seed)."""
        request = policy_pb2.GenerateRequest(
            prompts=[prompt_input(p) for p in prompts],
            sampling=sampling_to_pb(dataclasses.replace(sampling, **overrides)),
            model_version=model_version,
            **_mask_fields(mask),
        )
        return self.policy.Generate(request, timeout=self.timeout_s, metadata=self.metadata)

    def generate_stream(
        self, prompt: PromptLike, sampling: SamplingParams = SamplingParams(), *, model_version: str = "",
        mask: ActionMask | None = None,
        **overrides,
    ) -> Iterator[policy_pb2.GenerateStreamResponse]:
        request = policy_pb2.GenerateStreamRequest(
            prompt=prompt_input(prompt),
            sampling=sampling_to_pb(dataclasses.replace(sampling, **overrides)),
            model_version=model_version,
            **_mask_fields(mask),
        )
        return self.policy.GenerateStream(request, timeout=self.timeout_s, metadata=self.metadata)
