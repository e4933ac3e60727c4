"""The Triton backend vs its baselines, in one run.

``run`` (section ``triton``): reward scoring.

(a) Arbiter + Triton: the reward service (own process) with ``--backend triton``;
(b) direct Triton: tritonclient.aio callers sending pre-tokenized sequences
    straight to the same Triton model (no Arbiter: the ceiling for (a));
(c) in-process: the same service with the torch backend;
(d) Arbiter + Triton with the model exported ``--compile`` (its forward
    compiled by ``torch.compile`` inside Triton), ratio to (a): what compiling
    gains where the forward runs in Triton.

One item per request (many small callers) at 1/8/32 concurrent clients, over
real gRPC from this process. Target: (a) >= 0.85 x (b). Triton is the
tritonserver bundled in nvidia-pytriton, from .venv-triton (`make triton-env`);
its model instance and the in-process service get the same torch threads.

``run_policy`` (section ``triton-policy``): generation, tokens/s of
``Generate`` RPCs (1 prompt x n, max_new_tokens at temperature 1) from
1/4/16 clients:

(a) Arbiter + Triton: ``arbiter serve policy --backend triton`` in front of
    the exported policy, a decoupled model running Arbiter's engine (continuous
    batching across Triton requests) inside Triton;
(c) in-process, the named baseline: ``arbiter serve policy`` (the same engine
    in the service process).

Target: (a) >= 0.85 x (c). The Triton path has one more process (and hop)
than (c) on the same cores; the model runs with the same torch threads.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from bench.common import Measurement, ServiceProcess, drive, merge, print_table
from bench.reward_bench import _drive, build_model, make_texts

TARGET_RATIO = 0.85


async def _drive_direct(url: str, model: str, sequences: list[list[int]], clients: int, seconds: float,
                        warmup_s: float) -> Measurement:
    import numpy as np
    import tritonclient.grpc as grpcclient
    import tritonclient.grpc.aio as aioclient

    def inputs(ids: list[int]) -> list:
        input_ids = grpcclient.InferInput("INPUT_IDS", [1, len(ids)], "INT64")
        input_ids.set_data_from_numpy(np.array([ids], dtype=np.int64))
        lengths = grpcclient.InferInput("LENGTHS", [1, 1], "INT64")
        lengths.set_data_from_numpy(np.array([[len(ids)]], dtype=np.int64))
        return [input_ids, lengths]

    client = aioclient.InferenceServerClient(url)
    outputs = [grpcclient.InferRequestedOutput("SCORES")]
    try:
        await client.infer(model, inputs(sequences[0]), model_version="1", outputs=outputs)

        async def infer(ids: list[int]) -> int:
            await client.infer(model, inputs(ids), model_version="1", outputs=outputs, client_timeout=120)
            return 1

        return await drive(infer, sequences, clients, seconds, warmup_s, "direct Triton (tritonclient)")
    finally:
        await client.close()



def run(seconds: float = 8.0, clients_list=(1, 8, 32), threads: int = 2, batch_size: int = 32, tokens: int = 128,
        rounds: int = 2, venv: str = ".venv-triton") -> dict:
    """(a) and (b) alternate in ``rounds`` slices of each cell, so load from
    anything else on the machine hits both alike."""
    from arbiter.backends.triton_export import ExportOptions, export
    from arbiter.backends.triton_local import LocalTriton
    from arbiter.hf import load_tokenizer

    texts = make_texts(512, tokens)
    warmup_s = min(1.0, seconds / 4)
    per_round = seconds / rounds
    via_arbiter, direct, in_process, compiled = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp))
        version_dir = export(model_dir, "reward", Path(tmp) / "repo",
                             ExportOptions(name="rm", torch_threads=threads, max_batch_size=max(64, batch_size)))
        compiled_dir = export(model_dir, "reward", Path(tmp) / "repo",
                              ExportOptions(name="rm-compiled", torch_threads=threads,
                                            max_batch_size=max(64, batch_size), compile=True))
        tokenizer = load_tokenizer(model_dir)
        # What Arbiter sends for the same texts (TRUNCATION_LEFT at the model's 256).
        sequences = [tokenizer(p + r)["input_ids"][-256:] for p, r in texts]
        common = ["--max-batch-size", str(batch_size), "--torch-threads", str(threads)]
        with LocalTriton(Path(tmp) / "repo", venv=venv, torch_threads=threads,
                         log_path=Path(tmp) / "triton.log") as triton:
            arbiter_args = ["reward", "--model", str(version_dir), "--backend", "triton",
                            "--triton-url", triton.url, "--triton-model", "rm", *common]
            compiled_args = ["reward", "--model", str(compiled_dir), "--backend", "triton",
                             "--triton-url", triton.url, "--triton-model", "rm-compiled", *common]
            # Each loads its version 1 into Triton (the compiled one compiles there first).
            with ServiceProcess(arbiter_args) as service, ServiceProcess(compiled_args) as compiled_service:
                for clients in clients_list:
                    a_parts, b_parts, d_parts = [], [], []
                    for _ in range(rounds):
                        a_parts.append(asyncio.run(_drive(service.target, texts, clients, per_round, warmup_s)))
                        b_parts.append(asyncio.run(_drive_direct(triton.url, "rm", sequences, clients, per_round,
                                                                 warmup_s)))
                        d_parts.append(asyncio.run(_drive(compiled_service.target, texts, clients, per_round,
                                                          warmup_s)))
                    via_arbiter.append(merge(a_parts))
                    direct.append(merge(b_parts))
                    compiled.append(merge(d_parts))
        with ServiceProcess(["reward", "--model", str(version_dir), *common]) as service:
            in_process = [asyncio.run(_drive(service.target, texts, c, seconds, warmup_s)) for c in clients_list]
    rows, ratios, compiled_ratios = [], {}, {}
    for a, b, c, d in zip(via_arbiter, direct, in_process, compiled, strict=True):
        ratios[a.clients] = a.throughput / b.throughput
        compiled_ratios[a.clients] = d.throughput / a.throughput
        for label, m in (("Arbiter + Triton (a)", a), ("direct Triton (b)", b), ("Arbiter in-process (c)", c),
                         ("Arbiter + Triton, exported --compile (d)", d)):
            rows.append([
                label, m.clients, f"{m.throughput:.1f}", f"{m.percentile_ms(50):.1f}", f"{m.percentile_ms(99):.1f}",
                f"{m.throughput / b.throughput:.2f}", f"{m.throughput / c.throughput:.2f}",
                f"{m.throughput / a.throughput:.2f}" if m is d else "-",
            ])
    print_table(
        f"Reward scoring through Triton, {tokens}-token items, one item per request, torch threads {threads}, "
        f"max batch {batch_size}, {seconds:.0f}s per cell (target: a/b >= {TARGET_RATIO})",
        ["path", "clients", "items/s", "p50 ms", "p99 ms", "vs direct Triton (b)", "vs in-process (c)",
         "vs (a)"],
        rows,
    )
    return {
        "arbiter_triton_vs_direct": ratios,
        "min_ratio_vs_direct": min(ratios.values()),
        "meets_target": min(ratios.values()) >= TARGET_RATIO,
        "arbiter_triton_items_per_s": {m.clients: m.throughput for m in via_arbiter},
        "direct_triton_items_per_s": {m.clients: m.throughput for m in direct},
        "in_process_items_per_s": {m.clients: m.throughput for m in in_process},
        "compiled_vs_eager_triton": compiled_ratios,
    }


POLICY_TARGET_RATIO = 0.85


def run_policy(seconds: float = 8.0, clients_list=(1, 4, 16), threads: int = 1, n: int = 4, max_new_tokens: int = 32,
               rounds: int = 2, venv: str = ".venv-triton") -> dict:
    """(a) and (c) alternate in ``rounds`` slices of each cell."""
    from arbiter.backends.triton_export import ExportOptions, export
    from arbiter.backends.triton_local import LocalTriton
    from bench.policy_bench import _through_service, make_prompts
    from bench.policy_bench import build_model as build_policy

    prompts = make_prompts(64)
    per_round = seconds / rounds
    warmup_s = min(1.0, per_round / 4)
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_policy(Path(tmp))
        version_dir = export(model_dir, "policy", Path(tmp) / "repo", ExportOptions(name="policy", torch_threads=threads))
        with LocalTriton(Path(tmp) / "repo", venv=venv, torch_threads=threads,
                         log_path=Path(tmp) / "triton.log") as triton:
            via_triton = ServiceProcess(["policy", "--model", str(version_dir), "--backend", "triton",
                                         "--triton-url", triton.url, "--triton-model", "policy"], wait=False)
            in_process = ServiceProcess(["policy", "--model", str(model_dir), "--torch-threads", str(threads)],
                                        wait=False)
            with via_triton, in_process:
                via_triton.wait_ready()
                in_process.wait_ready()
                for clients in clients_list:
                    a_parts, c_parts = [], []
                    for _ in range(rounds):
                        for label, store, service in (("Arbiter + Triton (a)", a_parts, via_triton),
                                                      ("Arbiter in-process (c)", c_parts, in_process)):
                            store.append(asyncio.run(_through_service(
                                service.target, prompts, n, max_new_tokens, clients, per_round, warmup_s, label)))
                    cells.append((clients, merge(a_parts), merge(c_parts)))
    rows, ratios = [], {}
    for clients, a, c in cells:
        ratios[clients] = a.throughput / c.throughput
        for m in (a, c):
            rows.append([m.label, clients, f"{m.throughput:.0f}", f"{m.percentile_ms(50):.1f}",
                         f"{m.percentile_ms(99):.1f}", f"{m.throughput / c.throughput:.2f}"])
    print_table(
        f"Policy generation through Triton, 1 prompt x n={n} per request, {max_new_tokens} new tokens, torch threads "
        f"{threads}, {seconds:g}s per path per cell in {rounds} alternating slice(s) "
        f"(target: a/c >= {POLICY_TARGET_RATIO})",
        ["path", "clients", "tokens/s", "p50 ms", "p99 ms", "vs in-process (c)"],
        rows,
    )
    return {
        "arbiter_triton_vs_in_process": ratios,
        "min_ratio_vs_in_process": min(ratios.values()),
        "meets_target": min(ratios.values()) >= POLICY_TARGET_RATIO,
        "arbiter_triton_tokens_per_s": {c: a.throughput for c, a, _ in cells},
        "in_process_tokens_per_s": {c: m.throughput for c, _, m in cells},
    }


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.triton_bench")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--tokens", type=int, default=128)
    print(json.dumps(run(seconds=parser.parse_args().seconds, tokens=parser.parse_args().tokens), indent=2))
