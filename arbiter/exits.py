"""How a child process ended, in words, for messages and logs."""

from __future__ import annotations

import signal


def describe_exit(code: int | None) -> str:
    """A process's exit code (negative: the signal that killed it) as the rest
    of a sentence about it: "was killed by signal 9 (SIGKILL)"."""
    if code is None:
        return "is gone"
    if code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"
