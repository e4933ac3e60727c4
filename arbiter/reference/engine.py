"""The reference engine: versions of the frozen reference model behind
dynamic batchers; log-probs and per-token KL against the policy."""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from arbiter.backends.model import BackendEngine
from arbiter.batching import BatchObserver, ItemShape
from arbiter.errors import FailedPrecondition, InvalidInput, LimitExceeded
from arbiter.kl import KLEstimator, per_token_kl, sequence_kl
from arbiter.kernel import EngineConfig, LoadedVersion, ModelKernel
from arbiter.lm import check_same_model
from arbiter.reference.model import ReferenceModel, TokenSequence


class ReferenceObserver(BatchObserver, Protocol):
    def on_tokens(self, count: int) -> None: ...


@dataclass(frozen=True)
class ReferenceEngineConfig(EngineConfig):
    max_sequences_per_request: int = 256
    # LoRA adapters loaded later apply to this base (the server's --model);
    # in-process only: Triton serves exported (merged) checkpoints.
    base_model_dir: str | None = None

    def __post_init__(self) -> None:
        if self.max_sequences_per_request < 1:
            raise ValueError(f"max_sequences_per_request must be >= 1, got {self.max_sequences_per_request}")


@dataclass(frozen=True)
class KLInput:
    sequence: TokenSequence
    # The policy's per-token log-probs of the completion tokens.
    policy_logprobs: tuple[float, ...]


@dataclass(frozen=True)
class KLSequence:
    kl: list[float]
    kl_sum: float
    reference_logprobs: list[float]


@dataclass(frozen=True)
class LogProbsResult:
    logprobs: list[list[float]]
    model_version: str
    tokenizer_fingerprint: str


@dataclass(frozen=True)
class KLResult:
    results: list[KLSequence]
    estimator: KLEstimator
    model_version: str


def as_float32(values: Sequence[float]) -> list[float]:
    """What the wire carries (proto ``float``)."""
    return array("f", values).tolist()


def check_logprob_count(got: int, want: int, field: str) -> None:
    """One policy log-prob per completion token (a service checks it before copying them)."""
    if got != want:
        raise InvalidInput(field, f"has {got} values for {want} completion tokens; send one log-prob per completion token")


# The largest float32: per-token estimates travel as proto ``float``.
FLOAT32_MAX = 3.4028234663852886e38


def check_estimates(estimator: KLEstimator, per_token: Sequence[float], policy: Sequence[float],
                    reference: Sequence[float], field: str) -> None:
    """Refuse a token whose estimate float32 cannot carry: k3 once the
    policy's log-prob is more than ~88.7 nats below the reference's (e^88.7 =
    3.4e38), k2 once they differ by more than ~2.6e19. A token the policy
    sampled cannot be that much less likely under it than under the
    reference: such log-probs belong to other tokens or another model."""
    for j, value in enumerate(per_token):
        if not abs(value) <= FLOAT32_MAX:
            raise InvalidInput(
                f"{field}[{j}]",
                f"is {policy[j]} against the reference's {reference[j]}: the {estimator.value} estimate "
                f"({value:.4g}) is beyond the float range of KLResult.kl (3.4e38); check that the log-probs "
                "belong to these tokens and this policy",
            )



def reference_items(model: ReferenceModel) -> ItemShape[TokenSequence]:
    """A reference batch item is one sequence: the forward pass reads its
    prompt and completion. Calibration sequences split their tokens evenly
    (the log-softmax runs over the completion's share)."""
    token = model.tokenizer.eos_token_id or 0

    def sample(tokens: int) -> TokenSequence:
        return TokenSequence((token,) * max(1, tokens // 2), (token,) * max(1, tokens - tokens // 2))

    return ItemShape(lambda s: len(s.prompt_token_ids) + len(s.completion_token_ids), sample, model.info.max_tokens)


class ReferenceEngine(BackendEngine):
    MODEL = ReferenceModel
    ITEMS = staticmethod(reference_items)
    # Callers send token ids: a version with another tokenizer or architecture would score other tokens.
    COMPATIBLE = staticmethod(check_same_model)
    models: ModelKernel[ReferenceModel]
    config: ReferenceEngineConfig

    def load_options(self) -> dict:
        # LoRA adapters apply to the server's base model.
        return {"base_dir": self.config.base_model_dir}

    # -- requests -------------------------------------------------------

    def check_count(self, count: int, field: str) -> None:
        """A request's number of sequences: a service checks it before converting them."""
        if count == 0:
            raise InvalidInput(field, "is empty; send at least one sequence")
        limit = self.config.max_sequences_per_request
        if count > limit:
            raise LimitExceeded(f"{count} {field} in one request, over the limit of {limit}; split the request")

    def _entry(self, count: int, field: str, model_version: str, fingerprint: str) -> LoadedVersion:
        self.check_count(count, field)
        entry = self.models.get(model_version)
        served = entry.model.info.tokenizer_fingerprint
        if fingerprint and fingerprint != served:
            raise FailedPrecondition(
                f"tokenizer_fingerprint {fingerprint[:16]}... does not match the reference model's {served[:16]}... "
                f"(version {entry.model.info.version!r}): token ids from another tokenizer give meaningless "
                "log-probs; pair the policy with a reference that shares its tokenizer"
            )
        return entry

    async def logprobs(
        self, sequences: Sequence[TokenSequence], model_version: str = "", tokenizer_fingerprint: str = ""
    ) -> LogProbsResult:
        entry = self._entry(len(sequences), "sequences", model_version, tokenizer_fingerprint)
        for i, sequence in enumerate(sequences):
            entry.model.check(sequence, f"sequences[{i}]")
        results = await entry.run(list(sequences))
        self._observer.on_tokens(sum(len(s.completion_token_ids) for s in sequences))
        info = entry.model.info
        return LogProbsResult(results, info.version, info.tokenizer_fingerprint)

    async def kl(
        self,
        inputs: Sequence[KLInput],
        estimator: KLEstimator = KLEstimator.K1,
        model_version: str = "",
        tokenizer_fingerprint: str = "",
    ) -> KLResult:
        entry = self._entry(len(inputs), "inputs", model_version, tokenizer_fingerprint)
        for i, item in enumerate(inputs):
            entry.model.check(item.sequence, f"inputs[{i}].sequence")
            check_logprob_count(len(item.policy_logprobs), len(item.sequence.completion_token_ids),
                                f"inputs[{i}].policy_logprobs")
            for j, value in enumerate(item.policy_logprobs):
                if not math.isfinite(value) or value > 1e-3:
                    raise InvalidInput(
                        f"inputs[{i}].policy_logprobs[{j}]", f"is {value}; a log-probability must be finite and <= 0"
                    )
        reference = await entry.run([item.sequence for item in inputs])
        self._observer.on_tokens(sum(len(item.policy_logprobs) for item in inputs))
        results = []
        for i, (item, ref) in enumerate(zip(inputs, reference, strict=True)):
            # Both sides at float32, the precision Generate's log-probs arrive
            # in: identical models then give exactly zero, not rounding noise.
            ref32 = as_float32(ref)
            policy32 = as_float32(item.policy_logprobs)
            per_token = per_token_kl(estimator, policy32, ref32)
            check_estimates(estimator, per_token, policy32, ref32, f"inputs[{i}].policy_logprobs")
            results.append(KLSequence(per_token, sequence_kl(per_token), ref32))
        return KLResult(results, estimator, entry.model.info.version)
