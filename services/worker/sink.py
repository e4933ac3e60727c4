"""The pipeline's end: one ``Rollout`` per scored sample, produced to the
rollouts topic keyed by prompt id (acks=all, idempotent producer)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import Future

from arbiter.prompts import display_text
from arbiter.stream import (
    Delivery,
    KafkaSettings,
    ProduceError,
    ProducerObserver,
    StreamError,
    StreamProducer,
    codec,
    topics,
)
from arbiter.v1 import rollout_pb2
from services.worker.metrics import WorkerMetrics
from services.worker.retry import StageRetry, WorkerError
from services.worker.stages import Generation, ReferenceLogProbs, Reward


def build_rollout(
    generation: Generation, reward: Reward, reference: ReferenceLogProbs, worker_id: str, gold_score: float | None,
) -> rollout_pb2.Rollout:
    sample = generation.sample
    rollout = rollout_pb2.Rollout(
        schema_version=codec.SCHEMA_MAJOR,
        rollout_id=uuid.uuid4().hex,
        prompt_id=generation.prompt.id,
        sample_index=sample.sample_index,
        prompt_token_ids=sample.prompt_token_ids,
        completion_token_ids=sample.completion_token_ids,
        sampling_logprobs=sample.logprobs,
        reference_logprobs=reference.logprobs,
        reward=reward.raw,
        reward_normalized=reward.normalized,
        reward_normalization_applied=reward.normalization_applied,
        policy_version=sample.policy_version,
        reward_model_version=reward.model_version,
        reference_model_version=reference.model_version,
        finish_reason=sample.finish_reason,
        prompt_text=display_text(generation.prompt),
        completion_text=sample.text,
        worker_id=worker_id,
        tokenizer_fingerprint=generation.tokenizer_fingerprint,
        group_id=generation.group_id,
    )
    rollout.created_at.GetCurrentTime()
    if generation.mask is not None:
        rollout.mask_version, rollout.mask_top_p = generation.mask.model_version, generation.mask.top_p
    if gold_score is not None:
        rollout.gold_score = gold_score
    return rollout


class _CountingObserver(ProducerObserver):
    def __init__(self, metrics: WorkerMetrics):
        self._metrics = metrics

    def on_failed(self, topic: str, error: BaseException) -> None:
        self._metrics.produce_errors.inc()


class RolloutSink:
    """``sink(rollouts)`` returns once the brokers acknowledged every record.
    Records not acknowledged are re-sent (same rollout_id, so the trainer's
    dedupe drops a record that did land twice) under the stage retry until
    they are, or the worker is stopped."""

    name = "produce"

    def __init__(self, kafka: KafkaSettings, metrics: WorkerMetrics, retry: StageRetry):
        self._producer = StreamProducer(kafka, _CountingObserver(metrics))
        self._retry = retry
        self._lock = threading.Lock()
        # Per partition of the rollouts topic, the offset after this sink's
        # newest acknowledged record: the partition's end as of that write,
        # other workers' records before it included.
        self._end: dict[int, int] = {}

    def written_to(self) -> dict[int, int]:
        """The offset after this sink's newest record, per partition written."""
        with self._lock:
            return dict(self._end)

    def _written(self, delivery: Delivery) -> None:
        with self._lock:
            self._end[delivery.partition] = max(self._end.get(delivery.partition, 0), delivery.offset + 1)

    def __call__(self, rollouts: Sequence[rollout_pb2.Rollout]) -> list[rollout_pb2.Rollout]:
        pending = list(rollouts)

        def attempt() -> None:
            nonlocal pending
            sent: list[tuple[rollout_pb2.Rollout, Future]] = []
            try:
                for rollout in pending:
                    sent.append((rollout, self._producer.send(topics.ROLLOUTS, rollout)))
                self._producer.flush()
                for _, delivery in sent:
                    self._written(delivery.result())
            except ProduceError as err:
                try:
                    self._producer.flush()  # settle what is still in flight before choosing what to re-send
                except ProduceError:
                    pass
                failed = [r for r, delivery in sent if not delivery.done() or delivery.exception() is not None]
                pending = failed + pending[len(sent):]
                raise ProduceError(f"{len(pending)} rollout(s) not acknowledged ({err})") from err

        try:
            self._retry.call(self.name, attempt, transient=lambda err: isinstance(err, ProduceError))
        except StreamError as err:
            raise WorkerError(f"kafka: {err}") from None
        return list(rollouts)

    def close(self) -> None:
        self._producer.close()
