"""Trainer boundary: Kafka payloads (protobuf) <-> trainer types."""

from __future__ import annotations

import itertools
import math
import time

from arbiter.stream import ConsumedRecord
from arbiter.v1 import rollout_pb2
from trainer.batch import Trajectory


class InvalidRollout(ValueError):
    """``reason``: one of arbiter.stream.REJECT_REASONS."""

    def __init__(self, message: str, reason: str = "invalid_record"):
        super().__init__(message)
        self.reason = reason


def trajectory_from_record(
    record: ConsumedRecord, reward_source: str = "raw", *, vocab_size: int | None = None,
    max_tokens: int | None = None,
) -> Trajectory:
    """A consumed Rollout -> Trajectory; InvalidRollout says what makes it
    unusable. With ``reward_source`` "reward_model" (``PPOConfig``) the
    rollout must carry a reward normalized with its RM version's statistics.
    Token ids must lie in ``range(vocab_size)`` and prompt plus completion
    fit ``max_tokens`` (the trained model's embedding rows and positions):
    checked here, before any forward pass, because such a rollout would fail
    the whole batch it lands in."""
    r: rollout_pb2.Rollout = record.message
    where = f"rollout {r.rollout_id or '?'} at {record.topic}[{record.partition}]@{record.offset}"
    if not r.rollout_id:
        raise InvalidRollout(f"{where}: rollout_id is empty (needed for dedupe)")
    if not r.prompt_token_ids or not r.completion_token_ids:
        raise InvalidRollout(f"{where}: prompt_token_ids and completion_token_ids must be non-empty")
    tokens = len(r.prompt_token_ids) + len(r.completion_token_ids)
    if max_tokens is not None and tokens > max_tokens:
        raise InvalidRollout(
            f"{where}: {len(r.prompt_token_ids)} prompt + {len(r.completion_token_ids)} completion tokens, over "
            f"the model's {max_tokens}", "too_long",
        )
    if vocab_size is not None:
        for name in ("prompt_token_ids", "completion_token_ids"):
            ids = getattr(r, name)
            low, high = min(ids), max(ids)
            if low < 0 or high >= vocab_size:
                bad = low if low < 0 else high
                raise InvalidRollout(
                    f"{where}: {name}[{list(ids).index(bad)}]={bad} is outside the model's vocabulary "
                    f"(0..{vocab_size - 1}): sampled by a model with another tokenizer?", "out_of_vocab",
                )
    n = len(r.completion_token_ids)
    for name in ("sampling_logprobs", "reference_logprobs"):
        if len(getattr(r, name)) != n:
            raise InvalidRollout(f"{where}: {name} has {len(getattr(r, name))} values for {n} completion tokens")
    if not math.isfinite(r.reward):
        raise InvalidRollout(f"{where}: reward is {r.reward}")
    if reward_source == "reward_model":
        if not r.reward_normalization_applied:
            raise InvalidRollout(
                f"{where}: reward_source is reward_model, but reward model version {r.reward_model_version!r} did "
                "not normalize this reward (the version ships no statistics, or the worker did not ask for them)"
            )
        if not math.isfinite(r.reward_normalized):
            raise InvalidRollout(f"{where}: reward_normalized is {r.reward_normalized}")
    if not all(math.isfinite(x) for x in itertools.chain(r.sampling_logprobs, r.reference_logprobs)):
        raise InvalidRollout(f"{where}: log-probabilities must be finite")
    if not r.policy_version:
        raise InvalidRollout(f"{where}: policy_version is empty (needed for staleness)")
    return Trajectory(
        rollout_id=r.rollout_id,
        prompt_id=r.prompt_id,
        group_id=r.group_id or r.rollout_id,
        prompt_ids=tuple(r.prompt_token_ids),
        completion_ids=tuple(r.completion_token_ids),
        sampling_logprobs=tuple(r.sampling_logprobs),
        reference_logprobs=tuple(r.reference_logprobs),
        reward=r.reward,
        policy_version=r.policy_version,
        reward_model_version=r.reward_model_version,
        reward_normalized=r.reward_normalized if r.reward_normalization_applied else None,
        gold_score=r.gold_score if r.HasField("gold_score") else None,
        group_size=r.group_size,
        mask_version=r.mask_version,
        mask_top_p=r.mask_top_p,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
    )


def policy_update(
    version: str, checkpoint_path: str, parent_version: str, step: int, weights_sha256: str, is_adapter: bool,
    rollouts_settled: dict[int, int] | None = None, weights_uri: str = "", mask_version: str = "",
    mask_top_p: float = 0.0,
) -> rollout_pb2.PolicyUpdate:
    update = rollout_pb2.PolicyUpdate(
        policy_version=version,
        checkpoint_path=checkpoint_path,
        weights_uri=weights_uri,
        parent_version=parent_version,
        is_adapter=is_adapter,
        weights_sha256=weights_sha256,
        training_step=step,
        rollouts_settled=rollouts_settled or {},
        mask_version=mask_version,
        mask_top_p=mask_top_p,
    )
    update.created_at.FromNanoseconds(time.time_ns())
    return update
