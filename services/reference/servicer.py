"""``arbiter.v1.ReferenceService`` handlers: validate, convert, call the engine, convert back."""

from __future__ import annotations

from arbiter.reference.engine import ReferenceEngine
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

    @unary("LogProbs")
    async def LogProbs(self, request, context):
        result = await self.engine.logprobs(
            [sequence_from_pb(s) for s in request.sequences], request.model_version, request.tokenizer_fingerprint
        )
        return logprobs_response_to_pb(result)

    @unary("KL")
    async def KL(self, request, context):
        result = await self.engine.kl(
            kl_inputs_from_pb(request.inputs),
            estimator_from_pb(request.estimator),
            request.model_version,
            request.tokenizer_fingerprint,
        )
        return kl_response_to_pb(result)
