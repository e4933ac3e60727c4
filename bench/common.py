"""Shared benchmark plumbing: timing loops, percentiles, tables, service processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

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
    the port is read from the banner it prints when ready."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, start_timeout_s: float = 300):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "arbiter.cli", "serve", *args, "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "ARBITER_LOG_LEVEL": "WARNING", **(env or {})},
        )
        deadline = time.monotonic() + start_timeout_s
        output = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            output.append(line)
            match = re.search(r" on [\d.]+:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                return
        self.stop()
        raise RuntimeError("service did not start:\n" + "".join(output))

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
