"""PPO against the demo's single reward model against PPO against a penalized
ensemble of reward models (issue #14 item 5; Coste et al. 2023), compared at
the same KL budget, repeated over seeds.

``python -m bench.ensemble_rm [--seconds 300] [--seeds 3] [--members 3] [--penalty 1.0]
[--member-diversity SCHEME] [--members-only [--schemes A,B]] [--full] [--workdir DIR]``

Models: the demo's (``services.demo_models.prepare_models``; quick scale
unless ``--full``); the single arm's RM is the demo's v1. The ensemble's
``--members`` RMs differ as ``--member-diversity`` says (``SCHEMES``): every
member j has its own seed j (head initialization and data order) and is
trained on the demo's labelled pairs with v1's held-out split, and

- ``seed``: nothing else (member 0 is v1): near-copies;
- ``bootstrap``: each on its own bootstrap resample of the training pairs
  (bagging; ``RMTrainConfig.train_subset``);
- ``disjoint``: each on its own 1/K shard of the training pairs;
- ``pretrain``: each from its own backbone, the demo's policy pretrained
  again with seed j for the same time (member 0 is v1): what Eisenstein et
  al. (2023) found makes ensembles disagree where it matters;
- ``pretrain+bootstrap``: both.

Before any PPO run the members are diagnosed without one (cheap: a minute at
quick scale): they and v1 score fresh gold-labelled pairs of held-out and
PPO prompts sampled from the initial policy at temperature 1 and, off its
distribution, at ``--off-temperature`` (and of ``--policy-dir``'s samples
when given, e.g. a PPO-trained policy), and ``arbiter.rm.agreement.
ensemble_diversity`` reports each member's accuracy, their mean pairwise
disagreement, the accuracy of the mean and of ``mean - penalty * std``,
whether the std is large where the mean over-scores a response (correlation
with mean minus gold, both standardized) and where the mean orders a pair
wrongly (AUC). ``--members-only`` does this for every scheme of
``--schemes`` side by side and stops: the evidence for the default scheme
(``DEFAULT_SCHEME``). Fresh prompts, because the held-out accuracy each
member prints while training is on pairs that share prompts and completions
with its training pairs: 90 % there against 72 % on fresh pairs at full
scale, and 74 % against chance at quick scale.

For every seed (the stack's: sampling, prompt order, training), both arms one
after the other, each ``services.demo.run`` stopped ``--seconds`` after its
stack is up, with the demo's adaptive KL controller:

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
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from bench.online_rm import add_seed_flags, mean_sd, prepare_arms, seeds_of

REPO = Path(__file__).resolve().parents[1]


# Measured with --members-only --full and 45 s of pretraining (before it was
# counted in steps; 3 members, k = 1,
# fresh pairs of 192 unseen prompts; T=1 / T=1.6): accuracy of the penalized
# mean pretrain 72.1 / 67.7 %, seed 71.5 / 66.6, bootstrap 69.5 / 65.3,
# disjoint 70.4 / 66.3, pretrain+bootstrap 70.7 / 64.8 (v1 alone 71.9 /
# 65.0). No scheme's std flagged the mean's errors (|corr| <= 0.13, AUC
# 0.50-0.58); pretrain-diverse members gave the most accurate mean, most of
# all off distribution. At quick scale every RM ranks fresh pairs at chance
# (47-53 %), so no scheme can be told apart there.
DEFAULT_SCHEME = "pretrain"
SCHEMES = ("seed", "bootstrap", "disjoint", "pretrain", "pretrain+bootstrap")


@dataclass(frozen=True)
class Member:
    label: str  # its version label in the reward spec
    path: Path
    # What set it apart, for the table.
    note: str


def member_overrides(scheme: str, j: int, members: int) -> dict:
    """``RMTrainConfig`` fields of member j under ``scheme`` (beyond its seed):
    every member holds out v1's split (split_seed 0)."""
    data = scheme.removeprefix("pretrain").removeprefix("+") or "seed"
    if data == "bootstrap":
        return {"split_seed": 0, "train_subset": "bootstrap", "subset_seed": j}
    if data == "disjoint":
        # One shared partition (subset_seed 0), one shard each.
        return {"split_seed": 0, "train_subset": "shard", "subset_seed": 0, "shard_index": j, "shard_count": members}
    return {"split_seed": 0}


