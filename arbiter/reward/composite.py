"""Composite rewards: a reward specification is a weighted sum of named terms,

    total = sum_i weight_i * value_i

where a term is a loaded reward-model version, an ensemble of K versions
(value = mean - k * std, population std: ``arbiter.reward.rules``), or a rule
term (length penalty, format regex, repetition penalty: ``arbiter.reward.rules``).

A spec comes from the reward service's configuration (a YAML file,
``--reward-spec-file``, whose ``models`` also says which versions to load at
startup) or from one request (``ScoreOptions.reward_spec``); both go through
``parse_spec``, so a bad spec gets the same error naming its field
(``terms[2].regex.pattern``) either way. This module holds the spec and the
arithmetic; ``arbiter.reward.engine`` scores the models it names. A file:

    name: helpful-brief             # responses say it (model_version "helpful-brief@v3,rm-a,rm-b")
    models:                         # loaded inactive at startup, kept loaded; paths relative to this file
      rm-a: ../registry/rm/v1
      rm-b: ../registry/rm/v2
    terms:                          # component names are metric labels: unique, "total" is reserved
      - {name: rm, weight: 1.0, model: {}}                    # the active version ("" = active)
      - {name: ens, weight: 0.5, ensemble: {versions: [rm-a, rm-b], uncertainty_penalty: 1.0, normalize: true}}
      - {name: brevity, weight: 0.2, length_penalty: {target_tokens: 128, side: over}}
      - {name: answer_tag, weight: 0.5, regex: {pattern: "^Answer:", full_match: false, ignore_case: false}}
      - {name: repeats, weight: 1.0, repetition_penalty: {n: 3}}

Which spec scores a request: its own ``reward_spec`` if it sends one; else
the configured spec unless the request pins ``model_version`` (then that
version alone, as without a spec: comparing versions keeps working).
Normalization is per model term (``normalize``), never per request.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import regex

from arbiter.config import ConfigError, require
from arbiter.errors import InvalidInput, LimitExceeded
from arbiter.reward import rules
from arbiter.types import NormalizationStats, RewardComponent, RewardInput

# A component name is a metric label value: short, and no free text.
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
TOTAL = "total"
MAX_TERMS = 32
MAX_ENSEMBLE = 16
MAX_PATTERN_CHARS = 1000
# Python regexes can backtrack for ever on some inputs; a match that takes
# longer fails the request instead of holding a tokenizer thread.
REGEX_TIMEOUT_S = 0.25


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_version(value: Any, name: str) -> None:
    require(isinstance(value, str), name, "must be a version label (a string)", value)


@dataclass(frozen=True)
class ModelSource:
    # "" means the active version, resolved per request.
    version: str = ""
    normalize: bool = False

    def __post_init__(self) -> None:
        _check_version(self.version, "version")
        require(isinstance(self.normalize, bool), "normalize", "must be true or false", self.normalize)


@dataclass(frozen=True)
class EnsembleSource:
    versions: tuple[str, ...] = ()
    # k in mean - k * std.
    uncertainty_penalty: float = 0.0
    normalize: bool = False

    def __post_init__(self) -> None:
        require(isinstance(self.versions, list | tuple), "versions", "must be a list of version labels",
                self.versions)
        object.__setattr__(self, "versions", tuple(self.versions))
        require(2 <= len(self.versions) <= MAX_ENSEMBLE, "versions",
                f"must name 2 to {MAX_ENSEMBLE} loaded versions", list(self.versions))
        for j, version in enumerate(self.versions):
            _check_version(version, f"versions[{j}]")
            require(bool(version), f"versions[{j}]", "must name a version (an ensemble does not follow the active "
                                                     "one: name each member)", version)
            require(version not in self.versions[:j], f"versions[{j}]", "is listed twice", version)
        k = self.uncertainty_penalty
        require(_is_number(k) and math.isfinite(k) and k >= 0, "uncertainty_penalty",
                "must be a finite number >= 0 (the k of mean - k * std)", k)
        require(isinstance(self.normalize, bool), "normalize", "must be true or false", self.normalize)


@dataclass(frozen=True)
class LengthPenalty:
    target_tokens: int = 0
    side: str = "both"

    def __post_init__(self) -> None:
        require(isinstance(self.target_tokens, int) and not isinstance(self.target_tokens, bool)
                and self.target_tokens >= 1, "target_tokens", "must be an integer >= 1", self.target_tokens)
        require(self.side in rules.LENGTH_SIDES, "side", f"must be one of {', '.join(rules.LENGTH_SIDES)}",
                self.side)


@dataclass(frozen=True)
class RegexCheck:
    pattern: str = ""
    full_match: bool = False
    ignore_case: bool = False
    compiled: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        require(isinstance(self.pattern, str) and 0 < len(self.pattern) <= MAX_PATTERN_CHARS, "pattern",
                f"must be a regular expression of 1 to {MAX_PATTERN_CHARS} characters", self.pattern)
        for name in ("full_match", "ignore_case"):
            require(isinstance(getattr(self, name), bool), name, "must be true or false", getattr(self, name))
        try:
            compiled = regex.compile(self.pattern, regex.IGNORECASE if self.ignore_case else 0)
        except regex.error as err:
            raise ConfigError(f"pattern={self.pattern!r} is invalid: does not compile ({err})", "pattern") from None
        object.__setattr__(self, "compiled", compiled)

    def matches(self, text: str) -> bool:
        find = self.compiled.fullmatch if self.full_match else self.compiled.search
        return find(text, timeout=REGEX_TIMEOUT_S) is not None


@dataclass(frozen=True)
class RepetitionPenalty:
    n: int = 0

    def __post_init__(self) -> None:
        require(isinstance(self.n, int) and not isinstance(self.n, bool) and 1 <= self.n <= 16, "n",
                "must be an integer in 1..16 (the n-gram length, in words)", self.n)


# Field name in a term -> its source class (the proto's oneof, the YAML key).
SOURCES: dict[str, type] = {
    "model": ModelSource,
    "ensemble": EnsembleSource,
    "length_penalty": LengthPenalty,
    "regex": RegexCheck,
    "repetition_penalty": RepetitionPenalty,
}
MODEL_SOURCES = ("model", "ensemble")


@dataclass(frozen=True)
class RewardTerm:
    name: str
    weight: float
    kind: str
    source: Any

    @property
    def versions(self) -> tuple[str, ...]:
        """The versions it names ("" for the active one); none for a rule."""
        if self.kind == "model":
            return (self.source.version,)
        if self.kind == "ensemble":
            return self.source.versions
        return ()

    def version_field(self, j: int) -> str:
        return "model.version" if self.kind == "model" else f"ensemble.versions[{j}]"


@dataclass(frozen=True)
class RewardSpec:
    name: str
    terms: tuple[RewardTerm, ...]
    # Config file only: version label -> checkpoint path, loaded (inactive) at startup.
    models: Mapping[str, str] = field(default_factory=dict)

    @property
    def model_terms(self) -> list[RewardTerm]:
        return [t for t in self.terms if t.kind in MODEL_SOURCES]

    def named_versions(self) -> set[str]:
        """Versions the spec names explicitly (not the active one)."""
        return {v for t in self.terms for v in t.versions if v} | set(self.models)


def _build(cls: type, data: Any, path: str) -> Any:
    """``cls`` from a mapping; errors name the field by its path."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must be a mapping, got {type(data).__name__}", path)
    known = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {', '.join(map(str, unknown))}; allowed: {', '.join(known)}",
                          path)
    try:
        return cls(**data)
    except ConfigError as err:
        raise err.under(path) from None


