"""The commands: one module each (``cli/commands/NAME.py``), imported when
``arbiter --help`` lists them (they import nothing heavy) and registered in
full only when argv names them.

Each module has ``HELP``, its one-line help, and ``register(parser, argv)``,
which declares the command's arguments and sets ``run``, the handler, which
imports the implementation when it runs.
"""

# In the order ``arbiter --help`` lists them.
COMMANDS = (
    "make-tiny-models", "serve", "score", "broker", "drift", "triton", "train", "rm", "elo", "worker", "up", "demo",
)


def module_name(command: str) -> str:
    return "cli.commands." + command.replace("-", "_")
