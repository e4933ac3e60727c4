"""Scale rehearsal (``make bench-scale``): the whole loop, as ``arbiter up``
runs it, with a GPT-2-small-shaped model and an N-rank trainer.

The model is built here from a seed: GPT-2 small's shape (12 layers, 12
heads, width 768, 1024 positions, a 50257-token byte-level BPE vocabulary
trained on seeded random words: 124 M parameters), random weights, saved as
an ordinary Hugging Face directory and loaded by every component through the
real loading code. The reward model has the same shape (a
sequence-classification head). Nothing is downloaded.

For each publish mode (``shared``: versions read from the trainer's
directory; ``s3``: uploaded to the stack's local S3-protocol store and
downloaded by the replica; ``s3-bf16``) one stack runs until the trainer has
made ``--iterations`` updates and the policy replica serves the last one.
Reported per iteration:

- worker stage seconds (generate, score, reference: their sum over the
  worker's batches divided by the trainer's updates; stages overlap across
  the worker's pipelined batches);
- trainer seconds (the update itself, from its history) and the seconds it
  waited on bookkeeping (the in-memory snapshot for the background publisher,
  and the checkpoint: weights, optimizer and offsets, fsynced; every update
  by default, ``checkpoint_every``);
- publish-to-serving seconds: from the moment the trainer's gradient steps
  for an update ended (``trained_at`` in its history) to the moment the
  policy replica answered with that
  version (polled every 50 ms here), split into the trainer's version write
  and the replica's apply (announced to serving: download, verify, load,
  probe, swap), against the raw cost of writing the same safetensors bytes to
  a new file and reading them back, measured in the same run twice: on the
  idle machine before any stack starts, and while the mode's loop runs (what
  the publisher and the replica compete with here) (target ≤ 1.5×); for the
  s3 modes also against the raw cost of uploading and downloading the same
  file through the same store (``raw_s3_seconds``) while the loop runs, so
  that ratio compares like with like.

Noisy on a shared machine; numbers are seconds of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import statistics
import threading
import time
from pathlib import Path

from bench.common import metric_samples, print_table

GPT2_SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}
# The local store is moto's Python server, which assembles a multipart upload
# by copying its parts: one PUT per file uploads ~1.5x faster there (128 MiB,
# measured: 67 MiB/s against 43 in 64 MiB parts). A real S3 wants parts.
S3_TRANSFER = {"multipart_threshold_mb": 1024, "multipart_chunksize_mb": 64}
PROMPTS = ("Tell me about the sea.", "Write a short story.", "Explain the tide.", "What is a reward model?",
           "Describe a city at night.", "Give me advice on sleep.", "Summarize the news.", "Say something kind.")


def build_models(out: Path, shape: dict, seed: int = 0) -> dict[str, Path]:
    """Policy and reward directories of ``shape`` (reused when already built)."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from arbiter.hf import write_metadata
    from arbiter.tiny import build_tokenizer

    marker = out / "shape.json"
    paths = {"policy": out / "policy", "reward": out / "reward"}
    if marker.exists() and json.loads(marker.read_text()) == shape:
        return paths
    shutil.rmtree(out, ignore_errors=True)
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    # Enough distinct seeded words for BPE to reach GPT-2's vocabulary size.
    corpus = [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(12))
              for _ in range(40000)] + list(PROMPTS)
    tokenizer = build_tokenizer(shape["vocab_size"], shape["n_positions"], corpus)
    config = dict(vocab_size=len(tokenizer), n_layer=shape["n_layer"], n_head=shape["n_head"],
                  n_embd=shape["n_embd"], n_positions=shape["n_positions"], bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(**config)).save_pretrained(paths["policy"])
    torch.manual_seed(seed + 1)
    GPT2ForSequenceClassification(GPT2Config(**config, num_labels=1)).save_pretrained(paths["reward"])
    for kind, path in paths.items():
        tokenizer.save_pretrained(path)
        write_metadata(path, name=f"scale-{kind}", version="v0")
    marker.write_text(json.dumps(shape))
    return paths


