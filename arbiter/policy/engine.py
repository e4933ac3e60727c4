"""The policy engine: versions of a policy, request validation, generation
and hot swaps. Everything the policy service does except speak gRPC.

Swap semantics: a request resolves its version once, when it starts, and
keeps that model object to its last token, so in-flight requests finish on
the weights they started with while new requests get the newly activated
version. A new version is loaded and validated on a separate loader thread
(generation keeps running meanwhile) and only then activated, atomically; a
checkpoint that fails to load, changes parameter shapes or the tokenizer, or
gives non-finite logits is refused and the serving version is untouched.

Batching: continuous (``arbiter.policy.scheduler``). The rows (prompts x n
samples) of every running request of a version decode together, one forward
per step; requests join at step boundaries and rows leave as they finish,
within a KV-cache budget, behind a bounded queue. Every sample draws from its
own seeded uniform stream with its request's own sampling parameters, so a
seeded request gives the same tokens alone or beside others, except where the
float rounding of a differently shaped batch moves a token's CDF boundary
across its draw (log-probs agree to about 1e-6; see ``arbiter.policy.batch``).

With ``--backend triton`` the same scheduler runs inside Triton
(``arbiter.policy.backend``): this engine validates, tokenizes and keeps the
versions, and each request's tokens stream back from Triton into its
``Generation``.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from arbiter.backends import BackendConfig
from arbiter.backends.placement import CPU_FLOAT32, Placement
from arbiter.backends.triton import checkpoint_dir
from arbiter.config import flag, require
from arbiter.errors import FailedPrecondition, InvalidInput, LimitExceeded, ShuttingDown
from arbiter.kernel import KernelConfig, ModelKernel, ModelSpec
from arbiter.limits import TOKENIZER_THREADS, SizeBudget, SizeLimits, utf8_size
from arbiter.lm import check_compatible, check_same_model
from arbiter.policy.model import Generation, PolicyModel, ResolvedMask
from arbiter.policy.scheduler import DecodeObserver, DecodeScheduler, DecodingConfig, Ticket
from arbiter.policy.types import (
    ActionMask,
    GeneratedSample,
    GenerateResult,
    ResolvedSampling,
    SamplingParams,
    TokenEvent,
)
from arbiter.types import ModelInfo, Prompt


class PolicyObserver(DecodeObserver, Protocol):
    def on_samples(self, samples: Sequence[GeneratedSample]) -> None: ...


@dataclass(frozen=True)
class GenerationLimits:
    """What one Generate request may ask for; nested in the policy server's
    settings, so each is also its flag (``--max-rows-per-request``)."""

    max_prompts_per_request: int = field(default=64, metadata=flag(help="prompts in one request"))
    max_samples_per_prompt: int = field(default=16, metadata=flag(help="limit on sampling.n"))
    # prompts x n rows of one batched generation.
    max_rows_per_request: int = field(default=256, metadata=flag(help="limit on prompts x n"))
    # Upper limit a request may ask for; requests without one get the default.
    max_new_tokens: int = field(default=1024, metadata=flag(help="limit on sampling.max_new_tokens"))
    default_max_new_tokens: int = field(default=64, metadata=flag(help="sampling.max_new_tokens when unset"))
    max_stop_strings: int = field(default=8, metadata=flag(help="limit on sampling.stop"))
    max_stop_bytes: int = field(default=1024, metadata=flag(help="bytes of one stop string"))
    # Bytes per prompt and per request as sent; the service checks them
    # (``size_budget``) before converting a request.
    sizes: SizeLimits = SizeLimits()

    def __post_init__(self) -> None:
        for name in (
            "max_prompts_per_request", "max_samples_per_prompt", "max_rows_per_request", "max_new_tokens",
            "default_max_new_tokens",
        ):
            require(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        require(self.max_stop_strings >= 0, "max_stop_strings", "must be >= 0", self.max_stop_strings)
        require(self.max_stop_bytes >= 1, "max_stop_bytes", "must be >= 1", self.max_stop_bytes)
        require(self.default_max_new_tokens <= self.max_new_tokens, "default_max_new_tokens",
                f"must be <= max_new_tokens ({self.max_new_tokens})", self.default_max_new_tokens)


@dataclass(frozen=True)
class PolicyEngineConfig:
    limits: GenerationLimits = GenerationLimits()
    decoding: DecodingConfig = DecodingConfig()
    # Loaded versions kept; loading past it unloads the oldest inactive (0: no limit).
    max_loaded_versions: int = 2
    # Caps the model's own limit (never raises it).
    max_tokens: int | None = None
    # LoRA adapters loaded later apply to this base (the server's --model).
    base_model_dir: str | None = None
    # A load still running after this long fails and is abandoned (arbiter.kernel).
    load_timeout_s: float = 600.0
    # Device and dtype of every version's weights (--device / --dtype).
    placement: Placement = CPU_FLOAT32
    # Where generation runs: in-process (decoding below), or in Triton
    # (arbiter.policy.backend: the same engine, its budget set at export).
    backend: BackendConfig = BackendConfig()
    # Versions that ship ILQL heads (arbiter.ilql) sample from
    # softmax(logits + β·(min Q̂ − V)) with this β; None: such versions are
    # refused (sampling their policy alone would be another policy).
    ilql_beta: float | None = None


def check_replacement(new: PolicyModel, serving: PolicyModel) -> None:
    """Same tokenizer and parameter shapes (in Triton, the same
    architecture): a hot swap must not change the architecture."""
    if new.lm is None or serving.lm is None:
        check_same_model(new, serving)
    else:
        check_compatible(new.lm, serving.lm)


class PolicyEngine:
    def __init__(self, config: PolicyEngineConfig, executor: Executor, loader: Executor, observer: PolicyObserver):
        self.config = config
        self._executor = executor
        self._observer = observer
        # Generation is scheduled by the decode scheduler, not through the
        # kernel's batcher: the spec has no batch function.
        self.models: ModelKernel[PolicyModel] = ModelKernel(
            ModelSpec("policy", self._load, check_compatible=check_replacement),
            KernelConfig(max_loaded_versions=config.max_loaded_versions, load_timeout_s=config.load_timeout_s),
            executor=executor, loader=loader,
        )
        self.scheduler = DecodeScheduler(config.decoding, executor, observer)
        self._remote = None
        if config.backend.remote:
            from arbiter.policy.backend import TritonDecoder

            self._remote = TritonDecoder(config.backend)
        self._tokenizers = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="policy-tokenize")
        self._checks: dict[tuple[str, str | None], Callable[[], object]] = {}  # (path, version) -> load_checked's
        self._closed = False

    async def load_checked(self, path: str, version: str, check: Callable[[], object]) -> ModelInfo:
        """Load and activate ``version`` from ``path``; ``check`` (blocking;
        raising refuses the version) runs after the weights are read and
        probed and before the kernel takes the model, so a check that runs
        meanwhile (the follower hashing the same files) costs no time of
        its own, and a version that fails it never serves."""
        self._checks[(path, version)] = check
        try:
            return await self.models.load_version(path, version, activate=True)
        finally:
            self._checks.pop((path, version), None)

    def _load(self, path: str, version: str | None) -> PolicyModel:
        model = self._open(path, version)
        check = self._checks.get((path, version))
        if check is not None:
            try:
                check()
            except BaseException:
                model.release()
                raise
        return model

    def _open(self, path: str, version: str | None) -> PolicyModel:
        if self._remote is not None:
            return self._remote.open(path, version, self.config.max_tokens)
        # An exported version directory REPO/NAME/N serves its checkpoint/, as Triton does.
        return PolicyModel.load(
            checkpoint_dir(path), version=version, base_dir=self.config.base_model_dir, max_tokens=self.config.max_tokens,
            placement=self.config.placement, ilql_beta=self.config.ilql_beta,
        )

    def info(self, version: str = "") -> ModelInfo:
        return self.models.info(version)

    def model(self, version: str = "") -> PolicyModel:
        return self.models.get(version).model

    # -- requests -------------------------------------------------------

    def resolve(self, params: SamplingParams) -> ResolvedSampling:
        cfg = self.config.limits
        max_new = params.max_new_tokens or cfg.default_max_new_tokens
        if params.max_new_tokens < 0 or max_new > cfg.max_new_tokens:
            raise InvalidInput(
                "sampling.max_new_tokens",
                f"is {params.max_new_tokens}; allowed 1..{cfg.max_new_tokens} (0 means the server's "
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
        self.check_stops(params.stop)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        return ResolvedSampling(max_new, float(params.temperature), float(top_p), params.top_k, n, params.stop, seed)

    def resolve_mask(self, mask: ActionMask | None) -> ResolvedMask | None:
        """NLPO's action mask, validated and bound to its loaded version
        (NOT_FOUND if not loaded, as for the request's own version)."""
        if mask is None:
            return None
        if not mask.model_version:
            raise InvalidInput("mask_model_version", f"is empty but mask_top_p is {mask.top_p}; an action mask needs "
                               "the masking policy's version (set both or neither)")
        if not (math.isfinite(mask.top_p) and 0 < mask.top_p <= 1):
            raise InvalidInput("mask_top_p", f"is {mask.top_p}; must be in (0, 1] when mask_model_version is set")
        if self._remote is not None:
            raise FailedPrecondition("an action mask (mask_model_version) needs the weights in-process; this server "
                                     "generates in Triton (--backend triton)")
        return ResolvedMask(self.models.get(mask.model_version).model, float(mask.top_p))

    def check_stops(self, stops: Sequence[str]) -> None:
        """Stop strings, as sent: a service checks them before converting a request."""
        cfg = self.config.limits
        if len(stops) > cfg.max_stop_strings:
            raise InvalidInput("sampling.stop", f"has {len(stops)} strings; at most {cfg.max_stop_strings}")
        for i, stop in enumerate(stops):
            if not stop:
                raise InvalidInput(f"sampling.stop[{i}]", "is empty; every stop string needs at least one character")
            if (size := utf8_size(stop, cfg.max_stop_bytes)) > cfg.max_stop_bytes:
                raise LimitExceeded(
                    f"sampling.stop[{i}]: is at least {size} bytes, over the limit of {cfg.max_stop_bytes} "
                    "per stop string (max_stop_bytes)"
                )

    def check_count(self, count: int, field: str = "prompts") -> None:
        """A request's number of prompts: a service checks it before converting them."""
        if not count:
            raise InvalidInput(field, "is empty; send at least one prompt")
        if count > self.config.limits.max_prompts_per_request:
            raise LimitExceeded(
                f"{count} prompts in one request, over the limit of "
                f"{self.config.limits.max_prompts_per_request}; split the request"
            )

    def size_budget(self, model_version: str = "") -> SizeBudget:
        """The size limits of a request to ``model_version`` (NOT_FOUND if not loaded)."""
        return self.config.limits.sizes.budget(self.models.get(model_version).model.info.max_tokens)

    async def _start(
        self, prompts: Sequence[Prompt], params: SamplingParams, model_version: str, field: str, stream: bool = False,
        mask: ActionMask | None = None,
    ) -> tuple[Generation, Ticket]:
        """Validated, tokenized and queued for decoding (or refused)."""
        if self._closed:
            raise ShuttingDown("the server is stopping; retry on another replica")
        self.check_count(len(prompts), field)
        resolved = self.resolve(params)
        rows = len(prompts) * resolved.n
        if rows > self.config.limits.max_rows_per_request:
            raise LimitExceeded(
                f"{len(prompts)} prompts x n={resolved.n} = {rows} samples, over the limit of "
                f"{self.config.limits.max_rows_per_request} per request; split the request or lower n"
            )
        # The version (and the masking policy's) is fixed here, for the whole generation.
        model = self.models.get(model_version).model
        resolved_mask = self.resolve_mask(mask)
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(
            self._tokenizers, model.encode, prompts, resolved.max_new_tokens, field
        )
        generation = model.start(ids, resolved, [p.id for p in prompts], stream=stream, mask=resolved_mask)
        return generation, (model.submit(generation) if model.remote else self.scheduler.submit(generation))

    async def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, model_version: str = "",
        mask: ActionMask | None = None,
    ) -> GenerateResult:
        generation, ticket = await self._start(prompts, params, model_version, "prompts", mask=mask)
        await ticket.wait()
        samples = generation.samples()
        self._observer.on_samples(samples)
        info = generation.policy.info
        return GenerateResult(samples, info.version, info.tokenizer_fingerprint)

    async def generate_stream(
        self, prompt: Prompt, params: SamplingParams, model_version: str = "", mask: ActionMask | None = None,
    ) -> tuple[Generation, AsyncIterator[list[TokenEvent]]]:
        """Validates and queues first (so errors surface before any token),
        then returns the generation and its token events, one list per
        decoding step; closing the iterator early cancels the generation."""
        generation, ticket = await self._start([prompt], params, model_version, "prompt", stream=True, mask=mask)
        return generation, self._stream(generation, ticket)

    async def _stream(self, generation: Generation, ticket: Ticket) -> AsyncIterator[list[TokenEvent]]:
        steps = ticket.steps()
        try:
            async for events in steps:
                yield events
        finally:
            await steps.aclose()
        self._observer.on_samples(generation.samples())

    async def close(self) -> None:
        """New requests are refused; generations still running fail (the
        server's grace period has let in-flight requests finish before this)."""
        self._closed = True
        await self.scheduler.close()
        if self._remote is not None:
            # Versions stay loaded in Triton: a restarting service, or its other replicas, keep using them.
            await self._remote.aclose()
        self._tokenizers.shutdown(wait=False, cancel_futures=True)
