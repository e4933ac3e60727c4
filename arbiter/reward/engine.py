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
from dataclasses import dataclass
from typing import Protocol

from arbiter.backends.model import BackendEngine
from arbiter.batching import BatchObserver, ItemShape
from arbiter.errors import FailedPrecondition, InvalidInput, LimitExceeded
from arbiter.kernel import EngineConfig, ModelKernel, VersionObserver
from arbiter.limits import TOKENIZER_THREADS, SizeBudget, SizeLimits
from arbiter.reward.convention import TEXT_CONVENTIONS
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


@dataclass(frozen=True)
class RewardEngineConfig(EngineConfig):
    max_items_per_request: int = 256
    # For versions whose checkpoint does not say how their text was built
    # (arbiter.reward.convention.resolve_text_convention); "auto": detect.
    text_convention: str = "auto"
    # Bytes per item and per request as sent; the service checks them
    # (``size_budget``) before converting a request.
    sizes: SizeLimits = SizeLimits()

    def __post_init__(self) -> None:
        if self.max_items_per_request < 1:
            raise ValueError(f"max_items_per_request must be >= 1, got {self.max_items_per_request}")
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

    async def _encode(self, model: RewardModel, inputs: Sequence[RewardInput], options: ScoreOptions
                      ) -> list[EncodedInput]:
        """Rendering and tokenizing on the tokenizer threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizers, model.encode, inputs, options.truncation)

    async def close(self) -> None:
        for task in list(self._shadow_tasks):
            task.cancel()
        await super().close()
        self._tokenizers.shutdown(wait=False, cancel_futures=True)


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
