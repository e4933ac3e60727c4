"""Domain errors. Services map each class to one gRPC status in one place
(``services.common.errors``); messages are written for the caller to act on."""

from __future__ import annotations


class ArbiterError(Exception):
    """Base class; ``str(err)`` is the user-facing message."""


class InvalidInput(ArbiterError):
    """The request is malformed; ``field`` names what to fix (e.g. ``inputs[3].text.response``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class LimitExceeded(ArbiterError):
    """The request asks for more than a configured limit allows."""


class Overloaded(ArbiterError):
    """The server's queue is full; retry with backoff."""


class VersionNotFound(ArbiterError):
    def __init__(self, version: str, available: list[str]):
        listed = ", ".join(sorted(available)) or "none"
        super().__init__(f"model version {version!r} is not loaded (loaded: {listed})")
        self.version = version


class FailedPrecondition(ArbiterError):
    """The request is well-formed but the server's state does not allow it."""


class ModelLoadError(ArbiterError):
    """A checkpoint could not be loaded or failed validation; nothing was swapped."""


class PermissionDenied(ArbiterError):
    """The caller may not do this here (e.g. load a model from outside the allowed roots)."""


class LoadTimeout(ArbiterError):
    """A model version did not finish loading within the configured time; nothing was swapped."""


class ShuttingDown(ArbiterError):
    """The server is draining and takes no new work."""


class BackendUnavailable(ArbiterError):
    """The model server behind this service (Triton) cannot be reached, or the
    model version is not loaded there yet; transient: retry with backoff."""


class BackendTimeout(ArbiterError):
    """The model server did not answer within the configured time."""


class BackendError(ArbiterError):
    """The model server answered with a failure it will repeat on retry (the
    model raised, or it does not take the tensors Arbiter sends)."""
