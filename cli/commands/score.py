"""``arbiter score``: score JSON lines from stdin with a reward service."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

HELP = "score JSON lines from stdin: {prompt, response} or {messages}"


def register(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    parser.add_argument("--target", required=True, help="HOST:PORT of a reward service (several: ipv4:H:P,H:P)")
    parser.add_argument("--normalize", action="store_true", help="normalized scores (version's shipped stats)")
    parser.add_argument("--model-version", default="", help="score with this loaded version (default: active)")
    parser.add_argument("--truncation", choices=["reject", "left", "right"], default="reject")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline per request, seconds")
    from services.common.client import add_client_tls_flags

    add_client_tls_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from services.reward.client import score_main

    return score_main(args)
