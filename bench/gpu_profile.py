"""Where the time goes on a GPU (``bench/gpu_profile.sh``): the reward,
reference and policy services as deployed (``--device cuda --dtype
bfloat16``), each under the stack sampler of ``bench.sampled``, driven phase
by phase (1 and 16 Generate clients, 1/8/32 Score and LogProbs clients),
with each phase's batch metrics scraped from its ``/metrics``; then the
policy engine's core in-process (no gRPC), step by step, under cProfile and
the PyTorch profiler, beside Hugging Face ``generate``. Writes
``profile.txt`` (the summary) and ``profile.json`` to ``--out``; the
figures of ``bench.gpu_check`` say how fast, these say why.
``--shape tiny --device cpu --dtype float32`` tries it without a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import random
import tempfile
import time
from pathlib import Path

from bench.common import ServiceProcess, metric_samples
from bench.gpu_check import SHAPES, WORDS, _drive, _generate_call, _logprobs_call, _score_call, build_models, texts, \
    token_pairs

REPORT: list[str] = []


def say(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)
        REPORT.append(line)


def scrape(port: int) -> dict[str, float]:
    """Histogram sums and counts summed over label sets; batch-cap and
    queue-depth gauges by label set."""
    out: dict[str, float] = {}
    for sample in metric_samples(port):
        if not sample.name.startswith("arbiter_"):
            continue
        if sample.name.endswith(("_sum", "_count")):
            key = sample.name
        elif "cap" in sample.name or "depth" in sample.name:
            key = f"{sample.name}{sorted(sample.labels.items())}"
        else:
            continue
        out[key] = out.get(key, 0.0) + sample.value
    return out


def metric_deltas(before: dict, after: dict) -> list[str]:
    lines = []
    for key in sorted(after):
        if key.endswith("_count"):
            base = key[: -len("_count")]
            count = after[key] - before.get(key, 0.0)
            total = after.get(f"{base}_sum", 0.0) - before.get(f"{base}_sum", 0.0)
            if count:
                lines.append(f"    {base}: n={count:.0f} mean={total / count:.4g}")
        elif "cap" in key or "depth" in key:
            lines.append(f"    {key} = {after[key]:g}")
    return lines


def sample_report(path: Path, top: int = 14) -> list[str]:
    if not path.exists():
        return [f"    (no samples: {path.name})"]
    report = json.loads(path.read_text())
    lines = []
    for thread, data in sorted(report.items(), key=lambda kv: -kv[1]["samples"]):
        total = data["samples"]
        idle = sum(c for where, c in data["leaf"] if where.endswith(("wait", "select", "_worker", "get", "sleep",
                                                                        "poll", "_run_once", "epoll", "threading.py:run")))
        lines.append(f"    thread {thread}: {total} samples ({idle / total:.0%} in waits among top leaves)")
        if idle / total > 0.97:
            continue
        lines.append("      innermost lines:")
        lines += [f"        {c / total:6.1%}  {where}" for where, c in data["line"][:top]]
        lines.append("      inclusive:")
        lines += [f"        {c / total:6.1%}  {where}" for where, c in data["inclusive"][:top + 10]]
    return lines


def services_section(args, models, out: Path, raw: Path) -> dict:
    phase_file = raw / "phase"
    phase_file.write_text("")
    flags = ["--device", args.device, "--dtype", args.dtype, "--torch-threads", "2", "--metrics-port", "0"]
    services = {}
    for kind in ("reward", "reference", "policy"):
        env = {"ARBITER_SAMPLER_OUT": str(raw / kind), "ARBITER_SAMPLER_PHASE": str(phase_file)}
        model = models["reward" if kind == "reward" else "policy"]
        services[kind] = ServiceProcess([kind, "--model", str(model), *flags], env=env, wait=False,
                                        command=("bench.sampled", "cli", "serve"))
    results = {}
    try:
        for service in services.values():
            service.wait_ready()
        say(f"services ready after {time.perf_counter() - STARTED:.0f}s")
        pairs = texts(256, 128)
        from arbiter.v1 import policy_pb2, reference_pb2, reward_pb2

        score = [reward_pb2.ScoreRequest(inputs=[reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt=p, response=r))],
                                         options=reward_pb2.ScoreOptions(truncation=2)) for p, r in pairs]
        sequences = [reference_pb2.LogProbsRequest(sequences=[reference_pb2.TokenSequence(
            prompt_token_ids=p, completion_token_ids=c)]) for p, c in token_pairs(256, 512, 64, 64)]
        rng = random.Random(0)
        generate = [policy_pb2.GenerateRequest(prompts=[policy_pb2.PromptInput(
            text=" ".join(rng.choices(WORDS, k=rng.randint(6, 14))))], sampling=policy_pb2.SamplingParams(
            max_new_tokens=32, temperature=1.0, n=4, seed=i)) for i in range(64)]
        phases = [("policy", 1, _generate_call, generate), ("policy", 16, _generate_call, generate),
                  ("reward", 1, _score_call, score), ("reward", 8, _score_call, score),
                  ("reward", 32, _score_call, score), ("reference", 1, _logprobs_call, sequences),
                  ("reference", 8, _logprobs_call, sequences), ("reference", 32, _logprobs_call, sequences)]
        for kind, clients, call, requests in phases:
            service = services[kind]
            name = f"{kind}-{clients}"
            # One untimed second first: the phase measures the steady state.
            asyncio.run(_drive(service.target, call, requests, clients, 0.5, 0.5, "warm-up"))
            before = scrape(service.metrics_port)
            phase_file.write_text(name)
            measured = asyncio.run(_drive(service.target, call, requests, clients, args.seconds, 0.0, name))
            phase_file.write_text("")
            after = scrape(service.metrics_port)
            results[name] = {"per_s": measured.throughput, "p50_ms": measured.percentile_ms(50),
                             "p99_ms": measured.percentile_ms(99)}
            say(f"== {name}: {measured.throughput:.1f}/s, p50 {measured.percentile_ms(50):.1f} ms, "
                f"p99 {measured.percentile_ms(99):.1f} ms", *metric_deltas(before, after))
            # The sampler writes the phase within its poll interval.
            deadline = time.monotonic() + 5
            path = raw / f"{kind}.{name}.json"
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            say(*sample_report(path))
            write(out)
    finally:
        for service in services.values():
            service.stop()
    return results


def policy_core_section(args, models) -> dict:
    """The engine's core in this process: one request (1 prompt x n=4, 32
    tokens) decoded as a batch of its own, step by step, beside HF generate."""
    import torch

    from arbiter.backends.placement import Placement
    from arbiter.policy.model import PolicyModel
    from arbiter.policy.types import ResolvedSampling
    from arbiter.types import Prompt

    cuda = args.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    policy = PolicyModel.load(models["policy"], placement=Placement.resolve(args.device, args.dtype))
    params = ResolvedSampling(32, 1.0, 1.0, 0, 4, (), 0)
    prompt = "the quick brown fox policy reward model answer question"

    def core(profile_steps: list | None = None) -> int:
        ids = policy.encode([Prompt(text=prompt)], 32)
        run = policy.start(ids, params)
        while not run.done:
            t0 = time.perf_counter()
            run.step()
            sync()
            if profile_steps is not None:
                profile_steps.append(time.perf_counter() - t0)
        return sum(len(s.completion_token_ids) for s in run.samples())

    def hf() -> int:
        tokenizer, model = policy.tokenizer, policy.model
        encoded = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
        with torch.inference_mode():
            out = model.generate(**encoded, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 num_return_sequences=4, max_new_tokens=32, pad_token_id=policy.pad_id)
        sync()
        return out.shape[0] * (out.shape[1] - encoded["input_ids"].shape[1])

    result = {}
    for name, fn in (("core", core), ("hf_generate", hf)):
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        result[f"{name}_request_ms"] = sorted(times)[2] * 1000
    steps: list[float] = []
    core(steps)
    result["core_step_ms_median"] = sorted(steps)[len(steps) // 2] * 1000
    result["core_first_step_ms"] = steps[0] * 1000
    say(f"== policy core in-process: request {result['core_request_ms']:.1f} ms (median of 5), HF generate "
        f"{result['hf_generate_request_ms']:.1f} ms; core step median {result['core_step_ms_median']:.2f} ms, "
        f"first step (prefill) {result['core_first_step_ms']:.2f} ms")
    profiler = cProfile.Profile()
    profiler.enable()
    core()
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(45)
    say("-- cProfile of one core request (cumulative):", *stream.getvalue().splitlines()[:75])
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        core()
        sync()
    say("-- torch.profiler of one core request (by CPU total):",
        *prof.key_averages().table(sort_by="cpu_time_total", row_limit=30).splitlines())
    if cuda:
        say("-- by device time:", *prof.key_averages().table(sort_by="cuda_time_total", row_limit=20).splitlines())
    policy.release()
    return result


def write(out: Path) -> None:
    (out / "profile.txt").write_text("\n".join(REPORT) + "\n")


STARTED = time.perf_counter()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-profile-out"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-medium")
    parser.add_argument("--seconds", type=float, default=4.0, help="time per phase")
    parser.add_argument("--only", action="append", choices=("services", "core"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp), SHAPES[args.shape], args.dtype, args.device)
        raw = Path(tmp) / "samples"
        raw.mkdir()
        say(f"models built after {time.perf_counter() - STARTED:.0f}s")
        for name in args.only or ["core", "services"]:
            try:
                results[name] = (policy_core_section(args, models) if name == "core"
                                 else services_section(args, models, out, raw))
            except Exception as err:  # one section failing must not lose the other's figures
                import traceback

                say(f"{name} failed: {type(err).__name__}: {err}", *traceback.format_exc().splitlines())
            write(out)
            (out / "profile.json").write_text(json.dumps(results, indent=1))
    say(f"done after {time.perf_counter() - STARTED:.0f}s")
    write(out)


if __name__ == "__main__":
    main()
