"""Policy generation: tokens/s through the service vs in-process, in one run.

Every path does the same work: one request = one prompt x ``n`` samples of
``max_new_tokens`` at temperature 1 (no top-k/top-p), on the same 4-layer
d=256 GPT-2 policy, with the same torch threads.

(a) in-process core, the named baseline: one request at a time, back to back
    in this process (``PolicyModel.encode`` + ``start`` + ``step`` until
    done): the service's decoding code (the request's rows as one KV-cached
    batch, log-probs, text) without gRPC, the asyncio engine or merging: how
    the engine served requests before continuous batching, minus serving costs;
(b) Hugging Face ``model.generate`` on the merged batch: the cell's
    ``clients`` requests as one left-padded ``generate`` call (``do_sample``,
    ``num_return_sequences=n``, text decoded at the end): static batching with
    the library's own loop, for whether ours is competitive (latency is per call);
(c0) ``Generate`` RPCs from ``clients`` concurrent clients to ``arbiter serve
    policy --no-continuous-batching``: requests interleave one step at a time
    on the model thread, never sharing a forward (the service before
    continuous batching);
(c) the same to ``arbiter serve policy`` as deployed: continuous batching.

The paths alternate in ``rounds`` slices within each cell so that load from
anything else on the machine hits them alike.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from pathlib import Path

from bench.common import QUICK_SECONDS, Measurement, ServiceProcess, drive, merge, print_table, ratio, timed_loop

BENCH_MODEL = dict(n_layer=4, n_head=4, n_embd=256, n_positions=256, vocab_size=512)
WORDS = "the a policy reward model good bad answer question kind helpful short long quick brown fox".split()


def make_prompts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(6, 14))) for _ in range(count)]


def build_model(out: Path) -> Path:
    from arbiter.tiny import TinyConfig, make_policy

    return make_policy(out / "bench-policy", TinyConfig(**BENCH_MODEL))


class InProcess:
    """(a) and (b) on one loaded copy of the model."""

    def __init__(self, model_dir: Path, threads: int, n: int, max_new_tokens: int):
        import torch

        from arbiter.policy.model import PolicyModel

        torch.set_num_threads(threads)
        self.policy = PolicyModel.load(model_dir)
        self.n = n
        self.max_new_tokens = max_new_tokens

    def core(self, prompts: list[str], seed: int) -> int:
        """Tokens generated for ``prompts`` (one request, or several merged)."""
        from arbiter.policy.types import ResolvedSampling
        from arbiter.types import Prompt

        params = ResolvedSampling(self.max_new_tokens, 1.0, 1.0, 0, self.n, (), seed)
        ids = self.policy.encode([Prompt(text=p) for p in prompts], self.max_new_tokens)
        run = self.policy.start(ids, params)
        while not run.done:
            run.step()
        return sum(len(s.completion_token_ids) for s in run.samples())

    def hf_generate(self, prompts: list[str], seed: int) -> int:
        """Tokens generated for ``prompts`` as one merged ``generate`` call."""
        import torch

        tokenizer, model = self.policy.tokenizer, self.policy.model
        torch.manual_seed(seed)
        tokenizer.padding_side = "left"
        encoded = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(
                **encoded, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=self.n,
                max_new_tokens=self.max_new_tokens, pad_token_id=self.policy.pad_id,
            )
        completions = out[:, encoded["input_ids"].shape[1]:].tolist()
        tokens = 0
        for row in completions:
            # Count up to and including the first end-of-sequence (the rest is padding).
            ends = [i for i, t in enumerate(row) if t in self.policy.eos_ids]
            tokens += ends[0] + 1 if ends else len(row)
        tokenizer.batch_decode(out, skip_special_tokens=True)
        return tokens


async def _through_service(target: str, prompts: list[str], n: int, max_new_tokens: int, clients: int,
                           seconds: float, warmup_s: float, label: str) -> Measurement:
    from arbiter.v1 import policy_pb2

    requests = [
        policy_pb2.GenerateRequest(
            prompts=[policy_pb2.PromptInput(text=p)],
            sampling=policy_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=n, seed=i),
        )
        for i, p in enumerate(prompts)
    ]
    return await drive_generate(target, requests, clients, seconds, warmup_s, label)


async def drive_generate(target: str, requests: list, clients: int, seconds: float, warmup_s: float,
                         label: str) -> Measurement:
    """``clients`` closed-loop callers of ``Generate`` over ``requests``; items are completion tokens."""
    import grpc

    from arbiter.v1 import policy_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)

        async def call(request) -> int:
            response = await stub.Generate(request, timeout=300)
            return sum(len(s.completion_token_ids) for s in response.samples)

        return await drive(call, requests, clients, seconds, warmup_s, label)


def run(seconds: float = 8.0, clients_list=(1, 4, 16, 64), threads: int = 1, n: int = 4, max_new_tokens: int = 32,
        rounds: int = 2, quick: bool = False) -> dict:
    if quick:
        seconds, rounds, max_new_tokens, clients_list = QUICK_SECONDS, 1, min(max_new_tokens, 16), (1, 4, 16)
    prompts = make_prompts(64)
    per_slice = seconds / rounds
    warmup_s = min(1.0, per_slice / 4)
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp))
        common = ["policy", "--model", str(model_dir), "--torch-threads", str(threads)]
        services = {
            "off": ServiceProcess([*common, "--no-continuous-batching"], wait=False),
            "on": ServiceProcess(common, wait=False),
        }
        with services["off"], services["on"]:
            local = InProcess(model_dir, threads, n, max_new_tokens)
            for service in services.values():
                service.wait_ready()
            for clients in clients_list:
                core, hf, off, on = [], [], [], []
                for r in range(rounds):
                    offset = 1000 * r
                    core.append(timed_loop(lambda i: local.core([prompts[i % len(prompts)]], offset + i),
                                           per_slice, "in-process core, one request at a time (a)"))
                    hf.append(timed_loop(
                        lambda i: local.hf_generate([prompts[(i * clients + k) % len(prompts)] for k in range(clients)],
                                                    offset + i),
                        per_slice, "HF model.generate, merged batch (b)"))
                    for label, store, service in (("service, continuous batching off (c0)", off, services["off"]),
                                                  ("service Generate (c)", on, services["on"])):
                        store.append(asyncio.run(_through_service(
                            service.target, prompts, n, max_new_tokens, clients, per_slice, warmup_s, label)))
                cells.append((clients, merge(core), merge(hf), merge(off), merge(on)))
    rows = []
    for clients, a, b, c0, c in cells:
        rows.append([a.label, "-", f"{a.throughput:.0f}", f"{a.percentile_ms(50):.1f}", f"{a.percentile_ms(99):.1f}",
                     "1.00", ratio(a.throughput, b.throughput), "-"])
        rows.append([b.label + " (per call)", clients, f"{b.throughput:.0f}", f"{b.percentile_ms(50):.1f}",
                     f"{b.percentile_ms(99):.1f}", ratio(b.throughput, a.throughput), "1.00", "-"])
        for m in (c0, c):
            rows.append([m.label, clients, f"{m.throughput:.0f}", f"{m.percentile_ms(50):.1f}",
                         f"{m.percentile_ms(99):.1f}", ratio(m.throughput, a.throughput),
                         ratio(m.throughput, b.throughput), ratio(m.throughput, c0.throughput)])
    print_table(
        f"Policy generation, 1 prompt x n={n} per request, {max_new_tokens} new tokens, model {BENCH_MODEL}, "
        f"torch threads {threads}, {seconds:g}s per path per cell in {rounds} alternating slice(s). "
        "Baseline: (a), re-measured in each cell",
        ["path", "clients", "tokens/s", "p50 ms", "p99 ms", "vs in-process core (a)", "vs HF generate (b)",
         "vs batching off (c0)"],
        rows,
    )
    return {
        "in_process_tokens_per_s": merge([a for _, a, *_ in cells]).throughput,
        "service_vs_in_process": {c: s.throughput / a.throughput for c, a, _, _, s in cells},
        "service_vs_hf_generate": {c: s.throughput / b.throughput for c, _, b, _, s in cells},
        "service_vs_batching_off": {c: s.throughput / off.throughput for c, _, _, off, s in cells},
        "batching_off_vs_in_process": {c: off.throughput / a.throughput for c, a, _, off, _ in cells},
    }
