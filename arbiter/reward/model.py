"""One loaded reward-model version: rendering, tokenization and the forward pass.

Any Hugging Face directory with ``AutoModelForSequenceClassification`` and one
label loads here (the format TRL's RewardTrainer writes). The score of a
sequence is that model's own pooled logit (HF pools at the last non-pad token).
The forward pass runs in a backend (``arbiter.backends``, kind ``arbiter.reward.backend.REWARD``): in this
process, or in Triton; everything else here is the same for both.

A version is scored on the text it was trained on, as its text convention
says (``arbiter.reward.convention``): with ``append_eos``, the tokenizer's end
token follows every plain-text input, as TRL's RewardTrainer (>= 0.24) trains.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from arbiter.backends import Backend, Backends
from arbiter.backends.model import BackendModel
from arbiter.backends.triton import checkpoint_dir
from arbiter.chat import render_chat
from arbiter.errors import InvalidInput, ModelLoadError
from arbiter.hf import read_metadata
from arbiter.reward.backend import REWARD
from arbiter.reward.convention import TextConvention, resolve_text_convention
from arbiter.types import ChatMessage, ModelInfo, RewardInput, Truncation

log = logging.getLogger(__name__)

_PROBE = RewardInput(prompt="Hello.", response=" Hi, how can I help?")


@dataclass(frozen=True)
class EncodedInput:
    token_ids: list[int]
    truncated: bool


class RewardModel(BackendModel):
    KIND = REWARD

    def __init__(
        self, backend: Backend | None, tokenizer, info: ModelInfo, calibration_scores: list[float] | None = None,
        text_convention: TextConvention = TextConvention(),
    ):
        super().__init__(backend, tokenizer, info)
        # Raw scores on the version's calibration set, shipped in arbiter.json:
        # the drift monitor's reference when present.
        self.calibration_scores = calibration_scores
        self.text_convention = text_convention
        # Read once: the tokenizer's special-token properties cost a few us per access.
        self._eos = tokenizer.eos_token if tokenizer is not None else None
        # The Rust tokenizer behind a fast Hugging Face one, called directly
        # when nothing the wrapper would change is set (``_token_ids``): the
        # wrapper's bookkeeping costs more than the tokenizing of a short item.
        backend = getattr(tokenizer, "_tokenizer", None)
        self._rust = backend if type(backend).__module__.startswith("tokenizers") and hasattr(backend, "encode") else None

    @classmethod
    def load(
        cls, model_dir: str | Path, version: str | None = None, max_tokens: int | None = None,
        backends: Backends | None = None, text_convention: str = "auto",
    ) -> RewardModel:
        """``model_dir``: a checkpoint directory, or with Triton a version
        directory REPO/NAME/N of an exported repository. Validated before
        it is returned (a probe score must be finite). ``text_convention``:
        one of ``arbiter.reward.convention.TEXT_CONVENTIONS``, for a checkpoint
        that does not say."""
        return cls.open(model_dir, backends, version=version, max_tokens=max_tokens, text_convention=text_convention)

    @classmethod
    def from_backend(cls, backend: Backend, model_dir: str | Path, text_convention: str = "auto") -> RewardModel:
        root = checkpoint_dir(model_dir)
        calibration = (read_metadata(root).extra or {}).get("calibration_scores")
        if calibration is not None and not (
            isinstance(calibration, list) and all(isinstance(x, int | float) for x in calibration)
        ):
            raise ModelLoadError(f"{str(model_dir)!r}: arbiter.json calibration_scores must be a list of numbers")
        convention = resolve_text_convention(root, backend.tokenizer, text_convention)
        log.info("reward version %r scores %s", backend.info.version, convention.describe(backend.tokenizer))
        return cls(backend, backend.tokenizer, backend.info, calibration, convention)

    def with_info(self, **changes) -> RewardModel:
        return RewardModel(self.backend, self.tokenizer, replace(self.info, **changes), self.calibration_scores,
                           self.text_convention)

    def validate(self) -> None:
        """Refuse a version whose forward pass fails or is not finite."""
        try:
            [score] = self.forward([self.encode([_PROBE], Truncation.LEFT)[0].token_ids])
        except Exception as err:
            raise ModelLoadError(f"probe forward pass failed: {err}") from err
        if not math.isfinite(score):
            raise ModelLoadError(f"probe forward pass gave a non-finite score ({score})")

    # -- input handling -------------------------------------------------

    def render(self, item: RewardInput, index: int) -> tuple[str, bool]:
        """Text to tokenize, and whether special tokens still need adding
        (a chat template already inserts its own). Plain text follows the
        version's text convention: with append_eos, TRL's own rule (the end
        token after the response unless the response already ends with it)."""
        if item.messages is not None:
            field = f"inputs[{index}].conversation"
            check_conversation(item.messages, field)
            return render_chat(self.tokenizer, self.info.name, item.messages, field), False
        if not item.response.strip():
            raise InvalidInput(f"inputs[{index}].text.response", "is empty; there is nothing to score")
        text = item.prompt + item.response
        if self.text_convention.append_eos and not item.response.endswith(self._eos):
            text += self._eos
        return text, True

    def _token_ids(self, text: str, add_special: bool) -> list[int]:
        """``tokenizer(text, add_special_tokens=add_special)["input_ids"]``;
        straight from the Rust tokenizer while it truncates and pads nothing
        and splits special tokens as the wrapper would (what the wrapper
        sets before every call), else through the wrapper."""
        rust = self._rust
        if (rust is not None and rust.truncation is None and rust.padding is None
                and rust.encode_special_tokens == bool(getattr(self.tokenizer, "split_special_tokens", False))):
            return rust.encode(text, add_special_tokens=add_special).ids
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"]

    def encode(self, items: Sequence[RewardInput], truncation: Truncation) -> list[EncodedInput]:
        """Token ids per item. Lengths count every token the model reads,
        the convention's end token included; truncation keeps that end token
        (the model reads the score there), cutting the text before it."""
        rendered = [self.render(item, i) for i, item in enumerate(items)]
        encoded = []
        limit = self.info.max_tokens
        for i, (text, add_special) in enumerate(rendered):
            ids = self._token_ids(text, add_special)
            if not ids:
                raise InvalidInput(f"inputs[{i}]", "tokenizes to zero tokens")
            truncated = len(ids) > limit
            if truncated:
                if truncation is Truncation.REJECT:
                    raise InvalidInput(
                        f"inputs[{i}]",
                        f"is {len(ids)} tokens, over the model's max of {limit}; shorten it or set "
                        "options.truncation to TRUNCATION_LEFT (keeps the end) or TRUNCATION_RIGHT",
                    )
                if truncation is Truncation.LEFT:
                    ids = ids[-limit:]
                elif self._ends_with_convention_eos(items[i], ids):
                    ids = ids[: limit - 1] + ids[-1:]
                else:
                    ids = ids[:limit]
            encoded.append(EncodedInput(ids, truncated))
        return encoded

    def _ends_with_convention_eos(self, item: RewardInput, ids: list[int]) -> bool:
        return self.text_convention.append_eos and item.messages is None and ids[-1] == self.tokenizer.eos_token_id

    # -- model ----------------------------------------------------------




def check_conversation(messages: Sequence[ChatMessage], field: str) -> None:
    if not messages:
        raise InvalidInput(field, "has no messages")
    for j, message in enumerate(messages):
        if not message.role.strip():
            raise InvalidInput(f"{field}.messages[{j}].role", "is empty")
        if not message.content.strip():
            raise InvalidInput(f"{field}.messages[{j}].content", "is empty")
    if messages[-1].role != "assistant":
        raise InvalidInput(
            f"{field}.messages[{len(messages) - 1}].role",
            f"is {messages[-1].role!r}; the last message must be the assistant response being scored",
        )
