"""Where a model's forward pass runs, behind one contract for every kind.

A service keeps its gRPC API, validation, tokenization, dynamic batching,
versions and metrics in-process; only the forward pass is behind a backend:

- ``torch`` (the default): the model is loaded into the service process
  (``arbiter.backends.inprocess``).
- ``triton``: the model runs inside an NVIDIA Triton Inference Server, reached
  with ``tritonclient`` over gRPC (``arbiter.backends.triton``); its repository
  is written by ``arbiter triton export``.

The contract: ``open_backends(config, kind).open(path, ...)`` returns a
``Backend`` that carries the version's tokenizer and ``ModelInfo`` and turns a
batch into results (``forward``; remote backends also ``forward_async``). What
differs between model kinds is data, a ``ModelKind``: how the in-process model
loads and runs, and the Triton tensors (``arbiter.backends.signatures``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from arbiter.backends.placement import DEVICE_FORMS, DTYPES, Placement, require_device
from arbiter.backends.signatures import TritonSignature
from arbiter.config import flag, require, require_choice
from arbiter.types import ModelInfo

BACKENDS = ("torch", "triton")
_HOST_PORT = re.compile(r"^[\w.\-]+:\d{1,5}$|^\[[0-9a-fA-F:]+\]:\d{1,5}$")


@dataclass(frozen=True)
class BackendConfig:
    kind: str = field(default="torch", metadata=flag(
        "--backend", choices=BACKENDS,
        help="torch: in-process; triton: a Triton Inference Server (--model is then REPO/NAME/N)"))
    # Triton's gRPC endpoint (HOST:PORT) and the model's name in its repository.
    triton_url: str = field(default="", metadata=flag(help="HOST:PORT of Triton's gRPC endpoint"))
    triton_model: str = field(default="", metadata=flag(help="the model's name in Triton's repository"))
    # Per inference call; a slower answer fails the batch with DEADLINE_EXCEEDED.
    triton_timeout_s: float = field(default=30.0, metadata=flag(help="per inference call"))
    # How long an unreachable Triton (restarting, say) is retried before the
    # batch fails with UNAVAILABLE; callers' own retry policies take it from there.
    triton_retry_s: float = field(default=10.0, metadata=flag(
        help="how long an unreachable Triton is retried before a request fails UNAVAILABLE"))
    # Model-control loads run a model's initialize (weights to device): slow.
    triton_load_timeout_s: float = field(default=600.0, metadata=flag(help="per model-control load in Triton"))
    # Batches outstanding at Triton at once, per version: 2 overlaps one
    # batch's round trip with the next one's compute.
    triton_max_in_flight: int = field(default=2, metadata=flag(help="batches outstanding at Triton per version"))
    # In-process weights (arbiter.backends.placement). CPU float32 by default:
    # the numbers the trainer recomputes, on any machine; a GPU is chosen.
    device: str = field(default="cpu", metadata=flag(
        help=f"where in-process weights run: {DEVICE_FORMS} (auto: cuda when available); "
             "with --backend triton, set at export"))
    dtype: str = field(default="float32", metadata=flag(
        choices=DTYPES, help="in-process weights' dtype (scores and log-probs stay float32); "
                             "with --backend triton, set at export"))
    # The torch backend's weights and forward passes in a child process per
    # version, so the forward does not share the GIL with the service's
    # request handling (arbiter.backends.model_process).
    model_process: bool = field(default=False, metadata=flag(
        help="torch backend: run each version's forward passes in a child process of the service (reward, "
             "reference), off the GIL the gRPC handlers use"))
    # A child can be killed where a thread cannot: a pass that hangs (a
    # deadlocked kernel, a wedged device) fails DEADLINE_EXCEEDED and the
    # child is replaced, instead of holding the version's batches forever.
    model_process_timeout_s: float = field(default=300.0, metadata=flag(
        help="with --model-process: a forward pass still running after this long is killed with its process "
             "(DEADLINE_EXCEEDED); the next batch starts a new one"))
    # torch.compile each version's forward before it serves (arbiter.backends.compiled).
    compile: bool = field(default=False, metadata=flag(
        help="torch backend: compile each version's forward pass with torch.compile before it serves (reward, "
             "reference); the first load of an architecture takes longer, later versions reuse its graphs"))
    # On a GPU attention runs without cuDNN unless this is set
    # (arbiter.backends.placement.shape_generic_attention: a plan per shape).
    cudnn_attention: bool = field(default=False, metadata=flag(
        help="torch backend on a GPU: let PyTorch use cuDNN's attention kernel (off by default: it builds a "
             "plan for every new input shape, and served shapes change with every batch and decoding step)"))

    def __post_init__(self) -> None:
        require_choice(self.kind, "backend", BACKENDS)
        if self.kind == "triton":
            require(bool(_HOST_PORT.match(self.triton_url)), "triton_url",
                    "must be HOST:PORT of Triton's gRPC endpoint", self.triton_url)
            require(bool(self.triton_model), "triton_model", "must name the model in Triton's repository",
                    self.triton_model)
        for name in ("triton_timeout_s", "triton_load_timeout_s"):
            require(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        require(self.triton_retry_s >= 0, "triton_retry_s", "must be >= 0", self.triton_retry_s)
        require(self.triton_max_in_flight >= 1, "triton_max_in_flight", "must be >= 1", self.triton_max_in_flight)
        require_choice(self.dtype, "dtype", DTYPES)
        require(self.model_process_timeout_s > 0, "model_process_timeout_s", "must be > 0",
                self.model_process_timeout_s)
        require(not (self.remote and self.model_process), "model_process",
                "applies to the torch backend (Triton runs models in processes of its own)", self.model_process)
        require(not (self.remote and self.compile), "compile",
                "applies to the torch backend (Triton runs the model as exported)", self.compile)
        require(not (self.remote and self.cudnn_attention), "cudnn_attention",
                "applies to the torch backend (Triton runs the model as exported)", self.cudnn_attention)
        require(not (self.cudnn_attention and self.device == "cpu"), "cudnn_attention",
                "applies on a GPU (--device cuda, cuda:N or auto); on the CPU there is no cuDNN",
                self.cudnn_attention)
        if self.remote:
            # Triton runs the weights as exported; a service-side value would be silently ignored.
            for name, default in (("device", "cpu"), ("dtype", "float32")):
                require(getattr(self, name) == default, name,
                        f"the triton backend runs the model as exported: set it with `arbiter triton export "
                        f"--{name}` (leave --{name} unset here)", getattr(self, name))
        else:
            require_device(self.device, "device")

    @property
    def remote(self) -> bool:
        return self.kind != "torch"

    def placement(self) -> Placement:
        """The in-process device (auto resolved) and dtype."""
        return Placement.resolve(self.device, self.dtype, self.cudnn_attention)


class Backend(Protocol):
    """One loaded version of a model, wherever it runs."""

    name: str  # reported as ModelInfo.backend
    tokenizer: Any
    info: ModelInfo

    def forward(self, batch: list) -> list:
        """Results of a batch, in order. Blocking: called on a model thread."""
        ...

    def release(self) -> None:
        """This version is being unloaded: free what it holds (for Triton,
        unload it from the server unless another loaded version shares it)."""
        ...


@runtime_checkable
class RemoteBackend(Backend, Protocol):
    """A backend whose forward runs elsewhere: awaited on the event loop, with
    up to ``max_in_flight`` batches outstanding."""

    max_in_flight: int

    async def forward_async(self, batch: list) -> list: ...


class Backends(Protocol):
    """Opens one backend per loaded version; owned by the service's kernel."""

    name: str

    def open(
        self, path: str | Path, *, version: str | None, max_tokens: int | None, base_dir: str | Path | None
    ) -> Backend: ...

    async def aclose(self) -> None: ...


