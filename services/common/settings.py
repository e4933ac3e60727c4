"""Settings shared by every gRPC server (``ServerSettings``) and by every
model server (``ModelServerSettings``); each service extends them.

Validated when constructed, with errors that name the field and what it
accepts (``arbiter.config``). The fields are the command-line flags too
(``arbiter.config.add_flags``): declared once, here and in the services'
settings, with the nested backend and batching settings of the core.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from arbiter.backends import BackendConfig
from arbiter.batching import BatchingConfig
from arbiter.config import flag, require
from arbiter.net import LOOPBACK

@dataclass(frozen=True)
class ServerSettings:
    # Loopback by default: exposing a model server is a decision, not an accident.
    host: str = LOOPBACK
    port: int = 50051
    metrics_host: str = LOOPBACK
    # None: no metrics endpoint. 0: any free port.
    metrics_port: int | None = None
    grace_seconds: float = 10.0
    # Clients must send "authorization: Bearer <token>" when set. Never a
    # flag: a token on the command line shows in process listings.
    auth_token: str | None = field(default=None, metadata=flag(None))
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



@dataclass(frozen=True)
class ModelServerSettings(ServerSettings):
    """What every model server (reward, reference, policy) has: the model and
    its versions (``arbiter.kernel``) and where its forward passes run."""

    # Subclasses redefine it to say which kind of checkpoint they take.
    model_dir: str = field(default="", metadata=flag("--model", help="Hugging Face checkpoint directory"))
    # Overrides the version label in the checkpoint's arbiter.json.
    model_version: str | None = field(default=None, metadata=flag(
        help="version label (default: arbiter.json, else a content hash)"))
    # Caps the model's own limit (never raises it).
    max_tokens: int | None = field(default=None, metadata=flag(
        help="cap on tokens per sequence (default: the model's limit)"))
    # Loading past this many versions unloads the oldest inactive ones (0: no limit).
    max_loaded_versions: int = field(default=0, metadata=flag(
        help="loaded versions kept; older inactive ones are unloaded (0: no limit)"))
    # Where forward passes run. With Triton, model_dir (and every loaded path)
    # is a version directory REPO/NAME/N of an exported repository.
    backend: BackendConfig = BackendConfig()

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.model_dir), "model_dir", "must name a Hugging Face checkpoint directory (--model)",
                self.model_dir)
        if self.max_tokens is not None:
            require(self.max_tokens >= 1, "max_tokens", "must be >= 1 or unset", self.max_tokens)
        require(self.max_loaded_versions >= 0, "max_loaded_versions", "must be >= 0 (0: no limit)",
                self.max_loaded_versions)
        require(isinstance(self.backend, BackendConfig), "backend", "must be a BackendConfig", self.backend)


@dataclass(frozen=True)
class BatchedModelServerSettings(ModelServerSettings):
    """A model server whose requests are coalesced into batches (reward, reference)."""

    batching: BatchingConfig = BatchingConfig()

    def engine_fields(self) -> dict:
        """The ``arbiter.kernel.EngineConfig`` fields, queue delay resolved for the backend."""
        return dict(batching=self.batching.for_backend(self.backend.kind), max_tokens=self.max_tokens,
                    backend=self.backend, max_loaded_versions=self.max_loaded_versions)


def auth_token_from_env() -> str | None:
    """ARBITER_AUTH_TOKEN, or the contents of ARBITER_AUTH_TOKEN_FILE; never a CLI flag,
    so the token does not show up in process listings."""
    token = os.environ.get("ARBITER_AUTH_TOKEN")
    path = os.environ.get("ARBITER_AUTH_TOKEN_FILE")
    if token is None and path:
        token = Path(path).read_text().strip()
    return token or None
