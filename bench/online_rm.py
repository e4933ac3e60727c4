"""The demo with its reward model retrained online against the same demo with
the RM frozen at v1, for the same wall-clock training budget (issue #14 item 3),
repeated over seeds.

``python -m bench.online_rm [--seconds 360] [--seeds 3] [--full] [--workdir DIR]``

Both arms run ``services.demo.run`` on the same prepared models (the
pretrained policy, RM v1, prompts: ``services.demo_models.prepare_models``,
quick scale unless ``--full``), each stopped ``--seconds`` after its stack is
up; for every seed the frozen arm then the online arm (so load drifting over
the run hits both alike):

- ``frozen``: the plain demo; the worker scores with RM v1 throughout.
- ``online``: ``--online-rm``: the simulated annotator labels pairs of live
  completions with the gold scorer (VADER) and submits them; ``arbiter rm
  loop`` retrains, gates and promotes RM versions while PPO runs.

The seed is the stack's (sampling, prompt order, training) and the
annotator's; the prepared models are the same for every seed. Measured for
each run by the same code: updates, the gold gain (final vs initial policy on
the held-out prompts, ``--eval-samples`` per prompt), the final KL, and every
RM version's pairwise accuracy on the same fresh gold-labelled pairs of that
run's final policy's samples (``--current-policy-samples`` per held-out
prompt), so versions compare pair by pair: the accuracy of the RM active at
the end minus v1's has a paired standard error. The annotator and the loop
share the cores with PPO, so the online arm does fewer updates in the same
time: that cost is part of what is compared. Per-seed rows, then mean ± sd
over seeds, to stdout and WORKDIR/online_rm.json. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from statistics import mean, stdev

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
ARMS = ("frozen", "online")


def mean_sd(values: Sequence[float | None]) -> str:
    """``mean ± sd`` over the seeds that have a value (sd: sample, n - 1)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:+.3f} (n=1)"
    return f"{mean(values):+.3f} ± {stdev(values):.3f} (n={len(values)})"


def add_seed_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=3, help="repeat each arm with seeds 0..N-1")
    parser.add_argument("--first-seed", type=int, default=0, help="start the seeds here")


def seeds_of(args) -> list[int]:
    if args.seeds < 1:
        raise SystemExit(f"--seeds {args.seeds}: at least 1")
    return list(range(args.first_seed, args.first_seed + args.seeds))


