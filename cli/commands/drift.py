"""``arbiter drift report``: a reward service's served scores against its reference window."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cli.subcommands import add_subcommands

HELP = "reward drift tools"


def register(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    add_subcommands(
        parser, "drift_command", {"report": (_register_report, "served scores vs reference: table and PNG")}, argv
    )


def _register_report(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    parser.add_argument("--target", required=True, help="HOST:PORT of a reward service")
    parser.add_argument("--model-version", default="", help="default: the active version")
    parser.add_argument("--component", default="",
                        help="a term of the service's reward spec, or 'total' (instead of a model version)")
    parser.add_argument("--png", help="write a histogram of reference vs current scores here")
    from services.common.client import add_client_tls_flags

    add_client_tls_flags(parser)
    parser.set_defaults(run=_report)


def _report(args: argparse.Namespace) -> int:
    from services.reward.drift_report import report_main

    return report_main(args)
