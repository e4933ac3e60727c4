"""Shared benchmark plumbing: timing loops, percentiles, tables, service processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

# ``--quick``: time per path per cell of a smoke run (proves a benchmark runs;
# its numbers are not worth quoting).
QUICK_SECONDS = 0.5

# Wide enough that tables never wrap in CI logs.
console = Console(width=200)


@dataclass
class Measurement:
    label: str
    clients: int
    items: int
    seconds: float
    latencies_s: list[float]

    @property
    def throughput(self) -> float:
        return self.items / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
        return ordered[index] * 1000


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row])
    console.print(table)


class ServiceProcess:
    """``arbiter serve ...`` in its own process (its own GIL, as deployed);
    the port is read from the banner it prints when ready. ``command``: the
    module and arguments before ``args`` (another server, e.g. ``bench.rpc_floor``)."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, start_timeout_s: float = 300,
                 wait: bool = True, command: Sequence[str] = ("cli", "serve")):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *command, *args, "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "ARBITER_LOG_LEVEL": "WARNING", **(env or {})},
        )
        self.start_timeout_s = start_timeout_s
        self.port: int | None = None
        # From the banner, when started with --metrics-port.
        self.metrics_port: int | None = None
        self.log_tail: deque[str] = deque(maxlen=200)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> ServiceProcess:
        """Blocks until the banner (``wait=False`` lets several start at once)."""
        if self.port is not None:
            return self
        deadline = time.monotonic() + self.start_timeout_s
        output = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            output.append(line)
            match = re.search(r" on [\d.]+:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                metrics = re.search(r"metrics on [\d.]+:(\d+)", line)
                self.metrics_port = int(metrics.group(1)) if metrics else None
                # Keep reading: a full pipe would block the service's logging.
                threading.Thread(target=self._drain, daemon=True).start()
                return self
        self.stop()
        raise RuntimeError("service did not start:\n" + "".join(output))

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log_tail.append(line)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def metric_samples(port: int) -> list:
    """Every sample of the Prometheus ``/metrics`` a process serves on 127.0.0.1:``port``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def merge(parts: Sequence[Measurement]) -> Measurement:
    """Slices of one cell (alternated with the baseline's) as one measurement."""
    return Measurement(
        parts[0].label, parts[0].clients, sum(m.items for m in parts), sum(m.seconds for m in parts),
        [x for m in parts for x in m.latencies_s],
    )


def timed_loop(call: Callable[[int], int], seconds: float, label: str, warmup_calls: int = 1) -> Measurement:
    """``call(i) -> items`` back to back for ``seconds`` after ``warmup_calls``
    untimed calls; one latency per call."""
    for i in range(warmup_calls):
        call(i)
    items, latencies, i = 0, [], warmup_calls
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        items += call(i)
        latencies.append(time.perf_counter() - t0)
        i += 1
    return Measurement(label, 0, items, time.perf_counter() - started, latencies)


async def drive(
    call: Callable[[object], Awaitable[int]], requests: Sequence[object], clients: int, seconds: float,
    warmup_s: float, label: str = "",
) -> Measurement:
    """``clients`` closed-loop callers of ``await call(request) -> items`` for
    ``warmup_s`` untimed, then ``seconds`` timed (calls in flight at the end
    are waited for and counted)."""
    latencies: list[float] = []
    counted = {"items": 0, "on": False}
    stop_at = time.perf_counter() + warmup_s + seconds

    async def client(k: int) -> None:
        j = k
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            items = await call(requests[j % len(requests)])
            if counted["on"]:
                latencies.append(time.perf_counter() - t0)
                counted["items"] += items
            j += clients

    tasks = [asyncio.create_task(client(k)) for k in range(clients)]
    await asyncio.sleep(warmup_s)
    counted["on"], started = True, time.perf_counter()
    await asyncio.gather(*tasks)
    return Measurement(label, clients, counted["items"], time.perf_counter() - started, latencies)


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base else "nan"


class BaselineProcesses:
    """The in-process baseline in ``count`` worker processes whose slices
    take turns, as the service paths' do (identical processes differ in
    speed persistently; a baseline run in the benchmark's own process would
    carry that one process's luck into every ratio). ``run(turn, fn, *args)``
    calls a module-level ``fn`` in worker ``turn % count`` and returns its result."""

    def __init__(self, count: int):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a fresh interpreter, not a fork of this process with its threads and pages.
        context = multiprocessing.get_context("spawn")
        self.pools = [ProcessPoolExecutor(max_workers=1, mp_context=context) for _ in range(count)]

    def run(self, turn: int, fn: Callable, *args):
        return self.pools[turn % len(self.pools)].submit(fn, *args).result()

    def close(self) -> None:
        for pool in self.pools:
            pool.shutdown(cancel_futures=True)

    def __enter__(self) -> BaselineProcesses:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
