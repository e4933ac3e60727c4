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

_STATUS: dict[type[ArbiterError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
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
            return _STATUS[cls], str(err)
    # A bug, not the caller's fault: log it whole, tell the caller little.
    log.exception("unhandled error in RPC handler", exc_info=err)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(err).__name__}); the server logged the details"
