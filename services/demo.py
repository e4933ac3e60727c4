"""``make demo``: the whole RLHF loop on this machine, as separate processes.

1. models: a policy, a reward model and prompts (built locally, no downloads);
2. ``arbiter up``'s stack: broker, reward/reference/policy services, a rollout
   worker and the PPO trainer;
3. a live view of the training curve while the policy service hot-swaps each
   new version;
4. a summary table and a PNG of reward, gold score and KL per iteration.

With ``--online-rm`` (services/demo_online.py) a simulated annotator labels
live completions with the gold scorer while PPO runs, and ``arbiter rm loop``
retrains and promotes reward-model versions from them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from arbiter.v1 import common_pb2, common_pb2_grpc
from services.demo_models import DemoModels, prepare_models
from services.demo_online import (
    FULL_ONLINE, QUICK_ONLINE, Annotator, OnlineRMScale, correct_on_pairs, fresh_pairs, gate_text,
    rm_loop_config, rm_versions, seed_registry,
)
from services.stack import Stack, StackConfig, StackError, prune_policy_versions, trainer_policies_dir


# The demo fails loudly instead of waiting forever on a stuck pipeline.
STALL_SECONDS = 300


def read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_table(rows: list[dict], total: int, started: float) -> Table:
    table = Table(title=f"PPO through the services: {len(rows)}/{total} updates, {time.monotonic() - started:.0f}s",
                  title_justify="left")
    online = any("rm_version" in row for row in rows)
    for column in ("step", "policy version", *(("RM",) if online else ()), "RM reward", "gold", "KL", "β", "entropy",
                   "staleness", "rollouts/s"):
        table.add_column(column, justify="right")
    for i, row in enumerate(rows[-12:]):
        index = len(rows) - len(rows[-12:]) + i
        previous = rows[index - 1] if index > 0 else None
        rate = row["rollouts"] / (row["time"] - previous["time"]) if previous else float("nan")
        gold = f"{row['gold_score']:+.3f}" if row.get("gold_score") is not None else "-"
        table.add_row(
            str(row["step"]), row["policy_version"], *((row.get("rm_version", "-"),) if online else ()),
            f"{row['reward_raw']:+.4f}", gold, f"{row['kl']:.3f}",
            f"{row['kl_coef']:.3f}", f"{row['entropy']:.2f}", staleness_text(row), f"{rate:.1f}",
        )
    return table


def staleness_text(row: dict) -> str:
    """Trained rollouts by staleness, "lag:count" (versions between sampling and training)."""
    counts = row.get("staleness_counts")
    if not counts:
        return f"{row['staleness']:.2f}"
    return " ".join(f"{lag}:{n}" for lag, n in sorted(counts.items(), key=lambda kv: int(kv[0])))


def staleness_totals(rows: list[dict]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for row in rows:
        for lag, n in (row.get("staleness_counts") or {}).items():
            totals[lag] = totals.get(lag, 0) + n
    return dict(sorted(totals.items(), key=lambda kv: int(kv[0])))


def rm_table(versions: list[dict], annotator: dict) -> Table:
    """The loop's reward-model versions and its gate results, as they happen."""
    table = Table(title=f"Reward model online: {annotator['submitted']} preferences submitted by the simulated "
                        f"annotator from live completions ({annotator['near_ties']} near-ties not labelled)",
                  title_justify="left")
    for column in ("RM version", "parent", "trained on", "held out", "status", "gates", "why"):
        table.add_column(column, justify="right" if column in ("trained on", "held out") else "left")
    for row in versions[-8:]:
        table.add_row(row["version"], row["parent"] or "-", str(row["trained_on"] or "-"),
                      str(row["held_out"] or "-"), row["status"], gate_text(row),
                      (row["reason"] or "")[:60])
    return table