def _term(data: Any, path: str) -> RewardTerm:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must be a mapping, got {type(data).__name__}", path)
    allowed = ("name", "weight", *SOURCES)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {', '.join(map(str, unknown))}; allowed: {', '.join(allowed)}",
                          path)
    name, weight = data.get("name", ""), data.get("weight")
    require(isinstance(name, str) and bool(_NAME.match(name)), f"{path}.name",
            "must be 1-64 letters, digits, '_', '.' or '-', not starting with a digit (it is a metric label)", name)
    require(name != TOTAL, f"{path}.name", f"{TOTAL!r} is reserved for the weighted sum", name)
    require(_is_number(weight) and math.isfinite(weight), f"{path}.weight", "must be a finite number", weight)
    given = [key for key in SOURCES if data.get(key) is not None]
    require(len(given) == 1, path, f"must set exactly one source: {', '.join(SOURCES)}",
            given or "none")
    kind = given[0]
    return RewardTerm(name, float(weight), kind, _build(SOURCES[kind], data[kind], f"{path}.{kind}"))


def parse_spec(data: Any, path: str = "", *, base_dir: Path | None = None, allow_models: bool = True) -> RewardSpec:
    """A spec from a mapping (a parsed YAML file, or a request's spec turned
    into one); ConfigError names the bad field under ``path``. ``models``
    (paths to load) is only for a service's configuration; relative paths
    are taken from ``base_dir`` (the config file's directory)."""
    prefix = f"{path}." if path else ""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'reward spec'} must be a mapping, got {type(data).__name__}", path)
    allowed = ("name", "terms", "models") if allow_models else ("name", "terms")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{path or 'reward spec'}: unknown field(s) {', '.join(map(str, unknown))}; allowed: "
                          f"{', '.join(allowed)}", path)
    name = data.get("name") or "default"
    require(isinstance(name, str) and bool(_NAME.match(name)), f"{prefix}name",
            "must be 1-64 letters, digits, '_', '.' or '-', not starting with a digit", name)
    terms_data = data.get("terms")
    require(isinstance(terms_data, list | tuple) and 1 <= len(terms_data) <= MAX_TERMS, f"{prefix}terms",
            f"must be a list of 1 to {MAX_TERMS} terms", terms_data)
    terms = tuple(_term(t, f"{prefix}terms[{i}]") for i, t in enumerate(terms_data))
    for i, term in enumerate(terms):
        require(term.name not in [t.name for t in terms[:i]], f"{prefix}terms[{i}].name",
                "is used by an earlier term; component names must be unique", term.name)
    models_data = data.get("models") or {}
    require(isinstance(models_data, Mapping), f"{prefix}models", "must map version labels to checkpoint paths",
            models_data)
    models = {}
    for label, where in models_data.items():
        require(isinstance(label, str) and bool(label), f"{prefix}models", "keys must be version labels", label)
        require(isinstance(where, str) and bool(where), f"{prefix}models.{label}", "must be a checkpoint path", where)
        models[label] = str((base_dir / where) if base_dir is not None and not Path(where).is_absolute() else where)
    return RewardSpec(name, terms, models)


