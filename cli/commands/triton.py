"""``arbiter triton export|serve``: write checkpoints into a Triton model repository; run a local Triton."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cli.subcommands import add_subcommands, delegate

HELP = "NVIDIA Triton Inference Server: export models, run one locally"


def register(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    add_subcommands(parser, "triton_command", {
        "export": (_register_export, "write a checkpoint as a new version REPO/NAME/N of a Triton model"),
        "serve": (delegate("arbiter.backends.triton_local", "add_serve_arguments", "serve"),
                  "run the tritonserver bundled in .venv-triton (dev, demos)"),
    }, argv)


def _register_export(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--kind", required=True, choices=["reward", "reference", "policy"])
    parser.add_argument("--out", required=True, help="the Triton model repository (created if missing)")
    parser.add_argument("--name", help="model name in the repository (default: arbiter.json name, else the dir name)")
    parser.add_argument("--version", type=int, help="version number (default: the next free one)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="Triton's max_batch_size (sequences)")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000, help="Triton's dynamic-batching delay")
    parser.add_argument("--instances", type=int, default=1, help="model instances (instance_group count)")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="instance kind")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch threads per CPU instance (0: default)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> int:
    from arbiter.backends.triton_export import ExportError, ExportOptions, export
    from arbiter.errors import ModelLoadError

    try:
        options = ExportOptions(
            name=args.name, version=args.version, max_batch_size=args.max_batch_size,
            max_queue_delay_us=args.max_queue_delay_us, instances=args.instances, device=args.device,
            torch_threads=args.torch_threads, dtype=args.dtype,
        )
        path = export(args.model, args.kind, args.out, options)
    except (ExportError, ModelLoadError) as err:
        print(f"arbiter triton export: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0
