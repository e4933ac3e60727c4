"""Reward-model training data: JSONL in TRL's preference formats, and K-wise rankings.

One JSON object per line (blank lines are skipped); extra keys are ignored.

Pairs (TRL's preference format, TRL's field names):
- plain, explicit prompt: ``{"prompt": str, "chosen": str, "rejected": str}``;
  each response is appended to the prompt verbatim (as the reward service does).
- plain, implicit prompt: ``{"chosen": str, "rejected": str}`` (whole texts).
- chat, explicit prompt: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``;
  a response may also be a plain string, read as one assistant message.
- chat, implicit prompt: ``{"chosen": [messages], "rejected": [messages]}``
  (whole conversations, each ending with the assistant turn being judged).
- optional ``"margin": number``: how far apart the pair should be scored
  (the margin of the Bradley-Terry loss).

K-wise rankings: ``{"prompt": str | [messages], "responses": [K >= 2 responses],
"ranking": [indices into responses, best first]}`` (a permutation of 0..K-1).

Chat data is rendered by the reward model's own chat template, exactly as the
reward service renders a ``conversation`` input: the same code
(``arbiter.reward.model.RewardModel.encode``) turns examples into token ids here
and there, so a trained version scores served inputs as it saw them in training.

Malformed rows are errors naming FILE:LINE and the field (``arbiter.jsonl``'s
format); none is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arbiter.errors import ArbiterError, InvalidInput
from arbiter.jsonl import JsonlError, read_jsonl
from arbiter.types import ChatMessage, ModelInfo, RewardInput, Truncation

# Rows listed in one DatasetError; the count of the rest is still reported.
MAX_LISTED_ERRORS = 20


class DataError(JsonlError, InvalidInput):
    """One malformed row or candidate: ``arbiter.jsonl``'s row error (``where``
    is FILE:LINE, or topic[partition]@offset for a preference from Kafka),
    and an invalid input to the reward model's encoder."""

    def __init__(self, where: str, field: str, message: str):
        JsonlError.__init__(self, where, field, message)


class TooLong(DataError):
    """A candidate has more tokens than the model's window, and the
    truncation setting is ``reject``."""


class DatasetError(ArbiterError):
    """Every malformed row of a load (the first ``MAX_LISTED_ERRORS`` listed):
    DataErrors, and the reader's JsonlErrors for lines that are no JSON object."""

    def __init__(self, errors: Sequence[JsonlError], total: int | None = None):
        self.errors = list(errors)
        total = len(self.errors) if total is None else total
        listed = "\n".join(f"  {err}" for err in self.errors[:MAX_LISTED_ERRORS])
        more = f"\n  ... and {total - MAX_LISTED_ERRORS} more" if total > MAX_LISTED_ERRORS else ""
        super().__init__(f"{total} malformed row(s); nothing was trained:\n{listed}{more}")
        self.total = total


@dataclass(frozen=True)
class RankedExample:
    """One labelled example: K >= 2 candidate inputs, best first.

    A pair is K = 2 (chosen, rejected). ``fields`` names each candidate as the
    source row does (``chosen``, ``responses[2]``) for error messages.
    """

    candidates: tuple[RewardInput, ...]
    fields: tuple[str, ...]
    source: str
    margin: float | None = None
    # Idempotency key (a preference id); duplicates are trained on once.
    id: str = ""

    @property
    def k(self) -> int:
        return len(self.candidates)


# -- rows --------------------------------------------------------------------


