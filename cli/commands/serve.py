"""``arbiter serve KIND``: run a model service.

Each kind's server module declares its own flags (``add_arguments``), builds
its settings from them (``settings_from_args``) and serves (``serve``); only
the kind argv names is imported, since a server module imports torch and gRPC.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from cli.subcommands import Register, add_subcommands

# kind -> (server module, one-line help)
KINDS: dict[str, tuple[str, str]] = {
    "reward": ("services.reward.server", "the reward-model service"),
    "policy": ("services.policy.server", "the policy generation service (hot-swappable weights)"),
    "reference": ("services.reference.server", "the frozen reference model: log-probs and KL"),
}

HELP = "run a model service"


def register(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    kinds = {kind: (_server_arguments(module), help_text) for kind, (module, help_text) in KINDS.items()}
    add_subcommands(parser, "service", kinds, argv)
    parser.set_defaults(run=run)


def _server_arguments(module: str) -> Register:
    def register(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
        importlib.import_module(module).add_arguments(parser)

    return register


def run(args: argparse.Namespace) -> int:
    """Exit 2: invalid settings; 1: the server could not start (the model
    does not load, a port is taken), said in one line; 0: stopped by a signal."""
    from arbiter.config import ConfigError
    from arbiter.errors import ArbiterError
    from cli.main import configure_runtime

    server = importlib.import_module(KINDS[args.service][0])
    try:
        settings = server.settings_from_args(args)
    except ConfigError as err:
        print(f"arbiter serve {args.service}: {err}", file=sys.stderr)
        return 2
    configure_runtime(settings.torch_threads)
    try:
        server.serve(settings)
    except ArbiterError as err:
        print(f"arbiter serve {args.service}: {err}", file=sys.stderr)
        return 1
    return 0
