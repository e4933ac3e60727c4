"""Prompts for rollout workers: a JSON-lines file, or ``PromptRecord`` payloads
from the prompts topic. Both become ``PromptItem``.

File format, one JSON object per line (blank lines ignored)::

    {"id": "p1", "prompt": "Write a haiku about the sea."}
    {"messages": [{"role": "user", "content": "How was the movie?"}]}

``id`` is optional: without it the prompt id is a hash of the content, so the
same prompt keeps its id across files, runs and workers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arbiter.types import ChatMessage
from arbiter.v1 import common_pb2, policy_pb2, reward_pb2, rollout_pb2

# Longer ids would only bloat every Rollout's record key.
MAX_ID_CHARS = 256


class PromptError(ValueError):
    """A prompt (file line or PromptRecord) that cannot be used; the message
    says where and what to fix."""


@dataclass(frozen=True)
class PromptItem:
    """Plain ``text``, or chat ``messages`` the policy renders with its own template."""

    prompt_id: str
    text: str = ""
    messages: tuple[ChatMessage, ...] | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def display_text(self) -> str:
        """``Rollout.prompt_text``: the text itself, or for a chat prompt the
        JSON list of {"role", "content"} messages (lossless; the rendered form
        depends on the policy's template, which the worker does not load)."""
        if self.messages is None:
            return self.text
        return json.dumps([{"role": m.role, "content": m.content} for m in self.messages], ensure_ascii=False)

    def policy_input(self) -> policy_pb2.PromptInput:
        if self.messages is None:
            return policy_pb2.PromptInput(text=self.text, id=self.prompt_id)
        return policy_pb2.PromptInput(conversation=_conversation(self.messages), id=self.prompt_id)

    def reward_input(self, completion: str) -> reward_pb2.RewardInput:
        """The sample as the reward model scores it, with the RM's own template:
        text prompts as (prompt, response) appended verbatim, chat prompts as
        the conversation with the completion as the assistant turn."""
        if self.messages is None:
            return reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt=self.text, response=completion))
        turns = (*self.messages, ChatMessage("assistant", completion))
        return reward_pb2.RewardInput(conversation=_conversation(turns))

    def record(self) -> rollout_pb2.PromptRecord:
        """The prompts-topic payload of this prompt."""
        msg = rollout_pb2.PromptRecord(prompt_id=self.prompt_id, text=self.text)
        for m in self.messages or ():
            msg.chat_roles.append(m.role)
            msg.chat_contents.append(m.content)
        return msg


def _conversation(messages: Iterable[ChatMessage]) -> common_pb2.Conversation:
    return common_pb2.Conversation(messages=[common_pb2.ChatMessage(role=m.role, content=m.content) for m in messages])


def content_id(text: str = "", messages: Sequence[ChatMessage] | None = None) -> str:
    """Stable id of a prompt's content: equal content, equal id, on any machine."""
    if messages is None:
        canonical: Any = {"prompt": text}
    else:
        canonical = {"messages": [[m.role, m.content] for m in messages]}
    blob = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    return "p-" + hashlib.sha256(blob).hexdigest()[:24]


