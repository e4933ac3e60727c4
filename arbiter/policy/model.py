"""One loaded policy version: prompt rendering, and the per-request state
of a generation (``Generation``: its rows, their tokens, log-probs, text and
finish). The rows of all running generations decode together in
``arbiter.policy.batch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from arbiter.backends.placement import CPU_FLOAT32, Placement
from arbiter.chat import render_chat
from arbiter.errors import InvalidInput
from arbiter.lm import LoadedLM, completion_logits, load_causal_lm, token_logprobs
from arbiter.policy.prefix_cache import PrefixCache
from arbiter.policy.sampling import row_seed, row_uniforms, sampling_logprobs, top_p_set
from arbiter.policy.types import (
    FinishReason,
    GeneratedSample,
    ResolvedSampling,
    TokenEvent,
)
from arbiter.types import ChatMessage, ModelInfo, Prompt


class PolicyModel:
    # Decoded here (False), or elsewhere with this object's ``submit``
    # (``arbiter.policy.backend``: Triton).
    remote = False

    def __init__(self, lm: LoadedLM):
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.info: ModelInfo = lm.info
        self.pad_id = int(self.model.config.pad_token_id)
        self.eos_ids = self.end_tokens(self.tokenizer, self.model.config)
        # Made by the scheduler at this version's first batch, when prefix caching is on; goes with the version.
        self.prefix_cache: PrefixCache | None = None

    @staticmethod
    def end_tokens(tokenizer, config) -> frozenset[int]:
        """Ids that end a sample: the tokenizer's and the model config's end of sequence."""
        flat = set()
        for value in (tokenizer.eos_token_id, config.eos_token_id):
            flat.update(value if isinstance(value, list) else [value])
        return frozenset(int(v) for v in flat if v is not None)

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        version: str | None = None,
        base_dir: str | Path | None = None,
        max_tokens: int | None = None,
        placement: Placement = CPU_FLOAT32,
        ilql_beta: float | None = None,
    ) -> PolicyModel:
        """``ilql_beta``: sample a version that ships ILQL heads with
        ``logits + β·(min Q̂ − V)`` (``arbiter.ilql``); None refuses such a version."""
        return cls(load_causal_lm(model_dir, kind="policy", version=version, base_dir=base_dir, max_tokens=max_tokens,
                                  placement=placement, ilql_beta=ilql_beta))

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
        self, prompts: list[list[int]], params: ResolvedSampling, prompt_ids: Sequence[str] = (), stream: bool = False,
        mask: ResolvedMask | None = None,
    ) -> Generation:
        return Generation(self, prompts, params, list(prompt_ids), stream, mask)

    def teacher_forced_logprobs(
        self, prompt: Sequence[int], completion: Sequence[int], temperature: float = 1.0, top_k: int = 0,
        top_p: float = 1.0, mask: ResolvedMask | None = None,
    ) -> list[float]:
        """Log-probs of ``completion`` under the same sampling distribution
        Generate draws from (with ``mask``: restricted to its nucleus), from
        one full forward of each model (no KV cache)."""
        [logits] = completion_logits(self.model, self.pad_id, [(prompt, completion)])
        allowed = None
        if mask is not None:
            [mask_logits] = completion_logits(mask.policy.model, mask.policy.pad_id, [(prompt, completion)])
            allowed = top_p_set(mask_logits.double(), mask.top_p)
        return token_logprobs(sampling_logprobs(logits, temperature, top_k, top_p, allowed), completion)


@dataclass(frozen=True, eq=False)
class ResolvedMask:
    """An ``ActionMask`` with its masking policy resolved to a loaded version
    (fixed for the whole generation, like the policy's own version)."""

    policy: PolicyModel
    top_p: float


@dataclass(eq=False)
class Row:
    """One sample of a generation: a row of the decoding batch."""

    generation: Generation
    index: int
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    uniforms: list[float]
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish: FinishReason | None = None
    # Where the batch keeps it (arbiter.policy.batch): the position its next
    # token takes, that token, and the first cache column it uses.
    position: int = 0
    next_token: int = 0
    start_col: int = 0


class Generation:
    """One request's prompts x n samples. Rows are added to a decoding batch
    (``arbiter.policy.batch``), which calls ``record`` with each sampled
    token; ``stream`` generations keep a ``TokenEvent`` per token for
    ``take_events``, the others decode their text once, when a row ends
    (or at every token when stop strings need it)."""

    def __init__(self, policy: PolicyModel, prompts: list[list[int]], params: ResolvedSampling,
                 prompt_ids: list[str], stream: bool = False, mask: ResolvedMask | None = None):
        self.policy = policy
        # NLPO: the masking policy decodes beside the policy, in lock-step
        # (its own cache rows in the same batch, arbiter.policy.batch).
        self.mask = mask
        self.params = params
        self.prompt_ids = prompt_ids
        self.stream = stream
        self.rows = [
            Row(self, p * params.n + s, p, s, ids, row_uniforms(row_seed(params.seed, p, s), params.max_new_tokens))
            for p, ids in enumerate(prompts)
            for s in range(params.n)
        ]
        self.sampling_key = (params.temperature, params.top_k, params.top_p, None if mask is None else mask.top_p)
        # KV-cache tokens the generation may come to hold: each row's prompt
        # (left-padded to the longest) and every token it may generate; a
        # masked generation holds them twice (the masking policy's cache too).
        self.reserved_tokens = (len(self.rows) * (max(map(len, prompts)) + params.max_new_tokens)
                                * (1 if mask is None else 2))
        self.cancelled = False
        self.unfinished = len(self.rows)
        self._events: list[TokenEvent] = []
        self._incremental_text = stream or bool(params.stop)
        self._stop_holdback = max((len(s) for s in params.stop), default=1) - 1
        self._alone = None

    @property
    def done(self) -> bool:
        return self.unfinished == 0

    def step(self) -> None:
        """One decoding step of this generation alone (a batch of its own),
        synchronously: for in-process callers (the benchmarks' baseline, a
        monolith trainer); the service decodes through the scheduler."""
        from arbiter.policy.batch import DecodeBatch

        if self._alone is None:
            self._alone = DecodeBatch(self.policy, len(self.rows), None if self.mask is None else self.mask.policy)
            self._alone.step([self])
        else:
            self._alone.step()

    def cancel(self) -> None:
        """Its rows leave the batch at the next step boundary."""
        self.cancelled = True

    def take_events(self) -> list[TokenEvent]:
        events, self._events = self._events, []
        return events

    def record(self, row: Row, token: int, logprob: float) -> None:
        params = self.params
        row.ids.append(token)
        row.logprobs.append(logprob)
        if token in self.policy.eos_ids:
            row.finish = FinishReason.EOS
        elif len(row.ids) >= params.max_new_tokens:
            row.finish = FinishReason.LENGTH
        if self._incremental_text or row.finish is not None:
            self._update_text(row, token)
        if row.finish is not None:
            self.unfinished -= 1

    def _update_text(self, row: Row, token: int) -> None:
        params = self.params
        searched = len(row.text)
        text = self.policy.tokenizer.decode(row.ids, skip_special_tokens=True)
        if params.stop and row.finish is not FinishReason.EOS:
            # Back off by the holdback plus one UTF-8 sequence: the previous
            # text may have ended in U+FFFD that this token completed.
            start = max(0, searched - self._stop_holdback - 4) if self._incremental_text else 0
            hits = [i for i in (text.find(s, start) for s in params.stop) if i >= 0]
            if hits:
                # Token ids (and log-probs) keep the token that completed the
                # stop string: it was sampled, so PPO must see it. Text ends before it.
                text = text[: min(hits)]
                row.finish = FinishReason.STOP
        row.text = text
        if not self.stream:
            return
        if row.finish is not None:
            final = len(text)
        else:
            final = max(row.emitted, len(text) - self._stop_holdback)
            # An incomplete UTF-8 sequence decodes to U+FFFD until its last byte arrives.
            while final > row.emitted and text[final - 1] == "\ufffd":
                final -= 1
        delta = text[row.emitted : final]
        row.emitted = final
        self._events.append(
            TokenEvent(row.index, row.prompt_index, row.sample_index, token, row.logprobs[-1], delta, row.finish)
        )

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
