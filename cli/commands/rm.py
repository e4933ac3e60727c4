"""``arbiter rm list|shadow|shadow-live|submit``: reward-model versions in the registry and in service."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cli.subcommands import add_subcommands


def register(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    add_subcommands(parser, "rm_command", {
        "list": (_register_list, "versions in a registry, with their held-out accuracy"),
        "shadow": (
            _register_shadow, "score labelled data with a candidate and the active version; report agreement; --promote"
        ),
        "shadow-live": (
            _register_shadow_live,
            "score a fraction of live traffic with a loaded candidate too; agreement goes to metrics",
        ),
        "submit": (_register_submit, "send labelled JSON lines to SubmitPreference (preferences topic)"),
    }, argv)


def _register_list(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    from arbiter.rm.main import add_list_arguments

    add_list_arguments(parser)
    parser.set_defaults(run=_list)


def _list(args: argparse.Namespace) -> int:
    from arbiter.rm.main import list_main

    return list_main(args)


def _register_shadow(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    from services.reward.shadow import add_arguments

    add_arguments(parser)
    parser.set_defaults(run=_shadow)


def _shadow(args: argparse.Namespace) -> int:
    from services.reward.shadow import main

    return main(args)


def _register_shadow_live(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    parser.add_argument("--target", required=True, help="HOST:PORT of the reward service")
    parser.add_argument("--candidate", default="", help="loaded version to shadow (omit to turn shadowing off)")
    parser.add_argument("--fraction", type=float, default=1.0, help="share of requests also scored by the candidate")
    parser.add_argument("--tls-ca-file")
    parser.set_defaults(run=_shadow_live)


def _shadow_live(args: argparse.Namespace) -> int:
    from services.reward.shadow import live_main

    return live_main(args)


def _register_submit(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    from services.reward.submit import add_arguments

    add_arguments(parser)
    parser.set_defaults(run=_submit)


def _submit(args: argparse.Namespace) -> int:
    from services.reward.submit import main

    return main(args)
