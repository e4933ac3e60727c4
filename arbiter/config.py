"""The one validation helper and the one error type for settings and config
files, used by every component (servers, worker, trainers, Kafka settings).

A message names the field (its path in a YAML file, ``ppo.clip_coef``; its
settings name, ``max_batch_size``; or ``kafka.bootstrap_servers``), the value
given and what is allowed, so a user can fix it without reading code.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """An invalid setting; ``field`` names it."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field

    def under(self, prefix: str) -> ConfigError:
        """The same error with its field nested under ``prefix`` (``kafka``)."""
        return ConfigError(f"{prefix}.{self}", f"{prefix}.{self.field}" if self.field else prefix)


def require(condition: bool, field: str, allowed: str, value: Any) -> None:
    """``ConfigError`` naming ``field``, its value and what is allowed, unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}={value!r} is invalid: {allowed}", field)


def require_choice(value: Any, field: str, choices: tuple[str, ...] | list[str]) -> None:
    require(value in choices, field, f"must be one of {', '.join(choices)}", value)
