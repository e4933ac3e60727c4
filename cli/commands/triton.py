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
    from arbiter.backends.triton_export import KINDS, ExportOptions
    from arbiter.config import add_flags

    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--out", required=True, help="the Triton model repository (created if missing)")
    add_flags(parser, ExportOptions)
    parser.set_defaults(run=_export)


def _export(args: argparse.Namespace) -> int:
    from arbiter.backends.triton_export import ExportError, ExportOptions, export
    from arbiter.config import ConfigError, from_flags
    from arbiter.errors import ModelLoadError

    try:
        path = export(args.model, args.kind, args.out, from_flags(ExportOptions, args))
    except (ExportError, ModelLoadError, ConfigError) as err:
        print(f"arbiter triton export: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0
