"""The one factory for the three model servers (reward, reference, policy).

Each service describes itself with a ``ModelServerSpec`` (its settings class,
metrics, engine and gRPC servicer); everything else is the same for all:
a model thread and a release thread (loads run on threads of their own), the
first version loaded through the kernel (``arbiter.kernel``), ``ModelService``
over that kernel, version
metrics kept current by a kernel observer, health, reflection, TLS/auth,
graceful stop, and the command line (flags generated from the settings).
"""

from __future__ import annotations

import argparse
import errno
import socket
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from arbiter.config import add_flags, from_flags
from arbiter.errors import ArbiterError
from arbiter.kernel import VersionObserver
from arbiter.v1 import common_pb2_grpc
from services.common.client import MODEL_SERVICE
from services.common.metrics import RpcMetrics
from services.common.model_service import ModelServicer
from services.common.readiness import Attached, gate_health
from services.common.server import RunningServer, serve_forever, start_server
from services.common.settings import ModelServerSettings, admin_token_from_env, auth_token_from_env

# Closes what a service attached (a feedback producer, an update follower)
# before its engine and threads go.
Closer = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class ModelServerSpec:
    kind: str  # reward | reference | policy
    service_name: str  # the kind's gRPC service, e.g. arbiter.v1.RewardService
    settings: type[ModelServerSettings]
    metrics: Callable[[CollectorRegistry, Any], RpcMetrics]
    # (settings, model executor, loader executor, metrics) -> engine with a ``models`` kernel
    engine: Callable[[Any, ThreadPoolExecutor, ThreadPoolExecutor, Any], Any]
    # Adds the kind's servicer to the server; returns what to close at stop
    # (an Attached also holds health at NOT_SERVING until it is ready).
    register: Callable[[grpc.aio.Server, Any, Any, Any], list[Closer | Attached]]
    # Settings fields that come from elsewhere than flags (e.g. Kafka settings).
    extra_settings: Callable[[argparse.Namespace], dict[str, Any]] = lambda args: {}
    add_extra_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    # Appended to the startup line.
    banner: Callable[[Any], str] = lambda settings: ""
    # (engine, settings), awaited after the first version loads and before
    # serving: what else the configuration needs loaded (a reward spec's models).
    prepare: Callable[[Any, Any], Awaitable[None]] | None = None


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
    # only contend for the same cores. Loads run off it (arbiter.kernel), so
    # serving goes on during a swap; the loader thread releases versions.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{spec.kind}-model")
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{spec.kind}-loader")
    engine = spec.engine(settings, executor, loader, metrics)
    closers: list[Closer] = []

    async def release() -> None:
        for close in closers:
            await close()
        await engine.close()
        executor.shutdown(wait=True)
        loader.shutdown(wait=True)

    try:
        engine.models.add_observer(VersionMetrics(metrics))
        await engine.models.load_version(settings.model_dir, settings.model_version or "", activate=True)
        if spec.prepare is not None:
            await spec.prepare(engine, settings)

        def register(server: grpc.aio.Server) -> None:
            closers.extend(spec.register(server, engine, metrics, settings))
            common_pb2_grpc.add_ModelServiceServicer_to_server(
                ModelServicer(engine.models, metrics, settings.allowed_model_roots()), server)

        running = await start_server(
            settings, (spec.service_name, MODEL_SERVICE), register, registry, engine=engine, metrics=metrics
        )
    except BaseException:
        await release()
        raise
    await gate_health(running, [close for close in closers if isinstance(close, Attached)])
    running.on_stop(release)
    return running, running.port


def add_arguments(spec: ModelServerSpec, parser: argparse.ArgumentParser) -> None:
    add_flags(parser, spec.settings, required=("model_dir",))
    spec.add_extra_arguments(parser)


def settings_from_args(spec: ModelServerSpec, args: argparse.Namespace) -> ModelServerSettings:
    """Raises ``arbiter.config.ConfigError`` naming the bad setting."""
    return from_flags(spec.settings, args, auth_token=auth_token_from_env(), admin_token=admin_token_from_env(),
                      **spec.extra_settings(args))


class PortInUse(ArbiterError):
    """A port the server was told to listen on is taken."""

    def __init__(self, host: str, port: int, flag: str):
        super().__init__(f"{host}:{port} is already in use (is another server running there?); "
                         f"choose another port with {flag}")


def _check_ports_free(settings: ModelServerSettings) -> None:
    """Before the (slow) model load: a taken port is reported at once, in one
    line. SO_REUSEADDR as the servers set it, so a port only in TIME_WAIT
    counts as free."""
    wanted = [(settings.host, settings.port, "--port")]
    if settings.metrics_port:
        wanted.append((settings.metrics_host, settings.metrics_port, "--metrics-port"))
    for host, port, flag in wanted:
        if not port:
            continue
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            continue  # the server's own bind reports an unusable host
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise PortInUse(host, port, flag) from None


def serve(spec: ModelServerSpec, settings: ModelServerSettings) -> None:
    """Run until SIGTERM/SIGINT, announcing what is served where. Raises
    PortInUse (before loading anything, or if the port was taken meanwhile)
    and the first version's load errors (ArbiterError)."""

    def banner(running: RunningServer) -> str:
        info = running.engine.models.info()
        metrics = f", metrics on {settings.metrics_host}:{running.metrics_port}" if running.metrics_port else ""
        return (
            f"{spec.kind} service: model {info.name!r} version {info.version!r} on "
            f"{settings.host}:{running.port}{metrics}{spec.banner(settings)}"
        )

    _check_ports_free(settings)
    try:
        serve_forever(lambda: create_model_server(spec, settings), banner)
    except RuntimeError as err:
        # grpc's bind failure; taken while the model loaded.
        if str(err).startswith("Failed to bind"):
            raise PortInUse(settings.host, settings.port, "--port") from None
        raise
    except OSError as err:
        # The metrics endpoint's bind (prometheus_client), likewise.
        if err.errno == errno.EADDRINUSE and settings.metrics_port:
            raise PortInUse(settings.metrics_host, settings.metrics_port, "--metrics-port") from None
        raise


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