def load_spec_file(path: str | Path) -> RewardSpec:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the reward spec {str(path)!r}: {err}") from err
    return parse_spec(data, base_dir=Path(path).resolve().parent)


# -- rule terms, per item --------------------------------------------------------------


def response_text(item: RewardInput) -> str:
    """What a rule term judges: the response (a conversation's last turn)."""
    return item.messages[-1].content if item.messages else item.response


def check_response(item: RewardInput, index: int) -> None:
    """What a model would refuse, for specs of rule terms only."""
    from arbiter.reward.model import check_conversation

    if item.messages is not None:
        check_conversation(item.messages, f"inputs[{index}].conversation")
    elif not item.response.strip():
        raise InvalidInput(f"inputs[{index}].text.response", "is empty; there is nothing to score")


def rule_values(spec: RewardSpec, items: Sequence[RewardInput], count_tokens: Callable[[str], int]
                ) -> dict[int, list[float]]:
    """Values of the spec's rule terms (by term index) for each item.
    Blocking (tokenizes, runs regexes): called on a tokenizer thread."""
    for i, item in enumerate(items):
        check_response(item, i)
    texts = [response_text(item) for item in items]
    values: dict[int, list[float]] = {}
    lengths: list[int] | None = None
    for t, term in enumerate(spec.terms):
        source = term.source
        if term.kind == "length_penalty":
            lengths = lengths if lengths is not None else [count_tokens(text) for text in texts]
            values[t] = [rules.length_penalty(n, source.target_tokens, source.side) for n in lengths]
        elif term.kind == "regex":
            values[t] = [rules.format_check(_match(source, text, term.name, i)) for i, text in enumerate(texts)]
        elif term.kind == "repetition_penalty":
            values[t] = [rules.repetition_penalty(text, source.n) for text in texts]
    return values


def _match(check: RegexCheck, text: str, term: str, index: int) -> bool:
    try:
        return check.matches(text)
    except TimeoutError:
        raise LimitExceeded(f"inputs[{index}]: the regex of term {term!r} ran past {REGEX_TIMEOUT_S:g}s on this "
                            "response; simplify the pattern (nested repetition backtracks)") from None


# -- the total -----------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """One item's total (model scores as the terms ask), raw total (raw model
    scores) and components."""

    total: float
    raw_total: float
    components: tuple[RewardComponent, ...]


def term_normalized(term: RewardTerm) -> bool:
    return term.kind in MODEL_SOURCES and term.source.normalize


def combine(
    spec: RewardSpec,
    resolved: Sequence[tuple[str, ...]],
    raw: Mapping[str, Sequence[float]],
    stats: Mapping[str, NormalizationStats | None],
    rule: Mapping[int, Sequence[float]],
    count: int,
) -> list[Scored]:
    """Each item's total from its terms. ``resolved``: each term's versions
    (the active one filled in); ``raw``: each version's raw scores per item;
    ``stats``: the statistics of versions normalized (checked by the caller)."""
    out = []
    for i in range(count):
        components = []
        for t, (term, versions) in enumerate(zip(spec.terms, resolved, strict=True)):
            if term.kind not in MODEL_SOURCES:
                value = rule[t][i]
                components.append(RewardComponent(term.name, term.weight, value, value))
                continue
            raws = [raw[v][i] for v in versions]
            used = [stats[v].apply(r) for v, r in zip(versions, raws)] if term_normalized(term) \
                else raws
            if term.kind == "model":
                components.append(RewardComponent(term.name, term.weight, used[0], raws[0], versions, tuple(used),
                                                  used[0], 0.0))
                continue
            k = term.source.uncertainty_penalty
            mean, std = rules.ensemble_moments(used)
            components.append(RewardComponent(term.name, term.weight, mean - k * std, rules.penalized_mean(raws, k),
                                              versions, tuple(used), mean, std))
        total = math.fsum(c.weight * c.value for c in components)
        raw_total = math.fsum(c.weight * c.raw_value for c in components)
        out.append(Scored(total, raw_total, tuple(components)))
    return out


def spec_label(spec: RewardSpec, resolved: Sequence[tuple[str, ...]]) -> str:
    """``NAME@V1,V2``: the spec and the versions that scored (in term order),
    so a consumer keying statistics by it starts afresh when a version swaps."""
    seen: list[str] = []
    for versions in resolved:
        seen.extend(v for v in versions if v not in seen)
    return f"{spec.name}@{','.join(seen)}"
