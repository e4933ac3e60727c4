"""One loaded policy version: prompt rendering and batched sampling with a KV cache.

A request's prompts x n samples run as one batch: prompts are left-padded
(so every row's next token sits in the last column) with position ids taken
from the attention mask, so padding changes neither positions nor attention.
Finished rows keep their slot and are fed padding (masked out) until the whole
batch is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from arbiter.chat import render_chat
from arbiter.errors import InvalidInput
from arbiter.lm import LoadedLM, completion_logits, forward_step, load_causal_lm, token_logprobs
from arbiter.policy.sampling import draw, make_generator, row_seed, sampling_logprobs
from arbiter.policy.types import (
    FinishReason,
    GeneratedSample,
    ResolvedSampling,
    TokenEvent,
)
from arbiter.types import ChatMessage, ModelInfo, Prompt


class PolicyModel:
    def __init__(self, lm: LoadedLM):
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.info: ModelInfo = lm.info
        self.pad_id = int(self.model.config.pad_token_id)
        eos = {self.tokenizer.eos_token_id, self.model.config.eos_token_id}
        flat = set()
        for value in eos:
            flat.update(value if isinstance(value, list) else [value])
        self.eos_ids = frozenset(int(v) for v in flat if v is not None)

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        version: str | None = None,
        base_dir: str | Path | None = None,
        max_tokens: int | None = None,
    ) -> PolicyModel:
        return cls(load_causal_lm(model_dir, kind="policy", version=version, base_dir=base_dir, max_tokens=max_tokens))

    def release(self) -> None:
        """Unloaded: generations still running hold their own reference and
        finish; the weights go when the last one does."""

    # -- prompts --------------------------------------------------------

    def encode(self, prompts: Sequence[Prompt], max_new_tokens: int, field: str = "prompts") -> list[list[int]]:
        encoded = []
        limit = self.info.max_tokens
        for i, prompt in enumerate(prompts):
            where = f"{field}[{i}]" if field == "prompts" else field
            if prompt.messages is not None:
                ids = self._encode_chat(prompt.messages, f"{where}.conversation")
            else:
                if not prompt.text:
                    raise InvalidInput(f"{where}.text", "is empty; give the prompt text (or a conversation)")
                ids = self.tokenizer(prompt.text, add_special_tokens=True)["input_ids"]
            if not ids:
                raise InvalidInput(where, "tokenizes to zero tokens")
            if len(ids) + max_new_tokens > limit:
                raise InvalidInput(
                    where,
                    f"is {len(ids)} tokens; with sampling.max_new_tokens={max_new_tokens} that exceeds the "
                    f"model's max of {limit} tokens: shorten the prompt or lower max_new_tokens",
                )
            encoded.append(ids)
        return encoded

    def _encode_chat(self, messages: Sequence[ChatMessage], field: str) -> list[int]:
        if not messages:
            raise InvalidInput(f"{field}.messages", "is empty")
        for j, message in enumerate(messages):
            if not message.role.strip():
                raise InvalidInput(f"{field}.messages[{j}].role", "is empty")
            if not message.content.strip():
                raise InvalidInput(f"{field}.messages[{j}].content", "is empty")
        rendered = render_chat(self.tokenizer, self.info.name, messages, field, add_generation_prompt=True)
        # The template inserts its own special tokens.
        return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    # -- generation -----------------------------------------------------

    def start(
        self, prompts: list[list[int]], params: ResolvedSampling, prompt_ids: Sequence[str] = ()
    ) -> GenerationRun:
        return GenerationRun(self, prompts, params, list(prompt_ids))

    def teacher_forced_logprobs(
        self, prompt: Sequence[int], completion: Sequence[int], temperature: float = 1.0, top_k: int = 0,
        top_p: float = 1.0,
    ) -> list[float]:
        """Log-probs of ``completion`` under the same sampling distribution
        Generate draws from, from one full forward (no KV cache)."""
        [logits] = completion_logits(self.model, self.pad_id, [(prompt, completion)])
        return token_logprobs(sampling_logprobs(logits, temperature, top_k, top_p), completion)


@dataclass
class _Row:
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    generator: object
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish: FinishReason | None = None


class GenerationRun:
    """The state of one batched generation. ``step()`` runs one forward pass
    (the prompt prefill first) and samples one token for every unfinished
    row; it is blocking and meant for the model thread, one step per call, so
    several requests interleave at token granularity."""

    def __init__(self, policy: PolicyModel, prompts: list[list[int]], params: ResolvedSampling, prompt_ids: list[str]):
        self.policy = policy
        self.params = params
        self.prompt_ids = prompt_ids
        self.rows = [
            _Row(p, s, ids, make_generator(row_seed(params.seed, p, s)))
            for p, ids in enumerate(prompts)
            for s in range(params.n)
        ]
        self._stop_holdback = max((len(s) for s in params.stop), default=1) - 1
        self._cache = None
        self._mask = None
        self._next_pos = None
        self._next_tokens = None
        self.steps = 0

    @property
    def done(self) -> bool:
        return all(row.finish is not None for row in self.rows)

    @property
    def active_rows(self) -> int:
        return sum(1 for row in self.rows if row.finish is None)

    def step(self) -> list[TokenEvent]:
        import torch

        with torch.inference_mode():
            logits = self._prefill() if self._cache is None else self._decode()
            dist = sampling_logprobs(logits, self.params.temperature, self.params.top_k, self.params.top_p)
        events = []
        next_tokens = []
        for index, row in enumerate(self.rows):
            if row.finish is not None:
                next_tokens.append(self.policy.pad_id)
                continue
            token = draw(dist[index], self.params, row.generator)
            events.append(self._append(index, row, token, float(dist[index, token])))
            next_tokens.append(token)
        self._next_tokens = torch.tensor(next_tokens, dtype=torch.long)[:, None]
        self.steps += 1
        return events

    def _prefill(self):
        import torch

        width = max(len(row.prompt_ids) for row in self.rows)
        input_ids = torch.full((len(self.rows), width), self.policy.pad_id, dtype=torch.long)
        mask = torch.zeros((len(self.rows), width), dtype=torch.long)
        for r, row in enumerate(self.rows):
            input_ids[r, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids, dtype=torch.long)
            mask[r, width - len(row.prompt_ids) :] = 1
        # A left-padded row's first real token is position 0, as unpadded.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, self._cache = forward_step(self.policy.model, input_ids, mask, positions, last_only=True)
        self._mask = mask
        self._next_pos = positions[:, -1:] + 1
        return logits[:, -1, :]

    def _decode(self):
        import torch

        live = torch.tensor([[0 if row.finish is not None else 1] for row in self.rows], dtype=torch.long)
        self._mask = torch.cat([self._mask, live], dim=-1)
        logits, self._cache = forward_step(
            self.policy.model, self._next_tokens, self._mask, self._next_pos, cache=self._cache
        )
        self._next_pos = self._next_pos + 1
        return logits[:, -1, :]

    def _append(self, index: int, row: _Row, token: int, logprob: float) -> TokenEvent:
        params = self.params
        row.ids.append(token)
        row.logprobs.append(logprob)
        searched = len(row.text)
        text = self.policy.tokenizer.decode(row.ids, skip_special_tokens=True)
        if token in self.policy.eos_ids:
            row.finish = FinishReason.EOS
        elif params.stop:
            # Back off by the holdback plus one UTF-8 sequence: the previous
            # text may have ended in U+FFFD that this token completed.
            start = max(0, searched - self._stop_holdback - 4)
            hits = [i for i in (text.find(s, start) for s in params.stop) if i >= 0]
            if hits:
                # Token ids (and log-probs) keep the token that completed the
                # stop string: it was sampled, so PPO must see it. Text ends before it.
                text = text[: min(hits)]
                row.finish = FinishReason.STOP
        if row.finish is None and len(row.ids) >= params.max_new_tokens:
            row.finish = FinishReason.LENGTH
        row.text = text
        if row.finish is not None:
            final = len(text)
        else:
            final = max(row.emitted, len(text) - self._stop_holdback)
            # An incomplete UTF-8 sequence decodes to U+FFFD until its last byte arrives.
            while final > row.emitted and text[final - 1] == "\ufffd":
                final -= 1
        delta = text[row.emitted : final]
        row.emitted = final
        return TokenEvent(index, row.prompt_index, row.sample_index, token, logprob, delta, row.finish)

    def samples(self) -> list[GeneratedSample]:
        version = self.policy.info.version
        return [
            GeneratedSample(
                prompt_index=row.prompt_index,
                sample_index=row.sample_index,
                prompt_id=self.prompt_ids[row.prompt_index] if row.prompt_index < len(self.prompt_ids) else "",
                prompt_token_ids=list(row.prompt_ids),
                completion_token_ids=list(row.ids),
                text=row.text,
                logprobs=list(row.logprobs),
                finish_reason=row.finish,
                policy_version=version,
            )
            for row in self.rows
        ]
