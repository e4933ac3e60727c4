"""Settings shared by every gRPC server (``ServerSettings``) and by every
model server (``ModelServerSettings``); each service extends them.

Validated when constructed, with errors that name the field and what it
accepts (``arbiter.config``). The fields are the command-line flags too
(``arbiter.config.add_flags``): declared once, here and in the services'
settings, with the nested backend and batching settings of the core.
"""

from __future__ import annotations

import ipaddress
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
    # HTTPS for the metrics endpoint; with a client CA, scrapers must present
    # a certificate it signed (prometheus_client has no basic auth: a client
    # certificate is how a scraper proves who it is).
    metrics_tls_cert_file: str | None = field(default=None, metadata=flag(help="serve /metrics over HTTPS"))
    metrics_tls_key_file: str | None = field(default=None, metadata=flag(help="key of --metrics-tls-cert-file"))
    metrics_tls_client_ca_file: str | None = field(default=None, metadata=flag(
        help="scrapers must present a client certificate signed by this CA"))
    grace_seconds: float = 10.0
    # The scoring token: clients must send "authorization: Bearer <token>" on
    # every RPC when set. Never a flag (a token on the command line shows in
    # process listings), never in repr (settings get logged).
    auth_token: str | None = field(default=None, repr=False, metadata=flag(None))
    # The admin token: required for the control plane (loading, activating,
    # unloading versions; shadow scoring), which the scoring token cannot
    # reach. See services.common.server for the rules without tokens.
    admin_token: str | None = field(default=None, repr=False, metadata=flag(None))
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # mTLS: clients must present a certificate signed by this CA.
    tls_client_ca_file: str | None = field(default=None, metadata=flag(
        help="require client certificates signed by this CA (mTLS; needs --tls-cert-file)"))
    torch_threads: int | None = None
    max_message_bytes: int = 64 * 1024 * 1024
    # Clients resolve a service name (a Kubernetes headless Service, DNS round
    # robin) only when a connection drops, so without an age limit replicas
    # added later never get traffic. After this many seconds (gRPC adds ±10 %
    # jitter) the server sends GOAWAY: calls in flight finish, new calls go out
    # on a fresh connection to a freshly resolved address.
    max_connection_age_s: float | None = field(default=120.0, metadata=flag(
        help="close client connections after this many seconds (GOAWAY; calls in flight finish) so clients "
             "re-resolve and reach new replicas; unset: never"))

    def __post_init__(self) -> None:
        require(bool(self.host), "host", "must be a host name or address", self.host)
        require(0 <= self.port <= 65535, "port", "must be in 0..65535 (0 picks a free port)", self.port)
        if self.metrics_port is not None:
            require(0 <= self.metrics_port <= 65535, "metrics_port", "must be in 0..65535 or unset", self.metrics_port)
        require(self.grace_seconds >= 0, "grace_seconds", "must be >= 0", self.grace_seconds)
        for prefix in ("tls", "metrics_tls"):
            cert, key = getattr(self, f"{prefix}_cert_file"), getattr(self, f"{prefix}_key_file")
            require((cert is None) == (key is None), f"{prefix}_cert_file/{prefix}_key_file", "set both or neither",
                    (cert, key))
            client_ca = getattr(self, f"{prefix}_client_ca_file")
            require(client_ca is None or cert is not None, f"{prefix}_client_ca_file",
                    f"client certificates need TLS: set {prefix}_cert_file and {prefix}_key_file too", client_ca)
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "metrics_tls_cert_file",
                     "metrics_tls_key_file", "metrics_tls_client_ca_file"):
            value = getattr(self, name)
            if value is not None:
                require(Path(value).is_file(), name, "must be an existing file", value)
        for name in ("auth_token", "admin_token"):
            if getattr(self, name) is not None:
                require(len(getattr(self, name)) >= 16, name, "must be at least 16 characters", "<hidden>")
        if self.auth_token is not None and self.admin_token is not None:
            require(self.auth_token != self.admin_token, "admin_token",
                    "must differ from the scoring token (auth_token), or the scoring token has admin rights",
                    "<hidden>")
        if self.torch_threads is not None:
            require(self.torch_threads >= 1, "torch_threads", "must be >= 1 or unset", self.torch_threads)
        require(self.max_message_bytes >= 1024, "max_message_bytes", "must be >= 1024", self.max_message_bytes)
        if self.max_connection_age_s is not None:
            require(self.max_connection_age_s >= 0.1, "max_connection_age_s", "must be >= 0.1 seconds or unset",
                    self.max_connection_age_s)

    @property
    def max_receive_bytes(self) -> int:
        """gRPC's receive limit: a bigger request is refused before it is
        parsed. Servers with a request-size limit tighten it (``arbiter.limits``)."""
        return self.max_message_bytes

    @property
    def loopback_only(self) -> bool:
        """Whether the gRPC port is reachable from this machine only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


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
    # Loading past this many versions unloads the oldest inactive ones: each
    # holds a full copy of the weights, so the default is bounded (the active
    # version, one to roll back to, one candidate). 0: no limit.
    max_loaded_versions: int = field(default=3, metadata=flag(
        help="loaded versions kept; older inactive ones are unloaded (0: no limit)"))
    # LoadModelVersion only reads checkpoints under these directories (after
    # resolving symlinks). Empty: the directory holding --model, so sibling
    # versions load (REGISTRY/NAME/v2 beside v1); with Triton, the model
    # repository (REPO of --model REPO/NAME/N), the directory Triton loads from.
    model_roots: tuple[str, ...] = field(default=(), metadata=flag(
        action="append", metavar="DIR",
        help="a directory LoadModelVersion may load from (repeatable; default: the directory holding --model, "
             "with Triton the model repository)"))
    # A load still running after this long fails (DEADLINE_EXCEEDED) and
    # stops holding up other loads; see arbiter.kernel for what is abandoned.
    load_timeout_s: float = field(default=600.0, metadata=flag(
        help="a version load still running after this long fails with DEADLINE_EXCEEDED"))
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
        object.__setattr__(self, "model_roots", tuple(self.model_roots))
        for root in self.model_roots:
            require(Path(root).is_dir(), "model_roots", "must list existing directories", root)
        require(self.load_timeout_s > 0, "load_timeout_s", "must be > 0", self.load_timeout_s)
        require(isinstance(self.backend, BackendConfig), "backend", "must be a BackendConfig", self.backend)

    def allowed_model_roots(self) -> tuple[Path, ...]:
        """Where LoadModelVersion may read, symlinks resolved."""
        if self.model_roots:
            return tuple(Path(os.path.realpath(root)) for root in self.model_roots)
        holder = Path(os.path.realpath(self.model_dir)).parent
        return (holder.parent if self.backend.remote else holder,)


@dataclass(frozen=True)
class BatchedModelServerSettings(ModelServerSettings):
    """A model server whose requests are coalesced into batches (reward, reference)."""

    batching: BatchingConfig = BatchingConfig()

    def engine_fields(self) -> dict:
        """The ``arbiter.kernel.EngineConfig`` fields, queue delay resolved for the backend."""
        return dict(batching=self.batching.for_backend(self.backend.kind), max_tokens=self.max_tokens,
                    backend=self.backend, max_loaded_versions=self.max_loaded_versions,
                    load_timeout_s=self.load_timeout_s)


def _secret_from_env(name: str) -> str | None:
    value = os.environ.get(name)
    path = os.environ.get(f"{name}_FILE")
    if value is None and path:
        value = Path(path).read_text().strip()
    return value or None


def auth_token_from_env() -> str | None:
    """The scoring token: ARBITER_AUTH_TOKEN, or the contents of
    ARBITER_AUTH_TOKEN_FILE; never a CLI flag, so the token does not show up
    in process listings."""
    return _secret_from_env("ARBITER_AUTH_TOKEN")


def admin_token_from_env() -> str | None:
    """The admin token (control plane): ARBITER_ADMIN_TOKEN, or the contents
    of ARBITER_ADMIN_TOKEN_FILE."""
    return _secret_from_env("ARBITER_ADMIN_TOKEN")
