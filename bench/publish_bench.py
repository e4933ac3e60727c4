"""Publish-to-serving seconds per way of shipping a policy version, against
the raw cost of writing and reading the same safetensors bytes.

One random GPT-2-shaped model (``--layers``, ``--width``; the tiny models'
tokenizer). For each mode, one version is taken from trainer tensors to a
model loaded the way a policy replica loads it, in three timed parts:
publish (the trainer's publisher: ``save_pretrained`` of the snapshot, then
the upload, manifest last), fetch (the replica: download, sha256 of every
file, materialize; for a delta, patching its cached parent) and load
(``arbiter.lm.load_causal_weights`` into float32). The baseline, measured in
the same run between the modes' rounds: the full float32 ``model.safetensors``
written to a new file (flushed to the page cache, as the publisher's writes
are) and read back. Modes:

- ``shared dir``: the path before object storage (save, then the replica
  hashes the trainer's directory in place and loads it);
- ``file://``: the ``arbiter.weights`` store on a local directory;
- ``s3``: through the project's S3-protocol server (moto mirrored to disk,
  a separate process on this machine: loopback, no network);
- ``s3 bf16``: tensors cast to bfloat16 for transport;
- ``s3 delta (half frozen)``: the next version changes only the upper half
  of the blocks (what a delta can skip); after a full-parameter update every
  tensor changes and a delta is a full upload (``delta (all changed)``).

Noisy on a shared machine: compare ratios measured side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import print_table
from bench.scale import environment

MiB = 1 << 20


def _model(tokenizer_dir: Path, layers: int, width: int):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=width, n_layer=layers,
                        n_head=max(1, width // 64), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config).eval(), tokenizer


def _moved(tensors: dict[str, torch.Tensor], step: int, only: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The next version: the chosen tensors moved (ties kept)."""
    gen = torch.Generator().manual_seed(step)
    new: dict[int, torch.Tensor] = {}
    out = {}
    for name, t in tensors.items():
        if t.is_floating_point() and only(name) and t.data_ptr() not in new:
            new[t.data_ptr()] = t + torch.randn(t.shape, generator=gen) * 1e-3
        out[name] = new.get(t.data_ptr(), t)
    return out


def _raw_write_read(source: Path, scratch: Path) -> float:
    started = time.perf_counter()
    data = source.read_bytes()
    target = scratch / "raw.safetensors"
    with open(target, "wb") as fh:
        fh.write(data)
    with open(target, "rb") as fh:
        while fh.read(8 * MiB):
            pass
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


def _logprob_deviation_bf16(model) -> float:
    """Largest |log π_fp32 − log π_bf16-rounded| over a random batch: what a
    bf16-transported policy's behaviour log-probs differ by."""
    import copy

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
        ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
        a = torch.log_softmax(model(ids).logits.double(), -1)
        b = torch.log_softmax(rounded(ids).logits.double(), -1)
    return float((a - b).abs().max())


