"""Where an in-process model's weights live and in what precision: the
``--device`` and ``--dtype`` of every model service, and of ``arbiter triton
export`` for a model Triton runs.

Devices: ``cpu``, ``cuda`` (the current CUDA device), ``cuda:N``, or ``auto``
(``cuda`` when torch sees one, else ``cpu``; resolved when the service
starts). Dtypes: the weights' floating type. Whatever the weights' dtype,
what a service returns is computed in float32 or wider: reward scores are
cast up, log-softmax runs in float64 over up-cast logits, so half-precision
weights cost accuracy only in the forward pass itself.

Checkpoints are read in whatever dtype they were saved in (the PPO trainer
publishes float32) and cast once at load, so a bf16 service follows a float32
trainer without a conversion step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from arbiter.config import require

DTYPES = ("float32", "bfloat16", "float16")
DEVICE_FORMS = "cpu, cuda, cuda:N or auto"
_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d{1,3})?)$")


def is_device_name(value: Any) -> bool:
    return isinstance(value, str) and _DEVICE.match(value) is not None


def require_device(value: Any, field: str = "device") -> None:
    """ConfigError unless ``value`` names a device this machine has: the
    syntax first, then (only for cuda) whether torch sees that device, so a
    service refuses to start instead of failing its first request."""
    require(is_device_name(value), field, f"must be {DEVICE_FORMS}", value)
    if not value.startswith("cuda"):
        return
    import torch

    require(torch.cuda.is_available(), field,
            "CUDA is not available to torch on this machine (no GPU, no driver, or a CPU-only torch build); "
            "use cpu, or auto to take a GPU only when there is one", value)
    index = int(value.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    require(index < count, field, f"this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}", value)


@dataclass(frozen=True)
class Placement:
    """A resolved device (never ``auto``) and a dtype, applied at load;
    ``cudnn_attention``: on a GPU, leave PyTorch free to pick cuDNN's
    attention kernel (``shape_generic_attention`` says why it is not)."""

    device: str = "cpu"
    dtype: str = "float32"
    cudnn_attention: bool = False

    @classmethod
    def resolve(cls, device: str, dtype: str, cudnn_attention: bool = False) -> Placement:
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(device, dtype, cudnn_attention)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def place(self, model):
        """``model`` cast to the dtype (a no-op when already there) and moved
        to the device, in eval mode; on a GPU, attention then runs without
        cuDNN (``shape_generic_attention``) unless ``cudnn_attention``."""
        import torch

        if self.device.startswith("cuda") and not self.cudnn_attention:
            shape_generic_attention()
        if any(p.dtype != self.torch_dtype for p in model.parameters() if p.is_floating_point()):
            model = model.to(self.torch_dtype)
        return model.to(torch.device(self.device)).eval()


CPU_FLOAT32 = Placement()


def shape_generic_attention() -> None:
    """Scaled-dot-product attention without cuDNN's kernel, for this whole
    process: PyTorch then takes flash attention, or memory-efficient attention
    where a padding mask rules flash out.

    cuDNN's attention builds an execution plan for every new input shape
    (tens of milliseconds; later calls of that shape reuse it). A server's
    shapes change with every batch (rows, padded length) and every decoding
    step (one more cache column), so nearly every forward paid a build:
    measured on an H200 (torch 2.11, ``bench/gpu_profile.py``), the attention
    call held 46-68 % of the model threads' time and a policy decoding step
    took 34 ms in the service against 9.5 ms for the same engine repeating
    one request's shapes. Flash and memory-efficient attention need no plan.
    A service started with ``--cudnn-attention`` skips this (a workload of
    few shapes may prefer cuDNN; ``bench/gpu_check.py`` measures both)."""
    import torch

    torch.backends.cuda.enable_cudnn_sdp(False)


def model_device(model):
    """The device a model's inputs must be on: that of its parameters."""
    return next(model.parameters()).device


def device_and_dtype(model) -> tuple[str, str]:
    """(device, dtype) as a loaded model has them (``cuda:0`` rather than
    ``cuda``), for its ``ModelInfo``."""
    parameter = next(model.parameters())
    return str(parameter.device), str(parameter.dtype).removeprefix("torch.")
