"""On-policy rollouts sampled in-process from a tiny policy, with a rule-based
reward, for trainer tests that should not need the three services."""

from __future__ import annotations

import uuid

import torch

from arbiter.v1 import rollout_pb2
from trainer.batch import Trajectory


def target_token(tokenizer) -> int:
    """Tokens below this id (bytes and the earliest merges) are the "good" ones."""
    return 128


def count_reward(completion: list[int], target: int) -> float:
    """The task: use as many low-id tokens as possible (a quarter of the
    vocabulary, so the signal is dense from the first batch)."""
    return sum(1 for token in completion if token < target) / len(completion)


@torch.no_grad()
def sample_trajectories(
    lm, tokenizer, n: int, *, length: int = 8, version: str = "v0", seed: int = 0, group_size: int = 1,
    prompt: str = "Say:",
) -> list[Trajectory]:
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = tokenizer(prompt)["input_ids"]
    target = target_token(tokenizer)
    out = []
    for i in range(n):
        ids, logprobs = list(prompt_ids), []
        for _ in range(length):
            logp = torch.log_softmax(lm(torch.tensor([ids])).logits[0, -1], -1)
            token = int(torch.multinomial(logp.exp(), 1, generator=generator))
            ids.append(token)
            logprobs.append(float(logp[token]))
        completion = ids[len(prompt_ids):]
        out.append(Trajectory(
            rollout_id=uuid.uuid4().hex, prompt_id=f"p{i // group_size}", group_id=f"g{seed}-{i // group_size}",
            prompt_ids=tuple(prompt_ids), completion_ids=tuple(completion), sampling_logprobs=tuple(logprobs),
            # The reference is the starting policy itself in these tests.
            reference_logprobs=tuple(logprobs), reward=count_reward(completion, target), policy_version=version,
        ))
    return out


def to_rollout(t: Trajectory) -> rollout_pb2.Rollout:
    return rollout_pb2.Rollout(
        rollout_id=t.rollout_id, prompt_id=t.prompt_id, group_id=t.group_id,
        prompt_token_ids=list(t.prompt_ids), completion_token_ids=list(t.completion_ids),
        sampling_logprobs=list(t.sampling_logprobs), reference_logprobs=list(t.reference_logprobs),
        reward=t.reward, policy_version=t.policy_version, group_size=t.group_size,
    )
