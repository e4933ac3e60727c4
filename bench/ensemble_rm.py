"""PPO against the demo's single reward model against PPO against a penalized
ensemble of reward models (issue #14 item 5; Coste et al. 2023), same wall
time and the same KL controller.

``python -m bench.ensemble_rm [--seconds 300] [--members 3] [--penalty 1.0] [--full] [--workdir DIR]``

Models: the demo's (``services.demo_models.prepare_models``; quick scale
unless ``--full``); RM v1 is the demo's, and ``--members - 1`` more are
trained on the same labelled pairs from the same backbone with other seeds
(head initialization and data order: the ensemble's disagreement). Arms, one
after the other, each ``services.demo.run`` stopped ``--seconds`` after its
stack is up, with the demo's adaptive KL controller (same target, horizon and
initial β: the same KL budget; the KL reached is reported):

- ``single``: the worker's reward is RM v1's score.
- ``ensemble``: the reward service runs a reward spec (``--reward-spec-file``,
  ``arbiter.reward.composite``) of one ensemble term over the K versions,
  each normalized by its own calibration statistics, valued
  ``mean - penalty * std``.

Measured the same way for both, on ``--eval-samples`` samples per held-out
prompt of the initial and the final policy: the gold gain (VADER), the proxy
gain (the arm's own reward, as the reward service scores it), both in units
of their spread over the initial policy's samples, and the proxy-gold gap =
proxy gain - gold gain in those units (how much of what the policy learned
to please the proxy the gold scorer does not see: over-optimization). Table to
stdout and WORKDIR/ensemble_rm.json. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

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


def gains(s: dict) -> dict:
    gold = (s["gold_final_policy"] - s["gold_initial_policy"]) / (s["gold_initial_sd"] or float("nan"))
    proxy = (s["proxy_final_policy"] - s["proxy_initial_policy"]) / (s["proxy_initial_sd"] or float("nan"))
    return {"gold_gain": s["gold_final_policy"] - s["gold_initial_policy"], "gold_gain_sd": gold,
            "proxy_gain_sd": proxy, "proxy_gold_gap_sd": proxy - gold}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.ensemble_rm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="training wall-clock budget of each arm")
    parser.add_argument("--members", type=int, default=3, help="reward models in the ensemble (v1 among them)")
    parser.add_argument("--penalty", type=float, default=1.0, help="k of mean - k * std")
    parser.add_argument("--full", action="store_true", help="the full demo's models (default: --quick's)")
    parser.add_argument("--eval-samples", type=int, default=16, help="evaluation samples per held-out prompt")
    parser.add_argument("--pretrain-seconds", type=float, help="the policy's pretraining budget (default: the scale's)")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench-ensemble-rm"))
    args = parser.parse_args(argv)
    if args.members < 2:
        parser.error(f"--members {args.members}: an ensemble needs at least 2")

    from bench.online_rm import prepare_arms
    from services.demo import run

    console, workdir, models = prepare_arms(args)
    # The single arm's RM is the ensemble's first member: one RM against that
    # RM with company.
    members = train_members(models, not args.full, args.members, console)
    spec = write_spec(workdir / "ensemble-spec.yaml", members, args.penalty)
    ensemble = {"reward": {"reward_spec_file": str(spec), "max_loaded_versions": args.members + 1}}
    results = {}
    for arm, extra in (("single", {}), ("ensemble", ensemble)):
        console.rule(f"{arm}: {args.seconds:.0f}s of training")
        summary = run(workdir / arm, 100_000, not args.full, console, seconds=args.seconds, models=models,
                      eval_samples=args.eval_samples, stack_extra=extra)
        results[arm] = {**summary, **gains(summary)}
    report(results, args, console)
    (workdir / "ensemble_rm.json").write_text(json.dumps(
        {"seconds": args.seconds, "members": [str(m) for m in members], "penalty": args.penalty, **results},
        indent=2, default=str))
    return results


def report(results: dict, args, console: Console) -> None:
    table = Table(title=f"PPO against one RM vs a penalized ensemble ({args.members} RMs, mean - {args.penalty:g}·std), "
                        f"{args.seconds:.0f}s each, {args.eval_samples} samples x held-out prompts",
                  title_justify="left")
    for column in ("arm", "updates", "KL at end", "gold initial", "gold final", "gold gain", "gold gain (sd)",
                   "proxy gain (sd)", "proxy-gold gap (sd)"):
        table.add_column(column, justify="right")
    for arm, s in results.items():
        table.add_row(arm, str(s["updates"]), f"{s['kl_last']:.2f}", f"{s['gold_initial_policy']:+.3f}",
                      f"{s['gold_final_policy']:+.3f}", f"{s['gold_gain']:+.3f}", f"{s['gold_gain_sd']:+.2f}",
                      f"{s['proxy_gain_sd']:+.2f}", f"{s['proxy_gold_gap_sd']:+.2f}")
    console.print(table)
    console.print("one run per arm on a shared CPU: noisy; the proxies differ (one RM vs the ensemble's "
                  "penalized mean), so each gap is in its own proxy's units of spread")


if __name__ == "__main__":
    main()
