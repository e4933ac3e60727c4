"""Client channels with deadlines, retries and client-side load balancing.

A target may name several replicas (``ipv4:127.0.0.1:5001,127.0.0.1:5002``
or a DNS name with several records); calls are spread round-robin and
retried on UNAVAILABLE, so one restarting replica delays but does not fail a
caller.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import grpc

RETRYABLE = ["UNAVAILABLE"]


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


def channel_options(services: Sequence[str], timeout_s: float, max_message_bytes: int) -> list[tuple[str, object]]:
    return [
        ("grpc.service_config", service_config(services, timeout_s)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def call_credentials_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def open_channel(
    target: str,
    services: Sequence[str],
    *,
    timeout_s: float = 30.0,
    tls_ca_file: str | None = None,
    max_message_bytes: int = 64 * 1024 * 1024,
    aio: bool = False,
):
    options = channel_options(services, timeout_s, max_message_bytes)
    module = grpc.aio if aio else grpc
    if tls_ca_file:
        with open(tls_ca_file, "rb") as fh:
            creds = grpc.ssl_channel_credentials(root_certificates=fh.read())
        return module.secure_channel(target, creds, options=options)
    return module.insecure_channel(target, options=options)
