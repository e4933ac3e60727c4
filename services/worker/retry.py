"""How the worker outlasts failures: the one retry above the channel's.

Every channel (``services.common.client``) already retries UNAVAILABLE a few
times within a call's deadline, which absorbs a replica restarting. What the
channel cannot absorb (a service down for longer than its attempts, a
deadline that expired, ABORTED) reaches ``StageRetry``, which retries the
whole stage with exponential backoff until it works or the worker is stopped.
The sink uses it too, for records the brokers did not acknowledge.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})


class WorkerError(RuntimeError):
    """The worker cannot go on (or start); the message says what to fix."""


class WorkerStopped(Exception):
    """Stop was requested while a stage was waiting to be retried."""


def is_transient(err: Exception) -> bool:
    return isinstance(err, grpc.RpcError) and err.code() in TRANSIENT


def describe(err: Exception) -> str:
    if isinstance(err, grpc.RpcError):
        return f"{err.code().name}: {err.details()}"
    return str(err)


def fatal(stage: str, err: Exception) -> WorkerError:
    return WorkerError(f"{stage} failed and retrying cannot fix it: {describe(err)}")


@dataclass(frozen=True)
class StageRetry:
    """``call(stage, attempt)``: ``attempt()`` until it succeeds. Each failed
    attempt is reported to ``failed(stage)`` (the stage's error metric);
    failures ``transient`` says retrying may fix are retried after a backoff
    doubling from ``initial_backoff_s`` to ``max_backoff_s``, others are
    raised. With a ``deadline`` (time.monotonic()), the failure on or after it
    is raised instead. ``WorkerStopped`` when ``stopping`` is set during a
    backoff."""

    initial_backoff_s: float
    max_backoff_s: float
    stopping: Callable[[], threading.Event]
    failed: Callable[[str], None]

    def call(
        self,
        stage: str,
        attempt: Callable[[], T],
        *,
        transient: Callable[[Exception], bool] = is_transient,
        deadline: float | None = None,
    ) -> T:
        delay, number = self.initial_backoff_s, 1
        while True:
            try:
                return attempt()
            except Exception as err:
                self.failed(stage)
                left = None if deadline is None else deadline - time.monotonic()
                if not transient(err) or (left is not None and left <= 0):
                    raise
                wait = delay if left is None else min(delay, left)
                log.warning("%s failed (attempt %d): %s; retrying in %.1fs", stage, number, describe(err), wait)
            if self.stopping().wait(wait):
                raise WorkerStopped(stage)
            delay, number = min(delay * 2, self.max_backoff_s), number + 1
