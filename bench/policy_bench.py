"""Policy generation: tokens/s through the service vs in-process, in one run.

Every path does the same work: one request = one prompt x ``n`` samples of
``max_new_tokens`` at temperature 1 (no top-k/top-p), on the same 4-layer
d=256 GPT-2 policy, with the same torch threads.

(a) in-process core, the named baseline: ``PolicyModel.encode`` + ``start`` +
    ``step`` until done, back to back in this process: the service's exact
    sampling code (same KV-cached batch, same log-probs and incremental text)
    without gRPC, the asyncio engine or the model-thread hops, so service / (a)
    is what serving costs;
(b) Hugging Face ``model.generate`` on the same weights (``do_sample``,
    ``num_return_sequences=n``, text decoded once at the end): the outside
    reference for whether the core sampling loop itself is competitive;
(c) ``Generate`` RPCs from 1/4/16 concurrent clients to ``arbiter serve
    policy`` in its own process, as deployed.

The service does not merge requests (a seeded request's output must not
depend on its neighbours): concurrent generations interleave one decoding
step at a time on one model thread, so concurrency hides RPC time but cannot
beat (a). The "(a) merged" row is (a) with 16 requests as one batch: the
ceiling cross-request (continuous) batching could reach.

(a), (b) and (c) alternate in ``rounds`` slices within each cell so that load
from anything else on the machine hits all three alike.
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

    def hf_generate(self, prompt: str, seed: int) -> int:
        import torch

        tokenizer, model = self.policy.tokenizer, self.policy.model
        torch.manual_seed(seed)
        encoded = tokenizer(prompt, return_tensors="pt")
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
                           seconds: float, warmup_s: float) -> Measurement:
    import grpc

    from arbiter.v1 import policy_pb2, policy_pb2_grpc

    requests = [
        policy_pb2.GenerateRequest(
            prompts=[policy_pb2.PromptInput(text=p)],
            sampling=policy_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=n, seed=i),
        )
        for i, p in enumerate(prompts)
    ]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)

        async def call(request) -> int:
            response = await stub.Generate(request, timeout=300)
            return sum(len(s.completion_token_ids) for s in response.samples)

        return await drive(call, requests, clients, seconds, warmup_s, "service Generate (c)")


def run(seconds: float = 8.0, clients_list=(1, 4, 16), threads: int = 1, n: int = 4, max_new_tokens: int = 32,
        rounds: int = 2, quick: bool = False) -> dict:
    if quick:
        seconds, rounds, max_new_tokens = QUICK_SECONDS, 1, min(max_new_tokens, 16)
    prompts = make_prompts(64)
    per_slice = seconds / rounds
    warmup_s = min(1.0, per_slice / 4)
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp))
        service = ServiceProcess(["policy", "--model", str(model_dir), "--torch-threads", str(threads)], wait=False)
        with service:
            local = InProcess(model_dir, threads, n, max_new_tokens)
            service.wait_ready()
            for clients in clients_list:
                core, hf, svc = [], [], []
                for r in range(rounds):
                    offset = 1000 * r
                    core.append(timed_loop(lambda i: local.core([prompts[i % len(prompts)]], offset + i),
                                           per_slice, "in-process core (a)"))
                    hf.append(timed_loop(lambda i: local.hf_generate(prompts[i % len(prompts)], offset + i),
                                         per_slice, "HF model.generate (b)"))
                    svc.append(asyncio.run(_through_service(service.target, prompts, n, max_new_tokens, clients,
                                                            per_slice, warmup_s)))
                cells.append((clients, merge(core), merge(hf), merge(svc)))
        merged_batch = max(clients_list)
        ceiling = timed_loop(
            lambda i: local.core([prompts[(i * merged_batch + k) % len(prompts)] for k in range(merged_batch)], i),
            seconds / 2, f"in-process core, {merged_batch} requests merged",
        )
    # A merged call serves `merged_batch` requests: latency per call, not per request.
    rows = []
    for clients, a, b, c in cells:
        for label, m in ((a.label, a), (b.label, b)):
            rows.append([label, "-", f"{m.throughput:.0f}", f"{m.percentile_ms(50):.1f}",
                         f"{m.percentile_ms(99):.1f}", ratio(m.throughput, a.throughput),
                         ratio(m.throughput, b.throughput)])
        rows.append([c.label, clients, f"{c.throughput:.0f}", f"{c.percentile_ms(50):.1f}",
                     f"{c.percentile_ms(99):.1f}", ratio(c.throughput, a.throughput),
                     ratio(c.throughput, b.throughput)])
    base = merge([a for _, a, _, _ in cells])
    hf_all = merge([b for _, _, b, _ in cells])
    rows.append([ceiling.label + " (per call)", "-", f"{ceiling.throughput:.0f}", f"{ceiling.percentile_ms(50):.1f}",
                 f"{ceiling.percentile_ms(99):.1f}", ratio(ceiling.throughput, base.throughput),
                 ratio(ceiling.throughput, hf_all.throughput)])
    print_table(
        f"Policy generation, 1 prompt x n={n} per request, {max_new_tokens} new tokens, model {BENCH_MODEL}, "
        f"torch threads {threads}, {seconds:g}s per path per cell in {rounds} alternating slice(s). "
        "Baseline: (a), re-measured in each cell",
        ["path", "clients", "tokens/s", "p50 ms", "p99 ms", "vs in-process core (a)", "vs HF generate (b)"],
        rows,
    )
    return {
        "in_process_tokens_per_s": base.throughput,
        "hf_generate_tokens_per_s": hf_all.throughput,
        "service_vs_in_process": {c: s.throughput / a.throughput for c, a, _, s in cells},
        "service_vs_hf_generate": {c: s.throughput / b.throughput for c, _, b, s in cells},
        "merged_ceiling_vs_in_process": ceiling.throughput / base.throughput,
    }
