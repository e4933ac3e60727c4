"""One loaded reward-model version: rendering, tokenization and the forward pass.

Any Hugging Face directory with ``AutoModelForSequenceClassification`` and one
label loads here (the format TRL's RewardTrainer writes). The score of a
sequence is that model's own pooled logit (HF pools at the last non-pad token).
The forward pass runs in a backend (``arbiter.backends``, kind ``arbiter.reward.backend.REWARD``): in this
process, or in Triton; everything else here is the same for both.

A version is scored on the text it was trained on, which its *text
convention* describes (``TextConvention``, ``resolve_text_convention``): with
``append_eos``, the tokenizer's end token follows every plain-text input, as
TRL's RewardTrainer (>= 0.24) trains; conversations are rendered by the chat
template alone either way.
"""

from __future__ import annotations

import logging
import math
import pickletools
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from arbiter.backends import Backend, Backends
from arbiter.backends.model import BackendModel
from arbiter.backends.triton import checkpoint_dir
from arbiter.errors import InvalidInput, ModelLoadError
from arbiter.hf import METADATA_FILE, read_metadata
from arbiter.reward.backend import REWARD
from arbiter.types import ChatMessage, ModelInfo, RewardInput, Truncation

log = logging.getLogger(__name__)

_PROBE = RewardInput(prompt="Hello.", response=" Hi, how can I help?")


@dataclass(frozen=True)
class EncodedInput:
    token_ids: list[int]
    truncated: bool


# -- the text convention ----------------------------------------------------------

# ``--text-convention``: "auto" lets each version decide (resolve_text_convention).
TEXT_CONVENTIONS = ("auto", "append_eos", "plain")
# TRL's RewardTrainer appends the end token to plain-text pairs since 0.24
# (its RewardTrainer refactor, huggingface/trl#4093); earlier ones left texts as given.
_TRL_EOS_SINCE = (0, 24)
_CHECKPOINT_SUBDIR = re.compile(r"^checkpoint-\d+$")
# A TrainingArguments pickle is a few KB; anything far larger is not one.
_MAX_PICKLE_BYTES = 1 << 20


@dataclass(frozen=True)
class TextConvention:
    """How a version's plain-text inputs become the text its tokenizer reads.

    ``append_eos``: ``prompt + response`` is followed by the tokenizer's end
    token (``eos_token``) unless the response already ends with it, and is
    tokenized with the tokenizer's special tokens: exactly the text TRL's
    RewardTrainer trains on. Off: ``prompt + response`` as given.
    Conversations get nothing added either way: the chat template ends them,
    and TRL adds no end token to conversational data. ``source`` says what
    decided it (logs only; arbiter.json keeps ``to_json()``)."""

    append_eos: bool = False
    source: str = "default"

    def to_json(self) -> dict[str, Any]:
        return {"append_eos": self.append_eos}

    @classmethod
    def from_json(cls, value: Any, where: str) -> TextConvention:
        """arbiter.json's ``text_convention``. Unknown keys are refused: a
        convention this Arbiter does not understand must not be half-applied."""
        if not isinstance(value, dict) or not isinstance(value.get("append_eos"), bool) or set(value) != {"append_eos"}:
            raise ModelLoadError(
                f"{where}: text_convention must be {{\"append_eos\": true}} or {{\"append_eos\": false}}, got "
                f"{value!r}"
            )
        return cls(value["append_eos"], "arbiter.json")

    def describe(self, tokenizer) -> str:
        if self.append_eos:
            return f"plain text + end token {tokenizer.eos_token!r} (from {self.source})"
        return f"plain text as given, no end token (from {self.source})"


def resolve_text_convention(root: str | Path, tokenizer, choice: str = "auto") -> TextConvention:
    """The convention of the checkpoint at ``root``, from the first that says:

    1. its arbiter.json ``text_convention`` (Arbiter's RM trainer writes it);
    2. ``choice``, unless "auto" (``--text-convention``: for checkpoints that
       do not say, e.g. TRL weights copied without TRL's files);
    3. a TRL RewardTrainer checkpoint (``trl_reward_checkpoint``): append_eos
       when that TRL appended the end token (0.24 and later);
    4. plain (no end token).
    """
    root = Path(root)
    declared = (read_metadata(root).extra or {}).get("text_convention")
    if declared is not None:
        convention = TextConvention.from_json(declared, str(root / METADATA_FILE))
    elif choice != "auto":
        if choice not in TEXT_CONVENTIONS:
            raise ValueError(f"text convention must be one of {', '.join(TEXT_CONVENTIONS)}, got {choice!r}")
        convention = TextConvention(choice == "append_eos", f"--text-convention {choice}")
    elif (trl := trl_reward_checkpoint(root)) is not None:
        convention = TextConvention(*trl)
    else:
        convention = TextConvention()
    if convention.append_eos and tokenizer.eos_token is None:
        raise ModelLoadError(
            f"{str(root)!r}: the text convention ({convention.source}) appends the end token, but the tokenizer "
            "has no eos_token"
        )
    return convention