def parameter_count(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


def raw_write_read(tensors: dict, path: Path) -> dict:
    """The raw cost publish→serving is measured against: the tensors written
    as a new safetensors file (to the page cache, as the publisher's writes
    are) and read back into memory. ``load_file`` alone only maps the file
    (its tensors are views of an mmap, no byte is read until used), so each
    tensor is copied out: every byte is read once, as a replica's load reads it."""
    from safetensors.torch import load_file, save_file

    save_file(tensors, str(path))
    return {name: tensor.clone() for name, tensor in load_file(str(path)).items()}


def raw_write_read_seconds(model_dir: Path, scratch: Path, rounds: int = 3) -> tuple[float, int]:
    """Median seconds of :func:`raw_write_read` of the policy's tensors, and
    the file's size."""
    from safetensors.torch import load_file

    tensors = load_file(str(next(model_dir.glob("*.safetensors"))))
    scratch.mkdir(parents=True, exist_ok=True)
    times = []
    for i in range(rounds):
        path = scratch / f"raw-{i}.safetensors"
        started = time.perf_counter()
        raw_write_read(tensors, path)
        times.append(time.perf_counter() - started)
        size = path.stat().st_size
        path.unlink()
    return statistics.median(times), size


def raw_s3_seconds(model_dir: Path, scratch: Path, rounds: int = 1) -> float:
    """Median seconds to upload the policy's safetensors file to the S3
    store the environment points at (bucket ``arbiter-weights``) and download
    it again, through the weights store's own client and transfer settings
    (boto3 ``upload_file`` / ``download_file``): the raw cost of moving the
    same bytes through that server, which the s3 modes are divided by (the
    local S3 server here is Python: tens of MB/s, far slower than a disk)."""
    from arbiter.weights.store import MiB, TransferSettings, open_store

    store = open_store("s3://arbiter-weights/raw-baseline",
                       TransferSettings(S3_TRANSFER["multipart_threshold_mb"] * MiB,
                                        S3_TRANSFER["multipart_chunksize_mb"] * MiB))
    source = next(model_dir.glob("*.safetensors"))
    scratch.mkdir(parents=True, exist_ok=True)
    times = []
    for i in range(rounds):
        target = scratch / f"raw-s3-{i}.safetensors"
        started = time.perf_counter()
        store.put_file(f"raw-{i}", source)
        store.get_file(f"raw-{i}", target)
        times.append(time.perf_counter() - started)
        target.unlink()
    return statistics.median(times)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in metric_samples(port)}


