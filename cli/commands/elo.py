"""``arbiter elo``: Elo ratings of policy versions, with bootstrap confidence intervals."""

from __future__ import annotations

from cli.subcommands import delegate

HELP = "Elo ratings of policy versions (reward-model or human judged), with CIs"

# Its arguments are declared beside its implementation.
register = delegate("services.elo", "add_arguments", "main")