def main(argv: list[str] | None = None) -> dict:
    from services.demo_models import pretrain_steps_arg

    parser = argparse.ArgumentParser(prog="python -m bench.online_rm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=360.0, help="training wall-clock budget of each run")
    add_seed_flags(parser)
    parser.add_argument("--full", action="store_true", help="the full demo's models (default: --quick's)")
    parser.add_argument("--eval-samples", type=int, default=16, help="gold evaluation samples per held-out prompt")
    parser.add_argument("--current-policy-samples", type=int, default=12,
                        help="completions per held-out prompt of the final policy, whose gold-labelled pairs "
                             "measure every RM version")
    parser.add_argument("--pretrain-steps", type=pretrain_steps_arg,
                        help="the policy's pretraining steps (default: the scale's)")
    parser.add_argument("--arm", choices=ARMS, action="append", help="run only this arm (repeatable)")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench-online-rm"))
    args = parser.parse_args(argv)
    seeds = seeds_of(args)

    from services.demo import run

    console, workdir, models = prepare_arms(args)
    arms = args.arm or list(ARMS)
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in seeds:
        for arm in arms:
            console.rule(f"seed {seed}, {arm}: {args.seconds:.0f}s of training")
            summary = run(workdir / f"seed{seed}" / arm, 100_000, not args.full, console, online_rm=arm == "online",
                          seconds=args.seconds, models=models, eval_samples=args.eval_samples, seed=seed,
                          current_policy_samples=args.current_policy_samples)
            results[arm].append({"seed": seed, **summary, **rm_accuracy(summary)})
    report(results, args, console)
    (workdir / f"online_rm{'-' + '-'.join(args.arm) if args.arm else ''}.json").write_text(json.dumps(
        {"seconds": args.seconds, "full": args.full, "seeds": seeds, **results}, indent=2, default=str))
    return results


def prepare_arms(args) -> tuple[Console, Path, object]:
    """What every arm of a demo comparison shares: the console, the workdir
    and the prepared models (``args``: --workdir, --full, --pretrain-steps)."""
    from services.demo_models import prepare_models

    if "ARBITER_LOG_LEVEL" not in os.environ:
        logging.getLogger().setLevel(logging.WARNING)
    console = Console(width=160)
    workdir = Path(args.workdir).resolve()
    models = prepare_models(workdir / "models", quick=not args.full, console=console,
                            pretrain_steps=args.pretrain_steps)
    return console, workdir, models


def gold_gain(summary: dict) -> float:
    return summary["gold_final_policy"] - summary["gold_initial_policy"]


def rm_accuracy(summary: dict) -> dict:
    """v1's and the end RM's accuracy on the run's fresh pairs, the best
    version's, and end minus v1 pair by pair with its standard error (pairs
    of one prompt are not independent: an underestimate)."""
    verdicts: dict[str, list[float]] = summary.get("pair_verdicts") or {}
    versions = summary.get("rm_versions", [])
    if not verdicts or not versions:
        return {}
    v1 = verdicts[versions[0]["version"]]
    end_version = summary.get("rm_active_at_end", versions[0]["version"])
    accuracies = {v: sum(c) / len(c) for v, c in verdicts.items()}
    best = max(accuracies, key=accuracies.get)

    def minus_v1(version: str) -> tuple[float | None, float | None]:
        if version not in verdicts:  # not measured: never v1's numbers in its place
            return None, None
        diffs = [e - b for e, b in zip(verdicts[version], v1)]
        return mean(diffs), stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")

    (end_diff, end_se), (best_diff, best_se) = minus_v1(end_version), minus_v1(best)
    out = {"acc_v1": accuracies[versions[0]["version"]], "acc_end": accuracies.get(end_version),
           "rm_at_end": end_version, "acc_best": accuracies[best], "best_version": best,
           "acc_best_minus_v1": best_diff, "acc_best_minus_v1_se": best_se, "pairs": len(v1)}
    if end_diff is not None:
        out.update(acc_end_minus_v1=end_diff, acc_end_minus_v1_se=end_se)
    return out


def loop_decisions(summary: dict) -> str:
    """Candidates by outcome, and the gates that stopped the others."""
    versions = summary.get("rm_versions", [])[1:]
    promoted = sum(v["status"] in ("watching", "active") for v in versions)
    rolled_back = sum(v["status"] == "rolled_back" for v in versions)
    failed: dict[str, int] = {}
    for v in versions:
        if v.get("failed_gate"):
            failed[v["failed_gate"]] = failed.get(v["failed_gate"], 0) + 1
    stopped = ", ".join(f"{gate} {n}" for gate, n in sorted(failed.items()))
    return f"{len(versions)}: {promoted} kept, {rolled_back} rolled back" + (f"; stopped by {stopped}" if stopped else "")


def report(results: dict[str, list[dict]], args, console: Console) -> None:
    table = Table(title=f"Online RM vs frozen RM v1, {args.seconds:.0f}s of training per run (gold: "
                        f"{args.eval_samples} samples x held-out prompts; RM accuracy on gold-labelled pairs of "
                        f"the run's final policy, {args.current_policy_samples} samples per held-out prompt)",
                  title_justify="left")
    for column in ("seed", "arm", "updates", "RM at end", "candidates", "gold gain", "KL at end", "pairs",
                   "acc v1", "acc RM at end", "end − v1 (± se)", "best version", "best − v1 (± se)"):
        table.add_column(column, justify="right")
    for arm, runs in results.items():
        for s in runs:
            table.add_row(
                str(s["seed"]), arm, str(s["updates"]), s.get("rm_at_end", "v1"),
                loop_decisions(s) if arm == "online" else "frozen", f"{gold_gain(s):+.3f}", f"{s['kl_last']:.2f}",
                str(s.get("pairs", 0)), _pct(s.get("acc_v1")), _pct(s.get("acc_end")),
                f"{s['acc_end_minus_v1']:+.1%} ± {s['acc_end_minus_v1_se']:.1%}" if "acc_end_minus_v1" in s else "-",
                f"{s.get('best_version', '-')} {_pct(s.get('acc_best'))}",
                f"{s['acc_best_minus_v1']:+.1%} ± {s['acc_best_minus_v1_se']:.1%}" if "acc_best_minus_v1" in s else "-")
    console.print(table)
    summary = Table(title="Over seeds: mean ± sd", title_justify="left")
    for column in ("arm", "updates", "gold gain", "KL at end", "acc v1", "acc RM at end", "end − v1", "best − v1"):
        summary.add_column(column, justify="right")
    for arm, runs in results.items():
        summary.add_row(arm, mean_sd([s["updates"] for s in runs]), mean_sd([gold_gain(s) for s in runs]),
                        mean_sd([s["kl_last"] for s in runs]), mean_sd([s.get("acc_v1") for s in runs]),
                        mean_sd([s.get("acc_end") for s in runs]), mean_sd([s.get("acc_end_minus_v1") for s in runs]),
                        mean_sd([s.get("acc_best_minus_v1") for s in runs]))
    if {"frozen", "online"} <= results.keys():
        frozen = {s["seed"]: s for s in results["frozen"]}
        paired = [gold_gain(s) - gold_gain(frozen[s["seed"]]) for s in results["online"] if s["seed"] in frozen]
        summary.add_row("online − frozen (same seed)", "", mean_sd(paired), "", "", "", "", "")
    console.print(summary)
    console.print("A shared CPU: absolute numbers move with load; arms of one seed ran back to back.")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


if __name__ == "__main__":
    main()
