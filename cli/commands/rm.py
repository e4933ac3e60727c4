"""``arbiter rm list|shadow|shadow-live|submit|loop``: reward-model versions in the registry and in service."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cli.subcommands import add_subcommands, delegate

HELP = "reward-model versions: list the registry, shadow-compare and promote"


def register(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    add_subcommands(parser, "rm_command", {
        "list": (delegate("arbiter.rm.main", "add_list_arguments", "list_main"),
                 "versions in a registry, with their held-out accuracy"),
        "shadow": (delegate("services.reward.shadow", "add_arguments", "main"),
                   "score labelled data with a candidate and the active version; report agreement; --promote"),
        "shadow-live": (
            _register_shadow_live,
            "score a fraction of live traffic with a loaded candidate too; agreement goes to metrics",
        ),
        "submit": (delegate("services.reward.submit", "add_arguments", "main"),
                   "send labelled JSON lines to SubmitPreference (preferences topic)"),
        "loop": (delegate("services.rm_loop", "add_arguments", "main"),
                 "retrain from the preferences topic, gate, shadow, promote and roll back by itself"),
    }, argv)


def _register_shadow_live(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    parser.add_argument("--target", required=True, help="HOST:PORT of the reward service")
    parser.add_argument("--candidate", default="", help="loaded version to shadow (omit to turn shadowing off)")
    parser.add_argument("--fraction", type=float, default=1.0, help="share of requests also scored by the candidate")
    from services.common.client import add_client_tls_flags

    add_client_tls_flags(parser)
    parser.set_defaults(run=_shadow_live)


def _shadow_live(args: argparse.Namespace) -> int:
    from services.reward.shadow import live_main

    return live_main(args)
