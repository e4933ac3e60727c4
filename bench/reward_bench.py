"""Reward-service throughput and latency vs its two baselines, in one run.

(a) in-process batched forward of the same model and inputs, in batches of
    as many items as the cell has clients (up to the service's batch bound,
    32): what perfect batching of that many one-item callers gives, as in the
    reference benchmark (a batch of 32 is no bound for 1 or 8 clients: they
    never have 32 items to batch);
(b) the same service with dynamic batching off.
Beside the default service, the same with ``--model-process`` (each version's
forward passes in a child process, off the GIL the gRPC handlers take), its
own row and ratio; and the same with ``--compile`` (``torch.compile``d
forward passes), with its own baseline beside it: (a') the in-process forward
compiled the same way, so the table shows both what compiling gains over the
eager baselines and how close the service comes to a compiled in-process loop.
Alongside, the RPC floor: the same clients and requests against a no-op
``Score`` (``bench.rpc_floor``, its own process), the most any service could
answer them at, so the table shows how much of the gap to (a) is the RPC
itself (at 1 client, a round trip of Python gRPC client and server on top of
every forward pass). At 1 client that gives a ceiling no server can pass:
one forward plus one no-op round trip per item, ``t_a / (t_a + t_rpc)`` of
(a) (``t_a``: (a)'s time per item, ``t_rpc``: the floor's p50), reported as
``ceiling_at_1_client``.
Each service path runs in ``processes`` processes (default 2), its slices
taking turns among them: identical processes of one service differ in speed
by up to ~15 %, persistently (measured here: four identical reward services,
128-token items at 1 client, 30.4 to 40.7 items/s, each the same on a second
pass: where its pages landed, not the code), so a path measured on a single
process carries that luck into every ratio. So does (a): it runs in as many
worker processes of its own, taking turns likewise.
The goal, per cell: the service with dynamic batching (``auto`` batch sizes
up to 32) at >= 0.95x the better of (a) and (b), and at 1 client a p50
within 0.5 ms of (b)'s. Clients send one item per request (many small
callers), over real gRPC, from this process; the service runs in its own
process as deployed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import (
    BaselineProcesses,
    Measurement,
    ServiceProcess,
    drive,
    merge,
    metric_samples,
    print_table,
    ratio,
)

# The goals this benchmark checks (see the module docstring).
GOAL_VS_BETTER = 0.95
GOAL_P50_MS_AT_1 = 0.5

BENCH_MODEL = dict(n_layer=4, n_head=4, n_embd=256, n_positions=256, vocab_size=512)
WORDS = "the a policy reward model good bad answer question kind helpful short long quick brown fox".split()


def make_texts(count: int, tokens: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [
        (" ".join(rng.choices(WORDS, k=tokens // 4)), " " + " ".join(rng.choices(WORDS, k=3 * tokens // 4)))
        for _ in range(count)
    ]


def build_model(out: Path) -> Path:
    from arbiter.tiny import TinyConfig, make_reward

    return make_reward(out / "bench-rm", TinyConfig(**BENCH_MODEL), calibrate=False)


def in_process(model_dir: Path, texts, batch_size: int, seconds: float, threads: int,
               compile: bool = False) -> Measurement:
    """(a), or with ``compile`` (a'): in a baseline worker, which keeps the
    compiled graphs between calls (a later load of the model reuses them)."""
    import torch

    from arbiter.backends import BackendConfig, open_backends
    from arbiter.reward.backend import REWARD
    from arbiter.reward.model import RewardModel
    from arbiter.types import RewardInput, Truncation

    torch.set_num_threads(threads)
    model = RewardModel.open(model_dir, open_backends(BackendConfig(compile=compile), REWARD))
    encoded = [e.token_ids for e in model.encode([RewardInput(p, r) for p, r in texts], Truncation.LEFT)]
    model.forward(encoded[:batch_size])  # warm-up
    items, latencies, started, i = 0, [], time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        batch = [encoded[(i + j) % len(encoded)] for j in range(batch_size)]
        t0 = time.perf_counter()
        model.forward(batch)
        latencies.append(time.perf_counter() - t0)
        items += batch_size
        i += batch_size
    label = f"in-process forward (batch {batch_size})" + (", compiled" if compile else "")
    return Measurement(label, 0, items, time.perf_counter() - started, latencies)


async def _drive(target: str, texts, clients: int, seconds: float, warmup_s: float) -> Measurement:
    import grpc

    from arbiter.v1 import reward_pb2, reward_pb2_grpc

    requests = [
        reward_pb2.ScoreRequest(
            inputs=[reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt=p, response=r))],
            options=reward_pb2.ScoreOptions(truncation=2),
        )
        for p, r in texts
    ]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        await stub.Score(requests[0], timeout=60)

        async def score(request) -> int:
            await stub.Score(request, timeout=120)
            return 1

        return await drive(score, requests, clients, seconds, warmup_s)


def run(seconds: float = 8.0, token_lengths=(16, 128), **kwargs) -> dict:
    """Short items (a chat turn) and long ones: on CPU, batching pays where the
    fixed cost of a forward pass dominates, i.e. for short items."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp))
        return {f"{tokens}_tokens": run_one(model_dir, seconds, tokens=tokens, **kwargs) for tokens in token_lengths}


class ServiceMetrics:
    """The /metrics of a service's processes (the slices of a path take turns
    among them): batches run, summed over the processes, and the caps the
    first one chose."""

    def __init__(self, ports: Sequence[int]):
        self.ports = list(ports)

    def batches(self) -> tuple[float, float]:
        """(items, forward passes) so far, over every process."""
        items = passes = 0.0
        for port in self.ports:
            values = {s.name: s.value for s in metric_samples(port) if s.name in ("arbiter_batch_size_sum",
                                                                                  "arbiter_batch_size_count")}
            items += values.get("arbiter_batch_size_sum", 0.0)
            passes += values.get("arbiter_batch_size_count", 0.0)
        return items, passes

    def caps(self) -> dict[int, int]:
        """{length bucket's longest item in tokens: batch cap} of the first process's active version."""
        return {int(s.labels["tokens"]): int(s.value) for s in metric_samples(self.ports[0])
                if s.name == "arbiter_batch_size_cap"}


def start_services(stack: contextlib.ExitStack, args: list[str], count: int) -> list[ServiceProcess]:
    """``count`` processes of one service, started together (``wait_ready`` each before use), stopped with ``stack``."""
    return [stack.enter_context(ServiceProcess(args, wait=False)) for _ in range(count)]


def service_args(kind: str, model_dir: Path, threads: int, batch_size: int, *extra: str) -> list[str]:
    return [kind, "--model", str(model_dir), "--torch-threads", str(threads), "--max-batch-size", str(batch_size),
            *extra]


def run_one(
    model_dir: Path, seconds: float, clients_list=(1, 8, 32, 64), threads: int = 1, batch_size: int = 32,
    tokens: int = 128, rounds: int = 2, processes: int = 2,
) -> dict:
    """Per client count, (a) the in-process batched forward, the service with
    dynamic batching, and (b) the service with batching off run in alternating
    slices, so machine load falls on all three alike; each service's slices
    take turns among its ``processes`` processes."""
    texts = make_texts(512, tokens)
    rounds = max(rounds, processes)  # every process serves a slice of every cell
    per_slice = seconds / rounds
    warmup_s = min(1.0, per_slice / 4)
    cells = []
    with contextlib.ExitStack() as stack:
        # Metrics on a port each service picks (one chosen here could be taken before the service binds it).
        batched = start_services(stack, service_args("reward", model_dir, threads, batch_size, "--metrics-port", "0"),
                                 processes)
        off = start_services(stack, service_args("reward", model_dir, threads, batch_size, "--no-dynamic-batching"),
                             processes)
        in_child = start_services(stack, service_args("reward", model_dir, threads, batch_size, "--model-process"),
                                  processes)
        compiled = start_services(stack, service_args("reward", model_dir, threads, batch_size, "--compile"),
                                  processes)
        floor = stack.enter_context(ServiceProcess([], command=["bench.rpc_floor"], wait=False))
        baseline = stack.enter_context(BaselineProcesses(processes))
        for service in (*batched, *off, *in_child, *compiled, floor):
            service.wait_ready()
        metrics = ServiceMetrics([service.metrics_port for service in batched])
        for clients in clients_list:
            limit, on, unbatched, child, no_op, limit_compiled, on_compiled = [], [], [], [], [], [], []
            items_before, batches_before = metrics.batches()
            for turn in range(rounds):
                limit.append(baseline.run(turn, in_process, model_dir, texts, min(clients, batch_size), per_slice,
                                          threads))
                limit_compiled.append(baseline.run(turn, in_process, model_dir, texts, min(clients, batch_size),
                                                   per_slice, threads, True))
                on_compiled.append(asyncio.run(_drive(compiled[turn % processes].target, texts, clients, per_slice,
                                                      warmup_s)))
                on.append(asyncio.run(_drive(batched[turn % processes].target, texts, clients, per_slice, warmup_s)))
                unbatched.append(asyncio.run(_drive(off[turn % processes].target, texts, clients, per_slice,
                                                    warmup_s)))
                child.append(asyncio.run(_drive(in_child[turn % processes].target, texts, clients, per_slice,
                                                warmup_s)))
                # A quarter of the time: a no-op answers thousands a second, enough to count.
                no_op.append(asyncio.run(_drive(floor.target, texts, clients, per_slice / 4, warmup_s / 4)))
            items, batches = metrics.batches()
            mean_batch = (items - items_before) / max(1.0, batches - batches_before)
            cells.append((clients, merge(limit), merge(on), merge(unbatched), mean_batch, merge(no_op), merge(child),
                          merge(limit_compiled), merge(on_compiled)))
        caps = metrics.caps()
    rows = []
    versus_better, p50_delta_ms, floors, child_versus_better, ceiling = {}, {}, {}, {}, None
    compiled_versus_better, compiled_versus_compiled = {}, {}
    for clients, a, m, b, mean_batch, f, c, a_compiled, m_compiled in cells:
        better = max(a.throughput, b.throughput)
        versus_better[clients] = m.throughput / better
        child_versus_better[clients] = c.throughput / better
        compiled_versus_better[clients] = m_compiled.throughput / better
        compiled_versus_compiled[clients] = m_compiled.throughput / a_compiled.throughput
        p50_delta_ms[clients] = m.percentile_ms(50) - b.percentile_ms(50)
        floors[clients] = f.throughput
        if clients == 1:
            per_item_s = 1.0 / a.throughput
            ceiling = per_item_s / (per_item_s + f.percentile_ms(50) / 1000.0)
        for label, x in ((a.label + " (a)", a), ("service, dynamic batching", m), ("service, batching off (b)", b),
                         ("service, dynamic batching, --model-process", c), (a_compiled.label + " (a')", a_compiled),
                         ("service, dynamic batching, --compile", m_compiled)):
            dynamic = x is m or x is c or x is m_compiled
            baseline_row = x is a or x is a_compiled
            rows.append([
                label, "-" if baseline_row else clients, f"{x.throughput:.1f}", f"{x.percentile_ms(50):.1f}",
                f"{x.percentile_ms(99):.1f}", f"{mean_batch:.1f}" if x is m else "-",
                ratio(x.throughput, a.throughput), ratio(x.throughput, b.throughput),
                ratio(x.throughput, better) if dynamic else "-",
                f"{x.percentile_ms(50) - b.percentile_ms(50):+.2f}" if dynamic else "-",
                "-" if baseline_row else f"{f.throughput:.0f} (p50 {f.percentile_ms(50):.2f} ms)",
                ratio(x.throughput, a_compiled.throughput) if x is m_compiled else "-",
            ])
    print_table(
        f"Reward scoring, {tokens}-token items, one per request, model {BENCH_MODEL}, torch threads {threads}, "
        f"batch sizes auto up to {batch_size} (caps chosen by the first process, tokens: cap: {caps}), {seconds:g}s per "
        f"path per cell in {rounds} alternating slices, each service path's slices taking turns among {processes} "
        f"processes (latency of (a): per batch; RPC floor: items/s of the same clients and "
        f"requests against a no-op Score, a quarter of the time). Goals: dynamic batching >= {GOAL_VS_BETTER}x the "
        f"better of (a) and (b) in every cell; at 1 client its p50 within {GOAL_P50_MS_AT_1} ms of (b)'s"
        + ("" if ceiling is None else f". Ceiling at 1 client (one forward of (a) plus one no-op round trip per item): "
                                      f"{ceiling:.2f}x (a)"),
        ["path", "clients", "items/s", "p50 ms", "p99 ms", "mean batch", "vs in-process (a)", "vs batching off (b)",
         "vs better of (a),(b)", "p50 - (b) ms", "RPC floor items/s", "vs compiled in-process (a')"],
        rows,
    )
    saturated = max(cells, key=lambda c: c[0])
    at_32 = next((c for c in cells if c[0] == 32), None)
    return {
        "in_process_items_per_s": saturated[1].throughput,
        "saturation_ratio_vs_in_process": saturated[2].throughput / saturated[1].throughput,
        "ratio_vs_unbatched_at_32": at_32[2].throughput / at_32[3].throughput if at_32 else None,
        "dynamic_vs_better_baseline": versus_better,
        "model_process_vs_better_baseline": child_versus_better,
        "compile_vs_better_baseline": compiled_versus_better,
        "compile_vs_compiled_in_process": compiled_versus_compiled,
        "p50_minus_unbatched_ms": p50_delta_ms,
        "caps": caps,
        "rpc_floor_items_per_s": floors,
        "ceiling_at_1_client": ceiling,
        "goals_met": (all(r >= GOAL_VS_BETTER for r in versus_better.values())
                      and p50_delta_ms.get(1, 0.0) <= GOAL_P50_MS_AT_1),
    }
