"""The text convention of a reward-model version: how its plain-text inputs
become the text its tokenizer reads, so that it is scored on exactly the kind
of text it was trained on.

TRL's RewardTrainer (0.24 and later) appends the tokenizer's end token to
every plain-text chosen/rejected text; Arbiter's own RM trainer does the same
by default and records what it did in the version's ``arbiter.json``
(``"text_convention": {"append_eos": true}``). For a checkpoint that does not
say, TRL's own output files identify a TRL-trained one, or the server's
``--text-convention`` decides.
"""

from __future__ import annotations

import logging
import pickletools
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arbiter.errors import ModelLoadError
from arbiter.hf import METADATA_FILE, read_metadata

log = logging.getLogger(__name__)

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
