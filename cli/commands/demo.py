"""``arbiter demo``: the end-to-end demo (what ``make demo`` runs)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

HELP = "the end-to-end demo (what `make demo` runs)"


def register(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--updates", type=int, help="PPO updates (default 60, 4 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smaller and shorter, for tests")
    parser.add_argument("--pretrain-seconds", type=float,
                        help="the policy's pretraining budget (default 150, 20 with --quick; a loaded machine needs "
                             "more for the same steps)")
    parser.add_argument("--online-rm", action="store_true",
                        help="a simulated annotator labels live completions and `arbiter rm loop` retrains and "
                             "promotes the reward model while PPO runs")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from services.demo import run_from_args

    return run_from_args(args)
