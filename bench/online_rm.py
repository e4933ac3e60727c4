"""The demo with its reward model retrained online against the same demo with
the RM frozen at v1, for the same wall-clock training budget (issue #14 item 3).

``python -m bench.online_rm [--seconds 360] [--full] [--workdir DIR]``

Both arms run ``services.demo.run`` on the same prepared models (the
pretrained policy, RM v1, prompts: ``services.demo_models.prepare_models``,
quick scale unless ``--full``), one after the other, each stopped ``--seconds``
after its stack is up:

- ``frozen``: the plain demo; the worker scores with RM v1 throughout.
- ``online``: ``--online-rm``: the simulated annotator labels pairs of live
  completions with the gold scorer (VADER) and submits them; ``arbiter rm
  loop`` retrains, gates and promotes RM versions while PPO runs.

Measured for each by the same code: updates done, the gold gain (final vs
initial policy on the held-out prompts, ``--eval-samples`` per prompt:
``services.demo.evaluate_gold``), the proxy (RM) reward change over the run,
the final KL, and every RM version's pairwise accuracy on fresh gold-labelled
pairs of that arm's final policy's samples. The annotator and the loop share
the two cores with PPO, so the online arm does fewer updates in the same time:
that cost is part of what is compared. The table goes to stdout and to
WORKDIR/online_rm.json. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
ARMS = ("frozen", "online")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.online_rm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=360.0, help="training wall-clock budget of each arm")
    parser.add_argument("--full", action="store_true", help="the full demo's models (default: --quick's)")
    parser.add_argument("--eval-samples", type=int, default=16, help="gold evaluation samples per held-out prompt")
    parser.add_argument("--pretrain-seconds", type=float, help="the policy's pretraining budget (default: the "
                                                               "scale's; a loaded machine needs more)")
    parser.add_argument("--arm", choices=ARMS, action="append", help="run only this arm (repeatable)")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench-online-rm"))
    args = parser.parse_args(argv)

    from services.demo import run

    console, workdir, models = prepare_arms(args)
    results = {}
    for arm in args.arm or ARMS:
        console.rule(f"{arm}: {args.seconds:.0f}s of training")
        results[arm] = run(workdir / arm, 100_000, not args.full, console, online_rm=arm == "online",
                           seconds=args.seconds, models=models, eval_samples=args.eval_samples)
    report(results, args, console)
    (workdir / f"online_rm{'-' + '-'.join(args.arm) if args.arm else ''}.json").write_text(json.dumps({"seconds": args.seconds, "full": args.full, **results},
                                                       indent=2, default=str))
    return results


def prepare_arms(args) -> tuple[Console, Path, object]:
    """What every arm of a demo comparison shares: the console, the workdir
    and the prepared models (``args``: --workdir, --full, --pretrain-seconds)."""
    from services.demo_models import prepare_models

    if "ARBITER_LOG_LEVEL" not in os.environ:
        logging.getLogger().setLevel(logging.WARNING)
    console = Console(width=140)
    workdir = Path(args.workdir).resolve()
    models = prepare_models(workdir / "models", quick=not args.full, console=console,
                            pretrain_seconds=args.pretrain_seconds)
    return console, workdir, models


def gold_gain(summary: dict) -> float:
    return summary["gold_final_policy"] - summary["gold_initial_policy"]


def report(results: dict, args, console: Console) -> None:
    table = Table(title=f"Online RM vs frozen RM v1, {args.seconds:.0f}s of training each "
                        f"(gold: {args.eval_samples} samples x held-out prompts)", title_justify="left")
    for column in ("arm", "updates", "RM active at end", "RM versions (promoted)", "proxy change", "gold initial",
                   "gold final", "gold gain", "KL at end", "RM accuracy on final policy's pairs"):
        table.add_column(column, justify="right")
    for arm, s in results.items():
        versions = s.get("rm_versions", [])
        promoted = sum(v["status"] in ("watching", "active") for v in versions)
        accuracy = ", ".join(f"{v['version']} {v['accuracy_on_current_policy']:.0%}" for v in versions
                             if v.get("accuracy_on_current_policy") is not None)
        table.add_row(arm, str(s["updates"]), s.get("rm_active_at_end", "v1"),
                      f"{len(versions)} ({promoted})" if arm == "online" else "1 (frozen)",
                      f"{s['reward_last'] - s['reward_first']:+.3f}", f"{s['gold_initial_policy']:+.3f}",
                      f"{s['gold_final_policy']:+.3f}", f"{gold_gain(s):+.3f}", f"{s['kl_last']:.2f}",
                      f"{accuracy} ({s.get('current_policy_pairs', 0)} pairs)")
    console.print(table)
    if {"frozen", "online"} <= results.keys():
        difference = gold_gain(results["online"]) - gold_gain(results["frozen"])
        console.print(f"gold gain, online minus frozen: {difference:+.3f} (one run each on a shared CPU: noisy)")


if __name__ == "__main__":
    main()
