"""``RewardService.SubmitPreference``: human preferences onto the preferences topic.

A request is validated (errors name the field), turned into an
``arbiter.v1.Preference`` and produced with acks=all; the RPC answers once the
brokers have it, with where it landed. ``arbiter train rm --from-topic`` trains
on the topic.

Kafka is optional for the reward service: without it (no ``kafka`` settings)
this RPC is FAILED_PRECONDITION, since retrying cannot help; a configured
broker that cannot be reached, or that does not acknowledge, is UNAVAILABLE
(transient: the caller's retry policy retries it).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor

from arbiter.errors import BackendUnavailable, FailedPrecondition, InvalidInput, LimitExceeded
from arbiter.limits import SizeBudget
from arbiter.stream import KafkaSettings, StreamError, StreamProducer, TopicError, topics
from arbiter.v1 import reward_pb2, rollout_pb2
from services.reward.convert import check_response_sizes

log = logging.getLogger(__name__)

MAX_RANKED_RESPONSES = 16
_ID_RE = re.compile(r"^[A-Za-z0-9._:@/-]{1,128}$")
_ANNOTATOR_MAX = 200
# Room for the record's key, headers and batch framing under max_request_size.
_RECORD_OVERHEAD = 1024


def _require_text(value: str, field: str, what: str) -> None:
    if not value.strip():
        raise InvalidInput(field, f"is empty; {what}")


def _check_sizes(request: reward_pb2.SubmitPreferenceRequest, budget: SizeBudget | None) -> None:
    """Before anything is read: the lists' lengths, then each response with
    its context, what RM training will tokenize, as an item of the reward
    service's size."""
    ranked = len(request.ranked_responses)
    if ranked > MAX_RANKED_RESPONSES:
        raise LimitExceeded(f"ranked_responses has {ranked} responses, over the limit of {MAX_RANKED_RESPONSES}")
    count = ranked or 2
    versions = len(request.policy_versions)
    if versions and versions not in (1, count):
        raise InvalidInput(
            "policy_versions", f"has {versions} entries; send none, one (for all responses) or {count} "
            "(one per response, in the order the responses were sent)",
        )
    if budget is not None:
        if ranked:
            responses = [(f"ranked_responses[{i}]", r) for i, r in enumerate(request.ranked_responses)]
        else:
            responses = [("chosen", request.chosen), ("rejected", request.rejected)]
        check_response_sizes(budget, request, responses)


def preference_from_request(
    request: reward_pb2.SubmitPreferenceRequest, budget: SizeBudget | None = None
) -> rollout_pb2.Preference:
    """Validate a request and build its Preference payload (schema version is
    stamped by the codec; created_at and the id are set here). ``budget``:
    the reward service's size limits."""
    _check_sizes(request, budget)
    preference = rollout_pb2.Preference()
    context = request.WhichOneof("context")
    if context is None:
        raise InvalidInput("context", "set prompt (plain text) or conversation (chat messages)")
    if context == "prompt":
        _require_text(request.prompt, "prompt", "send the prompt the responses answer")
        preference.prompt = request.prompt
    else:
        messages = request.conversation.messages
        if not messages:
            raise InvalidInput("conversation.messages", "is empty; send the conversation the responses continue")
        for j, message in enumerate(messages):
            _require_text(message.role, f"conversation.messages[{j}].role", "every message needs a role")
            _require_text(message.content, f"conversation.messages[{j}].content", "every message needs content")
        preference.conversation.CopyFrom(request.conversation)

    if request.ranked_responses:
        for name in ("chosen", "rejected"):
            if getattr(request, name):
                raise InvalidInput(name, "must be empty with ranked_responses: send a pair or a ranking, not both")
        responses = list(request.ranked_responses)
        if len(responses) < 2:
            raise InvalidInput("ranked_responses", f"has {len(responses)} response; a ranking needs at least 2")
        seen: dict[str, int] = {}
        for i, response in enumerate(responses):
            _require_text(response, f"ranked_responses[{i}]", "every ranked response needs text")
            if response in seen:
                raise InvalidInput(
                    f"ranked_responses[{i}]", f"repeats ranked_responses[{seen[response]}]; rank distinct responses"
                )
            seen[response] = i
        preference.ranked_responses.extend(responses)
    else:
        _require_text(request.chosen, "chosen", "send the preferred response (or ranked_responses)")
        _require_text(request.rejected, "rejected", "send the dispreferred response (or ranked_responses)")
        if request.chosen == request.rejected:
            raise InvalidInput("rejected", "is identical to chosen; a preference needs two different responses")
        preference.chosen, preference.rejected = request.chosen, request.rejected

    _require_text(request.annotator_id, "annotator_id", "say who judged (labels are audited per annotator)")
    if len(request.annotator_id) > _ANNOTATOR_MAX:
        raise InvalidInput("annotator_id", f"is {len(request.annotator_id)} characters; at most {_ANNOTATOR_MAX}")
    preference.annotator_id = request.annotator_id

    versions = list(request.policy_versions)
    for i, version in enumerate(versions):
        _require_text(version, f"policy_versions[{i}]", "name the policy version or leave the list empty")
    preference.policy_versions.extend(versions)

    if request.preference_id:
        if not _ID_RE.match(request.preference_id):
            raise InvalidInput(
                "preference_id", "must be 1..128 characters of letters, digits and . _ : @ / - (or empty)"
            )
        preference.preference_id = request.preference_id
    else:
        preference.preference_id = uuid.uuid4().hex
    preference.created_at.GetCurrentTime()
    return preference


