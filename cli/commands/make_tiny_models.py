"""``arbiter make-tiny-models OUT_DIR``: tiny policy and reward checkpoints for tests and demos."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

HELP = "write tiny policy and reward models (HF directories)"


def register(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    parser.add_argument("out_dir", help="writes OUT_DIR/policy and OUT_DIR/reward")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from arbiter.tiny import make_tiny_models

    paths = make_tiny_models(args.out_dir)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
