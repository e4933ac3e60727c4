"""``arbiter train ppo|rm|ilql``: the PPO trainer, reward-model training into the registry, and offline ILQL."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cli.subcommands import add_subcommands, delegate

HELP = "training jobs"


def register(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    add_subcommands(parser, "train_command", {
        "ppo": (delegate("trainer.main", "add_arguments", "ppo_main"),
                "the PPO trainer: rollouts from Kafka, policy versions out"),
        "rm": (delegate("arbiter.rm.main", "add_train_arguments", "train_main"),
               "train a reward model on preferences: a new registry version"),
        "ilql": (delegate("trainer.ilql", "add_arguments", "ilql_main"),
                 "offline ILQL from scored samples (JSONL or a replay of the rollouts topic): a policy with Q/V heads"),
    }, argv)
