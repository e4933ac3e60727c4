"""Where ``arbiter up``'s components run on one machine: CPU cores (affinity)
and torch threads per component, derived from the cores the stack may use
(``os.sched_getaffinity(0)``), overridable per component in the stack YAML.

The rule (``plan_placement``), for N usable cores:

- The four components that run torch compute are weighted by their share of
  the work in one RL step: the policy (generation) 2, the trainer (forward and
  backward over each batch, several epochs) 2, the reward and the reference
  (one forward each) 1 each. The broker and the rollout workers do I/O and
  bookkeeping: one thread each.
- N < 4 (fewer cores than torch components, e.g. a 2-core laptop): every
  component may run on every core, one torch thread each. Pinning four busy
  processes to two cores would idle a core whenever its pair waits; one
  thread each keeps the cores busy as long as two stages have work (and with
  asynchronous generation the policy and the trainer both do) without the
  oversubscription that makes OpenMP threads wait on each other.
- N >= 4: the torch components get disjoint core ranges, in the order
  policy, trainer, reward, reference, sized by the largest-remainder method on
  the weights (each gets at least one core), and as many torch threads as
  cores, so no two torch thread pools share a core. From 8 cores up, one core
  in every 8 (the last ones) is kept for the broker and the workers, so Kafka
  and the RPCs are never queued behind a torch thread; below 8 they float over
  every core (a core of their own would mostly idle).

Examples: 2 cores: everything on cores 0-1, 1 thread each. 4 cores: policy 0,
trainer 1, reward 2, reference 3 (1 thread each); broker and workers on 0-3.
16 cores: policy 0-4 (5 threads), trainer 5-9 (5), reward 10-11 (2),
reference 12-13 (2), broker and workers 14-15.

Overrides (stack YAML)::

    torch_threads: 2          # every torch component's thread count (as before)
    placement:
      mode: auto              # auto (the rule above) | off (no affinity; threads from torch_threads or 1)
      policy: {cores: "0-5", threads: 6}
      trainer: {threads: 2}   # cores stay the rule's

A per-component value wins over ``torch_threads``, which wins over the rule.
Cores are CPU ids as ``taskset``/``/proc/self/status`` list them: a list of
ints or a string like ``"0-3,8"``; each must be one the stack may use.

Replicas (``replicas: {policy: 2}``) share their kind's placement
(``share_placement``): with at least as many cores as replicas each gets a
disjoint slice and threads in proportion; with fewer, all of them run on the
kind's cores with the threads divided among them (at least one each), so N
replicas never oversubscribe what one would have used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Torch components and their share of the work (see the module docstring).
TORCH_WEIGHTS = {"policy": 2, "trainer": 2, "reward": 1, "reference": 1}
# Components that run no torch compute ("worker": every rollout worker).
LIGHT = ("broker", "worker")
COMPONENTS = (*TORCH_WEIGHTS, *LIGHT)
MODES = ("auto", "off")
OVERRIDE_KEYS = ("cores", "threads")
# From this many cores up, one core in every LIGHT_CORE_EVERY is the broker's and the workers'.
LIGHT_CORE_EVERY = 8


class PlacementError(ValueError):
    """A placement setting that cannot work; the message names the field."""


@dataclass(frozen=True)
class Placement:
    # None: no affinity is set (the component runs wherever the OS puts it).
    cores: tuple[int, ...] | None
    threads: int

    def describe(self) -> str:
        where = "any core" if self.cores is None else f"cores {format_cores(self.cores)}"
        return f"{where}, {self.threads} torch thread{'s' if self.threads != 1 else ''}"


def apportion(total: int, weights: Mapping[str, int]) -> dict[str, int]:
    """``total`` split in proportion to ``weights`` (Hamilton's largest
    remainder; ties go to the earlier name)."""
    weight_sum = sum(weights.values())
    quotas = {name: total * w / weight_sum for name, w in weights.items()}
    shares = {name: int(q) for name, q in quotas.items()}
    left = total - sum(shares.values())
    order = list(weights)
    by_remainder = sorted(order, key=lambda name: (-(quotas[name] - shares[name]), order.index(name)))
    for name in by_remainder[:left]:
        shares[name] += 1
    return shares


def plan_placement(cores: Iterable[int]) -> dict[str, Placement]:
    """The rule: each component in ``COMPONENTS`` -> its cores and threads,
    on a machine where the stack may use ``cores``."""
    cores = tuple(sorted(set(cores)))
    n = len(cores)
    if n == 0:
        raise PlacementError("no CPU cores to place components on")
    if n < len(TORCH_WEIGHTS):
        return {name: Placement(cores, 1) for name in COMPONENTS}
    light = n // LIGHT_CORE_EVERY
    torch_cores, light_cores = cores[: n - light], cores[n - light :]
    plan, start = {}, 0
    for name, count in apportion(len(torch_cores), TORCH_WEIGHTS).items():
        plan[name] = Placement(torch_cores[start : start + count], count)
        start += count
    for name in LIGHT:
        plan[name] = Placement(light_cores or cores, 1)
    return plan


def parse_cores(value: Any, field: str) -> tuple[int, ...]:
    """``[0, 1, 2]`` or ``"0-2,8"`` -> (0, 1, 2, 8)."""
    def bad(why: str) -> PlacementError:
        return PlacementError(f"{field}={value!r} is invalid: {why}")

    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, str):
        out: list[int] = []
        for part in value.replace(" ", "").split(","):
            low, dash, high = part.partition("-")
            if not low.isdigit() or (dash and not high.isdigit()):
                raise bad('expected CPU ids like "0-3,8" or a list of ints')
            first, last = int(low), int(high) if dash else int(low)
            if last < first:
                raise bad(f"range {part} runs backwards")
            out += range(first, last + 1)
    elif isinstance(value, (list, tuple)) and value:
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value):
            raise bad("a list of CPU ids must hold non-negative ints only")
        out = list(value)
    else:
        raise bad('expected CPU ids like "0-3,8" or a non-empty list of ints')
    if len(set(out)) != len(out):
        raise bad("names a core twice")
    return tuple(sorted(out))


def format_cores(cores: Sequence[int]) -> str:
    """(0, 1, 2, 8) -> "0-2,8" (the form /proc/PID/status Cpus_allowed_list uses)."""
    parts, run = [], [cores[0]] if cores else []
    for core in cores[1:]:
        if core == run[-1] + 1:
            run.append(core)
        else:
            parts.append(run)
            run = [core]
    if run:
        parts.append(run)
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in parts)


def resolve_placement(settings: Mapping[str, Any] | None, torch_threads: int | None,
                      available: Iterable[int]) -> dict[str, Placement]:
    """The stack's ``placement`` mapping and ``torch_threads`` over the rule
    for the ``available`` cores; every error names the field."""
    available = tuple(sorted(set(available)))
    settings = dict(settings or {})
    if torch_threads is not None and (isinstance(torch_threads, bool) or not isinstance(torch_threads, int)
                                      or torch_threads < 1):
        raise PlacementError(f"torch_threads={torch_threads!r} is invalid: must be an integer >= 1 or null (null: "
                             f"each component's share of the cores)")
    mode = settings.pop("mode", "auto")
    if mode not in MODES:
        raise PlacementError(f"placement.mode={mode!r} is invalid: must be one of {', '.join(MODES)}")
    for name, override in settings.items():
        if name not in COMPONENTS:
            raise PlacementError(f"placement.{name} is invalid: not a component; the keys are mode and "
                                 f"{', '.join(COMPONENTS)}")
        if not isinstance(override, Mapping):
            raise PlacementError(f"placement.{name}={override!r} is invalid: must be a mapping with keys "
                                 f"{' and/or '.join(OVERRIDE_KEYS)}")
        for key in override:
            if key not in OVERRIDE_KEYS:
                raise PlacementError(f"placement.{name}.{key} is invalid: not a setting; one of "
                                     f"{', '.join(OVERRIDE_KEYS)}")
    if mode == "off":
        plan = {name: Placement(None, 1 if name in LIGHT else torch_threads or 1) for name in COMPONENTS}
    else:
        plan = plan_placement(available)
        if torch_threads is not None:
            plan = {name: p if name in LIGHT else Placement(p.cores, torch_threads) for name, p in plan.items()}
    for name, override in settings.items():
        cores, threads = plan[name].cores, plan[name].threads
        if "cores" in override:
            field = f"placement.{name}.cores"
            cores = parse_cores(override["cores"], field)
            outside = [c for c in cores if c not in available]
            if outside:
                raise PlacementError(f"{field}={override['cores']!r} is invalid: {format_cores(outside)} "
                                     f"{'is' if len(outside) == 1 else 'are'} not among the cores this stack may use "
                                     f"({format_cores(available)})")
        if "threads" in override:
            threads = override["threads"]
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise PlacementError(f"placement.{name}.threads={threads!r} is invalid: must be an integer >= 1")
        plan[name] = Placement(cores, threads)
    return plan


def component_role(name: str) -> str:
    """A stack component's name -> its key in the plan (``worker-3`` ->
    ``worker``, replica ``policy-1`` -> ``policy``); a component the rule does
    not know runs as a light one."""
    if name in TORCH_WEIGHTS or name == "broker":
        return name
    kind, dash, index = name.rpartition("-")
    if dash and index.isdigit() and kind in TORCH_WEIGHTS:
        return kind
    return "worker"


def share_placement(placement: Placement, index: int, count: int) -> Placement:
    """Replica ``index`` of ``count`` of a kind placed as ``placement`` (see
    the module docstring)."""
    if count == 1:
        return placement
    if placement.cores is None:
        return Placement(None, max(1, placement.threads // count))
    cores = placement.cores
    if len(cores) < count:
        return Placement(cores, max(1, placement.threads // count))
    sizes = list(apportion(len(cores), {str(i): 1 for i in range(count)}).values())
    start = sum(sizes[:index])
    mine = cores[start:start + sizes[index]]
    return Placement(mine, max(1, placement.threads * len(mine) // len(cores)))


def pin(pid: int, cores: Sequence[int]) -> None:
    """Sets the CPU affinity of every thread of process ``pid``. Affinity is
    per thread on Linux and inherited at creation: the main thread first, so
    threads it starts meanwhile inherit the new mask. Gone processes are
    skipped (the supervisor sees the death)."""
    import os

    try:
        os.sched_setaffinity(pid, cores)
        tids = os.listdir(f"/proc/{pid}/task")
    except (ProcessLookupError, FileNotFoundError):
        return
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:
            pass
