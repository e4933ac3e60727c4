"""Chunked prefill: what long prompts joining cost the samples already decoding.

Through ``arbiter serve policy`` (its own process, the 4-layer d=256 GPT-2
policy of ``bench.policy_bench``), two kinds of client share the server:

- ``streams`` chat-like clients, each a ``GenerateStream`` of a short prompt
  (1 sample, ``stream_tokens`` new tokens) after another: the gaps between
  their consecutive token events are the time per output token a user sees;
- one batch client sending, back to back, ``Generate`` requests of
  ``long_prompts`` prompts of ``long_tokens`` tokens x n=4 (a rollout
  worker's, or a long-context request), ``long_new_tokens`` new tokens.

Every server runs with ``--prefix-cache-tokens 0``: the long requests
repeat, and their prompts found in a prefix cache would not be long
prefills. The baseline is the same server with ``--prefill-chunk-tokens 0``: each
join's prompts in one forward, as the engine was before chunked prefill, so
every long request stalls every stream for a whole prefill. The candidates
bound the prompt tokens a step prefills. Reported per setting: the streams'
inter-token gap p50 / p99 / max, their tokens/s, the long requests' latency
and all completion tokens/s, with ratios to the baseline; the settings run
in alternating slices so machine load hits them alike.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from pathlib import Path

from bench.common import QUICK_SECONDS, ServiceProcess, print_table, ratio
from bench.policy_bench import BENCH_MODEL, WORDS, build_model


def long_prompt(tokenizer, tokens: int, rng: random.Random) -> str:
    """Words until the prompt is ``tokens`` tokens long (the tiny tokenizer
    splits words into pieces), cut to exactly that many."""
    words: list[str] = []
    while len(tokenizer(" ".join(words))["input_ids"]) < tokens:
        words.extend(rng.choices(WORDS, k=8))
    return tokenizer.decode(tokenizer(" ".join(words))["input_ids"][:tokens])


async def _slice(target: str, streams: int, stream_tokens: int, long_requests: list, seconds: float,
                 warmup_s: float) -> dict:
    import grpc

    from arbiter.v1 import policy_pb2, policy_pb2_grpc

    gaps: list[float] = []
    long_latencies: list[float] = []
    counted = {"stream_tokens": 0, "long_tokens": 0, "on": False}
    stop_at = time.perf_counter() + warmup_s + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)

        async def stream(k: int) -> None:
            rng = random.Random(k)
            while time.perf_counter() < stop_at:
                request = policy_pb2.GenerateStreamRequest(
                    prompt=policy_pb2.PromptInput(text=" ".join(rng.choices(WORDS, k=6))),
                    sampling=policy_pb2.SamplingParams(max_new_tokens=stream_tokens, temperature=1.0,
                                                       seed=rng.randrange(1 << 30)))
                last = None
                async for event in stub.GenerateStream(request, timeout=300):
                    now = time.perf_counter()
                    if counted["on"]:
                        counted["stream_tokens"] += len(event.token_ids)
                        if last is not None:
                            gaps.append(now - last)
                    last = now

        async def batch_client() -> None:
            j = 0
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                response = await stub.Generate(long_requests[j % len(long_requests)], timeout=300)
                if counted["on"]:
                    long_latencies.append(time.perf_counter() - t0)
                    counted["long_tokens"] += sum(len(s.completion_token_ids) for s in response.samples)
                j += 1

        tasks = [asyncio.create_task(stream(k)) for k in range(streams)]
        tasks.append(asyncio.create_task(batch_client()))
        await asyncio.sleep(warmup_s)
        counted["on"], started = True, time.perf_counter()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return {"gaps": gaps, "long_latencies": long_latencies, "stream_tokens": counted["stream_tokens"],
            "long_tokens": counted["long_tokens"], "seconds": elapsed}


def _percentile_ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run(seconds: float = 8.0, settings=(0, 2048, 512), streams: int = 8, stream_tokens: int = 48,
        long_prompts: int = 8, long_tokens: int = 200, long_new_tokens: int = 8, threads: int = 1,
        rounds: int = 2, quick: bool = False) -> dict:
    """``settings``: values of --prefill-chunk-tokens, the first the baseline."""
    from arbiter.policy.model import PolicyModel
    from arbiter.v1 import policy_pb2

    if quick:
        seconds, rounds, long_prompts, settings = QUICK_SECONDS, 1, 2, settings[:2]
    per_slice = seconds / rounds
    warmup_s = min(1.0, per_slice / 4)
    results: dict[int, list[dict]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp))
        tokenizer = PolicyModel.load(model_dir).tokenizer
        rng = random.Random(0)
        long_requests = [
            policy_pb2.GenerateRequest(
                prompts=[policy_pb2.PromptInput(text=long_prompt(tokenizer, long_tokens, rng))
                         for _ in range(long_prompts)],
                sampling=policy_pb2.SamplingParams(max_new_tokens=long_new_tokens, temperature=1.0, n=4, seed=i))
            for i in range(4)
        ]
        # Prefix caching off: the long requests repeat, and a cached prompt is no long prefill (bench.prompt_bench).
        common = ["policy", "--model", str(model_dir), "--torch-threads", str(threads), "--prefix-cache-tokens", "0"]
        services = {s: ServiceProcess([*common, "--prefill-chunk-tokens", str(s)], wait=False) for s in settings}
        try:
            for service in services.values():
                service.wait_ready()
            for _ in range(rounds):
                for setting, service in services.items():
                    results[setting].append(asyncio.run(_slice(
                        service.target, streams, stream_tokens, long_requests, per_slice, warmup_s)))
        finally:
            for service in services.values():
                service.stop()
    merged = {}
    for setting, slices in results.items():
        gaps = [g for s in slices for g in s["gaps"]]
        latencies = [x for s in slices for x in s["long_latencies"]]
        elapsed = sum(s["seconds"] for s in slices)
        stream_tps = sum(s["stream_tokens"] for s in slices) / elapsed
        all_tps = (sum(s["stream_tokens"] + s["long_tokens"] for s in slices)) / elapsed
        merged[setting] = dict(gap_p50_ms=_percentile_ms(gaps, 50), gap_p99_ms=_percentile_ms(gaps, 99),
                               gap_max_ms=_percentile_ms(gaps, 100), stream_tokens_per_s=stream_tps,
                               long_p50_ms=_percentile_ms(latencies, 50), long_requests=len(latencies),
                               tokens_per_s=all_tps)
    base = merged[settings[0]]
    rows = []
    for setting, m in merged.items():
        rows.append([
            "off (each join in one forward)" if setting == 0 else f"{setting} tokens a step",
            f"{m['gap_p50_ms']:.1f}", f"{m['gap_p99_ms']:.1f}", f"{m['gap_max_ms']:.1f}",
            ratio(base["gap_p99_ms"], m["gap_p99_ms"]), f"{m['stream_tokens_per_s']:.0f}",
            f"{m['long_p50_ms']:.0f} ({m['long_requests']})", f"{m['tokens_per_s']:.0f}",
            ratio(m["tokens_per_s"], base["tokens_per_s"]),
        ])
    print_table(
        f"Chunked prefill (--prefill-chunk-tokens), model {BENCH_MODEL}, torch threads {threads}: {streams} "
        f"streams of 1 short prompt x {stream_tokens} new tokens, beside back-to-back requests of {long_prompts} "
        f"prompts of {long_tokens} tokens x n=4 ({long_prompts * 4 * long_tokens} prompt tokens), "
        f"{long_new_tokens} new tokens; {seconds:g}s per setting in {rounds} alternating slice(s). Baseline: off",
        ["prefill per step", "stream gap p50 ms", "p99 ms", "max ms", "p99 gain vs off", "stream tokens/s",
         "long request p50 ms (n)", "all tokens/s", "vs off"],
        rows,
    )
    return {"settings": {str(k): v for k, v in merged.items()},
            "p99_gap_gain_vs_off": {str(k): base["gap_p99_ms"] / v["gap_p99_ms"] for k, v in merged.items()},
            "tokens_per_s_vs_off": {str(k): v["tokens_per_s"] / base["tokens_per_s"] for k, v in merged.items()}}
