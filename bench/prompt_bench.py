"""The prompt side of generation: prompts that share a long beginning
(prefix caching) and prompts of mixed lengths (prefill length groups).

Through ``arbiter serve policy`` (its own process; the 4-layer d=256 GPT-2
policy of ``bench.policy_bench``, positions up to 1024), ``clients``
concurrent callers each send, back to back, ``Generate`` requests as a
rollout worker does: several prompts x n=4 samples, ``max_new_tokens`` new
tokens, no prompt repeated within a run. Three workloads:

- one system prompt: ``prompts_per_request`` prompts, each the same system
  prompt of ``system_tokens`` tokens (a chat template with its
  instructions) and a question of its own (``question_tokens``);
- one per request: the same, but each request's prompts share a system
  prompt no other request has (what each request meets right after a
  policy update, the new version's cache empty);
- mixed lengths: ``mixed_prompts`` prompts of 16 to ``mixed_max_tokens``
  tokens each, sharing nothing.

The baseline is the same server with ``--prefix-cache-tokens 0
--prefill-group-cost-tokens 0``: every prompt prefilled whole, a step's
joiners left-padded to the longest, as the engine was before either. The
candidate is the default. The two run in alternating slices so machine load
hits both alike. Reported per cell: completion tokens/s, request latency
p50 / p99, and the share of prompt tokens the candidate did not compute
(its own counters over the cell: copied from its prefix cache, less what a
beginning shared within a step cost to compute once).
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from pathlib import Path

from bench.common import QUICK_SECONDS, ServiceProcess, merge, metric_samples, print_table, ratio
from bench.policy_bench import BENCH_MODEL, WORDS, drive_generate
from bench.prefill_bench import long_prompt

MODEL = {**BENCH_MODEL, "n_positions": 1024}


def build_model(out: Path) -> Path:
    from arbiter.tiny import TinyConfig, make_policy

    return make_policy(out / "bench-policy-1k", TinyConfig(**MODEL))


def mixed_requests(tokenizer, count: int, prompts: int, max_tokens: int, n: int, max_new_tokens: int) -> list:
    """Prompts of random words, 16 to ``max_tokens`` tokens (about: words
    are cut by the tokenizer's measured tokens per word), no two alike."""
    from arbiter.v1 import policy_pb2

    rng = random.Random(1)
    sample = rng.choices(WORDS, k=400)
    per_word = len(tokenizer(" ".join(sample))["input_ids"]) / len(sample)
    return [
        policy_pb2.GenerateRequest(
            prompts=[policy_pb2.PromptInput(text=" ".join(rng.choices(WORDS, k=max(1, round(
                rng.randint(16, max_tokens) / per_word))))) for _ in range(prompts)],
            sampling=policy_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=n, seed=i))
        for i in range(count)
    ]


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


def _prefill_counters(port: int) -> tuple[float, float]:
    """(prompt tokens prefilled, of them found cached) so far."""
    values = {s.name: s.value for s in metric_samples(port)}
    return (values.get("arbiter_policy_prefill_prompt_tokens_total", 0.0),
            values.get("arbiter_policy_prefix_cache_hit_tokens_total", 0.0))


def run(seconds: float = 8.0, clients_list=(1, 4, 16), prompts_per_request: int = 4, system_tokens: int = 512,
        question_tokens: int = 24, mixed_prompts: int = 8, mixed_max_tokens: int = 768, n: int = 4,
        max_new_tokens: int = 32, threads: int = 1, rounds: int = 2, quick: bool = False) -> dict:
    from arbiter.policy.model import PolicyModel

    if quick:
        seconds, rounds, clients_list, max_new_tokens = QUICK_SECONDS, 1, (1, 2), 16
        mixed_prompts, mixed_max_tokens = 4, 256
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
            "mixed lengths": mixed_requests(tokenizer, 400, mixed_prompts, mixed_max_tokens, n, max_new_tokens),
        }
        common = ["policy", "--model", str(model_dir), "--torch-threads", str(threads), "--metrics-port", "0"]
        candidate = ServiceProcess(common, wait=False)
        baseline = ServiceProcess([*common, "--prefix-cache-tokens", "0", "--prefill-group-cost-tokens", "0"],
                                  wait=False)
        try:
            candidate.wait_ready()
            baseline.wait_ready()
            for workload, requests in workloads.items():
                offset = 0
                for clients in clients_list:
                    on, off = [], []
                    before = _prefill_counters(candidate.metrics_port)
                    for _ in range(rounds):
                        # Each round its own requests (a prompt a server has seen would be a whole-prompt hit),
                        # the same for both servers (mixed lengths vary from request to request).
                        share = requests[offset:] + requests[:offset]
                        offset = (offset + len(requests) // 10) % len(requests)
                        for service, parts, label in ((baseline, off, "before (both off)"),
                                                      (candidate, on, "default")):
                            parts.append(asyncio.run(drive_generate(service.target, share, clients, per_slice,
                                                                    warmup_s, label)))
                    after = _prefill_counters(candidate.metrics_port)
                    prompt_tokens, hit_tokens = after[0] - before[0], after[1] - before[1]
                    cells.append((workload, clients, merge(off), merge(on), hit_tokens / max(1.0, prompt_tokens)))
        finally:
            candidate.stop()
            baseline.stop()
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
        f"Prompt prefill (prefix caching, length groups), model {MODEL}, torch threads {threads}: n={n}, "
        f"{max_new_tokens} new tokens; requests of {prompts_per_request} prompts, each a {system_tokens}-token system "
        f"prompt (one for all requests, or one per request) and a {question_tokens}-token question of its own, or of "
        f"{mixed_prompts} prompts of 16-{mixed_max_tokens} tokens (mixed lengths); {seconds:g}s per path per cell in "
        f"{rounds} alternating slice(s). Baseline: --prefix-cache-tokens 0 --prefill-group-cost-tokens 0",
        ["workload", "server", "clients", "completion tokens/s", "p50 ms", "p99 ms", "vs before",
         "prompt tokens not computed"],
        rows,
    )
    return {"tokens_per_s_vs_before": gains, "not_computed_share": hits}
