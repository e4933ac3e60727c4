"""Rollouts as the trainer sees them, and their collation into (B, T) tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Trajectory:
    """One scored sample (a ``arbiter.v1.Rollout`` without the wire format)."""

    rollout_id: str
    prompt_id: str
    group_id: str
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    # Under the sampling policy, one per completion token ("old" log-probs for PPO).
    sampling_logprobs: tuple[float, ...]
    # Under the frozen reference model, one per completion token.
    reference_logprobs: tuple[float, ...]
    # Raw reward-model score of the whole sample (read at its last token).
    reward: float
    policy_version: str
    reward_model_version: str = ""
    # The score normalized with its reward-model version's shipped statistics;
    # None when that version ships none.
    reward_normalized: float | None = None
    gold_score: float | None = None
    # Members of group_id the worker produced (0: not recorded, older records).
    group_size: int = 0
    # NLPO: the masking-policy version and top-p it was sampled under ("": unmasked).
    mask_version: str = ""
    mask_top_p: float = 0.0
    # Where it came from, for offsets.
    topic: str = ""
    partition: int = 0
    offset: int = 0


@dataclass(frozen=True)
class PPOBatch:
    input_ids: Tensor  # (B, L) prompt + completion, right-padded
    attention_mask: Tensor  # (B, L)
    # positions[b, t]: index in L of the logits that predict completion token t,
    # i.e. the position just before it.
    positions: Tensor  # (B, T)
    completion_ids: Tensor  # (B, T)
    mask: Tensor  # (B, T) true on real completion tokens
    old_logprobs: Tensor  # (B, T)
    ref_logprobs: Tensor  # (B, T)
    scores: Tensor  # (B,) raw reward-model scores
    group_ids: list[str]
    # (B,) scores normalized with their reward-model versions' statistics; None
    # unless every trajectory has one.
    rm_normalized_scores: Tensor | None = None
    # (B,) the reward-model version of each score (raw scores are normalized per version).
    reward_model_versions: tuple[str, ...] = ()
    # NLPO: (B, T, V) the action set of each completion token (its masking
    # policy's nucleus, ppo_math.nlpo_action_mask); None: unmasked.
    action_mask: Tensor | None = None

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: Tensor) -> PPOBatch:
        return PPOBatch(
            input_ids=self.input_ids[index], attention_mask=self.attention_mask[index],
            positions=self.positions[index], completion_ids=self.completion_ids[index], mask=self.mask[index],
            old_logprobs=self.old_logprobs[index], ref_logprobs=self.ref_logprobs[index], scores=self.scores[index],
            group_ids=[self.group_ids[i] for i in index.tolist()],
            rm_normalized_scores=None if self.rm_normalized_scores is None else self.rm_normalized_scores[index],
            reward_model_versions=tuple(self.reward_model_versions[i] for i in index.tolist())
            if self.reward_model_versions else (),
            action_mask=None if self.action_mask is None else self.action_mask[index],
        )


def collate(trajectories: Sequence[Trajectory], pad_id: int) -> PPOBatch:
    B = len(trajectories)
    L = max(len(t.prompt_ids) + len(t.completion_ids) for t in trajectories)
    T = max(len(t.completion_ids) for t in trajectories)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    completion_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    # Padded log-probs are 0, not -inf: masked positions must stay finite so
    # no NaN leaks into gradients.
    old_logprobs = torch.zeros((B, T), dtype=torch.float32)
    ref_logprobs = torch.zeros((B, T), dtype=torch.float32)
    for b, t in enumerate(trajectories):
        P, C = len(t.prompt_ids), len(t.completion_ids)
        input_ids[b, : P + C] = torch.tensor(t.prompt_ids + t.completion_ids)
        attention_mask[b, : P + C] = 1
        positions[b, :C] = torch.arange(P - 1, P + C - 1)
        completion_ids[b, :C] = torch.tensor(t.completion_ids)
        mask[b, :C] = True
        old_logprobs[b, :C] = torch.tensor(t.sampling_logprobs)
        ref_logprobs[b, :C] = torch.tensor(t.reference_logprobs)
    scores = torch.tensor([t.reward for t in trajectories], dtype=torch.float32)
    normalized = [t.reward_normalized for t in trajectories]
    rm_normalized = None if None in normalized else torch.tensor(normalized, dtype=torch.float32)
    return PPOBatch(input_ids, attention_mask, positions, completion_ids, mask, old_logprobs, ref_logprobs, scores,
                    [t.group_id for t in trajectories], rm_normalized,
                    tuple(t.reward_model_version for t in trajectories))


def gather_positions(per_position: Tensor, positions: Tensor) -> Tensor:
    """(B, L, ...) -> (B, T, ...): the entries at each completion token's predicting position."""
    if per_position.dim() == 2:
        return per_position.gather(1, positions)
    index = positions.unsqueeze(-1).expand(-1, -1, per_position.shape[-1])
    return per_position.gather(1, index)
