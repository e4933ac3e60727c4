"""What gives every RPC handler the same error mapping and metrics: the
``unary`` and ``streaming`` decorators, over a servicer with
``self.metrics: RpcMetrics`` (``Servicer`` is the base that holds it); and
``DecodeGuard``, which makes a request that does not parse an ordinary
INVALID_ARGUMENT on every RPC of a server (registered through
``guarded_registration``)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc

from services.common.errors import UndecodableRequest, status_for
from services.common.metrics import RpcMetrics

log = logging.getLogger(__name__)


class Servicer:
    """A service's handlers over its core engine (or kernel) and its metrics."""

    def __init__(self, engine: Any, metrics: RpcMetrics):
        self.engine = engine
        self.metrics = metrics


# A client whose deadline passes cancels the call itself, and its cancel can
# reach the server before the server's own copy of the deadline expires: the
# server started counting when the request arrived, after the client did.
# A cancel this close to the deadline is the deadline's.
_DEADLINE_SKEW_S = 0.05


def _cancel_code(context) -> grpc.StatusCode:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= _DEADLINE_SKEW_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


@asynccontextmanager
async def _handled(metrics: RpcMetrics, method: str, context) -> AsyncIterator[None]:
    """Times and counts the RPC under its final code; a domain error aborts
    it with its status (``services.common.errors``)."""
    with metrics.rpc(method) as code:
        try:
            yield
        except asyncio.CancelledError:
            code[0] = _cancel_code(context)
            raise
        except grpc.aio.AbortError:
            code[0] = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except Exception as err:
            code[0], message = status_for(err)
            await context.abort(code[0], message)


def unary(method: str):
    def decorate(fn):
        # ``_handled`` spelled out: its two context managers cost more event-loop
        # time than the rest of a small request's bookkeeping.
        @functools.wraps(fn)
        async def handler(self, request, context):
            code = grpc.StatusCode.OK
            started = time.perf_counter()
            try:
                return await fn(self, _decoded(request), context)
            except asyncio.CancelledError:
                code = _cancel_code(context)
                raise
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception as err:
                code, message = status_for(err)
                await context.abort(code, message)
            finally:
                self.metrics.record_rpc(method, code, time.perf_counter() - started)

        handler.takes_undecodable = True
        return handler

    return decorate


def streaming(method: str):
    """For handlers that are async generators (server or bidi streaming)."""

    def decorate(fn):
        @functools.wraps(fn)
        async def handler(self, request, context):
            async with _handled(self.metrics, method, context):
                async for response in fn(self, _decoded(request), context):
                    yield response

        handler.takes_undecodable = True
        return handler

    return decorate


# -- request bodies that do not parse ----------------------------------------
#
# gRPC runs the request deserializer before any handler: a DecodeError there
# answers UNKNOWN and logs a traceback per request, and in a request stream it
# is raised into whatever reads the stream. ``DecodeGuard`` gives every
# handler a deserializer that returns ``Undecodable`` instead; the decorators
# above (and ``_guarded`` for handlers without them: health, reflection) turn
# it into UndecodableRequest, INVALID_ARGUMENT.


class Undecodable:
    """A body that did not parse as ``type_name``."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str):
        self.type_name = type_name


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message_type = getattr(deserializer, "__self__", None)
    type_name = getattr(getattr(message_type, "DESCRIPTOR", None), "full_name", "request")

    def deserialize(body: bytes) -> Any:
        try:
            return deserializer(body)
        except Exception:  # DecodeError, or whatever a custom deserializer raises
            # Debug only: a client sending garbage must not be able to flood the log.
            log.debug("request body of %d bytes is not a valid %s", len(body), type_name)
            return Undecodable(type_name)

    return deserialize


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    index = 0
    async for request in requests:
        if isinstance(request, Undecodable):
            raise UndecodableRequest(request.type_name, index)
        index += 1
        yield request


def _decoded(request: Any) -> Any:
    """A unary request as parsed (UndecodableRequest if it did not), or a
    request stream that raises UndecodableRequest at its first bad message."""
    if isinstance(request, Undecodable):
        raise UndecodableRequest(request.type_name)
    if hasattr(request, "__aiter__"):
        return _decoded_stream(request)
    return request


def _guarded(behavior: Callable) -> Callable:
    """A handler without the decorators (health, reflection), answering
    INVALID_ARGUMENT for an undecodable request."""

    async def refuse(err: UndecodableRequest, context) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))

    if inspect.isasyncgenfunction(behavior):
        async def guarded_stream(request, context):
            try:
                async for response in behavior(_decoded(request), context):
                    yield response
            except UndecodableRequest as err:
                await refuse(err, context)

        return guarded_stream

    async def guarded(request, context):
        try:
            return await behavior(_decoded(request), context)
        except UndecodableRequest as err:
            await refuse(err, context)

    return guarded


def guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` with a deserializer that answers an undecodable body with
    ``Undecodable``, and (unless the decorators above already do) a behavior
    that turns it into INVALID_ARGUMENT."""
    if handler.request_deserializer is None:
        return handler
    kind = ("stream" if handler.request_streaming else "unary") + "_" + (
        "stream" if handler.response_streaming else "unary")
    behavior = getattr(handler, kind)
    changes: dict[str, Any] = {"request_deserializer": _tolerant(handler.request_deserializer)}
    if not getattr(behavior, "takes_undecodable", False):
        changes[kind] = _guarded(behavior)
    return handler._replace(**changes)


class DecodeGuard(grpc.GenericRpcHandler):
    """Wraps each generic handler a server registers (``services.common.server``
    registers through ``guarded_registration``): its requests that do not
    parse answer INVALID_ARGUMENT, logged at debug level only. At
    registration, not as an interceptor: a grpc.aio server with any
    interceptor runs a Python coroutine chain on every RPC to find its
    handler (~30 us of CPU per call, measured), which a small request pays
    in full."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        # A method's handler is the same object on every call: guard it once.
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, handler_call_details):
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._guarded.get(method)
        if cached is None or cached[0] is not handler:
            # Bounded: only methods the server has (an unknown one has no handler).
            cached = self._guarded[method] = (handler, guard(handler))
        return cached[1]


class _GuardedRegistration:
    """A server as the ``add_*_to_server`` functions see it (``guarded_registration``)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(tuple(DecodeGuard(h) for h in handlers))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


def guarded_registration(server: grpc.aio.Server) -> Any:
    """``server`` for registering servicers on: every generic handler added
    through it is wrapped in ``DecodeGuard``."""
    return _GuardedRegistration(server)
