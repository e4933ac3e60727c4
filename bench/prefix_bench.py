"""Prefix caching: rollouts whose prompts share a long beginning.

Through ``arbiter serve policy`` (its own process; the 4-layer d=256 GPT-2
policy of ``bench.policy_bench``, positions up to 1024), ``clients``
concurrent callers each send, back to back, ``Generate`` requests as a
rollout worker does: ``prompts_per_request`` prompts x n=4 samples,
``max_new_tokens`` new tokens. Every prompt is a system prompt of
``system_tokens`` tokens (a chat template with its instructions) followed by
a question of its own (``question_tokens``), none repeated within a run. Two
workloads: one system prompt for every request, and one per request (its
prompts share it, no other request has it: what each request meets right
after a policy update, the new version's cache empty).

The baseline is the same server with ``--prefix-cache-tokens 0``: every
prompt prefilled whole, as the engine was before prefix caching. The
candidate is the default (8192 tokens). The two run in alternating slices so
machine load hits both alike. Reported per client count: completion
tokens/s, request latency p50 / p99, and the share of prompt tokens the
candidate found cached (its own counters, over the cell; a system prompt
shared by one request's prompts is computed once and then copied, and
counts as found).
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from pathlib import Path

from bench.common import QUICK_SECONDS, Measurement, ServiceProcess, drive, merge, metric_samples, print_table, ratio
from bench.policy_bench import BENCH_MODEL, WORDS
from bench.prefill_bench import long_prompt

MODEL = {**BENCH_MODEL, "n_positions": 1024}


def build_model(out: Path) -> Path:
    from arbiter.tiny import TinyConfig, make_policy

    return make_policy(out / "bench-policy-1k", TinyConfig(**MODEL))


def make_requests(tokenizer, count: int, prompts_per_request: int, system_tokens: int, question_tokens: int,
                  n: int, max_new_tokens: int, system_per_request: bool = False) -> list:
    """``system_per_request``: each request's prompts share a system prompt
    no other request has (what every request meets right after a policy
    update, whose version starts with an empty cache)."""
    from arbiter.v1 import policy_pb2

    rng = random.Random(0)
    system = long_prompt(tokenizer, system_tokens, rng)
    requests = []
    for i in range(count):
        if system_per_request:
            system = long_prompt(tokenizer, system_tokens, rng)
        requests.append(policy_pb2.GenerateRequest(
            prompts=[policy_pb2.PromptInput(text=system + " Q: " + long_prompt(tokenizer, question_tokens, rng))
                     for _ in range(prompts_per_request)],
            sampling=policy_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=n, seed=i)))
    return requests


async def _drive(target: str, requests: list, clients: int, seconds: float, warmup_s: float,
                 label: str) -> Measurement:
    import grpc

    from arbiter.v1 import policy_pb2_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)

        async def call(request) -> int:
            response = await stub.Generate(request, timeout=300)
            return sum(len(s.completion_token_ids) for s in response.samples)

        return await drive(call, requests, clients, seconds, warmup_s, label)


def _prefill_counters(port: int) -> tuple[float, float]:
    """(prompt tokens prefilled, of them found cached) so far."""
    values = {s.name: s.value for s in metric_samples(port)}
    return (values.get("arbiter_policy_prefill_prompt_tokens_total", 0.0),
            values.get("arbiter_policy_prefix_cache_hit_tokens_total", 0.0))


def run(seconds: float = 8.0, clients_list=(1, 4, 16), prompts_per_request: int = 4, system_tokens: int = 512,
        question_tokens: int = 24, n: int = 4, max_new_tokens: int = 32, threads: int = 1, rounds: int = 2,
        quick: bool = False) -> dict:
    from arbiter.policy.model import PolicyModel

    if quick:
        seconds, rounds, clients_list, max_new_tokens = QUICK_SECONDS, 1, (1, 4), 16
    per_slice = seconds / rounds
    warmup_s = min(1.0, per_slice / 4)
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp))
        tokenizer = PolicyModel.load(model_dir).tokenizer
        # Enough that no prompt repeats within a run: only system prompts are shared.
        workloads = {
            "one system prompt": make_requests(tokenizer, 2000, prompts_per_request, system_tokens, question_tokens,
                                               n, max_new_tokens),
            "one per request": make_requests(tokenizer, 400, prompts_per_request, system_tokens, question_tokens, n,
                                             max_new_tokens, system_per_request=True),
        }
        common = ["policy", "--model", str(model_dir), "--torch-threads", str(threads), "--metrics-port", "0"]
        cached = ServiceProcess(common, wait=False)
        uncached = ServiceProcess([*common, "--prefix-cache-tokens", "0"], wait=False)
        try:
            cached.wait_ready()
            uncached.wait_ready()
            for workload, requests in workloads.items():
                offset = 0
                for clients in clients_list:
                    on, off = [], []
                    before = _prefill_counters(cached.metrics_port)
                    for _ in range(rounds):
                        # Each slice its own requests: a prompt seen before would be a whole-prompt hit.
                        for service, parts, label in ((uncached, off, "prefix cache off (baseline)"),
                                                      (cached, on, "prefix cache on")):
                            share = requests[offset:] + requests[:offset]
                            offset = (offset + len(requests) // 10) % len(requests)
                            parts.append(asyncio.run(_drive(service.target, share, clients, per_slice, warmup_s,
                                                            label)))
                    after = _prefill_counters(cached.metrics_port)
                    prompt_tokens, hit_tokens = after[0] - before[0], after[1] - before[1]
                    cells.append((workload, clients, merge(off), merge(on), hit_tokens / max(1.0, prompt_tokens)))
        finally:
            cached.stop()
            uncached.stop()
    rows = []
    gains: dict[str, dict[int, float]] = {workload: {} for workload in workloads}
    hits: dict[str, dict[int, float]] = {workload: {} for workload in workloads}
    for workload, clients, off, on, hit_share in cells:
        gains[workload][clients] = on.throughput / off.throughput
        hits[workload][clients] = hit_share
        for m in (off, on):
            rows.append([workload, m.label, clients, f"{m.throughput:.0f}", f"{m.percentile_ms(50):.0f}",
                         f"{m.percentile_ms(99):.0f}", ratio(m.throughput, off.throughput),
                         f"{hit_share:.0%}" if m is on else "-"])
    print_table(
        f"Prefix caching (--prefix-cache-tokens), model {MODEL}, torch threads {threads}: requests of "
        f"{prompts_per_request} prompts x n={n}, {max_new_tokens} new tokens, each prompt a {system_tokens}-token "
        f"system prompt and a {question_tokens}-token question of its own; the system prompt is one for all "
        f"requests, or one per request (shared by its {prompts_per_request} prompts only, as right after a policy "
        f"update); {seconds:g}s per path per cell in {rounds} alternating slice(s). Baseline: --prefix-cache-tokens 0",
        ["system prompt", "path", "clients", "completion tokens/s", "p50 ms", "p99 ms", "vs off",
         "prompt tokens found cached"],
        rows,
    )
    return {"tokens_per_s_vs_off": gains, "hit_share": hits}
