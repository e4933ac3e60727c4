"""The one validation helper and the one error type for settings and config
files, used by every component (servers, worker, trainers, Kafka settings).

A message names the field (its path in a YAML file, ``ppo.clip_coef``; its
settings name, ``max_batch_size``; or ``kafka.bootstrap_servers``), the value
given and what is allowed, so a user can fix it without reading code.
"""

from __future__ import annotations

import dataclasses
import enum
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


# -- command-line flags, declared once, on the settings fields ---------------------
#
# Every field of a settings dataclass is a flag (``max_batch_size`` ->
# ``--max-batch-size``) unless its metadata says ``flag(None)``; nested settings
# dataclasses contribute their own fields. Types come from the annotations, so
# a field added to a settings class gets its flag and its parsing with it.

_FLAG = "arbiter.flag"


def flag(name: str | None = "", *, help: str = "", **argparse: Any) -> dict[str, Any]:
    """Field metadata: ``name`` overrides the flag ("" derives it from the
    field; ``None``: the field has no flag). For a boolean that defaults to
    True, ``name`` is the flag that turns it off (``--no-dynamic-batching``)."""
    return {_FLAG: {"name": name, "help": help, **argparse}}


def _flag_fields(cls: type) -> list[tuple[Any, Any, dict[str, Any]]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spec = dict(f.metadata.get(_FLAG, {"name": ""}))
        if spec["name"] is None or not f.init:
            continue
        out.append((f, hints[f.name], spec))
    return out


def _flag_type(hint: Any, spec: dict[str, Any]) -> type | None:
    """The one scalar (or enum) type a flag parses; None for structured fields
    (tuples, mappings) unless their metadata says how (``action="append"``)."""
    kinds = [a for a in _hint_args(hint) if a is not type(None)]
    if len(kinds) != 1:
        return None
    kind = kinds[0]
    if kind in (int, float, str, bool) or (isinstance(kind, type) and issubclass(kind, enum.Enum)):
        return kind
    return str if spec.get("action") == "append" else None


def add_flags(parser: Any, cls: type, *, defaults: dict[str, Any] | None = None, required: tuple[str, ...] = ()) -> None:
    """Declare ``cls``'s fields as flags on an argparse parser (or group).
    ``defaults`` overrides per-component defaults (a service's port);
    ``required`` lists fields that must be given."""
    defaults = defaults or {}
    for f, hint, spec in _flag_fields(cls):
        section = _section(hint)
        if section is not None:
            # A component may default a nested block differently (the reference
            # batches 16 items, the reward 32): its instance gives the defaults.
            nested = {} if f.default is dataclasses.MISSING else {
                n.name: getattr(f.default, n.name) for n in dataclasses.fields(section)}
            add_flags(parser, section, defaults={**nested, **defaults}, required=required)
            continue
        kind = _flag_type(hint, spec)
        if kind is None:
            continue
        name = spec.pop("name") or "--" + f.name.replace("_", "-")
        # A default factory (a generated id, say) runs when the flag is not given.
        default = defaults.get(f.name, None if f.default is dataclasses.MISSING else f.default)
        kwargs: dict[str, Any] = {"dest": f.name, **spec}
        if kind is bool:
            kwargs["action"] = "store_false" if default else "store_true"
        elif issubclass(kind, enum.Enum):
            kwargs.update(choices=[e.value for e in kind], default=None if default is None else kind(default).value)
        elif spec.get("action") == "append":
            kwargs["default"] = list(default or ())
        else:
            kwargs.setdefault("type", kind)
            kwargs["default"] = default
        if f.name in required:
            kwargs["required"] = True
        parser.add_argument(name, **kwargs)


def from_flags(cls: type, args: Any, **given: Any) -> Any:
    """``cls`` built from parsed flags (nested settings included) and ``given``
    fields (those without flags, e.g. secrets read from the environment). A
    flag left unset for a field with a default factory gets the factory's value."""
    values = dict(given)
    for f, hint, spec in _flag_fields(cls):
        if f.name in values:
            continue
        section = _section(hint)
        if section is not None:
            values[f.name] = from_flags(section, args)
        elif _flag_type(hint, spec) is not None and hasattr(args, f.name):
            value = getattr(args, f.name)
            if value is None and f.default_factory is not dataclasses.MISSING:
                continue
            values[f.name] = value
    return cls(**values)


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
