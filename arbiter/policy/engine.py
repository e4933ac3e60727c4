"""The policy engine: versions of a policy, request validation, generation
and hot swaps. Everything the policy service does except speak gRPC.

Swap semantics: a request resolves its version once, when it starts, and
keeps that model object to its last token, so in-flight requests finish on
the weights they started with while new requests get the newly activated
version. A new version is loaded and validated on a separate loader thread
(generation keeps running meanwhile) and only then activated, atomically; a
checkpoint that fails to load, changes parameter shapes or the tokenizer, or
gives non-finite logits is refused and the serving version is untouched.

Batching: each request's prompts x n samples run as one KV-cached batch;
requests are not merged with each other, so a seeded request's output does
not depend on what else the server is doing. Concurrent requests interleave
one decoding step at a time on the model thread.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from arbiter.errors import FailedPrecondition, InvalidInput, LimitExceeded, ShuttingDown
from arbiter.lm import check_compatible
from arbiter.policy.model import GenerationRun, PolicyModel
from arbiter.policy.types import (
    GeneratedSample,
    GenerateResult,
    ResolvedSampling,
    SamplingParams,
    TokenEvent,
)
from arbiter.types import ModelInfo, Prompt
from arbiter.versions import ModelVersions


class PolicyObserver(Protocol):
    def on_batch(self, size: int, seconds: float) -> None: ...

    def on_samples(self, samples: Sequence[GeneratedSample]) -> None: ...

    def on_active_generations(self, count: int) -> None: ...


@dataclass(frozen=True)
class PolicyEngineConfig:
    max_prompts_per_request: int = 64
    max_samples_per_prompt: int = 16
    # prompts x n rows of one batched generation.
    max_rows_per_request: int = 256
    max_new_tokens_limit: int = 1024
    default_max_new_tokens: int = 64
    max_stop_strings: int = 8
    # Generations running at once (each holds a KV cache); more wait their turn.
    max_concurrent_generations: int = 8
    # Loaded versions kept; activating a new one unloads the oldest inactive.
    max_loaded_versions: int = 2
    # Caps the model's own limit (never raises it).
    max_tokens: int | None = None
    # LoRA adapters loaded later apply to this base (the server's --model).
    base_model_dir: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "max_prompts_per_request", "max_samples_per_prompt", "max_rows_per_request", "max_new_tokens_limit",
            "default_max_new_tokens", "max_concurrent_generations", "max_loaded_versions",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_stop_strings < 0:
            raise ValueError(f"max_stop_strings must be >= 0, got {self.max_stop_strings}")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) must be <= max_new_tokens_limit "
                f"({self.max_new_tokens_limit})"
            )


class PolicyEngine:
    def __init__(self, config: PolicyEngineConfig, executor: Executor, loader: Executor, observer: PolicyObserver):
        self.config = config
        self._executor = executor
        self._loader = loader
        self._observer = observer
        self._versions: ModelVersions[PolicyModel] = ModelVersions()
        self._slots = asyncio.Semaphore(config.max_concurrent_generations)
        self._load_lock = asyncio.Lock()
        self._active_generations = 0
        self._closed = False

    # -- versions -------------------------------------------------------

    def load_blocking(self, path: str | Path, version: str | None = None) -> PolicyModel:
        """Load and validate a checkpoint (slow; run it off the event loop)."""
        return PolicyModel.load(
            path, version=version or None, base_dir=self.config.base_model_dir, max_tokens=self.config.max_tokens
        )

    def add_version(self, model: PolicyModel, activate: bool = True) -> ModelInfo:
        if self._versions.active_version is not None:
            check_compatible(model.lm, self._versions.get().lm)
        self._versions.add(model.info.version, model, activate)
        self._evict(keep=model.info.version)
        return self.info(model.info.version)

    def _evict(self, keep: str) -> None:
        loaded = [version for version, _ in self._versions.items()]
        for version in list(loaded):
            if len(loaded) <= self.config.max_loaded_versions:
                break
            if version != keep and not self._versions.is_active(version):
                # Requests still running on it hold their own reference and finish.
                self._versions.remove(version)
                loaded.remove(version)

    async def load_version(self, path: str, version: str = "", activate: bool = True) -> ModelInfo:
        # One load at a time: each holds a full copy of the weights.
        async with self._load_lock:
            if version and version in {v for v, _ in self._versions.items()}:
                raise FailedPrecondition(
                    f"model version {version!r} is already loaded; unload it first or pick another version label"
                )
            loop = asyncio.get_running_loop()
            model = await loop.run_in_executor(self._loader, self.load_blocking, path, version)
            return self.add_version(model, activate)

    def activate(self, version: str) -> tuple[ModelInfo, str | None]:
        previous = self._versions.activate(version)
        return self.info(version), previous

    async def unload(self, version: str) -> None:
        self._versions.remove(version)

    def info(self, version: str = "") -> ModelInfo:
        model = self._versions.get(version)
        return replace(model.info, active=self._versions.is_active(model.info.version))

    def list_versions(self) -> list[ModelInfo]:
        return [self.info(version) for version, _ in self._versions.items()]

    @property
    def active_version(self) -> str | None:
        return self._versions.active_version

    def model(self, version: str = "") -> PolicyModel:
        return self._versions.get(version)

    # -- requests -------------------------------------------------------

    def resolve(self, params: SamplingParams) -> ResolvedSampling:
        cfg = self.config
        max_new = params.max_new_tokens or cfg.default_max_new_tokens
        if params.max_new_tokens < 0 or max_new > cfg.max_new_tokens_limit:
            raise InvalidInput(
                "sampling.max_new_tokens",
                f"is {params.max_new_tokens}; allowed 1..{cfg.max_new_tokens_limit} (0 means the server's "
                f"default of {cfg.default_max_new_tokens})",
            )
        if not (math.isfinite(params.temperature) and params.temperature >= 0):
            raise InvalidInput("sampling.temperature", f"is {params.temperature}; must be >= 0 (0 means greedy)")
        top_p = params.top_p or 1.0
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise InvalidInput("sampling.top_p", f"is {params.top_p}; must be in (0, 1] (0 or unset means 1)")
        if params.top_k < 0:
            raise InvalidInput("sampling.top_k", f"is {params.top_k}; must be >= 0 (0 means no top-k)")
        n = params.n or 1
        if not 1 <= n <= cfg.max_samples_per_prompt:
            raise InvalidInput(
                "sampling.n", f"is {params.n}; allowed 1..{cfg.max_samples_per_prompt} samples per prompt"
            )
        if len(params.stop) > cfg.max_stop_strings:
            raise InvalidInput("sampling.stop", f"has {len(params.stop)} strings; at most {cfg.max_stop_strings}")
        for i, stop in enumerate(params.stop):
            if not stop:
                raise InvalidInput(f"sampling.stop[{i}]", "is empty; every stop string needs at least one character")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        return ResolvedSampling(max_new, float(params.temperature), float(top_p), params.top_k, n, params.stop, seed)

    def _prepare(
        self, prompts: Sequence[Prompt], params: SamplingParams, model_version: str, field: str
    ) -> GenerationRun:
        if self._closed:
            raise ShuttingDown("the server is stopping; retry on another replica")
        if not prompts:
            raise InvalidInput(field, "is empty; send at least one prompt")
        if len(prompts) > self.config.max_prompts_per_request:
            raise LimitExceeded(
                f"{len(prompts)} prompts in one request, over the limit of "
                f"{self.config.max_prompts_per_request}; split the request"
            )
        resolved = self.resolve(params)
        rows = len(prompts) * resolved.n
        if rows > self.config.max_rows_per_request:
            raise LimitExceeded(
                f"{len(prompts)} prompts x n={resolved.n} = {rows} samples, over the limit of "
                f"{self.config.max_rows_per_request} per request; split the request or lower n"
            )
        # The version is fixed here, for the whole generation.
        model = self._versions.get(model_version)
        ids = model.encode(prompts, resolved.max_new_tokens, field)
        return model.start(ids, resolved, [p.id for p in prompts])

    async def _steps(self, run: GenerationRun) -> AsyncIterator[list[TokenEvent]]:
        loop = asyncio.get_running_loop()
        async with self._slots:
            self._active_generations += 1
            self._observer.on_active_generations(self._active_generations)
            try:
                while not run.done:
                    rows = run.active_rows
                    started = time.perf_counter()
                    events = await loop.run_in_executor(self._executor, run.step)
                    self._observer.on_batch(rows, time.perf_counter() - started)
                    yield events
            finally:
                self._active_generations -= 1
                self._observer.on_active_generations(self._active_generations)
        self._observer.on_samples(run.samples())

    async def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, model_version: str = ""
    ) -> GenerateResult:
        run = self._prepare(prompts, params, model_version, "prompts")
        async for _ in self._steps(run):
            pass
        info = run.policy.info
        return GenerateResult(run.samples(), info.version, info.tokenizer_fingerprint)

    async def generate_stream(
        self, prompt: Prompt, params: SamplingParams, model_version: str = ""
    ) -> tuple[GenerationRun, AsyncIterator[list[TokenEvent]]]:
        """Validates first (so errors surface before any token), then returns
        the run and its token events, one list per decoding step."""
        run = self._prepare([prompt], params, model_version, "prompt")
        return run, self._steps(run)

    async def close(self) -> None:
        """New requests are refused; running generations finish (the server's grace period bounds them)."""
        self._closed = True
