"""``arbiter worker``: the rollout worker (prompts -> policy, reward, reference -> rollouts topic)."""

from __future__ import annotations

from cli.subcommands import delegate

HELP = "rollout worker: prompts -> policy, reward, reference -> rollouts topic"

# Its arguments are declared beside its implementation.
register = delegate("services.worker.main", "add_arguments", "main")
