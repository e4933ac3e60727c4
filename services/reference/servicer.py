"""``arbiter.v1.ReferenceService`` handlers: validate, convert, call the engine, convert back."""

from __future__ import annotations

from arbiter.reference.engine import ReferenceEngine, check_logprob_count
from arbiter.v1 import reference_pb2_grpc
from services.common.handlers import Servicer, unary
from services.reference.convert import (
    estimator_from_pb,
    kl_inputs_from_pb,
    kl_response_to_pb,
    logprobs_response_to_pb,
    sequence_from_pb,
)


class ReferenceServicer(Servicer, reference_pb2_grpc.ReferenceServiceServicer):
    engine: ReferenceEngine

    # Counts and lengths are checked as sent, before any id is copied: a
    # request of millions of ids fails in microseconds, not seconds and gigabytes.

    def _model(self, count: int, field: str, model_version: str):
        self.engine.check_count(count, field)
        return self.engine.models.get(model_version).model

    @unary("LogProbs")
    async def LogProbs(self, request, context):
        model = self._model(len(request.sequences), "sequences", request.model_version)
        for i, sequence in enumerate(request.sequences):
            model.check_length(_length(sequence), f"sequences[{i}]")
        result = await self.engine.logprobs(
            [sequence_from_pb(s) for s in request.sequences], request.model_version, request.tokenizer_fingerprint
        )
        return logprobs_response_to_pb(result)

    @unary("KL")
    async def KL(self, request, context):
        model = self._model(len(request.inputs), "inputs", request.model_version)
        for i, item in enumerate(request.inputs):
            model.check_length(_length(item.sequence), f"inputs[{i}].sequence")
            check_logprob_count(len(item.policy_logprobs), len(item.sequence.completion_token_ids),
                                f"inputs[{i}].policy_logprobs")
        result = await self.engine.kl(
            kl_inputs_from_pb(request.inputs),
            estimator_from_pb(request.estimator),
            request.model_version,
            request.tokenizer_fingerprint,
        )
        return kl_response_to_pb(result)


def _length(sequence) -> int:
    return len(sequence.prompt_token_ids) + len(sequence.completion_token_ids)
