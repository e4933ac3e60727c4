"""``arbiter demo``: the end-to-end demo (what ``make demo`` runs)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

HELP = "the end-to-end demo (what `make demo` runs)"


def register(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--updates", type=int, help="PPO updates (default 60, 4 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smaller and shorter, for tests")
    from services.demo_models import FULL, QUICK, pretrain_steps_arg

    parser.add_argument("--pretrain-steps", type=pretrain_steps_arg,
                        help=f"the policy's pretraining steps (default {FULL.pretrain_steps}, {QUICK.pretrain_steps} "
                             "with --quick): the same model on any machine, slower on a slow one")
    parser.add_argument("--online-rm", action="store_true",
                        help="a simulated annotator labels live completions and `arbiter rm loop` retrains and "
                             "promotes the reward model while PPO runs")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from services.demo import run_from_args

    return run_from_args(args)
