"""Where publish-to-serving time goes, stage by stage (``python -m
bench.publish_stages``): one version of a GPT-2-small-shaped model (the
scale rehearsal's, ``bench.scale.build_models``: 124 M parameters, random
weights, built locally) taken from trainer tensors to a loaded, probed
policy, each stage timed on its own, through the code the loop runs. Not the
whole loop: no broker, no trainer ranks competing for the cores.

Trainer side: the in-memory snapshot, the version write (``save_policy``:
safetensors, config, tokenizer, arbiter.json), the digests the
announcement and the manifest carry, the publish into a ``file://`` store.
Replica side: the shared-directory check (sha256 of the trainer's
directory), ``fetch_version`` (verify in place), the load (weights,
tokenizer, ``ModelInfo``, the probe forward), and the two combined as the
follower runs them. Diagnostic rows time the primitives (one sha256 pass,
``save_file``, ``load_file``, ``from_pretrained``). Baseline, measured in
the same run: ``save_file`` + ``load_file`` + a read of every byte of the same tensors (what
``bench.scale`` divides by). ``--s3`` adds the S3 rows (the project's local
S3-protocol server) and their own baseline: boto3 ``upload_file`` +
``download_file`` of the same file through the same server.

Noisy on a shared machine: medians of ``--rounds``; compare ratios measured
side by side.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import print_table

MiB = 1 << 20


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(8 * MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _publish_in_background(trainer, root: Path, uri: str, version: str, tensors: dict) -> None:
    """The trainer's BackgroundPublisher from submit to the announcement, the
    announcement's digest taken as trainer/loop.py takes it (the publisher's
    when it passes one, else a pass over the files)."""
    import threading

    from arbiter.hf import weights_sha256
    from arbiter.weights import PublishSettings
    from trainer.publish import BackgroundPublisher, Snapshot

    root.mkdir(parents=True, exist_ok=True)
    announced = threading.Event()

    def announce(version: str, weights_uri: str = "", **known: str) -> None:
        known.get("weights_sha256") or weights_sha256(root / version)
        announced.set()

    publisher = BackgroundPublisher(root, lambda path, snap: trainer.save_policy(path, snap.version, snap.tensors),
                                    announce, weights=PublishSettings(uri=uri))
    try:
        publisher.submit(Snapshot(version, 0, tensors))
        if not announced.wait(600):
            raise TimeoutError(f"{version} was not announced")
    finally:
        publisher.close()


def _read_file(path: Path) -> None:
    with path.open("rb") as fh:
        while fh.read(8 * MiB):
            pass


def _verify_while_loading(pending, version: str) -> None:
    """What the follower and ``PolicyEngine.load_checked`` do: the load on
    a thread of its own, the sha256 check on this one, both awaited."""
    import threading

    from arbiter.lm import load_causal_lm

    loaded: list = []
    loader = threading.Thread(target=lambda: loaded.append(load_causal_lm(pending.path, kind="policy",
                                                                           version=version)))
    loader.start()
    pending.verify()
    loader.join()
    assert loaded


def run(workdir: Path, rounds: int = 3, layers: int | None = None, width: int | None = None,
        s3: bool = False, vocab: int | None = None) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from arbiter.hf import weights_sha256
    from arbiter.lm import load_causal_lm, load_causal_weights
    from arbiter.weights import fetch_version, open_store, publish_version
    from bench.scale import GPT2_SMALL, build_models, environment, raw_write_read

    try:
        from arbiter.hf import file_sha256
        from arbiter.weights import download_version
    except ImportError:  # measuring the code from before this change
        download_version = file_sha256 = None
    from trainer.policy_model import PolicyWithValue
    from trainer.publish import snapshot_tensors

    shape = dict(GPT2_SMALL)
    if layers is not None:
        shape["n_layer"] = layers
    if width is not None:
        shape.update(n_embd=width, n_head=max(1, width // 64))
    if vocab is not None:
        shape["vocab_size"] = vocab
    models = build_models(workdir / "models", shape)
    trainer = PolicyWithValue.load(models["policy"])
    scratch = Path(tempfile.mkdtemp(prefix="publish-stages-", dir=workdir))
    store = open_store(f"file://{scratch / 'store'}")
    store_root = f"file://{scratch / 'publisher-store'}"
    times: dict[str, list[float]] = {}
    size = 0

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    store_proc = None
    if s3:
        from arbiter.stream.objectstore import LocalObjectStore

        store_proc = LocalObjectStore(scratch / "s3", scratch / "s3.log", buckets=["bench"]).start()
    try:
        with environment(store_proc.env() if store_proc is not None else {}):
            for n in range(rounds):
                with torch.no_grad():  # a "trained" version: every tensor moved
                    for p in trainer.lm.parameters():
                        p.add_(1e-4)
                version = f"v{n}"
                # -- the trainer
                snapshot: dict = {}
                record("trainer: snapshot (in-memory copy)",
                       _timed(lambda: snapshot.update(snapshot_tensors(trainer.lm, only_trainable=False))))
                directory = scratch / version
                saved: list = []
                record("trainer: version write (save_policy)",
                       _timed(lambda: saved.append(trainer.save_policy(directory, version, dict(snapshot)))))
                weights_file = directory / "model.safetensors"
                size = weights_file.stat().st_size
                record("trainer: announcement digest (weights_sha256)", _timed(lambda: weights_sha256(directory)))
                published: list = []
                record("trainer: publish to file:// (digests, link, manifest)",
                       _timed(lambda: published.append(publish_version(store, version, directory))))
                record("trainer: publisher, submit → announce, file:// (write, digests, publish)",
                       _timed(lambda: _publish_in_background(trainer, scratch / "publisher", store_root, f"p{n}",
                                                              dict(snapshot))))
                # -- the replica
                record("replica: shared-dir check (weights_sha256)", _timed(lambda: weights_sha256(directory)))
                record("replica: fetch_version file:// (verify in place)",
                       _timed(lambda: fetch_version(published[0].uri, scratch / "cache")))
                record("replica: load_causal_weights (weights, tokenizer)", _timed(lambda: load_causal_weights(directory)))
                record("replica: load_causal_lm (+ ModelInfo, probe)",
                       _timed(lambda: load_causal_lm(directory, kind="policy", version=version)))
                record("replica: fetch, then load, file:// (in sequence)", _timed(lambda: (
                    load_causal_lm(fetch_version(published[0].uri, scratch / "cache2").path, kind="policy",
                                   version=version))))
                if download_version is not None:
                    record("replica: verify ‖ load, file:// (the follower's path)",
                           _timed(lambda: _verify_while_loading(download_version(published[0].uri, scratch / "cache3"),
                                                                version)))
                # -- primitives
                tensors = load_file(str(weights_file))
                record("primitive: sha256 of the file (8 MiB reads, a fixed yardstick)",
                       _timed(lambda: _sha256_file(weights_file)))
                if file_sha256 is not None:
                    record("primitive: arbiter.hf.file_sha256 (the path's one pass)",
                           _timed(lambda: file_sha256(weights_file)))
                record("primitive: read the file (no hash)", _timed(lambda: _read_file(weights_file)))
                raw = scratch / "raw.safetensors"
                record("primitive: save_file", _timed(lambda: save_file(tensors, str(raw))))
                raw.unlink()
                # As bench.scale measures it: a new file each time, written then read back.
                record("baseline: save_file + load_file + read", _timed(lambda: raw_write_read(tensors, raw)))
                if s3:
                    _s3_round(n, directory, weights_file, raw, scratch, record)
                raw.unlink()
                shutil.rmtree(directory, ignore_errors=True)
                for cache in ("cache", "cache2", "cache3"):
                    shutil.rmtree(scratch / cache, ignore_errors=True)
    finally:
        if store_proc is not None:
            store_proc.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["baseline: save_file + load_file + read"]
    s3_base = medians.get("baseline s3: upload_file + download_file")
    rows = []
    for name, seconds in medians.items():
        ratio = seconds / (s3_base if name.startswith(("s3", "baseline s3")) and s3_base else base)
        rows.append((name, f"{seconds:.3f}", f"{ratio:.2f}"))
    print_table(f"publish stages, {size / MiB:.0f} MiB of float32 safetensors; median of {rounds} round(s); "
                f"baseline save_file + load_file + read = {base:.3f} s"
                + (f", s3 baseline upload_file + download_file = {s3_base:.3f} s" if s3_base else ""),
                ("stage", "seconds", "÷ its baseline"), rows)
    return {"bytes": size, "rounds": rounds, "seconds": medians}


def _s3_round(n: int, directory: Path, weights_file: Path, raw: Path, scratch: Path, record) -> None:
    from arbiter.lm import load_causal_lm
    from arbiter.weights import fetch_version, open_store, publish_version

    # The same client and transfer settings as the publish below: boto3
    # upload_file + download_file of the one weights file, nothing else.
    raw_store = open_store("s3://bench/raw")
    got = scratch / "got.safetensors"
    record("baseline s3: upload_file + download_file", _timed(lambda: (
        raw_store.put_file(f"raw-{n}", weights_file), raw_store.get_file(f"raw-{n}", got))))
    got.unlink()
    store = open_store("s3://bench/versions")
    published: list = []
    record("s3: publish (digests, upload, manifest)",
           _timed(lambda: published.append(publish_version(store, f"v{n}", directory))))
    record("s3: fetch + load (download, verify, load, probe)", _timed(lambda: load_causal_lm(
        fetch_version(published[0].uri, scratch / "s3-cache").path, kind="policy", version=f"v{n}")))
    shutil.rmtree(scratch / "s3-cache", ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.publish_stages", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-scale"),
                        help="the models are built (once) under WORKDIR/models, as bench.scale does")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, help="fewer layers than GPT-2 small's 12 (a quick run)")
    parser.add_argument("--width", type=int)
    parser.add_argument("--vocab", type=int, help="a smaller vocabulary than GPT-2's (a quick run)")
    parser.add_argument("--s3", action="store_true", help="also through the local S3-protocol server")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run(args.workdir, args.rounds, args.layers, args.width, args.s3, args.vocab)


if __name__ == "__main__":
    main()
