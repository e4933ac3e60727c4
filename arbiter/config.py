"""The one validation helper and the one error type for settings and config
files, used by every component (servers, worker, trainers, Kafka settings).

A message names the field (its path in a YAML file, ``ppo.clip_coef``; its
settings name, ``max_batch_size``; or ``kafka.bootstrap_servers``), the value
given and what is allowed, so a user can fix it without reading code.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar


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


# -- config files -------------------------------------------------------------
# One loader for every component configured by a YAML file (``arbiter train
# ppo``, ``arbiter train rm``): a tree of frozen dataclasses that validate
# their own values; the loader checks names and types and names the field by
# its path in the file.

C = TypeVar("C")


def _hint_args(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) in (types.UnionType, typing.Union) else (hint,)


def _type_ok(value: Any, hint: Any) -> bool:
    for arg in _hint_args(hint):
        if arg is type(None) and value is None:
            return True
        if arg is bool and isinstance(value, bool):
            return True
        if arg is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if arg is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if arg is str and isinstance(value, str):
            return True
        if arg not in (type(None), bool, int, float, str):
            return True  # containers are checked by the dataclass that holds them
    return False


def _type_name(hint: Any) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in _hint_args(hint))


def _yaml_float(value: Any, hint: Any) -> Any:
    """YAML 1.1 reads ``1e-5`` (no dot) as a string; a number is meant."""
    if isinstance(value, str) and float in _hint_args(hint):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _section(hint: Any) -> type | None:
    """The dataclass a field holds (``KLConfig`` or ``LoRAConfig | None``), if any."""
    found = [a for a in _hint_args(hint) if dataclasses.is_dataclass(a)]
    return found[0] if found else None


def config_from_mapping(cls: type[C], data: Any, path: str = "") -> C:
    """``cls`` (a config dataclass) from a mapping such as a parsed YAML file.

    Fields typed as a dataclass are built from nested mappings. An unknown
    field, a value of the wrong type or a mapping that is not one is a
    ConfigError naming the field by its path (``ppo.kl.mode``); the values
    themselves are validated by the dataclasses (``require``).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}", path)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown field(s) {', '.join(where + u for u in unknown)}; allowed: {', '.join(sorted(known))}", path
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        child = f"{path}.{name}" if path else name
        section = _section(hints[name])
        if section is not None and value is not None:
            values[name] = config_from_mapping(section, value, child)
            continue
        value = _yaml_float(value, hints[name])
        require(_type_ok(value, hints[name]), child, f"must be {_type_name(hints[name])}", value)
        values[name] = value
    try:
        return cls(**values)
    except TypeError as err:
        # A value of a container type that is wrong inside fails a comparison.
        raise ConfigError(f"{path or 'config'}: {err}", path) from err


def load_config_file(cls: type[C], path: str | Path, what: str, **overrides: Any) -> C:
    """``cls`` from the YAML file ``path`` (``what`` it is, for messages); the
    keyword ``overrides`` that are not None (command-line flags) win."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r} must hold a mapping of fields, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_mapping(cls, data)
