"""The pipeline's service stages: generate (PolicyService.Generate), score
(RewardService.Score) and reference log-probs (ReferenceService.LogProbs).

Each is called with a batch and answers per item. A stage sends its batch in
one request, retried by ``StageRetry`` while it fails transiently; a batch
the service refuses as INVALID_ARGUMENT is sent again item by item, and the
items refused on their own are logged and answered None; any other failure
is a ``WorkerError``. Generate counts its refusals itself; the worker counts
those of score and reference, which see the same samples at once, so that a
sample both refuse is counted once.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Generic, TypeVar

import grpc

from arbiter.policy.types import ActionMask, SamplingParams
from arbiter.prompts import reward_input_for
from arbiter.types import Prompt, RewardInput, Truncation
from arbiter.v1 import policy_pb2
from services.policy.client import PolicyClient
from services.reference.client import ReferenceClient
from services.reward.client import RewardClient
from services.worker.retry import StageRetry, WorkerError, fatal

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Answer = TypeVar("Answer")


@dataclass(frozen=True)
class Generation:
    """One sample of a prompt. The samples of a prompt from one call share
    ``group_id`` (the group RLOO / GRPO baselines are computed over)."""

    prompt: Prompt
    sample: policy_pb2.Sample
    group_id: str
    tokenizer_fingerprint: str
    # NLPO: the action mask it was sampled under (None: unmasked).
    mask: ActionMask | None = None

    def describe(self) -> str:
        return f"sample {self.sample.sample_index} of prompt {self.prompt.id!r}"


@dataclass(frozen=True)
class Reward:
    raw: float
    # The RM version's shipped statistics applied; the raw score without them.
    normalized: float
    model_version: str
    # Whether ``normalized`` really is normalized (the trainer's
    # ``ppo.reward_source: reward_model`` trains only on rollouts where it is).
    normalization_applied: bool


@dataclass(frozen=True)
class ReferenceLogProbs:
    logprobs: list[float]  # one per completion token
    model_version: str


@dataclass
class ServiceStage(Generic[Item, Answer]):
    """What the service stages share: the retry and splitting a refused batch.
    ``name`` labels the stage's metrics; ``skip_reason`` is what its refusals
    are counted as."""

    name: ClassVar[str]
    skip_reason: ClassVar[str]
    retry: StageRetry

    def _each_or_skip(
        self, items: Sequence[Item], request_for: Callable[[Sequence[Item]], Callable[[], list[Answer]]],
        describe_item: Callable[[Item], str],
    ) -> list[Answer | None]:
        """One answer per item. ``request_for(batch)`` builds the request once
        and returns the call that sends it, so a retry resends the same
        request (a Generate's seed included)."""
        try:
            return self._send(request_for(items))
        except grpc.RpcError as err:
            if len(items) == 1:
                return [self._refused(items[0], err, describe_item)]
            log.warning("%s refused a batch of %d (%s); retrying one by one", self.name, len(items), err.details())
        answers: list[Answer | None] = []
        for item in items:
            try:
                answers.extend(self._send(request_for([item])))
            except grpc.RpcError as err:
                answers.append(self._refused(item, err, describe_item))
        return answers

    def _send(self, send: Callable[[], list[Answer]]) -> list[Answer]:
        """``send()`` under the retry; only INVALID_ARGUMENT leaves as an RpcError."""
        try:
            return self.retry.call(self.name, send)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise
            raise fatal(self.name, err) from None

    def _refused(self, item: Item, err: grpc.RpcError, describe_item: Callable[[Item], str]) -> None:
        log.warning("%s refused %s: %s; skipping it", self.name, describe_item(item), err.details())


@dataclass
class GenerateStage(ServiceStage[Prompt, tuple[list[policy_pb2.Sample], str]]):
    """Prompts -> ``samples_per_prompt`` Generations each. Samples with an
    empty completion are skipped and counted (the reward and reference
    services refuse them). A policy whose tokenizer changed since the worker
    paired it with the reference stops the worker."""

    name = "generate"
    skip_reason = "prompt_rejected"
    skip: Callable[[str], None]
    policy: PolicyClient
    sampling: SamplingParams
    tokenizer_fingerprint: str
    # NLPO: the action mask to sample under now (the trainer's latest), or None.
    mask: Callable[[], ActionMask | None] = lambda: None
    calls: int = field(default=0, init=False)
    # The last mask the policy service sampled under.
    _served_mask: ActionMask | None = field(default=None, init=False)

    def __call__(self, prompts: Sequence[Prompt]) -> list[Generation]:
        answers = self._each_or_skip(prompts, self._request, lambda prompt: f"prompt {prompt.id!r}")
        generations = []
        for prompt, answer in zip(prompts, answers):
            if answer is None:
                self.skip(self.skip_reason)
                continue
            samples, fingerprint, mask = answer
            if fingerprint and fingerprint != self.tokenizer_fingerprint:
                raise WorkerError(
                    f"the policy's tokenizer changed (fingerprint {fingerprint[:16]}..., paired with "
                    f"{self.tokenizer_fingerprint[:16]}...): restart the worker to re-check the reference pairing"
                )
            group_id = uuid.uuid4().hex
            for sample in samples:
                if not sample.completion_token_ids or not sample.text.strip():
                    self.skip("empty_completion")
                    continue
                generations.append(Generation(prompt, sample, group_id, fingerprint or self.tokenizer_fingerprint,
                                              mask))
        return generations

    def _request(
        self, batch: Sequence[Prompt],
    ) -> Callable[[], list[tuple[list[policy_pb2.Sample], str, ActionMask | None]]]:
        sampling = self.sampling
        if sampling.seed is not None:
            # seed + call number: reproducible runs without repeating a call's samples.
            sampling = dataclasses.replace(sampling, seed=sampling.seed + self.calls)
        self.calls += 1

        def send() -> list[tuple[list[policy_pb2.Sample], str, ActionMask | None]]:
            mask = self.mask()
            try:
                response = self.policy.generate(batch, sampling, mask=mask)
            except grpc.RpcError as err:
                # A mask the trainer just announced that this replica has not
                # loaded yet: the one it served before (the trainer still
                # takes rollouts of the previous mask).
                fallback = self._served_mask
                if err.code() != grpc.StatusCode.NOT_FOUND or mask is None or fallback in (None, mask):
                    raise
                log.info("the policy has no mask version %r yet; sampling under %r", mask.model_version,
                         fallback.model_version)
                mask, response = fallback, self.policy.generate(batch, sampling, mask=fallback)
            self._served_mask = mask
            groups: list[list[policy_pb2.Sample]] = [[] for _ in batch]
            for sample in response.samples:
                groups[sample.prompt_index].append(sample)
            if any(len(group) != sampling.n for group in groups):
                raise WorkerError(
                    f"the policy answered {[len(g) for g in groups]} samples per prompt, asked {sampling.n}"
                )
            return [(group, response.tokenizer_fingerprint, mask) for group in groups]

        return send


@dataclass
class ScoreStage(ServiceStage[Generation, Reward]):
    """Generations -> Rewards of the reward service's active version, with
    its shipped normalization when the version has statistics."""

    name = "score"
    skip_reason = "reward_rejected"
    reward: RewardClient
    truncation: Truncation
    # Off once the active RM version ships no statistics.
    normalize: bool

    def __call__(self, generations: Sequence[Generation]) -> list[Reward | None]:
        return self._each_or_skip(generations, self._request, Generation.describe)

    def _request(self, batch: Sequence[Generation]) -> Callable[[], list[Reward]]:
        inputs = [reward_input_for(g.prompt, g.sample.text) for g in batch]
        return lambda: self._score(inputs)

    def _score(self, inputs: list[RewardInput]) -> list[Reward]:
        try:
            response = self.reward.score(inputs, normalize=self.normalize, truncation=self.truncation)
        except grpc.RpcError as err:
            lost = self.normalize and err.code() == grpc.StatusCode.FAILED_PRECONDITION and self._lost_statistics()
            if not lost:
                raise
            response = self.reward.score(inputs, normalize=False, truncation=self.truncation)
        return [
            Reward(r.raw_score, r.score if response.normalized else r.raw_score, response.model_version,
                   response.normalized)
            for r in response.results
        ]

    def _lost_statistics(self) -> bool:
        """Whether the active RM version is now one without shipped statistics
        (normalizing is then refused); if so, raw scores from now on."""
        info = self.reward.info()
        if info.HasField("normalization"):
            return False
        log.warning("reward model %s %s ships no normalization statistics: reward_normalized = reward",
                    info.name, info.version)
        self.normalize = False
        return True


@dataclass
class ReferenceStage(ServiceStage[Generation, ReferenceLogProbs]):
    """Generations -> the reference model's log-probs of each completion. The
    reference client sends the paired tokenizer fingerprint, which the service
    re-checks, so a swap to another tokenizer fails loudly."""

    name = "reference"
    skip_reason = "reference_rejected"
    reference: ReferenceClient

    def __call__(self, generations: Sequence[Generation]) -> list[ReferenceLogProbs | None]:
        return self._each_or_skip(generations, self._request, Generation.describe)

    def _request(self, batch: Sequence[Generation]) -> Callable[[], list[ReferenceLogProbs]]:
        pairs = [(g.sample.prompt_token_ids, g.sample.completion_token_ids) for g in batch]

        def send() -> list[ReferenceLogProbs]:
            response = self.reference.logprobs(pairs)
            answers = []
            for (_, completion), result in zip(pairs, response.results):
                if len(result.logprobs) != len(completion):
                    raise WorkerError(
                        f"the reference returned {len(result.logprobs)} log-probs for {len(completion)} "
                        "completion tokens"
                    )
                answers.append(ReferenceLogProbs(list(result.logprobs), response.model_version))
            return answers

        return send
