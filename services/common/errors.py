"""The one place domain errors become gRPC status codes."""

from __future__ import annotations

import logging

import grpc

from arbiter.errors import (
    ArbiterError,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    FailedPrecondition,
    InvalidInput,
    LimitExceeded,
    LoadTimeout,
    ModelLoadError,
    Overloaded,
    PermissionDenied,
    ShuttingDown,
    VersionNotFound,
)

log = logging.getLogger(__name__)

# Status details travel in a header, which gRPC caps at 16 KiB (the caller
# would get RESOURCE_EXHAUSTED "metadata size exceeds hard limit" instead) and
# where non-ASCII bytes take 3 each: longer details, e.g. an echoed 1 MiB
# version label, keep their start and end.
MAX_DETAILS_CHARS = 1000


class UndecodableRequest(ArbiterError):
    """A request body, or a stream's message, that is not the RPC's message type."""

    def __init__(self, type_name: str, index: int | None = None):
        what = "request body" if index is None else f"message {index} of the request stream"
        super().__init__(f"{what} is not a valid {type_name} message")

_STATUS: dict[type[ArbiterError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    UndecodableRequest: grpc.StatusCode.INVALID_ARGUMENT,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # UNAVAILABLE, not RESOURCE_EXHAUSTED: a full queue is transient and
    # UNAVAILABLE is what client retry policies retry.
    Overloaded: grpc.StatusCode.UNAVAILABLE,
    VersionNotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    # Not retried by clients (only UNAVAILABLE is): a stuck load would just stick again.
    LoadTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    # Triton down or restarting, or the version reloading there: transient.
    BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    BackendTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    # Not the caller's fault and not transient; the message says what failed.
    BackendError: grpc.StatusCode.INTERNAL,
}


def status_for(err: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls in type(err).__mro__:
        if cls in _STATUS:
            return _STATUS[cls], bounded_details(str(err))
    # A bug, not the caller's fault: log it whole, tell the caller little.
    log.exception("unhandled error in RPC handler", exc_info=err)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(err).__name__}); the server logged the details"


def bounded_details(message: str) -> str:
    if len(message) <= MAX_DETAILS_CHARS:
        return message
    keep = MAX_DETAILS_CHARS // 2
    return f"{message[:keep]} [... {len(message) - 2 * keep} characters cut ...] {message[-keep:]}"
