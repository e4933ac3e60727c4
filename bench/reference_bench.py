"""Reference log-probs: sequences/s through the service vs in-process, in one run.

Same model (the 4-layer d=256 GPT-2 policy, frozen), same sequences (prompt +
completion token ids), same log-probs (``ReferenceModel.logprobs``: one
teacher-forced forward, float64 log-softmax), same torch threads.

(a) in-process, the named baseline: ``ReferenceModel.logprobs`` on batches of
    as many sequences as the cell has clients (what perfect batching of that
    many concurrent callers gives), back to back in worker processes whose
    slices take turns as the service's do; the 32-client cell's (a) is the
    limit, a full max-size batch;
(b) ``LogProbs`` RPCs to ``arbiter serve reference`` (own processes, two by
    default whose slices take turns, as in ``bench.reward_bench``; dynamic
    batching with batch sizes chosen per length up to 32 sequences), one
    sequence per request, from 1/8/32 concurrent clients.

(c) the same service with ``--model-process`` (forward passes in a child
    process of the service, off the GIL its gRPC handlers take);
(d) the same service with ``--compile`` (``torch.compile``d forward passes),
    beside (a'), the in-process log-probs compiled the same way.

The goal: (b) at 32 clients >= 0.95x the limit; (c) and (d) are reported
beside it, (d) against both the limit and (a')'s. ``quick`` (the smoke run
in ``make test``) leaves (a') and (d) out: compiling in three fresh processes
was half of its time, and the compiled paths have their own tests
(tests/test_compile.py).

(a) and (b) alternate in ``rounds`` slices within each cell so that load from
anything else on the machine hits both alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
from pathlib import Path

from bench.common import BaselineProcesses, QUICK_SECONDS, Measurement, drive, merge, print_table, ratio, timed_loop
from bench.policy_bench import BENCH_MODEL, build_model
from bench.reward_bench import GOAL_VS_BETTER, ServiceMetrics, service_args, start_services


def make_sequences(count: int, vocab: int, prompt_tokens: int, completion_tokens: int, seed: int = 0):
    from arbiter.reference.model import TokenSequence

    rng = random.Random(seed)
    # Ordinary tokens only (the two specials sit at the start of the tiny vocabulary).
    return [
        TokenSequence(
            tuple(rng.randrange(2, vocab) for _ in range(prompt_tokens)),
            tuple(rng.randrange(2, vocab) for _ in range(completion_tokens)),
        )
        for _ in range(count)
    ]


_loaded: dict = {}


def in_process(model_dir: Path, sequences, batch: int, seconds: float, threads: int,
               compile: bool = False) -> Measurement:
    """(a), or with ``compile`` (a'), in a baseline worker process (the model loaded once per process)."""
    import torch

    from arbiter.backends import BackendConfig, open_backends
    from arbiter.reference.backend import REFERENCE
    from arbiter.reference.model import ReferenceModel

    torch.set_num_threads(threads)
    if (model_dir, compile) not in _loaded:
        _loaded[model_dir, compile] = ReferenceModel.load(
            model_dir, backends=open_backends(BackendConfig(compile=compile), REFERENCE))
    model = _loaded[model_dir, compile]
    return timed_loop(
        lambda i: len(model.logprobs([sequences[(i * batch + k) % len(sequences)] for k in range(batch)])),
        seconds, f"in-process logprobs, batch {batch}" + (", compiled (a')" if compile else " (a)"),
    )


async def _through_service(target: str, sequences, clients: int, seconds: float, warmup_s: float,
                           label: str = "service LogProbs (b)") -> Measurement:
    import grpc

    from arbiter.v1 import reference_pb2, reference_pb2_grpc

    requests = [
        reference_pb2.LogProbsRequest(sequences=[reference_pb2.TokenSequence(
            prompt_token_ids=s.prompt_token_ids, completion_token_ids=s.completion_token_ids,
        )])
        for s in sequences
    ]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = reference_pb2_grpc.ReferenceServiceStub(channel)

        async def call(request) -> int:
            response = await stub.LogProbs(request, timeout=120)
            return len(response.results)

        return await drive(call, requests, clients, seconds, warmup_s, label)


def run(seconds: float = 8.0, clients_list=(1, 8, 32), threads: int = 1, max_batch: int = 32,
        prompt_tokens: int = 32, completion_tokens: int = 64, rounds: int = 2, quick: bool = False,
        processes: int = 2) -> dict:
    if quick:
        seconds, rounds, processes = QUICK_SECONDS, 1, 1
    compiling = not quick
    rounds = max(rounds, processes)  # every process serves a slice of every cell
    from arbiter.hf import read_config

    per_slice = seconds / rounds
    warmup_s = min(1.0, per_slice / 4)
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp))
        with contextlib.ExitStack() as stack:
            # Slices take turns among the processes (bench.reward_bench: identical processes differ in speed).
            services = start_services(
                stack, service_args("reference", model_dir, threads, max_batch, "--metrics-port", "0"), processes)
            in_child = start_services(
                stack, service_args("reference", model_dir, threads, max_batch, "--model-process"), processes)
            compiled = start_services(
                stack, service_args("reference", model_dir, threads, max_batch, "--compile"),
                processes if compiling else 0)
            # The model's id space (what ModelInfo.vocab_size reports): the model itself runs in the workers.
            vocab = read_config(model_dir).get_text_config().vocab_size
            sequences = make_sequences(512, vocab, prompt_tokens, completion_tokens)
            baseline = stack.enter_context(BaselineProcesses(processes))
            for service in (*services, *in_child, *compiled):
                service.wait_ready()
            metrics = ServiceMetrics([service.metrics_port for service in services])
            for clients in clients_list:
                batch = min(clients, max_batch)
                local, remote, child, local_compiled, remote_compiled = [], [], [], [], []
                items_before, batches_before = metrics.batches()
                for turn in range(rounds):
                    local.append(baseline.run(turn, in_process, model_dir, sequences, batch, per_slice, threads))
                    remote.append(asyncio.run(_through_service(services[turn % processes].target, sequences,
                                                                clients, per_slice, warmup_s)))
                    child.append(asyncio.run(_through_service(in_child[turn % processes].target, sequences, clients,
                                                              per_slice, warmup_s, "service, --model-process (c)")))
                    if compiling:
                        local_compiled.append(baseline.run(turn, in_process, model_dir, sequences, batch, per_slice,
                                                           threads, True))
                        remote_compiled.append(asyncio.run(_through_service(
                            compiled[turn % processes].target, sequences, clients, per_slice, warmup_s,
                            "service, --compile (d)")))
                items, batches = metrics.batches()
                cells.append((clients, merge(local), merge(remote),
                              (items - items_before) / max(1.0, batches - batches_before), merge(child),
                              merge(local_compiled) if compiling else None,
                              merge(remote_compiled) if compiling else None))
            caps = metrics.caps()
    limit = max(cells, key=lambda c: c[0])[1]
    limit_compiled = max(cells, key=lambda c: c[0])[5]
    rows = []
    for clients, a, b, mean_batch, c, a_compiled, d in cells:
        # (measurement, clients column, mean batch column, vs compiled (a') column), one row each.
        paths = [(a, "-", "-", "-"), (b, clients, f"{mean_batch:.1f}", "-"), (c, clients, "-", "-")]
        if compiling:
            paths += [(a_compiled, "-", "-", "1.00"), (d, clients, "-", ratio(d.throughput, a_compiled.throughput))]
        for x, shown_clients, shown_batch, versus_compiled in paths:
            rows.append([x.label, shown_clients, f"{x.throughput:.1f}", f"{x.percentile_ms(50):.1f}",
                         f"{x.percentile_ms(99):.1f}", shown_batch,
                         "1.00" if x is a else ratio(x.throughput, a.throughput),
                         ratio(x.throughput, limit.throughput), *([versus_compiled] if compiling else [])])
    print_table(
        f"Reference log-probs, {prompt_tokens}+{completion_tokens}-token sequences, one per request, model "
        f"{BENCH_MODEL}, torch threads {threads}, batch sizes auto up to {max_batch} (caps chosen by the first process, "
        f"tokens: cap: {caps}), {seconds:g}s per path per cell in {rounds} alternating slice(s), the service's "
        f"taking turns among {processes} processes. Baseline: (a), re-measured in "
        f"each cell (latency of (a): per batch). Goal: (b) at {max(clients_list)} clients >= {GOAL_VS_BETTER}x the "
        "limit",
        ["path", "clients", "sequences/s", "p50 ms", "p99 ms", "mean batch", "vs in-process same batch (a)",
         f"vs in-process batch {min(max(clients_list), max_batch)} (limit)",
         *(["vs compiled same batch (a')"] if compiling else [])],
        rows,
    )
    saturated = max(cells, key=lambda c: c[0])
    return {
        "in_process_sequences_per_s": {n: a.throughput for n, a, *_ in cells},
        "service_sequences_per_s": {n: b.throughput for n, _, b, *_ in cells},
        "service_vs_in_process_same_batch": {n: b.throughput / a.throughput for n, a, b, *_ in cells},
        "saturation_ratio_vs_in_process_limit": max(b.throughput for _, _, b, *_ in cells) / limit.throughput,
        "model_process_vs_limit_at_most_clients": saturated[4].throughput / limit.throughput,
        "service_vs_limit_at_most_clients": saturated[2].throughput / limit.throughput,
        **({"compile_vs_limit_at_most_clients": saturated[6].throughput / limit.throughput,
            "compile_vs_compiled_limit_at_most_clients": saturated[6].throughput / limit_compiled.throughput}
           if compiling else {}),
        "caps": caps,
        "goal_met": saturated[2].throughput / limit.throughput >= GOAL_VS_BETTER,
    }
