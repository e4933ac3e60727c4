"""What ``bench/trl_grpo.py`` and ``bench/trl_ppo.py`` share: the flags the
benchmark passes both, the policy kept along the run, and the result they hand
back (a JSON file plus the final policy and the kept ones as Hugging Face
directories). They run in TRL's own environments (``python -m
bench.trl_grpo`` from the repository root), so this imports nothing from
Arbiter, and torch only where it is used."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def runner_parser() -> argparse.ArgumentParser:
    """The flags both runners take; each adds its own."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward", required=True)
    parser.add_argument("--prompts", required=True, help="JSON lines with a 'prompt' field")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, required=True, help="wall-clock training budget")
    parser.add_argument("--beta", type=float, required=True)
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--minibatch-size", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--clip", type=float, required=True)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--snapshots", type=int, default=0,
                        help="keep the policy at this many evenly spaced times of the budget (the last at the end), "
                             "for gold and KL over time")
    return parser


def read_prompts(path: str) -> list[str]:
    return [json.loads(line)["prompt"] for line in Path(path).read_text().splitlines() if line.strip()]


class Snapshots:
    """The policy at the first update boundary past each of ``count - 1``
    evenly spaced times of the budget (the final policy is the last): an
    in-memory copy (a few MB, about a millisecond), written out after the
    clock stops."""

    def __init__(self, count: int, seconds: float):
        self.count, self.seconds = count, seconds
        self.kept: list[tuple[float, int, dict]] = []

    def offer(self, elapsed: float, updates: int, model) -> None:
        if len(self.kept) < self.count - 1 and elapsed >= self.seconds * (len(self.kept) + 1) / self.count:
            self.kept.append((elapsed, updates, {k: v.detach().clone() for k, v in model.state_dict().items()}))


def write_result(out: Path, model, tokenizer, snapshots: Snapshots, result: dict) -> None:
    """Saves the final policy and the kept ones; writes ``out/result.json``
    (``result`` plus where they are) and prints it."""
    model.save_pretrained(out / "final")
    tokenizer.save_pretrained(out / "final")
    curve = []
    for i, (at, updates, weights) in enumerate(snapshots.kept):
        where = out / "snapshots" / str(i)
        model.save_pretrained(where, state_dict=weights)
        tokenizer.save_pretrained(where)
        curve.append({"seconds": at, "updates": updates, "dir": str(where)})
    result = {**result, "final_dir": str(out / "final"), "pid": os.getpid(), "snapshots": curve}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
