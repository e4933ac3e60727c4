"""``make bench``: every benchmark, each against its named baseline measured
in the same run. ``--only NAME`` (repeatable) picks some; ``--seconds`` sets
time per cell; ``--quick`` shrinks every benchmark to half a second per path per cell
(a smoke run: proves they run, measures nothing worth quoting).

``soak`` (``--only soak``, ``make bench-soak``) is not among the defaults:
it is a several-minute acceptance check (RSS growth, oversize refusals,
health under hostile load), not a ratio against a baseline; ``--soak-seconds``
sets its length."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

from bench.common import QUICK_SECONDS

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BENCHES = ("reward", "triton", "triton-policy", "policy", "prefill", "prompts", "reference", "ppo", "publish")
# Run only when named (--only soak).
EXTRA = ("soak",)
TRITON_VENV = ".venv-triton"


def triton_unavailable(venv: str = TRITON_VENV) -> str | None:
    """Why the Triton benchmark cannot run here, or None."""
    if not Path(venv).is_dir():
        return f"{venv} does not exist (build it with `make triton-env`)"
    from arbiter.backends.triton_local import TritonNotAvailable, find_tritonserver

    try:
        find_tritonserver(venv)
    except TritonNotAvailable as err:
        return str(err)
    return None


def run_bench(name: str, seconds: float, quick: bool, ppo_iterations: int, soak_seconds: float = 180.0) -> dict:
    if name == "reward":
        from bench import reward_bench

        if quick:  # short items only: long ones at 64 clients take seconds per request
            return reward_bench.run(seconds=QUICK_SECONDS, token_lengths=(16,), processes=1)
        return reward_bench.run(seconds=seconds)
    if name == "triton":
        reason = triton_unavailable()
        if reason:
            print(f"triton: skipped: {reason}", flush=True)
            return {"skipped": reason}
        from bench import triton_bench

        return triton_bench.run(seconds=QUICK_SECONDS if quick else seconds, **({"rounds": 1} if quick else {}))
    if name == "triton-policy":
        reason = triton_unavailable()
        if reason:
            print(f"triton-policy: skipped: {reason}", flush=True)
            return {"skipped": reason}
        from bench import triton_bench

        if quick:
            return triton_bench.run_policy(seconds=QUICK_SECONDS, rounds=1, max_new_tokens=16)
        return triton_bench.run_policy(seconds=seconds)
    if name == "policy":
        from bench import policy_bench

        return policy_bench.run(seconds=seconds, quick=quick)
    if name == "prefill":
        from bench import prefill_bench

        return prefill_bench.run(seconds=seconds, quick=quick)
    if name == "prompts":
        from bench import prompt_bench

        return prompt_bench.run(seconds=seconds, quick=quick)
    if name == "reference":
        from bench import reference_bench

        return reference_bench.run(seconds=seconds, quick=quick)
    if name == "ppo":
        from bench import ppo_bench

        return ppo_bench.run(iterations=ppo_iterations, quick=quick)
    if name == "publish":
        from bench import publish_bench

        return publish_bench.run(quick=quick)
    if name == "soak":
        from bench import soak

        return soak.run(seconds=20.0 if quick else soak_seconds)
    raise ValueError(name)


def _finite(value) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="make bench")
    parser.add_argument("--only", choices=BENCHES + EXTRA, action="append", help="run only this benchmark (repeatable)")
    parser.add_argument("--seconds", type=float, default=8.0, help="time per path per cell (not ppo)")
    parser.add_argument("--ppo-iterations", type=int, default=6, help="measured iterations of each ppo side")
    parser.add_argument("--quick", action="store_true", help=f"~{QUICK_SECONDS:g}s per cell, one ppo iteration")
    parser.add_argument("--soak-seconds", type=float, default=180.0, help="measured load of the soak (after warm-up)")
    parser.add_argument("--json", help="also write the summary ratios here")
    args = parser.parse_args(argv)
    summary = {}
    for name in args.only or BENCHES:
        started = time.perf_counter()
        summary[name] = run_bench(name, args.seconds, args.quick, args.ppo_iterations, args.soak_seconds)
        print(f"{name}: {time.perf_counter() - started:.0f}s", flush=True)
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)
    if not _finite(summary):
        raise SystemExit("a benchmark reported a non-finite number")
    return summary


if __name__ == "__main__":
    main()
