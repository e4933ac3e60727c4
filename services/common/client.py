"""Client channels with deadlines, retries and client-side load balancing,
and the part every service client shares (``ModelServiceClient``).

A target may name several replicas (``ipv4:127.0.0.1:5001,127.0.0.1:5002``
or a DNS name with several records); calls are spread round-robin and
retried on UNAVAILABLE, so one restarting replica delays but does not fail a
caller. That retry is the channel's; a caller that must outlast a longer
outage retries above it (the rollout worker's ``StageRetry``).

``ClientTLS`` is how every client reaches a TLS or mTLS server, and the
``--tls-*`` flags of every command that calls one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from arbiter.config import ConfigError, add_flags, flag, from_flags, require
from arbiter.v1 import common_pb2, common_pb2_grpc

RETRYABLE = ["UNAVAILABLE"]
MODEL_SERVICE = common_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name


def service_names(service: ServiceDescriptor) -> tuple[str, str]:
    """The services a model server answers on one port: its own and ModelService."""
    return service.full_name, MODEL_SERVICE


def service_config(services: Sequence[str], timeout_s: float, max_attempts: int = 5) -> str:
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [{"service": s} for s in services],
                    "timeout": f"{timeout_s:.3f}s",
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": RETRYABLE,
                    },
                }
            ],
        }
    )


def channel_options(
    services: Sequence[str],
    timeout_s: float,
    max_message_bytes: int,
    reconnect_backoff_s: tuple[float, float] | None = None,
) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.service_config", service_config(services, timeout_s)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if reconnect_backoff_s is not None:
        # gRPC's default reconnect backoff grows to 120 s: a service back after
        # a restart would sit unused for up to two minutes.
        initial_ms, max_ms = (int(s * 1000) for s in reconnect_backoff_s)
        options += [
            ("grpc.initial_reconnect_backoff_ms", initial_ms),
            ("grpc.min_reconnect_backoff_ms", initial_ms),
            ("grpc.max_reconnect_backoff_ms", max_ms),
        ]
    return options


def call_credentials_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


@dataclass(frozen=True)
class ClientTLS:
    """TLS as a client: the CA that signed the server's certificate (None:
    the system's roots) and, for a server that requires client certificates
    (mTLS), this client's certificate and key. Off when no field is set."""

    tls_ca_file: str | None = field(default=None, metadata=flag(
        help="CA bundle that signed the server's certificate (TLS)"))
    tls_cert_file: str | None = field(default=None, metadata=flag(
        help="this client's certificate, for a server that requires one (mTLS; with --tls-key-file)"))
    tls_key_file: str | None = field(default=None, metadata=flag(help="the key of --tls-cert-file"))

    def __post_init__(self) -> None:
        require((self.tls_cert_file is None) == (self.tls_key_file is None), "tls_cert_file/tls_key_file",
                "set both or neither", (self.tls_cert_file, self.tls_key_file))
        for name, value in asdict(self).items():
            if value is not None:
                require(Path(value).is_file(), name, "must be an existing file", value)

    @property
    def enabled(self) -> bool:
        return any(asdict(self).values())

    def kwargs(self) -> dict[str, Any]:
        """As the keyword arguments of ``open_channel`` and the clients."""
        return asdict(self)

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(root_certificates=read(self.tls_ca_file),
                                            private_key=read(self.tls_key_file),
                                            certificate_chain=read(self.tls_cert_file))


def add_client_tls_flags(parser: argparse.ArgumentParser) -> None:
    """``--tls-ca-file``, ``--tls-cert-file``, ``--tls-key-file`` on a command that calls a service."""
    add_flags(parser, ClientTLS)


def client_tls_from_args(args: argparse.Namespace, prog: str) -> ClientTLS:
    """The flags of ``add_client_tls_flags``; a wrong combination or a missing
    file ends the command with exit status 2 and a message naming the flag."""
    try:
        return from_flags(ClientTLS, args)
    except ConfigError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        raise SystemExit(2) from None


# What a failed TLS handshake looks like to a client: with TLS 1.3 a server
# that refuses the client's certificate (or its lack of one) just closes the
# connection once the client thinks the handshake is done.
_HANDSHAKE_SIGNS = ("ssl", "handshake", "certificate", "socket closed")


