"""Decorators that give every RPC handler the same error mapping and metrics.

A servicer using them has ``self.metrics: RpcMetrics``.
"""

from __future__ import annotations

import asyncio
import functools

import grpc

from services.common.errors import status_for


def _cancel_code(context) -> grpc.StatusCode:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def unary(method: str):
    def decorate(fn):
        @functools.wraps(fn)
        async def handler(self, request, context):
            with self.metrics.rpc(method) as code:
                try:
                    return await fn(self, request, context)
                except asyncio.CancelledError:
                    code[0] = _cancel_code(context)
                    raise
                except grpc.aio.AbortError:
                    code[0] = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                except Exception as err:
                    code[0], message = status_for(err)
                    await context.abort(code[0], message)

        return handler

    return decorate


def streaming(method: str):
    """For handlers that are async generators (server or bidi streaming)."""

    def decorate(fn):
        @functools.wraps(fn)
        async def handler(self, request, context):
            with self.metrics.rpc(method) as code:
                try:
                    async for response in fn(self, request, context):
                        yield response
                except asyncio.CancelledError:
                    code[0] = _cancel_code(context)
                    raise
                except grpc.aio.AbortError:
                    code[0] = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                except Exception as err:
                    code[0], message = status_for(err)
                    await context.abort(code[0], message)

        return handler

    return decorate
