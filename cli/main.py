"""The ``arbiter`` entry point: runtime defaults, then the command argv names."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from cli.commands import COMMANDS, module_name
from cli.subcommands import Register, add_subcommands


def configure_runtime(torch_threads: int | None = None) -> None:
    """Process-wide defaults every command runs under; idempotent, so a command
    that learns its thread count from its settings calls it again."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Never reach for a model hub: checkpoints are local directories.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(level=os.environ.get("ARBITER_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)


def _command(module: str) -> Register:
    def register(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
        importlib.import_module(module).register(parser, argv)

    return register


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv`` (without the program name); exits like argparse on bad input or ``--help``."""
    parser = argparse.ArgumentParser(prog="arbiter", description="Reward models as a service, and RLHF on them.")
    add_subcommands(
        parser, "command",
        {name: (_command(module_name(name)), importlib.import_module(module_name(name)).HELP) for name in COMMANDS},
        argv
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    configure_runtime()
    return args.run(args)

