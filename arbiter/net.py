"""Addresses every local component binds by default."""

from __future__ import annotations

import socket

# Loopback by default: exposing a server is a decision, not an accident.
LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A port free on ``host`` now (for local processes told their port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
