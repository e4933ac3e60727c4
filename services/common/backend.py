"""Backend selection, shared by every model service: the same settings fields,
flags and checks (``--backend triton --triton-url HOST:PORT --triton-model NAME``).

A service's settings dataclass declares the fields of ``BACKEND_FIELDS``
(see services/reward/settings.py), calls ``check_backend_settings`` in its
``__post_init__`` and ``backend_config`` to build its engine config.
"""

from __future__ import annotations

import argparse
from typing import Any

from arbiter.backends import BACKENDS, BackendConfig
from arbiter.batching import BatchingConfig
from arbiter.config import require

BACKEND_FIELDS = (
    "backend", "triton_url", "triton_model", "triton_timeout_s", "triton_retry_s", "triton_max_in_flight",
)


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backend", "where forward passes run (default: in this process)")
    group.add_argument("--backend", choices=BACKENDS, default="torch",
                       help="torch: in-process; triton: a Triton Inference Server (--model is then REPO/NAME/N)")
    group.add_argument("--triton-url", default="", help="HOST:PORT of Triton's gRPC endpoint")
    group.add_argument("--triton-model", default="", help="the model's name in Triton's repository")
    group.add_argument("--triton-timeout-s", type=float, default=30.0, help="per inference call")
    group.add_argument("--triton-retry-s", type=float, default=10.0,
                       help="how long an unreachable Triton is retried before a request fails UNAVAILABLE")
    group.add_argument("--triton-max-in-flight", type=int, default=2, help="batches outstanding at Triton per version")


def backend_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in BACKEND_FIELDS}


def check_backend_settings(settings: Any) -> None:
    require(settings.backend in BACKENDS, "backend", f"must be one of {', '.join(BACKENDS)}", settings.backend)
    if settings.backend == "triton":
        host, _, port = settings.triton_url.rpartition(":")
        require(bool(host) and port.isdigit(), "triton_url", "must be HOST:PORT of Triton's gRPC endpoint",
                settings.triton_url)
        require(bool(settings.triton_model), "triton_model", "must name the model in Triton's repository",
                settings.triton_model)
    require(settings.triton_timeout_s > 0, "triton_timeout_s", "must be > 0", settings.triton_timeout_s)
    require(settings.triton_retry_s >= 0, "triton_retry_s", "must be >= 0", settings.triton_retry_s)
    require(settings.triton_max_in_flight >= 1, "triton_max_in_flight", "must be >= 1", settings.triton_max_in_flight)


def backend_config(settings: Any) -> BackendConfig:
    return BackendConfig(**{name: getattr(settings, name) for name in BACKEND_FIELDS[1:]}, kind=settings.backend)


# Arbiter-side batching in front of a backend. Triton's own dynamic batcher
# does the waiting, so with it the default queue delay is 0.
DEFAULT_QUEUE_DELAY_MS = {"torch": 2.0, "triton": 0.0}


def check_batching_settings(settings: Any) -> None:
    """The batching fields the reward and reference settings share."""
    require(settings.max_batch_size >= 1, "max_batch_size", "must be >= 1", settings.max_batch_size)
    if settings.max_queue_delay_ms is not None:
        require(settings.max_queue_delay_ms >= 0, "max_queue_delay_ms", "must be >= 0 or unset",
                settings.max_queue_delay_ms)
    require(
        settings.max_queue_size >= settings.max_batch_size,
        "max_queue_size", f"must be >= max_batch_size ({settings.max_batch_size})", settings.max_queue_size,
    )


def batching_config(settings: Any) -> BatchingConfig:
    delay_ms = settings.max_queue_delay_ms
    if delay_ms is None:
        delay_ms = DEFAULT_QUEUE_DELAY_MS.get(settings.backend, 2.0)
    return BatchingConfig(
        max_batch_size=settings.max_batch_size,
        max_queue_delay_s=delay_ms / 1000.0,
        max_queue_size=settings.max_queue_size,
        enabled=settings.dynamic_batching,
    )
