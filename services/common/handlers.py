"""What gives every RPC handler the same error mapping and metrics: the
``unary`` and ``streaming`` decorators, over a servicer with
``self.metrics: RpcMetrics`` (``Servicer`` is the base that holds it)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from services.common.errors import status_for
from services.common.metrics import RpcMetrics


class Servicer:
    """A service's handlers over its core engine (or kernel) and its metrics."""

    def __init__(self, engine: Any, metrics: RpcMetrics):
        self.engine = engine
        self.metrics = metrics


def _cancel_code(context) -> grpc.StatusCode:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
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
        @functools.wraps(fn)
        async def handler(self, request, context):
            async with _handled(self.metrics, method, context):
                return await fn(self, request, context)

        return handler

    return decorate


def streaming(method: str):
    """For handlers that are async generators (server or bidi streaming)."""

    def decorate(fn):
        @functools.wraps(fn)
        async def handler(self, request, context):
            async with _handled(self.metrics, method, context):
                async for response in fn(self, request, context):
                    yield response

        return handler

    return decorate
