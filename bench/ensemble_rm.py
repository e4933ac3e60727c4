"""PPO against the demo's single reward model against PPO against a penalized
ensemble of reward models (issue #14 item 5; Coste et al. 2023), compared at
the same KL budget, repeated over seeds.

``python -m bench.ensemble_rm [--seconds 300] [--seeds 3] [--members 3] [--penalty 1.0] [--full] [--workdir DIR]``

Models: the demo's (``services.demo_models.prepare_models``; quick scale
unless ``--full``); RM v1 is the demo's, and ``--members - 1`` more are
trained on the same labelled pairs from the same backbone with other seeds
(head initialization and data order: the ensemble's disagreement). For every
seed (the stack's: sampling, prompt order, training), both arms one after the
other, each ``services.demo.run`` stopped ``--seconds`` after its stack is up,
with the demo's adaptive KL controller:

- ``single``: the worker's reward is RM v1's score.
- ``ensemble``: the reward service runs a reward spec (``--reward-spec-file``,
  ``arbiter.reward.composite``) of one ensemble term over the K versions,
  each normalized by its own calibration statistics, valued
  ``mean - penalty * std``.

The same controller settings are not the same KL budget: the arms reach
different KLs in the same time (one run: 10.5 vs 7.3 nats), and gold gain
and over-optimization both grow with KL. So the arms are compared at a
matched KL: each run measures the first policy version whose KL (mean of the
last 3 updates) reached each of ``--kl-levels``, and a seed's comparison uses
the highest level both arms reached. Measured the same way for each policy,
on ``--eval-samples`` samples per held-out prompt: the gold gain (VADER) and
the proxy gain (the arm's own reward, as the reward service scores it) over
the initial policy, both in units of their spread over the initial policy's
samples, and the proxy-gold gap = proxy gain - gold gain in those units (what
the policy learned to please the proxy that the gold scorer does not see:
over-optimization). The end of the run (same wall time) is reported too.
Per-seed rows and mean ± sd over seeds to stdout and WORKDIR/ensemble_rm.json.
Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from bench.online_rm import add_seed_flags, mean_sd, prepare_arms, seeds_of

REPO = Path(__file__).resolve().parents[1]


def train_members(models, quick: bool, members: int, console: Console) -> list[Path]:
    """RM v1 (the demo's) and ``members - 1`` more from other seeds."""
    from arbiter.rm.train import train_reward_model
    from services.demo_models import rm_config

    paths = [Path(models.reward)]
    for seed in range(1, members):
        trained = train_reward_model(rm_config(Path(models.policy).parent, quick, seed=seed), console=console)
        console.print(f"   ensemble member {trained.version.version} (seed {seed}): held-out accuracy "
                      f"{trained.metrics.get('eval_accuracy', float('nan')):.1%}")
        paths.append(trained.version.path)
    return paths


def write_spec(path: Path, members: list[Path], penalty: float) -> Path:
    """The first member is the service's --model (loaded and active under its
    version); the others load at startup under theirs."""
    names = [member.name for member in members]
    path.write_text(yaml.safe_dump({
        "name": "penalized-ensemble",
        "models": {name: str(member) for name, member in zip(names[1:], members[1:])},
        "terms": [{"name": "ensemble", "weight": 1.0,
                   "ensemble": {"versions": names, "uncertainty_penalty": penalty, "normalize": True}}],
    }))
    return path


def gains(s: dict, name: str = "final") -> dict:
    """Gold and proxy gain of policy ``name`` (``final``, or ``klL``: the first
    version at KL level L) over the initial policy, each in units of its
    spread over the initial policy's samples, and their gap."""
    if f"gold_{name}_policy" not in s:
        return {}
    gold = (s[f"gold_{name}_policy"] - s["gold_initial_policy"]) / (s["gold_initial_sd"] or float("nan"))
    proxy = (s[f"proxy_{name}_policy"] - s["proxy_initial_policy"]) / (s["proxy_initial_sd"] or float("nan"))
    return {"gold_gain": s[f"gold_{name}_policy"] - s["gold_initial_policy"], "gold_gain_sd": gold,
            "proxy_gain_sd": proxy, "proxy_gold_gap_sd": proxy - gold}


def matched(results: dict[str, dict]) -> dict:
    """The highest KL level both arms of a seed reached, and each arm's gains
    at the first version that reached it (the same KL budget spent)."""
    common = [level for level in results["single"].get("kl_crossings", {})
              if level in results["ensemble"].get("kl_crossings", {})]
    if not common:
        return {}
    level = max(common, key=float)
    return {"level": float(level), **{arm: {**s["kl_crossings"][level], **gains(s, f"kl{level}")}
                                      for arm, s in results.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.ensemble_rm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="training wall-clock budget of each run")
    add_seed_flags(parser)
    parser.add_argument("--members", type=int, default=3, help="reward models in the ensemble (v1 among them)")
    parser.add_argument("--penalty", type=float, default=1.0, help="k of mean - k * std")
    parser.add_argument("--kl-levels", default="1,2,3,4,5,6,8,10,12",
                        help="KL budgets (nats per sample) at which the arms are compared: each arm's first "
                             "version reaching a level is measured; the table uses the highest both reached")
    parser.add_argument("--full", action="store_true", help="the full demo's models (default: --quick's)")
    parser.add_argument("--eval-samples", type=int, default=16, help="evaluation samples per held-out prompt")
    parser.add_argument("--pretrain-seconds", type=float, help="the policy's pretraining budget (default: the scale's)")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench-ensemble-rm"))
    args = parser.parse_args(argv)
    if args.members < 2:
        parser.error(f"--members {args.members}: an ensemble needs at least 2")
    seeds = seeds_of(args)
    kl_levels = [float(x) for x in args.kl_levels.split(",") if x.strip()]

    from services.demo import run

    console, workdir, models = prepare_arms(args)
    # The single arm's RM is the ensemble's first member: one RM against that
    # RM with company.
    members = train_members(models, not args.full, args.members, console)
    spec = write_spec(workdir / "ensemble-spec.yaml", members, args.penalty)
    ensemble = {"reward": {"reward_spec_file": str(spec), "max_loaded_versions": args.members + 1}}
    runs = []
    for seed in seeds:
        results = {}
        for arm, extra in (("single", {}), ("ensemble", ensemble)):
            console.rule(f"seed {seed}, {arm}: {args.seconds:.0f}s of training")
            summary = run(workdir / f"seed{seed}" / arm, 100_000, not args.full, console, seconds=args.seconds,
                          models=models, eval_samples=args.eval_samples, stack_extra=extra, seed=seed,
                          kl_levels=kl_levels)
            results[arm] = {**summary, **gains(summary)}
        runs.append({"seed": seed, **results, "matched": matched(results)})
    report(runs, args, console)
    (workdir / "ensemble_rm.json").write_text(json.dumps(
        {"seconds": args.seconds, "seeds": seeds, "members": [str(m) for m in members], "penalty": args.penalty,
         "kl_levels": kl_levels, "runs": runs}, indent=2, default=str))
    return {"runs": runs}


def report(runs: list[dict], args, console: Console) -> None:
    table = Table(title=f"PPO against one RM vs a penalized ensemble ({args.members} RMs, mean - {args.penalty:g}·std): "
                        f"at the same KL budget (the first version of each arm reaching the highest KL level both "
                        f"reached) and at the end of {args.seconds:.0f}s; {args.eval_samples} samples x held-out "
                        f"prompts", title_justify="left")
    for column in ("seed", "arm", "KL budget", "reached at (update, s)", "gold gain", "gold gain (sd)",
                   "proxy gain (sd)", "proxy-gold gap (sd)", "updates", "KL at end", "gold gain at end",
                   "gap at end (sd)"):
        table.add_column(column, justify="right")
    for r in runs:
        m = r["matched"]
        for arm in ("single", "ensemble"):
            s, at = r[arm], m.get(arm, {})
            table.add_row(
                str(r["seed"]), arm, f"{m['level']:g}" if m else "none", 
                f"{at['step']}, {at['seconds']:.0f}" if at else "-",
                f"{at['gold_gain']:+.3f}" if at else "-", f"{at['gold_gain_sd']:+.2f}" if at else "-",
                f"{at['proxy_gain_sd']:+.2f}" if at else "-", f"{at['proxy_gold_gap_sd']:+.2f}" if at else "-",
                str(s["updates"]), f"{s['kl_last']:.2f}", f"{s['gold_gain']:+.3f}", f"{s['proxy_gold_gap_sd']:+.2f}")
    console.print(table)
    summary = Table(title="Over seeds: mean ± sd", title_justify="left")
    for column in ("", "KL budget", "gold gain at budget", "proxy-gold gap at budget (sd)", "gold gain at end",
                   "KL at end"):
        summary.add_column(column, justify="right")
    with_budget = [r for r in runs if r["matched"]]
    for arm in ("single", "ensemble"):
        summary.add_row(arm, mean_sd([r["matched"]["level"] for r in with_budget]),
                        mean_sd([r["matched"][arm]["gold_gain"] for r in with_budget]),
                        mean_sd([r["matched"][arm]["proxy_gold_gap_sd"] for r in with_budget]),
                        mean_sd([r[arm]["gold_gain"] for r in runs]), mean_sd([r[arm]["kl_last"] for r in runs]))
    summary.add_row("ensemble − single (same seed)", "",
                    mean_sd([r["matched"]["ensemble"]["gold_gain"] - r["matched"]["single"]["gold_gain"]
                             for r in with_budget]),
                    mean_sd([r["matched"]["ensemble"]["proxy_gold_gap_sd"] - r["matched"]["single"]["proxy_gold_gap_sd"]
                             for r in with_budget]),
                    mean_sd([r["ensemble"]["gold_gain"] - r["single"]["gold_gain"] for r in runs]), "")
    console.print(summary)
    console.print("A shared CPU: absolute numbers move with load. The proxies differ (one RM vs the ensemble's "
                  "penalized mean), so each gap is in its own proxy's units of spread.")


if __name__ == "__main__":
    main()