class PreferenceFeedback:
    """The producer side of SubmitPreference, owned by the reward server.

    The producer is created on first use (and again after a failure), on its
    own thread: Kafka's blocking calls never touch the event loop or the
    model thread.
    """

    def __init__(self, kafka: KafkaSettings | None, *, timeout_s: float = 30.0):
        self.kafka = kafka
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-feedback")
        self._producer: StreamProducer | None = None
        self._lock = asyncio.Lock()

    async def _get_producer(self) -> StreamProducer:
        async with self._lock:
            if self._producer is None:
                loop = asyncio.get_running_loop()
                self._producer = await loop.run_in_executor(self._executor, _open_producer, self.kafka)
            return self._producer

    async def _drop_producer(self, producer: StreamProducer) -> None:
        async with self._lock:
            if self._producer is producer:
                self._producer = None
        # A producer that failed a delivery may hold failed batches; start clean.
        loop = asyncio.get_running_loop()
        loop.run_in_executor(self._executor, _close_quietly, producer)

    async def submit(
        self, request: reward_pb2.SubmitPreferenceRequest, budget: SizeBudget | None = None
    ) -> reward_pb2.SubmitPreferenceResponse:
        preference = preference_from_request(request, budget)
        if self.kafka is None:
            raise FailedPrecondition(
                "this reward service has no Kafka settings, so it cannot record preferences; start it with "
                "--kafka-bootstrap-servers (or ARBITER_KAFKA_BOOTSTRAP_SERVERS)"
            )
        size = preference.ByteSize()
        if size + _RECORD_OVERHEAD > self.kafka.max_request_size:
            raise LimitExceeded(
                f"the preference is {size} bytes, over the {self.kafka.max_request_size - _RECORD_OVERHEAD} "
                "bytes a record may take; shorten the responses"
            )
        loop = asyncio.get_running_loop()
        try:
            producer = await self._get_producer()
        except StreamError as err:
            raise BackendUnavailable(f"cannot reach Kafka to record the preference: {err}") from err
        try:
            future = await loop.run_in_executor(self._executor, producer.send, topics.PREFERENCES, preference)
            delivery = await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except TopicError as err:
            raise FailedPrecondition(f"the preferences topic is not usable: {err}") from err
        except InvalidInput:
            raise
        except Exception as err:  # StreamError, a timeout, or the client's own errors
            await self._drop_producer(producer)
            detail = str(err) or f"no acknowledgement within {self.timeout_s}s"
            raise BackendUnavailable(f"the preference was not recorded (retry): {detail}") from err
        return reward_pb2.SubmitPreferenceResponse(
            preference_id=preference.preference_id, topic=delivery.topic, partition=delivery.partition,
            offset=delivery.offset,
        )

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        loop = asyncio.get_running_loop()
        if producer is not None:
            await loop.run_in_executor(self._executor, _close_quietly, producer)
        self._executor.shutdown(wait=False)


def _open_producer(kafka: KafkaSettings) -> StreamProducer:
    # kafka-python waits up to 30 s for an unreachable bootstrap server; a
    # TCP probe first answers a caller within seconds instead.
    deadline = min(kafka.request_timeout_ms, 5000) / 1000
    for server in kafka.bootstrap_servers:
        host, _, port = server.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=deadline).close()
            break
        except OSError:
            continue
    else:
        raise StreamError(f"no Kafka broker reachable at {','.join(kafka.bootstrap_servers)}")
    try:
        return StreamProducer(kafka)
    except StreamError:
        raise
    except Exception as err:  # the client raises several types while bootstrapping
        raise StreamError(f"cannot connect to Kafka at {','.join(kafka.bootstrap_servers)}: {err!r}") from err


def _close_quietly(producer: StreamProducer) -> None:
    try:
        producer.close(timeout_s=5.0)
    except Exception:  # closing is best effort; the records' fate was already reported
        log.warning("closing the preferences producer failed", exc_info=True)
