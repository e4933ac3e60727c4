"""``arbiter worker``: the rollout worker (prompts -> policy, reward, reference -> rollouts topic)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def register(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    from services.worker.main import add_arguments

    add_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from services.worker.main import main

    return main(args)
