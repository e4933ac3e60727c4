"""What the reward and reference kinds share about one loaded version: a
backend (in-process or Triton), its tokenizer and info, opened and validated
together (a version that fails validation is released, never served), and
the batch function the kernel's batcher runs."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from arbiter.backends import Backend, BackendConfig, Backends, ModelKind, RemoteBackend, open_backends
from arbiter.types import ModelInfo

Self = TypeVar("Self", bound="BackendModel")


class BackendModel:
    KIND: ClassVar[ModelKind]

    def __init__(self, backend: Backend | None, tokenizer: Any, info: ModelInfo):
        self.backend = backend
        self.tokenizer = tokenizer
        self.info = info

    @classmethod
    def open(cls: type[Self], model_dir: str | Path, backends: Backends | None = None, **options: Any) -> Self:
        """The version at ``model_dir`` (in-process unless ``backends`` says
        otherwise), validated; ``options``: version, max_tokens, base_dir for
        the backend, anything else for the kind's ``from_backend``."""
        backends = backends or open_backends(BackendConfig(), cls.KIND)
        backend_options = {name: options.pop(name, None) for name in ("version", "max_tokens", "base_dir")}
        backend = backends.open(model_dir, **backend_options)
        try:
            loaded = cls.from_backend(backend, model_dir, **options)
            loaded.validate()
        except BaseException:
            backend.release()
            raise
        return loaded

    @classmethod
    def from_backend(cls: type[Self], backend: Backend, model_dir: str | Path) -> Self:
        return cls(backend, backend.tokenizer, backend.info)

    def validate(self) -> None:
        """Refuse a version that cannot serve (raises ModelLoadError)."""

    def to_backend(self, items: Sequence[Any]) -> list:
        """The batcher's items as the backend's batch (the same by default)."""
        return list(items)

    def forward(self, items: Sequence[Any]) -> list:
        """Results of a batch (blocking: on the model thread)."""
        return self.backend.forward(self.to_backend(items))

    async def forward_async(self, items: Sequence[Any]) -> list:
        """The same through a remote backend, awaited on the event loop."""
        return await self.backend.forward_async(self.to_backend(items))

    def batch_function(self):
        """What this version's batcher runs: a remote backend is awaited with
        up to its ``max_in_flight`` batches out; a local one runs on the model
        thread, one batch at a time."""
        if isinstance(self.backend, RemoteBackend):
            return self.forward_async, self.backend.max_in_flight
        return self.forward, 1

    @property
    def runs_apart(self) -> bool:
        """Whether its forward passes run in a process of their own (a model
        process), not on the service's cores."""
        return bool(getattr(self.backend, "own_process", False))

    def batch_clock(self) -> Callable[[], float]:
        """The clock this version's batcher times forward passes with (the
        backend's ``batch_clock`` if it has one, else wall time)."""
        clock = getattr(self.backend, "batch_clock", None)
        return clock() if clock is not None else time.perf_counter

    def release(self) -> None:
        """Free the backend's hold on this version (it is being unloaded)."""
        self.backend.release()


class BackendEngine:
    """The engine of a backend kind (reward, reference): its backends and its
    versioned-model kernel, with one batcher per version. Subclasses add the
    kind's requests; ``load_options`` what else a version loads with."""

    MODEL: ClassVar[type[BackendModel]]
    # (new, serving) -> raises ModelLoadError unless new can replace serving; None: any version may.
    COMPATIBLE: ClassVar[Callable[[Any, Any], None] | None] = None
    # A version's items as its batcher sizes them (arbiter.batching.ItemShape).
    ITEMS: ClassVar[Callable[[Any], Any] | None] = None

    def __init__(self, config, executor, loader, observer):
        from arbiter.kernel import ModelKernel, ModelSpec

        self.config = config
        self._observer = observer
        self._backends = open_backends(config.backend, self.MODEL.KIND)
        self.models = ModelKernel(
            ModelSpec(self.MODEL.KIND.name, self._load, self.MODEL.batch_function, type(self).COMPATIBLE,
                      type(self).ITEMS, self.MODEL.batch_clock),
            config.kernel_config(), executor=executor, loader=loader, batch_observer=observer,
        )

    def load_options(self) -> dict[str, Any]:
        return {}

    def _load(self, path: str, version: str | None) -> BackendModel:
        return self.MODEL.open(path, self._backends, version=version, max_tokens=self.config.max_tokens,
                               **self.load_options())

    def info(self, version: str = "") -> ModelInfo:
        return self.models.info(version)

    async def close(self) -> None:
        """Stop serving. Versions stay loaded in a remote backend (Triton):
        a restarting service, or its other replicas, keep using them."""
        await self.models.close()
        await self._backends.aclose()