def _messages(value: Any, field: str, where: str) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(where, field, "must be a non-empty list of {\"role\", \"content\"} messages")
    out = []
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(where, f"{field}[{j}]", f"must be an object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role.strip():
            raise DataError(where, f"{field}[{j}].role", "must be a non-empty string")
        if not isinstance(content, str) or not content.strip():
            raise DataError(where, f"{field}[{j}].content", "must be a non-empty string")
        out.append(ChatMessage(role, content))
    return tuple(out)


def _response(value: Any, field: str, where: str, prompt: Any) -> RewardInput:
    """One candidate from a response and the row's prompt (str, messages or None)."""
    if isinstance(prompt, list):  # explicit chat prompt: the response continues it
        prefix = _messages(prompt, "prompt", where)
        if isinstance(value, str):
            if not value.strip():
                raise DataError(where, field, "is empty; there is nothing to judge")
            turn = (ChatMessage("assistant", value),)
        else:
            turn = _messages(value, field, where)
        conversation = prefix + turn
    elif prompt is None and isinstance(value, list):  # implicit chat prompt: a whole conversation
        conversation = _messages(value, field, where)
    else:
        if not isinstance(value, str):
            kind = "a string" if prompt is None else "a string, like the plain-text prompt"
            raise DataError(where, field, f"must be {kind} (or use chat messages for both), got {type(value).__name__}")
        if not value.strip():
            raise DataError(where, field, "is empty; there is nothing to judge")
        return RewardInput(prompt=prompt or "", response=value)
    if conversation[-1].role != "assistant":
        raise DataError(
            where, field, f"ends with a {conversation[-1].role!r} message; the last message must be the "
            "assistant response being judged",
        )
    return RewardInput(messages=conversation)


def _distinct(candidates: Sequence[RewardInput], fields: Sequence[str], where: str) -> None:
    seen: dict[RewardInput, str] = {}
    for candidate, field in zip(candidates, fields):
        if candidate in seen:
            raise DataError(where, field, f"is identical to {seen[candidate]}: a preference needs different responses")
        seen[candidate] = field


def parse_row(row: Any, where: str) -> RankedExample:
    """One JSONL object -> a RankedExample; DataError names the field."""
    if not isinstance(row, dict):
        raise DataError(where, "row", f"must be a JSON object, got {type(row).__name__}")
    prompt = row.get("prompt")
    if "prompt" in row and not isinstance(prompt, str | list):
        raise DataError(where, "prompt", f"must be a string or a list of chat messages, got {type(prompt).__name__}")
    row_id = row.get("id", "")
    if not isinstance(row_id, str | int):
        raise DataError(where, "id", "must be a string or an integer")
    row_id = str(row_id)
    ranked = "responses" in row or "ranking" in row
    paired = "chosen" in row or "rejected" in row
    if ranked and paired:
        raise DataError(where, "row", "has both chosen/rejected and responses/ranking; use one format")
    if paired:
        for name in ("chosen", "rejected"):
            if name not in row:
                raise DataError(where, name, "is missing (a pair needs both chosen and rejected)")
        fields = ("chosen", "rejected")
        candidates = tuple(_response(row[name], name, where, prompt) for name in fields)
        margin = row.get("margin")
        if margin is not None and (
            not isinstance(margin, int | float) or isinstance(margin, bool) or not math.isfinite(margin)
        ):
            raise DataError(where, "margin", f"must be a finite number, got {margin!r}")
        _distinct(candidates, fields, where)
        return RankedExample(candidates, fields, where, None if margin is None else float(margin), row_id)
    if ranked:
        if "prompt" not in row:
            raise DataError(where, "prompt", "is missing (a ranking needs the prompt its responses answer)")
        for name in ("responses", "ranking"):
            if name not in row:
                raise DataError(where, name, "is missing (a ranking needs both responses and ranking)")
        responses, ranking = row["responses"], row["ranking"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise DataError(where, "responses", "must be a list of at least 2 responses")
        if (
            not isinstance(ranking, list)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
            or sorted(ranking) != list(range(len(responses)))
        ):
            raise DataError(
                where, "ranking",
                f"must be a permutation of 0..{len(responses) - 1} (indices into responses, best first), "
                f"got {ranking!r}",
            )
        if "margin" in row:
            raise DataError(where, "margin", "applies to pairs only, not to rankings")
        fields = tuple(f"responses[{i}]" for i in ranking)
        candidates = tuple(_response(responses[i], f"responses[{i}]", where, prompt) for i in ranking)
        _distinct(candidates, fields, where)
        return RankedExample(candidates, fields, where, None, row_id)
    raise DataError(
        where, "row",
        "needs chosen and rejected (a preference pair) or responses and ranking (a K-wise ranking)",
    )


def load_jsonl(paths: str | Path | Sequence[str | Path]) -> list[RankedExample]:
    """Every example of the files (read by ``arbiter.jsonl``), in order;
    DatasetError lists every bad row, in file and line order."""
    if isinstance(paths, str | Path):
        paths = [paths]
    examples: list[RankedExample] = []
    errors: list[JsonlError] = []
    for path in paths:
        try:
            for row in read_jsonl(path, errors):
                try:
                    examples.append(parse_row(row.value, row.where))
                except DataError as err:
                    errors.append(err)
        except JsonlError as err:  # the file itself cannot be read
            raise DatasetError([err]) from None
    if errors:
        raise DatasetError(errors)
    return examples


def dedupe(examples: Iterable[RankedExample]) -> list[RankedExample]:
    """Examples with an id are kept once (the first); the rest all stay."""
    seen: set[str] = set()
    out = []
    for example in examples:
        if example.id:
            if example.id in seen:
                continue
            seen.add(example.id)
        out.append(example)
    return out


# -- tokenization ------------------------------------------------------------


class ServiceEncoder:
    """Token ids of examples, rendered and truncated by the reward service's own
    code under the version's text convention (``arbiter.reward.convention.TextConvention``),
    so training sees exactly the ids the service will score."""

    def __init__(self, tokenizer, name: str, max_tokens: int, truncation: Truncation, text_convention=None):
        from arbiter.reward.convention import TextConvention
        from arbiter.reward.model import RewardModel

        info = ModelInfo(
            kind="reward", name=name, version="training", tokenizer_fingerprint="", max_tokens=max_tokens,
            vocab_size=len(tokenizer), source_path="",
        )
        # No backend: only rendering and tokenization are used.
        self._model = RewardModel(None, tokenizer, info, text_convention=text_convention or TextConvention())
        self.truncation = truncation
        self.max_tokens = max_tokens

    def encode(self, example: RankedExample) -> tuple[list[list[int]], int]:
        """(token ids per candidate, how many were truncated); TooLong when
        only the length (with truncation ``reject``) stops it."""
        try:
            encoded = self._model.encode(example.candidates, self.truncation)
        except InvalidInput as err:
            # The service names items inputs[i]; name the row's field instead.
            field = err.field
            for i, name in enumerate(example.fields):
                prefix = f"inputs[{i}]"
                if field == prefix or field.startswith(prefix + "."):
                    field = name + field[len(prefix):]
                    break
            message = str(err).split(": ", 1)[1] if ": " in str(err) else str(err)
            raise (TooLong if self._only_too_long(example) else DataError)(example.source, field, message) from None
        return [e.token_ids for e in encoded], sum(e.truncated for e in encoded)

    def _only_too_long(self, example: RankedExample) -> bool:
        """Whether the example encodes once truncation is allowed (the service
        says "too long" only in its message; this asks the encoder instead)."""
        if self.truncation is not Truncation.REJECT:
            return False
        try:
            self._model.encode(example.candidates, Truncation.RIGHT)
        except InvalidInput:
            return False
        return True

    def encode_all(self, examples: Sequence[RankedExample]) -> tuple[list[list[list[int]]], int]:
        """Token ids of every example, and the number of truncated candidates;
        DatasetError lists every example that cannot be encoded."""
        out, errors, truncated = [], [], 0
        for example in examples:
            try:
                ids, cut = self.encode(example)
            except DataError as err:
                errors.append(err)
                continue
            out.append(ids)
            truncated += cut
        if errors:
            raise DatasetError(errors)
        return out, truncated