def rpc_error_text(err: grpc.RpcError, tls: ClientTLS | None = None) -> str:
    """``CODE: details`` of a failed call, with what to check when the
    connection failed as a TLS handshake does (``tls``: the client's)."""
    text = f"{err.code().name}: {err.details()}"
    if err.code() is not grpc.StatusCode.UNAVAILABLE or not any(
            sign in (err.details() or "").lower() for sign in _HANDSHAKE_SIGNS):
        return text
    if tls is None or not tls.enabled:
        return text + ("; the server closed the connection: if it serves TLS, pass --tls-ca-file (and "
                       "--tls-cert-file/--tls-key-file if it requires client certificates)")
    if tls.tls_cert_file is None:
        return text + ("; the server closed the connection during the TLS handshake: if it requires client "
                       "certificates (mTLS), pass --tls-cert-file and --tls-key-file; check that --tls-ca-file "
                       "is the CA of the server's certificate")
    return text + ("; the server closed the connection during the TLS handshake: check that it trusts the CA of "
                   "--tls-cert-file and that --tls-ca-file is the CA of the server's certificate")


def open_channel(
    target: str,
    services: Sequence[str],
    *,
    timeout_s: float = 30.0,
    tls_ca_file: str | None = None,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
    max_message_bytes: int = 64 * 1024 * 1024,
    reconnect_backoff_s: tuple[float, float] | None = None,
    aio: bool = False,
):
    """TLS when ``tls_ca_file`` (the server's CA) or a client certificate is
    given (``ClientTLS``; its ConfigError, a ValueError, names a wrong one)."""
    tls = ClientTLS(tls_ca_file or None, tls_cert_file or None, tls_key_file or None)
    options = channel_options(services, timeout_s, max_message_bytes, reconnect_backoff_s)
    module = grpc.aio if aio else grpc
    if tls.enabled:
        return module.secure_channel(target, tls.credentials(), options=options)
    return module.insecure_channel(target, options=options)


class ModelServiceClient:
    """One channel to a model server: its ``ModelService`` (``models``), the
    deadline (``timeout_s``, default ``DEFAULT_TIMEOUT_S``) and credentials of
    every call. Subclasses add the service's own stub and calls. ``reconnect_backoff_s``: (initial, max) seconds between
    reconnection attempts, for callers that must notice a restart quickly.

    ``token`` (the scoring token) goes with every call; control-plane calls
    (load, activate, unload, shadow) send ``admin_token`` instead when given
    (else the scoring token, which the server refuses there with a message
    that says so)."""

    SERVICE: ServiceDescriptor
    DEFAULT_TIMEOUT_S = 30.0

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float | None = None,
        token: str | None = None,
        admin_token: str | None = None,
        tls_ca_file: str | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        reconnect_backoff_s: tuple[float, float] | None = None,
    ):
        self.target = target
        self.timeout_s = timeout_s or self.DEFAULT_TIMEOUT_S
        self.channel = open_channel(
            target, service_names(self.SERVICE), timeout_s=self.timeout_s, tls_ca_file=tls_ca_file,
            tls_cert_file=tls_cert_file, tls_key_file=tls_key_file, reconnect_backoff_s=reconnect_backoff_s,
        )
        self.models = common_pb2_grpc.ModelServiceStub(self.channel)
        self.metadata = call_credentials_metadata(token)
        self.admin_metadata = call_credentials_metadata(admin_token) or self.metadata

    def info(
        self, model_version: str = "", *, timeout_s: float | None = None, wait_for_ready: bool = False
    ) -> common_pb2.ModelInfo:
        """The version's ModelInfo (default: the active one). ``wait_for_ready``
        waits up to the deadline for a server that is not up yet."""
        request = common_pb2.GetModelInfoRequest(model_version=model_version)
        return self.models.GetModelInfo(
            request, timeout=timeout_s or self.timeout_s, metadata=self.metadata, wait_for_ready=wait_for_ready
        ).info

    def load_version(self, path: str, version: str = "", activate: bool = True) -> common_pb2.LoadModelVersionResponse:
        """With ``activate``, the hot swap: in-flight requests finish on the old version."""
        request = common_pb2.LoadModelVersionRequest(path=path, version=version, activate=activate)
        return self.models.LoadModelVersion(request, timeout=self.timeout_s, metadata=self.admin_metadata)

    def activate_version(self, version: str) -> common_pb2.ActivateModelVersionResponse:
        """Atomic: the previous version stays loaded (activate it again to roll back)."""
        request = common_pb2.ActivateModelVersionRequest(version=version)
        return self.models.ActivateModelVersion(request, timeout=self.timeout_s, metadata=self.admin_metadata)

    def unload_version(self, version: str) -> common_pb2.UnloadModelVersionResponse:
        """Refused for the active version; in-flight requests on it finish first."""
        request = common_pb2.UnloadModelVersionRequest(version=version)
        return self.models.UnloadModelVersion(request, timeout=self.timeout_s, metadata=self.admin_metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
