"""Where a service's forward passes run.

A service keeps its gRPC API, validation, tokenization, dynamic batching,
versions and metrics in-process; only the model's forward pass is behind a
backend. Two kinds:

- ``torch`` (the default): the model is loaded into the service process.
- ``triton``: the model runs inside an NVIDIA Triton Inference Server, reached
  with ``tritonclient`` over gRPC (see ``arbiter.backends.triton``); its
  repository is written by ``arbiter triton export``.

Each model kind defines its own small backend protocol over token ids (the
reward one is ``arbiter.reward.backend.RewardBackend``); this package holds
what all kinds share: the settings, the Triton client with retries, error
mapping and model control, the repository exporter and a local launcher.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BACKENDS = ("torch", "triton")
_HOST_PORT = re.compile(r"^[\w.\-\[\]:]+:\d{1,5}$")


@dataclass(frozen=True)
class BackendConfig:
    kind: str = "torch"
    # Triton's gRPC endpoint (HOST:PORT) and the model's name in its repository.
    triton_url: str = ""
    triton_model: str = ""
    # Per inference call; a slower answer fails the batch with DEADLINE_EXCEEDED.
    triton_timeout_s: float = 30.0
    # How long an unreachable Triton (restarting, say) is retried before the
    # batch fails with UNAVAILABLE; callers' own retry policies take it from there.
    triton_retry_s: float = 10.0
    # Model-control loads run a model's initialize (weights to device): slow.
    triton_load_timeout_s: float = 600.0
    # Batches outstanding at Triton at once, per version: 2 overlaps one
    # batch's round trip with the next one's compute.
    triton_max_in_flight: int = 2

    def __post_init__(self) -> None:
        if self.kind not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.kind!r}")
        if self.kind == "triton":
            if not _HOST_PORT.match(self.triton_url):
                raise ValueError(f"triton_url must be HOST:PORT of Triton's gRPC endpoint, got {self.triton_url!r}")
            if not self.triton_model:
                raise ValueError("triton_model must name the model in Triton's repository")
        for name in ("triton_timeout_s", "triton_load_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.triton_retry_s < 0:
            raise ValueError(f"triton_retry_s must be >= 0, got {self.triton_retry_s}")
        if self.triton_max_in_flight < 1:
            raise ValueError(f"triton_max_in_flight must be >= 1, got {self.triton_max_in_flight}")