class ServedWatch(threading.Thread):
    """When the policy replica first answered with each version (one channel
    for the whole run: the poll must not cost the loop it measures)."""

    def __init__(self, target: str):
        super().__init__(daemon=True)
        self.target, self.first_served = target, {}
        self.stopped = threading.Event()

    def run(self) -> None:
        import grpc

        from arbiter.v1 import common_pb2, common_pb2_grpc

        with grpc.insecure_channel(self.target) as channel:
            stub = common_pb2_grpc.ModelServiceStub(channel)
            while not self.stopped.is_set():
                try:
                    version = stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=5).info.version
                except grpc.RpcError:  # restarting or swapping: poll again
                    version = None
                if version and version not in self.first_served:
                    self.first_served[version] = time.time()
                self.stopped.wait(0.05)


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """``os.environ`` with ``values`` set, restored on exit."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclasses.dataclass
class ModeResult:
    mode: str
    iterations: int
    stage_s: dict[str, float]
    train_s: float
    bookkeeping_s: float
    write_s: float
    apply_s: float  # announced -> serving, on the replica (download, verify, load, probe, swap)
    raw_loaded_s: float  # raw write+read of the same bytes while this mode's loop ran
    # s3 modes: the same file uploaded and downloaded through the same store while the loop ran
    raw_s3_loaded_s: float
    publish_to_serving_s: list[float]
    notes: str = ""


def run_mode(mode: str, models: dict[str, Path], workdir: Path, iterations: int, ranks: int,
             batch_size: int, max_new_tokens: int, timeout_s: float) -> ModeResult:
    from services.stack import METRICS_PORTS, Stack, StackConfig

    out = workdir / mode
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    weights = {}
    if mode.startswith("s3"):
        weights = {"uri": "s3://arbiter-weights/policies", "bf16": mode == "s3-bf16", **S3_TRANSFER}
    trainer = {"max_updates": None, "run_name": "scale",
               "ppo": {"batch_size": batch_size, "minibatch_size": batch_size // ranks, "epochs": 1,
                       "max_staleness": 1},
               # The example stack's cadence (a full checkpoint is weights,
               # optimizer and offsets, fsynced: 1.5 GB at this size).
               "checkpoint_every": 10, "checkpoint_every_s": 30, "keep_policy_versions": 3}
    replicas = {}
    if ranks > 1:
        trainer["parallel"] = "ddp"
        replicas["trainer"] = ranks
    config = StackConfig(
        policy_model=str(models["policy"]), reward_model=str(models["reward"]), prompts_file=str(prompts),
        workdir=str(out / "stack"), broker_storage="memory", replicas=replicas, weights=weights,
        metrics_ports={name: 0 for name in METRICS_PORTS},
        worker={"samples_per_prompt": 2, "prompts_per_call": 4, "max_new_tokens": max_new_tokens},
        trainer=trainer,
    )
    history = out / "stack" / "trainer" / "history.jsonl"

    def rows() -> list[dict]:
        return [json.loads(line) for line in history.read_text().splitlines()] if history.exists() else []

    with Stack(config) as stack:
        watch = ServedWatch(stack.targets["policy"])
        watch.start()
        deadline = time.monotonic() + timeout_s
        raw_loaded = raw_s3 = None
        # One update more than measured: the first pays for warm-up (lazy
        # allocations, the first KV-cache growth, the store's first bucket write).
        while len(rows()) < iterations + 1 or rows()[-1]["policy_version"] not in watch.first_served:
            stack.check_alive()
            if raw_loaded is None and rows():
                # The same bytes written and read while the loop runs: what the
                # publisher and the replica compete with on this machine.
                raw_loaded, _ = raw_write_read_seconds(models["policy"], out / "raw", rounds=2)
                if mode.startswith("s3"):
                    with environment(stack.weights_env):
                        raw_s3 = raw_s3_seconds(models["policy"], out / "raw")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{mode}: {len(rows())} updates in {timeout_s:.0f}s (see {out}/stack/logs)")
            time.sleep(0.2)
        worker = scrape(stack.metrics_ports["worker-0"])
        # Rank 0's (every rank trains the same global batch).
        trainer_metrics = scrape(stack.metrics_ports.get("trainer", stack.metrics_ports.get("trainer-0")))
        policy_metrics = scrape(stack.metrics_ports["policy"])
        watch.stopped.set()
    measured = rows()[1:iterations + 1]
    updates = len(rows())

    def stage(name: str) -> float:
        return worker.get(("arbiter_worker_stage_seconds_sum", (("stage", name),)), math.nan) / updates

    def mean_of(histogram: str, metrics: dict) -> float:
        total = metrics.get((f"{histogram}_sum", ()), math.nan)
        count = metrics.get((f"{histogram}_count", ()), 0)
        return total / count if count else math.nan

    latencies = [watch.first_served[r["policy_version"]] - r["trained_at"] for r in measured
                 if r["policy_version"] in watch.first_served]
    skipped = len(measured) - len(latencies)
    return ModeResult(
        mode, len(measured), {s: stage(s) for s in ("generate", "score", "reference")},
        train_s=statistics.mean(r["seconds"] - r["bookkeeping_seconds"] for r in measured),
        bookkeeping_s=statistics.mean(r["bookkeeping_seconds"] for r in measured),
        write_s=mean_of("arbiter_trainer_policy_write_seconds", trainer_metrics),
        apply_s=mean_of("arbiter_policy_update_apply_seconds", policy_metrics),
        raw_loaded_s=raw_loaded if raw_loaded is not None else math.nan,
        raw_s3_loaded_s=raw_s3 if raw_s3 is not None else math.nan,
        publish_to_serving_s=latencies,
        notes=f"{skipped} versions superseded before serving" if skipped else "")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-scale"))
    parser.add_argument("--modes", default="shared,s3,s3-bf16")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--layers", type=int, default=GPT2_SMALL["n_layer"])
    parser.add_argument("--width", type=int, default=GPT2_SMALL["n_embd"])
    parser.add_argument("--vocab", type=int, default=GPT2_SMALL["vocab_size"])
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    shape = {**GPT2_SMALL, "n_layer": args.layers, "n_embd": args.width, "n_head": max(1, args.width // 64),
             "vocab_size": args.vocab}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.monotonic()
    models = build_models(args.workdir / "models", shape)
    params = parameter_count(models["policy"])
    raw_s, size = raw_write_read_seconds(models["policy"], args.workdir / "raw")
    print(f"policy: {params / 1e6:.1f} M parameters, {size / 2**20:.0f} MiB safetensors; raw write+read "
          f"{raw_s:.2f} s; models ready in {time.monotonic() - started:.0f} s", flush=True)
    results = []
    for mode in args.modes.split(","):
        result = run_mode(mode, models, args.workdir, args.iterations, args.ranks, args.batch_size,
                          args.max_new_tokens, args.timeout_s)
        results.append(result)
        print(f"{mode}: done", flush=True)
    rows = []
    for r in results:
        p2s = statistics.median(r.publish_to_serving_s) if r.publish_to_serving_s else math.nan
        rows.append([r.mode, r.iterations, *(f"{r.stage_s[s]:.2f}" for s in ("generate", "score", "reference")),
                     f"{r.train_s:.2f}", f"{r.bookkeeping_s:.3f}", f"{r.write_s:.2f}", f"{r.apply_s:.2f}",
                     f"{p2s:.2f}", f"{p2s / raw_s:.2f}", f"{r.raw_loaded_s:.2f}", f"{p2s / r.raw_loaded_s:.2f}",
                     "-" if math.isnan(r.raw_s3_loaded_s) else f"{r.raw_s3_loaded_s:.2f}",
                     "-" if math.isnan(r.raw_s3_loaded_s) else f"{p2s / r.raw_s3_loaded_s:.2f}", r.notes])
    print_table(f"Scale rehearsal: {params / 1e6:.0f} M parameters, {args.ranks}-rank trainer, batch "
                f"{args.batch_size}, {args.max_new_tokens} new tokens; seconds per iteration; raw safetensors "
                f"write+read of the same {size / 2**20:.0f} MiB on an idle machine: {raw_s:.2f} s",
                ["publish mode", "iterations", "generate", "score", "reference", "train step", "bookkeeping",
                 "version write", "replica apply", "publish→serving (median)", "÷ raw (idle)",
                 "raw under the loop", "÷ raw (under the loop)", "raw s3 under the loop", "÷ raw s3",
                 "notes"], rows)
    summary = {"parameters": params, "bytes": size, "raw_write_read_s": raw_s, "ranks": args.ranks,
               "modes": [dataclasses.asdict(r) for r in results]}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
