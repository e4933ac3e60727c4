"""``arbiter.v1.RewardService`` handlers: validate, convert, call the engine, convert back."""

from __future__ import annotations

import asyncio

from arbiter.drift import ScoreDriftMonitor
from arbiter.errors import FailedPrecondition, InvalidInput, LimitExceeded
from arbiter.reward.composite import TOTAL
from arbiter.reward.engine import RewardEngine
from arbiter.shadow import WINDOW as SHADOW_WINDOW
from arbiter.types import ScoreBatch
from arbiter.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from services.common.convert import messages_from_pb
from services.common.errors import status_for
from services.common.handlers import streaming, unary
from services.reward.convert import (
    check_input_sizes,
    check_response_sizes,
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
        feedback: PreferenceFeedback | None = None, stream_max_messages: int = 0,
    ):
        self.engine = engine
        self.metrics = metrics
        self.stream_max_in_flight = stream_max_in_flight
        # 0: a stream may carry any number of messages.
        self.stream_max_messages = stream_max_messages
        # SubmitPreference (services/reward/feedback.py); None: no Kafka settings.
        self.feedback = feedback or PreferenceFeedback(None)

    async def _score_checked(self, request) -> ScoreBatch:
        """A Score or ScoreStream request, its sizes checked before its inputs are converted."""
        self.engine.check_count(len(request.inputs))
        check_input_sizes(self.engine.size_budget(request.options.model_version), request)
        return await self.engine.score(inputs_from_pb(request.inputs), options_from_pb(request.options))

    @unary("Score")
    async def Score(self, request, context):
        return score_response_to_pb(await self._score_checked(request))

    @unary("Compare")
    async def Compare(self, request, context):
        check_response_sizes(self.engine.size_budget(request.options.model_version), request,
                             [("response_a", request.response_a), ("response_b", request.response_b)])
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

    @unary("GetShadow")
    async def GetShadow(self, request, context):
        version = request.model_version
        if not version:
            raise InvalidInput("model_version", "is empty; name the candidate version whose shadow window to read")
        self.engine.models.get(version)  # NOT_FOUND naming the loaded versions
        shadowing = self.engine.shadow
        fraction = shadowing[1] if shadowing is not None and shadowing[0] == version else 0.0
        response = reward_pb2.GetShadowResponse(
            active_version=self.engine.models.active_version or "", shadow_version=version,
            shadowing=fraction > 0, sample_fraction=fraction, window=SHADOW_WINDOW,
            pairwise_agreement=float("nan"), spearman=float("nan"))
        monitor = self.metrics.shadow_monitor
        if monitor is not None and monitor.shadow_version == version:
            stats = monitor.stats()
            response.active_version, response.samples, response.window = (
                stats.active_version, stats.samples, monitor.window)
            response.pairwise_agreement, response.spearman = stats.pairwise_agreement, stats.spearman
            response.paired_change_points, response.paired_detecting = (
                stats.paired_change_points, stats.paired_detecting)
        return response

    @unary("GetScoreDrift")
    async def GetScoreDrift(self, request, context):
        if request.component:
            return self._component_drift(request)
        version = self.engine.info(request.model_version).version
        monitor = self.metrics.drift.monitor(version)
        reference, window = monitor.samples()
        return drift_response_to_pb(version, monitor.reference_source, reference, window, monitor.stats())

    def _component_drift(self, request) -> reward_pb2.GetScoreDriftResponse:
        spec = self.engine.config.reward_spec
        if request.model_version:
            raise InvalidInput("model_version", "must be empty with component (a component names its versions)")
        if spec is None:
            raise FailedPrecondition("component drift needs a configured reward spec (--reward-spec-file)")
        tracked = [TOTAL, *(t.name for t in spec.model_terms)]
        if request.component not in tracked:
            raise InvalidInput("component", f"{request.component!r} is not tracked; drift is tracked on: "
                                            f"{', '.join(tracked)}")
        monitor = self.metrics.component_drift.monitor(request.component)
        if monitor is None:  # nothing scored with the spec yet
            monitor = ScoreDriftMonitor(self.metrics.component_drift.config)
        reference, window = monitor.samples()
        return drift_response_to_pb(f"component:{request.component}", monitor.reference_source, reference, window,
                                    monitor.stats())

    @unary("SubmitPreference")
    async def SubmitPreference(self, request, context):
        return await self.feedback.submit(request, self.engine.size_budget())

    @streaming("ScoreStream")
    async def ScoreStream(self, request_iterator, context):
        """Messages are scored concurrently (at most ``stream_max_in_flight``
        at once, holding at most ``max_request_bytes`` between them, which
        back-pressures the caller) and answered as they finish. A message that
        does not parse, or one past ``stream_max_messages``, ends the stream
        with its status once every earlier message is answered."""
        responses: asyncio.Queue[reward_pb2.ScoreStreamResponse | None] = asyncio.Queue()
        slots = _InFlight(self.stream_max_in_flight, self.engine.config.sizes.max_request_bytes)
        in_flight: set[asyncio.Task] = set()

        async def answer(request: reward_pb2.ScoreStreamRequest, size: int) -> None:
            try:
                response = stream_response_to_pb(request.correlation_id, await self._score_checked(request))
            except Exception as err:  # one bad message must not end the stream
                code, message = status_for(err)
                response = reward_pb2.ScoreStreamResponse(
                    correlation_id=request.correlation_id,
                    error=common_pb2.ErrorStatus(code=code.value[0], message=message),
                )
            finally:
                slots.release(size)
            await responses.put(response)

        async def read_requests() -> None:
            try:
                count = 0
                async for request in request_iterator:
                    count += 1
                    if self.stream_max_messages and count > self.stream_max_messages:
                        raise LimitExceeded(
                            f"the stream sent more than {self.stream_max_messages} messages, the limit per stream "
                            "(stream_max_messages); open a new stream"
                        )
                    size = request.ByteSize()
                    await slots.acquire(size)
                    task = asyncio.create_task(answer(request, size))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
            finally:
                # However the stream ends, the messages read so far are answered first.
                await asyncio.gather(*list(in_flight), return_exceptions=True)
                await responses.put(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (response := await responses.get()) is not None:
                yield response
            await reader  # the stream's own error, if it ended on one
        finally:
            reader.cancel()
            for task in list(in_flight):
                task.cancel()


class _InFlight:
    """What one stream has in flight: at most ``messages`` messages, holding
    at most ``max_bytes`` between them (a bigger message runs alone). One
    reader acquires; finished answers release."""

    def __init__(self, messages: int, max_bytes: int):
        self.messages = messages
        self.max_bytes = max_bytes
        self.count = 0
        self.bytes = 0
        self._released = asyncio.Event()

    def _fits(self, size: int) -> bool:
        return self.count == 0 or (self.count < self.messages and self.bytes + size <= self.max_bytes)

    async def acquire(self, size: int) -> None:
        while not self._fits(size):
            self._released.clear()
            await self._released.wait()
        self.count += 1
        self.bytes += size

    def release(self, size: int) -> None:
        self.count -= 1
        self.bytes -= size
        self._released.set()
