"""Addresses every local component binds by default."""

from __future__ import annotations

import socket

# Loopback by default: exposing a server is a decision, not an accident.
LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK, count: int = 1) -> int:
    """A port free on ``host`` now (for local processes told their port);
    with ``count``, the first of that many consecutive free ports (the
    trainer's ranks serve metrics on port + rank)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            first = sock.getsockname()[1]
        if all(_bindable(host, port) for port in range(first + 1, first + count)):
            return first
    raise OSError(f"no {count} consecutive free ports on {host}")


def _bindable(host: str, port: int) -> bool:
    if port > 65535:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True
