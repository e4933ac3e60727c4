"""What every Arbiter gRPC server shares: health, reflection, optional TLS
and token auth, a Prometheus endpoint on its own port, graceful stop."""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from services.common.handlers import DecodeGuard
from services.common.settings import ServerSettings

log = logging.getLogger(__name__)

_UNAUTHENTICATED_OK = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer-token check on every RPC except health and reflection (probes
    and debugging tools must work without the secret)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_UNAUTHENTICATED_OK):
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(sent.encode(), self._expected):
            return handler
        return _deny_like(handler)


def _deny_like(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'"

    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = dict(
        request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: Sequence[str]
    registry: CollectorRegistry
    grace_seconds: float
    metrics_port: int | None = None
    # The service's core engine and metrics, for tests and admin tooling.
    engine: Any = None
    metrics: Any = None
    _metrics_httpd: object | None = None
    _on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    _stopped: bool = False

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new RPCs, let in-flight ones finish (up to ``grace``), then
        release models and the metrics port."""
        if self._stopped:
            return
        self._stopped = True
        for name in (*self.service_names, ""):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(self.grace_seconds if grace is None else grace)
        for callback in self._on_stop:
            await callback()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()

    def on_stop(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._on_stop.append(callback)


async def start_server(
    settings: ServerSettings,
    service_names: Sequence[str],
    register: Callable[[grpc.aio.Server], None],
    registry: CollectorRegistry,
    *,
    engine: Any = None,
    metrics: Any = None,
) -> RunningServer:
    interceptors = [TokenAuthInterceptor(settings.auth_token)] if settings.auth_token else []
    # Innermost, so even a refused caller's undecodable body raises nothing.
    interceptors.append(DecodeGuard())
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert_file:
        creds = grpc.ssl_server_credentials(
            [(Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())]
        )
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    await server.start()
    running = RunningServer(server, port, health_servicer, service_names, registry, settings.grace_seconds,
                            engine=engine, metrics=metrics)
    if settings.metrics_port is not None:
        httpd, _ = start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
        running._metrics_httpd = httpd
        running.metrics_port = httpd.server_port
    for name in (*service_names, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return running


def serve_forever(
    create: Callable[[], Awaitable[tuple[RunningServer, int]]], banner: Callable[[RunningServer], str]
) -> None:
    """Run until SIGTERM/SIGINT, then stop gracefully."""

    async def main() -> None:
        running, _ = await create()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(banner(running), flush=True)
        await stop.wait()
        log.info("stopping: draining in-flight requests for up to %.1fs", running.grace_seconds)
        await running.stop()

    asyncio.run(main())
