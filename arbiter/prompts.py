"""Prompts as files hold them: one JSON object a line (blank lines ignored)::

    {"id": "p1", "prompt": "Write a haiku about the sea."}
    {"messages": [{"role": "user", "content": "How was the movie?"}]}
    {"prompt": [{"role": "user", "content": "How was the movie?"}]}

``prompt`` is plain text or, as in TRL's conversational datasets, a chat;
``messages`` is a chat. A chat is rendered by each model with its own
template and must not end with an assistant turn: the completion becomes it.
``id`` is optional: without it the id is a hash of the content, so the same
prompt keeps its id across files, runs and workers.

Every error is a ``JsonlError`` (``FILE:LINE: field: message``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from arbiter.jsonl import JsonlError, read_jsonl
from arbiter.types import ChatMessage, Prompt, RewardInput

# Longer ids would only bloat every Rollout's record key.
MAX_ID_CHARS = 256
KEYS = ("id", "prompt", "messages")


def content_id(text: str = "", messages: Sequence[ChatMessage] | None = None) -> str:
    """Stable id of a prompt's content: equal content, equal id, on any machine."""
    if messages is None:
        canonical: Any = {"prompt": text}
    else:
        canonical = {"messages": [[m.role, m.content] for m in messages]}
    blob = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    return "p-" + hashlib.sha256(blob).hexdigest()[:24]


def _prompt_id(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise JsonlError(where, "id", f"must be a non-empty string, got {value!r}")
    if len(value) > MAX_ID_CHARS:
        raise JsonlError(where, "id", f"is {len(value)} characters; at most {MAX_ID_CHARS}")
    return value


def _chat(raw: list, field: str, where: str) -> tuple[ChatMessage, ...]:
    if not raw:
        raise JsonlError(where, field, "must be a non-empty list of {'role': str, 'content': str}")
    messages = []
    for j, m in enumerate(raw):
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise JsonlError(where, f"{field}[{j}]", f"must be {{'role': str, 'content': str}}, got {m!r}")
        if not m["role"].strip() or not m["content"].strip():
            raise JsonlError(where, f"{field}[{j}]", "has an empty role or content")
        messages.append(ChatMessage(m["role"], m["content"]))
    if messages[-1].role == "assistant":
        # The completion becomes the assistant turn; a trailing one would be answered twice.
        raise JsonlError(where, f"{field}[{len(messages) - 1}]", "is an assistant turn; end with the turn to answer")
    return tuple(messages)


def prompt_from_row(row: Mapping[str, Any], where: str, *, other_keys: bool = False) -> Prompt:
    """One row -> Prompt (with its id). ``other_keys``: ignore keys besides
    ``KEYS`` (prompts taken out of another dataset's rows) instead of refusing
    them as typos."""
    if not isinstance(row, Mapping):
        raise JsonlError(where, "row", f"must be a JSON object, got {type(row).__name__}")
    unknown = sorted(set(row) - set(KEYS))
    if unknown and not other_keys:
        raise JsonlError(where, "row", f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: 'id', 'prompt', "
                                       "'messages'")
    if ("prompt" in row) == ("messages" in row):
        raise JsonlError(where, "row", "needs exactly one of 'prompt' (a string or a chat) or 'messages' (a chat)")
    if "messages" in row:
        value, field = row["messages"], "messages"
        if not isinstance(value, list):
            raise JsonlError(where, field, "must be a non-empty list of {'role': str, 'content': str}")
    else:
        value, field = row["prompt"], "prompt"
        if not (isinstance(value, list) or (isinstance(value, str) and value.strip())):
            raise JsonlError(where, field, f"must be a non-empty string or a list of chat messages, got {value!r}")
    if isinstance(value, str):
        text, messages, fallback_id = value, None, content_id(text=value)
    else:
        messages = _chat(value, field, where)
        text, fallback_id = "", content_id(messages=messages)
    prompt_id = _prompt_id(row["id"], where) if "id" in row else fallback_id
    return Prompt(text=text, messages=messages, id=prompt_id)


def read_prompts(path: str | os.PathLike, *, other_keys: bool = False) -> list[Prompt]:
    """Every prompt of a JSON-lines file, validated up front (a bad row stops
    a run before anything is generated). One id for two different prompts is
    refused; the same prompt twice is fine."""
    prompts: list[Prompt] = []
    first_use: dict[str, tuple[str, Prompt]] = {}
    for row in read_jsonl(path):
        prompt = prompt_from_row(row.value, row.where, other_keys=other_keys)
        where, first = first_use.setdefault(prompt.id, (row.where, prompt))
        if first != prompt:
            raise JsonlError(row.where, "id", f"{prompt.id!r} is already used by {where} for another prompt")
        prompts.append(prompt)
    if not prompts:
        raise JsonlError(str(path), "file", "holds no prompts")
    return prompts


def as_prompts(values: Iterable[Prompt | str | Mapping[str, Any]]) -> list[Prompt]:
    """Prompts as they are; strings and rows read as a file's rows would be."""
    prompts = []
    for i, value in enumerate(values):
        if isinstance(value, Prompt):
            prompts.append(value)
        else:
            row = {"prompt": value} if isinstance(value, str) else value
            prompts.append(prompt_from_row(row, f"prompts[{i}]"))
    return prompts


def display_text(prompt: Prompt) -> str:
    """The prompt as one string: the text itself, or for a chat the JSON list
    of {"role", "content"} messages (lossless; the rendered form depends on a
    model's template)."""
    if prompt.messages is None:
        return prompt.text
    return json.dumps([{"role": m.role, "content": m.content} for m in prompt.messages], ensure_ascii=False)


def reward_input_for(prompt: Prompt, completion: str) -> RewardInput:
    """A completion of ``prompt`` as a reward model scores it (with its own
    template): a text prompt as (prompt, response) appended verbatim, a chat as
    the conversation with the completion as the assistant turn."""
    if prompt.messages is None:
        return RewardInput(prompt=prompt.text, response=completion)
    return RewardInput(messages=(*prompt.messages, ChatMessage("assistant", completion)))
