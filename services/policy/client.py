"""A policy-service client."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

from arbiter.v1 import common_pb2, common_pb2_grpc, policy_pb2, policy_pb2_grpc
from services.common.client import call_credentials_metadata, open_channel
from services.policy.server import SERVICE_NAMES

Prompt = str | Sequence[Mapping[str, str]] | policy_pb2.PromptInput


def prompt_input(prompt: Prompt, prompt_id: str = "") -> policy_pb2.PromptInput:
    """A string, a list of {"role", "content"} chat messages, or a Prompt as is."""
    if isinstance(prompt, policy_pb2.PromptInput):
        return prompt
    if isinstance(prompt, str):
        return policy_pb2.PromptInput(text=prompt, id=prompt_id)
    messages = [common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in prompt]
    return policy_pb2.PromptInput(conversation=common_pb2.Conversation(messages=messages), id=prompt_id)


class PolicyClient:
    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 60.0,
        token: str | None = None,
        tls_ca_file: str | None = None,
    ):
        self.channel = open_channel(target, SERVICE_NAMES, timeout_s=timeout_s, tls_ca_file=tls_ca_file)
        self.policy = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self.models = common_pb2_grpc.ModelServiceStub(self.channel)
        self.timeout_s = timeout_s
        self.metadata = call_credentials_metadata(token)

    def generate(
        self, prompts: Iterable[Prompt], *, model_version: str = "", **sampling
    ) -> policy_pb2.GenerateResponse:
        """``sampling``: max_new_tokens, temperature, top_p, top_k, n, stop, seed."""
        request = policy_pb2.GenerateRequest(
            prompts=[prompt_input(p) for p in prompts],
            sampling=policy_pb2.SamplingParams(**sampling),
            model_version=model_version,
        )
        return self.policy.Generate(request, timeout=self.timeout_s, metadata=self.metadata)

    def generate_stream(
        self, prompt: Prompt, *, model_version: str = "", **sampling
    ) -> Iterator[policy_pb2.GenerateStreamResponse]:
        request = policy_pb2.GenerateStreamRequest(
            prompt=prompt_input(prompt), sampling=policy_pb2.SamplingParams(**sampling), model_version=model_version
        )
        return self.policy.GenerateStream(request, timeout=self.timeout_s, metadata=self.metadata)

    def info(self, model_version: str = "") -> common_pb2.ModelInfo:
        request = common_pb2.GetModelInfoRequest(model_version=model_version)
        return self.models.GetModelInfo(request, timeout=self.timeout_s, metadata=self.metadata).info

    def load_version(self, path: str, version: str = "", activate: bool = True) -> common_pb2.LoadModelVersionResponse:
        """The hot swap, with ``activate``: in-flight requests finish on the old weights."""
        request = common_pb2.LoadModelVersionRequest(path=path, version=version, activate=activate)
        return self.models.LoadModelVersion(request, timeout=self.timeout_s, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