def train_members(models, quick: bool, members: int, scheme: str, console: Console,
                  pretrain_steps: int | None = None, trained: dict | None = None) -> list[Member]:
    """The ensemble's members under ``scheme``; v1 itself where a member's
    recipe is v1's (seed 0, all pairs, the demo's backbone). ``trained``:
    members already trained this run, by recipe (schemes share some)."""
    from arbiter.rm.train import train_reward_model
    from services.demo_models import FULL, QUICK, pretrained_policy, rm_config

    out = Path(models.policy).parent
    backbones = scheme.startswith("pretrain")
    steps = pretrain_steps if pretrain_steps is not None else (QUICK if quick else FULL).pretrain_steps
    # A registry name per scheme: its members do not pile up among the demo's versions.
    name = "ensemble-" + scheme.replace("+", "-")
    trained = {} if trained is None else trained
    result = []
    for j in range(members):
        overrides = member_overrides(scheme, j, members)
        if j == 0 and set(overrides) == {"split_seed"}:
            result.append(Member(Path(models.reward).name, Path(models.reward), "RM v1"))
            continue
        backbone = Path(models.policy)
        if backbones and j > 0:
            backbone = pretrained_policy(out / f"backbone-seed{j}", steps, console, seed=j)
        recipe = (str(backbone), j, tuple(sorted(overrides.items())))
        if recipe not in trained:
            version = train_reward_model(rm_config(out, quick, seed=j, name=name, model_dir=str(backbone),
                                                   **overrides), console=console)
            m = version.metrics
            note = (f"seed {j}, {m['train_distinct_examples']}/{m['train_examples']} distinct pairs"
                    + (f", backbone seed {j}" if backbones and j > 0 else ""))
            console.print(f"   {scheme} member {j} ({note}): held-out accuracy "
                          f"{m.get('eval_accuracy', float('nan')):.1%}")
            trained[recipe] = Member(f"{name}-{version.version.version}", version.version.path, note)
        result.append(trained[recipe])
    return result


def write_spec(path: Path, members: list[Member], active: Path, penalty: float) -> Path:
    """The service's --model (``active``, v1) is loaded under its own
    version; every other member loads at startup under its label."""
    path.write_text(yaml.safe_dump({
        "name": "penalized-ensemble",
        "models": {m.label: str(m.path) for m in members if m.path != active},
        "terms": [{"name": "ensemble", "weight": 1.0,
                   "ensemble": {"versions": [m.label for m in members], "uncertainty_penalty": penalty,
                                "normalize": True}}],
    }))
    return path


# -- diagnostics without PPO -----------------------------------------------------


def diagnostic_sets(models, args, console: Console) -> dict[str, dict]:
    """Gold-labelled pairs (the demo's near-tie rule) of fresh samples of
    prompts no RM trained on: {set name: {"inputs", "gold", "pairs"}}."""
    from arbiter.types import RewardInput
    from services.demo_models import label_pairs, sample_completions
    from services.worker.gold import make_gold_scorer

    gold = make_gold_scorer(models.gold or "vader")
    prompts = list(models.eval_prompts) + [json.loads(line)["prompt"] for line in
                                           Path(models.prompts).read_text().splitlines() if line.strip()]
    sources = [("initial policy, T=1", models.policy, 1.0),
               (f"initial policy, T={args.off_temperature:g}", models.policy, args.off_temperature)]
    if args.policy_dir:
        sources.append((f"{Path(args.policy_dir).name}, T=1", Path(args.policy_dir), 1.0))
    sets = {}
    for name, policy, temperature in sources:
        completions = sample_completions(policy, prompts, args.diagnostic_samples, models.max_new_tokens, seed=11,
                                         temperature=temperature)
        rows = label_pairs(prompts, completions, gold)
        index: dict[tuple[str, str], int] = {}
        for row in rows:
            for key in ((row["prompt"], row["chosen"]), (row["prompt"], row["rejected"])):
                index.setdefault(key, len(index))
        inputs = [RewardInput(prompt=p, response=c) for p, c in index]
        sets[name] = {"inputs": inputs, "gold": [gold(p + c) for p, c in index],
                      "pairs": [(index[(r["prompt"], r["chosen"])], index[(r["prompt"], r["rejected"])]) for r in rows]}
        console.print(f"   diagnostic set {name!r}: {len(rows)} gold-labelled pairs of {len(inputs)} samples "
                      f"({len(prompts)} prompts)")
    return sets