def accept_any_config(config: Any, root: Path) -> None:
    """The default ``ModelKind.check_config`` (a named function: kinds are pickled to model processes)."""


@dataclass(frozen=True)
class ModelKind:
    """What one kind of model (reward, reference) supplies to the backends."""

    name: str
    # (checkpoint dir, base dir for LoRA adapters, placement) -> (torch model on
    # its device, tokenizer, HF config); blocking.
    load_torch: Callable[[Path, Path | None, Placement], tuple[Any, Any, Any]]
    # (torch model, batch) -> results as Python floats, inputs moved to the
    # model's device; what Triton's model.py runs too.
    forward_torch: Callable[[Any, list], list]
    # The same computation in Triton: its tensors and how a batch maps onto them.
    triton: TritonSignature
    # Refuse a checkpoint this kind cannot serve (reads the HF config only).
    check_config: Callable[[Any, Path], None] = accept_any_config
    # With Triton, LoRA adapters are merged at export.
    takes_adapters: bool = False
    # Batches of token id 0 whose forward passes reach every graph a compiled
    # model serves with (arbiter.backends.compiled): one row and several, one
    # token and several, padded and not. Empty: the kind is not compiled.
    warmup_batches: tuple[list, ...] = ()

    def load_for_serving(self, root: Path, base: Path | None, placement: Placement, compile: bool = False):
        """``load_torch``, then with ``compile`` the forward compiled and its
        graphs built (``arbiter.backends.compiled``): what a version's load
        runs, in the service or in its model process."""
        loaded = self.load_torch(root, base, placement)
        if compile:
            from arbiter.backends.compiled import compile_for_serving

            compile_for_serving(self, loaded[0], str(root))
        return loaded


def open_backends(config: BackendConfig, kind: ModelKind) -> Backends:
    if config.kind == "triton":
        from arbiter.backends.triton import TritonBackends

        return TritonBackends(config, kind)
    from arbiter.backends.inprocess import InProcessBackends

    return InProcessBackends(kind, config.placement(), model_process=config.model_process,
                             model_process_timeout_s=config.model_process_timeout_s, compile=config.compile)


def pad_token_id(config: Any, tokenizer: Any) -> int:
    """The id batches are right-padded with: the model config's, else the
    tokenizer's (which falls back to eos, as TRL does). For a reward model
    it decides which logit HF pools, so in-process and Triton must agree."""
    value = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    return int(value)


__all__: Sequence[str] = (
    "BACKENDS", "Backend", "BackendConfig", "Backends", "ModelKind", "RemoteBackend", "open_backends", "pad_token_id",
)
