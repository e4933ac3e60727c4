"""One loaded reference-model version: teacher-forced log-probabilities of
completion tokens, batched with right padding.

These are the model's own distribution (temperature 1, no top-k/top-p): the
reference is what the policy is regularised towards, not a sampler.
The forward pass runs in a backend (``arbiter.backends``, kind ``arbiter.reference.backend.REFERENCE``): in this
process, or in Triton; everything else here is the same for both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from arbiter.errors import InvalidInput, ModelLoadError
from arbiter.lm import PROBE_TEXT, check_token_ids
from arbiter.backends import Backends
from arbiter.backends.model import BackendModel
from arbiter.reference.backend import REFERENCE


@dataclass(frozen=True)
class TokenSequence:
    prompt_token_ids: tuple[int, ...]
    completion_token_ids: tuple[int, ...]


class ReferenceModel(BackendModel):
    """Batches are ``TokenSequence``s; results, per sequence, log pi_ref of
    each completion token (float64 in-process, float32 values from Triton)."""

    KIND = REFERENCE

    @classmethod
    def load(
        cls, model_dir: str | Path, version: str | None = None, base_dir: str | Path | None = None,
        max_tokens: int | None = None, backends: Backends | None = None,
    ) -> ReferenceModel:
        """``model_dir``: a checkpoint or LoRA adapter directory, or with
        Triton a version directory REPO/NAME/N of an exported repository.
        Validated before it is returned (probe log-probs must be finite)."""
        return cls.open(model_dir, backends, version=version, base_dir=base_dir, max_tokens=max_tokens)

    def validate(self) -> None:
        """Refuse a version whose log-probs fail or are not finite (a diverged
        training step, NaN weights, a remote model that answers wrongly)."""
        ids = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            ids = [0, *ids] if ids else [0, 0]
        try:
            [logprobs] = self.forward([TokenSequence(tuple(ids[:1]), tuple(ids[1:]))])
        except Exception as err:
            raise ModelLoadError(f"probe forward pass failed: {err}") from err
        bad = sum(not math.isfinite(x) for x in logprobs)
        if bad:
            raise ModelLoadError(
                f"probe forward pass gave {bad} non-finite log-probs of {len(logprobs)}: the weights are broken "
                "(NaN/inf); nothing was swapped"
            )

    def check(self, sequence: TokenSequence, field: str) -> None:
        """``field`` names the sequence, e.g. ``sequences[2]``."""
        prompt, completion = sequence.prompt_token_ids, sequence.completion_token_ids
        if not prompt:
            raise InvalidInput(
                f"{field}.prompt_token_ids",
                "is empty; the first completion token needs context (send at least a BOS token)",
            )
        if not completion:
            raise InvalidInput(f"{field}.completion_token_ids", "is empty; there is nothing to score")
        self.check_length(len(prompt) + len(completion), field)
        vocab = self.info.vocab_size
        check_token_ids(prompt, vocab, f"{field}.prompt_token_ids")
        check_token_ids(completion, vocab, f"{field}.completion_token_ids")

    def check_length(self, total: int, field: str) -> None:
        """A sequence's prompt + completion length; a service checks it before copying the ids."""
        if total > self.info.max_tokens:
            raise InvalidInput(
                field, f"is {total} tokens (prompt + completion), over the model's max of {self.info.max_tokens}"
            )

    def to_backend(self, batch: Sequence[TokenSequence]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        return [(s.prompt_token_ids, s.completion_token_ids) for s in batch]

    def logprobs(self, batch: Sequence[TokenSequence]) -> list[list[float]]:
        """Per item, log pi_ref(completion token | prefix) for each completion token (blocking)."""
        return self.forward(batch)
