"""What every Arbiter gRPC server shares: health, reflection, optional TLS
(and mTLS), the scoring and admin tokens, a Prometheus endpoint on its own
port, graceful stop.

Rights (``AuthInterceptor``, the one place they are checked):

- Health and reflection are open: probes and debugging tools need no secret.
- The data plane (scoring, generation, log-probs, model info, drift,
  preferences) needs the scoring token when one is configured
  (ARBITER_AUTH_TOKEN); the admin token is accepted there too.
- The control plane (``CONTROL_PLANE``: load, activate and unload versions,
  shadow scoring) needs the admin token (ARBITER_ADMIN_TOKEN). The scoring
  token is refused there with PERMISSION_DENIED, a missing or unknown token
  with UNAUTHENTICATED. A server with a scoring token but no admin token has
  no control plane (PERMISSION_DENIED saying so).
- With no token at all (development), everything is open if the server
  listens on loopback only; bound to another address, the control plane is
  refused (PERMISSION_DENIED) until an admin token is configured.

A refused call is counted in ``arbiter_requests_total`` under its method and
code like any other (only methods the server has: the labels stay bounded).
"""

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
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from arbiter.v1 import common_pb2, reward_pb2
from services.common.handlers import guarded_registration
from services.common.metrics import RpcMetrics, stop_metrics_endpoint
from services.common.settings import ServerSettings

log = logging.getLogger(__name__)

_UNAUTHENTICATED_OK = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _methods(descriptor, service: str, *names: str) -> set[str]:
    methods = descriptor.services_by_name[service].methods_by_name
    return {f"/{methods[name].containing_service.full_name}/{name}" for name in names}


# Every RPC that changes what a server serves.
CONTROL_PLANE = frozenset(
    _methods(common_pb2.DESCRIPTOR, "ModelService", "LoadModelVersion", "ActivateModelVersion", "UnloadModelVersion")
    | _methods(reward_pb2.DESCRIPTOR, "RewardService", "SetShadow")
)

_BEARER_HINT = "send metadata 'authorization: Bearer <token>'"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the caller's bearer token against the RPC's plane (see the module docstring)."""

    def __init__(self, scoring_token: str | None, admin_token: str | None, loopback_only: bool,
                 metrics: RpcMetrics | None = None):
        self._scoring = f"Bearer {scoring_token}".encode() if scoring_token else None
        self._admin = f"Bearer {admin_token}".encode() if admin_token else None
        self._loopback_only = loopback_only
        self._metrics = metrics

    def _is(self, sent: bytes, expected: bytes | None) -> bool:
        return expected is not None and hmac.compare_digest(sent, expected)

    def verdict(self, method: str, sent: bytes) -> tuple[grpc.StatusCode, str] | None:
        """None to let the call through, else the status to refuse it with."""
        admin, scoring = self._is(sent, self._admin), self._is(sent, self._scoring)
        if method not in CONTROL_PLANE:
            if self._scoring is None or scoring or admin:
                return None
            return grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong bearer token: {_BEARER_HINT}"
        if admin:
            return None
        if scoring:
            if self._admin is None:
                return grpc.StatusCode.PERMISSION_DENIED, (
                    f"{method} is a control-plane RPC and this server has no admin token: start it with "
                    "ARBITER_ADMIN_TOKEN (or ARBITER_ADMIN_TOKEN_FILE) to load, activate or unload versions and "
                    "set shadows")
            return grpc.StatusCode.PERMISSION_DENIED, (
                f"{method} is a control-plane RPC: the scoring token cannot change what is served; send the admin "
                "token")
        if self._admin is None and self._scoring is None:
            if self._loopback_only:
                return None
            return grpc.StatusCode.PERMISSION_DENIED, (
                f"{method} is a control-plane RPC: without tokens it is open only on a server bound to loopback; "
                "configure an admin token (ARBITER_ADMIN_TOKEN) to use it on this address")
        return grpc.StatusCode.UNAUTHENTICATED, f"missing or wrong admin token: {_BEARER_HINT}"

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_UNAUTHENTICATED_OK):
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        refused = self.verdict(details.method, sent.encode() if isinstance(sent, str) else sent)
        if refused is None:
            return handler
        # A method the server has (handler is not None): a bounded label.
        return _deny_like(handler, *refused, self._metrics, details.method.rsplit("/", 1)[-1])


def _deny_like(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str, metrics: RpcMetrics | None,
               method: str) -> grpc.RpcMethodHandler:
    async def deny(request, context):
        if metrics is None:
            await context.abort(code, message)
        with metrics.rpc(method) as final:
            final[0] = code
            await context.abort(code, message)

    async def deny_stream(request, context):
        await deny(request, context)
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


def interceptors_for(settings: ServerSettings, metrics: RpcMetrics | None = None) -> list[grpc.aio.ServerInterceptor]:
    """None when every RPC is open anyway (no tokens, loopback); ``metrics``
    counts the refused calls."""
    if settings.auth_token is None and settings.admin_token is None and settings.loopback_only:
        return []
    return [AuthInterceptor(settings.auth_token, settings.admin_token, settings.loopback_only, metrics)]


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials:
    """TLS with the server's certificate; with a client CA, mTLS: a client
    without a certificate signed by that CA fails the handshake."""
    client_ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())],
        root_certificates=client_ca, require_client_auth=client_ca is not None,
    )


def start_metrics_endpoint(settings: ServerSettings, registry: CollectorRegistry):
    """The /metrics HTTP(S) server; returns (httpd, port)."""
    tls = {}
    if settings.metrics_tls_cert_file:
        tls = dict(certfile=settings.metrics_tls_cert_file, keyfile=settings.metrics_tls_key_file,
                   client_cafile=settings.metrics_tls_client_ca_file,
                   client_auth_required=settings.metrics_tls_client_ca_file is not None)
    httpd, _ = start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry, **tls)
    return httpd, httpd.server_port


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
        stop_metrics_endpoint(self._metrics_httpd)

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
    interceptors = interceptors_for(settings, metrics)
    options = [
        ("grpc.max_receive_message_length", settings.max_receive_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    if settings.max_connection_age_s is not None:
        # No max_connection_age_grace: a long GenerateStream must never be cut off.
        options.append(("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)))
    # No interceptor at all without auth: grpc.aio then finds each RPC's
    # handler without running Python coroutines per call.
    server = grpc.aio.server(interceptors=interceptors or None, options=options)
    # Every handler guarded against undecodable bodies, as registered (a
    # refused caller's body included: the auth interceptor answers with the
    # guarded handler's deserializer).
    registration = guarded_registration(server)
    register(registration)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registration)
    # What reflection.enable_server_reflection does for an aio server.
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)),
        registration)
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert_file:
        port = server.add_secure_port(address, server_credentials(settings))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    await server.start()
    running = RunningServer(server, port, health_servicer, service_names, registry, settings.grace_seconds,
                            engine=engine, metrics=metrics)
    if settings.metrics_port is not None:
        running._metrics_httpd, running.metrics_port = start_metrics_endpoint(settings, registry)
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
