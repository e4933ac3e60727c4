"""``arbiter elo``: Elo ratings of policy versions, with bootstrap confidence intervals."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def register(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    from services.elo import add_arguments

    add_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from services.elo import main

    return main(args)
