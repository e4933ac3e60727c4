"""Readiness: health stays NOT_SERVING until what a server attached says it
can serve correctly (e.g. a policy replica that has applied the newest
published version). Kubernetes' readinessProbe (type grpc) and load balancers
read it from the standard gRPC health service."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from grpc_health.v1 import health_pb2

from services.common.server import RunningServer

log = logging.getLogger(__name__)

READY_POLL_S = 0.1


@dataclass(frozen=True)
class Attached:
    """Returned by a model server spec's ``register`` among its closers:
    closed like one (awaiting it calls ``close``), and gates readiness until
    ``ready()`` is true."""

    close: Callable[[], Awaitable[None]]
    ready: Callable[[], bool]
    waiting_for: str  # logged while not ready

    async def __call__(self) -> None:
        await self.close()


async def gate_health(running: RunningServer, gates: list[Attached]) -> None:
    """NOT_SERVING until every gate is ready, then SERVING (no gates: nothing changes).

    Awaited right after ``start_server`` set SERVING: setting health never
    suspends (its lock is uncontended), so no probe runs in between and none
    can see SERVING before the gates allow it."""
    if not gates:
        return
    names = (*running.service_names, "")
    for name in names:
        await running.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def wait_ready() -> None:
        waiting = [gate.waiting_for for gate in gates if not gate.ready()]
        if waiting:
            log.info("health NOT_SERVING until ready: %s", "; ".join(waiting))
        while not all(gate.ready() for gate in gates):
            await asyncio.sleep(READY_POLL_S)
        if not running._stopped:
            for name in names:
                await running.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            log.info("ready: health SERVING")

    task = asyncio.get_running_loop().create_task(wait_ready(), name="readiness")

    async def cancel() -> None:
        task.cancel()

    running.on_stop(cancel)
