"""Subcommands that get their arguments only when argv chooses them.

argparse wants every subparser built before parsing, and building one means
importing whatever declares its flags (a server module, torch with it). Every
subcommand is added with its one-line help, so usage, listings and "invalid
choice" errors stay complete; only the chosen one is registered in full.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Mapping, Sequence

# Declares a subcommand's arguments and sets its ``run`` handler; gets the
# words after the subcommand's name, for groups that choose again.
Register = Callable[[argparse.ArgumentParser, Sequence[str]], None]


def add_subcommands(
    parser: argparse.ArgumentParser, dest: str, subcommands: Mapping[str, tuple[Register, str]], argv: Sequence[str]
) -> None:
    """Add ``name: (register, help)`` subcommands to ``parser`` and register the one ``argv`` names.

    ``parser`` must have no option that takes a value (none of ours do), so the
    first word of ``argv`` that is not an option is the subcommand's name.
    """
    chosen = next((i for i, word in enumerate(argv) if not word.startswith("-")), None)
    choices = parser.add_subparsers(dest=dest, required=True)
    for name, (register, help_text) in subcommands.items():
        subparser = choices.add_parser(name, help=help_text)
        if chosen is not None and argv[chosen] == name:
            register(subparser, argv[chosen + 1:])


def delegate(module: str, add_arguments: str, run: str) -> Register:
    """A (sub)command whose arguments and handler live in ``module``: its
    ``add_arguments(parser)`` and ``run(args) -> exit code``, imported only
    when argv chooses the command."""

    def register(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
        getattr(importlib.import_module(module), add_arguments)(parser)
        parser.set_defaults(run=lambda args: getattr(importlib.import_module(module), run)(args))

    return register