def summarize(rows: list[dict], console: Console) -> dict:
    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else float("nan")

    k = max(1, len(rows) // 4)
    first, last = rows[:k], rows[-k:]
    summary = {
        "updates": len(rows),
        "reward_first": mean(r["reward_raw"] for r in first),
        "reward_last": mean(r["reward_raw"] for r in last),
        "gold_first": mean(r.get("gold_score") for r in first),
        "gold_last": mean(r.get("gold_score") for r in last),
        "kl_last": mean(r["kl"] for r in last),
        "kl_max": max(r["kl"] for r in rows),
        "final_version": rows[-1]["policy_version"],
        # Trained rollouts by staleness over the run (versions between sampling and training).
        "staleness_counts": staleness_totals(rows),
    }
    table = Table(title=f"Summary: first vs last {k} update(s)", title_justify="left")
    for column in ("", "first", "last", "change"):
        table.add_column(column, justify="right")
    table.add_row("RM reward (proxy)", f"{summary['reward_first']:+.4f}", f"{summary['reward_last']:+.4f}",
                  f"{summary['reward_last'] - summary['reward_first']:+.4f}")
    if rows[0].get("gold_score") is not None:
        table.add_row("gold score", f"{summary['gold_first']:+.4f}", f"{summary['gold_last']:+.4f}",
                      f"{summary['gold_last'] - summary['gold_first']:+.4f}")
    table.add_row("KL to reference (nats/sample)", f"{mean(r['kl'] for r in first):.4f}", f"{summary['kl_last']:.4f}",
                  f"max {summary['kl_max']:.4f}")
    console.print(table)
    if summary["staleness_counts"]:
        console.print("trained rollouts by staleness (policy versions between sampling and training): "
                      + ", ".join(f"{lag}: {n}" for lag, n in summary["staleness_counts"].items()))
    return summary


# The demo's stated targets: the RM learned the simulated annotators'
# preference, and PPO against it moved the hidden gold score at bounded KL.
# The RM's accuracy is on pairs of prompts it never trained on (rm train's
# eval_split "prompt"): 72.8 % on the demo's data (seed 0, with backbones of
# 1,401 and 3,000 pretraining steps alike), where chance is 50 %. The 85 % this
# target used to be was set on held-out pairs whose prompts also trained
# (90.4 % there), a split that overstated accuracy.
RM_ACCURACY_TARGET = 0.70
GOLD_GAIN_TARGET = 0.3
KL_BOUND = 15.0


EVAL_SAMPLES = 4


def evaluate_gold(models: DemoModels, final_dir: Path, samples: int = EVAL_SAMPLES,
                  reward_target: str | None = None, more: dict[str, Path] | None = None) -> dict:
    """The target compares policies, not training batches: both policies
    sample the same held-out prompts, and the gold scorer judges. With
    ``reward_target`` the reward service's unpinned score (the run's proxy:
    its active RM, or its reward spec) of the same samples too, and each
    score's spread over the initial policy's samples (the unit of a proxy-gold
    gap). ``more``: other policies measured alike, by name (``gold_NAME_policy``...)."""
    from statistics import mean, pstdev

    from services.demo_models import sample_completions
    from services.worker.gold import make_gold_scorer

    gold = make_gold_scorer(models.gold)
    out = {}
    for name, model_dir in (("initial", models.policy), ("final", final_dir), *(more or {}).items()):
        completions = sample_completions(model_dir, models.eval_prompts, samples, models.max_new_tokens, seed=7)
        scores = [gold(c) for group in completions for c in group]
        out[f"gold_{name}_policy"] = mean(scores)
        out[f"gold_{name}_sd"] = pstdev(scores)
        if reward_target is not None:
            from arbiter.types import RewardInput
            from services.reward.client import RewardClient

            # An empty completion is no input to a reward model (the service
            # refuses it); the proxy is measured on the others.
            inputs = [RewardInput(prompt=p, response=c) for p, group in zip(models.eval_prompts, completions)
                      for c in group if c]
            with RewardClient(reward_target, timeout_s=120) as client:
                proxy = [r.score for start in range(0, len(inputs), 64)
                         for r in client.score(inputs[start:start + 64], normalize=True, truncation="left").results]
            out[f"proxy_{name}_policy"] = mean(proxy)
            out[f"proxy_{name}_sd"] = pstdev(proxy)
    return out


def report_targets(summary: dict, console: Console) -> None:
    accuracy = summary.get("rm_eval_accuracy")
    # Policy against policy on held-out prompts when evaluated; else training batches.
    if "gold_final_policy" in summary:
        gold_gain = summary["gold_final_policy"] - summary["gold_initial_policy"]
    else:
        gold_gain = summary["gold_last"] - summary["gold_first"]
    checks = [
        ("RM pairwise accuracy, held-out prompts", f"{accuracy:.1%}" if accuracy is not None else "n/a",
         f">= {RM_ACCURACY_TARGET:.0%}", accuracy is not None and accuracy >= RM_ACCURACY_TARGET),
        ("gold gain, final vs initial policy", f"{gold_gain:+.3f}", f">= +{GOLD_GAIN_TARGET}",
         gold_gain >= GOLD_GAIN_TARGET),
        ("KL at the end (nats/sample)", f"{summary['kl_last']:.2f}", f"<= {KL_BOUND:g}", summary["kl_last"] <= KL_BOUND),
    ]
    table = Table(title="Targets", title_justify="left")
    for column in ("", "measured", "target", ""):
        table.add_column(column)
    for name, value, target, ok in checks:
        table.add_row(name, value, target, "[green]met[/]" if ok else "[red]missed[/]")
    console.print(table)
    summary["targets_met"] = {name: ok for name, _, _, ok in checks}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.plot(steps, [r["reward_raw"] for r in rows], "o-", label="proxy reward (RM score)", color="tab:blue")
    if rows[0].get("gold_score") is not None:
        ax.plot(steps, [r["gold_score"] for r in rows], "s-", label="gold score (held-out labeler)", color="tab:green")
    ax.set_xlabel("PPO iteration (policy version)")
    ax.set_ylabel("score")
    kl_axis = ax.twinx()
    kl_axis.plot(steps, [r["kl"] for r in rows], "^--", label="KL(π‖π_ref) per sample", color="tab:red")
    kl_axis.set_ylabel("KL (nats)")
    # Where the reward service started answering with a newer RM version.
    for previous, row in zip(rows, rows[1:]):
        if row.get("rm_version") and row["rm_version"] != previous.get("rm_version"):
            ax.axvline(row["step"] - 0.5, color="tab:purple", linestyle=":", alpha=0.7)
            ax.annotate(f"RM {row['rm_version']}", (row["step"] - 0.5, 1.0), xycoords=("data", "axes fraction"),
                        rotation=90, va="top", ha="right", color="tab:purple", fontsize=8)
    lines = ax.get_legend_handles_labels()
    kl_lines = kl_axis.get_legend_handles_labels()
    ax.legend(lines[0] + kl_lines[0], lines[1] + kl_lines[1], loc="upper left")
    online = any("rm_version" in r for r in rows)
    ax.set_title("Arbiter demo: reward, gold score and KL per iteration"
                 + (" (RM retrained online; dotted: RM promoted)" if online else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def served_version(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        return common_pb2_grpc.ModelServiceStub(channel).GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=10).info.version


def stack_config(models: DemoModels, workdir: Path, updates: int, online: OnlineRMScale | None = None,
                 reward_model: Path | None = None, **extra) -> StackConfig:
    return StackConfig(**extra,
        policy_model=str(models.policy), reward_model=str(reward_model or models.reward),
        prompts_file=str(models.prompts), workdir=str(workdir / "stack"),
        metrics_ports={name: 0 for name in ("reward", "policy", "reference", "worker", "trainer", "rm-loop")},
        rm_loop=rm_loop_config(online, Path(models.reward).parent.name) if online else None,
        # Generation overlaps training: the stack bounds the workers by the
        # trainer's ppo.max_staleness, trained with the decoupled objective.
        worker={"samples_per_prompt": 4, "prompts_per_call": 8, "max_new_tokens": models.max_new_tokens,
                "temperature": 1.0, **({"gold": models.gold} if models.gold else {})},
        # Every version stays while the run lasts: the KL crossings are
        # measured afterwards (and pruned to what was measured, see run).
        trainer={"max_updates": updates, "run_name": "ppo", "ppo": models.ppo, "keep_policy_versions": None},
    )


# After the last update the demo waits this long for the loop's first round
# (a published candidate) before calling the online run failed.
ONLINE_ROUND_WAIT_S = 300
# Fresh pairs from the final policy, per eval prompt: what each RM version is measured on.
CURRENT_POLICY_SAMPLES = 4


def kl_crossings(rows: list[dict], levels: Sequence[float], smooth: int = 3) -> dict[str, dict]:
    """For each KL level, the first update whose KL (the mean of the last
    ``smooth`` updates: one batch's estimate is noisy) reaches it: the policy
    version that first spent that KL budget. Levels never reached are left out."""
    out = {}
    for level in levels:
        for i, row in enumerate(rows):
            window = rows[max(0, i - smooth + 1): i + 1]
            kl = sum(r["kl"] for r in window) / len(window)
            if kl >= level:
                out[f"{level:g}"] = {"version": row["policy_version"], "step": row["step"], "kl": kl,
                                     "seconds": row.get("elapsed_s")}
                break
    return out


def run(workdir: Path, updates: int, quick: bool, console: Console, *, online_rm: bool = False,
        seconds: float | None = None, models: DemoModels | None = None, eval_samples: int = EVAL_SAMPLES,
        stack_extra: dict | None = None, seed: int = 0, current_policy_samples: int = CURRENT_POLICY_SAMPLES,
        kl_levels: Sequence[float] = (), pretrain_steps: int | None = None) -> dict:
    """``seconds``: stop after this long of training even before ``updates``
    (a fixed wall-time budget; the run is then an arm of a comparison,
    bench/online_rm.py, bench/ensemble_rm.py, measured while its stack is up);
    ``models``: already prepared (both arms run on the same ones);
    ``stack_extra``: more StackConfig fields (e.g. the reward service's flags);
    ``seed``: the stack's (sampling, prompt order, training) and the annotator's;
    ``current_policy_samples``: completions per eval prompt whose gold-labelled
    pairs measure the RM versions; ``kl_levels``: also measure (gold and
    proxy) the first version whose KL reached each level (``kl_crossings``);
    ``pretrain_steps``: the policy's pretraining steps when ``models`` are prepared here."""
    console.print(f"[bold]1.[/] Models in {workdir} (built here; nothing downloaded)")
    if models is None:
        models = prepare_models(workdir / "models", quick=quick, console=console, pretrain_steps=pretrain_steps)
    console.print(f"   {models.description}")
    console.print("[bold]2.[/] Starting the stack: broker, reward/reference/policy services, worker, trainer"
                  + (", rm loop" if online_rm else ""))
    started = time.monotonic()
    # A demo run is a fresh run: the trainer must not resume the last one's
    # checkpoint against a new reward model (models stay cached).
    shutil.rmtree(workdir / "stack", ignore_errors=True)
    (workdir / "annotations.jsonl").unlink(missing_ok=True)
    history_path = workdir / "stack" / "trainer" / "history.jsonl"
    online = (QUICK_ONLINE if quick else FULL_ONLINE) if online_rm else None
    reward_model = seed_registry(Path(models.reward), workdir / "stack" / "rm-registry") if online else None
    annotator: Annotator | None = None
    rm_name = Path(models.reward).parent.name
    summary: dict = {}
    with Stack(stack_config(models, workdir, updates, online, reward_model,
                            **{"seed": seed, **(stack_extra or {})})) as stack:
        console.print(f"   up in {time.monotonic() - started:.0f}s: " + ", ".join(f"{k} {v}" for k, v in stack.targets.items()))
        if online:
            annotator = Annotator(
                stack.targets["policy"], stack.targets["reward"],
                [json.loads(line)["prompt"] for line in Path(models.prompts).read_text().splitlines() if line.strip()],
                models.gold or "vader", models.max_new_tokens, workdir / "annotations.jsonl",
                prompts_per_call=online.prompts_per_call, interval_s=online.annotate_interval_s, seed=seed)
            annotator.start()
            console.print("   simulated annotator: pairs of live completions, labelled by the gold scorer, "
                          "submitted through SubmitPreference")
        console.print("[bold]3.[/] Training (the policy service swaps in every new version as it is published)")
        started = time.monotonic()
        rows: list[dict] = []
        rm_seen: dict[int, str] = {}
        seen_at: dict[int, float] = {}
        last_progress = time.monotonic()

        def view():
            table = progress_table(rows, updates, started)
            if annotator is None:
                return table
            return Group(table, rm_table(rm_versions(reward_model.parents[1], rm_name), annotator.stats.as_dict()))

        def out_of_time() -> bool:
            return seconds is not None and time.monotonic() - started >= seconds

        try:
            with Live(view(), console=console, refresh_per_second=2) as live:
                while len(rows) < updates and not out_of_time():
                    stack.check_alive()
                    fresh = read_history(history_path)
                    if len(fresh) > len(rows):
                        last_progress = time.monotonic()
                    elif time.monotonic() - last_progress > STALL_SECONDS:
                        raise StackError(
                            f"no PPO update for {STALL_SECONDS}s; see the logs in {stack.logs}:\n"
                            f"{stack.tail('trainer')}\n{stack.tail('worker-0')}"
                        )
                    now = time.monotonic() - started
                    for row in fresh:
                        # Training seconds when the demo first saw the update (to within a poll).
                        row["elapsed_s"] = seen_at.setdefault(row["step"], now)
                    if online:
                        # The RM version answering when the update was seen: the
                        # worker scores with the active one.
                        active = served_version(stack.targets["reward"])
                        for row in fresh:
                            row["rm_version"] = rm_seen.setdefault(row["step"], active)
                    rows = fresh
                    live.update(view())
                    time.sleep(0.5)
                if online:
                    annotator.stop()
                    # The loop's first round is the online mode's minimum:
                    # fail loudly rather than report a loop that never ran.
                    deadline = time.monotonic() + ONLINE_ROUND_WAIT_S
                    while not any(v["status"] != "seed" for v in rm_versions(reward_model.parents[1], rm_name)):
                        stack.check_alive()
                        if time.monotonic() > deadline:
                            raise StackError(f"the rm loop published no version within {ONLINE_ROUND_WAIT_S}s "
                                             f"of the last update:\n{stack.tail('rm-loop')}")
                        live.update(view())
                        time.sleep(0.5)
        finally:
            if annotator is not None:
                annotator.stop()
        if seconds is not None:
            # The budget is spent and the run is measured next (while the
            # services stay up): training on would only compete with it.
            stack.stop_training()
        if not rows:
            raise StackError(f"no PPO update within {seconds:.0f}s")
        final = rows[-1]["policy_version"]
        deadline = time.monotonic() + 60
        while served_version(stack.targets["policy"]) != final and time.monotonic() < deadline:
            time.sleep(0.5)
        serving = served_version(stack.targets["policy"])
        policies = trainer_policies_dir(stack.config)
        if seconds is not None and models.gold:
            crossings = kl_crossings(rows, kl_levels)
            summary["kl_crossings"] = crossings
            summary.update(evaluate_gold(models, policies / final, eval_samples, reward_target=stack.targets["reward"],
                                         more={f"kl{level}": policies / c["version"] for level, c in crossings.items()}))
        if online:
            summary.update(online_results(stack, models, reward_model.parents[1], rm_name, annotator, console,
                                          policies / final, current_policy_samples, seed))
        elif seconds is not None:
            # A budgeted run is one arm of a comparison: the frozen RM is
            # measured on its final policy's samples as the online arm's versions are.
            pairs, policy_version = fresh_pairs(policies / final, models.eval_prompts, models.gold or "vader",
                                                current_policy_samples, models.max_new_tokens, seed=11 + 1000 * seed)
            frozen = {"version": served_version(stack.targets["reward"]), "path": str(models.reward), "status": "frozen"}
            verdicts = correct_on_pairs(stack.targets["reward"], [frozen], pairs)
            frozen["accuracy_on_current_policy"] = _accuracy(verdicts.get(frozen["version"]))
            summary.update(rm_versions=[frozen], current_policy_pairs=len(pairs), current_policy_version=policy_version,
                           pair_verdicts=verdicts)
    console.print(f"[bold]4.[/] The policy service now serves {serving!r} (trainer's last version {final!r})")
    summary.update(summarize(rows, console))
    summary["served_version"] = serving
    summary["rm_eval_accuracy"] = models.rm_metrics.get("eval_accuracy")
    if models.gold and "gold_final_policy" not in summary:
        final_dir = policies / final
        console.print(f"[bold]5.[/] Gold score of the initial and the final policy on {len(models.eval_prompts)} "
                      f"held-out prompts x {eval_samples} samples")
        summary.update(evaluate_gold(models, final_dir, eval_samples))
    report_targets(summary, console)
    measured = {final, *(c["version"] for c in summary.get("kl_crossings", {}).values())}
    removed, freed = prune_policy_versions(policies, measured)
    if removed:
        console.print(f"   removed {removed} policy versions ({freed / 2**30:.1f} GiB) that were not measured; "
                      f"kept {', '.join(sorted(measured))}")
    summary["seconds"] = time.monotonic() - started
    png = workdir / "demo.png"
    plot(rows, png)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"   plot: {png}   summary: {workdir / 'summary.json'}")
    return summary


def _accuracy(verdicts: list[float] | None) -> float | None:
    return sum(verdicts) / len(verdicts) if verdicts else None


def online_results(stack: Stack, models: DemoModels, registry: Path, rm_name: str, annotator: Annotator,
                   console: Console, final_policy: Path, current_policy_samples: int = CURRENT_POLICY_SAMPLES,
                   seed: int = 0) -> dict:
    """The loop's versions and gates, and each version's accuracy on fresh
    pairs of the final policy's samples (held-out prompts), while the stack is up."""
    # Read before the versions are listed: the loop goes on promoting, and
    # the version serving now must be among those measured.
    active_at_end = served_version(stack.targets["reward"])
    versions = rm_versions(registry, rm_name)
    pairs, policy_version = fresh_pairs(final_policy, models.eval_prompts, models.gold or "vader",
                                        current_policy_samples, models.max_new_tokens, seed=11 + 1000 * seed)
    verdicts = correct_on_pairs(stack.targets["reward"], versions, pairs)
    for row in versions:
        row["accuracy_on_current_policy"] = _accuracy(verdicts.get(row["version"]))
    console.print(rm_table(versions, annotator.stats.as_dict()))
    table = Table(title=f"RM versions on {len(pairs)} held-out gold-labelled pairs of {policy_version}'s samples",
                  title_justify="left")
    for column in ("RM version", "status", "pairwise accuracy"):
        table.add_column(column, justify="right")
    for row in versions:
        value = row["accuracy_on_current_policy"]
        table.add_row(row["version"], row["status"], "-" if value is None else f"{value:.1%}")
    console.print(table)
    return {"online_rm": True, "annotator": annotator.stats.as_dict(), "rm_versions": versions,
            "current_policy_pairs": len(pairs), "current_policy_version": policy_version, "pair_verdicts": verdicts,
            "rm_active_at_end": active_at_end}


def run_from_args(args: argparse.Namespace) -> int:
    if "ARBITER_LOG_LEVEL" not in os.environ:
        # The live table is the demo's output; component logs go to their files.
        logging.getLogger().setLevel(logging.WARNING)
    # SIGTERM unwinds like Ctrl-C, so the stack's processes are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    console = Console(width=140)
    updates = args.updates or (4 if args.quick else 60)
    try:
        run(Path(args.workdir).resolve(), updates, args.quick, console, online_rm=args.online_rm,
            pretrain_steps=args.pretrain_steps)
    except StackError as err:
        console.print(f"[red]demo failed:[/] {err}")
        return 1
    return 0

