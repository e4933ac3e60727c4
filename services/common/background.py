"""Run an async server on its own event-loop thread, for tests, benchmarks and
the demo, which drive it with ordinary blocking gRPC clients."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from services.common.server import RunningServer

T = TypeVar("T")


class BackgroundServer:
    def __init__(self, create: Callable[[], Awaitable[tuple[RunningServer, int]]], start_timeout_s: float = 300.0):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="server-loop", daemon=True)
        self._thread.start()
        try:
            self.running, self.port = self.run(create(), timeout=start_timeout_s)
        except BaseException:
            self._close_loop()
            raise

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def engine(self) -> Any:
        return self.running.engine

    def run(self, coro: Awaitable[T], timeout: float | None = 60.0) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float | None = None) -> None:
        try:
            self.run(self.running.stop(grace), timeout=None)
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