def normalized_scores(path: Path, inputs) -> list[float]:
    """A version's scores as a normalized ensemble term sees them: the
    service's encoding and forward, then its own normalization statistics."""
    from arbiter.hf import read_metadata
    from arbiter.reward.model import RewardModel
    from arbiter.types import Truncation

    model = RewardModel.load(path)
    stats = read_metadata(path).normalization
    ids = [e.token_ids for e in model.encode(inputs, Truncation.LEFT)]
    raw = [s for start in range(0, len(ids), 64) for s in model.forward(ids[start:start + 64])]
    return [(s - stats.mean) / stats.std for s in raw]


def diagnose(members: list[Member], sets: dict[str, dict], penalty: float,
             cache: dict[tuple[str, str], list[float]]) -> dict[str, dict]:
    """``ensemble_diversity`` of the members on every set ({set: its JSON})."""
    from arbiter.rm.agreement import ensemble_diversity

    out = {}
    for name, data in sets.items():
        scores = []
        for m in members:
            key = (str(m.path), name)
            if key not in cache:
                cache[key] = normalized_scores(m.path, data["inputs"])
            scores.append(cache[key])
        out[name] = ensemble_diversity(scores, data["pairs"], data["gold"], penalty).to_json()
    return out


def diagnostics_table(results: dict[str, dict], single: dict[str, dict], penalty: float, console: Console) -> None:
    """``results``: {scheme: {set: diversity JSON}}; ``single``: {set: v1's}."""
    table = Table(title=f"Ensemble members without PPO: accuracy on fresh gold-labelled pairs, disagreement, and "
                        f"whether the std flags the mean's errors (k = {penalty:g})", title_justify="left")
    for column in ("scheme", "pairs", "members' accuracy", "v1", "mean", f"mean − {penalty:g}·std",
                   "disagreement", "corr(std, over-score)", "AUC(spread → wrong)"):
        table.add_column(column, justify="right")
    for set_name in single:
        table.add_row(f"[bold]{set_name}", *[""] * 8)
        for scheme, by_set in results.items():
            d = by_set[set_name]
            table.add_row(scheme, str(d["pairs"]), " ".join(f"{a:.1%}" for a in d["member_accuracy"]),
                          f"{single[set_name]:.1%}", f"{d['mean_accuracy']:.1%}", f"{d['penalized_accuracy']:.1%}",
                          f"{d['disagreement']:.1%}", f"{d['std_overestimate_corr']:+.3f}",
                          f"{d['wrong_pair_auc']:.3f}")
    console.print(table)
    console.print("corr > 0 and AUC > 0.5: the members disagree most where their mean is wrong, which is what "
                  "subtracting k·std needs; pairs of one prompt are not independent.")


