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
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        spec = dict(f.metadata.get(_FLAG, {"name": ""}))
        if spec["name"] is None or not f.init:
            continue
        out.append((f, hints[f.name], spec))
    return out


def _scalar(annotation: Any) -> tuple[type | None, bool]:
    """(int | float | str | bool | None, optional) of a field annotation."""
    import types
    import typing

    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return (inner[0] if len(inner) == 1 and inner[0] in (int, float, str, bool) else None), True
    return (annotation if annotation in (int, float, str, bool) else None), False


def add_flags(parser: Any, cls: type, *, defaults: dict[str, Any] | None = None, required: tuple[str, ...] = ()) -> None:
    """Declare ``cls``'s fields as flags on an argparse parser (or group).
    ``defaults`` overrides per-component defaults (a service's port);
    ``required`` lists fields that must be given."""
    import dataclasses

    defaults = defaults or {}
    for f, annotation, spec in _flag_fields(cls):
        if dataclasses.is_dataclass(annotation):
            # A component may default a nested block differently (the reference
            # batches 16 items, the reward 32): its instance gives the defaults.
            nested = {} if f.default is dataclasses.MISSING else {
                n.name: getattr(f.default, n.name) for n in dataclasses.fields(annotation)}
            add_flags(parser, annotation, defaults={**nested, **defaults}, required=required)
            continue
        kind, optional = _scalar(annotation)
        if kind is None:
            continue  # structured fields (tuples, other settings) are not flags
        name = spec.pop("name") or "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        kwargs: dict[str, Any] = {"dest": f.name, **spec}
        if kind is bool:
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            kwargs.setdefault("type", kind)
            kwargs["default"] = None if optional and default is None else default
            if f.name in required:
                kwargs["required"] = True
        parser.add_argument(name, **kwargs)


def from_flags(cls: type, args: Any, **given: Any) -> Any:
    """``cls`` built from parsed flags (nested settings included) and ``given``
    fields (those without flags, e.g. secrets read from the environment)."""
    import dataclasses

    values = dict(given)
    for f, annotation, _ in _flag_fields(cls):
        if f.name in values:
            continue
        if dataclasses.is_dataclass(annotation):
            values[f.name] = from_flags(annotation, args)
        elif _scalar(annotation)[0] is not None and hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**values)
