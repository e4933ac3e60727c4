"""The one factory for the three model servers (reward, reference, policy).

Each service describes itself with a ``ModelServerSpec`` (its settings class,
metrics, engine and gRPC servicer); everything else is the same for all:
a model thread and a loader thread, the first version loaded through the
kernel (``arbiter.kernel``), ``ModelService`` over that kernel, version
metrics kept current by a kernel observer, health, reflection, TLS/auth,
graceful stop, and the command line (flags generated from the settings).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from grpc_health.v1 import health_pb2

from arbiter.config import add_flags, from_flags
from arbiter.kernel import VersionObserver
from arbiter.v1 import common_pb2_grpc
from services.common.client import MODEL_SERVICE
from services.common.metrics import RpcMetrics
from services.common.model_service import ModelServicer
from services.common.server import RunningServer, serve_forever, start_server
from services.common.settings import ModelServerSettings, auth_token_from_env

log = logging.getLogger(__name__)

# Closes what a service attached (a feedback producer, an update follower)
# before its engine and threads go.
Closer = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Attached:
    """Something a spec's ``register`` attached that gates readiness: health
    says NOT_SERVING (so a load balancer or Kubernetes' readiness probe sends
    no traffic) until ``ready()`` is true, e.g. a policy replica that has not
    yet applied the newest published update. Closed like a ``Closer``."""

    close: Closer
    ready: Callable[[], bool]
    waiting_for: str  # logged while not ready


READY_POLL_S = 0.1


@dataclass(frozen=True)
class ModelServerSpec:
    kind: str  # reward | reference | policy
    service_name: str  # the kind's gRPC service, e.g. arbiter.v1.RewardService
    settings: type[ModelServerSettings]
    metrics: Callable[[CollectorRegistry, Any], RpcMetrics]
    # (settings, model executor, loader executor, metrics) -> engine with a ``models`` kernel
    engine: Callable[[Any, ThreadPoolExecutor, ThreadPoolExecutor, Any], Any]
    # Adds the kind's servicer to the server; returns what to close at stop.
    register: Callable[[grpc.aio.Server, Any, Any, Any], list[Closer | Attached]]
    # Settings fields that come from elsewhere than flags (e.g. Kafka settings).
    extra_settings: Callable[[argparse.Namespace], dict[str, Any]] = lambda args: {}
    add_extra_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    # Appended to the startup line.
    banner: Callable[[Any], str] = lambda settings: ""


class VersionMetrics(VersionObserver):
    """``arbiter_model_active`` follows every load, activation and unload."""

    def __init__(self, metrics: RpcMetrics):
        self.metrics = metrics

    def on_versions_changed(self, active: str | None, loaded: list[str], removed: list[str]) -> None:
        self.metrics.set_versions(active, loaded, removed)


async def create_model_server(spec: ModelServerSpec, settings: ModelServerSettings) -> tuple[RunningServer, int]:
    registry = CollectorRegistry()
    metrics = spec.metrics(registry, settings)
    # One model thread: torch parallelises inside a forward pass; two would
    # only contend for the same cores. Loads get their own thread, so serving
    # goes on during a swap.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{spec.kind}-model")
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{spec.kind}-loader")
    engine = spec.engine(settings, executor, loader, metrics)
    closers: list[Closer] = []
    gates: list[Attached] = []

    async def release() -> None:
        for close in closers:
            await close()
        await engine.close()
        executor.shutdown(wait=True)
        loader.shutdown(wait=True)

    try:
        engine.models.add_observer(VersionMetrics(metrics))
        await engine.models.load_version(settings.model_dir, settings.model_version or "", activate=True)

        def register(server: grpc.aio.Server) -> None:
            for attached in spec.register(server, engine, metrics, settings):
                if isinstance(attached, Attached):
                    gates.append(attached)
                    closers.append(attached.close)
                else:
                    closers.append(attached)
            common_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(engine.models, metrics), server)

        running = await start_server(
            settings, (spec.service_name, MODEL_SERVICE), register, registry, engine=engine, metrics=metrics
        )
    except BaseException:
        await release()
        raise
    if gates:
        await gate_health(running, gates)
    running.on_stop(release)
    return running, running.port


async def gate_health(running: RunningServer, gates: list[Attached]) -> None:
    """NOT_SERVING until every gate is ready, then SERVING.

    Awaited right after ``start_server`` set SERVING: setting health never
    suspends (its lock is uncontended), so no probe runs in between and none
    can see SERVING before the gates allow it."""
    names = (*running.service_names, "")
    for name in names:
        await running.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def wait_ready() -> None:
        waiting = [gate for gate in gates if not gate.ready()]
        if waiting:
            log.info("health NOT_SERVING until ready: %s", "; ".join(gate.waiting_for for gate in waiting))
        while any(not gate.ready() for gate in gates):
            await asyncio.sleep(READY_POLL_S)
        if not running._stopped:
            for name in names:
                await running.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            log.info("ready: health SERVING")

    task = asyncio.get_running_loop().create_task(wait_ready(), name="readiness")

    async def cancel() -> None:
        task.cancel()

    running.on_stop(cancel)


def add_arguments(spec: ModelServerSpec, parser: argparse.ArgumentParser) -> None:
    add_flags(parser, spec.settings, required=("model_dir",))
    spec.add_extra_arguments(parser)


def settings_from_args(spec: ModelServerSpec, args: argparse.Namespace) -> ModelServerSettings:
    """Raises ``arbiter.config.ConfigError`` naming the bad setting."""
    return from_flags(spec.settings, args, auth_token=auth_token_from_env(), **spec.extra_settings(args))


def serve(spec: ModelServerSpec, settings: ModelServerSettings) -> None:
    """Run until SIGTERM/SIGINT, announcing what is served where."""

    def banner(running: RunningServer) -> str:
        info = running.engine.models.info()
        metrics = f", metrics on {settings.metrics_host}:{running.metrics_port}" if running.metrics_port else ""
        return (
            f"{spec.kind} service: model {info.name!r} version {info.version!r} on "
            f"{settings.host}:{running.port}{metrics}{spec.banner(settings)}"
        )

    serve_forever(lambda: create_model_server(spec, settings), banner)


def entry_points(spec: ModelServerSpec):
    """A service module's ``create_server(settings) -> (server, port)`` (tests:
    port 0 works), ``serve(settings)`` (deployment), and the CLI's
    ``add_arguments(parser)`` / ``settings_from_args(args)``."""

    async def create_server(settings: ModelServerSettings) -> tuple[RunningServer, int]:
        return await create_model_server(spec, settings)

    return (
        create_server,
        lambda settings: serve(spec, settings),
        lambda parser: add_arguments(spec, parser),
        lambda args: settings_from_args(spec, args),
    )
