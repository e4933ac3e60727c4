"""The reward engine: versions of a reward model behind dynamic batchers.

This is everything the reward service does except speak gRPC: validation,
batching, normalization, Bradley-Terry comparison and version swaps.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol

from arbiter.backends.model import BackendEngine
from arbiter.batching import BatchObserver, DynamicBatcher, ItemShape
from arbiter.errors import (
    ArbiterError, FailedPrecondition, InvalidInput, LimitExceeded, ModelLoadError, VersionNotFound,
)
from arbiter.kernel import EngineConfig, ModelKernel, VersionObserver
from arbiter.limits import TOKENIZER_THREADS, SizeBudget, SizeLimits
from arbiter.reward.composite import RewardSpec, Scored, combine, rule_values, spec_label, term_normalized
from arbiter.reward.convention import TEXT_CONVENTIONS
from arbiter.reward.ensemble import STACK_MODES, StackedEnsemble, stack_refusal
from arbiter.reward.model import EncodedInput, RewardModel
from arbiter.types import ChatMessage, RewardInput, ScoreBatch, ScoreOptions, ScoreResult

log = logging.getLogger(__name__)


class RewardObserver(BatchObserver, Protocol):
    def on_scores(self, model_version: str, raw_scores: Sequence[float]) -> None: ...

    def on_version_added(self, model_version: str, calibration_scores: Sequence[float] | None) -> None: ...

    def on_version_removed(self, model_version: str) -> None: ...

    def on_shadow(self, active_version: str, shadow_version: str, active: Sequence[float],
                  shadow: Sequence[float]) -> None: ...

    def on_shadow_error(self, shadow_version: str) -> None: ...

    def on_shadow_cleared(self) -> None: ...

    def on_composite(self, configured: bool, spec: RewardSpec, resolved: Sequence[tuple[str, ...]],
                     scored: Sequence[Scored]) -> None: ...

    def on_ensemble_pass(self, mode: str) -> None: ...


@dataclass(frozen=True)
class RewardEngineConfig(EngineConfig):
    max_items_per_request: int = 256
    # For versions whose checkpoint does not say how their text was built
    # (arbiter.reward.convention.resolve_text_convention); "auto": detect.
    text_convention: str = "auto"
    # Bytes per item and per request as sent; the service checks them
    # (``size_budget``) before converting a request.
    sizes: SizeLimits = SizeLimits()
    # The reward spec scoring requests that pin no version and bring no spec
    # of their own (arbiter.reward.composite.RewardSpec); None: the active version.
    reward_spec: RewardSpec | None = None
    # Configured ensembles of interchangeable versions in one stacked forward
    # pass (arbiter.reward.ensemble.STACK_MODES): auto, always, never.
    stack_ensembles: str = "auto"

    def __post_init__(self) -> None:
        if self.max_items_per_request < 1:
            raise ValueError(f"max_items_per_request must be >= 1, got {self.max_items_per_request}")
        if self.stack_ensembles not in STACK_MODES:
            raise ValueError(f"stack_ensembles must be one of {', '.join(STACK_MODES)}, got {self.stack_ensembles!r}")
        if self.text_convention not in TEXT_CONVENTIONS:
            raise ValueError(f"text_convention must be one of {', '.join(TEXT_CONVENTIONS)}, got {self.text_convention!r}")



def reward_items(model: RewardModel) -> ItemShape[list[int]]:
    """A reward batch item is the token ids of one text; calibration scores
    runs of the end token (any ids take the same time)."""
    token = model.tokenizer.eos_token_id or 0
    return ItemShape(len, lambda tokens: [token] * tokens, model.info.max_tokens)


class RewardEngine(BackendEngine, VersionObserver):
    MODEL = RewardModel
    ITEMS = staticmethod(reward_items)
    # No COMPATIBLE check: callers send text, which each version tokenizes
    # with its own tokenizer, so a new version may change tokenizer and size.
    models: ModelKernel[RewardModel]

    def __init__(self, config: RewardEngineConfig, executor: Executor, loader: Executor, observer: RewardObserver):
        super().__init__(config, executor, loader, observer)
        self.models.add_observer(self)
        # (candidate version, fraction of requests also scored by it)
        self._shadow: tuple[str, float] | None = None
        self._shadow_tasks: set[asyncio.Task] = set()
        self._shadow_rng = random.Random(0)
        self._tokenizers = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="reward-tokenize")
        self._loader = loader
        # The configured spec's ensembles (members in order) -> the stack being
        # built or built: (StackedEnsemble, its batcher), or why the members
        # run one by one.
        self._stacks: dict[tuple[str, ...], asyncio.Task] = {}

    def load_options(self) -> dict:
        return {"text_convention": self.config.text_convention}

    # -- version hooks (arbiter.kernel) ------------------------------------

    def on_version_loaded(self, model: RewardModel) -> None:
        self._observer.on_version_added(model.info.version, model.calibration_scores)

    def on_version_activated(self, version: str, previous: str | None) -> None:
        if self._shadow is not None and self._shadow[0] == version:
            self._clear_shadow()  # promoted: it no longer shadows itself

    def on_version_removed(self, version: str) -> None:
        if self._shadow is not None and self._shadow[0] == version:
            self._clear_shadow()
        self._observer.on_version_removed(version)

    # -- shadow scoring ---------------------------------------------------

    def _clear_shadow(self) -> None:
        self._shadow = None
        self._observer.on_shadow_cleared()

    def set_shadow(self, version: str, fraction: float) -> tuple[str, str, float]:
        """Also score ``fraction`` of the active version's requests with
        ``version`` (empty clears); returns (active, shadow, fraction)."""
        active = self.models.active_version or ""
        if not version:
            self._clear_shadow()
            return active, "", 0.0
        if not 0 < fraction <= 1:
            raise InvalidInput("sample_fraction", f"must be in (0, 1], got {fraction}")
        self.models.get(version)  # NOT_FOUND for a version that is not loaded
        if version == active:
            raise InvalidInput("model_version", f"{version!r} is the active version; shadow a candidate instead")
        self._shadow = (version, fraction)
        return active, version, fraction

    @property
    def shadow(self) -> tuple[str, float] | None:
        return self._shadow

    # -- scoring --------------------------------------------------------

    def check_count(self, count: int) -> None:
        """A request's number of items: a service checks it before converting them."""
        if not count:
            raise InvalidInput("inputs", "is empty; send at least one item")
        limit = self.config.max_items_per_request
        if count > limit:
            raise LimitExceeded(f"{count} inputs in one request, over the limit of {limit}; split the request")

    def size_budget(self, model_version: str = "") -> SizeBudget:
        """The size limits of a request to ``model_version`` (NOT_FOUND if not loaded)."""
        return self.config.sizes.budget(self.models.get(model_version).model.info.max_tokens)

    async def score(self, inputs: Sequence[RewardInput], options: ScoreOptions) -> ScoreBatch:
        self.check_count(len(inputs))
        if options.reward_spec is not None:
            if options.model_version:
                raise InvalidInput("options.model_version", "must be empty with options.reward_spec: its terms name "
                                   "their versions")
            if options.normalize:
                raise InvalidInput("options.normalize", "must be false with options.reward_spec: set normalize on "
                                   "its model and ensemble terms")
            return await self._score_spec(inputs, options, options.reward_spec, configured=False)
        if self.config.reward_spec is not None and not options.model_version:
            # The configured spec says how its terms are normalized: a caller
            # asking for normalized scores (the rollout worker does when the
            # active version ships statistics) gets the configured total all
            # the same, and ``normalized`` says whether any term normalized.
            return await self._score_spec(inputs, options, self.config.reward_spec, configured=True)
        entry = self.models.get(options.model_version)
        info = entry.model.info
        if options.normalize and info.normalization is None:
            raise FailedPrecondition(
                f"model version {info.version!r} ships no normalization statistics; request raw scores "
                "(options.normalize=false) or load a version with statistics in arbiter.json"
            )
        encoded = await self._encode(entry.model, inputs, options)
        raw = await entry.run([e.token_ids for e in encoded])
        self._observer.on_scores(info.version, raw)
        self._maybe_shadow(info.version, inputs, options, raw)
        results = [
            ScoreResult(
                score=info.normalization.apply(r) if options.normalize else r,
                raw_score=r,
                num_tokens=len(e.token_ids),
                truncated=e.truncated,
                id=item.id,
            )
            for item, e, r in zip(inputs, encoded, raw, strict=True)
        ]
        return ScoreBatch(results, info.name, info.version, options.normalize)

    async def compare(
        self,
        prompt: str,
        messages: Sequence[ChatMessage] | None,
        response_a: str,
        response_b: str,
        options: ScoreOptions,
    ) -> tuple[float, ScoreBatch]:
        """P(A preferred over B) = sigmoid(r_A - r_B) on raw rewards
        (Bradley-Terry, the model RM training fits)."""
        for field, response in (("response_a", response_a), ("response_b", response_b)):
            if not response.strip():
                raise InvalidInput(field, "is empty; there is nothing to compare")
        if messages is not None:
            pair = [
                RewardInput(messages=(*messages, ChatMessage("assistant", r)), id=label)
                for label, r in (("a", response_a), ("b", response_b))
            ]
        else:
            pair = [RewardInput(prompt=prompt, response=r, id=label) for label, r in (("a", response_a), ("b", response_b))]
        batch = await self.score(pair, options)
        a, b = batch.results
        return _sigmoid(a.raw_score - b.raw_score), batch

    def _maybe_shadow(self, version: str, inputs: Sequence[RewardInput], options: ScoreOptions, raw: list[float]) -> None:
        shadow = self._shadow
        if shadow is None or version != self.models.active_version or self._shadow_rng.random() >= shadow[1]:
            return
        task = asyncio.get_running_loop().create_task(self._score_shadow(version, shadow[0], inputs, options, raw))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _score_shadow(self, active: str, candidate: str, inputs, options: ScoreOptions, raw) -> None:
        """Never affects the caller: the answer has been sent already."""
        try:
            entry = self.models.get(candidate)
            # The candidate may tokenize differently: encode with its own tokenizer.
            encoded = await self._encode(entry.model, inputs, options)
            shadow_raw = await entry.run([e.token_ids for e in encoded])
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("shadow scoring with %r failed", candidate, exc_info=True)
            self._observer.on_shadow_error(candidate)
            return
        self._observer.on_scores(candidate, shadow_raw)
        self._observer.on_shadow(active, candidate, raw, shadow_raw)

    # -- reward specs (arbiter.reward.composite) -----------------------------

    async def prepare(self) -> None:
        """Before serving: load the configured spec's models (inactive), keep
        every version it names loaded, check they can serve it, and stack its
        ensembles. Raises ModelLoadError naming the spec's field."""
        spec = self.config.reward_spec
        if spec is None:
            return
        # Pinned first, so loading the spec's models cannot evict each other.
        self.models.pin(spec.named_versions(), f"used by the reward spec {spec.name!r}")
        for label, path in spec.models.items():
            if label not in [info.version for info in self.models.list_versions()]:
                await self.models.load_version(path, label, activate=False)
        loaded = [info.version for info in self.models.list_versions()]
        for i, term in enumerate(spec.terms):
            for j, version in enumerate(term.versions):
                where = f"reward_spec.terms[{i}].{term.version_field(j)}"
                if version and version not in loaded:
                    raise ModelLoadError(f"{where}={version!r}: not loaded (loaded: {', '.join(loaded)}); give its "
                                         "checkpoint path under the spec's models")
                info = self.models.info(version)
                if term_normalized(term) and info.normalization is None:
                    raise ModelLoadError(f"{where}={info.version!r}: normalize is set but the version ships no "
                                         "normalization statistics")
            if term.kind == "ensemble":
                await self._stack(term.versions)

    def _resolve(self, spec: RewardSpec, configured: bool):
        """Each term's versions (the active one filled in) and their entries,
        taken once: a swap during the request does not mix versions."""
        where = "reward_spec" if configured else "options.reward_spec"
        active = self.models.get()
        entries = {active.model.info.version: active}
        resolved: list[tuple[str, ...]] = []
        for i, term in enumerate(spec.terms):
            versions = []
            for j, version in enumerate(term.versions):
                field = f"{where}.terms[{i}].{term.version_field(j)}"
                try:
                    entry = self.models.get(version) if version else active
                except VersionNotFound as err:
                    if configured:
                        raise FailedPrecondition(f"{field}: {err}; the configured reward spec cannot score until it "
                                                 "is loaded again") from None
                    raise SpecVersionNotFound(field, err) from None
                info = entry.model.info
                if term_normalized(term) and info.normalization is None:
                    raise FailedPrecondition(
                        f"{field}: model version {info.version!r} ships no normalization statistics; set the "
                        "term's normalize=false or name a version with statistics in its arbiter.json")
                entries[info.version] = entry
                versions.append(info.version)
            resolved.append(tuple(versions))
        return active, entries, resolved

    async def _score_spec(self, inputs: Sequence[RewardInput], options: ScoreOptions, spec: RewardSpec,
                          configured: bool) -> ScoreBatch:
        active, entries, resolved = self._resolve(spec, configured)
        loop = asyncio.get_running_loop()
        rules = loop.run_in_executor(self._tokenizers, rule_values, spec, inputs, _token_counter(active.model))
        # Read even when scoring fails first (else asyncio logs it as never retrieved).
        rules.add_done_callback(lambda f: f.cancelled() or f.exception())
        # A stacked ensemble scores all its members in one pass; every other
        # version named once is scored once, through its own batcher.
        stacks = {}
        for term, versions in zip(spec.terms, resolved, strict=True):
            if term.kind == "ensemble":
                stack = await self._stacked(versions)
                if stack is not None:
                    stacks[versions] = stack
                self._observer.on_ensemble_pass("sequential" if stack is None else "stacked")
        covered = {v for versions in stacks for v in versions}
        rest = [v for v in dict.fromkeys(v for vs in resolved for v in vs) if v not in covered]
        passes = await asyncio.gather(
            *(self._score_stacked(batcher, entries[versions[0]].model, inputs, options)
              for versions, batcher in stacks.items()),
            *(self._score_version(entries[v], inputs, options) for v in rest),
        )
        raw: dict[str, list[float]] = {}
        encoded: dict[str, list[EncodedInput]] = {}
        for versions, (enc, per_item) in zip(stacks, passes):
            for j, version in enumerate(versions):
                raw[version], encoded[version] = [scores[j] for scores in per_item], enc
        for version, (enc, scores) in zip(rest, passes[len(stacks):]):
            raw[version], encoded[version] = scores, enc
        rule = await rules
        for version, scores in raw.items():
            self._observer.on_scores(version, scores)
        active_version = active.model.info.version
        if active_version in raw:
            self._maybe_shadow(active_version, inputs, options, raw[active_version])
        stats = {v: entries[v].model.info.normalization for v in raw}
        items = combine(spec, resolved, raw, stats, rule, len(inputs))
        self._observer.on_composite(configured, spec, resolved, items)
        first = next((vs[0] for vs in resolved if vs), None)
        results = [
            ScoreResult(
                score=item.total, raw_score=item.raw_total,
                num_tokens=len(encoded[first][i].token_ids) if first else 0,
                truncated=any(encoded[v][i].truncated for v in encoded),
                id=inputs[i].id, components=item.components,
            )
            for i, item in enumerate(items)
        ]
        normalized = any(term_normalized(t) for t in spec.terms)
        return ScoreBatch(results, spec.name, spec_label(spec, resolved), normalized, spec.name)

    async def _score_version(self, entry, inputs, options) -> tuple[list[EncodedInput], list[float]]:
        encoded = await self._encode(entry.model, inputs, options)
        return encoded, await entry.run([e.token_ids for e in encoded])

    async def _stacked(self, versions: tuple[str, ...]) -> DynamicBatcher | None:
        """The batcher of the stacked forward of ``versions``, if they have
        one. Only the configured spec's ensembles are stacked (at startup): a
        stack copies K models' weights, which a request must not be able to
        make the service do."""
        task = self._stacks.get(versions)
        stack = None if task is None else await asyncio.shield(task)
        return None if stack is None or isinstance(stack, str) else stack[1]

    async def _score_stacked(self, batcher: DynamicBatcher, first: RewardModel, inputs, options
                             ) -> tuple[list[EncodedInput], list[list[float]]]:
        """Each item's member scores; the members share the first's tokenizer and text convention."""
        encoded = await self._encode(first, inputs, options)
        return encoded, await batcher.submit([e.token_ids for e in encoded])

    async def _stack(self, versions: tuple[str, ...]):
        """The stack of ``versions`` (built once, on the loader thread), or
        the reason they are scored member by member."""
        task = self._stacks.get(versions)
        if task is None:
            task = self._stacks[versions] = asyncio.get_running_loop().create_task(self._build_stack(versions))
        return await asyncio.shield(task)

    async def _build_stack(self, versions: tuple[str, ...]):
        label = "+".join(versions)
        models = [self.models.get(v).model for v in versions]
        reason = stack_refusal(models, self.config.stack_ensembles)
        if reason is None:
            try:
                stack = await asyncio.get_running_loop().run_in_executor(self._loader, StackedEnsemble, models)
            except Exception as err:  # a model vmap cannot run: the members still can
                reason = f"stacking failed: {err}"
        if reason is not None:
            log.info("ensemble %s: scored member by member (%s)", label, reason)
            return reason
        batching = self.models.config.batching
        # A stacked batch holds K forward passes' activations: K times fewer items.
        batching = replace(batching, max_batch_size=max(1, batching.max_batch_size // len(versions)))
        batcher = DynamicBatcher(stack.forward, batching, self.models.executor, label=f"ensemble:{label}")
        log.info("ensemble %s: one stacked forward pass for its %d members", label, len(versions))
        return stack, batcher

    async def _close_stacks(self) -> None:
        """Stacks live as long as the engine: their members are the
        configured spec's, pinned (arbiter.kernel), so never unloaded."""
        for task in self._stacks.values():
            try:
                stack = await task
            except BaseException:
                continue
            if not isinstance(stack, str):
                await stack[1].close()
                stack[0].release()
        self._stacks.clear()

    async def _encode(self, model: RewardModel, inputs: Sequence[RewardInput], options: ScoreOptions
                      ) -> list[EncodedInput]:
        """Rendering and tokenizing: a small request of plain text right
        here, anything larger on the tokenizer threads."""
        if _tokenizes_inline(inputs):
            return model.encode(inputs, options.truncation)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizers, model.encode, inputs, options.truncation)

    async def close(self) -> None:
        for task in list(self._shadow_tasks):
            task.cancel()
        await self._close_stacks()
        await super().close()
        self._tokenizers.shutdown(wait=False, cancel_futures=True)


class SpecVersionNotFound(VersionNotFound):
    """A request's reward spec names a version that is not loaded (NOT_FOUND), by its field."""

    def __init__(self, field: str, err: VersionNotFound):
        ArbiterError.__init__(self, f"{field}: {err}")
        self.version = err.version
        self.field = field


# Characters of plain text a request may carry and still be tokenized on the
# event loop. Tokenizing a one-turn item (~100 characters) takes ~80 us of CPU;
# a hop to a tokenizer thread and back costs more than that (~100 us of CPU,
# two thread wake-ups, each a wait for a core on a busy machine), and it is
# paid by every request: under load the hops, not the model, held most
# concurrent requests, so batches formed from few. At this bound tokenizing
# holds the loop for well under a millisecond; larger requests and
# conversations (a chat template renders in Python) still go to the threads,
# so a big request never stalls the others or health checks.
INLINE_TOKENIZE_CHARS = 2048


def _tokenizes_inline(inputs: Sequence[RewardInput]) -> bool:
    budget = INLINE_TOKENIZE_CHARS
    for item in inputs:
        if item.messages is not None:
            return False
        budget -= len(item.prompt) + len(item.response)
        if budget < 0:
            return False
    return True


def _token_counter(model: RewardModel):
    """Tokens of a response under ``model``'s tokenizer, without special tokens."""
    return lambda text: len(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
