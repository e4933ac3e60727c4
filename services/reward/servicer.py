"""``arbiter.v1.RewardService`` handlers: validate, convert, call the engine, convert back."""

from __future__ import annotations

import asyncio

from arbiter.reward.engine import RewardEngine
from arbiter.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from services.common.convert import messages_from_pb
from services.common.errors import status_for
from services.common.handlers import streaming, unary
from services.reward.convert import (
    compare_response_to_pb,
    drift_response_to_pb,
    inputs_from_pb,
    options_from_pb,
    score_response_to_pb,
    stream_response_to_pb,
)
from services.reward.feedback import PreferenceFeedback
from services.reward.metrics import RewardMetrics


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(
        self, engine: RewardEngine, metrics: RewardMetrics, stream_max_in_flight: int,
        feedback: PreferenceFeedback | None = None,
    ):
        self.engine = engine
        self.metrics = metrics
        self.stream_max_in_flight = stream_max_in_flight
        # SubmitPreference (services/reward/feedback.py); None: no Kafka settings.
        self.feedback = feedback or PreferenceFeedback(None)

    @unary("Score")
    async def Score(self, request, context):
        batch = await self.engine.score(inputs_from_pb(request.inputs), options_from_pb(request.options))
        return score_response_to_pb(batch)

    @unary("Compare")
    async def Compare(self, request, context):
        messages = messages_from_pb(request.conversation) if request.WhichOneof("context") == "conversation" else None
        probability, batch = await self.engine.compare(
            request.prompt, messages, request.response_a, request.response_b, options_from_pb(request.options)
        )
        return compare_response_to_pb(probability, batch)

    @unary("SetShadow")
    async def SetShadow(self, request, context):
        fraction = request.sample_fraction or 1.0
        active, shadow, fraction = self.engine.set_shadow(request.model_version, fraction)
        return reward_pb2.SetShadowResponse(active_version=active, shadow_version=shadow, sample_fraction=fraction)

    @unary("GetScoreDrift")
    async def GetScoreDrift(self, request, context):
        version = self.engine.info(request.model_version).version
        monitor = self.metrics.drift.monitor(version)
        reference, window = monitor.samples()
        return drift_response_to_pb(version, monitor.reference_source, reference, window, monitor.stats())

    @unary("SubmitPreference")
    async def SubmitPreference(self, request, context):
        return await self.feedback.submit(request)

    @streaming("ScoreStream")
    async def ScoreStream(self, request_iterator, context):
        """Messages are scored concurrently (at most ``stream_max_in_flight``
        at once, which back-pressures the caller) and answered as they finish."""
        responses: asyncio.Queue[reward_pb2.ScoreStreamResponse | None] = asyncio.Queue()
        slots = asyncio.Semaphore(self.stream_max_in_flight)
        in_flight: set[asyncio.Task] = set()

        async def answer(request: reward_pb2.ScoreStreamRequest) -> None:
            try:
                batch = await self.engine.score(inputs_from_pb(request.inputs), options_from_pb(request.options))
                response = stream_response_to_pb(request.correlation_id, batch)
            except Exception as err:  # one bad message must not end the stream
                code, message = status_for(err)
                response = reward_pb2.ScoreStreamResponse(
                    correlation_id=request.correlation_id,
                    error=common_pb2.ErrorStatus(code=code.value[0], message=message),
                )
            finally:
                slots.release()
            await responses.put(response)

        async def read_requests() -> None:
            async for request in request_iterator:
                await slots.acquire()
                task = asyncio.create_task(answer(request))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            await asyncio.gather(*list(in_flight))
            await responses.put(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (response := await responses.get()) is not None:
                yield response
            await reader
        finally:
            reader.cancel()
            for task in list(in_flight):
                task.cancel()
