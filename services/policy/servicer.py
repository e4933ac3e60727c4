"""``arbiter.v1.PolicyService`` handlers: validate, convert, call the engine, convert back."""

from __future__ import annotations

from arbiter.policy.engine import PolicyEngine
from arbiter.v1 import policy_pb2_grpc
from services.common.handlers import Servicer, streaming, unary
from services.policy.convert import (
    action_mask_from_pb,
    generate_response_to_pb,
    prompt_from_pb,
    prompts_from_pb,
    sampling_from_pb,
    stream_event_to_pb,
)


class PolicyServicer(Servicer, policy_pb2_grpc.PolicyServiceServicer):
    """Generation over the policy engine, whole (Generate) or token by token
    (GenerateStream); the engine picks the version when a request starts."""

    engine: PolicyEngine

    # Counts and sizes are checked as sent, before anything is converted
    # (arbiter.limits): a request of millions of tiny prompts or stop strings
    # fails in microseconds, not seconds and gigabytes.

    @unary("Generate")
    async def Generate(self, request, context):
        self.engine.check_count(len(request.prompts))
        self.engine.check_stops(request.sampling.stop)
        budget = self.engine.size_budget(request.model_version)
        budget.request(request.ByteSize())
        for i, prompt in enumerate(request.prompts):
            budget.item(f"prompts[{i}]", prompt.ByteSize())
        result = await self.engine.generate(
            prompts_from_pb(request.prompts), sampling_from_pb(request.sampling), request.model_version,
            action_mask_from_pb(request),
        )
        return generate_response_to_pb(result)

    @streaming("GenerateStream")
    async def GenerateStream(self, request, context):
        """One message per sampled token of each sample; a sample's first
        message carries its prompt token ids, its last one the finish reason."""
        self.engine.check_stops(request.sampling.stop)
        budget = self.engine.size_budget(request.model_version)
        budget.request(request.ByteSize())
        budget.item("prompt", request.prompt.ByteSize())
        prompt = prompt_from_pb(request.prompt, "prompt")
        generation, steps = await self.engine.generate_stream(
            prompt, sampling_from_pb(request.sampling), request.model_version, action_mask_from_pb(request),
        )
        version = generation.policy.info.version
        started: set[int] = set()
        try:
            async for events in steps:
                for event in events:
                    first = event.row not in started
                    started.add(event.row)
                    yield stream_event_to_pb(event, version, generation.rows[event.row].prompt_ids if first else None)
        finally:
            # A cancelled stream frees its generation slot now, not at GC.
            await steps.aclose()