def _check_id(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PromptError(f"{where}: 'id' must be a non-empty string, got {value!r}")
    if len(value) > MAX_ID_CHARS:
        raise PromptError(f"{where}: 'id' is {len(value)} characters; at most {MAX_ID_CHARS}")
    return value


def _check_messages(raw: Any, where: str) -> tuple[ChatMessage, ...]:
    if not isinstance(raw, list) or not raw:
        raise PromptError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    out = []
    for j, m in enumerate(raw):
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise PromptError(f"{where}: messages[{j}] must be {{'role': str, 'content': str}}, got {m!r}")
        if not m["role"].strip() or not m["content"].strip():
            raise PromptError(f"{where}: messages[{j}] has an empty role or content")
        out.append(ChatMessage(m["role"], m["content"]))
    if out[-1].role == "assistant":
        # The completion becomes the assistant turn; a trailing one would be answered twice.
        raise PromptError(f"{where}: the last message is an assistant turn; end with the turn to answer")
    return tuple(out)


def parse_prompt(obj: Any, where: str) -> PromptItem:
    """A JSON object -> PromptItem; ``where`` prefixes errors (e.g. "prompts.jsonl, line 3")."""
    if not isinstance(obj, Mapping):
        raise PromptError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"id", "prompt", "messages"})
    if unknown:
        listed = ", ".join(map(repr, unknown))
        raise PromptError(f"{where}: unknown key(s) {listed}; allowed: 'id', 'prompt', 'messages'")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise PromptError(f"{where}: needs exactly one of 'prompt' (a string) or 'messages' (a chat)")
    if has_prompt:
        text = obj["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise PromptError(f"{where}: 'prompt' must be a non-empty string, got {text!r}")
        prompt_id = _check_id(obj["id"], where) if "id" in obj else content_id(text=text)
        return PromptItem(prompt_id, text=text)
    messages = _check_messages(obj["messages"], where)
    prompt_id = _check_id(obj["id"], where) if "id" in obj else content_id(messages=messages)
    return PromptItem(prompt_id, messages=messages)


def load_prompts(path: str | os.PathLike) -> list[PromptItem]:
    """Every prompt of a JSON-lines file, validated up front so a bad line stops
    the worker before it generates anything. Errors name the line."""
    source = Path(path)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PromptError(f"{source}: no such prompts file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PromptError(f"{source}: cannot read the prompts file: {err}") from None
    items: list[PromptItem] = []
    seen: dict[str, tuple[int, PromptItem]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}, line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        item = parse_prompt(obj, where)
        first = seen.get(item.prompt_id)
        if first is not None and first[1] != item:
            raise PromptError(f"{where}: id {item.prompt_id!r} is already used by line {first[0]} for another prompt")
        seen.setdefault(item.prompt_id, (number, item))
        items.append(item)
    if not items:
        raise PromptError(f"{source}: holds no prompts")
    return items


def prompt_from_record(record: rollout_pb2.PromptRecord, where: str = "") -> PromptItem:
    """A prompts-topic payload -> PromptItem (PromptError when unusable)."""
    where = where or f"prompt record {record.prompt_id!r}"
    if not record.prompt_id:
        raise PromptError(f"{where}: prompt_id is empty")
    if record.chat_roles or record.chat_contents:
        if len(record.chat_roles) != len(record.chat_contents):
            raise PromptError(
                f"{where}: {len(record.chat_roles)} chat_roles but {len(record.chat_contents)} chat_contents"
            )
        if record.text:
            raise PromptError(f"{where}: sets both text and a chat; use one")
        raw = [{"role": r, "content": c} for r, c in zip(record.chat_roles, record.chat_contents)]
        return PromptItem(record.prompt_id, messages=_check_messages(raw, where))
    if not record.text.strip():
        raise PromptError(f"{where}: has neither text nor chat messages")
    return PromptItem(record.prompt_id, text=record.text)


def as_prompt_items(prompts: Iterable[PromptItem | str | Mapping[str, Any]]) -> list[PromptItem]:
    """PromptItems as they are; strings and {"prompt"/"messages"} objects as a file line would be read."""
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, PromptItem):
            out.append(prompt)
        elif isinstance(prompt, str):
            out.append(parse_prompt({"prompt": prompt}, f"prompts[{i}]"))
        else:
            out.append(parse_prompt(prompt, f"prompts[{i}]"))
    return out


def publish_prompts(kafka_settings, prompts: Iterable[PromptItem | str | Mapping[str, Any]]) -> int:
    """Produce prompts to the prompts topic (acks=all); returns how many.
    For feeding ``arbiter worker --prompts-topic`` from a script or a test."""
    from arbiter.stream import StreamProducer, topics

    items = as_prompt_items(prompts)
    with StreamProducer(kafka_settings) as producer:
        for item in items:
            producer.send(topics.PROMPTS, item.record())
        producer.flush()
    return len(items)
