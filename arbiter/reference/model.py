"""One loaded reference-model version: teacher-forced log-probabilities of
completion tokens, batched with right padding.

These are the model's own distribution (temperature 1, no top-k/top-p): the
reference is what the policy is regularised towards, not a sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from arbiter.errors import InvalidInput
from arbiter.lm import LoadedLM, check_token_ids, completion_logits, load_causal_lm, token_logprobs
from arbiter.types import ModelInfo


@dataclass(frozen=True)
class TokenSequence:
    prompt_token_ids: tuple[int, ...]
    completion_token_ids: tuple[int, ...]


class ReferenceModel:
    def __init__(self, lm: LoadedLM):
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.info: ModelInfo = lm.info
        self.pad_id = int(self.model.config.pad_token_id)

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        version: str | None = None,
        base_dir: str | Path | None = None,
        max_tokens: int | None = None,
    ) -> ReferenceModel:
        return cls(
            load_causal_lm(model_dir, kind="reference", version=version, base_dir=base_dir, max_tokens=max_tokens)
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
        vocab = self.info.vocab_size
        check_token_ids(prompt, vocab, f"{field}.prompt_token_ids")
        check_token_ids(completion, vocab, f"{field}.completion_token_ids")
        total = len(prompt) + len(completion)
        if total > self.info.max_tokens:
            raise InvalidInput(
                field, f"is {total} tokens (prompt + completion), over the model's max of {self.info.max_tokens}"
            )

    def logprobs(self, batch: Sequence[TokenSequence]) -> list[list[float]]:
        """Per item, log pi_ref(completion token | prefix) for each completion token (float64)."""
        import torch

        pairs = [(s.prompt_token_ids, s.completion_token_ids) for s in batch]
        with torch.inference_mode():
            logits = completion_logits(self.model, self.pad_id, pairs)
            return [
                token_logprobs(torch.log_softmax(item.double(), dim=-1), completion)
                for item, (_, completion) in zip(logits, pairs, strict=True)
            ]