def run_diagnostics(models, args, schemes: list[str], console: Console) -> tuple[dict, dict]:
    """({scheme: its members}, {"schemes": {scheme: {set: diversity}}, "v1": {set: accuracy}})."""
    from arbiter.rm.agreement import order_credit

    sets = diagnostic_sets(models, args, console)
    cache: dict = {}
    members, results, trained = {}, {}, {}
    for scheme in schemes:
        console.rule(f"members: {scheme}")
        members[scheme] = train_members(models, not args.full, args.members, scheme, console, args.pretrain_steps,
                                        trained)
        results[scheme] = diagnose(members[scheme], sets, args.penalty, cache)
    v1 = {}
    for name, data in sets.items():
        key = (str(models.reward), name)
        if key not in cache:
            cache[key] = normalized_scores(Path(models.reward), data["inputs"])
        margins = [cache[key][b] - cache[key][w] for b, w in data["pairs"]]
        v1[name] = sum(order_credit(m) for m in margins) / len(margins)
    diagnostics_table(results, v1, args.penalty, console)
    return members, {"schemes": results, "v1": v1,
                     "members": {s: [m.__dict__ | {"path": str(m.path)} for m in ms] for s, ms in members.items()}}


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
    from services.demo_models import pretrain_steps_arg

    parser = argparse.ArgumentParser(prog="python -m bench.ensemble_rm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="training wall-clock budget of each run")
    add_seed_flags(parser)
    parser.add_argument("--members", type=int, default=3, help="reward models in the ensemble")
    parser.add_argument("--member-diversity", choices=SCHEMES, default=DEFAULT_SCHEME,
                        help="how the members differ beyond their seeds (see the module's help)")
    parser.add_argument("--members-only", action="store_true",
                        help="train and diagnose the members of every --schemes side by side; no PPO run")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="the schemes --members-only compares")
    parser.add_argument("--diagnostic-samples", type=int, default=8,
                        help="samples per prompt of the diagnostic pairs (pairs: up to n(n-1)/2 per prompt)")
    parser.add_argument("--off-temperature", type=float, default=1.6,
                        help="sampling temperature of the off-distribution diagnostic set")
    parser.add_argument("--policy-dir", help="also diagnose on this policy's samples (e.g. a PPO-trained one)")
    parser.add_argument("--penalty", type=float, default=1.0, help="k of mean - k * std")
    parser.add_argument("--kl-levels", default="1,2,3,4,5,6,8,10,12",
                        help="KL budgets (nats per sample) at which the arms are compared: each arm's first "
                             "version reaching a level is measured; the table uses the highest both reached")
    parser.add_argument("--full", action="store_true", help="the full demo's models (default: --quick's)")
    parser.add_argument("--eval-samples", type=int, default=16, help="evaluation samples per held-out prompt")
    parser.add_argument("--pretrain-steps", type=pretrain_steps_arg,
                        help="the policy's pretraining steps (default: the scale's)")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench-ensemble-rm"))
    args = parser.parse_args(argv)
    if args.members < 2:
        parser.error(f"--members {args.members}: an ensemble needs at least 2")
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()] if args.members_only else \
        [args.member_diversity]
    for scheme in schemes:
        if scheme not in SCHEMES:
            parser.error(f"--schemes: {scheme!r} is not one of {', '.join(SCHEMES)}")
    if args.diagnostic_samples < 2:
        parser.error(f"--diagnostic-samples {args.diagnostic_samples}: a pair needs 2")
    if args.off_temperature <= 0:
        parser.error(f"--off-temperature {args.off_temperature}: must be > 0")
    seeds = seeds_of(args)
    kl_levels = [float(x) for x in args.kl_levels.split(",") if x.strip()]

    console, workdir, models = prepare_arms(args)
    by_scheme, diagnostics = run_diagnostics(models, args, schemes, console)
    (workdir / "ensemble_members.json").write_text(json.dumps(diagnostics, indent=2, default=str))
    if args.members_only:
        return {"diagnostics": diagnostics}

    from services.demo import run

    members = by_scheme[args.member_diversity]
    spec = write_spec(workdir / "ensemble-spec.yaml", members, Path(models.reward), args.penalty)
    # --model and every member loaded (and pinned), and one more.
    ensemble = {"reward": {"reward_spec_file": str(spec), "max_loaded_versions": args.members + 2}}
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
        {"seconds": args.seconds, "seeds": seeds, "member_diversity": args.member_diversity,
         "members": [str(m.path) for m in members], "penalty": args.penalty, "kl_levels": kl_levels,
         "diagnostics": diagnostics, "runs": runs}, indent=2, default=str))
    return {"runs": runs, "diagnostics": diagnostics}


def report(runs: list[dict], args, console: Console) -> None:
    table = Table(title=f"PPO against one RM vs a penalized ensemble ({args.members} RMs, "
                        f"{args.member_diversity}, mean - {args.penalty:g}·std): "
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
