"""The GPU check (issue 12, item 5): the reward, reference and policy services
run as deployed (``arbiter serve KIND --device cuda --dtype bfloat16``, each in
its own process) on a GPT-2-medium-shaped random model, against in-process
baselines on the same device and dtype measured in the same run, in about 7
minutes. Run it through ``bench/gpu_check.sh`` on a machine with CUDA; it
writes ``gpu_check.json`` (every figure) and ``gpu_check.txt`` (the tables)
to ``--out``.

Sections (each baseline alternates with the service within a cell):

- reward: items/s of one-item ``Score`` requests (~230-token items) from
  1/8/32/64 clients vs (a) the in-process forward of a batch of as many
  items as clients, up to 32 (as ``bench.reward_bench``; session 15's run
  held every cell to a batch of 32, which no 1 or 8 callers can fill), the
  service as deployed, with batching off (``--no-dynamic-batching``: the
  goal's other baseline), with ``--model-process`` (the forward in a
  child process: on a GPU the per-op Python of a launch-bound forward meets
  the handlers' GIL too) and, with ``--with-compile``, with ``--compile`` (the
  forward compiled by ``torch.compile``: fused kernels, fewer launches);
- reference: sequences/s of one-sequence ``LogProbs`` requests (64 prompt +
  64 completion tokens) from 1/8/32 clients vs (a) the in-process forward of a
  batch of as many sequences as clients, the service as deployed and with
  ``--model-process`` (session 15 saw its batches take longer than (a)'s
  twice as large: the launch-bound forward sharing the GIL with the handlers?);
- policy: tokens/s of ``Generate`` (1 prompt x n=4, 32 new tokens,
  temperature 1) from 1/4/16/64 clients vs (b) Hugging Face ``generate`` on
  the same weights in-process, one request at a time;
- accuracy: the half-precision answers against float32 on the same device
  (reward scores, reference log-probs), and the services' answers against
  the in-process ones.

On a GPU each of the three services also runs with ``--cudnn-attention``
(PyTorch's own choice of attention kernel, cuDNN's on an H100/H200), in the
same cells against the same baselines: what the default (cuDNN's attention
off, ``arbiter.backends.placement.shape_generic_attention``) changes.

Every service must say (``GetModelInfo``) that it runs on the device and
dtype asked for; one that does not is reported as such and not measured (the
policy engine passes its placement to its loads once the continuous-batching
engine lands). ``--shape tiny --device cpu`` runs the whole script on a CPU
in a minute or two, to try it without a GPU; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import tempfile
import time
import traceback
from pathlib import Path

from bench.common import Measurement, ServiceProcess, console, drive, merge, print_table, ratio, timed_loop

SHAPES = {
    # GPT-2 medium: 355M parameters.
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, n_positions=1024, vocab_size=50257),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=256, vocab_size=512),
}
WORDS = "the a policy reward model good bad answer question kind helpful short long quick brown fox".split()
# Service processes share the CPU with this one; the forward passes are on the GPU.
SERVICE_THREADS = 2


def build_models(root: Path, shape: dict, dtype: str, device: str) -> dict[str, Path]:
    """A policy (causal LM, also the reference) and a reward model of
    ``shape``, random, saved in ``dtype``. The tiny byte-level tokenizer has
    a few hundred ids; the rest of the vocabulary is there for the cost of
    the embedding and the logits (ids past the tokenizer decode to nothing)."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from arbiter.hf import quiet_transformers, write_metadata
    from arbiter.tiny import build_tokenizer

    quiet_transformers()
    tokenizer = build_tokenizer(512, shape["n_positions"])
    config = dict(shape, vocab_size=max(shape["vocab_size"], len(tokenizer)), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out = {}
    for kind, cls, extra in (("policy", GPT2LMHeadModel, {}),
                             ("reward", GPT2ForSequenceClassification, {"num_labels": 1})):
        torch.manual_seed(0)
        # Initialised on the GPU: 355M normal draws take a while on a CPU.
        with torch.device(device if device != "auto" else "cpu"):
            model = cls(GPT2Config(**config, **extra))
        model.to("cpu", getattr(torch, dtype)).save_pretrained(root / kind)
        tokenizer.save_pretrained(root / kind)
        write_metadata(root / kind, name=f"gpu-check-{kind}", version="v0")
        out[kind] = root / kind
        del model
    return out


def texts(count: int, words: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(" ".join(rng.choices(WORDS, k=words // 4)), " " + " ".join(rng.choices(WORDS, k=3 * words // 4)))
            for _ in range(count)]


def token_pairs(count: int, vocab: int, prompt: int, completion: int, seed: int = 0):
    rng = random.Random(seed)
    # Ordinary ids: the two specials sit at the start of the tiny vocabulary.
    return [(tuple(rng.randrange(2, vocab) for _ in range(prompt)),
             tuple(rng.randrange(2, vocab) for _ in range(completion))) for _ in range(count)]


def service_info(target: str):
    import grpc

    from arbiter.v1 import common_pb2, common_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        return common_pb2_grpc.ModelServiceStub(channel).GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=30).info


def check_placement(name: str, service: ServiceProcess, device: str, dtype: str) -> dict:
    info = service_info(service.target)
    placed = {"device": info.device, "dtype": info.dtype}
    from arbiter.backends.placement import Placement

    wanted_device = Placement.resolve(device, dtype).device  # auto: what it resolves to here
    if info.dtype != dtype or not info.device.startswith(wanted_device):
        raise RuntimeError(f"the {name} service runs on {info.device or '?'} in {info.dtype or '?'}, not {device} in "
                           f"{dtype}: its engine does not pass --device/--dtype to its loads")
    return placed


async def _drive(target: str, make_call, requests, clients: int, seconds: float, warmup_s: float,
                 label: str) -> Measurement:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        call = make_call(channel)
        await call(requests[0])
        return await drive(call, requests, clients, seconds, warmup_s, label)


def _score_call(channel):
    from arbiter.v1 import reward_pb2_grpc

    stub = reward_pb2_grpc.RewardServiceStub(channel)

    async def call(request) -> int:
        await stub.Score(request, timeout=300)
        return 1

    return call


def _logprobs_call(channel):
    from arbiter.v1 import reference_pb2_grpc

    stub = reference_pb2_grpc.ReferenceServiceStub(channel)

    async def call(request) -> int:
        return len((await stub.LogProbs(request, timeout=300)).results)

    return call


def _generate_call(channel):
    from arbiter.v1 import policy_pb2_grpc

    stub = policy_pb2_grpc.PolicyServiceStub(channel)

    async def call(request) -> int:
        response = await stub.Generate(request, timeout=600)
        return sum(len(s.completion_token_ids) for s in response.samples)

    return call


def _rows(cells):
    rows = []
    for clients, base, service in cells:
        rows.append([base.label, "-", f"{base.throughput:.1f}", f"{base.percentile_ms(50):.1f}",
                     f"{base.percentile_ms(99):.1f}", "1.00"])
        rows.append([service.label, clients, f"{service.throughput:.1f}", f"{service.percentile_ms(50):.1f}",
                     f"{service.percentile_ms(99):.1f}", ratio(service.throughput, base.throughput)])
    return rows


def _cell_summary(cells) -> dict:
    return {str(clients): {"service_per_s": s.throughput, "baseline_per_s": b.throughput,
                           "ratio": s.throughput / b.throughput if b.throughput else None,
                           "service_p50_ms": s.percentile_ms(50), "service_p99_ms": s.percentile_ms(99)}
            for clients, b, s in cells}


def _measure(args, clients_list, baseline, service: ServiceProcess, variants: dict[str, ServiceProcess], call,
             requests, label: str):
    """Per client count, ``baseline(clients) -> (fn, label)`` timed in-process,
    then the service and each variant (``{flag: service started with it}``)
    driven with ``call``, in ``args.rounds`` alternating slices. Returns
    (cells, {flag: cells}), a cell being (clients, baseline, measured)."""
    cells, variant_cells = [], {flag: [] for flag in variants}
    for clients in clients_list:
        fn, base_label = baseline(clients)
        base, served, by_variant = [], [], {flag: [] for flag in variants}
        for _ in range(args.rounds):
            base.append(timed_loop(fn, args.seconds / args.rounds, base_label))
            served.append(asyncio.run(_drive(service.target, call, requests, clients,
                                             args.seconds / args.rounds, args.warmup_s, label)))
            for flag, variant in variants.items():
                by_variant[flag].append(asyncio.run(_drive(variant.target, call, requests, clients,
                                                           args.seconds / args.rounds, args.warmup_s,
                                                           f"{label}, {flag}")))
        cells.append((clients, merge(base), merge(served)))
        for flag, measured in by_variant.items():
            variant_cells[flag].append((clients, cells[-1][1], merge(measured)))
    return cells, variant_cells


def _as_many_as_clients(forward, items, most: int = 32):
    """Baseline (a) for ``_measure``: ``forward`` on in-process batches of as
    many items as the cell has clients (up to ``most``, the services' batch
    bound), what perfect batching of that many one-item callers gives."""

    def baseline(clients: int):
        batch = min(clients, most)

        def run(i: int) -> int:
            forward([items[(i * batch + j) % len(items)] for j in range(batch)])
            return batch

        return run, f"in-process forward, batch {batch} (a)"

    return baseline


def _report(args, kind: str, title: str, unit: str, placed: dict, cells, variant_cells,
            variants: dict[str, ServiceProcess]) -> dict:
    """The section's tables (the service, then each variant against the same
    baseline) and its figures: ``result[flag name]`` per variant."""
    columns = ["path", "clients", unit, "p50 ms", "p99 ms", "vs baseline"]
    print_table(title, columns, _rows(cells))
    result = {"placement": placed, "cells": _cell_summary(cells)}
    for flag, measured in variant_cells.items():
        print_table(f"{kind.capitalize()} with {flag}, the same cells (the same baseline)", columns, _rows(measured))
        result[flag.removeprefix("--").replace("-", "_")] = {
            "placement": check_placement(kind, variants[flag], args.device, args.dtype),
            "cells": _cell_summary(measured)}
    return result


def reward_section(args, models, service: ServiceProcess, variants: dict[str, ServiceProcess]) -> dict:
    from arbiter.backends import BackendConfig, open_backends
    from arbiter.reward.backend import REWARD
    from arbiter.reward.model import RewardModel
    from arbiter.types import RewardInput, Truncation
    from arbiter.v1 import reward_pb2

    placed = check_placement("reward", service, args.device, args.dtype)
    model = RewardModel.load(models["reward"], backends=open_backends(BackendConfig(device=args.device,
                                                                                    dtype=args.dtype), REWARD))
    pairs = texts(256, 128)
    items = [e.token_ids for e in model.encode([RewardInput(p, r) for p, r in pairs], Truncation.LEFT)]
    requests = [reward_pb2.ScoreRequest(inputs=[reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt=p, response=r))],
                                        options=reward_pb2.ScoreOptions(truncation=2)) for p, r in pairs]
    cells, variant_cells = _measure(args, (1, 8, 32, 64), _as_many_as_clients(model.forward, items), service, variants,
                                    _score_call, requests, "service Score, 1 item per request")
    mean_tokens = sum(map(len, items)) / len(items)
    result = _report(args, "reward", f"Reward on {placed['device']} in {placed['dtype']}, {mean_tokens:.0f}-token "
                     f"items, model {args.shape}; baseline (a) re-measured in each cell (latency of (a): per batch)",
                     "items/s", placed, cells, variant_cells, variants)
    model.release()
    return {**result, "mean_tokens": mean_tokens}


def reference_section(args, models, service: ServiceProcess, variants: dict[str, ServiceProcess]) -> dict:
    from arbiter.backends import BackendConfig, open_backends
    from arbiter.reference.backend import REFERENCE
    from arbiter.reference.model import ReferenceModel, TokenSequence
    from arbiter.v1 import reference_pb2

    placed = check_placement("reference", service, args.device, args.dtype)
    model = ReferenceModel.load(models["policy"], backends=open_backends(BackendConfig(device=args.device,
                                                                                      dtype=args.dtype), REFERENCE))
    pairs = token_pairs(256, len(model.tokenizer), 64, 64)
    sequences = [TokenSequence(p, c) for p, c in pairs]
    requests = [reference_pb2.LogProbsRequest(sequences=[reference_pb2.TokenSequence(
        prompt_token_ids=p, completion_token_ids=c)]) for p, c in pairs]
    cells, variant_cells = _measure(args, (1, 8, 32), _as_many_as_clients(model.logprobs, sequences), service,
                                    variants, _logprobs_call, requests, "service LogProbs, 1 sequence per request")
    result = _report(args, "reference", f"Reference on {placed['device']} in {placed['dtype']}, 64 + 64 tokens per "
                     f"sequence, model {args.shape}; baseline (a) re-measured in each cell (latency of (a): per batch)",
                     "sequences/s", placed, cells, variant_cells, variants)
    model.release()
    return result


def policy_section(args, models, service: ServiceProcess, variants: dict[str, ServiceProcess]) -> dict:
    import torch

    from arbiter.backends.placement import Placement, model_device
    from arbiter.lm import load_causal_weights
    from arbiter.v1 import policy_pb2

    placed = check_placement("policy", service, args.device, args.dtype)
    model, tokenizer = load_causal_weights(models["policy"], placement=Placement.resolve(args.device, args.dtype))
    n, new_tokens = 4, 32
    rng = random.Random(0)
    prompts = [" ".join(rng.choices(WORDS, k=rng.randint(6, 14))) for _ in range(64)]
    requests = [policy_pb2.GenerateRequest(prompts=[policy_pb2.PromptInput(text=p)], sampling=policy_pb2.SamplingParams(
        max_new_tokens=new_tokens, temperature=1.0, n=n, seed=i)) for i, p in enumerate(prompts)]
    eos = tokenizer.eos_token_id

    def hf_generate(i: int) -> int:
        torch.manual_seed(i)
        encoded = tokenizer(prompts[i % len(prompts)], return_tensors="pt").to(model_device(model))
        with torch.inference_mode():
            out = model.generate(**encoded, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 num_return_sequences=n, max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
        tokens = 0
        for row in out[:, encoded["input_ids"].shape[1]:].tolist():
            tokens += row.index(eos) + 1 if eos in row else len(row)
        return tokens

    cells, variant_cells = _measure(args, (1, 4, 16, 64),
                                    lambda clients: (hf_generate, "HF generate, one request at a time (b)"),
                                    service, variants, _generate_call, requests,
                                    f"service Generate, n={n}, {new_tokens} new tokens")
    return _report(args, "policy", f"Policy on {placed['device']} in {placed['dtype']}, 1 prompt x n={n}, {new_tokens} "
                   f"new tokens, model {args.shape}; baseline (b) re-measured in each cell (tokens/s; latency per "
                   "request)", "tokens/s", placed, cells, variant_cells, variants)


def accuracy_section(args, models, services: dict[str, ServiceProcess]) -> dict:
    """Half precision against float32, on the same device; services against in-process."""
    import grpc

    from arbiter.backends import BackendConfig, open_backends
    from arbiter.reference.backend import REFERENCE
    from arbiter.reference.model import ReferenceModel, TokenSequence
    from arbiter.reward.backend import REWARD
    from arbiter.reward.model import RewardModel
    from arbiter.types import RewardInput, Truncation
    from arbiter.v1 import reference_pb2, reference_pb2_grpc, reward_pb2, reward_pb2_grpc

    def spread(a, b):
        return max(abs(x - y) for x, y in zip(a, b, strict=True))

    out = {}
    half = BackendConfig(device=args.device, dtype=args.dtype)
    full = BackendConfig(device=args.device, dtype="float32")
    pairs = texts(32, 128, seed=1)
    low, high = (RewardModel.load(models["reward"], backends=open_backends(c, REWARD)) for c in (half, full))
    items = [e.token_ids for e in low.encode([RewardInput(p, r) for p, r in pairs], Truncation.LEFT)]
    scores = {name: m.forward(items) for name, m in (("half", low), ("full", high))}
    mean = sum(scores["full"]) / len(items)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores["full"]) / len(items))
    out["reward_max_abs_diff_vs_float32"] = spread(scores["half"], scores["full"])
    out["reward_float32_score_std"] = std
    with grpc.insecure_channel(services["reward"].target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        served = [stub.Score(reward_pb2.ScoreRequest(
            inputs=[reward_pb2.RewardInput(text=reward_pb2.TextPair(prompt=p, response=r))],
            options=reward_pb2.ScoreOptions(truncation=2)), timeout=60).results[0].raw_score for p, r in pairs]
    out["reward_service_max_abs_diff_vs_in_process"] = spread(served, scores["half"])
    for m in (low, high):
        m.release()
    low, high = (ReferenceModel.load(models["policy"], backends=open_backends(c, REFERENCE)) for c in (half, full))
    sequences = [TokenSequence(p, c) for p, c in token_pairs(16, len(low.tokenizer), 64, 64, seed=1)]
    logprobs = {name: [x for row in m.logprobs(sequences) for x in row] for name, m in (("half", low), ("full", high))}
    out["reference_max_abs_diff_vs_float32"] = spread(logprobs["half"], logprobs["full"])
    out["reference_all_finite"] = all(math.isfinite(x) for x in logprobs["half"])
    with grpc.insecure_channel(services["reference"].target) as channel:
        stub = reference_pb2_grpc.ReferenceServiceStub(channel)
        response = stub.LogProbs(reference_pb2.LogProbsRequest(sequences=[reference_pb2.TokenSequence(
            prompt_token_ids=s.prompt_token_ids, completion_token_ids=s.completion_token_ids) for s in sequences]),
            timeout=60)
        served = [x for result in response.results for x in result.logprobs]
    out["reference_service_max_abs_diff_vs_in_process"] = spread(served, logprobs["half"])
    for m in (low, high):
        m.release()
    print_table(f"Accuracy: {args.dtype} vs float32 on {args.device} (max abs difference)",
                ["what", "value"], [[k, f"{v:.3g}" if isinstance(v, float) else str(v)] for k, v in out.items()])
    return out


def environment() -> dict:
    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return env


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-check-out"), help="where results go ($OUT)")
    parser.add_argument("--device", default="cuda", help="the services' --device")
    parser.add_argument("--dtype", default="bfloat16", help="the services' --dtype")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-medium")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per path per cell")
    parser.add_argument("--rounds", type=int, default=2, help="alternating slices per cell")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="untimed client time before each service slice")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="sections not started by then are skipped (the whole run should end inside ~8 minutes)")
    parser.add_argument("--only", action="append", choices=("reward", "reference", "policy", "accuracy"))
    parser.add_argument("--with-compile", action="store_true",
                        help="measure the reward service with --compile too (its start-up compiles: ~1 minute more)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console.record = True
    started = time.perf_counter()
    from arbiter.backends import BackendConfig

    BackendConfig(device=args.device, dtype=args.dtype)  # refuses a device this machine lacks, before any work
    results: dict = {"environment": environment(), "args": vars(args)}
    print(json.dumps(results["environment"]), flush=True)
    # Accuracy first: seconds, and the one section that must not be skipped by the budget.
    sections = args.only or ["accuracy", "policy", "reward", "reference"]
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp), SHAPES[args.shape], args.dtype, args.device)
        results["build_s"] = time.perf_counter() - started
        flags = ["--device", args.device, "--dtype", args.dtype, "--torch-threads", str(SERVICE_THREADS)]
        model_of = {"reward": models["reward"], "reference": models["policy"], "policy": models["policy"]}
        services = {kind: ServiceProcess([kind, "--model", str(model_of[kind]), *flags], wait=False)
                    for kind in ("reward", "reference", "policy")}
        # Variants, each its own service: {section: {flag: name in ``services``}}.
        # Reward with batching off too: the goal's other baseline (each request
        # a forward of its own). On a GPU every service with cuDNN's attention
        # as well: what turning it off (the default) changes, in the same run.
        variants: dict[str, dict[str, str]] = {
            "reward": {"--no-dynamic-batching": "reward-off", "--model-process": "reward-process"},
            "reference": {"--model-process": "reference-process"}, "policy": {}}
        if args.with_compile:
            variants["reward"]["--compile"] = "reward-compiled"
        if args.device != "cpu":
            for kind in variants:
                variants[kind]["--cudnn-attention"] = f"{kind}-cudnn"
        for section, flagged in variants.items():
            for flag, kind in flagged.items():
                services[kind] = ServiceProcess([section, "--model", str(model_of[section]), *flags, flag],
                                                wait=False)
        down = {}
        try:
            for kind, service in services.items():
                try:
                    service.wait_ready()
                except RuntimeError as err:  # its output says why; the other services still run
                    print(err, flush=True)
                    down[kind] = f"the {kind} service did not start: {str(err)[-2000:]}"
            results["ready_s"] = time.perf_counter() - started
            for name in sections:
                needs = ("reward", "reference") if name == "accuracy" else (name,)
                if any(kind in down for kind in needs):
                    results[name] = {"error": "; ".join(down[kind] for kind in needs if kind in down)}
                    continue
                if time.perf_counter() - started > args.budget_s:
                    results[name] = {"skipped": f"over the {args.budget_s:g}s budget"}
                    continue
                section_started = time.perf_counter()
                try:
                    if name == "accuracy":
                        results[name] = accuracy_section(args, models, services)
                    else:
                        run = {"reward": reward_section, "reference": reference_section, "policy": policy_section}
                        started_variants = {flag: services[kind] for flag, kind in variants[name].items()
                                            if kind not in down}
                        results[name] = run[name](args, models, services[name], started_variants)
                except Exception as err:  # one section failing must not lose the others' figures
                    traceback.print_exc()
                    results[name] = {"error": f"{type(err).__name__}: {err}"}
                results[name]["seconds"] = time.perf_counter() - section_started
                _write(out, results, started)
        finally:
            for service in services.values():
                service.stop()
    _write(out, results, started)
    print(json.dumps(results, indent=2, default=str), flush=True)
    return results


def _write(out: Path, results: dict, started: float) -> None:
    results["total_s"] = time.perf_counter() - started
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "gpu_check.txt").write_text(console.export_text(clear=False))


if __name__ == "__main__":
    main()
