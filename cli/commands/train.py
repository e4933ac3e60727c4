"""``arbiter train ppo|rm``: the PPO trainer, and reward-model training into the registry."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cli.subcommands import add_subcommands, delegate

HELP = "training jobs"


def register(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    add_subcommands(parser, "train_command", {
        "ppo": (_register_ppo, "the PPO trainer: rollouts from Kafka, policy versions out"),
        "rm": (delegate("arbiter.rm.main", "add_train_arguments", "train_main"),
               "train a reward model on preferences: a new registry version"),
    }, argv)


def _register_ppo(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    parser.add_argument("--config", required=True, help="trainer YAML (see trainer/config.py for every field)")
    parser.add_argument("--max-updates", type=int, help="stop after this many updates (overrides the config)")
    parser.add_argument("--reset-offsets", action="store_true",
                        help="resume weights and optimizer but not stream offsets (the topics were recreated)")
    parser.set_defaults(run=_ppo)


def _ppo(args: argparse.Namespace) -> int:
    from trainer.main import ppo_main

    return ppo_main(args)