def run(layers: int = 4, width: int = 512, rounds: int = 3, quick: bool = False) -> dict:
    from arbiter.hf import weights_sha256, write_metadata
    from arbiter.lm import load_causal_weights
    from arbiter.stream.objectstore import LocalObjectStore
    from arbiter.tiny import make_tiny_models
    from arbiter.weights import ParentVersion, fetch_version, open_store, publish_version
    from trainer.publish import snapshot_tensors, to_bf16

    if quick:
        layers, width, rounds = 2, 128, 1
    work = Path(tempfile.mkdtemp(prefix="arbiter-publish-bench-"))
    store_proc = LocalObjectStore(work / "s3", work / "s3.log", buckets=["bench"]).start()
    restore = contextlib.ExitStack()
    restore.enter_context(environment(store_proc.env()))
    try:
        tiny = make_tiny_models(work / "tiny")
        model, tokenizer = _model(tiny["policy"], layers, width)
        base = snapshot_tensors(model, only_trainable=False)
        half = layers // 2

        def upper_half(name: str) -> bool:
            return any(f".h.{i}." in name for i in range(half, layers))

        def save(directory: Path, tensors: dict[str, torch.Tensor], version: str) -> Path:
            directory.mkdir(parents=True)
            # A copy of the mapping: save_pretrained empties the state dict it is given.
            model.save_pretrained(directory, safe_serialization=True, state_dict=dict(tensors))
            tokenizer.save_pretrained(directory)
            write_metadata(directory, name="policy", version=version)
            return directory

        full_dir = save(work / "reference-version", base, "ref")
        weights_file = full_dir / "model.safetensors"
        size_mb = weights_file.stat().st_size / MiB
        params = sum(t.numel() for t in {t.data_ptr(): t for t in base.values()}.values())
        print(f"publish: {params / 1e6:.1f} M parameters, model.safetensors {size_mb:.1f} MiB; "
              f"{rounds} round(s) per mode", flush=True)

        def shared_dir(n: int) -> tuple[float, float, float, int]:
            tensors = _moved(base, n, lambda _: True)
            t0 = time.perf_counter()
            out = save(work / f"shared-{n}", tensors, f"s{n}")
            t1 = time.perf_counter()
            weights_sha256(out)  # the follower's check of checkpoint_path
            t2 = time.perf_counter()
            load_causal_weights(out)
            return t1 - t0, t2 - t1, time.perf_counter() - t2, 0

        def through(uri: str, *, bf16: bool = False, delta: Callable[[str], bool] | None = None):
            store = open_store(uri)

            def one(n: int) -> tuple[float, float, float, int]:
                cache = work / f"cache-{n}-{abs(hash(uri))}-{bf16}-{delta is not None}"
                parent = None
                tensors = _moved(base, 1000 + n, lambda _: True)
                if delta is not None:  # the parent: published and already on the replica (not timed)
                    parent_version = f"p{n}-{abs(hash(uri))}"
                    parent_dir = save(work / parent_version, tensors, parent_version)
                    published = publish_version(store, parent_version, parent_dir)
                    fetch_version(published.uri, cache)
                    parent = ParentVersion(parent_version, parent_dir, published.weights_sha256)
                    tensors = _moved(tensors, 2000 + n, delta)
                version = f"v{n}-{abs(hash(uri))}-{bf16}-{delta is not None}"
                t0 = time.perf_counter()
                out = save(work / version, to_bf16(tensors) if bf16 else tensors, version)
                published = publish_version(store, version, out, parent=parent,
                                            dtype="bfloat16" if bf16 else None)
                t1 = time.perf_counter()
                fetched = fetch_version(published.uri, cache)
                t2 = time.perf_counter()
                load_causal_weights(fetched.path)
                return t1 - t0, t2 - t1, time.perf_counter() - t2, published.bytes_uploaded

            return one

        modes = {
            "shared dir (before)": shared_dir,
            "file:// full": through(f"file://{work / 'file-store'}"),
            "s3 full": through("s3://bench/full"),
            "s3 bf16": through("s3://bench/bf16", bf16=True),
            "s3 delta (all changed)": through("s3://bench/delta-all", delta=lambda _: True),
            "s3 delta (half frozen)": through("s3://bench/delta-half", delta=upper_half),
        }
        raw: list[float] = []
        results: dict[str, list[tuple[float, float, float, int]]] = {m: [] for m in modes}
        for n in range(rounds):
            for name, one in modes.items():
                raw.append(_raw_write_read(weights_file, work))  # interleaved: load hits both alike
                results[name].append(one(n))
        raw_s = statistics.median(raw)
        rows, summary = [], {"parameters_m": round(params / 1e6, 2), "safetensors_mib": round(size_mb, 1),
                             "raw_write_read_s": raw_s}
        for name, runs in results.items():
            publish, fetch, load = (statistics.median(r[i] for r in runs) for i in range(3))
            sent = statistics.median(r[3] for r in runs) / MiB
            total = publish + fetch + load
            rows.append((name, f"{sent:.1f}" if sent else "-", publish, fetch, load, total,
                         f"{(publish + fetch) / raw_s:.2f}", f"{total / raw_s:.2f}"))
            summary[name] = {"publish_s": publish, "fetch_s": fetch, "load_s": load, "total_s": total,
                             "uploaded_mib": sent, "transport_vs_raw": (publish + fetch) / raw_s,
                             "total_vs_raw": total / raw_s}
        print_table(
            f"publish to serving, {params / 1e6:.1f} M params ({size_mb:.0f} MiB float32); baseline: write + read "
            f"the same safetensors bytes = {raw_s:.3f} s (median of {len(raw)})",
            ("mode", "MiB sent", "publish s", "fetch s", "load s", "total s", "(publish+fetch)/raw",
             "total/raw"), rows)
        deviation = _logprob_deviation_bf16(model)
        summary["bf16_max_logprob_deviation"] = deviation
        print(f"bf16 transport: largest |log π_fp32 − log π_bf16| over 4×64 random tokens: {deviation:.2e} nats",
              flush=True)
        return summary
    finally:
        store_proc.stop()
        restore.close()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.publish_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    run(args.layers, args.width, args.rounds, args.quick)


if __name__ == "__main__":
    main()
