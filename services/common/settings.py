"""Settings shared by every gRPC server; each service extends them.

Validated when constructed, with errors that name the field and what it
accepts. Loaded only in a service's ``main()``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from arbiter.config import require

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServerSettings:
    # Loopback by default: exposing a model server is a decision, not an accident.
    host: str = LOOPBACK
    port: int = 50051
    metrics_host: str = LOOPBACK
    # None: no metrics endpoint. 0: any free port.
    metrics_port: int | None = None
    grace_seconds: float = 10.0
    # Clients must send "authorization: Bearer <token>" when set.
    auth_token: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    torch_threads: int | None = None
    max_message_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        require(bool(self.host), "host", "must be a host name or address", self.host)
        require(0 <= self.port <= 65535, "port", "must be in 0..65535 (0 picks a free port)", self.port)
        if self.metrics_port is not None:
            require(0 <= self.metrics_port <= 65535, "metrics_port", "must be in 0..65535 or unset", self.metrics_port)
        require(self.grace_seconds >= 0, "grace_seconds", "must be >= 0", self.grace_seconds)
        require(
            (self.tls_cert_file is None) == (self.tls_key_file is None),
            "tls_cert_file/tls_key_file", "set both or neither", (self.tls_cert_file, self.tls_key_file),
        )
        for name in ("tls_cert_file", "tls_key_file"):
            value = getattr(self, name)
            if value is not None:
                require(Path(value).is_file(), name, "must be an existing file", value)
        if self.auth_token is not None:
            require(len(self.auth_token) >= 16, "auth_token", "must be at least 16 characters", "<hidden>")
        if self.torch_threads is not None:
            require(self.torch_threads >= 1, "torch_threads", "must be >= 1 or unset", self.torch_threads)
        require(self.max_message_bytes >= 1024, "max_message_bytes", "must be >= 1024", self.max_message_bytes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def auth_token_from_env() -> str | None:
    """ARBITER_AUTH_TOKEN, or the contents of ARBITER_AUTH_TOKEN_FILE; never a CLI flag,
    so the token does not show up in process listings."""
    token = os.environ.get("ARBITER_AUTH_TOKEN")
    path = os.environ.get("ARBITER_AUTH_TOKEN_FILE")
    if token is None and path:
        token = Path(path).read_text().strip()
    return token or None