def trl_reward_checkpoint(root: str | Path) -> tuple[bool, str] | None:
    """Whether ``root`` was written by TRL's RewardTrainer: (whether that TRL
    appended the end token, the evidence), or None. Two marks, either enough:

    - ``training_args.bin`` (``torch.save`` of the trainer's arguments, in
      every ``save_model`` output and ``checkpoint-N``) names the class
      ``RewardConfig`` of a ``trl`` module; an ``eos_token`` field in it (added
      in 0.24 with the end-token append) dates it. Its pickle opcodes are
      read, never executed.
    - the model card TRL writes to its output directory (so the parent of a
      ``checkpoint-N``): ``README.md`` tagged ``trl`` and ``reward-trainer``,
      dated by its "- TRL: X.Y.Z" line (undated: current TRL, which appends).
    """
    root = Path(root)
    args = _trl_training_args(root / "training_args.bin")
    if args is not None:
        return args, "training_args.bin is TRL's RewardConfig" + ("" if args else " from before TRL 0.24")
    for directory in (root, root.parent) if _CHECKPOINT_SUBDIR.match(root.name) else (root,):
        card = _trl_model_card(directory / "README.md")
        if card is not None:
            version, appends = card
            return appends, f"{directory / 'README.md'} is TRL's RewardTrainer model card (TRL {version or '?'})"
    return None


def _trl_training_args(path: Path) -> bool | None:
    """For a TRL RewardConfig pickle: whether it has the eos_token field; else None."""
    try:
        if not path.is_file() or not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            [member] = [m for m in archive.infolist() if m.filename.endswith("data.pkl")] or [None]
            if member is None or member.file_size > _MAX_PICKLE_BYTES:
                return None
            data = archive.read(member)
        strings: list[str] = []
        classes: set[tuple[str, str]] = set()
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                classes.add((module, name))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                classes.add((strings[-2], strings[-1]))
            elif isinstance(arg, str):
                strings.append(arg)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        log.debug("%s is not a readable training_args.bin: %s", path, err)
        return None
    if not any(module.split(".")[0] == "trl" and name == "RewardConfig" for module, name in classes):
        return None
    return "eos_token" in strings


def _trl_model_card(path: Path) -> tuple[str | None, bool] | None:
    """For TRL's RewardTrainer model card: (TRL version or None, whether it appends); else None."""
    import yaml

    try:
        text = path.read_text(errors="replace")[: 1 << 16] if path.is_file() else ""
    except OSError:
        return None
    match = re.match(r"---\n(.*?)\n---", text, re.S)
    try:
        front = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return None
    tags = front.get("tags") if isinstance(front, dict) else None
    if not isinstance(tags, list) or not {"trl", "reward-trainer"} <= set(map(str, tags)):
        return None
    dated = re.search(r"^- TRL: (\d+)\.(\d+)\S*", text, re.M)
    if dated is None:
        return None, True
    return dated.group(0)[len("- TRL: "):], (int(dated.group(1)), int(dated.group(2))) >= _TRL_EOS_SINCE


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

    @classmethod
    def load(
        cls, model_dir: str | Path, version: str | None = None, max_tokens: int | None = None,
        backends: Backends | None = None, text_convention: str = "auto",
    ) -> RewardModel:
        """``model_dir``: a checkpoint directory, or with Triton a version
        directory REPO/NAME/N of an exported repository. Validated before
        it is returned (a probe score must be finite). ``text_convention``:
        one of TEXT_CONVENTIONS, for a checkpoint that does not say."""
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
            _check_conversation(item.messages, f"inputs[{index}].conversation")
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise InvalidInput(
                    f"inputs[{index}].conversation",
                    f"model {self.info.name!r} has no chat template; send plain text instead",
                )
            messages = [{"role": m.role, "content": m.content} for m in item.messages]
            return self.tokenizer.apply_chat_template(messages, tokenize=False), False
        if not item.response.strip():
            raise InvalidInput(f"inputs[{index}].text.response", "is empty; there is nothing to score")
        text = item.prompt + item.response
        eos = self.tokenizer.eos_token
        if self.text_convention.append_eos and not item.response.endswith(eos):
            text += eos
        return text, True

    def encode(self, items: Sequence[RewardInput], truncation: Truncation) -> list[EncodedInput]:
        """Token ids per item. Lengths count every token the model reads,
        the convention's end token included; truncation keeps that end token
        (the model reads the score there), cutting the text before it."""
        rendered = [self.render(item, i) for i, item in enumerate(items)]
        encoded = []
        limit = self.info.max_tokens
        for i, (text, add_special) in enumerate(rendered):
            ids = self.tokenizer(text, add_special_tokens=add_special)["input_ids"]
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




def _check_conversation(messages: Sequence[ChatMessage], field: str) -> None:
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
